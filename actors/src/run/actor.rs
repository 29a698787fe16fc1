//! `RunActor`: one per run. Feeds what happens to the pure lifecycle in `state.rs` and carries out
//! the actions it returns: provider calls, timers, frames to the shim, writes to the store.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use agent_shim::protocol::{
    AgentEventPayload, AnsweredCall, BundleInfo, LogStream as ShimLogStream, ServerMessage,
    ShimMessage, ShimSpan, ToolError, PROTOCOL_VERSION,
};
use bytestring::ByteString;
use chrono::Utc;
use futures_util::{FutureExt, StreamExt};
use opentelemetry::KeyValue;
use serde_json::Value;

use super::messages::{
    AnsweredHere, Attachment, CheckCommands, KillRun, ShimFrame, ShimFrames, ShimGone, ShimHello,
    StopRun, Superseded,
};
use super::state::{transition, Action, Ending, Input, Limits, Phase, Timer};
use crate::metrics::{attr, Metrics, QueueCounter, QueueKind};
use crate::model::{
    EventKind, Evidence, Failure, FailureKind, LogSource, RunId, RunRecord, RunState, Usage,
};
use crate::provider::{labels, ProviderError, SandboxHandle, SpawnProgress, SpawnRequest};
use crate::router::{
    KillSandbox, ProviderCost, ProviderRouter, SandboxLogs, SandboxUsage, SpawnSandbox, WaitSandbox,
};
use crate::sandbox_connection::messages::ToShim;
use crate::store::{Lease, RunCommand, RunStore, RunWrite, StoreError, TokenRecord};
use crate::token::{self, TokenError};
use crate::tools::{codes, ToolHost};

/// Timeouts of a run (SPEC §5), each with its own terminal reason.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunTimeouts {
    /// From creation until the shim connects.
    pub startup: Duration,
    pub tool_call: Duration,
    pub idle: Duration,
    /// Default absolute time to live when a run does not ask for one.
    pub run_ttl: Option<Duration>,
    pub stop_grace: Duration,
    /// How long a shim may stay disconnected.
    pub lost_after: Duration,
    pub heartbeat_interval: Duration,
    pub token_max_lifetime: Duration,
}

impl Default for RunTimeouts {
    fn default() -> Self {
        RunTimeouts {
            startup: Duration::from_secs(60),
            tool_call: Duration::from_secs(60),
            idle: Duration::from_secs(600),
            run_ttl: None,
            stop_grace: Duration::from_secs(10),
            lost_after: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(5),
            token_max_lifetime: Duration::from_secs(86_400),
        }
    }
}

/// Settings shared by every run of a replica.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub timeouts: RunTimeouts,
    /// Base URL sandboxes call back to.
    pub callback_url: String,
    pub cluster_id: String,
    /// Log lines kept as evidence on a failed run.
    /// Lines of each log kept in a failed run's record (see [`DEFAULT_EVIDENCE_LINES`]).
    pub evidence_lines: usize,
    /// How often the provider is asked for the sandbox's resource usage (zero: never).
    pub usage_interval: Duration,
    /// This replica's name: the owner of the runs it drives.
    pub replica_id: String,
}

/// Live run actors of this replica, by run id.
#[derive(Clone, Default)]
pub struct RunRegistry {
    inner: Arc<Mutex<HashMap<RunId, Addr<RunActor>>>>,
    /// One lock per run being adopted, so one replica never starts two actors for a run while
    /// different runs are adopted side by side.
    adopting: Arc<Mutex<HashMap<RunId, Arc<tokio::sync::Mutex<()>>>>>,
}

impl RunRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, Addr<RunActor>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: RunId) -> Option<Addr<RunActor>> {
        self.lock().get(&id).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Waits for, then holds, the right to adopt run `id` on this replica.
    pub(crate) async fn adoption_turn(&self, id: RunId) -> AdoptionTurn {
        let lock = self
            .adopting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone();
        AdoptionTurn {
            guard: Some(lock.lock_owned().await),
            id,
            registry: self.clone(),
        }
    }

    fn insert(&self, id: RunId, addr: Addr<RunActor>) {
        self.lock().insert(id, addr);
    }

    /// Forgets the run's actor if it is still `addr` (not a newer actor of the same run).
    fn remove(&self, id: RunId, addr: &Addr<RunActor>) {
        let mut runs = self.lock();
        if runs.get(&id) == Some(addr) {
            runs.remove(&id);
        }
    }
}

/// A tool call's answer, kept for a shim that reconnects still waiting for it: the message the
/// run actor sent, or the frame the connection sent.
#[derive(Debug, Clone)]
enum KeptAnswer {
    Message(ServerMessage),
    Text(ByteString),
}

impl KeptAnswer {
    fn to_shim(&self) -> ToShim {
        match self {
            KeptAnswer::Message(message) => ToShim::Frame(message.clone()),
            KeptAnswer::Text(text) => ToShim::Text(text.clone()),
        }
    }
}

/// Exports spans a run's shim finished, as children of the run's `traceparent`.
pub type ExportSpans = fn(&str, Vec<ShimSpan>);

/// Makes the root span of a run adopted from another replica, joining the run's trace through
/// its W3C `traceparent`.
pub type AdoptSpan = fn(&RunRecord, &str) -> tracing::Span;

/// A root span for an adopted run that records the trace it belongs to but does not join it
/// (for hosts without an OpenTelemetry layer).
pub fn detached_adopt_span(record: &RunRecord, _traceparent: &str) -> tracing::Span {
    tracing::info_span!(
        parent: None,
        "codebolt.run.adopted",
        run.id = %record.id,
        run.trace_id = %record.trace_id,
    )
}

/// The right to adopt one run; the run's lock is forgotten when the last holder lets go.
pub(crate) struct AdoptionTurn {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    id: RunId,
    registry: RunRegistry,
}

impl Drop for AdoptionTurn {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self
            .registry
            .adopting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Only this map holds the lock now: nobody else waits for it.
        if locks
            .get(&self.id)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.id);
        }
    }
}

/// What a run actor stands on.
#[derive(Clone)]
pub struct RunDeps {
    pub store: Arc<dyn RunStore>,
    pub tools: Arc<dyn ToolHost>,
    pub router: Addr<ProviderRouter>,
    pub registry: RunRegistry,
    pub settings: Arc<RunSettings>,
    pub adopt_span: AdoptSpan,
    /// Where the shim's own spans go; `None` when this host exports no traces, and then shims
    /// are told (in `welcome`) not to record any.
    pub export_spans: Option<ExportSpans>,
    pub metrics: Arc<Metrics>,
}

/// The parts of a run's spec another replica needs to adopt it, kept in the store as
/// `spec:<run id>`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredSpec {
    pub image: Option<String>,
    pub bundle: BundleInfo,
    pub env: BTreeMap<String, String>,
    pub traceparent: String,
}

impl StoredSpec {
    pub fn blob_key(id: RunId) -> String {
        format!("spec:{id}")
    }
}

/// Store key of the sandbox handle of a run (written once the provider created it).
/// Lines of each of its logs (provider, agent) a failed run keeps in its record as evidence.
pub const DEFAULT_EVIDENCE_LINES: usize = 50;

pub fn sandbox_blob_key(id: RunId) -> String {
    format!("sandbox:{id}")
}

/// The concurrency-limit scope of a provider.
pub fn provider_slot(provider: &str) -> String {
    format!("provider:{provider}")
}

/// What a new run needs besides its record.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub record: RunRecord,
    pub image: Option<String>,
    pub bundle: BundleInfo,
    /// Extra environment for the sandbox (agent manifest and request).
    pub env: BTreeMap<String, String>,
    /// W3C trace context handed to the sandbox.
    pub traceparent: String,
    /// The run's root span (`codebolt.run`); every span of the run is its descendant.
    pub span: tracing::Span,
}

/// Writes of one run, carried out in order by the run's writer task.
enum WriteOp {
    Write(Box<RunWrite>),
    /// Acknowledge a shim frame once everything queued before it is stored.
    Ack {
        seq: u64,
        conn: Recipient<ToShim>,
    },
    /// Remove the sandbox (looked up in the store when the actor does not know it), once the
    /// lease is confirmed current.
    Kill(Option<SandboxHandle>, tracing::Span),
    Finish(Box<FinalWrite>),
}

struct FinalWrite {
    record: RunRecord,
    from: RunState,
    billed_seconds: f64,
    done: Recipient<Finished>,
}

/// The writer stored the run's final state; the actor may stop.
#[derive(Message)]
#[rtype(result = "()")]
struct Finished(Box<RunRecord>);

/// Capacity of a run's write queue.
const WRITE_QUEUE: usize = 65_536;

/// What a run's writer needs.
struct Writer {
    id: RunId,
    /// The run's trace, named on every log line about the run.
    trace_id: String,
    lease: Lease,
    provider: String,
    store: Arc<dyn RunStore>,
    router: Addr<ProviderRouter>,
    evidence_lines: usize,
    actor: Recipient<Superseded>,
    /// Numbers the writer's store calls, so a retried one is applied once.
    batches: std::sync::atomic::AtomicU64,
}

/// Writes merged into one store call at most.
const WRITE_BATCH: usize = 512;

