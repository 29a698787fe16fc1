//! The Docker provider: one container per run, driven through the engine API with bollard.
//!
//! - The client speaks engine API 1.41 (Docker 20.10 and every later engine accept it).
//! - A spawn makes sure the image is present (pulling it when missing, with progress reported
//!   as spawn progress), creates the container labelled with the run id, agent and cluster id,
//!   hardened by default (see [`Hardening`]), and starts it.
//! - The shim either comes with the image (`codebolt/agent-base` has it as its entrypoint) or,
//!   when `shim_path` is set, a statically linked shim from the host is bind-mounted read-only at
//!   [`SHIM_MOUNT`] and used as the entrypoint, so any image with a POSIX shell can run agents.
//! - `auto_remove` is carried out by the provider, not by Docker's own `AutoRemove` flag: Docker
//!   deletes such a container before its exit state (`OOMKilled`) can be read. `wait` reads the
//!   exit state, then removes the container; `kill` removes it at once.
//! - The callback URL handed to the container is rewritten to one that reaches the control plane
//!   from inside the container's network ([`CallbackRoute`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::container::{
    Config, CreateContainerOptions, KillContainerOptions, ListContainersOptions, LogOutput,
    LogsOptions, RemoveContainerOptions, StartContainerOptions, Stats, StatsOptions,
    WaitContainerOptions,
};
use bollard::errors::Error as DockerError;
use bollard::image::CreateImageOptions;
use bollard::models::{DeviceRequest, HostConfig};
use bollard::network::InspectNetworkOptions;
use bollard::{ClientVersion, Docker};
use futures_util::{Stream, StreamExt};

use super::{
    LogStream, Provider, ProviderError, ProviderHealth, ProviderLogLine, SandboxExit,
    SandboxHandle, SandboxInfo, SpawnProgress, SpawnRequest,
};
use crate::model::{Resources, Usage};

/// Engine API version spoken by the client.
pub const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// Where an injected shim is mounted inside the container.
pub const SHIM_MOUNT: &str = "/.codebolt/agent-shim";

/// Seconds bollard waits for an engine response (headers; streams may last longer).
const CLIENT_TIMEOUT_S: u64 = 120;

/// How the callback URL a container receives is derived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackRoute {
    /// This URL, whatever the network (the provider's `callback_url`, or the server's explicit
    /// `public_url`).
    Fixed(String),
    /// `http://<gateway of the container's network>:<port>`: the control plane's sandbox
    /// listener seen from a bridge or user-defined network.
    NetworkGateway { port: u16 },
    /// The URL the run was given, unchanged (`host` network: loopback is the host's).
    AsGiven,
}

/// Hardening of every container; each setting can be relaxed per provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Hardening {
    pub read_only_rootfs: bool,
    pub no_new_privileges: bool,
    pub drop_capabilities: Vec<String>,
    pub cap_add: Vec<String>,
    /// Most processes in the container; unlimited when `None`.
    pub pids_limit: Option<i64>,
    /// `uid:gid` or a user name of the image; the image's user when `None`.
    pub user: Option<String>,
    /// Runs Docker's init as PID 1, which forwards signals and reaps orphans.
    pub init: bool,
}

impl Default for Hardening {
    fn default() -> Self {
        Hardening {
            read_only_rootfs: true,
            no_new_privileges: true,
            drop_capabilities: vec!["ALL".to_string()],
            cap_add: Vec::new(),
            pids_limit: Some(512),
            user: Some("65534:65534".to_string()),
            init: true,
        }
    }
}

/// Settings of one Docker provider (plain data; the server maps its configuration onto it).
#[derive(Debug, Clone, PartialEq)]
pub struct DockerSettings {
    /// The provider's name, for errors.
    pub provider: String,
    /// `unix:///var/run/docker.sock`, a socket path, or `tcp://host:port`.
    pub socket: String,
    pub default_image: String,
    /// `bridge`, `host`, `none`, or the name of a Docker network.
    pub network: String,
    /// Remove the container once its exit has been read.
    pub auto_remove: bool,
    pub callback: CallbackRoute,
    /// A statically linked shim on the engine's host to bind-mount as the entrypoint.
    pub shim_path: Option<PathBuf>,
    /// The writable work directory inside the container (a tmpfs; `CODEBOLT_WORK_DIR`).
    pub work_dir: String,
    pub work_dir_size_mb: u64,
    pub hardening: Hardening,
    /// Fewest time between two image pull progress reports.
    pub pull_progress_interval: Duration,
}

