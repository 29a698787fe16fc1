//! End to end on the local provider: the real server in-process, real agent-shim processes, real
//! agents (POSIX sh scripts).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actors::model::{EventKind, FailureKind, RunState, Termination};
use common::proxy::Proxy;
use common::{kinds, pid_alive, ServerSetup, TestServer, Workspace};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

/// Reads the task, reads README.md, writes a file, calls an unknown tool, reads outside the
/// workspace, uses two ids again (a read the connection could answer, a listing it could not),
/// reports, finishes.
const GOOD_AGENT: &str = r#"
read task
printf '%s\n' '{"type":"message","text":"starting"}'
printf '%s\n' '{"type":"tool_call","id":"c1","tool":"fs.read_file","args":{"path":"README.md"}}'
read result
case "$result" in *'"ok":true'*) ;; *) echo "bad result: $result" >&2; exit 9;; esac
printf '%s\n' '{"type":"tool_call","id":"c2","tool":"fs.write_file","args":{"path":"out/report.txt","content":"done\n"}}'
read result2
printf '%s\n' '{"type":"tool_call","id":"c3","tool":"no.such_tool","args":{}}'
read result3
case "$result3" in *unknown_tool*) ;; *) echo "expected unknown_tool: $result3" >&2; exit 8;; esac
printf '%s\n' '{"type":"tool_call","id":"c4","tool":"fs.read_file","args":{"path":"../outside"}}'
read result4
case "$result4" in *outside_workspace*) ;; *) echo "expected outside_workspace: $result4" >&2; exit 7;; esac
printf '%s\n' '{"type":"tool_call","id":"c1","tool":"fs.read_file","args":{"path":"README.md"}}'
read result5
case "$result5" in *duplicate_call_id*"'c1'"*) ;; *) echo "expected duplicate_call_id: $result5" >&2; exit 6;; esac
printf '%s\n' '{"type":"tool_call","id":"c3","tool":"fs.list_dir","args":{"path":"."}}'
read result6
case "$result6" in *duplicate_call_id*"'c3'"*) ;; *) echo "expected duplicate_call_id: $result6" >&2; exit 4;; esac
echo "this line is not json"
echo "to stderr" >&2
printf '%s\n' '{"type":"done","result":"all good"}'
"#;

const FAILING_AGENT: &str = r#"
read task
echo "something broke" >&2
exit 3
"#;

/// Exits cleanly on SIGTERM.
const POLITE_AGENT: &str = r#"
trap 'echo "got TERM" >&2; exit 0' TERM
read task
printf '%s\n' '{"type":"message","text":"waiting"}'
while true; do sleep 0.1; done
"#;

/// Ignores SIGTERM.
const STUBBORN_AGENT: &str = r#"
trap '' TERM
read task
printf '%s\n' '{"type":"message","text":"not stopping"}'
while true; do sleep 0.1; done
"#;

/// Emits numbered messages slowly, so a connection can be cut in the middle.
const COUNTING_AGENT: &str = r#"
read task
i=1
while [ $i -le 40 ]; do
  printf '{"type":"message","text":"m%d"}\n' $i
  i=$((i+1))
  sleep 0.05
done
printf '%s\n' '{"type":"tool_call","id":"last","tool":"fs.list_dir","args":{"path":"."}}'
read result
case "$result" in *README.md*) ;; *) exit 5;; esac
"#;

fn workspace() -> Workspace {
    Workspace::new()
        .agent("good", GOOD_AGENT)
        .agent("failing", FAILING_AGENT)
        .agent("polite", POLITE_AGENT)
        .agent("stubborn", STUBBORN_AGENT)
        .agent("counting", COUNTING_AGENT)
}

