//! Replicas as real `codebolt server` processes sharing one `redis-server`, behind the in-test
//! load balancer that is their `public_url` (see `common/cluster.rs`): a run through a one-replica
//! cluster, and the load balancer itself around dead and frozen replicas.

mod common;

use std::time::Duration;

use actors::model::RunState;
use actors::run::RunTimeouts;
use common::cluster::{Cluster, ClusterSetup};
use common::{fast_timeouts, kinds, Workspace};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// Reads the README through one tool call, checks the result and finishes.
const AGENT: &str = r#"
read task
printf '%s\n' '{"type":"message","text":"starting"}'
printf '%s\n' '{"type":"tool_call","id":"c1","tool":"fs.read_file","args":{"path":"README.md"}}'
read result
case "$result" in *'"ok":true'*) ;; *) echo "bad result: $result" >&2; exit 9;; esac
echo "plain output"
printf '%s\n' '{"type":"done","result":"all good"}'
"#;

#[tokio::test]
async fn a_run_through_a_one_replica_cluster_behind_the_load_balancer() {
    let cluster = Cluster::start(
        1,
        Workspace::new().agent("good", AGENT),
        ClusterSetup::default(),
    )
    .await;

    let run = cluster.start_run_on(0, "good", "read the readme").await;
    assert!(
        cluster.replica(0).is_owner(&run.owner),
        "replica 0 (pid {:?}) does not own the run it created: {}",
        cluster.replica(0).pid(),
        run.owner
    );
    let done = cluster.wait_terminal_on(0, run.id, WAIT).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.failure);
    assert_eq!(done.result, Some(json!("all good")));

    let events = cluster.events_on(0, run.id).await;
    let names = kinds(&events);
    for expected in ["shim_connected", "tool_call", "tool_result", "agent_done"] {
        assert!(
            names.iter().any(|n| n == expected),
            "no {expected}: {names:?}"
        );
    }
    assert_eq!(names.last().map(String::as_str), Some("state_changed"));
    assert!(cluster
        .logs_on(0, run.id, "agent")
        .await
        .contains(&"plain output".to_string()));
    // The shim called back through the load balancer (its public_url), not straight to the
    // replica: the tests' own requests above went straight to the replica.
    assert!(
        cluster.lb().connections_to(0) >= 1,
        "the shim's connection did not go through the load balancer"
    );
}

#[tokio::test]
async fn the_load_balancer_skips_a_dead_backend() {
    let mut cluster = Cluster::start(2, Workspace::new(), ClusterSetup::default()).await;
    cluster.replica_mut(1).kill9();

    for attempt in 1..=10 {
        let (status, body) = cluster.lb_get("/healthz").await;
        assert_eq!(
            status, 200,
            "GET /healthz #{attempt} through the load balancer: {body}"
        );
    }
    let lb = cluster.lb();
    assert_eq!(lb.connections_to(0), 10, "every request lands on replica 0");
    assert_eq!(lb.connections_to(1), 0);
    // Round-robin offered the dead replica every other connection, and it was skipped.
    assert!(
        lb.failed_connects_to(1) >= 4,
        "replica 1 was tried {} times",
        lb.failed_connects_to(1)
    );
}