/// Carries out a run's writes in order, off the actor, so slow storage never blocks it. Writes
/// that queue up are merged into one store call; acks go out once what precedes them is stored.
/// While the store is unavailable, writes wait and are retried (nothing is dropped); once the
/// lease is lost, the writer stops and tells the actor.
async fn writer(w: Writer, mut rx: tokio::sync::mpsc::Receiver<WriteOp>) {
    let mut pending = RunWrite::default();
    let mut acks: Vec<(u64, Recipient<ToShim>)> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(op) = next.take() {
            match op {
                WriteOp::Write(write) => pending.merge(*write),
                WriteOp::Ack { seq, conn } => acks.push((seq, conn)),
                WriteOp::Kill(handle, span) => {
                    if !w.flush(&mut pending, &mut acks).await {
                        return;
                    }
                    // An empty write confirms the lease before anything is removed.
                    if !w.write_or_step_down(RunWrite::default()).await {
                        return;
                    }
                    w.kill(handle, span).await;
                }
                WriteOp::Finish(last) => {
                    if w.flush(&mut pending, &mut acks).await {
                        w.finish(*last).await;
                    }
                    return;
                }
            }
            if pending.events.len() + pending.agent_logs.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !w.flush(&mut pending, &mut acks).await {
            return;
        }
    }
}

impl Writer {
    /// Stores `write` (retrying while the store is unavailable), then sends the acks. False
    /// once the lease is lost.
    async fn flush(&self, write: &mut RunWrite, acks: &mut Vec<(u64, Recipient<ToShim>)>) -> bool {
        let write = std::mem::take(write);
        if !write.is_empty() && !self.write_or_step_down(write).await {
            return false;
        }
        for (seq, conn) in acks.drain(..) {
            if let Err(err) = conn.try_send(ToShim::Frame(ServerMessage::Ack { seq })) {
                tracing::debug!(run_id = %self.id, trace_id = %self.trace_id, error = %err, "could not queue an ack");
            }
        }
        true
    }

    /// Stores `write`; false (and the actor told) when the lease was lost.
    async fn write_or_step_down(&self, write: RunWrite) -> bool {
        match self.store_write(write).await {
            Ok(()) => true,
            Err(lost) => {
                tracing::warn!(run_id = %self.id, trace_id = %self.trace_id, error = %lost, "run lease lost; this replica stops driving the run");
                if let Err(err) = self.actor.try_send(Superseded { by: None }) {
                    tracing::debug!(run_id = %self.id, trace_id = %self.trace_id, error = %err, "run actor already gone");
                }
                false
            }
        }
    }