#[actix_rt::test]
async fn a_run_succeeds_with_tool_calls_served_by_the_control_plane() {
    let server = TestServer::start(workspace()).await;
    let run = server.start_run("good", "read the readme").await;
    assert_eq!(run.state, RunState::Pending);
    assert_eq!(run.provider, "local");
    assert_eq!(run.trace_id.len(), 32);

    let done = server.wait_terminal(run.id, WAIT).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.failure);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.termination, Some(Termination::Exited));
    assert_eq!(done.result, Some(json!("all good")));
    assert!(done.remote_host.is_some());
    for state in [
        RunState::Pending,
        RunState::Provisioning,
        RunState::Starting,
        RunState::Running,
        RunState::Succeeded,
    ] {
        assert!(done.state_times.contains_key(&state), "no time for {state}");
    }
    // The tool ran against the workspace.
    let written = std::fs::read_to_string(server.workspace.path().join("out/report.txt")).unwrap();
    assert_eq!(written, "done\n");

    let events = server.events(run.id).await;
    let names = kinds(&events);
    for expected in [
        "sandbox_created",
        "shim_connected",
        "agent_started",
        "agent_message",
        "tool_call",
        "tool_result",
        "agent_done",
        "agent_exited",
    ] {
        assert!(
            names.contains(&expected.to_string()),
            "missing {expected} in {names:?}"
        );
    }
    assert_eq!(names.last().map(String::as_str), Some("state_changed"));
    let indices: Vec<u64> = events.iter().map(|e| e.index).collect();
    assert_eq!(indices, (1..=events.len() as u64).collect::<Vec<_>>());
    let results: Vec<(String, bool, Option<String>)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::ToolResult {
                tool,
                ok,
                error_code,
                ..
            } => Some((tool.clone(), *ok, error_code.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        results,
        vec![
            ("fs.read_file".into(), true, None),
            ("fs.write_file".into(), true, None),
            ("no.such_tool".into(), false, Some("unknown_tool".into())),
            (
                "fs.read_file".into(),
                false,
                Some("outside_workspace".into())
            ),
            (
                "fs.read_file".into(),
                false,
                Some("duplicate_call_id".into())
            ),
            (
                "fs.list_dir".into(),
                false,
                Some("duplicate_call_id".into())
            ),
        ]
    );

    let agent_logs = server.logs(run.id, "agent").await;
    assert!(
        agent_logs.contains(&"this line is not json".to_string()),
        "{agent_logs:?}"
    );
    assert!(
        agent_logs.contains(&"to stderr".to_string()),
        "{agent_logs:?}"
    );
    // The sandbox is gone.
    let pid: u32 = done.sandbox_id.unwrap().parse().unwrap();
    assert!(!pid_alive(pid));
    server.stop().await;
}

#[actix_rt::test]
async fn an_agent_that_exits_non_zero_fails_with_evidence() {
    let server = TestServer::start(workspace()).await;
    let run = server.start_run("failing", "break").await;
    let done = server.wait_terminal(run.id, WAIT).await;
    assert_eq!(done.state, RunState::Failed);
    assert_eq!(done.exit_code, Some(3));
    let failure = done.failure.expect("failure");
    assert_eq!(failure.kind, FailureKind::AgentError);
    assert!(failure.message.contains('3'), "{}", failure.message);
    assert!(!failure.hint.is_empty());
    let evidence = done.evidence.expect("evidence kept");
    assert!(
        evidence
            .agent_logs
            .iter()
            .any(|l| l.contains("something broke")),
        "{evidence:?}"
    );
    server.stop().await;
}