#[tokio::test]
async fn a_frozen_backend_does_not_hold_up_other_connections() {
    let cluster = Cluster::start(2, Workspace::new(), ClusterSetup::default()).await;
    cluster.replica(1).sigstop();

    // A request to the frozen replica: accepted by its kernel, answered by nobody.
    cluster.lb().pin(Some(1));
    let stalled = tokio::spawn(
        cluster
            .lb_http
            .get(cluster.lb_url("/healthz"))
            // Longer than the rest of the test can take on a loaded machine.
            .timeout(Duration::from_secs(180))
            .send(),
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while cluster.lb().open_connections_to(1) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request never reached the frozen replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Meanwhile the load balancer keeps serving the other replica.
    cluster.lb().pin(Some(0));
    for attempt in 1..=10 {
        let (status, body) = cluster.lb_get("/healthz").await;
        assert_eq!(
            status, 200,
            "GET /healthz #{attempt} while replica 1 is frozen: {body}"
        );
    }
    assert!(!stalled.is_finished(), "the frozen replica answered");

    // Thawed, the frozen replica answers the request it held.
    cluster.replica(1).sigcont();
    let res = stalled
        .await
        .expect("request task")
        .expect("the held request is answered after SIGCONT");
    assert_eq!(res.status(), 200);
}

/// Runs until stopped: a message every 100 ms (a shell exits on the SIGTERM a stop forwards).
const LONG: &str = r#"
read task
i=0
while true; do
  i=$((i+1))
  printf '{"type":"message","text":"tick %s"}\n' "$i"
  sleep 0.1
done
"#;

/// Makes `CALLS` tool calls a little apart, calling again when a result says the call was lost
/// (a replica died with it), then finishes with the number of calls made.
const CALLER: &str = r#"
read task
n=0
i=1
while [ "$i" -le 25 ]; do
  n=$((n+1))
  printf '{"type":"tool_call","id":"c%s","tool":"fs.read_file","args":{"path":"README.md"}}\n' "$n"
  read result
  case "$result" in
    *'"ok":true'*) i=$((i+1)) ;;
    *retryable*) ;;
    *) echo "bad result: $result" >&2; exit 9 ;;
  esac
  sleep 0.1
done
printf '{"type":"done","result":%s}\n' "$n"
"#;

/// Indices of a run's history are 1..=n with no gap or repeat, and no shim frame (tool call,
/// message) is stored twice.
fn assert_history_whole(events: &[actors::model::RunEvent]) {
    let indices: Vec<u64> = events.iter().map(|e| e.index).collect();
    let expected: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(indices, expected, "event indices have gaps or repeats");
    let mut seen = std::collections::HashSet::new();
    for event in events {
        let key = match &event.kind {
            actors::model::EventKind::ToolCall { call_id, .. } => format!("call {call_id}"),
            actors::model::EventKind::AgentMessage { text } => format!("message {text}"),
            actors::model::EventKind::AgentDone { .. } => "done".to_string(),
            _ => continue,
        };
        assert!(
            seen.insert(key.clone()),
            "{key} stored twice: {:?}",
            kinds(events)
        );
    }
}

/// Waits (on replica 0) until the run ends, which must be in success, then reads its history on
/// replica `read_on` and checks it is whole; returns the record and the history's event names.
async fn succeeded_with_whole_history(
    cluster: &Cluster,
    id: uuid::Uuid,
    read_on: usize,
) -> (actors::model::RunRecord, Vec<String>) {
    let done = cluster
        .wait_terminal_on(0, id, Duration::from_secs(60))
        .await;
    assert_eq!(
        done.state,
        RunState::Succeeded,
        "run {id}: {:?} (owner {})",
        done.failure,
        done.owner
    );
    let events = cluster.events_on(read_on, id).await;
    assert_history_whole(&events);
    (done, kinds(&events))
}

/// How many of `names` are `name`.
fn count(names: &[String], name: &str) -> usize {
    names.iter().filter(|n| *n == name).count()
}