    /// One fenced write, retried with backoff while the store is unavailable. `Err` only when
    /// the lease was lost; other failures are logged and the write dropped.
    async fn store_write(&self, mut write: RunWrite) -> Result<(), StoreError> {
        write.batch = self
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut delay = Duration::from_millis(100);
        let mut attempts = 0u32;
        loop {
            match self.store.write_run(&self.lease, write.clone()).await {
                Ok(()) => return Ok(()),
                Err(err @ StoreError::Fenced { .. }) => return Err(err),
                Err(StoreError::Unavailable { message }) => {
                    attempts += 1;
                    if attempts == 1 || attempts.is_multiple_of(20) {
                        tracing::warn!(run_id = %self.id, trace_id = %self.trace_id, error = %message, attempts, "run store unavailable; writes wait");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(err) => {
                    tracing::warn!(run_id = %self.id, trace_id = %self.trace_id, error = %err, "could not store run writes");
                    return Ok(());
                }
            }
        }
    }

    async fn kill(&self, handle: Option<SandboxHandle>, span: tracing::Span) {
        let id = self.id;
        let handle = match handle {
            Some(handle) => Some(handle),
            None => match stored_sandbox(&*self.store, id, &self.trace_id).await {
                Ok(handle) => handle,
                Err(err) => {
                    tracing::warn!(run_id = %id, trace_id = %self.trace_id, error = %err, "could not look up the sandbox");
                    None
                }
            },
        };
        let Some(sandbox) = handle else {
            tracing::info!(run_id = %id, trace_id = %self.trace_id, "no sandbox known to remove");
            return;
        };
        let kill = KillSandbox {
            provider: self.provider.clone(),
            run_id: id,
            sandbox,
        };
        match tracing::Instrument::instrument(self.router.send(kill), span).await {
            Ok(Ok(())) => {
                tracing::info!(run_id = %id, trace_id = %self.trace_id, "sandbox removed")
            }
            Ok(Err(err)) => {
                tracing::warn!(run_id = %id, trace_id = %self.trace_id, error = %err, "could not remove the sandbox")
            }
            Err(err) => {
                tracing::warn!(run_id = %id, trace_id = %self.trace_id, error = %err, "provider router unavailable")
            }
        }
    }

    async fn finish(&self, last: FinalWrite) {
        let id = self.id;
        let store = &*self.store;
        let FinalWrite {
            mut record,
            from,
            billed_seconds,
            done,
        } = last;
        match self
            .router
            .send(ProviderCost(record.provider.clone()))
            .await
        {
            Ok(Some(rates)) => {
                record.cost_estimate = rates.estimate(&record.resources, billed_seconds)
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(run_id = %id, trace_id = %self.trace_id, error = %err, "no cost rates")
            }
        }
        let last = final_write(store, from, &mut record, self.evidence_lines).await;
        if !self.write_or_step_down(last).await {
            return;
        }
        for (what, err) in wind_up(store, &self.lease).await {
            tracing::warn!(run_id = %id, trace_id = %self.trace_id, error = %err, "could not {what}");
        }
        if let Err(err) = done.try_send(Finished(Box::new(record))) {
            tracing::debug!(run_id = %id, trace_id = %self.trace_id, error = %err, "run actor already gone");
        }
    }
}

/// What adopting a run recovered from the store.
pub(crate) struct Adoption {
    pub sandbox: Option<SandboxHandle>,
    pub last_seq: u64,
    /// Tool calls the run's history shows, with their tools (their results, if any, were not
    /// kept).
    pub seen_calls: HashMap<String, String>,
    /// Tool calls whose result the history shows.
    pub recorded_results: HashSet<String>,
    /// Whether the history shows the sandbox's creation (its creator may have been fenced out
    /// before it could store it: a shim that called back elsewhere at once).
    pub sandbox_recorded: bool,
}

/// A tool call being executed.
struct InFlight {
    tool: String,
    started: Instant,
    span: tracing::Span,
}

/// Results kept for re-delivery to a shim that reconnects before it saw them.
const ANSWERED_CAPACITY: usize = 1024;

struct Connection {
    id: u64,
    conn: Recipient<ToShim>,
}

pub struct RunActor {
    id: RunId,
    /// This replica's ownership of the run; the writer's writes carry its fence.
    lease: Lease,
    /// Taken over from another replica (rather than created here).
    adopted: bool,
    /// Stop and kill requests carried out here; handed on if the run moves to another replica
    /// before they took effect.
    applied_commands: Vec<RunCommand>,
    record: RunRecord,
    spec: RunSpec,
    phase: Phase,
    deps: RunDeps,
    limits: Limits,
    timers: HashMap<Timer, SpawnHandle>,
    /// The agent's last sign of life while the idle timer runs: the timer is not re-armed for
    /// each one, it looks at this when it fires (the runtime's clock, which tests can pause).
    last_activity: tokio::time::Instant,
    writes: tokio::sync::mpsc::Sender<WriteOp>,
    sandbox: Option<SandboxHandle>,
    connection: Option<Connection>,
    /// Highest shim sequence number persisted.
    last_seq: u64,
    agent_started: bool,
    /// Tool calls in flight.
    in_flight: HashMap<String, InFlight>,
    /// The latest answers, oldest first (looked up only when a shim reconnects).
    answered: VecDeque<(String, KeptAnswer)>,
    /// Call ids already executed, so a resent call is not executed twice.
    seen_calls: HashMap<String, String>,
    /// Calls the shim already has answers to (from a replica that stopped before recording
    /// them): recorded when their frames arrive, not executed again.
    answered_elsewhere: HashMap<String, AnsweredCall>,
    /// Calls whose result is in the history (or queued for it).
    recorded_results: HashSet<String>,
    /// Whether the run's history has its `sandbox_created` event.
    sandbox_recorded: bool,
    /// Open while the sandbox is up but the shim has not called back yet.
    waiting_span: Option<tracing::Span>,
    /// Open from a stop or kill request until the run ends.
    ending_span: Option<tracing::Span>,
    /// An agent exit by SIGKILL, held until the sandbox's end says whether it was an OOM kill.
    held_exit: Option<Input>,
    /// When the provider was asked for the sandbox, and when the sandbox was up.
    spawn_started: Option<Instant>,
    spawned_at: Option<Instant>,
    /// Shim frames handed to this actor and not yet handled.
    mailbox: QueueCounter,
}

/// How long a SIGKILLed agent's exit waits for the sandbox's end (and its OOM verdict).
const OOM_VERDICT_WAIT: Duration = Duration::from_secs(3);

/// An agent killed by SIGKILL (directly, or seen as exit code 137 through a shell) may have been
/// OOM-killed; only the provider can tell.
fn maybe_oom_killed(code: Option<i32>, signal: Option<i32>) -> bool {
    signal == Some(9) || code == Some(137)
}

impl RunActor {
    /// Starts the actor for a new run this replica claimed, and registers it.
    pub fn launch(spec: RunSpec, lease: Lease, deps: RunDeps) -> Addr<RunActor> {
        Self::start_actor(spec, lease, deps, None)
    }

    /// Starts the actor of a run adopted from another replica, in the state stored for it.
    pub(crate) fn resume(
        spec: RunSpec,
        lease: Lease,
        deps: RunDeps,
        adopted: Adoption,
    ) -> Addr<RunActor> {
        Self::start_actor(spec, lease, deps, Some(adopted))
    }

    fn start_actor(
        spec: RunSpec,
        lease: Lease,
        deps: RunDeps,
        adopted: Option<Adoption>,
    ) -> Addr<RunActor> {
        let id = spec.record.id;
        let registry = deps.registry.clone();
        let ttl = spec
            .record
            .timeout_s
            .map(Duration::from_secs)
            .or(deps.settings.timeouts.run_ttl);
        let limits = Limits {
            has_ttl: ttl.is_some(),
            timeout_grace_s: deps.settings.timeouts.stop_grace.as_secs(),
        };
        if adopted.is_none() {
            deps.metrics.runs_created.add(
                1,
                &[KeyValue::new(attr::PROVIDER, spec.record.provider.clone())],
            );
        }
        let addr = RunActor::create(move |ctx| {
            let (writes, rx) = tokio::sync::mpsc::channel(WRITE_QUEUE);
            deps.metrics.queue(QueueKind::RunWriter).channel(&writes);
            let mailbox = deps.metrics.queue(QueueKind::RunMailbox).counter();
            actix_rt::spawn(writer(
                Writer {
                    id,
                    trace_id: spec.record.trace_id.clone(),
                    lease: lease.clone(),
                    provider: spec.record.provider.clone(),
                    store: deps.store.clone(),
                    router: deps.router.clone(),
                    evidence_lines: deps.settings.evidence_lines,
                    actor: ctx.address().recipient(),
                    batches: std::sync::atomic::AtomicU64::new(0),
                },
                rx,
            ));
            let mut actor = RunActor {
                id,
                lease,
                adopted: adopted.is_some(),
                applied_commands: Vec::new(),
                writes,
                record: spec.record.clone(),
                spec,
                phase: Phase::default(),
                deps,
                limits,
                timers: HashMap::new(),
                last_activity: tokio::time::Instant::now(),
                sandbox: None,
                connection: None,
                last_seq: 0,
                agent_started: false,
                in_flight: HashMap::new(),
                answered: VecDeque::new(),
                seen_calls: HashMap::new(),
                answered_elsewhere: HashMap::new(),
                recorded_results: HashSet::new(),
                sandbox_recorded: false,
                held_exit: None,
                waiting_span: None,
                ending_span: None,
                spawn_started: None,
                spawned_at: None,
                mailbox,
            };
            if let Some(adopted) = adopted {
                actor.take_over(adopted);
            }
            actor
        });
        registry.insert(id, addr.clone());
        addr
    }

    /// Rebuilds the lifecycle from what the store holds about an adopted run.
    fn take_over(&mut self, adopted: Adoption) {
        let record = &self.record;
        let state = record.state;
        self.phase = Phase {
            state,
            ending: (state == RunState::Stopping).then(|| Ending::Stop {
                grace_s: self.deps.settings.timeouts.stop_grace.as_secs(),
            }),
            // Whatever was spawned is removed when the run ends (looked up if not known).
            sandbox: state != RunState::Pending,
            connected: false,
            exit_code: record.exit_code,
            failure: None,
            termination: None,
        };
        self.sandbox = adopted.sandbox;
        self.last_seq = adopted.last_seq;
        self.agent_started = matches!(state, RunState::Running | RunState::Stopping);
        self.seen_calls = adopted.seen_calls;
        self.recorded_results = adopted.recorded_results;
        self.sandbox_recorded = adopted.sandbox_recorded;
    }

    fn timeouts(&self) -> RunTimeouts {
        self.deps.settings.timeouts
    }

    fn timer_duration(&self, timer: Timer) -> Duration {
        let t = self.timeouts();
        // An adopted run's startup and time to live count from its creation, not from now.
        let since_creation = |limit: Duration| {
            if self.adopted {
                let elapsed = (Utc::now() - self.record.created_at)
                    .to_std()
                    .unwrap_or_default();
                limit.saturating_sub(elapsed)
            } else {
                limit
            }
        };
        match timer {
            Timer::Startup => since_creation(t.startup),
            Timer::Idle => t.idle,
            Timer::Ttl => since_creation(
                self.record
                    .timeout_s
                    .map(Duration::from_secs)
                    .or(t.run_ttl)
                    .unwrap_or(Duration::MAX),
            ),
            Timer::Grace => Duration::from_secs(
                self.phase
                    .ending
                    .map_or(t.stop_grace.as_secs(), |e| e.grace_s()),
            ),
            Timer::Reconnect => t.lost_after + t.heartbeat_interval,
        }
    }

    /// Runs one input through the lifecycle and carries out the resulting actions.
    fn apply(&mut self, input: Input, ctx: &mut Context<Self>) {
        let before = self.phase.state;
        let outcome = transition(&self.phase, input, self.limits);
        self.phase = outcome.phase;
        let after = self.phase.state;
        if before != after {
            tracing::info!(run_id = %self.id, trace_id = %self.record.trace_id, from = %before, to = %after, "run state changed");
            self.record.state = after;
            self.record.state_times.insert(after, Utc::now());
            self.record.exit_code = self.phase.exit_code;
            self.record.failure = self.phase.failure.clone();
            self.record.termination = self.phase.termination;
            self.trace_state(after);
            self.count_state(before, -1);
            if after.is_terminal() {
                let mut attributes = vec![
                    KeyValue::new(attr::PROVIDER, self.record.provider.clone()),
                    KeyValue::new(attr::RUN_STATE, after.as_str()),
                ];
                if let Some(failure) = &self.phase.failure {
                    attributes.push(KeyValue::new(attr::ERROR_TYPE, failure.kind.as_str()));
                }
                self.deps.metrics.runs_finished.add(1, &attributes);
            } else {
                self.count_state(after, 1);
            }
        }
        let finishing = outcome.actions.contains(&Action::Finish);
        for action in outcome.actions {
            match action {
                Action::Spawn => self.spawn(ctx),
                Action::Arm(timer) => self.arm(timer, ctx),
                Action::Cancel(timer) => {
                    if let Some(handle) = self.timers.remove(&timer) {
                        ctx.cancel_future(handle);
                    }
                }
                Action::SendStop { grace_s } => self.send(ServerMessage::Stop { grace_s }),
                Action::KillSandbox => self.kill_sandbox(ctx),
                Action::Finish => {}
            }
        }
        if finishing {
            self.finish(before, ctx);
        } else if before != after {
            let event = EventKind::StateChanged {
                from: before,
                to: after,
                failure: None,
            };
            self.persist(vec![event], ctx);
        }
    }

    /// Counts the run in (or out of) the replica's active runs by state; terminal states are not
    /// active.
    fn count_state(&self, state: RunState, delta: i64) {
        if !state.is_terminal() {
            self.deps.metrics.runs_active.add(
                delta,
                &[
                    KeyValue::new(attr::PROVIDER, self.record.provider.clone()),
                    KeyValue::new(attr::RUN_STATE, state.as_str()),
                ],
            );
        }
    }

    /// Opens and closes the spans that follow the lifecycle.
    fn trace_state(&mut self, state: RunState) {
        let root = &self.spec.span;
        match state {
            RunState::Starting => {
                self.waiting_span =
                    Some(tracing::info_span!(parent: root, "sandbox.wait_callback"));
            }
            RunState::Running => self.waiting_span = None,
            s if s.is_terminal() => {
                // Recorded once: a span attribute recorded again is added, not replaced.
                root.record("run.state", s.as_str());
                self.waiting_span = None;
                self.ending_span = None;
                if let Some(failure) = &self.phase.failure {
                    root.record("run.failure", failure.kind.as_str());
                    root.record("otel.status_code", "ERROR");
                }
            }
            _ => {}
        }
    }

    fn arm(&mut self, timer: Timer, ctx: &mut Context<Self>) {
        if timer == Timer::Idle {
            self.last_activity = tokio::time::Instant::now();
        }
        self.arm_for(timer, self.timer_duration(timer), ctx);
    }

    fn arm_for(&mut self, timer: Timer, duration: Duration, ctx: &mut Context<Self>) {
        if let Some(old) = self.timers.remove(&timer) {
            ctx.cancel_future(old);
        }
        let handle = ctx.run_later(duration, move |act, ctx| act.timer_fired(timer, ctx));
        self.timers.insert(timer, handle);
    }

    fn timer_fired(&mut self, timer: Timer, ctx: &mut Context<Self>) {
        self.timers.remove(&timer);
        if timer == Timer::Idle {
            // Activity since it was armed: the run has been idle only since then.
            let idle = self.timer_duration(Timer::Idle);
            let quiet = self.last_activity.elapsed();
            if quiet < idle {
                return self.arm_for(Timer::Idle, idle - quiet, ctx);
            }
        }
        tracing::info!(run_id = %self.id, trace_id = %self.record.trace_id, ?timer, "run timer fired");
        self.apply(Input::TimerFired(timer), ctx);
    }

    /// Queues a write; the run's writer carries writes out in order.
    fn write(&self, op: WriteOp) {
        if let Err(err) = self.writes.try_send(op) {
            tracing::error!(run_id = %self.id, trace_id = %self.record.trace_id, error = %err, "run write queue full or closed");
            // Unacknowledged frames are resent after a reconnect, so dropping the connection
            // loses nothing.
            if let Some(conn) = &self.connection {
                if let Err(err) = conn.conn.try_send(ToShim::Close {
                    code: 1013,
                    reason: "control plane overloaded; reconnect".into(),
                }) {
                    tracing::debug!(run_id = %self.id, trace_id = %self.record.trace_id, error = %err, "connection already gone");
                }
            }
        }
    }

    fn persist(&mut self, events: Vec<EventKind>, _: &mut Context<Self>) {
        self.write(WriteOp::Write(Box::new(RunWrite {
            events,
            record: Some(self.record.clone()),
            ..RunWrite::default()
        })));
    }

    fn record_events(&mut self, events: Vec<EventKind>, _: &mut Context<Self>) {
        self.write(WriteOp::Write(Box::new(RunWrite {
            events,
            ..RunWrite::default()
        })));
    }

    fn send(&self, message: ServerMessage) {
        self.deliver(ToShim::Frame(message));
    }

    fn deliver(&self, frame: ToShim) {
        if let Some(conn) = &self.connection {
            if let Err(err) = conn.conn.try_send(frame) {
                // Nothing may be dropped silently: the shim reconnects and asks again for the
                // results it still waits for.
                tracing::warn!(run_id = %self.id, trace_id = %self.record.trace_id, error = %err, "could not queue a frame for the shim; closing its connection");
                conn.conn.do_send(ToShim::Close {
                    code: 1013,
                    reason: "control plane overloaded; reconnect".into(),
                });
            }
        }
    }

    fn spawn(&mut self, ctx: &mut Context<Self>) {
        self.spawn_started = Some(Instant::now());
        let settings = self.deps.settings.clone();
        let minted = token::mint();
        let mut env = self.spec.env.clone();
        use agent_shim::protocol::env as vars;
        env.insert(vars::RUN_ID.into(), self.id.to_string());
        env.insert(vars::CALLBACK_URL.into(), settings.callback_url.clone());
        env.insert(vars::RUN_TOKEN.into(), minted.secret.clone());
        env.insert(vars::TRACEPARENT.into(), self.spec.traceparent.clone());
        env.insert(
            vars::LOST_AFTER_S.into(),
            settings.timeouts.lost_after.as_secs().max(1).to_string(),
        );
        let span = tracing::info_span!(
            parent: &self.spec.span,
            "sandbox.create",
            provider = %self.record.provider,
            otel.status_code = tracing::field::Empty,
        );
        let request = SpawnRequest {
            run_id: self.id,
            agent: self.record.agent.clone(),
            image: self.spec.image.clone(),
            resources: self.record.resources.clone(),
            env,
            labels: BTreeMap::from([
                (labels::RUN_ID.to_string(), self.id.to_string()),
                (labels::AGENT.to_string(), self.record.agent.clone()),
                (labels::CLUSTER.to_string(), settings.cluster_id.clone()),
            ]),
            progress: Some(self.progress_sink()),
            span: span.clone(),
        };
        let token_record = TokenRecord {
            run_id: self.id,
            expires_at: Utc::now()
                + chrono::Duration::from_std(settings.timeouts.token_max_lifetime)
                    .unwrap_or(chrono::Duration::days(1)),
            revoked: false,
        };
        let store = self.deps.store.clone();
        let router = self.deps.router.clone();
        let provider = self.record.provider.clone();
        let addr = ctx.address();
        let run_id = self.id;
        // Detached from the actor: a sandbox that comes up after the run ended is still removed.
        actix_rt::spawn(tracing::Instrument::instrument(
            async move {
                let res = async {
                    store
                        .put_token(&minted.hash, &token_record)
                        .await
                        .map_err(|err| ProviderError::SpawnFailed {
                            message: format!("could not store the run token: {err}"),
                        })?;
                    router
                        .send(SpawnSandbox {
                            provider: provider.clone(),
                            request,
                        })
                        .await
                        .map_err(|err| ProviderError::Operation {
                            operation: "spawn",
                            message: format!("provider router unavailable: {err}"),
                        })?
                }
                .await;
                match &res {
                    Ok(handle) => match serde_json::to_vec(handle) {
                        // Another replica adopting the run finds its sandbox here.
                        Ok(json) => {
                            if let Err(err) = store.put_blob(&sandbox_blob_key(run_id), &json).await
                            {
                                tracing::warn!(run_id = %run_id, error = %err, "could not store the sandbox handle");
                            }
                        }
                        Err(err) => {
                            tracing::warn!(run_id = %run_id, error = %err, "could not encode the sandbox handle")
                        }
                    },
                    Err(_) => {
                        tracing::Span::current().record("otel.status_code", "ERROR");
                    }
                }
                if let Err(err) = addr.send(SpawnDone(res.clone())).await {
                    tracing::debug!(run_id = %run_id, error = %err, "run actor gone before its sandbox came up");
                    if let Ok(sandbox) = res {
                        // Gone because the run ended: remove the sandbox. Gone because the run
                        // moved to another replica (its shim may be connected there already):
                        // the sandbox is the run's, found by its new owner through the handle
                        // stored above.
                        match store.get_run(run_id).await {
                            Ok(Some(record)) if !record.state.is_terminal() => {
                                tracing::info!(run_id = %run_id, sandbox = %sandbox.id, owner = %record.owner, "the run moved to another replica while its sandbox came up; the sandbox stays with the run");
                            }
                            Ok(_) => remove_late_sandbox(router, provider, run_id, sandbox).await,
                            Err(err) => {
                                tracing::warn!(run_id = %run_id, sandbox = %sandbox.id, error = %err, "could not tell whether the run ended; its sandbox is left to the reconciler");
                            }
                        }
                    }
                }
            },
            span,
        ));
    }

    /// A channel whose spawn progress becomes run events.
    fn progress_sink(&self) -> tokio::sync::mpsc::Sender<SpawnProgress> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<SpawnProgress>(256);
        let writes = self.writes.clone();
        actix_rt::spawn(async move {
            while let Some(progress) = rx.recv().await {
                let event = match progress {
                    SpawnProgress::ImagePull {
                        image,
                        status,
                        current_bytes,
                        total_bytes,
                    } => EventKind::ImagePull {
                        image,
                        status,
                        current_bytes,
                        total_bytes,
                    },
                };
                let write = RunWrite {
                    events: vec![event],
                    ..RunWrite::default()
                };
                if writes.send(WriteOp::Write(Box::new(write))).await.is_err() {
                    return;
                }
            }
        });
        tx
    }

    /// Reads the provider's view of resource usage now and then while the run is live. The
    /// first reading comes after a random part of the interval, so that the polls of runs
    /// started together do not fall due together.
    fn poll_usage(&mut self, ctx: &mut Context<Self>) {
        let interval = self.deps.settings.usage_interval;
        if interval.is_zero() {
            return;
        }
        ctx.run_later(first_poll_after(interval), move |act, ctx| {
            act.read_usage(ctx);
            ctx.run_interval(interval, |act, ctx| act.read_usage(ctx));
        });
    }

    fn read_usage(&mut self, ctx: &mut Context<Self>) {
        let Some(sandbox) = self.sandbox.clone() else {
            return;
        };
        if self.phase.state.is_terminal() {
            return;
        }
        let read = self.deps.router.send(SandboxUsage {
            provider: self.record.provider.clone(),
            sandbox,
        });
        ctx.spawn(read.into_actor(self).map(|res, act, _| match res {
            Ok(Ok(Some(usage))) => {
                let write = act.record_usage(usage.cpu_pct, usage.memory_bytes);
                act.write(WriteOp::Write(Box::new(write)));
            }
            Ok(Ok(None)) => {}
            Ok(Err(err)) => {
                tracing::debug!(run_id = %act.id, trace_id = %act.record.trace_id, error = %err, "usage unavailable")
            }
            Err(err) => tracing::debug!(run_id = %act.id, trace_id = %act.record.trace_id, error = %err, "router unavailable"),
        }));
    }

    /// Takes a usage reading into the record; returns the writes it needs.
    fn record_usage(&mut self, cpu_pct: Option<f64>, memory_bytes: Option<u64>) -> RunWrite {
        let peak = self
            .record
            .usage
            .peak_memory_bytes
            .max(memory_bytes)
            .or(memory_bytes);
        self.record.usage = Usage {
            cpu_pct,
            memory_bytes,
            peak_memory_bytes: peak,
            reported_at: Some(Utc::now()),
        };
        RunWrite {
            events: vec![EventKind::Usage {
                cpu_pct,
                memory_bytes,
            }],
            record: Some(self.record.clone()),
            ..RunWrite::default()
        }
    }

    fn spawned(&mut self, res: Result<SandboxHandle, ProviderError>, ctx: &mut Context<Self>) {
        if let Some(started) = self.spawn_started.take() {
            let mut attributes = vec![KeyValue::new(attr::PROVIDER, self.record.provider.clone())];
            if let Err(err) = &res {
                attributes.push(KeyValue::new(attr::ERROR_TYPE, err.kind()));
            }
            Metrics::record(
                &self.deps.metrics.spawn_duration,
                started.elapsed(),
                &attributes,
            );
        }
        match res {
            Ok(handle) if self.phase.state.is_terminal() => {
                // Killed or stopped while provisioning, and the final write is queued: remove
                // the sandbox directly.
                actix_rt::spawn(remove_late_sandbox(
                    self.deps.router.clone(),
                    self.record.provider.clone(),
                    self.id,
                    handle,
                ));
            }
            Ok(handle) => {
                tracing::info!(run_id = %self.id, trace_id = %self.record.trace_id, sandbox = %handle.id, host = %handle.remote_host, "sandbox created");
                self.spawned_at = Some(Instant::now());
                self.record.sandbox_id = Some(handle.id.clone());
                self.record.remote_host = Some(handle.remote_host.clone());
                self.sandbox = Some(handle.clone());
                let terminal = self.phase.state.is_terminal();
                self.sandbox_recorded = true;
                self.record_events(
                    vec![EventKind::SandboxCreated {
                        sandbox_id: handle.id.clone(),
                        remote_host: handle.remote_host.clone(),
                    }],
                    ctx,
                );
                if !terminal {
                    self.watch_sandbox(handle, ctx);
                    self.poll_usage(ctx);
                }
                self.apply(Input::Spawned, ctx);
            }
            Err(err) => {
                tracing::warn!(run_id = %self.id, trace_id = %self.record.trace_id, error = %err, "spawn failed");
                let kind = match err {
                    ProviderError::ImagePull { .. } => FailureKind::ImagePullFailed,
                    _ => FailureKind::ProviderError,
                };
                self.apply(Input::SpawnFailed(Failure::new(kind, err.to_string())), ctx);
            }
        }
    }

    /// Follows the sandbox's exit and copies its output into the run's provider log.
    fn watch_sandbox(&mut self, handle: SandboxHandle, ctx: &mut Context<Self>) {
        let router = self.deps.router.clone();
        let provider = self.record.provider.clone();
        let wait = router.send(WaitSandbox {
            provider: provider.clone(),
            sandbox: handle.clone(),
        });
        ctx.spawn(wait.into_actor(self).map(|res, act, ctx| match res {
            Ok(Ok(exit)) => {
                tracing::info!(run_id = %act.id, trace_id = %act.record.trace_id, code = ?exit.code, oom = exit.oom_killed, "sandbox ended");
                act.sandbox_ended(exit.code, exit.oom_killed, ctx);
            }
            Ok(Err(err)) => {
                tracing::warn!(run_id = %act.id, trace_id = %act.record.trace_id, error = %err, "could not watch the sandbox");
            }
            Err(err) => {
                tracing::warn!(run_id = %act.id, trace_id = %act.record.trace_id, error = %err, "provider router unavailable");
            }
        }));
        if self.adopted {
            // The replica that spawned the sandbox stored its output so far; following it again
            // from the start would repeat it.
            return;
        }
        let store = self.deps.store.clone();
        let id = self.id;
        let trace_id = self.record.trace_id.clone();
        actix_rt::spawn(async move {
            let logs = router
                .send(SandboxLogs {
                    provider,
                    sandbox: handle,
                    follow: true,
                })
                .await;
            // Fused: the batching below may see the end first.
            let mut stream = match logs {
                Ok(Ok(stream)) => stream.fuse(),
                Ok(Err(err)) => {
                    tracing::warn!(run_id = %id, trace_id = %trace_id, error = %err, "provider logs unavailable");
                    return;
                }
                Err(err) => {
                    tracing::warn!(run_id = %id, trace_id = %trace_id, error = %err, "provider router unavailable");
                    return;
                }
            };
            // Batch what is ready, so a chatty sandbox costs few store writes.
            while let Some(first) = stream.next().await {
                let mut batch = Vec::new();
                let mut next = Some(first);
                while let Some(item) = next.take() {
                    match item {
                        Ok(line) => batch.push((line.stream, line.line)),
                        Err(err) => {
                            tracing::warn!(run_id = %id, trace_id = %trace_id, error = %err, "provider log read failed")
                        }
                    }
                    if batch.len() < 256 {
                        next = stream.next().now_or_never().flatten();
                    }
                }
                if let Err(err) = store.append_logs(id, LogSource::Provider, batch).await {
                    tracing::warn!(run_id = %id, trace_id = %trace_id, error = %err, "could not store provider logs");
                    return;
                }
            }
        });
    }

    /// An adopted run follows its sandbox as the replica that spawned it did: its end (exit
    /// code, OOM kill) and its resource usage. Its output so far was stored by that replica.
    /// The history gets the sandbox's creation if its creator could not store it.
    fn follow_adopted_sandbox(&mut self, handle: SandboxHandle, ctx: &mut Context<Self>) {
        if !self.sandbox_recorded {
            self.sandbox_recorded = true;
            tracing::info!(run_id = %self.id, trace_id = %self.record.trace_id, sandbox = %handle.id, "recording the adopted run's sandbox, which its creator did not");
            self.record_events(
                vec![EventKind::SandboxCreated {
                    sandbox_id: handle.id.clone(),
                    remote_host: handle.remote_host.clone(),
                }],
                ctx,
            );
        }
        if self.phase.state.is_terminal() {
            return;
        }
        self.watch_sandbox(handle, ctx);
        self.poll_usage(ctx);
    }

    fn sandbox_ended(&mut self, code: Option<i32>, oom_killed: bool, ctx: &mut Context<Self>) {
        // The provider may report the end a moment before the shim's last frames are handled;
        // give in-flight frames a short while to land before classifying.
        if self.phase.state.is_terminal() {
            return;
        }
        if let Some(held) = self.held_exit.take() {
            let input = if oom_killed {
                Input::SandboxExited { code, oom_killed }
            } else {
                held
            };
            self.apply(input, ctx);
            return;
        }
        ctx.run_later(Duration::from_millis(200), move |act, ctx| {
            act.apply(Input::SandboxExited { code, oom_killed }, ctx);
        });
    }

    /// An adopted run whose sandbox no store entry named yet: its shim called back here before
    /// the replica that spawned it had stored the sandbox's handle. Looks for the handle again
    /// (`tries` more times, [`SANDBOX_LOOKUP_EVERY`] apart) and names it in the record once found.
    fn look_for_sandbox(&mut self, tries: u32, ctx: &mut Context<Self>) {
        if self.sandbox.is_some() || self.phase.state.is_terminal() {
            return;
        }
        if tries == 0 {
            tracing::warn!(run_id = %self.id, trace_id = %self.record.trace_id, "the adopted run's sandbox handle was never stored; it stays unnamed in the record");
            return;
        }
        let store = self.deps.store.clone();
        let id = self.id;
        let trace_id = self.record.trace_id.clone();
        ctx.spawn(
            async move { stored_sandbox(&*store, id, &trace_id).await }
                .into_actor(self)
                .map(move |res, act, ctx| {
                    let found = match res {
                        Ok(handle) => handle,
                        Err(err) => {
                            tracing::debug!(run_id = %act.id, trace_id = %act.record.trace_id, error = %err, "could not look up the sandbox handle");
                            None
                        }
                    };
                    match found {
                        Some(handle) if act.sandbox.is_none() && !act.phase.state.is_terminal() => {
                            tracing::info!(run_id = %act.id, trace_id = %act.record.trace_id, sandbox = %handle.id, "adopted run's sandbox found");
                            act.record.sandbox_id = Some(handle.id.clone());
                            act.record.remote_host = Some(handle.remote_host.clone());
                            act.sandbox = Some(handle.clone());
                            act.persist(Vec::new(), ctx);
                            act.follow_adopted_sandbox(handle, ctx);
                        }
                        Some(_) => {}
                        None => {
                            ctx.run_later(SANDBOX_LOOKUP_EVERY, move |act, ctx| {
                                act.look_for_sandbox(tries - 1, ctx)
                            });
                        }
                    }
                }),
        );
    }

    fn kill_sandbox(&mut self, _: &mut Context<Self>) {
        let handle = self.sandbox.take();
        if handle.is_none() && !self.adopted {
            return;
        }
        // Queued before the final write, so a terminal run has no sandbox left.
        let span = tracing::info_span!(parent: &self.spec.span, "sandbox.cleanup");
        self.write(WriteOp::Kill(handle, span));
    }

    /// The run reached a terminal state.
    fn finish(&mut self, from: RunState, ctx: &mut Context<Self>) {
        let id = self.id;
        let trace_id = self.record.trace_id.clone();
        let to = self.phase.state;
        for (call_id, call) in self.in_flight.drain() {
            call.span.record("outcome", "abandoned");
            tracing::debug!(run_id = %id, trace_id = %trace_id, call_id, tool = %call.tool, "tool call abandoned at run end");
        }
        // The connection stays open until the end is stored: the shim gets its acks first, so it
        // has nothing left to resend (to another replica) once it is closed.
        tracing::debug!(run_id = %id, trace_id = %trace_id, state = %to, "run ended; storing its end");
        let started = self
            .record
            .state_times
            .get(&RunState::Starting)
            .copied()
            .unwrap_or(self.record.created_at);
        self.write(WriteOp::Finish(Box::new(FinalWrite {
            record: self.record.clone(),
            from,
            billed_seconds: (Utc::now() - started).num_milliseconds().max(0) as f64 / 1000.0,
            done: ctx.address().recipient(),
        })));
    }

    fn refuse_if_ended(&self) -> Result<(), TokenError> {
        if self.phase.state.is_terminal() {
            Err(TokenError::RunEnded { run_id: self.id })
        } else {
            Ok(())
        }
    }

    /// The agent did something: the idle timer counts from now.
    fn agent_activity(&mut self) {
        if self.phase.state == RunState::Running && self.timers.contains_key(&Timer::Idle) {
            self.last_activity = tokio::time::Instant::now();
        }
    }

    /// `answered`: the connection answered this tool call already.
    fn handle_sequenced(
        &mut self,
        message: ShimMessage,
        answered: Option<Box<AnsweredHere>>,
        ctx: &mut Context<Self>,
    ) {
        let Some(seq) = message.seq() else {
            return;
        };
        if seq <= self.last_seq {
            // Already persisted: a resend after a reconnect. Ack again, do nothing else.
            self.send(ServerMessage::Ack { seq: self.last_seq });
            return;
        }
        if seq != self.last_seq + 1 {
            tracing::warn!(run_id = %self.id, trace_id = %self.record.trace_id, seq, expected = self.last_seq + 1, "sequence gap; asking the shim to resume");
            if let Some(conn) = &self.connection {
                if let Err(err) = conn.conn.try_send(ToShim::Close {
                    code: 4000,
                    reason: format!(
                        "sequence gap: expected {}, got {seq}; reconnect and resume",
                        self.last_seq + 1
                    ),
                }) {
                    tracing::debug!(run_id = %self.id, trace_id = %self.record.trace_id, error = %err, "connection already gone");
                }
            }
            return;
        }
        self.last_seq = seq;
        let mut events = Vec::new();
        let mut write = RunWrite {
            seq: Some(seq),
            ..RunWrite::default()
        };
        let mut input = None;
        match message {
            ShimMessage::AgentEvent { payload, .. } => {
                self.agent_activity();
                events.push(match payload {
                    AgentEventPayload::AgentStarted { pid } => EventKind::AgentStarted { pid },
                    AgentEventPayload::Message { text } => EventKind::AgentMessage { text },
                    AgentEventPayload::Done { result } => {
                        self.record.result = Some(result.clone());
                        write.record = Some(self.record.clone());
                        EventKind::AgentDone { result }
                    }
                    AgentEventPayload::StopForwarded { grace_s } => {
                        EventKind::StopForwarded { grace_s }
                    }
                });
            }
            ShimMessage::ToolCall {
                call_id,
                tool,
                args,
                ..
            } => {
                self.agent_activity();
                events.push(EventKind::ToolCall {
                    call_id: call_id.clone(),
                    tool: tool.clone(),
                });
                match self.answered_elsewhere.remove(&call_id) {
                    // Executed and answered by the replica that drove the run before; its
                    // record was lost with it. The agent has its answer: record, do not repeat.
                    Some(answered) => {
                        tracing::info!(run_id = %self.id, trace_id = %self.record.trace_id, call_id, tool, "tool call answered before this replica took over; recorded, not executed again");
                        self.seen_calls.insert(call_id.clone(), tool.clone());
                        self.recorded_results.insert(call_id.clone());
                        events.push(EventKind::ToolResult {
                            call_id,
                            tool,
                            ok: answered.ok,
                            duration_ms: 0,
                            error_code: answered.error_code,
                        });
                    }
                    None => match answered {
                        Some(answered) => {
                            events.extend(self.record_answered(call_id, tool, *answered))
                        }
                        None if self.seen_calls.contains_key(&call_id) => {
                            events.push(self.refuse_reused_id(call_id, tool, &args));
                        }
                        None => self.start_tool_call(call_id, tool, args, ctx),
                    },
                }
            }
            ShimMessage::Log { stream, line, .. } => {
                self.agent_activity();
                let stream = match stream {
                    ShimLogStream::Stdout => "stdout",
                    ShimLogStream::Stderr => "stderr",
                    ShimLogStream::Shim => "shim",
                };
                write.agent_logs.push((stream.to_string(), line));
            }
            ShimMessage::Usage { usage, .. } => {
                write.merge(self.record_usage(usage.cpu_pct, usage.memory_bytes));
            }
            ShimMessage::Exited { code, signal, .. } => {
                events.push(EventKind::AgentExited { code, signal });
                let exited = Input::AgentExited { code, signal };
                if maybe_oom_killed(code, signal)
                    && self.sandbox.is_some()
                    && self.phase.state == RunState::Running
                {
                    // Classified when the sandbox ends (OOM: resource_exhausted) or soon after.
                    self.held_exit = Some(exited);
                    ctx.run_later(OOM_VERDICT_WAIT, |act, ctx| {
                        if let Some(held) = act.held_exit.take() {
                            act.apply(held, ctx);
                        }
                    });
                } else {
                    input = Some(exited);
                }
            }
            ShimMessage::Hello { .. }
            | ShimMessage::Heartbeat { .. }
            | ShimMessage::Spans { .. } => {}
        }
        // The frame's writes carry its sequence number, so an adopting replica resumes after it.
        events.append(&mut write.events);
        write.events = events;
        self.write(WriteOp::Write(Box::new(write)));
        // The ack goes out once what came before it is stored (the writer keeps order).
        if let Some(conn) = &self.connection {
            self.write(WriteOp::Ack {
                seq,
                conn: conn.conn.clone(),
            });
        }
        if let Some(input) = input {
            self.apply(input, ctx);
        }
    }

    /// A new tool call whose id an earlier call of the run used: not executed; the agent gets an
    /// error answer naming the id, and the run goes on.
    fn refuse_reused_id(&mut self, call_id: String, tool: String, args: &Value) -> EventKind {
        let first = self.seen_calls.get(&call_id).cloned().unwrap_or_default();
        tracing::warn!(run_id = %self.id, trace_id = %self.record.trace_id, call_id, tool, first_tool = first, "tool call id used again; refused");
        let span = tool_call_span(&self.spec.span, &tool, &call_id, args);
        let message = ServerMessage::ToolResult {
            call_id: call_id.clone(),
            ok: false,
            result: None,
            error: Some(ToolError {
                code: codes::DUPLICATE_CALL_ID.to_string(),
                message: format!(
                    "tool call id '{call_id}' was already used in this run (by a call of '{first}'); \
                     give every call an id of its own"
                ),
            }),
        };
        self.send(message.clone());
        self.settle(
            call_id,
            tool,
            Duration::ZERO,
            span,
            KeptAnswer::Message(message),
            None,
            Some(codes::DUPLICATE_CALL_ID),
        )
    }

    fn start_tool_call(
        &mut self,
        call_id: String,
        tool: String,
        args: Value,
        ctx: &mut Context<Self>,
    ) {
        self.seen_calls.insert(call_id.clone(), tool.clone());
        let span = tool_call_span(&self.spec.span, &tool, &call_id, &args);
        self.in_flight.insert(
            call_id.clone(),
            InFlight {
                tool: tool.clone(),
                started: Instant::now(),
                span,
            },
        );
        let tools = self.deps.tools.clone();
        let limit = self.timeouts().tool_call;
        let id = self.id;
        let tool_name = tool.clone();
        ctx.spawn(
            async move {
                match tokio::time::timeout(limit, tools.call(id, &tool_name, args)).await {
                    Ok(res) => res,
                    Err(_) => Err(crate::tools::ToolFailure::new(
                        codes::TIMEOUT,
                        format!(
                            "tool '{tool_name}' did not finish within {} s",
                            limit.as_secs_f64()
                        ),
                    )),
                }
            }
            .into_actor(self)
            .map(move |res, act, ctx| act.tool_done(call_id, res, ctx)),
        );
    }

    fn tool_done(
        &mut self,
        call_id: String,
        res: Result<Value, crate::tools::ToolFailure>,
        ctx: &mut Context<Self>,
    ) {
        let Some(InFlight {
            tool,
            started,
            span,
        }) = self.in_flight.remove(&call_id)
        else {
            return;
        };
        let took = started.elapsed();
        let (message, failure_code) = match res {
            Ok(result) => (
                ServerMessage::ToolResult {
                    call_id: call_id.clone(),
                    ok: true,
                    result: Some(result),
                    error: None,
                },
                None,
            ),
            Err(failure) => (
                ServerMessage::ToolResult {
                    call_id: call_id.clone(),
                    ok: false,
                    result: None,
                    error: Some(ToolError {
                        code: failure.code.to_string(),
                        message: failure.message,
                    }),
                },
                Some(failure.code),
            ),
        };
        // The agent waits for this answer; what is only bookkeeping (span, metric, event, the
        // copy kept for a resend) comes after it has left.
        self.send(message.clone());
        let result_bytes = match &message {
            // Encoded again only to be counted: worth it only when the span is recorded.
            ServerMessage::ToolResult {
                result: Some(value),
                ..
            } if !span.is_disabled() => Some(encoded_len(value)),
            _ => None,
        };
        let result = self.settle(
            call_id,
            tool,
            took,
            span,
            KeptAnswer::Message(message),
            result_bytes,
            failure_code,
        );
        self.record_events(vec![result], ctx);
    }

    /// Records a call the connection answered on receipt (`ToolHost::call_now`); returns its
    /// result event, stored with the call's.
    fn record_answered(
        &mut self,
        call_id: String,
        tool: String,
        answered: AnsweredHere,
    ) -> Option<EventKind> {
        if self
            .seen_calls
            .insert(call_id.clone(), tool.clone())
            .is_some()
        {
            tracing::warn!(run_id = %self.id, trace_id = %self.record.trace_id, call_id, "duplicate tool call id; the connection answered it again, not recorded again");
            return None;
        }
        let AnsweredHere {
            frame,
            result_bytes,
            took,
            span,
        } = answered;
        Some(self.settle(
            call_id,
            tool,
            took,
            span,
            KeptAnswer::Text(frame),
            Some(result_bytes),
            None,
        ))
    }

    /// A call's bookkeeping once its answer has left: span, metric, the answer kept for a
    /// resend and the idle timer; returns the result event to store. `result_bytes`: the size
    /// of the result's JSON text, if known.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        call_id: String,
        tool: String,
        took: Duration,
        span: tracing::Span,
        answer: KeptAnswer,
        result_bytes: Option<usize>,
        failure_code: Option<&'static str>,
    ) -> EventKind {
        let mut attributes = vec![KeyValue::new(attr::TOOL_NAME, tool.clone())];
        if let Some(code) = failure_code {
            attributes.push(KeyValue::new(attr::ERROR_TYPE, code));
        }
        // A span nobody records (no subscriber) would still turn every field into a log record.
        if !span.is_disabled() {
            match failure_code {
                None => {
                    span.record("outcome", "ok");
                    if let Some(bytes) = result_bytes {
                        span.record("tool.result_bytes", bytes);
                    }
                }
                Some(code) => {
                    span.record("outcome", code);
                    span.record("otel.status_code", "ERROR");
                }
            }
        }
        drop(span);
        Metrics::record(&self.deps.metrics.tool_call_duration, took, &attributes);
        let duration_ms = took.as_millis() as u64;
        let ok = failure_code.is_none();
        tracing::debug!(run_id = %self.id, trace_id = %self.record.trace_id, call_id, tool, ok, duration_ms, "tool call finished");
        self.remember_answer(call_id.clone(), answer);
        self.agent_activity();
        self.recorded_results.insert(call_id.clone());
        EventKind::ToolResult {
            call_id,
            tool,
            ok,
            duration_ms,
            error_code: failure_code.map(str::to_string),
        }
    }

