//! Each timeout of a run, with its own terminal reason, driven by a paused clock: the run actor
//! with a scripted provider and a scripted connection, no sockets and no processes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::actors::model::{FailureKind, Resources, RunRecord, RunState, Termination, Usage};
use ::actors::provider::{
    LogStream, Provider, ProviderError, ProviderHealth, SandboxExit, SandboxHandle, SandboxInfo,
    SpawnRequest,
};
use ::actors::router::{
    CostRates, ListProviders, ProviderRouter, ProviderSpec, SpawnSandbox, SupervisorSettings,
};
use ::actors::run::messages::{ShimFrame, ShimGone, ShimHello};
use ::actors::run::{RunActor, RunDeps, RunRegistry, RunSettings, RunSpec, RunTimeouts};
use ::actors::sandbox_connection::messages::ToShim;
use ::actors::store::memory::MemoryStore;
use ::actors::store::RunStore;
use ::actors::tools::{ToolFailure, ToolHost};
use actix::prelude::*;
use agent_shim::protocol::{AnsweredCall, BundleInfo, ServerMessage, ShimMessage};
use async_trait::async_trait;
use serde_json::{json, Value};
use uuid::Uuid;

/// How the scripted provider's spawn behaves.
#[derive(Clone, Copy)]
enum SpawnMode {
    Succeed,
    Hang,
    /// Succeeds after ten seconds.
    Slow,
    Panic,
}

struct ScriptedProvider {
    mode: Arc<Mutex<SpawnMode>>,
    kills: Arc<AtomicUsize>,
    sandboxes: Arc<Sandboxes>,
}

/// What the scripted provider was asked about its sandboxes; their end, on demand.
#[derive(Default)]
struct Sandboxes {
    /// The sandbox ids `wait` was called for, in order.
    waited: Mutex<Vec<String>>,
    /// The sandbox ids `usage` was called for, in order.
    usage_read: Mutex<Vec<String>>,
    /// Ends every sandbox being waited for (no exit code: it vanished).
    end: tokio::sync::Notify,
}

#[async_trait]
impl Provider for ScriptedProvider {
    fn kind(&self) -> &'static str {
        "scripted"
    }
    async fn spawn(&self, request: SpawnRequest) -> Result<SandboxHandle, ProviderError> {
        let mode = *self.mode.lock().unwrap();
        match mode {
            SpawnMode::Succeed => Ok(SandboxHandle {
                id: request.run_id.to_string(),
                remote_host: "scripted-host".into(),
            }),
            SpawnMode::Hang => std::future::pending().await,
            SpawnMode::Slow => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(SandboxHandle {
                    id: request.run_id.to_string(),
                    remote_host: "scripted-host".into(),
                })
            }
            SpawnMode::Panic => panic!("backend blew up"),
        }
    }
    async fn wait(&self, sandbox: &SandboxHandle) -> Result<SandboxExit, ProviderError> {
        let end = self.sandboxes.end.notified();
        self.sandboxes
            .waited
            .lock()
            .unwrap()
            .push(sandbox.id.clone());
        end.await;
        Ok(SandboxExit {
            code: None,
            signal: None,
            oom_killed: false,
        })
    }
    async fn stop(&self, _: &SandboxHandle) -> Result<(), ProviderError> {
        Ok(())
    }
    async fn kill(&self, _: &SandboxHandle) -> Result<(), ProviderError> {
        self.kills.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn logs(&self, _: &SandboxHandle, _: bool) -> Result<LogStream, ProviderError> {
        Ok(Box::pin(futures_util::stream::empty()))
    }
    async fn usage(&self, sandbox: &SandboxHandle) -> Result<Option<Usage>, ProviderError> {
        self.sandboxes
            .usage_read
            .lock()
            .unwrap()
            .push(sandbox.id.clone());
        Ok(None)
    }
    async fn list(&self, _: &BTreeMap<String, String>) -> Result<Vec<SandboxInfo>, ProviderError> {
        Ok(vec![])
    }
    async fn health(&self) -> ProviderHealth {
        ProviderHealth {
            healthy: true,
            message: None,
        }
    }
}

/// `slow` never finishes; anything else echoes its arguments.
struct ScriptedTools;

/// Every tool call executed, by run: (run id, tool, args).
static EXECUTED: Mutex<Vec<(Uuid, String, Value)>> = Mutex::new(Vec::new());

/// The arguments of the calls executed for run `id`, in order.
fn executed_args(id: Uuid) -> Vec<Value> {
    EXECUTED
        .lock()
        .unwrap()
        .iter()
        .filter(|(run, _, _)| *run == id)
        .map(|(_, _, args)| args.clone())
        .collect()
}