impl DockerSettings {
    /// Defaults for a provider named `provider`.
    pub fn new(provider: impl Into<String>) -> Self {
        DockerSettings {
            provider: provider.into(),
            socket: "unix:///var/run/docker.sock".to_string(),
            default_image: "codebolt/agent-base:latest".to_string(),
            network: "bridge".to_string(),
            auto_remove: true,
            callback: CallbackRoute::AsGiven,
            shim_path: None,
            work_dir: "/codebolt/work".to_string(),
            work_dir_size_mb: 512,
            hardening: Hardening::default(),
            pull_progress_interval: Duration::from_millis(250),
        }
    }
}

pub struct DockerProvider {
    settings: DockerSettings,
    client: Mutex<Option<Docker>>,
    /// Gateway address of each network, once looked up.
    gateways: Mutex<HashMap<String, String>>,
    engine_host: tokio::sync::OnceCell<String>,
}

/// Whether an error means the engine could not be reached at all.
fn is_transport(err: &DockerError) -> bool {
    matches!(
        err,
        DockerError::SocketNotFoundError(_)
            | DockerError::IOError { .. }
            | DockerError::HyperResponseError { .. }
            | DockerError::HyperLegacyError { .. }
            | DockerError::RequestTimeoutError
            | DockerError::HttpClientError { .. }
    )
}