    fn remember_answer(&mut self, call_id: String, answer: KeptAnswer) {
        if self.answered.len() >= ANSWERED_CAPACITY {
            self.answered.pop_front();
        }
        self.answered.push_back((call_id, answer));
    }

    /// The latest answer kept for a call.
    fn kept_answer(&self, call_id: &str) -> Option<&KeptAnswer> {
        self.answered
            .iter()
            .rev()
            .find_map(|(id, answer)| (id == call_id).then_some(answer))
    }
}

/// The `tool.call` span of one call, child of the run's span; outcome and result size are
/// recorded when it is answered.
pub(crate) fn tool_call_span(
    parent: &tracing::Span,
    tool: &str,
    call_id: &str,
    args: &Value,
) -> tracing::Span {
    tracing::info_span!(
        parent: parent,
        "tool.call",
        tool.name = %tool,
        tool.call_id = %call_id,
        tool.args_bytes = encoded_len(args),
        tool.result_bytes = tracing::field::Empty,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// When a run's first usage reading is due: somewhere within the first `interval`.
fn first_poll_after(interval: Duration) -> Duration {
    use rand::Rng;
    interval.mul_f64(rand::thread_rng().gen_range(0.0..1.0))
}

/// Bytes of `value` as JSON, counted without building the text.
fn encoded_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        // Cannot happen: the sink never fails and a `Value`'s keys are strings.
        Err(err) => {
            tracing::debug!(error = %err, "could not count a JSON value's bytes");
            0
        }
    }
}

