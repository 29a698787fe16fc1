//! The Docker provider against a real engine, below the run actor: resource usage from the
//! engine's stats, listing by label, the container's output, removal, and an engine that is not
//! there. Needs the engine and `codebolt/agent-base:latest` (`./scripts/test` sets both up).

use std::collections::BTreeMap;
use std::time::Duration;

use actors::model::{Resources, RunId};
use actors::provider::docker::{CallbackRoute, DockerProvider, DockerSettings};
use actors::provider::{labels, Provider, ProviderError, SpawnRequest};
use futures_util::StreamExt;

fn require_engine() {
    let ok = std::process::Command::new("docker")
        .args(["image", "inspect", "codebolt/agent-base:latest"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "the Docker engine is unreachable or codebolt/agent-base:latest is missing: run ./scripts/test (it starts dockerd and runs deploy/build-images.sh)"
    );
}

fn request(run_id: RunId, cluster: &str) -> SpawnRequest {
    // A callback nobody answers: the shim keeps retrying, so the container stays up.
    let env = BTreeMap::from([
        ("CODEBOLT_RUN_ID".to_string(), run_id.to_string()),
        (
            "CODEBOLT_CALLBACK_URL".to_string(),
            "http://127.0.0.1:9".to_string(),
        ),
        (
            "CODEBOLT_RUN_TOKEN".to_string(),
            "not-a-real-token".to_string(),
        ),
        ("CODEBOLT_LOST_AFTER_S".to_string(), "120".to_string()),
    ]);
    SpawnRequest {
        span: tracing::Span::none(),
        run_id,
        agent: "probe".into(),
        image: None,
        resources: Resources {
            memory_mb: Some(64),
            cpu: Some(0.5),
            gpu_count: None,
        },
        env,
        labels: BTreeMap::from([
            (labels::RUN_ID.to_string(), run_id.to_string()),
            (labels::AGENT.to_string(), "probe".to_string()),
            (labels::CLUSTER.to_string(), cluster.to_string()),
        ]),
        progress: None,
    }
}

#[tokio::test]
async fn usage_listing_logs_and_removal_of_a_container() {
    require_engine();
    let mut settings = DockerSettings::new("docker");
    settings.callback = CallbackRoute::AsGiven;
    let provider = DockerProvider::new(settings);
    assert!(provider.health().await.healthy);
    let run_id = uuid::Uuid::new_v4();
    let cluster = format!("provider-test-{}", &run_id.simple().to_string()[..8]);
    let handle = provider
        .spawn(request(run_id, &cluster))
        .await
        .expect("spawn");
    assert!(handle.remote_host.contains(&format!("codebolt-{run_id}")));

    let selector = BTreeMap::from([(labels::CLUSTER.to_string(), cluster.clone())]);
    let listed = provider.list(&selector).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].handle.id, handle.id);
    assert_eq!(listed[0].labels[labels::RUN_ID], run_id.to_string());

    let usage = provider
        .usage(&handle)
        .await
        .expect("usage")
        .expect("stats");
    assert!(usage.memory_bytes.is_some_and(|m| m > 0), "{usage:?}");
    assert!(usage.cpu_pct.is_some(), "{usage:?}");

    // The shim's own output: it starts and tries to reach the (absent) control plane.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut lines = provider.logs(&handle, false).await.expect("logs");
        let mut seen = Vec::new();
        while let Some(line) = lines.next().await {
            seen.push(line.expect("log line"));
        }
        if seen.iter().any(|l| l.line.contains("agent-shim starting")) {
            assert!(seen
                .iter()
                .all(|l| l.stream == "stderr" || l.stream == "stdout"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no shim output: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    provider.kill(&handle).await.expect("kill");
    provider.kill(&handle).await.expect("kill is idempotent");
    assert!(provider.list(&selector).await.expect("list").is_empty());
    let exit = provider
        .wait(&handle)
        .await
        .expect("wait on a removed container");
    assert_eq!(exit.code, None, "a vanished container has no exit code");
    assert!(matches!(
        provider.logs(&handle, false).await.err(),
        Some(ProviderError::SandboxNotFound { .. })
    ));
}

#[tokio::test]
async fn an_absent_engine_is_unavailable_naming_the_socket() {
    let mut settings = DockerSettings::new("docker-down");
    settings.socket = "unix:///tmp/codebolt-absent-engine.sock".into();
    let provider = DockerProvider::new(settings);
    let health = provider.health().await;
    assert!(!health.healthy);
    assert!(health
        .message
        .unwrap_or_default()
        .contains("unix:///tmp/codebolt-absent-engine.sock"));
    match provider.spawn(request(uuid::Uuid::new_v4(), "x")).await {
        Err(ProviderError::Unavailable { provider, message }) => {
            assert_eq!(provider, "docker-down");
            assert!(message.contains("codebolt-absent-engine.sock"), "{message}");
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
}