fn status_of(err: &DockerError) -> Option<u16> {
    match err {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// `name[:tag]` split for a pull; an untagged reference means `latest` (the engine would pull
/// every tag otherwise). A digest reference is pulled as it is.
fn split_reference(image: &str) -> (String, String) {
    if image.contains('@') {
        return (image.to_string(), String::new());
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.rsplit_once(':') {
        Some((_, tag)) => {
            let repo = &image[..image.len() - tag.len() - 1];
            (repo.to_string(), tag.to_string())
        }
        None => (image.to_string(), "latest".to_string()),
    }
}

/// First host address of an IPv4 subnet (`172.17.0.0/16` → `172.17.0.1`).
fn first_host(subnet: &str) -> Option<String> {
    let (addr, len) = subnet.split_once('/')?;
    let addr: std::net::Ipv4Addr = addr.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    if len >= 31 {
        return None;
    }
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    let network = u32::from(addr) & mask;
    Some(std::net::Ipv4Addr::from(network + 1).to_string())
}

/// The container's resource limits: memory without swap, CPUs as nano-CPUs, GPUs as a device
/// request.
fn apply_resources(host: &mut HostConfig, resources: &Resources) {
    if let Some(mb) = resources.memory_mb {
        let bytes = i64::try_from(mb).unwrap_or(i64::MAX / (1024 * 1024)) * 1024 * 1024;
        host.memory = Some(bytes);
        host.memory_swap = Some(bytes);
    }
    if let Some(cpu) = resources.cpu {
        host.nano_cpus = Some((cpu * 1e9).round() as i64);
    }
    if let Some(gpus) = resources.gpu_count.filter(|n| *n > 0) {
        host.device_requests = Some(vec![DeviceRequest {
            driver: Some(String::new()),
            count: Some(i64::from(gpus)),
            capabilities: Some(vec![vec!["gpu".to_string()]]),
            ..DeviceRequest::default()
        }]);
    }
}

/// Everything of the container but its image, env and labels.
fn host_config(settings: &DockerSettings, resources: &Resources) -> HostConfig {
    let h = &settings.hardening;
    let mut tmpfs = HashMap::from([(
        settings.work_dir.clone(),
        // Agents run scripts from the work dir: no `noexec`.
        format!(
            "rw,exec,nosuid,nodev,size={}m,mode=1777",
            settings.work_dir_size_mb
        ),
    )]);
    if h.read_only_rootfs {
        tmpfs.insert(
            "/tmp".to_string(),
            "rw,nosuid,nodev,size=64m,mode=1777".to_string(),
        );
    }
    let mut host = HostConfig {
        network_mode: Some(settings.network.clone()),
        privileged: Some(false),
        readonly_rootfs: Some(h.read_only_rootfs),
        cap_drop: Some(h.drop_capabilities.clone()),
        cap_add: (!h.cap_add.is_empty()).then(|| h.cap_add.clone()),
        security_opt: h
            .no_new_privileges
            .then(|| vec!["no-new-privileges".to_string()]),
        pids_limit: h.pids_limit,
        init: Some(h.init),
        // Removal is the provider's job, after the exit state has been read.
        auto_remove: Some(false),
        tmpfs: Some(tmpfs),
        binds: settings
            .shim_path
            .as_ref()
            .map(|shim| vec![format!("{}:{SHIM_MOUNT}:ro", shim.display())]),
        ..HostConfig::default()
    };
    apply_resources(&mut host, resources);
    host
}

/// Usage from one stats sample (which carries the previous CPU reading too).
fn usage_of(stats: &Stats) -> Usage {
    let cpu = &stats.cpu_stats;
    let pre = &stats.precpu_stats;
    let cpu_delta = cpu.cpu_usage.total_usage as f64 - pre.cpu_usage.total_usage as f64;
    let system_delta = match (cpu.system_cpu_usage, pre.system_cpu_usage) {
        (Some(now), Some(then)) => now as f64 - then as f64,
        _ => 0.0,
    };
    let cpus = cpu
        .online_cpus
        .or_else(|| cpu.cpu_usage.percpu_usage.as_ref().map(|v| v.len() as u64))
        .unwrap_or(1) as f64;
    let cpu_pct = (cpu_delta >= 0.0 && system_delta > 0.0)
        .then(|| ((cpu_delta / system_delta) * cpus * 100.0 * 10.0).round() / 10.0);
    let cache = match &stats.memory_stats.stats {
        Some(bollard::container::MemoryStatsStats::V1(v1)) => v1.total_inactive_file,
        Some(bollard::container::MemoryStatsStats::V2(v2)) => v2.inactive_file,
        None => 0,
    };
    let memory_bytes = stats
        .memory_stats
        .usage
        .map(|usage| usage.saturating_sub(cache));
    Usage {
        cpu_pct,
        memory_bytes,
        peak_memory_bytes: stats.memory_stats.max_usage,
        reported_at: Some(chrono::Utc::now()),
    }
}

/// Splits the engine's output chunks into lines, per stream.
#[derive(Default)]
struct LineSplitter {
    partial: HashMap<&'static str, Vec<u8>>,
}

impl LineSplitter {
    fn push(&mut self, stream: &'static str, bytes: &[u8], out: &mut VecDeque<ProviderLogLine>) {
        let buf = self.partial.entry(stream).or_default();
        buf.extend_from_slice(bytes);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let rest = buf.split_off(pos + 1);
            let mut line = std::mem::replace(buf, rest);
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            out.push_back(ProviderLogLine {
                stream: stream.to_string(),
                line: String::from_utf8_lossy(&line).into_owned(),
            });
        }
    }

    fn flush(&mut self, out: &mut VecDeque<ProviderLogLine>) {
        for (stream, buf) in self.partial.drain() {
            if !buf.is_empty() {
                out.push_back(ProviderLogLine {
                    stream: stream.to_string(),
                    line: String::from_utf8_lossy(&buf).into_owned(),
                });
            }
        }
    }
}

fn connect(socket: &str) -> Result<Docker, DockerError> {
    if socket.starts_with("tcp://") || socket.starts_with("http://") {
        Docker::connect_with_http(socket, CLIENT_TIMEOUT_S, &API_VERSION)
    } else {
        Docker::connect_with_unix(socket, CLIENT_TIMEOUT_S, &API_VERSION)
    }
}

impl DockerProvider {
    /// A provider for `settings`; the engine is first contacted by the first operation.
    pub fn new(settings: DockerSettings) -> Self {
        DockerProvider {
            settings,
            client: Mutex::new(None),
            gateways: Mutex::new(HashMap::new()),
            engine_host: tokio::sync::OnceCell::new(),
        }
    }

    pub fn settings(&self) -> &DockerSettings {
        &self.settings
    }

    fn unreachable(&self, err: impl std::fmt::Display) -> ProviderError {
        ProviderError::Unavailable {
            provider: self.settings.provider.clone(),
            message: format!(
                "docker engine at {} is unreachable: {err}",
                self.settings.socket
            ),
        }
    }

    /// Maps an engine error: transport failures name the socket; a 404 is a missing sandbox.
    fn error(&self, operation: &'static str, id: &str, err: DockerError) -> ProviderError {
        if is_transport(&err) {
            return self.unreachable(err);
        }
        match err {
            DockerError::DockerResponseServerError {
                status_code: 404, ..
            } => ProviderError::SandboxNotFound { id: id.to_string() },
            DockerError::DockerResponseServerError {
                status_code,
                message,
            } => ProviderError::Operation {
                operation,
                message: format!("docker engine answered {status_code}: {message}"),
            },
            other => ProviderError::Operation {
                operation,
                message: other.to_string(),
            },
        }
    }

    fn client(&self) -> Result<Docker, ProviderError> {
        let mut guard = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(docker) = guard.as_ref() {
            return Ok(docker.clone());
        }
        let docker = connect(&self.settings.socket).map_err(|err| self.unreachable(err))?;
        *guard = Some(docker.clone());
        Ok(docker)
    }

    /// The engine's host name, for run details.
    async fn engine_host(&self, docker: &Docker) -> String {
        self.engine_host
            .get_or_init(|| async {
                match docker.info().await {
                    Ok(info) => info.name.unwrap_or_else(|| self.settings.socket.clone()),
                    Err(err) => {
                        tracing::debug!(error = %err, "docker info unavailable");
                        self.settings.socket.clone()
                    }
                }
            })
            .await
            .clone()
    }

    fn handle(&self, id: &str, name: &str, engine: &str) -> SandboxHandle {
        let short = &id[..id.len().min(12)];
        SandboxHandle {
            id: id.to_string(),
            remote_host: format!("container {name} ({short}) on docker engine {engine}"),
        }
    }

    /// Pulls `image` unless the engine has it, reporting progress.
    async fn ensure_image(
        &self,
        docker: &Docker,
        image: &str,
        progress: Option<&tokio::sync::mpsc::Sender<SpawnProgress>>,
    ) -> Result<(), ProviderError> {
        match docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(err) if status_of(&err) == Some(404) => {}
            Err(err) if is_transport(&err) => return Err(self.unreachable(err)),
            Err(err) => {
                return Err(ProviderError::ImagePull {
                    image: image.to_string(),
                    message: err.to_string(),
                })
            }
        }
        tracing::info!(image, "image not present; pulling");
        let (repo, tag) = split_reference(image);
        let options = CreateImageOptions {
            from_image: repo,
            tag,
            ..CreateImageOptions::default()
        };
        let report = |status: String, current: Option<i64>, total: Option<i64>| {
            if let Some(tx) = progress {
                let event = SpawnProgress::ImagePull {
                    image: image.to_string(),
                    status,
                    current_bytes: current.and_then(|c| u64::try_from(c).ok()),
                    total_bytes: total.and_then(|t| u64::try_from(t).ok()),
                };
                // Progress is best effort: a full or closed sink never fails the pull.
                if tx.try_send(event).is_err() {
                    tracing::debug!(image, "pull progress dropped");
                }
            }
        };
        report("pulling".to_string(), None, None);
        let mut stream = docker.create_image(Some(options), None, None);
        let mut last_report: Option<Instant> = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(error) = info.error {
                        return Err(ProviderError::ImagePull {
                            image: image.to_string(),
                            message: error,
                        });
                    }
                    let due = last_report
                        .is_none_or(|at| at.elapsed() >= self.settings.pull_progress_interval);
                    if due {
                        last_report = Some(Instant::now());
                        let detail = info.progress_detail.unwrap_or_default();
                        let status = match (info.id, info.status) {
                            (Some(id), Some(status)) => format!("{id}: {status}"),
                            (None, Some(status)) => status,
                            (Some(id), None) => id,
                            (None, None) => "pulling".to_string(),
                        };
                        report(status, detail.current, detail.total);
                    }
                }
                Err(err) if is_transport(&err) => return Err(self.unreachable(err)),
                Err(err) => {
                    let message = match err {
                        DockerError::DockerResponseServerError { message, .. } => message,
                        other => other.to_string(),
                    };
                    report(format!("failed: {message}"), None, None);
                    return Err(ProviderError::ImagePull {
                        image: image.to_string(),
                        message,
                    });
                }
            }
        }
        report("pulled".to_string(), None, None);
        Ok(())
    }

    /// Gateway address of the provider's network, looked up once.
    async fn gateway(&self, docker: &Docker) -> Result<String, ProviderError> {
        let network = &self.settings.network;
        if let Some(gw) = self
            .gateways
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(network)
        {
            return Ok(gw.clone());
        }
        let info = docker
            .inspect_network(network, None::<InspectNetworkOptions<String>>)
            .await
            .map_err(|err| match status_of(&err) {
                Some(404) => ProviderError::SpawnFailed {
                    message: format!("docker network '{network}' does not exist"),
                },
                _ if is_transport(&err) => self.unreachable(err),
                _ => ProviderError::SpawnFailed {
                    message: format!("cannot inspect docker network '{network}': {err}"),
                },
            })?;
        let configs = info.ipam.and_then(|ipam| ipam.config).unwrap_or_default();
        // The default bridge may list only its subnet: the engine gives the gateway the
        // subnet's first address.
        let gateways: Vec<String> = configs
            .into_iter()
            .filter_map(|c| {
                c.gateway
                    .filter(|g| !g.is_empty())
                    .or_else(|| c.subnet.as_deref().and_then(first_host))
            })
            .collect();
        // Prefer IPv4: the bridge gateway every engine sets up.
        let gw = gateways
            .iter()
            .find(|g| !g.contains(':'))
            .or(gateways.first())
            .cloned()
            .ok_or_else(|| ProviderError::SpawnFailed {
                message: format!(
                    "docker network '{network}' has no gateway address to call back to; set the provider's callback_url"
                ),
            })?;
        self.gateways
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(network.clone(), gw.clone());
        Ok(gw)
    }

    /// The callback URL the container gets, if it differs from the one the run was given.
    async fn callback_url(&self, docker: &Docker) -> Result<Option<String>, ProviderError> {
        match &self.settings.callback {
            CallbackRoute::Fixed(url) => Ok(Some(url.clone())),
            CallbackRoute::AsGiven => Ok(None),
            CallbackRoute::NetworkGateway { port } => {
                let gw = self.gateway(docker).await?;
                let host = if gw.contains(':') {
                    format!("[{gw}]")
                } else {
                    gw
                };
                Ok(Some(format!("http://{host}:{port}")))
            }
        }
    }

    /// Removes a container, treating "already gone" and "being removed" as done.
    async fn remove(&self, docker: &Docker, id: &str) -> Result<(), ProviderError> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..RemoveContainerOptions::default()
        };
        match docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(err) if matches!(status_of(&err), Some(404 | 409)) => Ok(()),
            Err(err) => Err(self.error("remove", id, err)),
        }
    }
}