/// Removes a sandbox that came up after its run ended.
async fn remove_late_sandbox(
    router: Addr<ProviderRouter>,
    provider: String,
    run_id: RunId,
    sandbox: SandboxHandle,
) {
    let kill = KillSandbox {
        provider,
        run_id,
        sandbox,
    };
    match router.send(kill).await {
        Ok(Ok(())) => tracing::info!(run_id = %run_id, "late sandbox removed"),
        Ok(Err(err)) => {
            tracing::warn!(run_id = %run_id, error = %err, "could not remove a late sandbox")
        }
        Err(err) => tracing::warn!(run_id = %run_id, error = %err, "provider router unavailable"),
    }
}

/// The provider's answer to the spawn call.
#[derive(Message)]
#[rtype(result = "()")]
struct SpawnDone(Result<SandboxHandle, ProviderError>);

impl Handler<SpawnDone> for RunActor {
    type Result = ();
    fn handle(&mut self, msg: SpawnDone, ctx: &mut Context<Self>) {
        self.spawned(msg.0, ctx);
    }
}

/// The last write of a run that ended in `record`'s state, coming from `from`: the record (with
/// the last `evidence_lines` of its logs when it failed) and the state change. The sandbox is gone
/// (its removal comes first): the run's slot under its provider's concurrency limit is given back
/// with it, and only by the run's owner.
pub(crate) async fn final_write(
    store: &dyn RunStore,
    from: RunState,
    record: &mut RunRecord,
    evidence_lines: usize,
) -> RunWrite {
    if record.failure.is_some() {
        record.evidence = Some(Evidence {
            provider_logs: tail(store, record.id, LogSource::Provider, evidence_lines).await,
            agent_logs: tail(store, record.id, LogSource::Agent, evidence_lines).await,
        });
    }
    RunWrite {
        events: vec![EventKind::StateChanged {
            from,
            to: record.state,
            failure: record.failure.clone(),
        }],
        record: Some(record.clone()),
        release_slot: Some(provider_slot(&record.provider)),
        ..RunWrite::default()
    }
}

