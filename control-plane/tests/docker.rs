//! End to end on the Docker provider: the real server in-process, a real Docker engine, the
//! images built by `deploy/build-images.sh` (`./scripts/test` starts the engine and builds them).
//!
//! Each test uses its own cluster id, so reconcilers of tests running side by side never touch
//! each other's containers.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use actors::model::{FailureKind, RunState, Termination};
use common::{kinds, ServerSetup, TestServer, Workspace};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const AGENT_IMAGE: &str = "codebolt/agent-base:latest";
const PLAIN_IMAGE: &str = "codebolt/busybox-plain:latest";

/// Tool calls served by the control plane, from inside a container.
const GOOD_AGENT: &str = r#"
read task
printf '%s\n' '{"type":"message","text":"starting"}'
printf '%s\n' '{"type":"tool_call","id":"c1","tool":"fs.read_file","args":{"path":"README.md"}}'
read result
case "$result" in *'"ok":true'*) ;; *) echo "bad result: $result" >&2; exit 9;; esac
printf '%s\n' '{"type":"tool_call","id":"c2","tool":"fs.write_file","args":{"path":"out/report.txt","content":"from a container\n"}}'
read result2
printf '%s\n' '{"type":"done","result":"all good"}'
"#;

/// Exits cleanly on SIGTERM.
const POLITE_AGENT: &str = r#"
trap 'echo "got TERM" >&2; exit 0' TERM
read task
printf '%s\n' '{"type":"message","text":"waiting"}'
while true; do sleep 0.1; done
"#;

/// Reports what it sees of its sandbox, then waits.
const PROBE_AGENT: &str = r##"
read task
if touch /probe 2>/dev/null; then root=rw; else root=ro; fi
if echo x > ./probe && sh -c 'printf "#!/bin/sh\necho ran\n" > ./s.sh && chmod +x ./s.sh && ./s.sh' >/dev/null; then work=rwx; else work=no; fi
printf '{"type":"message","text":"uid=%s rootfs=%s work=%s"}\n' "$(id -u)" "$root" "$work"
while true; do sleep 0.1; done
"##;

/// Allocates far more than its memory limit.
const HUNGRY_AGENT: &str = r#"
read task
printf '%s\n' '{"type":"message","text":"allocating"}'
echo "allocating 256 MiB" >&2
dd if=/dev/zero of=/dev/null bs=256M count=4
"#;

fn require_docker() {
    let info = std::process::Command::new("docker").arg("info").output();
    match info {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "the Docker engine is not reachable (`docker info` failed: {}); ./scripts/test starts it",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => panic!("the docker CLI is not installed ({err}); ./scripts/test installs it"),
    }
    for image in [AGENT_IMAGE, PLAIN_IMAGE] {
        let ok = std::process::Command::new("docker")
            .args(["image", "inspect", image])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "image {image} is missing: build it with deploy/build-images.sh (./scripts/test does)"
        );
    }
}

/// The statically linked shim built by `deploy/build-images.sh`.
fn static_shim() -> PathBuf {
    let debug = common::shim_path();
    let target = debug.parent().and_then(|d| d.parent()).expect("target dir");
    let shim = target.join("x86_64-unknown-linux-gnu/release/agent-shim");
    assert!(
        shim.is_file(),
        "static agent-shim not found at {}: run deploy/build-images.sh",
        shim.display()
    );
    shim
}

