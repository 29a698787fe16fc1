//! End to end with `store: redis://…`: a run through a server whose run state lives in a real
//! `redis-server`, read back by a second store as another replica would; and what the API says
//! while Redis is away.

mod common;
#[path = "../../actors/tests/common/redis_server.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use actors::model::{LogSource, RunState};
use actors::store::redis::{RedisSettings, RedisStore};
use actors::store::RunStore;
use common::{kinds, parse_sse, ServerSetup, TestServer, Workspace};
use futures_util::StreamExt;
use redis_server::RedisServer;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

const AGENT: &str = r#"
read task
printf '%s\n' '{"type":"message","text":"starting"}'
printf '%s\n' '{"type":"tool_call","id":"c1","tool":"fs.read_file","args":{"path":"README.md"}}'
read result
case "$result" in *'"ok":true'*) ;; *) echo "bad result: $result" >&2; exit 9;; esac
echo "plain output"
printf '%s\n' '{"type":"done","result":"all good"}'
"#;

async fn status_of(server: &TestServer, path: &str) -> (u16, Value) {
    let res = server.http.get(server.url(path)).send().await.expect("GET");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[actix_rt::test]
async fn a_run_through_a_redis_backed_server_and_readiness_when_redis_goes() {
    let mut redis = RedisServer::start();
    let server = TestServer::start_with(
        Workspace::new().agent("good", AGENT),
        ServerSetup {
            extra_providers: format!("store: {}\n", redis.url()),
            ..ServerSetup::default()
        },
    )
    .await;
    assert_eq!(status_of(&server, "/readyz").await.0, 200);

    let run = server.start_run("good", "read the readme").await;
    let done = server.wait_terminal(run.id, WAIT).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.failure);
    assert_eq!(done.result, Some(json!("all good")));

    let events = server.events(run.id).await;
    let names = kinds(&events);
    for expected in ["shim_connected", "tool_call", "tool_result", "agent_done"] {
        assert!(
            names.iter().any(|n| n == expected),
            "no {expected}: {names:?}"
        );
    }
    assert_eq!(names.last().map(String::as_str), Some("state_changed"));
    let indices: Vec<u64> = events.iter().map(|e| e.index).collect();
    assert_eq!(indices, (1..=events.len() as u64).collect::<Vec<_>>());
    // Following a finished run replays its history and ends.
    let text = tokio::time::timeout(
        WAIT,
        server
            .http
            .get(server.url(&format!("/v1/runs/{}/events?follow=true", run.id)))
            .send()
            .await
            .expect("GET events")
            .text(),
    )
    .await
    .expect("the follow ends after the final event")
    .expect("events body");
    assert_eq!(parse_sse::<Value>(&text).len(), events.len());
    assert!(server
        .logs(run.id, "agent")
        .await
        .contains(&"plain output".to_string()));

    // Another replica of the cluster sees the same run, history and logs in Redis.
    let replica = RedisStore::open(&redis.url(), "default", RedisSettings::default()).unwrap();
    assert_eq!(replica.get_run(run.id).await.unwrap(), Some(done.clone()));
    let replayed: Vec<_> = replica
        .events(run.id, 0, true)
        .await
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
        .await;
    assert_eq!(replayed, events);
    let lines: Vec<String> = replica
        .logs(run.id, LogSource::Agent, 0, true)
        .await
        .unwrap()
        .map(|l| l.unwrap().line)
        .collect()
        .await;
    assert!(lines.contains(&"plain output".to_string()), "{lines:?}");

    // Redis goes away: not ready, and mutations fail closed.
    redis.kill();
    let started = Instant::now();
    let (status, body) = status_of(&server, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("redis at 127.0.0.1:"), "{message}");
    let (status, body) = server
        .create(json!({"agent": "good", "task": "while redis is down"}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an outage must show fast, took {:?}",
        started.elapsed()
    );

    // Back again: ready, and runs work.
    redis.restart();
    let deadline = Instant::now() + WAIT;
    while status_of(&server, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "not ready after redis returned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = server.start_run("good", "after the outage").await;
    let done = server.wait_terminal(again.id, WAIT).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.failure);
    server.stop().await;
}
