//! End to end on the local provider: the real server in-process, real agent-shim processes, real
//! agents (POSIX sh scripts).

mod common;

use std::time::Duration;

use actors::model::{EventKind, FailureKind, RunState, Termination};
use common::proxy::Proxy;
use common::{kinds, pid_alive, ServerSetup, TestServer, Workspace};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

/// Reads the task, reads README.md, writes a file, reports, finishes.
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
        assert!(names.contains(&expected.to_string()), "missing {expected} in {names:?}");
    }
    assert_eq!(names.last().map(String::as_str), Some("state_changed"));
    let indices: Vec<u64> = events.iter().map(|e| e.index).collect();
    assert_eq!(indices, (1..=events.len() as u64).collect::<Vec<_>>());
    let results: Vec<(String, bool, Option<String>)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::ToolResult {
                tool, ok, error_code, ..
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
            ("fs.read_file".into(), false, Some("outside_workspace".into())),
        ]
    );

    let agent_logs = server.logs(run.id, "agent").await;
    assert!(agent_logs.contains(&"this line is not json".to_string()), "{agent_logs:?}");
    assert!(agent_logs.contains(&"to stderr".to_string()), "{agent_logs:?}");
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
        evidence.agent_logs.iter().any(|l| l.contains("something broke")),
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
    server
        .wait_for(run.id, |_| true, WAIT)
        .await;
    wait_for_event(&server, run.id, "agent_message").await;
    let (status, body) = server
        .post(&format!("/v1/runs/{}/stop", run.id), Some(json!({"grace_s": 5})))
        .await;
    assert_eq!(status, 202, "{body}");
    let done = server.wait_terminal(run.id, WAIT).await;
    assert_eq!(done.state, RunState::Stopped);
    assert_eq!(done.termination, Some(Termination::StoppedGracefully));
    assert!(done.failure.is_none());
    let names = kinds(&server.events(run.id).await);
    assert!(names.contains(&"stop_requested".to_string()));
    assert!(names.contains(&"stop_forwarded".to_string()), "{names:?}");

    let (status, body) = server.post(&format!("/v1/runs/{}/stop", run.id), None).await;
    assert_eq!(status, 202);
    assert_eq!(body["state"], "stopped");
    let (status, body) = server.post(&format!("/v1/runs/{}/kill", run.id), None).await;
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
        .post(&format!("/v1/runs/{}/stop", run.id), Some(json!({"grace_s": 1})))
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
    let (status, _) = server.post(&format!("/v1/runs/{}/kill", run.id), None).await;
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
    let url = server.url("/v1/sandbox/connect").replace("http://", "ws://");
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.expect("ws connect").0
}

fn hello(run_id: &str) -> Message {
    Message::Text(
        json!({"type":"hello","run_id":run_id,"protocol_version":1,"host":"test"}).to_string(),
    )
}

/// Next close frame's code and reason (skipping other frames).
async fn close_of(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
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
