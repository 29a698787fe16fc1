//! The `codebolt` binary against the real server: the example agent through `agent start`, and
//! the other verbs.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use actors::model::RunState;
use common::{TestServer, Workspace};
use serde_json::Value;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A workspace holding the shipped example (deploy/examples) plus a failing agent.
fn example_workspace() -> Workspace {
    let ws = Workspace::new();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    copy_dir(&examples, ws.path());
    ws.agent("failing", "read task\necho 'no luck' >&2\nexit 4\n")
}

async fn codebolt(server: &TestServer, args: &[&str]) -> Output {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_codebolt"))
            .args(args)
            .env("CODEBOLT_SERVER", &server.base)
            .env_remove("CODEBOLT_API_TOKEN")
            .output(),
    )
    .await
    .expect("codebolt finished in time")
    .expect("codebolt runs");
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[actix_rt::test]
async fn the_example_agent_runs_through_the_cli() {
    let server = TestServer::start(example_workspace()).await;
    let out = codebolt(
        &server,
        &[
            "agent",
            "start",
            "explorer",
            "--execution",
            "local",
            "--task",
            "Find the TODO notes",
        ],
    )
    .await;
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: uuid::Uuid = text
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .expect("run id first");
    assert!(text.contains("succeeded"), "{text}");
    assert!(text.contains("fs.search"), "{text}");
    let report = std::fs::read_to_string(server.workspace.path().join("codebolt-report.md"))
        .expect("the agent wrote its report");
    assert!(report.contains("TODO"), "{report}");

    let record = server.get(id).await;
    assert_eq!(record.state, RunState::Succeeded);
    let tool_calls = common::kinds(&server.events(id).await)
        .iter()
        .filter(|k| *k == "tool_call")
        .count();
    assert!(
        tool_calls >= 3,
        "the example calls several tools: {tool_calls}"
    );

    let out = codebolt(
        &server,
        &["agent", "show", &id.to_string(), "--output", "json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let shown: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(shown["state"], "succeeded");

    let out = codebolt(&server, &["agent", "list", "--output", "json"]).await;
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);

    let out = codebolt(
        &server,
        &["agent", "logs", &id.to_string(), "--source", "provider"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));

    let out = codebolt(&server, &["providers", "list"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("local"));
    server.stop().await;
}

#[actix_rt::test]
async fn exit_codes_follow_the_run_outcome() {
    let server = TestServer::start(example_workspace()).await;
    let out = codebolt(&server, &["agent", "start", "failing", "--task", "x"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("agent_error"), "{}", stdout(&out));

    let out = codebolt(&server, &["agent", "start", "nobody", "--task", "x"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nobody"));

    let out = codebolt(
        &server,
        &["agent", "kill", &uuid::Uuid::new_v4().to_string()],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    server.stop().await;
}

#[actix_rt::test]
async fn a_server_on_a_public_address_requires_api_tokens() {
    let workspace = Workspace::new();
    let err = codebolt::server::start(codebolt::server::ServerOptions {
        listen: Some("0.0.0.0:0".into()),
        workspace: Some(workspace.path().to_path_buf()),
        ..Default::default()
    })
    .await
    .err()
    .expect("refused");
    assert!(err.to_string().contains("requires API tokens"), "{err}");

    let server = codebolt::server::start(codebolt::server::ServerOptions {
        listen: Some("0.0.0.0:0".into()),
        workspace: Some(workspace.path().to_path_buf()),
        env: [(
            "CODEBOLT_API_TOKENS".to_string(),
            "s3cret-token-value".to_string(),
        )]
        .into(),
        ..Default::default()
    })
    .await
    .expect("starts with a token");
    let url = format!("http://127.0.0.1:{}/v1/runs", server.local_addr.port());
    let http = reqwest::Client::new();
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        http.get(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        http.get(&url)
            .bearer_auth("s3cret-token-value")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Health stays open for probes.
    let health = format!("http://127.0.0.1:{}/readyz", server.local_addr.port());
    assert_eq!(http.get(&health).send().await.unwrap().status(), 200);
    let metrics = format!("http://127.0.0.1:{}/metrics", server.local_addr.port());
    let text = http
        .get(&metrics)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("codebolt_provider_healthy{codebolt_provider=\"local\""),
        "{text}"
    );
    server.stop().await.unwrap();
}
