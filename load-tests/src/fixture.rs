//! What a scenario runs against: a temporary workspace with agents, and the real control plane
//! started in-process on its own thread, with the `local` provider pointing at the agent-shim.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use actors::model::{RunEvent, RunRecord};
use actors::run::RunTimeouts;
use anyhow::{bail, ensure, Context};
use codebolt::server::ServerOptions;
use codebolt::telemetry::TelemetrySettings;
use serde_json::json;

/// A binary built next to this one (`target/release/agent-shim`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("path of the load-tests binary")?;
    let path = exe
        .parent()
        .context("directory of the load-tests binary")?
        .join(name);
    ensure!(
        path.is_file(),
        "{} not found: build it first (`cargo build --release -p load-tests -p agent-shim -p codebolt-control-plane`) or pass its path",
        path.display()
    );
    Ok(path)
}

/// The agent-shim to start: `given`, else the one next to this binary; as an absolute path, since
/// the provider starts it from the sandbox's directory.
pub fn shim_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None => sibling_binary("agent-shim")?,
    };
    path.canonicalize()
        .with_context(|| format!("agent-shim at {}", path.display()))
}

/// `s` as one word of a POSIX shell command line.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A temporary project workspace.
pub struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    /// A workspace whose `README.md` is `readme_bytes` long.
    pub fn new(readme_bytes: usize) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("codebolt-load-ws-")
            .tempdir()?;
        let line = "load-tests workspace: text the fs.read_file calls read back.\n";
        let readme: String = line.chars().cycle().take(readme_bytes).collect();
        std::fs::write(dir.path().join("README.md"), readme)?;
        Ok(Workspace { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Declares `.codebolt/agents/<name>/agent.yaml` with `command`.
    pub fn agent(&self, name: &str, command: &str) -> anyhow::Result<()> {
        let dir = self.path().join(".codebolt/agents").join(name);
        std::fs::create_dir_all(&dir)?;
        // A JSON string is a valid YAML double-quoted scalar.
        let yaml = format!("command: {}\n", serde_json::to_string(command)?);
        std::fs::write(dir.join("agent.yaml"), yaml)?;
        Ok(())
    }
}

/// One `local`-kind provider of the server's configuration.
pub struct LocalProvider {
    pub name: String,
    pub shim_path: PathBuf,
}

/// `codebolt::server::start` in its own actix system on its own thread, so the harness's client
/// never shares an event loop with the server's actors.
pub struct InProcessServer {
    pub base_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl InProcessServer {
    pub fn start(
        workspace: &Path,
        providers: &[LocalProvider],
        timeouts: RunTimeouts,
        workers: usize,
    ) -> anyhow::Result<Self> {
        Self::start_traced(workspace, providers, timeouts, workers, None)
    }

    /// As `start`, with `telemetry::init(telemetry)` (the process-wide subscriber, span and metric
    /// export) done first on the server's thread, as `codebolt server` does on its main thread.
    pub fn start_traced(
        workspace: &Path,
        providers: &[LocalProvider],
        timeouts: RunTimeouts,
        workers: usize,
        telemetry: Option<TelemetrySettings>,
    ) -> anyhow::Result<Self> {
        let config_dir = tempfile::Builder::new()
            .prefix("codebolt-load-cfg-")
            .tempdir()?;
        let work_root = tempfile::Builder::new()
            .prefix("codebolt-load-sandboxes-")
            .tempdir()?;
        let mut yaml = String::from("providers:\n");
        for p in providers {
            yaml.push_str(&format!(
                "  {}:\n    kind: local\n    shim_path: {}\n    work_root: {}\n",
                p.name,
                serde_json::to_string(&p.shim_path.display().to_string())?,
                serde_json::to_string(&work_root.path().join(&p.name).display().to_string())?,
            ));
        }
        let config = config_dir.path().join("codebolt.yaml");
        std::fs::write(&config, yaml)?;
        let options = ServerOptions {
            listen: Some("127.0.0.1:0".into()),
            config: Some(config),
            workspace: Some(workspace.to_path_buf()),
            env: Default::default(),
            run_timeouts: Some(timeouts),
            workers: Some(workers),
        };
        Self::launch_traced(options, vec![config_dir, work_root], telemetry)
    }

    /// Starts the server with `options` on its own thread; `dirs` live as long as it does.
    pub fn launch(options: ServerOptions, dirs: Vec<tempfile::TempDir>) -> anyhow::Result<Self> {
        Self::launch_traced(options, dirs, None)
    }

    /// As `launch`, with telemetry installed first when given; the server's shutdown then
    /// flushes the spans and metrics still buffered.
    pub fn launch_traced(
        options: ServerOptions,
        dirs: Vec<tempfile::TempDir>,
        telemetry: Option<TelemetrySettings>,
    ) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("codebolt-server".into())
            .spawn(move || {
                actix_rt::System::new().block_on(async move {
                    // In the runtime: the gRPC exporter's channel lives on it.
                    let telemetry = match telemetry.as_ref().map(codebolt::telemetry::init) {
                        None => None,
                        Some(Ok(telemetry)) => Some(telemetry),
                        Some(Err(err)) => {
                            let message = format!("telemetry: {err}");
                            // The receiver reports the error; nothing else to do here.
                            drop(ready_tx.send(Err(message.clone())));
                            bail!("server did not start: {message}");
                        }
                    };
                    let server = match codebolt::server::start(options).await {
                        Ok(server) => server,
                        Err(err) => {
                            let message = err.to_string();
                            // The receiver reports the error; nothing else to do here.
                            drop(ready_tx.send(Err(message.clone())));
                            bail!("server did not start: {message}");
                        }
                    };
                    drop(ready_tx.send(Ok(server.base_url.clone())));
                    // A dropped sender also means stop.
                    drop(stop_rx.await);
                    let stopped = server.stop().await.context("server stop");
                    if let Some(telemetry) = telemetry {
                        // Flushing blocks until the exporter is done: off the async thread.
                        actix_rt::task::spawn_blocking(move || telemetry.shutdown())
                            .await
                            .context("telemetry flush")?;
                    }
                    stopped
                })
            })?;
        let base_url = match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(url)) => url,
            Ok(Err(message)) => bail!("server did not start: {message}"),
            Err(err) => bail!("server did not start: {err}"),
        };
        Ok(InProcessServer {
            base_url,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dirs: dirs,
        })
    }

    /// Stops the server and waits for its thread.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            // Err: the server thread already ended; shutdown reports how.
            let _ = stop.send(());
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(res)) => res,
            Some(Err(_)) => bail!("server thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // Err: the server thread already ended; shutdown reports how.
            let _ = stop.send(());
        }
    }
}