/// After a run's final write: its tokens revoked, its logs closed, its lease released. Every
/// step is tried; what failed is returned, named (`could not …`).
pub(crate) async fn wind_up(
    store: &dyn RunStore,
    lease: &Lease,
) -> Vec<(&'static str, StoreError)> {
    let id = lease.run_id;
    let mut failed = Vec::new();
    if let Err(err) = store.revoke_tokens(id).await {
        failed.push(("revoke the run's tokens", err));
    }
    if let Err(err) = store.close_logs(id).await {
        failed.push(("close the run's logs", err));
    }
    if let Err(err) = store.release_run(lease).await {
        failed.push(("release the run's lease", err));
    }
    failed
}

async fn tail(store: &dyn RunStore, id: RunId, source: LogSource, n: usize) -> Vec<String> {
    let mut lines: VecDeque<String> = VecDeque::with_capacity(n);
    match store.logs(id, source, 0, false).await {
        Ok(mut stream) => {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(line) => {
                        if lines.len() == n {
                            lines.pop_front();
                        }
                        lines.push_back(format!("{}: {}", line.stream, line.line));
                    }
                    Err(err) => {
                        tracing::warn!(run_id = %id, error = %err, "could not read logs for evidence");
                        break;
                    }
                }
            }
        }
        Err(err) => tracing::warn!(run_id = %id, error = %err, "could not read logs for evidence"),
    }
    lines.into()
}