#[async_trait]
impl Provider for DockerProvider {
    fn kind(&self) -> &'static str {
        "docker"
    }

    async fn spawn(&self, request: SpawnRequest) -> Result<SandboxHandle, ProviderError> {
        let docker = self.client()?;
        let image = request
            .image
            .clone()
            .unwrap_or_else(|| self.settings.default_image.clone());
        tracing::Instrument::instrument(
            self.ensure_image(&docker, &image, request.progress.as_ref()),
            tracing::info_span!("image.pull", container.image.name = %image),
        )
        .await?;
        let mut env = request.env.clone();
        use agent_shim::protocol::env as vars;
        if let Some(url) = self.callback_url(&docker).await? {
            env.insert(vars::CALLBACK_URL.to_string(), url);
        }
        env.insert(vars::WORK_DIR.to_string(), self.settings.work_dir.clone());
        env.entry("HOME".to_string())
            .or_insert_with(|| self.settings.work_dir.clone());
        let name = format!("codebolt-{}", request.run_id);
        let injected = self.settings.shim_path.is_some();
        let config = Config {
            image: Some(image.clone()),
            env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(request.labels.clone().into_iter().collect()),
            user: self.settings.hardening.user.clone(),
            // Not the work dir: a working directory that is a tmpfs mount loses the mount's
            // mode (the shim and agent find the work dir through CODEBOLT_WORK_DIR).
            entrypoint: injected.then(|| vec![SHIM_MOUNT.to_string()]),
            cmd: injected.then(Vec::new),
            stop_signal: Some("SIGTERM".to_string()),
            host_config: Some(host_config(&self.settings, &request.resources)),
            ..Config::default()
        };
        let options = CreateContainerOptions {
            name: name.clone(),
            platform: None,
        };
        let created = tracing::Instrument::instrument(
            docker.create_container(Some(options), config),
            tracing::info_span!("container.create", container.name = %name),
        )
        .await
        .map_err(|err| match err {
            err if is_transport(&err) => self.unreachable(err),
            DockerError::DockerResponseServerError {
                status_code: 404,
                message,
            } if message.contains("image") => ProviderError::ImagePull {
                image: image.clone(),
                message,
            },
            DockerError::DockerResponseServerError {
                status_code,
                message,
            } => ProviderError::SpawnFailed {
                message: format!(
                    "docker engine refused to create container {name} ({status_code}): {message}"
                ),
            },
            other => ProviderError::SpawnFailed {
                message: format!("cannot create container {name}: {other}"),
            },
        })?;
        for warning in &created.warnings {
            tracing::warn!(run_id = %request.run_id, container = %name, warning, "docker warning");
        }
        if let Err(err) = tracing::Instrument::instrument(
            docker.start_container(&created.id, None::<StartContainerOptions<String>>),
            tracing::info_span!("container.start", container.id = %created.id),
        )
        .await
        {
            let failure = if is_transport(&err) {
                self.unreachable(err)
            } else {
                ProviderError::SpawnFailed {
                    message: format!("container {name} could not start: {err}"),
                }
            };
            if let Err(rm) = self.remove(&docker, &created.id).await {
                tracing::warn!(container = %name, error = %rm, "could not remove a container that did not start");
            }
            return Err(failure);
        }
        let engine = self.engine_host(&docker).await;
        tracing::info!(run_id = %request.run_id, container = %name, id = %created.id, image, "container started");
        Ok(self.handle(&created.id, &name, &engine))
    }

    async fn wait(&self, sandbox: &SandboxHandle) -> Result<SandboxExit, ProviderError> {
        let docker = self.client()?;
        let vanished = SandboxExit {
            code: None,
            signal: None,
            oom_killed: false,
        };
        loop {
            let options = WaitContainerOptions {
                condition: "not-running",
            };
            let mut stream = docker.wait_container(&sandbox.id, Some(options));
            let mut transport_error = None;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(_) | Err(DockerError::DockerContainerWaitError { .. }) => {}
                    Err(err) if status_of(&err) == Some(404) => return Ok(vanished),
                    Err(err) if is_transport(&err) => transport_error = Some(err),
                    Err(err) => return Err(self.error("wait", &sandbox.id, err)),
                }
            }
            match transport_error {
                // The engine went away (restart): keep waiting for the container.
                Some(err) => {
                    tracing::warn!(container = %sandbox.id, error = %err, "lost the docker engine while waiting; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                None => break,
            }
        }
        let state = match docker.inspect_container(&sandbox.id, None).await {
            Ok(info) => info.state.unwrap_or_default(),
            Err(err) if status_of(&err) == Some(404) => return Ok(vanished),
            Err(err) => return Err(self.error("inspect", &sandbox.id, err)),
        };
        if state.running == Some(true) {
            return Err(ProviderError::Operation {
                operation: "wait",
                message: format!("container {} is still running", sandbox.id),
            });
        }
        let exit = SandboxExit {
            code: state.exit_code.and_then(|c| i32::try_from(c).ok()),
            signal: None,
            oom_killed: state.oom_killed.unwrap_or(false),
        };
        if self.settings.auto_remove {
            self.remove(&docker, &sandbox.id).await?;
        }
        Ok(exit)
    }

    async fn stop(&self, sandbox: &SandboxHandle) -> Result<(), ProviderError> {
        let docker = self.client()?;
        let options = KillContainerOptions { signal: "SIGTERM" };
        match docker.kill_container(&sandbox.id, Some(options)).await {
            Ok(()) => Ok(()),
            // Gone or not running: nothing left to stop.
            Err(err) if matches!(status_of(&err), Some(404 | 409)) => Ok(()),
            Err(err) => Err(self.error("stop", &sandbox.id, err)),
        }
    }

    async fn kill(&self, sandbox: &SandboxHandle) -> Result<(), ProviderError> {
        let docker = self.client()?;
        self.remove(&docker, &sandbox.id).await
    }

    async fn logs(
        &self,
        sandbox: &SandboxHandle,
        follow: bool,
    ) -> Result<LogStream, ProviderError> {
        let docker = self.client()?;
        // Fail early for a container that does not exist.
        if let Err(err) = docker.inspect_container(&sandbox.id, None).await {
            return Err(self.error("logs", &sandbox.id, err));
        }
        let options = LogsOptions::<String> {
            follow,
            stdout: true,
            stderr: true,
            tail: "all".to_string(),
            ..LogsOptions::default()
        };
        let raw = docker.logs(&sandbox.id, Some(options));
        let socket = self.settings.socket.clone();
        // Fused: a reader may poll again after the end.
        Ok(split_lines(raw, socket).fuse().boxed())
    }

    async fn usage(&self, sandbox: &SandboxHandle) -> Result<Option<Usage>, ProviderError> {
        let docker = self.client()?;
        let options = StatsOptions {
            stream: false,
            one_shot: false,
        };
        let mut stream = docker.stats(&sandbox.id, Some(options));
        match stream.next().await {
            Some(Ok(stats)) => Ok(Some(usage_of(&stats))),
            Some(Err(err)) => Err(self.error("usage", &sandbox.id, err)),
            None => Ok(None),
        }
    }

    async fn list(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<SandboxInfo>, ProviderError> {
        let docker = self.client()?;
        let filters = HashMap::from([(
            "label".to_string(),
            labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        )]);
        let options = ListContainersOptions {
            all: true,
            filters,
            ..ListContainersOptions::default()
        };
        let containers = docker
            .list_containers(Some(options))
            .await
            .map_err(|err| self.error("list", "", err))?;
        let engine = self.engine_host(&docker).await;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let id = c.id?;
                let name = c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_else(|| id.clone());
                Some(SandboxInfo {
                    handle: self.handle(&id, &name, &engine),
                    labels: c.labels.unwrap_or_default().into_iter().collect(),
                    running: c.state.as_deref() == Some("running"),
                })
            })
            .collect())
    }

    async fn health(&self) -> ProviderHealth {
        let docker = match self.client() {
            Ok(docker) => docker,
            Err(err) => {
                return ProviderHealth {
                    healthy: false,
                    message: Some(err.to_string()),
                }
            }
        };
        match docker.ping().await {
            Ok(_) => ProviderHealth {
                healthy: true,
                message: None,
            },
            Err(err) => ProviderHealth {
                healthy: false,
                message: Some(self.unreachable(err).to_string()),
            },
        }
    }
}