async fn docker(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .output()
        .await
        .expect("docker CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

/// Containers of a run, by label (running or not).
async fn containers_of(run_id: uuid::Uuid) -> Vec<String> {
    let filter = format!("label=codebolt.run-id={run_id}");
    let (ok, out) = docker(&["ps", "-aq", "--filter", &filter]).await;
    assert!(ok, "docker ps failed");
    out.lines().map(str::to_string).collect()
}

async fn assert_no_container_left(run_id: uuid::Uuid) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = containers_of(run_id).await;
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "containers left behind for run {run_id}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn workspace() -> Workspace {
    Workspace::new()
        .agent("good", GOOD_AGENT)
        .agent("polite", POLITE_AGENT)
        .agent("probe", PROBE_AGENT)
        .agent("hungry", HUNGRY_AGENT)
        .with_image_agent("foreign", PLAIN_IMAGE, GOOD_AGENT)
        .with_image_agent("missing", "127.0.0.1:1/codebolt/missing:latest", GOOD_AGENT)
}

trait ImageAgent {
    fn with_image_agent(self, name: &str, image: &str, script: &str) -> Self;
}

impl ImageAgent for Workspace {
    fn with_image_agent(self, name: &str, image: &str, script: &str) -> Self {
        let ws = self.agent(name, script);
        let manifest = ws
            .path()
            .join(".codebolt/agents")
            .join(name)
            .join("agent.yaml");
        std::fs::write(
            manifest,
            format!("command: sh ./agent.sh\nimage: {image}\n"),
        )
        .expect("manifest");
        ws
    }
}

fn cluster_id() -> String {
    format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn providers() -> String {
    format!(
        "  docker:\n    kind: docker\n    default_image: {AGENT_IMAGE}\n\
         \x20 docker-inject:\n    kind: docker\n    default_image: {PLAIN_IMAGE}\n    shim_path: {}\n\
         \x20 docker-none:\n    kind: docker\n    network: none\n\
         \x20 docker-down:\n    kind: docker\n    socket: unix:///tmp/codebolt-no-such-docker.sock\n",
        static_shim().display()
    )
}

fn setup(cluster: &str) -> ServerSetup {
    ServerSetup {
        extra_providers: providers(),
        extra_config: format!("cluster_id: {cluster}\nsandbox_listen: 0.0.0.0:0\n"),
        ..ServerSetup::default()
    }
}

async fn start(ws: Workspace) -> TestServer {
    require_docker();
    TestServer::start_with(ws, setup(&cluster_id())).await
}

async fn run_on(server: &TestServer, agent: &str, provider: &str, extra: Value) -> uuid::Uuid {
    let mut body = json!({"agent": agent, "task": "t", "execution": provider});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let (status, created) = server.create(body).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().parse().unwrap()
}

/// Waits until the run is running and its container is on record (the shim may call back before
/// the provider's spawn call returns).
async fn running_with_container(server: &TestServer, id: uuid::Uuid) -> actors::model::RunRecord {
    server
        .wait_for(
            id,
            |r| r.state == RunState::Running && r.sandbox_id.is_some(),
            WAIT,
        )
        .await
}

async fn inspect(container: &str) -> Value {
    let (ok, out) = docker(&["inspect", container]).await;
    assert!(ok, "docker inspect {container} failed");
    let list: Value = serde_json::from_str(&out).expect("inspect json");
    list[0].clone()
}

#[actix_rt::test]
async fn the_example_agent_succeeds_in_a_container_with_tools_served_by_the_control_plane() {
    require_docker();
    // The shipped example workspace, copied so its report lands in a temporary directory.
    let ws = Workspace::new();
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let copy = tokio::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", examples.display()))
        .arg(ws.path())
        .status()
        .await
        .expect("cp");
    assert!(copy.success());
    let server = TestServer::start_with(ws, setup(&cluster_id())).await;
    let id = run_on(
        &server,
        "explorer",
        "docker",
        json!({"task": "Find the TODO notes"}),
    )
    .await;
    let done = server.wait_terminal(id, WAIT).await;
    assert_eq!(
        done.state,
        RunState::Succeeded,
        "{:?} {:?}",
        done.failure,
        done.evidence
    );
    assert_eq!(done.provider, "docker");
    let host = done.remote_host.clone().unwrap_or_default();
    assert!(
        host.starts_with(&format!("container codebolt-{id} (")),
        "{host}"
    );
    assert!(host.contains("on docker engine"), "{host}");
    assert!(server.workspace.path().join("codebolt-report.md").is_file());
    let names = kinds(&server.events(id).await);
    for expected in [
        "sandbox_created",
        "shim_connected",
        "tool_call",
        "tool_result",
        "agent_exited",
    ] {
        assert!(
            names.contains(&expected.to_string()),
            "missing {expected} in {names:?}"
        );
    }
    let provider_logs = server.logs(id, "provider").await;
    assert!(
        provider_logs.iter().any(|l| l.contains("agent")),
        "the container's output is the provider log: {provider_logs:?}"
    );
    assert_no_container_left(id).await;
    server.stop().await;
}

#[actix_rt::test]
async fn a_foreign_image_runs_with_the_injected_shim() {
    let server = start(workspace()).await;
    let id = run_on(&server, "foreign", "docker-inject", json!({})).await;
    let done = server.wait_terminal(id, WAIT).await;
    assert_eq!(
        done.state,
        RunState::Succeeded,
        "{:?} {:?}",
        done.failure,
        done.evidence
    );
    let written = std::fs::read_to_string(server.workspace.path().join("out/report.txt")).unwrap();
    assert_eq!(written, "from a container\n");
    assert_no_container_left(id).await;
    server.stop().await;
}

#[actix_rt::test]
async fn containers_are_hardened_labelled_and_limited() {
    let server = start(workspace()).await;
    let id = run_on(
        &server,
        "probe",
        "docker",
        json!({"resources": {"memory_mb": 96, "cpu": 0.5}}),
    )
    .await;
    let running = running_with_container(&server, id).await;
    let container = running.sandbox_id.clone().expect("container id");
    let c = inspect(&container).await;
    let host = &c["HostConfig"];
    assert_eq!(host["CapDrop"], json!(["ALL"]));
    assert!(host["CapAdd"].is_null() || host["CapAdd"] == json!([]));
    assert_eq!(host["Privileged"], json!(false));
    assert_eq!(host["ReadonlyRootfs"], json!(true));
    assert_eq!(host["PidsLimit"], json!(512));
    assert_eq!(host["Memory"], json!(96 * 1024 * 1024));
    assert_eq!(host["NanoCpus"], json!(500_000_000));
    assert!(
        host["SecurityOpt"]
            .as_array()
            .is_some_and(|o| o.iter().any(|v| v
                .as_str()
                .is_some_and(|s| s.starts_with("no-new-privileges")))),
        "{}",
        host["SecurityOpt"]
    );
    assert_eq!(
        host["AutoRemove"],
        json!(false),
        "the provider removes, after reading the exit"
    );
    let tmpfs = host["Tmpfs"]["/codebolt/work"].as_str().unwrap_or_default();
    assert!(!tmpfs.contains("noexec"), "{tmpfs}");
    assert_eq!(c["Config"]["User"], json!("65534:65534"));
    let mounts = c["Mounts"].as_array().cloned().unwrap_or_default();
    assert!(
        !mounts.iter().any(|m| m["Source"]
            .as_str()
            .unwrap_or_default()
            .contains("docker.sock")),
        "{mounts:?}"
    );
    assert!(host["Binds"].is_null() || !host["Binds"].to_string().contains("docker.sock"));
    let labels = &c["Config"]["Labels"];
    assert_eq!(labels["codebolt.run-id"], json!(id.to_string()));
    assert_eq!(labels["codebolt.agent"], json!("probe"));
    assert!(labels["codebolt.cluster-id"]
        .as_str()
        .is_some_and(|c| c.starts_with("test-")));
    let env: Vec<String> = serde_json::from_value(c["Config"]["Env"].clone()).unwrap();
    for var in [
        "CODEBOLT_RUN_ID=",
        "CODEBOLT_CALLBACK_URL=http://",
        "CODEBOLT_RUN_TOKEN=",
        "TRACEPARENT=",
    ] {
        assert!(env.iter().any(|e| e.starts_with(var)), "{var} missing");
    }
    // And from the inside: nobody, read-only root, writable and executable work dir.
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let events = server.events(id).await;
        let found = events.iter().find_map(|e| match &e.kind {
            actors::model::EventKind::AgentMessage { text } if text.starts_with("uid=") => {
                Some(text.clone())
            }
            _ => None,
        });
        if let Some(text) = found {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "no probe report");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(text, "uid=65534 rootfs=ro work=rwx");
    let (status, _) = server.post(&format!("/v1/runs/{id}/kill"), None).await;
    assert_eq!(status, 202);
    server.wait_terminal(id, WAIT).await;
    assert_no_container_left(id).await;
    server.stop().await;
}

#[actix_rt::test]
async fn stop_with_grace_ends_stopped_and_removes_the_container() {
    let server = start(workspace()).await;
    let id = run_on(&server, "polite", "docker", json!({})).await;
    server.wait_state(id, RunState::Running, WAIT).await;
    let (status, _) = server
        .post(&format!("/v1/runs/{id}/stop"), Some(json!({"grace_s": 10})))
        .await;
    assert_eq!(status, 202);
    let done = server.wait_terminal(id, WAIT).await;
    assert_eq!(done.state, RunState::Stopped, "{:?}", done.failure);
    assert_eq!(done.termination, Some(Termination::StoppedGracefully));
    let names = kinds(&server.events(id).await);
    assert!(names.contains(&"stop_forwarded".to_string()), "{names:?}");
    assert_no_container_left(id).await;
    server.stop().await;
}

#[actix_rt::test]
async fn kill_removes_the_container_at_once() {
    let server = start(workspace()).await;
    let id = run_on(&server, "polite", "docker", json!({})).await;
    let running = running_with_container(&server, id).await;
    assert_eq!(containers_of(id).await.len(), 1);
    assert!(running.sandbox_id.is_some());
    let (status, _) = server.post(&format!("/v1/runs/{id}/kill"), None).await;
    assert_eq!(status, 202);
    let done = server.wait_terminal(id, Duration::from_secs(10)).await;
    assert_eq!(done.state, RunState::Killed);
    assert_no_container_left(id).await;
    server.stop().await;
}

#[actix_rt::test]
async fn an_oom_killed_agent_fails_resource_exhausted() {
    let server = start(workspace()).await;
    let id = run_on(
        &server,
        "hungry",
        "docker",
        json!({"resources": {"memory_mb": 48}}),
    )
    .await;
    let done = server.wait_terminal(id, WAIT).await;
    assert_eq!(done.state, RunState::Failed);
    let failure = done.failure.expect("failure");
    assert_eq!(
        failure.kind,
        FailureKind::ResourceExhausted,
        "{}",
        failure.message
    );
    assert!(!failure.hint.is_empty());
    assert_no_container_left(id).await;
    server.stop().await;
}

#[actix_rt::test]
async fn a_missing_image_fails_image_pull_failed_with_pull_events() {
    let server = start(workspace()).await;
    let id = run_on(&server, "missing", "docker", json!({})).await;
    let done = server.wait_terminal(id, WAIT).await;
    assert_eq!(done.state, RunState::Failed);
    let failure = done.failure.expect("failure");
    assert_eq!(
        failure.kind,
        FailureKind::ImagePullFailed,
        "{}",
        failure.message
    );
    assert!(
        failure.message.contains("127.0.0.1:1/codebolt/missing"),
        "{}",
        failure.message
    );
    let names = kinds(&server.events(id).await);
    assert!(names.contains(&"image_pull".to_string()), "{names:?}");
    assert_no_container_left(id).await;
    server.stop().await;
}

#[actix_rt::test]
async fn a_container_that_cannot_reach_the_callback_fails_unreachable_callback() {
    let server = start(workspace()).await;
    let id = run_on(&server, "good", "docker-none", json!({})).await;
    let done = server.wait_terminal(id, WAIT).await;
    assert_eq!(done.state, RunState::Failed);
    let failure = done.failure.expect("failure");
    assert_eq!(
        failure.kind,
        FailureKind::UnreachableCallback,
        "{}",
        failure.message
    );
    assert!(failure.hint.contains("callback"), "{}", failure.hint);
    assert_no_container_left(id).await;
    server.stop().await;
}

#[actix_rt::test]
async fn an_unreachable_engine_is_a_provider_error_naming_the_socket() {
    let server = start(workspace()).await;
    let id = run_on(&server, "good", "docker-down", json!({})).await;
    let done = server.wait_terminal(id, WAIT).await;
    let failure = done.failure.expect("failure");
    assert_eq!(failure.kind, FailureKind::ProviderError);
    assert!(
        failure
            .message
            .contains("unix:///tmp/codebolt-no-such-docker.sock"),
        "{}",
        failure.message
    );
    let providers: Value = server
        .http
        .get(server.url("/v1/providers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = providers
        .as_array()
        .cloned()
        .or_else(|| providers["providers"].as_array().cloned())
        .unwrap_or_default();
    let down = list
        .iter()
        .find(|p| p["name"] == "docker-down")
        .expect("listed");
    assert_eq!(down["healthy"], json!(false));
    assert!(down["message"]
        .as_str()
        .unwrap_or_default()
        .contains("codebolt-no-such-docker.sock"));
    server.stop().await;
}

#[actix_rt::test]
async fn a_vanished_container_fails_its_run() {
    let server = start(workspace()).await;
    let id = run_on(&server, "polite", "docker", json!({})).await;
    let running = running_with_container(&server, id).await;
    let container = running.sandbox_id.expect("container");
    let (ok, _) = docker(&["rm", "-f", &container]).await;
    assert!(ok);
    let done = server.wait_terminal(id, WAIT).await;
    assert_eq!(done.state, RunState::Failed);
    assert_eq!(
        done.failure.expect("failure").kind,
        FailureKind::SandboxVanished
    );
    server.stop().await;
}

#[actix_rt::test]
async fn the_reconciler_removes_an_orphan_after_a_restart() {
    require_docker();
    let cluster = cluster_id();
    let server = TestServer::start_with(workspace(), setup(&cluster)).await;
    let id = run_on(&server, "polite", "docker", json!({})).await;
    server.wait_state(id, RunState::Running, WAIT).await;
    assert_eq!(containers_of(id).await.len(), 1);
    server.stop().await;

    // A new control plane of the same cluster: its (in-memory) store does not know the run.
    let restarted = TestServer::start_with(workspace(), setup(&cluster)).await;
    assert_no_container_left(id).await;
    // The container goes during the pass; the counters are added up when the pass ends.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let counters = restarted
            .server
            .as_ref()
            .expect("running")
            .reconciler
            .send(actors::reconciler::GetCounters)
            .await
            .expect("reconciler");
        if counters.sandboxes_removed >= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{counters:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    restarted.stop().await;
}