/// The call ids of the tool results among the frames sent to a shim.
fn answered_ids(frames: &[ToShim]) -> Vec<&str> {
    frames
        .iter()
        .filter_map(|m| match m {
            ToShim::Frame(ServerMessage::ToolResult { call_id, .. }) => Some(call_id.as_str()),
            _ => None,
        })
        .collect()
}

#[async_trait]
impl ToolHost for ScriptedTools {
    async fn call(&self, run: Uuid, tool: &str, args: Value) -> Result<Value, ToolFailure> {
        EXECUTED
            .lock()
            .unwrap()
            .push((run, tool.to_string(), args.clone()));
        if tool == "slow" {
            std::future::pending::<()>().await;
        }
        Ok(args)
    }
    fn tools(&self) -> Vec<&'static str> {
        vec!["slow", "echo"]
    }
}

/// Collects what the run sends to its shim.
struct Inbox(Arc<Mutex<Vec<ToShim>>>);

impl Actor for Inbox {
    type Context = Context<Self>;
}

impl Handler<ToShim> for Inbox {
    type Result = ();
    fn handle(&mut self, msg: ToShim, _: &mut Context<Self>) {
        self.0.lock().unwrap().push(msg);
    }
}

fn timeouts() -> RunTimeouts {
    RunTimeouts {
        startup: Duration::from_secs(60),
        tool_call: Duration::from_secs(30),
        idle: Duration::from_secs(300),
        run_ttl: None,
        stop_grace: Duration::from_secs(10),
        lost_after: Duration::from_secs(60),
        heartbeat_interval: Duration::from_secs(5),
        token_max_lifetime: Duration::from_secs(3600),
    }
}

struct Harness {
    store: Arc<MemoryStore>,
    deps: RunDeps,
    mode: Arc<Mutex<SpawnMode>>,
    kills: Arc<AtomicUsize>,
    sandboxes: Arc<Sandboxes>,
    router: Addr<ProviderRouter>,
}

fn harness(mode: SpawnMode) -> Harness {
    let store = Arc::new(MemoryStore::new());
    let mode = Arc::new(Mutex::new(mode));
    let kills = Arc::new(AtomicUsize::new(0));
    let sandboxes = Arc::new(Sandboxes::default());
    let (m, k, sb) = (mode.clone(), kills.clone(), sandboxes.clone());
    let spec = ProviderSpec {
        name: "scripted".into(),
        kind: "scripted".into(),
        factory: Arc::new(move || {
            Ok(Arc::new(ScriptedProvider {
                mode: m.clone(),
                kills: k.clone(),
                sandboxes: sb.clone(),
            }) as Arc<dyn Provider>)
        }),
        default_resources: Resources::default(),
        max_concurrent_runs: None,
        cost: CostRates::default(),
    };
    let router = ProviderRouter::new(
        vec![spec],
        SupervisorSettings {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            health_interval: Duration::from_secs(3600),
        },
    )
    .start();
    let deps = RunDeps {
        store: store.clone(),
        tools: Arc::new(ScriptedTools),
        router: router.clone(),
        registry: RunRegistry::default(),
        settings: Arc::new(RunSettings {
            timeouts: timeouts(),
            callback_url: "http://127.0.0.1:1".into(),
            cluster_id: "test".into(),
            evidence_lines: 10,
            usage_interval: Duration::ZERO,
            replica_id: "test-replica".into(),
        }),
        adopt_span: ::actors::run::detached_adopt_span,
        export_spans: None,
        metrics: ::actors::metrics::Metrics::noop(),
    };
    Harness {
        store,
        deps,
        mode,
        kills,
        sandboxes,
        router,
    }
}

impl Harness {
    /// Stores the spec an adopting replica needs (the API stores it; this harness starts the
    /// actor directly).
    async fn store_spec(&self, id: Uuid) {
        let spec = ::actors::run::StoredSpec {
            image: None,
            bundle: test_bundle(),
            env: BTreeMap::new(),
            traceparent: TRACEPARENT.into(),
        };
        self.store
            .put_blob(
                &::actors::run::StoredSpec::blob_key(id),
                &serde_json::to_vec(&spec).unwrap(),
            )
            .await
            .unwrap();
    }

    /// Another replica, sharing this one's store and providers, takes run `id` over (its shim
    /// called back there); it reads usage every `usage_interval` (zero: never).
    async fn take_over_elsewhere(&self, id: Uuid, usage_interval: Duration) {
        let other = RunDeps {
            registry: RunRegistry::default(),
            settings: Arc::new(RunSettings {
                replica_id: "other-replica".into(),
                usage_interval,
                ..(*self.deps.settings).clone()
            }),
            ..self.deps.clone()
        };
        ::actors::run::adopt(id, &other, ::actors::store::Claim::Takeover)
            .await
            .unwrap()
            .expect("the run is adopted");
    }

