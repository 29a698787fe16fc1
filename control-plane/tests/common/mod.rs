//! Shared fixtures: a real server started in-process on a temporary workspace, real shim
//! processes through the local provider, and an HTTP client with helpers.
#![allow(dead_code)]

pub mod cluster;
pub mod otlp;
pub mod proxy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actors::model::{RunEvent, RunRecord, RunState};
use actors::run::RunTimeouts;
use codebolt::server::{RunningServer, ServerOptions};
use serde_json::{json, Value};

/// The agent-shim binary built next to this test binary.
pub fn shim_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let shim = dir.join("agent-shim");
    assert!(
        shim.is_file(),
        "agent-shim binary not found at {}: build it first with `cargo build -p agent-shim` (the README's test command does)",
        shim.display()
    );
    shim
}

/// Test timeouts: short, so each timeout test takes a second or two.
pub fn fast_timeouts() -> RunTimeouts {
    RunTimeouts {
        startup: Duration::from_secs(15),
        tool_call: Duration::from_secs(5),
        idle: Duration::from_secs(60),
        run_ttl: None,
        stop_grace: Duration::from_secs(2),
        lost_after: Duration::from_secs(3),
        heartbeat_interval: Duration::from_millis(300),
        token_max_lifetime: Duration::from_secs(600),
    }
}

/// A workspace with agents, built fluently.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("README.md"),
            "# test workspace\nhello TODO world\n",
        )
        .expect("write README");
        Workspace { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds `.codebolt/agents/<name>/` with `agent.sh` as its command.
    pub fn agent(self, name: &str, script: &str) -> Self {
        let agent_dir = self.dir.path().join(".codebolt/agents").join(name);
        std::fs::create_dir_all(&agent_dir).expect("agent dir");
        std::fs::write(agent_dir.join("agent.yaml"), "command: sh ./agent.sh\n").expect("manifest");
        std::fs::write(agent_dir.join("agent.sh"), script).expect("script");
        self
    }
}

pub struct TestServer {
    pub server: Option<RunningServer>,
    pub base: String,
    pub http: reqwest::Client,
    pub workspace: Workspace,
    pub work_root: tempfile::TempDir,
    _config_dir: tempfile::TempDir,
}

pub struct ServerSetup {
    pub timeouts: RunTimeouts,
    /// Extra YAML appended to the config file (more providers, public_url, …).
    pub extra_providers: String,
    pub public_url: Option<String>,
    /// Extra server-level YAML appended to the config file (cluster_id, sandbox_listen, …).
    pub extra_config: String,
}

impl Default for ServerSetup {
    fn default() -> Self {
        ServerSetup {
            timeouts: fast_timeouts(),
            extra_providers: String::new(),
            public_url: None,
            extra_config: String::new(),
        }
    }
}

impl TestServer {
    pub async fn start(workspace: Workspace) -> TestServer {
        Self::start_with(workspace, ServerSetup::default()).await
    }

    pub async fn start_with(workspace: Workspace, setup: ServerSetup) -> TestServer {
        let config_dir = tempfile::tempdir().expect("tempdir");
        let work_root = tempfile::tempdir().expect("tempdir");
        let mut yaml = format!(
            "providers:\n  local:\n    kind: local\n    shim_path: {}\n    work_root: {}\n{}",
            shim_path().display(),
            work_root.path().display(),
            setup.extra_providers
        );
        if let Some(url) = &setup.public_url {
            yaml.push_str(&format!("public_url: {url}\n"));
        }
        yaml.push_str(&setup.extra_config);
        let config = config_dir.path().join("codebolt.yaml");
        std::fs::write(&config, yaml).expect("config");
        let server = codebolt::server::start(ServerOptions {
            listen: Some("127.0.0.1:0".into()),
            config: Some(config),
            workspace: Some(workspace.path().to_path_buf()),
            env: Default::default(),
            run_timeouts: Some(setup.timeouts),
            workers: Some(2),
        })
        .await
        .expect("server starts");
        let base = server.base_url.clone();
        TestServer {
            server: Some(server),
            base,
            http: reqwest::Client::new(),
            workspace,
            work_root,
            _config_dir: config_dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn create(&self, body: Value) -> (u16, Value) {
        let res = self
            .http
            .post(self.url("/v1/runs"))
            .json(&body)
            .send()
            .await
            .expect("POST /v1/runs");
        let status = res.status().as_u16();
        (status, res.json().await.expect("json body"))
    }

    pub async fn start_run(&self, agent: &str, task: &str) -> RunRecord {
        let (status, body) = self.create(json!({"agent": agent, "task": task})).await;
        assert_eq!(status, 201, "create failed: {body}");
        serde_json::from_value(body).expect("run record")
    }

    pub async fn get(&self, id: uuid::Uuid) -> RunRecord {
        let res = self
            .http
            .get(self.url(&format!("/v1/runs/{id}")))
            .send()
            .await
            .expect("GET run");
        assert_eq!(res.status(), 200);
        res.json().await.expect("run record")
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.post(self.url(path));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.expect("POST");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Polls until the run is in `state` (or any terminal state when asked for one).
    pub async fn wait_for(
        &self,
        id: uuid::Uuid,
        pred: impl Fn(&RunRecord) -> bool,
        within: Duration,
    ) -> RunRecord {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let record = self.get(id).await;
            if pred(&record) {
                return record;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {id} did not reach the expected state within {within:?}; last: {} {:?}",
                record.state,
                record.failure
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_state(&self, id: uuid::Uuid, state: RunState, within: Duration) -> RunRecord {
        self.wait_for(id, |r| r.state == state, within).await
    }

    pub async fn wait_terminal(&self, id: uuid::Uuid, within: Duration) -> RunRecord {
        let record = self.wait_for(id, |r| r.state.is_terminal(), within).await;
        // The final event is written right after the record; let it land.
        self.events(id).await;
        record
    }

    /// The run's whole history (not following).
    pub async fn events(&self, id: uuid::Uuid) -> Vec<RunEvent> {
        let text = self
            .http
            .get(self.url(&format!("/v1/runs/{id}/events")))
            .send()
            .await
            .expect("GET events")
            .text()
            .await
            .expect("events body");
        parse_sse(&text)
    }

    pub async fn logs(&self, id: uuid::Uuid, source: &str) -> Vec<String> {
        let text = self
            .http
            .get(self.url(&format!("/v1/runs/{id}/logs?source={source}")))
            .send()
            .await
            .expect("GET logs")
            .text()
            .await
            .expect("logs body");
        parse_sse::<Value>(&text)
            .into_iter()
            .map(|l| l["line"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The run token the local provider handed to the run's shim, read from its environment.
    pub fn token_of(&self, record: &RunRecord) -> String {
        let pid = record.sandbox_id.as_ref().expect("sandbox id");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("shim environ");
        let vars: BTreeMap<String, String> = environ
            .split(|b| *b == 0)
            .filter_map(|kv| {
                let kv = String::from_utf8_lossy(kv);
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        vars.get("CODEBOLT_RUN_TOKEN")
            .expect("token in shim env")
            .clone()
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("server stops");
        }
    }
}

/// `data:` payloads of a server-sent event stream.
pub fn parse_sse<T: serde::de::DeserializeOwned>(text: &str) -> Vec<T> {
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).expect("event json"))
        .collect()
}

/// The kinds of a history, as their `event` names.
pub fn kinds(events: &[RunEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            serde_json::to_value(&e.kind).expect("event")["event"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
        .unwrap_or(false)
}