#[tokio::test]
async fn a_run_spawned_through_a_is_stopped_through_c_while_its_shim_is_on_b() {
    let cluster = Cluster::start(
        3,
        Workspace::new().agent("long", LONG),
        ClusterSetup::default(),
    )
    .await;
    // The shim's callback lands on replica 1, whatever replica created the run.
    cluster.lb().pin(Some(1));
    let run = cluster.start_run_on(0, "long", "tick").await;
    assert!(cluster.replica(0).is_owner(&run.owner));
    let running = cluster
        .wait_for_on(
            2,
            run.id,
            |r| r.state == RunState::Running && cluster.replica(1).is_owner(&r.owner),
            WAIT,
        )
        .await;
    // Running means the agent started from its bundle, fetched from replica 1, which did not
    // build it.
    assert_eq!(running.state, RunState::Running);

    let (status, body) = cluster
        .post_on(
            2,
            &format!("/v1/runs/{}/stop", run.id),
            Some(json!({"grace_s": 5})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let done = cluster.wait_terminal_on(0, run.id, WAIT).await;
    assert_eq!(done.state, RunState::Stopped, "{:?}", done.failure);
    assert_eq!(
        done.termination,
        Some(actors::model::Termination::StoppedGracefully)
    );
    let events = cluster.events_on(2, run.id).await;
    let names = kinds(&events);
    for expected in ["shim_connected", "stop_requested", "stop_forwarded"] {
        assert!(
            names.iter().any(|n| n == expected),
            "no {expected}: {names:?}"
        );
    }
    assert_history_whole(&events);
}

#[tokio::test]
async fn killing_the_replica_that_holds_the_connections_moves_every_run_to_the_others() {
    const RUNS: usize = 20;
    let mut cluster = Cluster::start(
        3,
        Workspace::new().agent("caller", CALLER),
        ClusterSetup::default(),
    )
    .await;
    cluster.lb().pin(Some(1));
    let mut ids = Vec::new();
    for i in 0..RUNS {
        ids.push(
            cluster
                .start_run_on(i % 3 % 2 * 2, "caller", "call")
                .await
                .id,
        );
    }
    for id in &ids {
        cluster
            .wait_for_on(
                0,
                *id,
                |r| r.state == RunState::Running && cluster.replica(1).is_owner(&r.owner),
                WAIT,
            )
            .await;
    }
    // Mid-run: every shim is connected to replica 1, which now dies.
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.lb().pin(None);
    cluster.replica_mut(1).kill9();

    for id in &ids {
        let (done, names) = succeeded_with_whole_history(&cluster, *id, 2).await;
        assert!(
            cluster.replica(0).is_owner(&done.owner) || cluster.replica(2).is_owner(&done.owner),
            "run {id} ended on {}",
            done.owner
        );
        let results = count(&names, "tool_result");
        let calls = count(&names, "tool_call");
        assert!(calls >= 25, "run {id}: {calls} calls: {names:?}");
        // Every call stored has its result: one the dead replica answered but did not store is
        // recorded from the shim's hello, one it never answered is answered `retryable`.
        assert_eq!(
            calls, results,
            "run {id}: {calls} calls, {results} results: {names:?}"
        );
        assert!(
            count(&names, "shim_connected") >= 2,
            "run {id} never reconnected: {names:?}"
        );
    }
}

#[tokio::test]
async fn a_stale_owner_thawed_after_its_lease_lapsed_has_its_writes_refused() {
    let cluster = Cluster::start(
        2,
        Workspace::new().agent("long", LONG),
        ClusterSetup {
            // Longer than the shim takes to call a silent control plane dead (3 s at least).
            timeouts: RunTimeouts {
                lost_after: Duration::from_secs(8),
                ..fast_timeouts()
            },
            ..ClusterSetup::default()
        },
    )
    .await;
    cluster.lb().pin(Some(0));
    let run = cluster.start_run_on(0, "long", "tick").await;
    cluster
        .wait_state_on(0, run.id, RunState::Running, WAIT)
        .await;

    // Frozen past its lease: the shim gives up on it and reconnects to replica 1.
    cluster.replica(0).sigstop();
    cluster.lb().pin(Some(1));
    let moved = cluster
        .wait_for_on(1, run.id, |r| cluster.replica(1).is_owner(&r.owner), WAIT)
        .await;
    assert_eq!(
        moved.state,
        RunState::Running,
        "{:?} {:?}",
        moved.failure,
        kinds(&cluster.events_on(1, run.id).await)
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let before = cluster.events_on(1, run.id).await;

    // Thawed, replica 0 still believes it drives the run until it hears otherwise: whatever it
    // writes meanwhile (frames the shim sent before giving up on it, its own timers) is refused.
    // It steps down on the first refusal or on the notice of the takeover, whichever it reads
    // first.
    cluster.replica(0).sigcont();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // A fresh connection: the pooled ones timed out while the replica was frozen.
        let metrics = reqwest::Client::new()
            .get(cluster.url_on(0, "/metrics"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("GET /metrics on replica 0")
            .text()
            .await
            .expect("metrics text");
        let refused = metric(&metrics, "codebolt_store_fenced_writes_total");
        let released = metric(&metrics, "codebolt_runs_released_total");
        if refused + released >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica 0 neither had a write refused nor stepped down (refused {refused}, released {released})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let record = cluster.get_on(1, run.id).await;
    assert_eq!(
        record.state,
        RunState::Running,
        "the stale owner changed the run"
    );
    assert!(cluster.replica(1).is_owner(&record.owner));
    let after = cluster.events_on(1, run.id).await;
    assert_eq!(&after[..before.len()], &before[..], "history was rewritten");
    assert_history_whole(&after);
    let names = kinds(&after[before.len()..]);
    assert!(
        !names
            .iter()
            .any(|n| n == "shim_disconnected" || n == "state_changed"),
        "the stale owner's view leaked into the history: {names:?}"
    );

    let (status, body) = cluster
        .post_on(0, &format!("/v1/runs/{}/kill", run.id), None)
        .await;
    assert_eq!(status, 202, "{body}");
    let done = cluster.wait_terminal_on(1, run.id, WAIT).await;
    assert_eq!(done.state, RunState::Killed);
}

#[tokio::test]
async fn fifty_creates_over_three_replicas_against_a_limit_of_ten_admit_exactly_ten() {
    let cluster = Cluster::start(
        3,
        Workspace::new().agent("long", LONG),
        ClusterSetup {
            extra_providers: "    max_concurrent_runs: 10\n".into(),
            ..ClusterSetup::default()
        },
    )
    .await;
    let creates = (0..50)
        .map(|i| cluster.create_on(i % 3, json!({"agent": "long", "task": format!("t{i}")})));
    let results = futures_util::future::join_all(creates).await;
    let mut admitted = Vec::new();
    for (status, body) in &results {
        match status {
            201 => admitted.push(
                body["id"]
                    .as_str()
                    .expect("id")
                    .parse::<uuid::Uuid>()
                    .unwrap(),
            ),
            429 => {
                assert_eq!(body["error"]["code"], "limit_reached", "{body}");
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains("max_concurrent_runs") && message.contains("10"),
                    "{message}"
                );
            }
            other => panic!("create answered {other}: {body}"),
        }
    }
    assert_eq!(admitted.len(), 10, "admitted {} runs", admitted.len());

    // A slot comes back when a run ends.
    let (status, body) = cluster
        .post_on(1, &format!("/v1/runs/{}/kill", admitted[0]), None)
        .await;
    assert_eq!(status, 202, "{body}");
    cluster.wait_terminal_on(0, admitted[0], WAIT).await;
    let (status, body) = cluster
        .create_on(2, json!({"agent": "long", "task": "one more"}))
        .await;
    assert_eq!(status, 201, "{body}");
    admitted[0] = body["id"].as_str().unwrap().parse().unwrap();
    let (status, _) = cluster
        .create_on(0, json!({"agent": "long", "task": "too many"}))
        .await;
    assert_eq!(status, 429);
    for id in admitted {
        cluster
            .post_on(
                (id.as_u128() % 3) as usize,
                &format!("/v1/runs/{id}/kill"),
                None,
            )
            .await;
    }
}

/// The value of an unlabelled metric in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

#[tokio::test]
async fn a_redis_restart_with_runs_in_flight_converges_without_leaks() {
    let mut cluster = Cluster::start(
        2,
        Workspace::new().agent("caller", CALLER),
        ClusterSetup {
            persistent_redis: true,
            ..ClusterSetup::default()
        },
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(cluster.start_run_on(i % 2, "caller", "call").await.id);
    }
    // The local provider's sandbox id is the shim's process id. A run whose shim called back to
    // the other replica before the spawn call returned runs there before its record names the
    // sandbox (the new owner finds the handle the spawning replica stores).
    let mut pids = Vec::new();
    for id in &ids {
        let running = cluster
            .wait_for_on(
                0,
                *id,
                |r| r.state == RunState::Running && r.sandbox_id.is_some(),
                WAIT,
            )
            .await;
        let sandbox = running.sandbox_id.expect("sandbox id of a running run");
        pids.push(sandbox.parse::<u32>().expect("a process id"));
    }

    // Redis goes away for longer than a replica's lease.
    cluster.redis().kill();
    let (status, body) = cluster
        .create_on(1, json!({"agent": "caller", "task": "during the outage"}))
        .await;
    assert_eq!(status, 503, "a create without Redis: {body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    let (status, _) = cluster.get_json_on(0, "/readyz").await;
    assert_eq!(status, 503, "ready without Redis");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cluster.redis().restart();
    // Both replicas find Redis again by themselves.
    for replica in 0..2 {
        let deadline = tokio::time::Instant::now() + WAIT;
        while cluster.get_json_on(replica, "/readyz").await.0 != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica {replica} not ready again after Redis came back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    for id in &ids {
        let (_, names) = succeeded_with_whole_history(&cluster, *id, 1).await;
        assert!(count(&names, "tool_result") >= 25, "run {id}: {names:?}");
        assert_eq!(
            count(&names, "sandbox_created"),
            1,
            "run {id} got more than one sandbox: {names:?}"
        );
    }
    // Every sandbox is gone once its run ended: none leaked.
    let deadline = tokio::time::Instant::now() + WAIT;
    while pids.iter().any(|pid| common::pid_alive(*pid)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sandboxes still running after their runs ended: {:?}",
            pids.iter()
                .filter(|p| common::pid_alive(**p))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_run_taken_over_by_another_replica_stays_one_trace() {
    let (receiver, otlp) = common::otlp::Receiver::start().await;
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
            format!("http://{otlp}"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "grpc".into()),
        // Spans leave the replicas within a moment, not at their (SIGKILL) end.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    let cluster = Cluster::start(
        2,
        Workspace::new().agent("good", AGENT),
        ClusterSetup {
            replicas_env: env,
            ..ClusterSetup::default()
        },
    )
    .await;
    cluster.lb().pin(Some(1));
    let run = cluster.start_run_on(0, "good", "read the readme").await;
    let done = cluster.wait_terminal_on(1, run.id, WAIT).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.failure);
    assert!(cluster.replica(1).is_owner(&done.owner), "{}", done.owner);

    let trace_id = hex::decode(&done.trace_id).expect("hex trace id");
    let deadline = tokio::time::Instant::now() + WAIT;
    let (root, adopted, spans) = loop {
        let spans: Vec<_> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        let root = spans.iter().find(|s| s.name == "codebolt.run").cloned();
        let adopted = spans
            .iter()
            .find(|s| s.name == "codebolt.run.adopted")
            .cloned();
        let tool = spans.iter().any(|s| s.name == "tool.call");
        if let (Some(root), Some(adopted), true) = (root, adopted, tool) {
            break (root, adopted, spans);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the trace lacks the creating or the adopting replica's spans: {:?}",
            spans.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The adopting replica's root is a child of the run's root span on the creating replica.
    assert_eq!(adopted.parent_span_id, root.span_id);
    assert!(
        root.parent_span_id.is_empty(),
        "the run's root has no parent"
    );
    let ids: Vec<&Vec<u8>> = spans.iter().map(|s| &s.span_id).collect();
    for span in &spans {
        assert!(
            span.parent_span_id.is_empty() || ids.contains(&&span.parent_span_id),
            "{} has a parent outside the trace",
            span.name
        );
    }
    // The tool calls ran on the adopting replica, under its root.
    let tool = spans
        .iter()
        .find(|s| s.name == "tool.call")
        .expect("tool span");
    assert_eq!(tool.parent_span_id, adopted.span_id);
}

/// The run token in the environment of the agent's shim (an ancestor of the agent process).
fn run_token_of(agent_pid: u32) -> Option<String> {
    let mut pid = agent_pid;
    for _ in 0..4 {
        if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) {
            let token = environ
                .split(|b| *b == 0)
                .filter_map(|var| std::str::from_utf8(var).ok())
                .find_map(|var| var.strip_prefix("CODEBOLT_RUN_TOKEN="))
                .map(String::from);
            if token.is_some() {
                return token;
            }
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        pid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()?;
    }
    None
}

#[tokio::test]
async fn json_logs_name_the_run_and_its_trace_on_every_line_and_never_the_token() {
    const SLOW: &str = r#"
read task
printf '%s\n' '{"type":"tool_call","id":"c1","tool":"fs.read_file","args":{"path":"README.md"}}'
read result
sleep 2
printf '%s\n' '{"type":"done","result":"ok"}'
"#;
    let cluster = Cluster::start(
        1,
        Workspace::new().agent("slow", SLOW),
        ClusterSetup {
            replicas_env: vec![
                ("CODEBOLT_LOG_FORMAT".into(), "json".into()),
                ("RUST_LOG".into(), "info".into()),
            ],
            ..ClusterSetup::default()
        },
    )
    .await;
    let run = cluster.start_run_on(0, "slow", "log me").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let pid = loop {
        let pid = cluster
            .events_on(0, run.id)
            .await
            .iter()
            .find_map(|e| match &e.kind {
                actors::model::EventKind::AgentStarted { pid } => Some(*pid),
                _ => None,
            });
        if let Some(pid) = pid {
            break pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let token = run_token_of(pid).expect("the shim's run token, read from /proc");
    let done = cluster.wait_terminal_on(0, run.id, WAIT).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.failure);

    let log = std::fs::read_to_string(cluster.replica(0).log_path()).expect("replica log");
    let run_id = run.id.to_string();
    let mut about_the_run = 0;
    // The harness marks each start of the replica with a `=== … ===` line.
    for line in log
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("=== "))
    {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "not a JSON line: {line}");
        assert!(!line.contains(&token), "the run token was logged: {line}");
        if line.contains(&run_id) {
            about_the_run += 1;
            assert!(
                line.contains(&done.trace_id),
                "a line about run {run_id} does not name its trace {}: {line}",
                done.trace_id
            );
        }
    }
    assert!(
        about_the_run >= 5,
        "only {about_the_run} lines about the run:\n{log}"
    );
}

#[tokio::test]
async fn a_run_its_creator_never_claimed_is_adopted_and_runs() {
    use actors::run::StoredSpec;
    use actors::store::redis::{RedisSettings, RedisStore};
    use actors::store::RunStore;

    let mut cluster = Cluster::start(
        2,
        Workspace::new().agent("good", AGENT),
        ClusterSetup::default(),
    )
    .await;
    // A run as a creator leaves it when it stops between storing the run and claiming it: the
    // record and its spec stored, no lease. Made from a real run's spec, under a new id.
    let template = cluster.start_run_on(0, "good", "template").await;
    cluster.wait_terminal_on(0, template.id, WAIT).await;
    let store = RedisStore::open(
        &cluster.redis().url(),
        cluster.cluster_id(),
        RedisSettings::default(),
    )
    .expect("open the cluster's store");
    let spec = store
        .get_blob(&StoredSpec::blob_key(template.id))
        .await
        .unwrap()
        .expect("the template's spec");
    let mut record = template.clone();
    record.id = uuid::Uuid::new_v4();
    // The bundle is served per run: the copy names its own.
    let mut spec: StoredSpec = serde_json::from_slice(&spec).expect("a stored spec");
    spec.bundle.url = spec
        .bundle
        .url
        .replace(&template.id.to_string(), &record.id.to_string());
    let spec = serde_json::to_vec(&spec).unwrap();
    record.state = RunState::Pending;
    record.state_times = [(RunState::Pending, chrono::Utc::now())].into();
    record.task = "abandoned at birth".into();
    record.owner = "a-replica-that-stopped".into();
    record.sandbox_id = None;
    record.remote_host = None;
    record.exit_code = None;
    record.termination = None;
    record.result = None;
    store
        .put_blob(&StoredSpec::blob_key(record.id), &spec)
        .await
        .unwrap();
    store.create_run(&record, None).await.unwrap();

    // Found once it has gone unclaimed for `UNCLAIMED_AFTER`, adopted by a live replica, run.
    let within = actors::cluster::UNCLAIMED_AFTER + WAIT;
    let done = cluster.wait_terminal_on(1, record.id, within).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.failure);
    assert!(
        (0..2).any(|i| cluster.replica(i).is_owner(&done.owner)),
        "owner {}",
        done.owner
    );
}