    /// What `pick` takes from the run's stored events, in order.
    async fn events<T>(
        &self,
        id: Uuid,
        pick: impl Fn(::actors::model::EventKind) -> Option<T>,
    ) -> Vec<T> {
        use futures_util::StreamExt;
        let events: Vec<_> = self
            .store
            .events(id, 0, false)
            .await
            .unwrap()
            .collect()
            .await;
        events
            .into_iter()
            .filter_map(|e| pick(e.unwrap().kind))
            .collect()
    }

    /// [`Harness::events`] once there are `want` (or after five seconds of the paused clock).
    async fn wait_events<T>(
        &self,
        id: Uuid,
        want: usize,
        pick: impl Fn(::actors::model::EventKind) -> Option<T>,
    ) -> Vec<T> {
        let mut tries = 0;
        loop {
            tries += 1;
            let events = self.events(id, &pick).await;
            if events.len() >= want || tries > 250 {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`Harness::launch`], then the paused clock advanced until the sandbox is up.
    async fn launch_started(&self, timeout_s: Option<u64>) -> (Uuid, Addr<RunActor>) {
        let (id, run) = self.launch(timeout_s).await;
        self.advance_until(id, RunState::Starting, Duration::from_secs(1))
            .await;
        (id, run)
    }

    async fn launch(&self, timeout_s: Option<u64>) -> (Uuid, Addr<RunActor>) {
        let id = Uuid::new_v4();
        let now = chrono::Utc::now();
        let record = RunRecord {
            id,
            agent: "a".into(),
            task: "t".into(),
            provider: "scripted".into(),
            state: RunState::Pending,
            remote_host: None,
            sandbox_id: None,
            created_at: now,
            state_times: BTreeMap::from([(RunState::Pending, now)]),
            exit_code: None,
            failure: None,
            termination: None,
            resources: Resources::default(),
            usage: Usage::default(),
            cost_estimate: None,
            trace_id: "0".repeat(32),
            owner: "test".into(),
            timeout_s,
            result: None,
            evidence: None,
            env_names: vec![],
        };
        self.store.create_run(&record, None).await.unwrap();
        let lease = match self
            .store
            .claim_run(id, "test-replica", ::actors::store::Claim::IfOrphaned)
            .await
            .unwrap()
        {
            ::actors::store::ClaimOutcome::Claimed { lease, .. } => lease,
            held => panic!("fresh run not claimed: {held:?}"),
        };
        let addr = RunActor::launch(
            RunSpec {
                record,
                image: None,
                bundle: test_bundle(),
                env: BTreeMap::new(),
                traceparent: TRACEPARENT.into(),
                span: tracing::Span::none(),
            },
            lease,
            self.deps.clone(),
        );
        (id, addr)
    }

    async fn state(&self, id: Uuid) -> RunRecord {
        self.store.get_run(id).await.unwrap().unwrap()
    }

    /// Advances the paused clock in small steps until the run is in `state`.
    async fn advance_until(&self, id: Uuid, state: RunState, at_most: Duration) -> RunRecord {
        let step = Duration::from_millis(500);
        let mut waited = Duration::ZERO;
        loop {
            let record = self.state(id).await;
            if record.state == state {
                return record;
            }
            assert!(
                waited <= at_most,
                "run not {state} after {waited:?}: {} {:?}",
                record.state,
                record.failure
            );
            tokio::time::sleep(step).await;
            waited += step;
        }
    }
}

/// The bundle every run of these tests names (never fetched: no shim runs).
fn test_bundle() -> BundleInfo {
    BundleInfo {
        url: "http://127.0.0.1:1/bundle".into(),
        sha256: "0".repeat(64),
        size: 0,
        command: "true".into(),
    }
}

const TRACEPARENT: &str = "00-00000000000000000000000000000000-0000000000000000-01";

/// A `tool_call` frame with args `{"call": call}` on connection 1; `answered`: the connection's
/// answer to it.
async fn send_call(
    run: &Addr<RunActor>,
    seq: u64,
    call: &str,
    tool: &str,
    answered: Option<Box<::actors::run::messages::AnsweredHere>>,
) {
    run.send(ShimFrame {
        conn_id: 1,
        queued: None,
        answered,
        message: ShimMessage::ToolCall {
            seq,
            call_id: call.into(),
            tool: tool.into(),
            args: json!({ "call": call }),
        },
    })
    .await
    .unwrap();
}

async fn connect(run: &Addr<RunActor>, conn_id: u64) -> Arc<Mutex<Vec<ToShim>>> {
    connect_resuming(run, conn_id, None, vec![], vec![]).await
}

/// A shim's hello with what it says about resuming; returns what the run sends it.
async fn connect_resuming(
    run: &Addr<RunActor>,
    conn_id: u64,
    resume_from: Option<u64>,
    pending_calls: Vec<String>,
    answered_calls: Vec<AnsweredCall>,
) -> Arc<Mutex<Vec<ToShim>>> {
    let inbox = Arc::new(Mutex::new(Vec::new()));
    let addr = Inbox(inbox.clone()).start();
    run.send(ShimHello {
        conn_id,
        conn: addr.recipient(),
        host: "sandbox".into(),
        resume_from,
        pending_calls,
        answered_calls,
    })
    .await
    .unwrap()
    .unwrap();
    inbox
}

#[actix_rt::test]
async fn startup_timeout_when_the_sandbox_is_never_created() {
    tokio::time::pause();
    let h = harness(SpawnMode::Hang);
    let (id, _) = h.launch(None).await;
    let record = h
        .advance_until(id, RunState::Failed, Duration::from_secs(61))
        .await;
    let failure = record.failure.unwrap();
    assert_eq!(failure.kind, FailureKind::StartupTimeout);
    assert!(failure.hint.contains("startup timeout"), "{}", failure.hint);
}

#[actix_rt::test]
async fn unreachable_callback_when_the_sandbox_never_connects() {
    tokio::time::pause();
    let h = harness(SpawnMode::Succeed);
    let (id, _) = h.launch_started(None).await;
    let record = h
        .advance_until(id, RunState::Failed, Duration::from_secs(61))
        .await;
    assert_eq!(
        record.failure.unwrap().kind,
        FailureKind::UnreachableCallback
    );
    assert_eq!(h.kills.load(Ordering::SeqCst), 1, "sandbox removed");
}

#[actix_rt::test]
async fn idle_timeout_stops_then_fails_idle_timeout() {
    tokio::time::pause();
    let h = harness(SpawnMode::Succeed);
    let (id, run) = h.launch_started(None).await;
    let inbox = connect(&run, 1).await;
    h.advance_until(id, RunState::Running, Duration::from_secs(1))
        .await;
    // Activity at 200 s pushes the idle deadline out: still running at 400 s.
    tokio::time::sleep(Duration::from_secs(200)).await;
    run.send(ShimFrame {
        conn_id: 1,
        queued: None,
        answered: None,
        message: ShimMessage::Log {
            seq: 1,
            stream: agent_shim::protocol::LogStream::Stdout,
            line: "busy".into(),
        },
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert_eq!(h.state(id).await.state, RunState::Running);
    // Nothing since: the idle deadline (300 s after the last activity) passes.
    let record = h
        .advance_until(id, RunState::Stopping, Duration::from_secs(120))
        .await;
    assert_eq!(record.state, RunState::Stopping);
    assert!(inbox
        .lock()
        .unwrap()
        .iter()
        .any(|m| matches!(m, ToShim::Frame(ServerMessage::Stop { .. }))));
    // The agent ignores the stop: killed after the grace period, failed with idle_timeout.
    let record = h
        .advance_until(id, RunState::Failed, Duration::from_secs(11))
        .await;
    assert_eq!(record.failure.unwrap().kind, FailureKind::IdleTimeout);
    assert_eq!(h.kills.load(Ordering::SeqCst), 1);
}

#[actix_rt::test]
async fn run_ttl_is_not_reset_by_activity() {
    tokio::time::pause();
    let h = harness(SpawnMode::Succeed);
    let (id, run) = h.launch(Some(30)).await;
    h.advance_until(id, RunState::Starting, Duration::from_secs(1))
        .await;
    connect(&run, 1).await;
    for seq in 1..=5 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        run.send(ShimFrame {
            conn_id: 1,
            queued: None,
            answered: None,
            message: ShimMessage::Log {
                seq,
                stream: agent_shim::protocol::LogStream::Stdout,
                line: "working".into(),
            },
        })
        .await
        .unwrap();
    }
    h.advance_until(id, RunState::Stopping, Duration::from_secs(10))
        .await;
    // The agent exits on the stop: the run still fails, with its own reason.
    run.send(ShimFrame {
        conn_id: 1,
        queued: None,
        answered: None,
        message: ShimMessage::Exited {
            seq: 6,
            code: Some(143),
            signal: None,
        },
    })
    .await
    .unwrap();
    let record = h
        .advance_until(id, RunState::Failed, Duration::from_secs(2))
        .await;
    assert_eq!(record.failure.unwrap().kind, FailureKind::RunTimeout);
    assert_eq!(record.exit_code, Some(143));
}

#[actix_rt::test]
async fn a_call_the_shim_already_has_an_answer_to_is_recorded_not_executed_again() {
    tokio::time::pause();
    let h = harness(SpawnMode::Succeed);
    let (id, run) = h.launch_started(None).await;
    // The replica that answered c1 stopped before recording it; the shim says so on its hello
    // to this one and resends the call's frame (never acked).
    let inbox = connect_resuming(
        &run,
        1,
        Some(0),
        vec!["c2".into()],
        vec![AnsweredCall {
            call_id: "c1".into(),
            tool: "echo".into(),
            ok: false,
            error_code: Some("not_found".into()),
        }],
    )
    .await;
    for (seq, call) in [(1, "c1"), (2, "c2")] {
        send_call(&run, seq, call, "echo", None).await;
    }
    let results = h
        .wait_events(id, 2, |kind| match kind {
            ::actors::model::EventKind::ToolResult {
                call_id,
                ok,
                error_code,
                ..
            } => Some((call_id, ok, error_code)),
            _ => None,
        })
        .await;
    assert!(
        results.contains(&("c1".into(), false, Some("not_found".into()))),
        "c1 recorded as the shim reported it: {results:?}"
    );
    assert!(
        results.iter().any(|(c, ok, _)| c == "c2" && *ok),
        "{results:?}"
    );
    let executed = executed_args(id);
    assert_eq!(executed, vec![json!({"call": "c2"})], "only c2 executed");
    let frames = inbox.lock().unwrap();
    let answered = answered_ids(&frames);
    assert_eq!(answered, ["c2"], "no second answer to c1");
    assert!(frames
        .iter()
        .any(|m| matches!(m, ToShim::Frame(ServerMessage::Ack { seq: 2 }))));
}

#[actix_rt::test]
async fn a_call_the_connection_answered_is_recorded_not_executed_or_answered_again() {
    use ::actors::run::messages::AnsweredHere;
    tokio::time::pause();
    let h = harness(SpawnMode::Succeed);
    let (id, run) = h.launch_started(None).await;
    let inbox = connect(&run, 1).await;
    let answer_text = |call: &str| {
        serde_json::to_string(&ServerMessage::ToolResult {
            call_id: call.into(),
            ok: true,
            result: Some(json!({ "answered": call })),
            error: None,
        })
        .unwrap()
    };
    let answered = |call: &str| {
        Some(Box::new(AnsweredHere {
            frame: answer_text(call).into(),
            result_bytes: json!({ "answered": call }).to_string().len(),
            took: Duration::from_micros(7),
            span: tracing::Span::none(),
        }))
    };
    // c1 answered by the connection; c1 again likewise (its gate keeps a reused id for the run
    // actor, but should one come answered it is not answered again); c2 not; c2 again (the
    // agent reused the id): refused with an error answer, not executed.
    for (seq, call, answer) in [
        (1, "c1", true),
        (2, "c1", true),
        (3, "c2", false),
        (4, "c2", false),
    ] {
        let answered = if answer { answered(call) } else { None };
        send_call(&run, seq, call, "echo", answered).await;
    }
    let events = h
        .wait_events(id, 7, |kind| match kind {
            ::actors::model::EventKind::ToolCall { call_id, .. } => Some(("call", call_id, None)),
            ::actors::model::EventKind::ToolResult {
                call_id,
                error_code,
                ..
            } => Some(("result", call_id, error_code)),
            _ => None,
        })
        .await;
    let pairs: Vec<(&str, &str, Option<&str>)> = events
        .iter()
        .map(|(what, call, code)| (*what, call.as_str(), code.as_deref()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("call", "c1", None),
            ("result", "c1", None),
            ("call", "c1", None),
            ("call", "c2", None),
            ("result", "c2", None),
            ("call", "c2", None),
            ("result", "c2", Some("duplicate_call_id")),
        ],
        "c1 recorded once with its answer, its reused id only as a call; c2's reused id refused: {events:?}"
    );
    let executed = executed_args(id);
    assert_eq!(
        executed,
        vec![json!({"call": "c2"})],
        "only c2 executed, once"
    );
    let frames = inbox.lock().unwrap().clone();
    let answered = answered_ids(&frames);
    assert_eq!(
        answered,
        ["c2", "c2"],
        "the run actor answers only what the connection did not: c2, then its reuse"
    );
    let refusal = frames.iter().find_map(|m| match m {
        ToShim::Frame(ServerMessage::ToolResult {
            ok: false,
            error: Some(error),
            ..
        }) => Some(error.clone()),
        _ => None,
    });
    let refusal = refusal.expect("the reused id is answered with an error");
    assert_eq!(refusal.code, "duplicate_call_id");
    assert!(refusal.message.contains("'c2'"), "{}", refusal.message);
    assert!(frames
        .iter()
        .any(|m| matches!(m, ToShim::Frame(ServerMessage::Ack { seq: 4 }))));

    // A shim that reconnects still waiting for c1 and c2 gets both answers again: c1's as the
    // very frame the connection sent.
    let inbox = connect_resuming(&run, 2, Some(4), vec!["c1".into(), "c2".into()], vec![]).await;
    let frames = inbox.lock().unwrap();
    assert!(
        frames
            .iter()
            .any(|m| matches!(m, ToShim::Text(text) if **text == answer_text("c1"))),
        "{frames:?}"
    );
    assert_eq!(answered_ids(&frames), ["c2"], "{frames:?}");
}

#[actix_rt::test]
async fn an_adopted_run_whose_sandbox_handle_is_stored_late_names_it() {
    tokio::time::pause();
    let h = harness(SpawnMode::Hang);
    let (id, _run) = h.launch(None).await;
    h.advance_until(id, RunState::Provisioning, Duration::from_secs(1))
        .await;
    h.store_spec(id).await;
    // Another replica takes the run over (its shim called back there) while this one's spawn
    // call has not returned: no handle is stored yet.
    h.take_over_elsewhere(id, Duration::ZERO).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.state(id).await.sandbox_id, None);
    // The spawning replica stores the handle once its spawn call returns.
    let handle = SandboxHandle {
        id: "sandbox-7".into(),
        remote_host: "host-7".into(),
    };
    h.store
        .put_blob(
            &::actors::run::sandbox_blob_key(id),
            &serde_json::to_vec(&handle).unwrap(),
        )
        .await
        .unwrap();
    let mut record = h.state(id).await;
    for _ in 0..40 {
        if record.sandbox_id.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        record = h.state(id).await;
    }
    assert_eq!(record.sandbox_id.as_deref(), Some("sandbox-7"));
    assert_eq!(record.remote_host.as_deref(), Some("host-7"));
    // Its creator never stored the sandbox's creation (its spawn call had not returned); the
    // adopter does, once.
    assert_eq!(
        sandboxes_created(&h, id).await,
        [("sandbox-7".to_string(), "host-7".to_string())]
    );
}

#[actix_rt::test]
async fn a_sandbox_that_comes_up_after_its_run_moved_to_another_replica_stays_with_the_run() {
    tokio::time::pause();
    let h = harness(SpawnMode::Slow);
    let (id, run) = h.launch(None).await;
    h.advance_until(id, RunState::Provisioning, Duration::from_secs(1))
        .await;
    h.store_spec(id).await;
    // The shim called back to another replica while this one's spawn call had not returned.
    h.take_over_elsewhere(id, Duration::ZERO).await;
    // This replica learns it no longer drives the run at its next write (a shim's hello that
    // reached it late), and its actor stops.
    let _inbox = connect(&run, 1).await;
    for _ in 0..50 {
        if !run.connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!run.connected(), "the superseded actor stopped");
    // The spawn call returns (after ten seconds) to a replica that no longer drives the run.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(
        h.kills.load(Ordering::SeqCst),
        0,
        "the sandbox of a run driven elsewhere is not removed"
    );
    let record = h.state(id).await;
    assert!(!record.state.is_terminal(), "{}", record.state);
    assert_eq!(
        record.sandbox_id.as_deref(),
        Some(id.to_string().as_str()),
        "the new owner found the sandbox"
    );
}

#[actix_rt::test]
async fn the_reconciler_fails_an_undriven_run_whose_sandbox_vanished_and_keeps_its_evidence() {
    use ::actors::model::LogSource;
    tokio::time::pause();
    let h = harness(SpawnMode::Succeed);
    let (id, run) = h.launch_started(None).await;
    let _inbox = connect(&run, 1).await;
    h.advance_until(id, RunState::Running, Duration::from_secs(1))
        .await;
    for (source, line) in [
        (LogSource::Agent, "the agent's last words"),
        (LogSource::Provider, "the sandbox's last words"),
    ] {
        h.store
            .append_logs(id, source, vec![("stdout".into(), line.into())])
            .await
            .unwrap();
    }
    // A reconciler that sees no actor for the run (its replica went away) and no sandbox (the
    // scripted provider lists none).
    let reconciler = ::actors::reconciler::Reconciler::new(
        h.router.clone(),
        h.store.clone(),
        RunRegistry::default(),
        "test".into(),
        "reconciling-replica".into(),
        Duration::from_secs(3600),
    )
    .start();
    let done = h
        .advance_until(id, RunState::Failed, Duration::from_secs(5))
        .await;
    assert_eq!(
        done.failure.as_ref().map(|f| f.kind),
        Some(FailureKind::SandboxVanished)
    );
    assert_eq!(done.owner, "reconciling-replica");
    let evidence = done.evidence.expect("a failed run keeps its evidence");
    assert_eq!(evidence.agent_logs, ["stdout: the agent's last words"]);
    assert_eq!(evidence.provider_logs, ["stdout: the sandbox's last words"]);
    // Wound up: the logs are closed (a follower reads them to their end) and the last event
    // names the failure.
    let follow = h.store.logs(id, LogSource::Agent, 0, true).await.unwrap();
    let followed = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::StreamExt::collect::<Vec<_>>(follow),
    )
    .await
    .expect("the run's logs are closed: following them ends");
    assert_eq!(followed.len(), 1);
    let last = h
        .events(id, |kind| match kind {
            ::actors::model::EventKind::StateChanged { to, failure, .. } => Some((to, failure)),
            _ => None,
        })
        .await
        .pop();
    assert!(
        matches!(&last, Some((RunState::Failed, Some(f))) if f.kind == FailureKind::SandboxVanished),
        "{last:?}"
    );
    let counters = reconciler
        .send(::actors::reconciler::GetCounters)
        .await
        .unwrap();
    assert_eq!(counters.runs_failed, 1);
}