#[actix_rt::test]
async fn stop_with_grace_ends_stopped_and_a_second_stop_is_a_no_op() {
    let server = TestServer::start(workspace()).await;
    let run = server.start_run("polite", "wait").await;
    server.wait_state(run.id, RunState::Running, WAIT).await;
    // Let the agent install its trap and say something.
    server.wait_for(run.id, |_| true, WAIT).await;
    wait_for_event(&server, run.id, "agent_message").await;
    let (status, body) = server
        .post(
            &format!("/v1/runs/{}/stop", run.id),
            Some(json!({"grace_s": 5})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let done = server.wait_terminal(run.id, WAIT).await;
    assert_eq!(done.state, RunState::Stopped);
    assert_eq!(done.termination, Some(Termination::StoppedGracefully));
    assert!(done.failure.is_none());
    let names = kinds(&server.events(run.id).await);
    assert!(names.contains(&"stop_requested".to_string()));
    assert!(names.contains(&"stop_forwarded".to_string()), "{names:?}");

    let (status, body) = server
        .post(&format!("/v1/runs/{}/stop", run.id), None)
        .await;
    assert_eq!(status, 202);
    assert_eq!(body["state"], "stopped");
    let (status, body) = server
        .post(&format!("/v1/runs/{}/kill", run.id), None)
        .await;
    assert_eq!(status, 202);
    assert_eq!(body["state"], "stopped");
    server.stop().await;
}

#[actix_rt::test]
async fn stop_past_grace_kills_the_sandbox() {
    let server = TestServer::start(workspace()).await;
    let run = server.start_run("stubborn", "never stop").await;
    server.wait_state(run.id, RunState::Running, WAIT).await;
    wait_for_event(&server, run.id, "agent_message").await;
    let agent_pid = agent_pid(&server, run.id);
    let (status, _) = server
        .post(
            &format!("/v1/runs/{}/stop", run.id),
            Some(json!({"grace_s": 1})),
        )
        .await;
    assert_eq!(status, 202);
    let done = server.wait_terminal(run.id, WAIT).await;
    assert_eq!(done.state, RunState::Killed);
    assert_eq!(done.termination, Some(Termination::KilledAfterGrace));
    let shim_pid: u32 = done.sandbox_id.unwrap().parse().unwrap();
    assert!(!pid_alive(shim_pid), "shim still running");
    assert!(!pid_alive(agent_pid), "agent still running");
    server.stop().await;
}

#[actix_rt::test]
async fn kill_is_immediate() {
    let server = TestServer::start(workspace()).await;
    let run = server.start_run("stubborn", "never stop").await;
    server.wait_state(run.id, RunState::Running, WAIT).await;
    wait_for_event(&server, run.id, "agent_message").await;
    let agent_pid = agent_pid(&server, run.id);
    let (status, _) = server
        .post(&format!("/v1/runs/{}/kill", run.id), None)
        .await;
    assert_eq!(status, 202);
    let done = server.wait_terminal(run.id, Duration::from_secs(5)).await;
    assert_eq!(done.state, RunState::Killed);
    assert_eq!(done.termination, Some(Termination::Killed));
    assert!(!pid_alive(agent_pid), "agent still running");
    // The run's directory is removed with its sandbox.
    assert!(!server.work_root.path().join(run.id.to_string()).exists());
    server.stop().await;
}

async fn wait_for_event(server: &TestServer, id: uuid::Uuid, name: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if kinds(&server.events(id).await).iter().any(|k| k == name) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no {name} event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn agent_pid(server: &TestServer, id: uuid::Uuid) -> u32 {
    let path = server
        .work_root
        .path()
        .join(id.to_string())
        .join("work/agent.pid");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .expect("agent pid")
}

async fn ws_connect(
    server: &TestServer,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = server
        .url("/v1/sandbox/connect")
        .replace("http://", "ws://");
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connect")
        .0
}

fn hello(run_id: &str) -> Message {
    Message::Text(
        json!({"type":"hello","run_id":run_id,"protocol_version":1,"host":"test"}).to_string(),
    )
}

/// Next close frame's code and reason (skipping other frames).
async fn close_of(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> (u16, String) {
    let deadline = Duration::from_secs(10);
    tokio::time::timeout(deadline, async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(Some(frame))) => {
                    return (u16::from(frame.code), frame.reason.to_string())
                }
                Ok(Message::Close(None)) => return (1005, String::new()),
                Ok(_) => continue,
                Err(e) => panic!("socket error before close: {e}"),
            }
        }
        panic!("socket ended without a close frame");
    })
    .await
    .expect("close frame in time")
}

