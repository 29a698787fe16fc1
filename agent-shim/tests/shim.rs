//! The real `agent-shim` binary against a scripted fake control plane.
#![cfg(feature = "shim")]

mod common;

use std::time::{Duration, Instant};

use agent_shim::protocol::{
    AgentEventPayload, LogStream, ServerMessage, ShimMessage, CLOSE_POLICY_VIOLATION,
};
use common::*;
use serde_json::json;

const AGENT_OK: &str = r#"
read -r task
printf '%s\n' "$task" >&2
printf 'env task=%s token=%s run=%s tp=%s\n' "$CODEBOLT_TASK" "${CODEBOLT_RUN_TOKEN:-unset}" "$CODEBOLT_RUN_ID" "$TRACEPARENT" >&2
printf '{"type":"message","text":"hello"}\n'
printf '{"type":"tool_call","id":"c1","tool":"fs.read_file","args":{"path":"README.md"}}\n'
read -r result
printf 'got %s\n' "$result" >&2
printf 'not json\n'
printf '{"type":"done","result":"ok"}\n'
exit 0
"#;

/// Waits for the tool result, then finishes; loops on SIGTERM-free sleep otherwise.
const AGENT_SLEEPS: &str = r#"
read -r task
printf '{"type":"message","text":"ready"}\n'
while :; do sleep 0.1; done
"#;

const AGENT_TRAPS_TERM: &str = r#"
trap 'printf "{\"type\":\"message\",\"text\":\"got term\"}\n"; exit 143' TERM
read -r task
printf '{"type":"message","text":"ready"}\n'
while :; do sleep 0.1; done
"#;

async fn start(script: &str) -> (FakeControlPlane, ShimProcess, ServerConn) {
    start_welcomed(script, |welcome| welcome).await
}

/// As `start`, with the welcome changed by `welcome`.
async fn start_welcomed(
    script: &str,
    welcome: impl FnOnce(WelcomeBuilder) -> WelcomeBuilder,
) -> (FakeControlPlane, ShimProcess, ServerConn) {
    let mut cp = FakeControlPlane::start(bundle_with_script(script)).await;
    let shim = ShimProcess::spawn(&cp);
    let mut conn = cp.accept().await;
    let (resume_from, pending) = conn.recv_hello().await;
    assert_eq!(resume_from, None);
    assert!(pending.is_empty());
    conn.send(&welcome(WelcomeBuilder::new(cp.bundle_info())).build())
        .await;
    (cp, shim, conn)
}