impl Actor for RunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Mailbox sized for bursts of frames from a chatty shim.
        ctx.set_mailbox_capacity(4096);
        self.count_state(self.phase.state, 1);
        if self.adopted {
            tracing::info!(run_id = %self.id, trace_id = %self.record.trace_id, state = %self.phase.state, fence = self.lease.fence, "run adopted");
            self.apply(Input::Adopted, ctx);
            self.check_commands(ctx);
            match self.sandbox.clone() {
                Some(handle) => self.follow_adopted_sandbox(handle, ctx),
                None if self.phase.state != RunState::Pending => {
                    self.look_for_sandbox(SANDBOX_LOOKUPS, ctx)
                }
                None => {}
            }
        } else {
            self.apply(Input::Start, ctx);
        }
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        self.deps.registry.remove(self.id, &ctx.address());
        // A run handed to another replica stops counting here.
        self.count_state(self.phase.state, -1);
        tracing::debug!(run_id = %self.id, trace_id = %self.record.trace_id, state = %self.phase.state, "run actor stopped");
    }
}

impl Handler<Finished> for RunActor {
    type Result = ();
    fn handle(&mut self, msg: Finished, ctx: &mut Context<Self>) {
        self.record = *msg.0;
        if let Some(conn) = self.connection.take() {
            if let Err(err) = conn.conn.try_send(ToShim::Close {
                code: 1000,
                reason: format!("run {}", self.record.state),
            }) {
                tracing::debug!(run_id = %self.id, trace_id = %self.record.trace_id, error = %err, "connection already gone");
            }
        }
        ctx.stop();
    }
}

impl RunActor {
    fn stop_run(&mut self, grace_s: Option<u64>, ctx: &mut Context<Self>) {
        if self.phase.state.is_terminal() || self.phase.state == RunState::Stopping {
            return;
        }
        self.applied_commands.push(RunCommand::Stop { grace_s });
        let grace_s = grace_s.unwrap_or(self.timeouts().stop_grace.as_secs());
        self.ending_span = Some(tracing::info_span!(parent: &self.spec.span, "run.stop", grace_s));
        self.record_events(vec![EventKind::StopRequested { grace_s }], ctx);
        self.apply(Input::Stop { grace_s }, ctx);
    }

    fn kill_run(&mut self, reason: String, ctx: &mut Context<Self>) {
        if self.phase.state.is_terminal() {
            return;
        }
        self.applied_commands.push(RunCommand::Kill {
            reason: Some(reason.clone()),
        });
        self.ending_span = Some(tracing::info_span!(parent: &self.spec.span, "run.kill"));
        self.record_events(vec![EventKind::KillRequested { reason }], ctx);
        self.apply(Input::Kill, ctx);
    }

    /// Takes the commands other replicas queued for this run and carries them out.
    fn check_commands(&mut self, ctx: &mut Context<Self>) {
        let store = self.deps.store.clone();
        let id = self.id;
        let take = async move { store.take_commands(id).await };
        ctx.spawn(take.into_actor(self).map(|res, act, ctx| match res {
            Ok(commands) => {
                for command in commands {
                    tracing::info!(run_id = %act.id, trace_id = %act.record.trace_id, ?command, "command from another replica");
                    match command {
                        RunCommand::Stop { grace_s } => act.stop_run(grace_s, ctx),
                        RunCommand::Kill { reason } => act.kill_run(
                            reason.unwrap_or_else(|| "kill requested through the API".into()),
                            ctx,
                        ),
                    }
                }
            }
            Err(err) => {
                tracing::warn!(run_id = %act.id, trace_id = %act.record.trace_id, error = %err, "could not take the run's commands")
            }
        }));
    }
}

impl Handler<StopRun> for RunActor {
    type Result = ();
    fn handle(&mut self, msg: StopRun, ctx: &mut Context<Self>) {
        self.stop_run(msg.grace_s, ctx);
    }
}

impl Handler<KillRun> for RunActor {
    type Result = ();
    fn handle(&mut self, msg: KillRun, ctx: &mut Context<Self>) {
        self.kill_run(msg.reason, ctx);
    }
}