#[actix_rt::test]
async fn tokens_are_refused_for_another_run_and_after_the_end() {
    let server = TestServer::start(workspace()).await;
    let a = server.start_run("stubborn", "a").await;
    let b = server.start_run("stubborn", "b").await;
    let a = server.wait_state(a.id, RunState::Running, WAIT).await;
    server.wait_state(b.id, RunState::Running, WAIT).await;
    let token_a = server.token_of(&a);

    // A's token presented for B.
    let mut ws = ws_connect(&server, &token_a).await;
    ws.send(hello(&b.id.to_string())).await.unwrap();
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 1008);
    assert!(reason.contains(&b.id.to_string()), "{reason}");

    // No token at all.
    let mut ws = ws_connect(&server, "").await;
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("no run token"), "{reason}");

    // The bundle is served to its own run's token only.
    let agent_dir = server.workspace.path().join(".codebolt/agents/stubborn");
    let bundle = codebolt::bundle::Bundle::build(&agent_dir).expect("bundle");
    let fetch = |run: uuid::Uuid, token: String| {
        let url = server.url(&format!("/v1/sandbox/runs/{run}/bundle/{}", bundle.sha256));
        let http = server.http.clone();
        async move {
            let res = http.get(url).bearer_auth(token).send().await.unwrap();
            (res.status().as_u16(), res.bytes().await.unwrap())
        }
    };
    let (status, bytes) = fetch(a.id, token_a.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(bytes, bundle.bytes);
    let (status, body) = fetch(b.id, token_a.clone()).await;
    assert_eq!(status, 403, "{body:?}");
    let (status, _) = fetch(a.id, "not-a-token".into()).await;
    assert_eq!(status, 403);

    // After the end.
    server.post(&format!("/v1/runs/{}/kill", a.id), None).await;
    server.wait_terminal(a.id, WAIT).await;
    let mut ws = ws_connect(&server, &token_a).await;
    ws.send(hello(&a.id.to_string())).await.unwrap();
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("ended"), "{reason}");
    server.post(&format!("/v1/runs/{}/kill", b.id), None).await;
    server.stop().await;
}

/// A server whose sandboxes call back through a proxy the test can cut.
async fn server_behind_proxy(lost_after: Duration) -> (TestServer, Proxy) {
    let upstream = Arc::new(Mutex::new(None));
    let proxy = Proxy::start(upstream.clone()).await;
    let mut timeouts = common::fast_timeouts();
    timeouts.lost_after = lost_after;
    let server = TestServer::start_with(
        workspace(),
        ServerSetup {
            timeouts,
            public_url: Some(format!("http://{}", proxy.addr)),
            ..ServerSetup::default()
        },
    )
    .await;
    *upstream.lock().unwrap() = server.server.as_ref().map(|s| s.local_addr);
    (server, proxy)
}

#[actix_rt::test]
async fn a_dropped_connection_is_resumed_with_nothing_lost_or_duplicated() {
    let (server, proxy) = server_behind_proxy(Duration::from_secs(10)).await;
    let run = server.start_run("counting", "count").await;
    server.wait_state(run.id, RunState::Running, WAIT).await;
    // Cut every connection a few times while the agent talks.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        proxy.cut();
    }
    let done = server.wait_terminal(run.id, WAIT).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.failure);
    let events = server.events(run.id).await;
    let messages: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::AgentMessage { text } => Some(text.clone()),
            _ => None,
        })
        .collect();
    let expected: Vec<String> = (1..=40).map(|i| format!("m{i}")).collect();
    assert_eq!(messages, expected);
    let connects = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ShimConnected { resumed: true, .. }))
        .count();
    assert!(
        connects >= 1,
        "the shim never resumed: {:?}",
        kinds(&events)
    );
    let tool_results = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ToolResult { .. }))
        .count();
    assert_eq!(tool_results, 1);
    server.stop().await;
}

#[actix_rt::test]
async fn a_shim_that_loses_the_control_plane_stops_its_agent_and_the_run_is_connection_lost() {
    let (server, proxy) = server_behind_proxy(Duration::from_secs(2)).await;
    let run = server.start_run("stubborn", "never stop").await;
    server.wait_state(run.id, RunState::Running, WAIT).await;
    wait_for_event(&server, run.id, "agent_message").await;
    let agent = agent_pid(&server, run.id);
    let record = server.get(run.id).await;
    let shim: u32 = record.sandbox_id.unwrap().parse().unwrap();
    proxy.refuse(true);
    proxy.cut();
    // The shim gives up after lost_after (2 s) and takes its agent with it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while pid_alive(shim) || pid_alive(agent) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "shim or agent still running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = server.wait_terminal(run.id, WAIT).await;
    assert_eq!(done.state, RunState::Failed);
    let kind = done.failure.unwrap().kind;
    assert!(
        kind == FailureKind::ConnectionLost,
        "expected connection_lost, got {kind}"
    );
    server.stop().await;
}