/// The shim closes the connection normally and exits 0.
async fn expect_clean_exit(conn: &mut ServerConn, shim: &mut ShimProcess) {
    assert_eq!(conn.expect_close().await, Some(1000));
    assert_eq!(
        shim.wait(STEP).await.code(),
        Some(0),
        "stderr:\n{}",
        shim.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spans_are_sent_when_the_control_plane_exports_none() {
    let (_cp, mut shim, mut conn) = start_welcomed(AGENT_OK, WelcomeBuilder::without_spans).await;
    let mut ledger = Ledger::default();
    serve_until_exited(&mut conn, &mut ledger).await;
    expect_clean_exit(&mut conn, &mut shim).await;
    assert!(
        ledger
            .messages
            .values()
            .any(|m| matches!(m, ShimMessage::ToolCall { .. })),
        "the agent made its tool call"
    );
    assert!(conn.spans.is_empty(), "spans sent: {:?}", conn.spans);
}

/// Receives, records and acks messages until `until` matches one.
async fn recv_until(
    conn: &mut ServerConn,
    ledger: &mut Ledger,
    until: impl Fn(&ShimMessage) -> bool,
) -> ShimMessage {
    loop {
        let msg = conn.recv().await;
        ledger.record(&msg);
        conn.ack(msg.seq().unwrap()).await;
        if until(&msg) {
            return msg;
        }
    }
}

fn is_message(text: &'static str) -> impl Fn(&ShimMessage) -> bool {
    move |m| matches!(m, ShimMessage::AgentEvent { payload: AgentEventPayload::Message { text: t }, .. } if t == text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_run_relays_everything_and_exits_zero() {
    let (cp, mut shim, mut conn) = start(AGENT_OK).await;
    let mut ledger = Ledger::default();
    serve_until_exited(&mut conn, &mut ledger).await;
    // The shim's own spans (it was given a TRACEPARENT) came before its exit report.
    let names: Vec<&str> = conn.spans.iter().map(|s| s.name.as_str()).collect();
    for expected in ["shim.bundle.fetch", "shim.agent.start", "shim.tool_call"] {
        assert!(names.contains(&expected), "no {expected} span in {names:?}");
    }
    assert!(conn
        .spans
        .iter()
        .filter(|s| s.name == "shim.tool_call")
        .all(|s| s.attributes.get("outcome").map(String::as_str) == Some("ok")));
    assert_eq!(conn.expect_close().await, Some(1000));
    let status = shim.wait(STEP).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", shim.stderr());

    ledger.assert_contiguous();
    assert!(ledger.duplicates.is_empty());
    let pid = ledger.agent_pid().expect("agent_started");
    assert!(matches!(
        ledger.messages.get(&1),
        Some(ShimMessage::AgentEvent {
            payload: AgentEventPayload::AgentStarted { .. },
            ..
        })
    ));
    let pid_file = std::fs::read_to_string(shim.work_dir.path().join("agent.pid")).unwrap();
    assert_eq!(pid_file.trim(), pid.to_string());

    let events = ledger.events();
    assert!(events.contains(&&AgentEventPayload::Message {
        text: "hello".into()
    }));
    assert!(events.contains(&&AgentEventPayload::Done {
        result: json!("ok")
    }));
    let call = ledger.messages.values().find_map(|m| match m {
        ShimMessage::ToolCall {
            call_id,
            tool,
            args,
            ..
        } => Some((call_id, tool, args)),
        _ => None,
    });
    assert_eq!(
        call,
        Some((
            &"c1".to_owned(),
            &"fs.read_file".to_owned(),
            &json!({"path": "README.md"})
        ))
    );
    let logs = ledger.logs();
    assert!(logs.contains(&(
        LogStream::Stderr,
        r#"{"type":"task","run_id":"run-test","task":"do the thing"}"#
    )));
    assert!(logs.contains(&(
        LogStream::Stderr,
        "env task=do the thing token=unset run=run-test tp=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    )));
    assert!(logs.contains(&(
        LogStream::Stderr,
        r#"got {"type":"tool_result","id":"c1","ok":true,"result":{"content":"result of c1"}}"#
    )));
    assert!(logs.contains(&(LogStream::Stdout, "not json")));
    // Exited is the last message.
    assert!(matches!(
        ledger.messages.values().next_back(),
        Some(ShimMessage::Exited {
            code: Some(0),
            signal: None,
            ..
        })
    ));
    assert_eq!(
        *cp.bundle_auth.lock().unwrap(),
        vec![format!("Bearer {TOKEN}")]
    );
    assert!(
        !shim.stderr().contains(TOKEN),
        "the token leaked to the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_zero_agent_exit_is_reported() {
    let (_cp, mut shim, mut conn) = start("read -r task\necho oops >&2\nexit 7\n").await;
    let mut ledger = Ledger::default();
    serve_until_exited(&mut conn, &mut ledger).await;
    assert_eq!(ledger.exited(), Some((Some(7), None)));
    assert!(ledger.logs().contains(&(LogStream::Stderr, "oops")));
    assert_eq!(shim.wait(STEP).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_forwards_sigterm_to_the_agent() {
    let (_cp, mut shim, mut conn) = start(AGENT_TRAPS_TERM).await;
    let mut ledger = Ledger::default();
    recv_until(&mut conn, &mut ledger, is_message("ready")).await;
    conn.send(&ServerMessage::Stop { grace_s: 5 }).await;
    serve_until_exited(&mut conn, &mut ledger).await;
    let events = ledger.events();
    assert!(events.contains(&&AgentEventPayload::StopForwarded { grace_s: 5 }));
    assert!(events.contains(&&AgentEventPayload::Message {
        text: "got term".into()
    }));
    assert_eq!(ledger.exited(), Some((Some(143), None)));
    assert_eq!(shim.wait(STEP).await.code(), Some(0));
    ledger.assert_contiguous();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_shim_is_forwarded_and_the_shim_waits_for_the_agent() {
    let (_cp, mut shim, mut conn) = start(AGENT_TRAPS_TERM).await;
    let mut ledger = Ledger::default();
    recv_until(&mut conn, &mut ledger, is_message("ready")).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    serve_until_exited(&mut conn, &mut ledger).await;
    assert!(ledger.events().contains(&&AgentEventPayload::Message {
        text: "got term".into()
    }));
    assert!(ledger
        .logs()
        .iter()
        .any(|(s, l)| *s == LogStream::Shim && l.contains("SIGTERM")));
    assert_eq!(ledger.exited(), Some((Some(143), None)));
    assert_eq!(shim.wait(STEP).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_resumes_without_loss_or_duplicates() {
    let script = r#"
read -r task
printf '{"type":"message","text":"m1"}\n'
printf '{"type":"tool_call","id":"c1","tool":"fs.read_file","args":{"path":"a"}}\n'
read -r result
printf 'got %s\n' "$result" >&2
printf '{"type":"message","text":"m2"}\n'
printf '{"type":"done","result":null}\n'
"#;
    let (mut cp, mut shim, mut conn) = start(script).await;
    let mut ledger = Ledger::default();
    // First connection: ack only the first message, never answer the tool call, then vanish.
    let first = conn.recv().await;
    ledger.record(&first);
    conn.ack(1).await;
    loop {
        let msg = conn.recv().await;
        ledger.record(&msg);
        if matches!(msg, ShimMessage::ToolCall { .. }) {
            break;
        }
    }
    let highest_before = ledger.highest();
    assert!(highest_before >= 3);
    drop(conn);

    // Second connection: the shim lists the unanswered call; the server claims it persisted
    // up to 2, so the shim resends from 3 (which the server already saw: deduplicated).
    let mut conn = cp.accept().await;
    let (resume_from, pending) = conn.recv_hello().await;
    assert!(matches!(resume_from, Some(0) | Some(1)), "{resume_from:?}");
    assert_eq!(pending, vec!["c1".to_owned()]);
    conn.send(&WelcomeBuilder::new(cp.bundle_info()).resumed(2).build())
        .await;
    conn.send(&tool_result("c1")).await;
    serve_until_exited(&mut conn, &mut ledger).await;
    expect_clean_exit(&mut conn, &mut shim).await;

    ledger.assert_contiguous();
    let expected_dups: Vec<u64> = (3..=highest_before).collect();
    assert_eq!(ledger.duplicates, expected_dups);
    let events = ledger.events();
    assert!(events.contains(&&AgentEventPayload::Message { text: "m2".into() }));
    let results: Vec<_> = ledger
        .logs()
        .into_iter()
        .filter(|(_, l)| l.starts_with("got "))
        .collect();
    assert_eq!(
        results,
        vec![(
            LogStream::Stderr,
            r#"got {"type":"tool_result","id":"c1","ok":true,"result":{"content":"result of c1"}}"#
        )]
    );
    assert_eq!(ledger.exited(), Some((Some(0), None)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_control_plane_stops_the_agent_and_exits_3() {
    let mut cp = FakeControlPlane::start(bundle_with_script(AGENT_SLEEPS)).await;
    // The environment says 30 s; the welcome shortens it to 1 s.
    let mut shim = ShimProcess::spawn_with(
        &cp,
        ShimOptions {
            lost_after_s: 30,
            ..ShimOptions::default()
        },
    );
    let mut conn = cp.accept().await;
    conn.recv_hello().await;
    conn.send(
        &WelcomeBuilder::new(cp.bundle_info())
            .lost_after_ms(1000)
            .build(),
    )
    .await;
    let mut ledger = Ledger::default();
    recv_until(&mut conn, &mut ledger, is_message("ready")).await;
    let pid = ledger.agent_pid().unwrap();
    assert!(process_alive(pid));

    let gone = Instant::now();
    cp.go_away();
    drop(conn);
    let status = shim.wait(STEP).await;
    let took = gone.elapsed();
    assert_eq!(status.code(), Some(3), "stderr:\n{}", shim.stderr());
    assert!(
        took >= Duration::from_millis(900),
        "gave up too early: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "gave up too late: {took:?}");
    assert!(shim.stderr().contains("unreachable"), "{}", shim.stderr());
    assert_process_gone(pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_1008_stops_the_agent_and_exits_4() {
    let (_cp, mut shim, mut conn) = start(AGENT_SLEEPS).await;
    let mut ledger = Ledger::default();
    recv_until(&mut conn, &mut ledger, is_message("ready")).await;
    let pid = ledger.agent_pid().unwrap();
    conn.close_with(CLOSE_POLICY_VIOLATION, "token expired")
        .await;
    let status = shim.wait(STEP).await;
    assert_eq!(status.code(), Some(4), "stderr:\n{}", shim.stderr());
    assert!(shim.stderr().contains("token expired"), "{}", shim.stderr());
    assert_process_gone(pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_401_on_upgrade_exits_4_without_retrying() {
    let cp = FakeControlPlane::start(bundle_with_script(AGENT_SLEEPS)).await;
    let mut shim = ShimProcess::spawn_with(
        &cp,
        ShimOptions {
            token: "wrong-token".into(),
            ..ShimOptions::default()
        },
    );
    let status = shim.wait(STEP).await;
    assert_eq!(status.code(), Some(4), "stderr:\n{}", shim.stderr());
    assert!(shim.stderr().contains("401"), "{}", shim.stderr());
    assert!(!shim.stderr().contains("wrong-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_download_401_exits_4() {
    let mut cp =
        FakeControlPlane::start_with_bundle_token(bundle_with_script(AGENT_SLEEPS), "other").await;
    let mut shim = ShimProcess::spawn(&cp);
    let mut conn = cp.accept().await;
    conn.recv_hello().await;
    conn.send(&WelcomeBuilder::new(cp.bundle_info()).build())
        .await;
    let status = shim.wait(STEP).await;
    assert_eq!(status.code(), Some(4), "stderr:\n{}", shim.stderr());
    assert!(!shim.work_dir.path().join("agent.pid").exists());
    // The WebSocket is closed, not dropped.
    assert_eq!(conn.expect_close().await, Some(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha256_mismatch_is_reported_and_the_agent_never_starts() {
    let mut cp = FakeControlPlane::start(bundle_with_script(AGENT_SLEEPS)).await;
    let mut shim = ShimProcess::spawn(&cp);
    let mut conn = cp.accept().await;
    conn.recv_hello().await;
    let mut welcome = WelcomeBuilder::new(cp.bundle_info());
    welcome.bundle.sha256 = "0".repeat(64);
    conn.send(&welcome.build()).await;
    let mut ledger = Ledger::default();
    serve_until_exited(&mut conn, &mut ledger).await;
    assert_eq!(shim.wait(STEP).await.code(), Some(5));
    assert!(
        shim.stderr().contains("sha256 mismatch"),
        "{}",
        shim.stderr()
    );
    assert!(ledger
        .logs()
        .iter()
        .any(|(s, l)| *s == LogStream::Shim && l.contains("sha256 mismatch")));
    assert_eq!(ledger.exited(), Some((None, None)));
    assert!(ledger.agent_pid().is_none());
    assert!(!shim.work_dir.path().join("agent.sh").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_huge_lines_do_not_crash_the_shim() {
    let script = r#"
read -r task
head -c 5000000 /dev/zero | tr '\0' x
printf '\n'
read -r result
printf '{"type":"message","text":"still here"}\n'
"#;
    let (_cp, mut shim, mut conn) = start(script).await;
    conn.send_raw("{{ not json").await;
    conn.send_raw(r#"{"type":"bogus"}"#).await;
    conn.send(&ServerMessage::Error {
        code: "invalid_frame".into(),
        message: "test".into(),
        fatal: false,
    })
    .await;
    // A result nobody asked for is not delivered to the agent.
    conn.send(&tool_result("nobody")).await;
    let mut ledger = Ledger::default();
    let huge = recv_until(&mut conn, &mut ledger, |m| {
        matches!(
            m,
            ShimMessage::Log {
                stream: LogStream::Stdout,
                ..
            }
        )
    })
    .await;
    let ShimMessage::Log { line, .. } = huge else {
        unreachable!()
    };
    assert!(line.len() <= agent_shim::protocol::MAX_AGENT_LINE_BYTES);
    assert!(line.len() > 1_000_000);
    assert!(line.ends_with("[truncated]"));
    assert!(ledger
        .logs()
        .iter()
        .any(|(s, l)| *s == LogStream::Shim && l.contains("truncated")));
    // The agent still waits for a line (the stray result never reached it); stop it.
    conn.send(&ServerMessage::Stop { grace_s: 1 }).await;
    serve_until_exited(&mut conn, &mut ledger).await;
    assert_eq!(shim.wait(STEP).await.code(), Some(0));
    assert!(!ledger.events().contains(&&AgentEventPayload::Message {
        text: "still here".into()
    }));
    assert_eq!(ledger.exited(), Some((Some(143), None)));
    ledger.assert_contiguous();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_id_still_waiting_for_its_answer_is_refused_by_the_shim() {
    let script = r#"
read -r task
printf '{"type":"tool_call","id":"c1","tool":"fs.read_file","args":{"path":"a"}}\n'
printf '{"type":"tool_call","id":"c1","tool":"fs.list_dir","args":{"path":"."}}\n'
read -r first
case "$first" in *'"id":"c1"'*duplicate_call_id*) text=refused;; *) text="unexpected first: $first";; esac
printf '{"type":"message","text":"%s"}\n' "$text"
read -r second
case "$second" in *'"ok":true'*) text=answered;; *) text="unexpected second: $second";; esac
printf '{"type":"message","text":"%s"}\n' "$text"
"#;
    let (_cp, mut shim, mut conn) = start(script).await;
    let mut ledger = Ledger::default();
    let mut calls = Vec::new();
    loop {
        let msg = conn.recv().await;
        ledger.record(&msg);
        conn.ack(msg.seq().unwrap()).await;
        if let ShimMessage::ToolCall { call_id, tool, .. } = &msg {
            calls.push((call_id.clone(), tool.clone()));
        }
        if let ShimMessage::AgentEvent {
            payload: AgentEventPayload::Message { text },
            ..
        } = &msg
        {
            assert_eq!(text, "refused");
            break;
        }
    }
    // Only the first call reached the control plane; the second was answered by the shim.
    assert_eq!(calls, [("c1".to_string(), "fs.read_file".to_string())]);
    assert!(ledger
        .logs()
        .iter()
        .any(|(stream, line)| *stream == LogStream::Shim
            && line.contains("tool call c1 (fs.list_dir) refused")));
    // The first call still gets its own answer.
    conn.send(&tool_result("c1")).await;
    recv_until(&mut conn, &mut ledger, is_message("answered")).await;
    serve_until_exited(&mut conn, &mut ledger).await;
    assert_eq!(shim.wait(STEP).await.code(), Some(0));
    ledger.assert_contiguous();
}

#[tokio::test]
async fn missing_configuration_exits_2_naming_the_variable() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_agent-shim"))
        .env_clear()
        .env(agent_shim::protocol::env::RUN_ID, RUN_ID)
        .env(
            agent_shim::protocol::env::CALLBACK_URL,
            "http://127.0.0.1:1",
        )
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("CODEBOLT_RUN_TOKEN"), "{stderr}");
}
