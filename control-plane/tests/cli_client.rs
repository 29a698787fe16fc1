//! The `codebolt` client verbs against a scripted fake of the HTTP API that speaks the real wire
//! format (JSON records, server-sent events) and fails the test on a request it did not expect.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use actors::model::{
    EventKind, Failure, FailureKind, LogLine, Resources, RunEvent, RunRecord, RunState, Usage,
};
use chrono::{TimeZone, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

const RUN_ID: Uuid = Uuid::from_u128(0xfeed);

#[derive(Default)]
struct Seen {
    /// `METHOD path?query` of every request, in order.
    requests: Vec<String>,
    create_body: Option<Value>,
    idempotency_key: Option<String>,
    authorization: Option<String>,
    event_connections: u32,
    unexpected: Vec<String>,
}

type State = web::Data<Arc<Mutex<Seen>>>;

fn record(state: RunState) -> RunRecord {
    let t0 = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap();
    RunRecord {
        id: RUN_ID,
        agent: "explorer".into(),
        task: "find TODO".into(),
        provider: "local".into(),
        state,
        remote_host: Some("localhost".into()),
        sandbox_id: Some("pid-42".into()),
        created_at: t0,
        state_times: BTreeMap::from([(RunState::Pending, t0)]),
        exit_code: None,
        failure: None,
        termination: None,
        resources: Resources::default(),
        usage: Usage::default(),
        cost_estimate: None,
        trace_id: "trace".into(),
        owner: "replica-1".into(),
        timeout_s: None,
        result: None,
        evidence: None,
        env_names: vec![],
    }
}

fn events() -> Vec<RunEvent> {
    let at = |s| Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, s).unwrap();
    let kinds = vec![
        EventKind::StateChanged {
            from: RunState::Starting,
            to: RunState::Running,
            failure: None,
        },
        EventKind::AgentMessage {
            text: "looking around".into(),
        },
        EventKind::ToolCall {
            call_id: "c1".into(),
            tool: "fs.list_dir".into(),
        },
        EventKind::ToolResult {
            call_id: "c1".into(),
            tool: "fs.list_dir".into(),
            ok: true,
            duration_ms: 3,
            error_code: None,
        },
        EventKind::StateChanged {
            from: RunState::Running,
            to: RunState::Failed,
            failure: Some(Failure::new(
                FailureKind::AgentError,
                "agent exited with code 7",
            )),
        },
    ];
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| RunEvent {
            index: i as u64 + 1,
            at: at(i as u32),
            kind,
        })
        .collect()
}

fn sse<T: serde::Serialize>(items: &[T]) -> HttpResponse {
    let mut body = String::from(": keep-alive\n\n");
    for item in items {
        body.push_str(&format!(
            "data: {}\n\n",
            serde_json::to_string(item).unwrap()
        ));
    }
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .body(body)
}

async fn handle(req: HttpRequest, body: web::Bytes, seen: State) -> HttpResponse {
    let path = req.path().to_string();
    let line = format!("{} {}?{}", req.method(), path, req.query_string());
    let mut seen = seen.lock().unwrap();
    seen.requests.push(line.clone());
    if let Some(auth) = req.headers().get("authorization") {
        seen.authorization = Some(auth.to_str().unwrap().to_string());
    }
    let run = format!("/v1/runs/{RUN_ID}");
    match (req.method().as_str(), path.as_str()) {
        ("POST", "/v1/runs") => {
            seen.create_body = Some(serde_json::from_slice(&body).unwrap());
            seen.idempotency_key = req
                .headers()
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_string());
            HttpResponse::Created().json(record(RunState::Pending))
        }
        ("GET", p) if p == format!("{run}/events") => {
            seen.event_connections += 1;
            let all = events();
            if seen.event_connections == 1 {
                // The first connection breaks after three events; the second replays everything.
                sse(&all[..3])
            } else {
                sse(&all)
            }
        }
        ("GET", p) if p == format!("{run}/logs") => {
            let at = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap();
            let lines: Vec<LogLine> = ["first line", "  second\tline"]
                .iter()
                .enumerate()
                .map(|(i, text)| LogLine {
                    index: i as u64,
                    at,
                    stream: "stdout".into(),
                    line: text.to_string(),
                })
                .collect();
            sse(&lines)
        }
        ("GET", p) if p == run => HttpResponse::Ok().json(record(RunState::Stopping)),
        ("POST", p) if p == format!("{run}/stop") => {
            assert_eq!(
                serde_json::from_slice::<Value>(&body).unwrap(),
                json!({"grace_s": 5})
            );
            HttpResponse::Accepted().json(record(RunState::Stopping))
        }
        ("GET", "/v1/runs") => {
            let query = req.query_string();
            if query.contains("cursor=page2") {
                let mut other = record(RunState::Succeeded);
                other.id = Uuid::from_u128(0xbeef);
                HttpResponse::Ok().json(json!({"runs": [other], "next_cursor": null}))
            } else {
                HttpResponse::Ok()
                    .json(json!({"runs": [record(RunState::Running)], "next_cursor": "page2"}))
            }
        }
        ("GET", "/v1/providers") => HttpResponse::Ok().json(json!({"providers": [{
            "name": "local", "kind": "local", "healthy": true, "message": null, "restarts": 0,
            "last_error": null, "active_runs": 1, "max_concurrent_runs": 8
        }]})),
        ("GET", p) if p.starts_with("/v1/runs/") => HttpResponse::NotFound()
            .json(json!({"error": {"code": "not_found", "message": "no such run"}})),
        _ => {
            seen.unexpected.push(line);
            HttpResponse::InternalServerError().finish()
        }
    }
}