/// The `sandbox_created` events of run `id`: (sandbox id, host).
async fn sandboxes_created(h: &Harness, id: Uuid) -> Vec<(String, String)> {
    h.events(id, |kind| match kind {
        ::actors::model::EventKind::SandboxCreated {
            sandbox_id,
            remote_host,
        } => Some((sandbox_id, remote_host)),
        _ => None,
    })
    .await
}

#[actix_rt::test]
async fn an_adopted_run_follows_its_sandbox_to_its_end_and_reads_its_usage() {
    tokio::time::pause();
    let h = harness(SpawnMode::Succeed);
    let (id, run) = h.launch_started(None).await;
    let _inbox = connect(&run, 1).await;
    h.advance_until(id, RunState::Running, Duration::from_secs(1))
        .await;
    let sandbox = id.to_string();
    assert_eq!(
        *h.sandboxes.waited.lock().unwrap(),
        std::slice::from_ref(&sandbox)
    );
    h.store_spec(id).await;
    // Another replica takes the running run over (its shim called back there); that replica
    // reads usage every ten seconds, this one never.
    h.take_over_elsewhere(id, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(
        *h.sandboxes.waited.lock().unwrap(),
        [sandbox.clone(), sandbox.clone()],
        "the adopter waits for the sandbox too"
    );
    assert!(
        h.sandboxes.usage_read.lock().unwrap().contains(&sandbox),
        "the adopter reads the sandbox's usage"
    );
    // The sandbox goes away without a word from its shim: the adopter ends the run.
    h.sandboxes.end.notify_waiters();
    let done = h
        .advance_until(id, RunState::Failed, Duration::from_secs(5))
        .await;
    assert_eq!(
        done.failure.map(|f| f.kind),
        Some(FailureKind::SandboxVanished)
    );
    assert!(done.owner.contains("other-replica"), "{}", done.owner);
    // The creator had stored the sandbox's creation: the adopter does not repeat it.
    assert_eq!(
        sandboxes_created(&h, id).await,
        [(sandbox, "scripted-host".to_string())]
    );
}

#[actix_rt::test]
async fn a_tool_call_timeout_answers_the_agent_and_the_run_goes_on() {
    tokio::time::pause();
    let h = harness(SpawnMode::Succeed);
    let (id, run) = h.launch_started(None).await;
    let inbox = connect(&run, 1).await;
    send_call(&run, 1, "c1", "slow", None).await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    let answered = inbox.lock().unwrap().iter().find_map(|m| match m {
        ToShim::Frame(ServerMessage::ToolResult {
            call_id, ok, error, ..
        }) if call_id == "c1" => Some((*ok, error.clone())),
        _ => None,
    });
    let (ok, error) = answered.expect("the agent got an answer");
    assert!(!ok);
    assert_eq!(error.unwrap().code, "timeout");
    assert_eq!(h.state(id).await.state, RunState::Running);
    // Acked once stored.
    assert!(inbox
        .lock()
        .unwrap()
        .iter()
        .any(|m| matches!(m, ToShim::Frame(ServerMessage::Ack { seq: 1 }))));
}

#[actix_rt::test]
async fn a_shim_that_does_not_come_back_fails_connection_lost() {
    tokio::time::pause();
    let h = harness(SpawnMode::Succeed);
    let (id, run) = h.launch_started(None).await;
    connect(&run, 1).await;
    run.send(ShimGone {
        conn_id: 1,
        reason: "network".into(),
    })
    .await
    .unwrap();
    // lost_after (60 s) plus one heartbeat (5 s).
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert_eq!(h.state(id).await.state, RunState::Running);
    let record = h
        .advance_until(id, RunState::Failed, Duration::from_secs(20))
        .await;
    assert_eq!(record.failure.unwrap().kind, FailureKind::ConnectionLost);
    assert_eq!(h.kills.load(Ordering::SeqCst), 1);
}

#[actix_rt::test]
async fn a_resumed_shim_resends_and_duplicates_are_dropped() {
    tokio::time::pause();
    let h = harness(SpawnMode::Succeed);
    let (id, run) = h.launch_started(None).await;
    connect(&run, 1).await;
    let msg = |seq: u64, text: &str| ShimMessage::AgentEvent {
        seq,
        payload: agent_shim::protocol::AgentEventPayload::Message { text: text.into() },
    };
    for seq in 1..=3 {
        run.send(ShimFrame {
            conn_id: 1,
            queued: None,
            answered: None,
            message: msg(seq, &format!("m{seq}")),
        })
        .await
        .unwrap();
    }
    // A second connection replaces the first; frames from the old one are ignored.
    let inbox = connect(&run, 2).await;
    let welcome_last_acked = inbox.lock().unwrap().iter().find_map(|m| match m {
        ToShim::Frame(ServerMessage::Welcome {
            last_acked,
            start_agent,
            ..
        }) => Some((*last_acked, *start_agent)),
        _ => None,
    });
    assert_eq!(welcome_last_acked, Some((3, false)));
    run.send(ShimFrame {
        conn_id: 1,
        queued: None,
        answered: None,
        message: msg(4, "from the old connection"),
    })
    .await
    .unwrap();
    for seq in 2..=4 {
        run.send(ShimFrame {
            conn_id: 2,
            queued: None,
            answered: None,
            message: msg(seq, &format!("m{seq}")),
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let texts = h
        .events(id, |kind| match kind {
            ::actors::model::EventKind::AgentMessage { text } => Some(text),
            _ => None,
        })
        .await;
    assert_eq!(texts, vec!["m1", "m2", "m3", "m4"]);
    run.send(::actors::run::messages::KillRun {
        reason: "done".into(),
    })
    .await
    .unwrap();
    let record = h
        .advance_until(id, RunState::Killed, Duration::from_secs(1))
        .await;
    assert_eq!(record.termination, Some(Termination::Killed));
}

#[actix_rt::test]
async fn a_provider_actor_that_panics_is_restarted_and_counted() {
    let h = harness(SpawnMode::Panic);
    let request = |run_id| SpawnRequest {
        span: tracing::Span::none(),
        run_id,
        agent: "a".into(),
        image: None,
        resources: Resources::default(),
        env: BTreeMap::new(),
        labels: BTreeMap::new(),
        progress: None,
    };
    // Let the router start its provider actor.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let res = h
        .router
        .send(SpawnSandbox {
            provider: "scripted".into(),
            request: request(Uuid::new_v4()),
        })
        .await
        .unwrap();
    assert!(res.is_err(), "a panicking spawn is an error to the caller");
    *h.mode.lock().unwrap() = SpawnMode::Succeed;
    // Restarted with backoff; then spawns work again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let providers = h.router.send(ListProviders).await.unwrap();
        let p = &providers[0];
        if p.restarts == 1 && p.healthy {
            assert!(p.last_error.is_some());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not restarted: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let res = h
        .router
        .send(SpawnSandbox {
            provider: "scripted".into(),
            request: request(Uuid::new_v4()),
        })
        .await
        .unwrap();
    assert!(res.is_ok(), "{res:?}");
}

#[actix_rt::test]
async fn a_sandbox_created_after_its_run_was_killed_is_removed() {
    tokio::time::pause();
    let h = harness(SpawnMode::Slow);
    let (id, run) = h.launch(None).await;
    h.advance_until(id, RunState::Provisioning, Duration::from_secs(1))
        .await;
    run.send(::actors::run::messages::KillRun {
        reason: "changed my mind".into(),
    })
    .await
    .unwrap();
    let record = h
        .advance_until(id, RunState::Killed, Duration::from_secs(1))
        .await;
    assert!(record.sandbox_id.is_none());
    assert_eq!(h.kills.load(Ordering::SeqCst), 0);
    tokio::time::sleep(Duration::from_secs(11)).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        h.kills.load(Ordering::SeqCst),
        1,
        "the late sandbox was removed"
    );
}