/// The engine's log frames as lines.
fn split_lines(
    raw: impl Stream<Item = Result<LogOutput, DockerError>> + Send + Unpin + 'static,
    socket: String,
) -> impl Stream<Item = Result<ProviderLogLine, ProviderError>> + Send {
    struct State<S> {
        raw: S,
        splitter: LineSplitter,
        ready: VecDeque<ProviderLogLine>,
        done: bool,
        socket: String,
    }
    let state = State {
        raw,
        splitter: LineSplitter::default(),
        ready: VecDeque::new(),
        done: false,
        socket,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(line) = st.ready.pop_front() {
                return Some((Ok(line), st));
            }
            if st.done {
                return None;
            }
            match st.raw.next().await {
                Some(Ok(output)) => {
                    let (stream, bytes) = match output {
                        LogOutput::StdOut { message } | LogOutput::Console { message } => {
                            ("stdout", message)
                        }
                        LogOutput::StdErr { message } => ("stderr", message),
                        LogOutput::StdIn { .. } => continue,
                    };
                    st.splitter.push(stream, &bytes, &mut st.ready);
                }
                Some(Err(err)) => {
                    st.done = true;
                    st.splitter.flush(&mut st.ready);
                    let err = if is_transport(&err) {
                        ProviderError::Operation {
                            operation: "logs",
                            message: format!(
                                "docker engine at {} is unreachable: {err}",
                                st.socket
                            ),
                        }
                    } else {
                        ProviderError::Operation {
                            operation: "logs",
                            message: err.to_string(),
                        }
                    };
                    st.ready.clear();
                    return Some((Err(err), st));
                }
                None => {
                    st.done = true;
                    st.splitter.flush(&mut st.ready);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_get_a_tag_for_pulls() {
        assert_eq!(
            split_reference("codebolt/agent-base"),
            ("codebolt/agent-base".into(), "latest".into())
        );
        assert_eq!(
            split_reference("localhost:5000/a/b:1.2"),
            ("localhost:5000/a/b".into(), "1.2".into())
        );
        assert_eq!(
            split_reference("localhost:5000/a/b"),
            ("localhost:5000/a/b".into(), "latest".into())
        );
        assert_eq!(
            split_reference("busybox@sha256:abc"),
            ("busybox@sha256:abc".into(), String::new())
        );
    }

    #[test]
    fn a_subnet_gives_its_first_host_as_gateway() {
        assert_eq!(first_host("172.17.0.0/16").as_deref(), Some("172.17.0.1"));
        assert_eq!(first_host("10.1.2.128/25").as_deref(), Some("10.1.2.129"));
        assert_eq!(first_host("fd00::/64"), None);
    }

    #[test]
    fn host_config_is_hardened_by_default_and_limited_by_resources() {
        let mut settings = DockerSettings::new("docker");
        settings.shim_path = Some(PathBuf::from("/opt/shim"));
        let res = Resources {
            memory_mb: Some(64),
            cpu: Some(0.5),
            gpu_count: None,
        };
        let host = host_config(&settings, &res);
        assert_eq!(host.memory, Some(64 * 1024 * 1024));
        assert_eq!(host.memory_swap, host.memory);
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(host.pids_limit, Some(512));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges".to_string()])
        );
        assert_eq!(host.auto_remove, Some(false));
        let tmpfs = host.tmpfs.unwrap();
        assert!(!tmpfs["/codebolt/work"].contains("noexec"));
        assert_eq!(host.binds, Some(vec![format!("/opt/shim:{SHIM_MOUNT}:ro")]));
    }

    #[test]
    fn lines_are_split_per_stream_across_chunks() {
        let mut splitter = LineSplitter::default();
        let mut out = VecDeque::new();
        splitter.push("stdout", b"hel", &mut out);
        splitter.push("stderr", b"err\n", &mut out);
        splitter.push("stdout", b"lo\nwor", &mut out);
        splitter.flush(&mut out);
        let lines: Vec<(String, String)> = out.into_iter().map(|l| (l.stream, l.line)).collect();
        assert_eq!(
            lines,
            vec![
                ("stderr".into(), "err".into()),
                ("stdout".into(), "hello".into()),
                ("stdout".into(), "wor".into()),
            ]
        );
    }
}