struct Fake {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

impl Fake {
    fn start() -> Fake {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let data = web::Data::new(seen.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(data.clone())
                        .default_service(web::to(handle))
                })
                .workers(1)
                .bind(("127.0.0.1", 0))
                .unwrap();
                tx.send(server.addrs()[0]).unwrap();
                server.run().await.unwrap();
            });
        });
        Fake {
            addr: rx.recv().unwrap(),
            seen,
        }
    }

    fn codebolt(&self, args: &[&str]) -> Output {
        let output = Command::new(env!("CARGO_BIN_EXE_codebolt"))
            .args(args)
            .env("CODEBOLT_SERVER", format!("http://{}", self.addr))
            .env_remove("CODEBOLT_API_TOKEN")
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let unexpected = &self.seen.lock().unwrap().unexpected;
        assert!(unexpected.is_empty(), "unexpected requests: {unexpected:?}");
        output
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[test]
fn start_prints_the_id_then_follows_across_a_broken_stream() {
    let fake = Fake::start();
    let out = fake.codebolt(&[
        "agent",
        "start",
        "explorer",
        "--execution",
        "docker",
        "--task",
        "find TODO",
        "--memory-mb",
        "512",
        "--env",
        "A=1",
        "--idempotency-key",
        "k-1",
        "--api-token",
        "secret",
    ]);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], RUN_ID.to_string(), "{text}");
    // Each event once, in order, even though the server replayed the first three.
    let body: Vec<String> = lines[1..]
        .iter()
        .map(|l| match l.strip_prefix(' ') {
            Some(continuation) => continuation.trim().to_string(),
            None => l.split_once(' ').unwrap().1.to_string(),
        })
        .collect();
    assert_eq!(
        body,
        [
            "running",
            "agent: looking around",
            "tool fs.list_dir ok 3ms",
            "failed: agent_error: agent exited with code 7",
            &format!("hint: {}", FailureKind::AgentError.hint()),
        ],
        "{text}"
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("reconnecting"), "{}", stderr(&out));

    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen.event_connections, 2);
    assert_eq!(
        seen.create_body.as_ref().unwrap(),
        &json!({"agent": "explorer", "task": "find TODO", "execution": "docker",
                "resources": {"memory_mb": 512}, "env": {"A": "1"}})
    );
    assert_eq!(seen.idempotency_key.as_deref(), Some("k-1"));
    assert_eq!(seen.authorization.as_deref(), Some("Bearer secret"));
    assert!(seen
        .requests
        .iter()
        .any(|r| r.ends_with("/events?follow=true")));
}

#[test]
fn detach_prints_only_the_id() {
    let fake = Fake::start();
    let out = fake.codebolt(&["agent", "start", "explorer", "--task", "t", "--detach"]);
    assert_eq!(stdout(&out), format!("{RUN_ID}\n"));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(fake.seen.lock().unwrap().event_connections, 0);
}

#[test]
fn stop_posts_the_grace_period_and_prints_the_state() {
    let fake = Fake::start();
    let id = RUN_ID.to_string();
    let out = fake.codebolt(&["agent", "stop", &id, "--grace", "5"]);
    assert_eq!(
        stdout(&out),
        format!("{RUN_ID} stopping\n"),
        "{}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn logs_print_raw_lines() {
    let fake = Fake::start();
    let id = RUN_ID.to_string();
    let out = fake.codebolt(&["agent", "logs", &id, "--source", "provider"]);
    assert_eq!(stdout(&out), "first line\n  second\tline\n");
    assert_eq!(out.status.code(), Some(0));
    let seen = fake.seen.lock().unwrap();
    assert!(seen
        .requests
        .iter()
        .any(|r| r.ends_with("/logs?source=provider&follow=false")));
}

#[test]
fn list_follows_every_page() {
    let fake = Fake::start();
    let out = fake.codebolt(&["agent", "list", "--state", "running", "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let runs: Vec<RunRecord> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(runs.len(), 2);
    let seen = fake.seen.lock().unwrap();
    assert_eq!(
        seen.requests,
        [
            "GET /v1/runs?state=running",
            "GET /v1/runs?state=running&cursor=page2"
        ]
    );
}

#[test]
fn list_stops_at_the_limit() {
    let fake = Fake::start();
    let out = fake.codebolt(&["agent", "list", "--limit", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2, "{}", stdout(&out));
    assert_eq!(fake.seen.lock().unwrap().requests, ["GET /v1/runs?limit=1"]);
}

#[test]
fn show_and_providers_render() {
    let fake = Fake::start();
    let out = fake.codebolt(&["agent", "show", &RUN_ID.to_string()]);
    assert!(stdout(&out).contains("remote host:"), "{}", stdout(&out));
    assert_eq!(out.status.code(), Some(0));
    let out = fake.codebolt(&["providers", "list"]);
    assert!(
        stdout(&out).contains("local  local  healthy  1/8"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn api_errors_print_message_and_code() {
    let fake = Fake::start();
    let other = Uuid::from_u128(1).to_string();
    let out = fake.codebolt(&["agent", "show", &other]);
    assert_eq!(stderr(&out), "error: no such run (not_found)\n");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_unreachable_server_is_named() {
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_codebolt"))
        .args([
            "agent",
            "list",
            "--server",
            &format!("http://127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(err.contains(&format!("http://127.0.0.1:{port}")), "{err}");
    assert!(err.contains("codebolt server"), "{err}");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_codebolt"))
        .args(["agent", "start", "explorer"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