#[actix_rt::test]
async fn malformed_and_oversized_frames_get_protocol_errors_not_a_crash() {
    let server = TestServer::start(workspace()).await;
    let run = server.start_run("stubborn", "x").await;
    let record = server.wait_state(run.id, RunState::Running, WAIT).await;
    let token = server.token_of(&record);
    // Freeze the real shim so this test's client can take over the run's connection.
    let shim = nix::unistd::Pid::from_raw(record.sandbox_id.unwrap().parse().unwrap());
    nix::sys::signal::kill(shim, nix::sys::signal::Signal::SIGSTOP).unwrap();

    let mut ws = ws_connect(&server, &token).await;
    ws.send(Message::Text(
        json!({"type":"hello","run_id":run.id.to_string(),"protocol_version":1,"host":"t","resume_from":0})
            .to_string(),
    ))
    .await
    .unwrap();
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["start_agent"], false);
    // This server exports no traces: the shim is told to record no spans.
    assert_eq!(welcome["trace_spans"], false);

    ws.send(Message::Text("{not json".into())).await.unwrap();
    let err = next_json(&mut ws).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "malformed_frame");
    assert_eq!(err["fatal"], false);
    ws.send(Message::Text(r#"{"type":"warp_drive"}"#.into()))
        .await
        .unwrap();
    let err = next_json(&mut ws).await;
    assert!(
        err["message"].as_str().unwrap().contains("warp_drive"),
        "{err}"
    );

    // The connection still works: a heartbeat is accepted, a sequenced frame acked.
    let last = welcome["last_acked"].as_u64().unwrap();
    ws.send(Message::Text(
        json!({"type":"log","seq":last + 1,"stream":"stdout","line":"from the test"}).to_string(),
    ))
    .await
    .unwrap();
    // Alone, the ack goes out once nothing else took it along.
    let ack = next_json(&mut ws).await;
    assert_eq!(ack, json!({"type":"ack","seq":last + 1}));
    // A tool call gets its result and its ack (which rides along with the result when it is
    // ready first, or follows it).
    ws.send(Message::Text(
        json!({"type":"tool_call","seq":last + 2,"call_id":"c1","tool":"fs.list_dir","args":{"path":"."}})
            .to_string(),
    ))
    .await
    .unwrap();
    let (first, second) = (next_json(&mut ws).await, next_json(&mut ws).await);
    let (ack, result) = if first["type"] == "ack" {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(ack, json!({"type":"ack","seq":last + 2}));
    assert_eq!(result["type"], "tool_result", "{result}");
    assert_eq!(result["call_id"], "c1", "{result}");
    assert_eq!(result["ok"], true, "{result}");

    // A frame over the limit closes the connection with 1009.
    let big = "x".repeat(agent_shim::protocol::MAX_FRAME_BYTES + 10);
    ws.send(Message::Text(big)).await.unwrap();
    let (code, reason) = close_of(&mut ws).await;
    assert_eq!(code, 1009, "{reason}");

    // The server still serves the run; kill it and release the shim.
    assert_eq!(server.get(run.id).await.state, RunState::Running);
    server
        .post(&format!("/v1/runs/{}/kill", run.id), None)
        .await;
    nix::sys::signal::kill(shim, nix::sys::signal::Signal::SIGCONT).ok();
    let done = server.wait_terminal(run.id, WAIT).await;
    assert_eq!(done.state, RunState::Killed);
    assert!(server
        .logs(run.id, "agent")
        .await
        .contains(&"from the test".to_string()));
    server.stop().await;
}

async fn next_json(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("frame in time")
}

#[actix_rt::test]
async fn a_retried_create_returns_the_same_run_and_one_sandbox() {
    let server = TestServer::start(workspace()).await;
    let body = json!({"agent": "good", "task": "once"});
    let send = |key: &'static str| {
        let req = server
            .http
            .post(server.url("/v1/runs"))
            .header("Idempotency-Key", key)
            .json(&body);
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (first_status, first) = send("key-1").await;
    let (second_status, second) = send("key-1").await;
    assert_eq!(first_status, 201);
    assert_eq!(second_status, 200);
    assert_eq!(first["id"], second["id"]);
    // Same key, different request: refused.
    let res = server
        .http
        .post(server.url("/v1/runs"))
        .header("Idempotency-Key", "key-1")
        .json(&json!({"agent": "good", "task": "something else"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 409);

    // A client-chosen id works the same way.
    let id = uuid::Uuid::new_v4();
    let (s1, b1) = server
        .create(json!({"agent": "good", "task": "t", "id": id}))
        .await;
    let (s2, b2) = server
        .create(json!({"agent": "good", "task": "t", "id": id}))
        .await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(b1["id"], b2["id"]);

    let list: Value = server
        .http
        .get(server.url("/v1/runs?agent=good"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["runs"].as_array().unwrap().len(), 2, "{list}");
    for run in list["runs"].as_array().unwrap() {
        let id: uuid::Uuid = run["id"].as_str().unwrap().parse().unwrap();
        let done = server.wait_terminal(id, WAIT).await;
        assert_eq!(done.state, RunState::Succeeded);
        let sandboxes = kinds(&server.events(id).await)
            .iter()
            .filter(|k| *k == "sandbox_created")
            .count();
        assert_eq!(sandboxes, 1);
    }
    server.stop().await;
}

#[actix_rt::test]
async fn a_sandbox_that_never_calls_back_fails_unreachable_callback_with_a_hint() {
    // A "shim" that starts and never connects.
    let dir = tempfile::tempdir().unwrap();
    let silent = dir.path().join("silent-shim");
    std::fs::write(
        &silent,
        "#!/bin/sh\necho 'cannot reach anything' >&2\nexec sleep 60\n",
    )
    .unwrap();
    std::fs::set_permissions(&silent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut timeouts = common::fast_timeouts();
    timeouts.startup = Duration::from_secs(1);
    let server = TestServer::start_with(
        workspace(),
        ServerSetup {
            timeouts,
            extra_providers: format!(
                "  blackhole:\n    kind: local\n    shim_path: {}\n    work_root: {}\n",
                silent.display(),
                work.path().display()
            ),
            ..ServerSetup::default()
        },
    )
    .await;
    let (status, body) = server
        .create(json!({"agent": "good", "task": "t", "execution": "blackhole"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let id: uuid::Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let done = server.wait_terminal(id, WAIT).await;
    assert_eq!(done.state, RunState::Failed);
    let failure = done.failure.unwrap();
    assert_eq!(failure.kind, FailureKind::UnreachableCallback);
    assert!(failure.hint.contains("callback URL"), "{}", failure.hint);
    let evidence = done.evidence.unwrap();
    assert!(
        evidence
            .provider_logs
            .iter()
            .any(|l| l.contains("cannot reach anything")),
        "{evidence:?}"
    );
    // The sandbox was removed.
    let pid: u32 = done.sandbox_id.unwrap().parse().unwrap();
    assert!(!pid_alive(pid));
    server.stop().await;
}

#[actix_rt::test]
async fn bad_requests_get_clear_errors() {
    let server = TestServer::start(workspace()).await;
    let cases = [
        (json!({"agent": "good"}), 400, "task"),
        (
            json!({"agent": "good", "task": "t", "colour": "red"}),
            400,
            "colour",
        ),
        (json!({"agent": "nobody", "task": "t"}), 422, "nobody"),
        (json!({"agent": "../etc", "task": "t"}), 400, "agent"),
        (
            json!({"agent": "good", "task": "t", "execution": "mars"}),
            422,
            "mars",
        ),
        (
            json!({"agent": "good", "task": "t", "resources": {"cpu": 0}}),
            400,
            "resources.cpu",
        ),
        (
            json!({"agent": "good", "task": "t", "resources": {"disk": 1}}),
            400,
            "disk",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, err) = server.create(body.clone()).await;
        assert_eq!(got, status, "{body} → {err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
        assert!(err["error"]["code"].is_string());
    }
    let res = server
        .http
        .get(server.url(&format!("/v1/runs/{}", uuid::Uuid::new_v4())))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = server
        .http
        .get(server.url("/v1/runs/not-a-uuid"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = server
        .http
        .get(server.url("/v1/runs?state=bogus"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let (status, _) = server
        .post(&format!("/v1/runs/{}/stop", uuid::Uuid::new_v4()), None)
        .await;
    assert_eq!(status, 404);

    let doc: Value = server
        .http
        .get(server.url("/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/v1/runs"]["post"].is_object());
    assert!(doc["components"]["schemas"]["RunRecord"].is_object());
    let providers: Value = server
        .http
        .get(server.url("/v1/providers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(providers["providers"][0]["name"], "local");
    assert_eq!(providers["providers"][0]["healthy"], true);
    server.stop().await;
}