/// Timeouts for load runs: the server defaults, with room for a loaded machine.
pub fn load_timeouts() -> RunTimeouts {
    RunTimeouts {
        startup: Duration::from_secs(120),
        idle: Duration::from_secs(600),
        ..RunTimeouts::default()
    }
}

/// The API calls the scenarios make.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        Ok(Api {
            http,
            base: base.to_string(),
        })
    }

    /// `POST /v1/runs`; the record the server answered with.
    pub async fn create(&self, body: serde_json::Value) -> anyhow::Result<RunRecord> {
        let res = self
            .http
            .post(format!("{}/v1/runs", self.base))
            .json(&body)
            .send()
            .await
            .context("POST /v1/runs")?;
        let status = res.status();
        let bytes = res.bytes().await.context("POST /v1/runs body")?;
        ensure!(
            status.as_u16() == 201,
            "POST /v1/runs answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
        serde_json::from_slice(&bytes).context("run record of POST /v1/runs")
    }

    pub async fn get(&self, id: &str) -> anyhow::Result<RunRecord> {
        let res = self
            .http
            .get(format!("{}/v1/runs/{id}", self.base))
            .send()
            .await
            .context("GET /v1/runs/{id}")?;
        ensure!(
            res.status().as_u16() == 200,
            "GET run {id}: {}",
            res.status()
        );
        res.json().await.context("run record")
    }

    /// Follows the run's events until its history closes, then returns its final record.
    pub async fn wait_end(&self, id: &str) -> anyhow::Result<RunRecord> {
        let res = self
            .http
            .get(format!("{}/v1/runs/{id}/events?follow=true", self.base))
            .send()
            .await
            .context("GET events")?;
        ensure!(
            res.status().as_u16() == 200,
            "events of {id}: {}",
            res.status()
        );
        res.bytes().await.context("events stream")?;
        let record = self.get(id).await?;
        ensure!(
            record.state.is_terminal(),
            "run {id}: event stream ended while the run is {}",
            record.state
        );
        Ok(record)
    }

    /// Reads the run's record every `every` until the run has ended, then returns it: waiting
    /// for the end without following the events, so no watcher is woken by each of them.
    pub async fn poll_end(
        &self,
        id: &str,
        every: std::time::Duration,
    ) -> anyhow::Result<RunRecord> {
        loop {
            let record = self.get(id).await?;
            if record.state.is_terminal() {
                return Ok(record);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// `GET /v1/runs/{id}/events`: the run's history so far (not following).
    pub async fn events(&self, id: &str) -> anyhow::Result<Vec<RunEvent>> {
        let res = self
            .http
            .get(format!("{}/v1/runs/{id}/events", self.base))
            .send()
            .await
            .context("GET events")?;
        ensure!(
            res.status().as_u16() == 200,
            "events of {id}: {}",
            res.status()
        );
        let text = res.text().await.context("events body")?;
        text.lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .map(|data| {
                serde_json::from_str(data).with_context(|| format!("event of {id}: {data}"))
            })
            .collect()
    }

    pub async fn kill(&self, id: &str) -> anyhow::Result<()> {
        let res = self
            .http
            .post(format!("{}/v1/runs/{id}/kill", self.base))
            .send()
            .await
            .context("POST kill")?;
        ensure!(res.status().as_u16() == 202, "kill {id}: {}", res.status());
        Ok(())
    }
}

/// Request body of a run of `agent`, optionally on a named provider.
pub fn run_request(agent: &str, execution: Option<&str>) -> serde_json::Value {
    match execution {
        Some(provider) => json!({"agent": agent, "task": "load test", "execution": provider}),
        None => json!({"agent": agent, "task": "load test"}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_survives_single_quotes() {
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