impl Handler<CheckCommands> for RunActor {
    type Result = ();
    fn handle(&mut self, _: CheckCommands, ctx: &mut Context<Self>) {
        self.check_commands(ctx);
    }
}

impl Handler<Superseded> for RunActor {
    type Result = ();
    fn handle(&mut self, msg: Superseded, ctx: &mut Context<Self>) {
        tracing::info!(run_id = %self.id, trace_id = %self.record.trace_id, by = ?msg.by, fence = self.lease.fence, "another replica drives the run now; stepping down");
        for (_, handle) in self.timers.drain() {
            ctx.cancel_future(handle);
        }
        // Requests this replica accepted but could no longer carry out go to the new owner.
        let commands = std::mem::take(&mut self.applied_commands);
        if !commands.is_empty() {
            let store = self.deps.store.clone();
            let id = self.id;
            let trace_id = self.record.trace_id.clone();
            actix_rt::spawn(async move {
                for command in commands {
                    match store.push_command(id, &command).await {
                        Ok(owner) => {
                            tracing::info!(run_id = %id, trace_id = %trace_id, ?command, ?owner, "command handed to the run's new owner")
                        }
                        Err(err) => {
                            tracing::warn!(run_id = %id, trace_id = %trace_id, ?command, error = %err, "could not hand a command to the run's new owner")
                        }
                    }
                }
            });
        }
        if let Some(conn) = self.connection.take() {
            // The shim reconnects (through the load balancer) and resumes where it was acked.
            if let Err(err) = conn.conn.try_send(ToShim::Close {
                code: CLOSE_RUN_MOVED,
                reason: "the run moved to another control-plane replica; reconnect".into(),
            }) {
                tracing::debug!(run_id = %self.id, trace_id = %self.record.trace_id, error = %err, "connection already gone");
            }
        }
        ctx.stop();
    }
}

/// The sandbox handle stored for run `id`, if any; one that does not decode is logged and taken
/// as none.
async fn stored_sandbox(
    store: &dyn RunStore,
    id: RunId,
    trace_id: &str,
) -> Result<Option<SandboxHandle>, StoreError> {
    let Some(bytes) = store.get_blob(&sandbox_blob_key(id)).await? else {
        return Ok(None);
    };
    match serde_json::from_slice(&bytes) {
        Ok(handle) => Ok(Some(handle)),
        Err(err) => {
            tracing::warn!(run_id = %id, trace_id, error = %err, "stored sandbox handle unreadable");
            Ok(None)
        }
    }
}

/// How often, and how many times, an adopted run looks for a sandbox handle not stored yet
/// (two minutes in all: a spawn call outlasting that has failed the run's startup anyway).
const SANDBOX_LOOKUP_EVERY: Duration = Duration::from_millis(250);
const SANDBOX_LOOKUPS: u32 = 480;

/// Close code telling a shim its run is driven by another replica now (it reconnects).
pub const CLOSE_RUN_MOVED: u16 = 4001;

impl Handler<ShimHello> for RunActor {
    type Result = Result<Attachment, TokenError>;
    fn handle(&mut self, msg: ShimHello, ctx: &mut Context<Self>) -> Self::Result {
        self.refuse_if_ended()?;
        if let Some(old) = self.connection.take() {
            if old.id != msg.conn_id {
                if let Err(err) = old.conn.try_send(ToShim::Close {
                    code: 1000,
                    reason: "replaced by a newer connection".into(),
                }) {
                    tracing::debug!(run_id = %self.id, trace_id = %self.record.trace_id, error = %err, "old connection already gone");
                }
            }
        }
        let resumed = msg.resume_from.is_some() || self.agent_started;
        let mut late_results = Vec::new();
        for answered in msg.answered_calls {
            if !self.seen_calls.contains_key(&answered.call_id) {
                self.answered_elsewhere
                    .insert(answered.call_id.clone(), answered);
            } else if !self.in_flight.contains_key(&answered.call_id)
                && self.recorded_results.insert(answered.call_id.clone())
            {
                // Executed and answered by a replica that stopped before storing the result:
                // the history gets it from the shim's report.
                late_results.push(EventKind::ToolResult {
                    call_id: answered.call_id,
                    tool: answered.tool,
                    ok: answered.ok,
                    duration_ms: 0,
                    error_code: answered.error_code,
                });
            }
        }
        let _connect = tracing::info_span!(
            parent: &self.spec.span,
            "shim.connect",
            host = %msg.host,
            resumed,
        )
        .entered();
        let welcome = ServerMessage::Welcome {
            run_id: self.id.to_string(),
            task: self.record.task.clone(),
            bundle: self.spec.bundle.clone(),
            last_acked: self.last_seq,
            heartbeat_interval_ms: self.timeouts().heartbeat_interval.as_millis() as u64,
            lost_after_ms: self.timeouts().lost_after.as_millis() as u64,
            start_agent: !self.agent_started,
            trace_spans: self.deps.export_spans.is_some(),
        };
        self.agent_started = true;
        if let Some(spawned) = self.spawned_at.take() {
            Metrics::record(
                &self.deps.metrics.connect_duration,
                spawned.elapsed(),
                &[KeyValue::new(attr::PROVIDER, self.record.provider.clone())],
            );
        }
        self.connection = Some(Connection {
            id: msg.conn_id,
            conn: msg.conn,
        });
        tracing::info!(run_id = %self.id, trace_id = %self.record.trace_id, host = %msg.host, resumed, last_acked = self.last_seq, "shim connected");
        // Welcome first, then answers the shim missed while away.
        self.send(welcome);
        for call_id in &msg.pending_calls {
            if let Some(answer) = self.kept_answer(call_id) {
                self.deliver(answer.to_shim());
            } else if let Some(tool) = self
                .seen_calls
                .get(call_id)
                .filter(|_| !self.in_flight.contains_key(call_id))
            {
                if self.recorded_results.insert(call_id.clone()) {
                    late_results.push(EventKind::ToolResult {
                        call_id: call_id.clone(),
                        tool: tool.clone(),
                        ok: false,
                        duration_ms: 0,
                        error_code: Some(codes::RETRYABLE.into()),
                    });
                }
                self.send(ServerMessage::ToolResult {
                    call_id: call_id.clone(),
                    ok: false,
                    result: None,
                    error: Some(ToolError {
                        code: codes::RETRYABLE.into(),
                        message: "the result of this call was lost; call again".into(),
                    }),
                });
            }
        }
        if !late_results.is_empty() {
            self.record_events(late_results, ctx);
        }
        self.record_events(
            vec![EventKind::ShimConnected {
                host: msg.host,
                resumed,
            }],
            ctx,
        );
        self.apply(Input::ShimConnected, ctx);
        Ok(Attachment {
            mailbox: self.mailbox.clone(),
            last_seq: self.last_seq,
            span: self.spec.span.clone(),
            calls_seen: self.seen_calls.keys().cloned().collect(),
        })
    }
}

impl Handler<ShimFrames> for RunActor {
    type Result = ();
    fn handle(&mut self, msg: ShimFrames, ctx: &mut Context<Self>) {
        for frame in msg.0 {
            <Self as Handler<ShimFrame>>::handle(self, frame, ctx);
        }
    }
}

impl Handler<ShimFrame> for RunActor {
    type Result = ();
    fn handle(&mut self, msg: ShimFrame, ctx: &mut Context<Self>) {
        if self.connection.as_ref().map(|c| c.id) != Some(msg.conn_id) {
            tracing::debug!(run_id = %self.id, trace_id = %self.record.trace_id, conn_id = msg.conn_id, "frame from a replaced connection dropped");
            return;
        }
        if let ShimMessage::Spans { spans } = msg.message {
            // A shim told to record none may still send what it kept before its welcome.
            if let Some(export) = self.deps.export_spans {
                export(&self.spec.traceparent, spans);
            }
            return;
        }
        if self.phase.state.is_terminal() {
            return;
        }
        self.handle_sequenced(msg.message, msg.answered, ctx);
    }
}

impl Handler<ShimGone> for RunActor {
    type Result = ();
    fn handle(&mut self, msg: ShimGone, ctx: &mut Context<Self>) {
        if self.connection.as_ref().map(|c| c.id) != Some(msg.conn_id) {
            return;
        }
        self.connection = None;
        if self.phase.state.is_terminal() {
            return;
        }
        tracing::info!(run_id = %self.id, trace_id = %self.record.trace_id, reason = %msg.reason, "shim disconnected");
        self.record_events(
            vec![EventKind::ShimDisconnected { reason: msg.reason }],
            ctx,
        );
        self.apply(Input::ShimDisconnected, ctx);
    }
}

/// Checks a hello against the protocol version this build speaks.
pub fn check_protocol_version(version: u32) -> Result<(), String> {
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(format!(
            "protocol version {version} is not supported (this control plane speaks {PROTOCOL_VERSION})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_usage_polls_spread_over_the_interval() {
        let interval = Duration::from_secs(10);
        let offsets: Vec<Duration> = (0..200).map(|_| first_poll_after(interval)).collect();
        assert!(offsets.iter().all(|o| *o < interval));
        assert!(offsets.iter().any(|o| *o < interval / 4), "{offsets:?}");
        assert!(offsets.iter().any(|o| *o > interval * 3 / 4), "{offsets:?}");
    }

    #[test]
    fn encoded_len_counts_the_bytes_of_the_json_text() {
        let value = serde_json::json!({"content": "line \"one\"\n\ttwo é", "n": [1, 2.5, null]});
        assert_eq!(encoded_len(&value), value.to_string().len());
    }
}
