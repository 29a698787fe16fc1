//! `codebolt server`: the HTTP API, the sandbox WebSocket endpoint and the actors behind them.

pub mod api;
pub mod error;
pub mod state;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Actor;
use actix_web::{web, App, HttpServer};
use actors::cluster::{ClusterStats, ReplicaKeeper};
use actors::metrics::{self as metric, Metrics};
use actors::provider::docker::{CallbackRoute, DockerProvider, DockerSettings};
use actors::provider::local::{
    default_shim_path, LocalConfig as LocalProviderConfig, LocalProvider,
};
use actors::provider::{Provider, ProviderError};
use actors::reconciler::Reconciler;
use actors::router::{ProviderFactory, ProviderRouter, ProviderSpec, SupervisorSettings};
use actors::run::{RunDeps, RunRegistry, RunSettings, RunTimeouts};
use actors::store::memory::MemoryStore;
use actors::store::redis::{RedisSettings, RedisStore};
use actors::store::RunStore;

use crate::config::{
    BackendConfig, ConfigError, DockerConfig, ProviderConfig, ServerConfig, StoreConfig,
};
use crate::telemetry::MetricsPipeline;
use crate::tools::WorkspaceTools;
use state::AppState;

/// Default address of `codebolt server`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

/// How often the reconciler compares sandboxes with run records (it also runs at start-up).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(60);

/// Where sandboxes can reach this server, for providers that derive their own callback URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The callback URL runs are given (`public_url`, else derived from the API listener).
    pub callback_url: String,
    /// Whether `public_url` was configured (then it is used as it is).
    pub public_url_explicit: bool,
    /// The API listener's bound address.
    pub listen_addr: SocketAddr,
    /// The sandbox-only listener's bound address (`sandbox_listen`), if any.
    pub sandbox_addr: Option<SocketAddr>,
}

/// How a Docker provider's containers reach the control plane: the provider's `callback_url`;
/// else an explicit `public_url`; else, on `host` (and `none`) networks the run's callback URL as
/// it is; else (bridge or a named network) the sandbox listener: its address, or the network's
/// gateway at its port when it listens on all addresses.
pub fn docker_callback_route(docker: &DockerConfig, endpoints: &Endpoints) -> CallbackRoute {
    if let Some(url) = &docker.callback_url {
        return CallbackRoute::Fixed(url.as_str().trim_end_matches('/').to_string());
    }
    if endpoints.public_url_explicit || matches!(docker.network.as_str(), "host" | "none") {
        return CallbackRoute::AsGiven;
    }
    let addr = endpoints.sandbox_addr.unwrap_or(endpoints.listen_addr);
    if addr.ip().is_unspecified() {
        CallbackRoute::NetworkGateway { port: addr.port() }
    } else {
        CallbackRoute::Fixed(format!("http://{addr}"))
    }
}

fn docker_settings(name: &str, docker: &DockerConfig, endpoints: &Endpoints) -> DockerSettings {
    let mut settings = DockerSettings::new(name);
    settings.socket = docker.socket.clone();
    settings.default_image = docker.default_image.clone();
    settings.network = docker.network.clone();
    settings.auto_remove = docker.auto_remove;
    settings.callback = docker_callback_route(docker, endpoints);
    settings.shim_path = docker.shim_path.clone();
    settings.work_dir = docker.work_dir.clone();
    settings.work_dir_size_mb = docker.work_dir_size_mb;
    settings.hardening = docker.hardening.clone();
    settings
}

/// What `codebolt server` was given on its command line.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    pub listen: Option<String>,
    pub config: Option<PathBuf>,
    pub workspace: Option<PathBuf>,
    /// The process environment, read once by the binary.
    pub env: HashMap<String, String>,
    /// Replaces the configured timeouts (sub-second values for tests and embedding).
    pub run_timeouts: Option<RunTimeouts>,
    /// HTTP worker threads; the number of CPUs when absent.
    pub workers: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("listening on {addr} (not loopback) requires API tokens: set api_tokens in the config or CODEBOLT_API_TOKENS")]
    OpenBind { addr: SocketAddr },
    #[error("workspace {path}: {message}")]
    Workspace { path: PathBuf, message: String },
    #[error("store {store}: {message}")]
    Store { store: String, message: String },
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A started server.
pub struct RunningServer {
    pub local_addr: SocketAddr,
    /// The sandbox-only listener's address (`sandbox_listen`), if configured.
    pub sandbox_addr: Option<SocketAddr>,
    /// Removes orphaned sandboxes and fails runs whose sandbox vanished.
    pub reconciler: actix::Addr<Reconciler>,
    sandbox_server: Option<(
        actix_web::dev::ServerHandle,
        tokio::task::JoinHandle<std::io::Result<()>>,
    )>,
    /// Base URL of the API, e.g. `http://127.0.0.1:7420`.
    pub base_url: String,
    handle: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Stops accepting, finishes in-flight requests, and returns. Runs keep their sandboxes.
    pub async fn stop(self) -> Result<(), ServerError> {
        if let Some((handle, task)) = self.sandbox_server {
            handle.stop(true).await;
            match task.await {
                Ok(res) => res.map_err(ServerError::Io)?,
                Err(err) => return Err(ServerError::Io(std::io::Error::other(err))),
            }
        }
        self.handle.stop(true).await;
        match self.task.await {
            Ok(res) => res.map_err(ServerError::Io),
            Err(err) => Err(ServerError::Io(std::io::Error::other(err))),
        }
    }

    /// Waits until the server stops (on SIGINT or SIGTERM).
    pub async fn wait(self) -> Result<(), ServerError> {
        if let Some((_, task)) = self.sandbox_server {
            match task.await {
                Ok(res) => res.map_err(ServerError::Io)?,
                Err(err) => return Err(ServerError::Io(std::io::Error::other(err))),
            }
        }
        match self.task.await {
            Ok(res) => res.map_err(ServerError::Io),
            Err(err) => Err(ServerError::Io(std::io::Error::other(err))),
        }
    }
}

fn to_run_timeouts(config: &ServerConfig) -> RunTimeouts {
    let t = &config.timeouts;
    RunTimeouts {
        startup: t.startup(),
        tool_call: t.tool_call(),
        idle: t.idle(),
        run_ttl: t.run_ttl(),
        stop_grace: t.stop_grace(),
        lost_after: t.lost_after(),
        heartbeat_interval: t.heartbeat_interval(),
        token_max_lifetime: t.token_max_lifetime(),
    }
}

/// Builds the factory that (re)creates a provider's backend.
fn provider_factory(
    config: &ProviderConfig,
    data_dir: &std::path::Path,
    env: &HashMap<String, String>,
    endpoints: &Endpoints,
) -> ProviderFactory {
    let name = config.name.clone();
    match &config.backend {
        BackendConfig::Local(local) => {
            let shim_path = local
                .shim_path
                .clone()
                .or_else(|| env.get("CODEBOLT_SHIM_PATH").map(PathBuf::from))
                .or_else(|| {
                    std::env::current_exe()
                        .ok()
                        .map(|exe| default_shim_path(&exe))
                })
                .unwrap_or_else(|| PathBuf::from("agent-shim"));
            let work_root = local
                .work_root
                .clone()
                .unwrap_or_else(|| data_dir.join("local").join(&name));
            let settings = LocalProviderConfig {
                shim_path,
                work_root,
                poll_interval: Duration::from_millis(250),
            };
            Arc::new(
                move || Ok(Arc::new(LocalProvider::new(settings.clone())) as Arc<dyn Provider>),
            )
        }
        BackendConfig::Docker(docker) => {
            let settings = docker_settings(&name, docker, endpoints);
            let loopback_only = endpoints.sandbox_addr.is_none()
                && !endpoints.public_url_explicit
                && docker.callback_url.is_none()
                && endpoints.listen_addr.ip().is_loopback()
                && !matches!(docker.network.as_str(), "host" | "none");
            if loopback_only {
                tracing::warn!(provider = %name, network = %docker.network, "containers cannot reach the loopback API listener: set sandbox_listen (e.g. 0.0.0.0:7421), public_url or the provider's callback_url");
            }
            tracing::info!(provider = %name, callback = ?settings.callback, network = %settings.network, "docker provider configured");
            Arc::new(move || {
                Ok(Arc::new(DockerProvider::new(settings.clone())) as Arc<dyn Provider>)
            })
        }
        other => {
            let kind = other.kind().to_string();
            Arc::new(move || {
                Err(ProviderError::Unavailable {
                    provider: name.clone(),
                    message: format!("the {kind} provider is not available in this build"),
                })
            })
        }
    }
}

fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Loads the configuration, starts the actors and binds the HTTP server. Must run inside an
/// actix system.
pub async fn start(options: ServerOptions) -> Result<RunningServer, ServerError> {
    let config = ServerConfig::load(options.config.as_deref(), &options.env)?;
    let workspace = match &options.workspace {
        Some(path) => path.clone(),
        None => std::env::current_dir()?,
    };
    let workspace = workspace
        .canonicalize()
        .map_err(|err| ServerError::Workspace {
            path: workspace.clone(),
            message: err.to_string(),
        })?;

    let listen = options
        .listen
        .clone()
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listener = TcpListener::bind(&listen).map_err(|source| ServerError::Listen {
        addr: listen.clone(),
        source,
    })?;
    let local_addr = listener.local_addr()?;
    if !is_loopback(&local_addr) && config.api_tokens.is_empty() {
        return Err(ServerError::OpenBind { addr: local_addr });
    }
    let base_url = format!("http://{local_addr}");
    // Serves the sandbox endpoints only (authorised by run tokens), so it may listen beyond
    // loopback without API tokens.
    let sandbox_listener = match &config.sandbox_listen {
        Some(addr) => Some(
            TcpListener::bind(addr).map_err(|source| ServerError::Listen {
                addr: addr.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let sandbox_addr = match &sandbox_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let callback_url = match &config.public_url {
        Some(url) => url.as_str().trim_end_matches('/').to_string(),
        None if local_addr.ip().is_unspecified() => {
            format!("http://127.0.0.1:{}", local_addr.port())
        }
        None => base_url.clone(),
    };

    // The process's metrics pipeline when telemetry installed one (`codebolt server`), else one
    // of this server's own (servers started in-process).
    let metrics_pipeline =
        crate::telemetry::installed_metrics().unwrap_or_else(MetricsPipeline::local);
    let metrics = Arc::new(Metrics::new(metrics_pipeline.meter()));
    let store: Arc<dyn RunStore> = match &config.store {
        StoreConfig::Memory => Arc::new(MemoryStore::new()),
        StoreConfig::Redis { url } => {
            let store = RedisStore::open_observed(
                url,
                &config.cluster_id,
                RedisSettings::default(),
                metrics.clone(),
            )
            .map_err(|err| ServerError::Store {
                store: config.store.redacted(),
                message: err.to_string(),
            })?;
            // Connects on first use: a replica may start before Redis; /readyz tells.
            if let Err(err) = store.ping().await {
                tracing::warn!(store = %config.store.redacted(), error = %err, "run store not reachable yet; /readyz reports 503 until it is");
            }
            Arc::new(store)
        }
    };
    let data_dir = config
        .data_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("codebolt-{}", config.cluster_id)));
    let endpoints = Endpoints {
        callback_url: callback_url.clone(),
        public_url_explicit: config.public_url.is_some(),
        listen_addr: local_addr,
        sandbox_addr,
    };
    let specs = config
        .providers
        .values()
        .map(|p| ProviderSpec {
            name: p.name.clone(),
            kind: p.kind().to_string(),
            factory: provider_factory(p, &data_dir, &options.env, &endpoints),
            default_resources: p.default_resources.clone(),
            max_concurrent_runs: p.max_concurrent_runs,
            cost: p.cost.clone(),
        })
        .collect();
    let router = ProviderRouter::new(specs, SupervisorSettings::default())
        .with_metrics(metrics.clone())
        .start();
    let tools = WorkspaceTools::new(workspace.clone()).map_err(|err| ServerError::Workspace {
        path: workspace.clone(),
        message: err.to_string(),
    })?;
    let registry = RunRegistry::default();
    let timeouts = options
        .run_timeouts
        .unwrap_or_else(|| to_run_timeouts(&config));
    // Unique per process, also when a restarted container reuses its host name and pid.
    let replica_id = format!(
        "{}-{}-{:08x}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "replica".into()),
        std::process::id(),
        rand::random::<u32>()
    );
    let run_deps = RunDeps {
        store: store.clone(),
        tools: Arc::new(tools),
        router: router.clone(),
        registry: registry.clone(),
        settings: Arc::new(RunSettings {
            timeouts,
            callback_url: callback_url.clone(),
            cluster_id: config.cluster_id.clone(),
            evidence_lines: actors::run::DEFAULT_EVIDENCE_LINES,
            usage_interval: Duration::from_secs(10),
            replica_id: replica_id.clone(),
        }),
        adopt_span: crate::telemetry::adopted_run_span,
        export_spans: crate::telemetry::shim_span_export(),
        metrics: metrics.clone(),
    };
    let cluster_stats = Arc::new(ClusterStats::default());
    observe_cluster(&metrics, &cluster_stats, &store);
    ReplicaKeeper::new(
        run_deps.clone(),
        config.timeouts.replica_lease(),
        cluster_stats.clone(),
    )
    .start();
    let reconciler = Reconciler::new(
        router.clone(),
        store.clone(),
        registry.clone(),
        config.cluster_id.clone(),
        replica_id.clone(),
        RECONCILE_INTERVAL,
    )
    .with_metrics(metrics.clone())
    .start();
    let api_tokens = config.api_tokens.clone();
    let state = web::Data::new(AppState {
        config,
        workspace,
        store,
        router,
        registry,
        run_deps,
        callback_url: callback_url.clone(),
        replica_id,
        cluster_stats,
        metrics_pipeline,
        bundles: Mutex::new(HashMap::new()),
        api_tokens,
    });

    let sandbox_server = match sandbox_listener {
        Some(listener) => {
            let state = state.clone();
            let mut server = HttpServer::new(move || {
                App::new()
                    .app_data(state.clone())
                    .configure(api::sandbox_routes)
            })
            .tcp_nodelay(true)
            .listen(listener)?
            .shutdown_timeout(5);
            if let Some(workers) = options.workers {
                server = server.workers(workers);
            }
            let server = server.run();
            let handle = server.handle();
            tracing::info!(listen = ?sandbox_addr, "sandbox endpoints listening");
            Some((handle, actix_rt::spawn(server)))
        }
        None => None,
    };
    let mut server =
        HttpServer::new(move || App::new().app_data(state.clone()).configure(api::routes))
            // Small frames (acks, tool results) go out at once instead of waiting on Nagle.
            .tcp_nodelay(true)
            .listen(listener)?
            .shutdown_timeout(5);
    if let Some(workers) = options.workers {
        server = server.workers(workers);
    }
    let server = server.run();
    let handle = server.handle();
    let task = actix_rt::spawn(server);
    tracing::info!(listen = %local_addr, callback_url = %callback_url, "codebolt server started");
    Ok(RunningServer {
        local_addr,
        sandbox_addr,
        reconciler,
        sandbox_server,
        base_url,
        handle,
        task,
    })
}

/// Counters kept outside the instruments (the keeper's statistics, the store's refused writes),
/// read when metrics are collected.
fn observe_cluster(metrics: &Metrics, stats: &Arc<ClusterStats>, store: &Arc<dyn RunStore>) {
    type Read = Box<dyn Fn() -> u64 + Send + Sync>;
    let counter = |def: actors::metrics::MetricDef, read: Read| {
        metrics
            .meter()
            .u64_observable_counter(def.name)
            .with_unit(def.unit)
            .with_description(def.description)
            .with_callback(move |observer| observer.observe(read(), &[]))
            .build();
    };
    let load = |field: fn(&ClusterStats) -> &std::sync::atomic::AtomicU64| -> Read {
        let stats = stats.clone();
        Box::new(move || field(&stats).load(std::sync::atomic::Ordering::Relaxed))
    };
    counter(metric::RUNS_ADOPTED, load(|s| &s.adopted_orphans));
    counter(metric::RUNS_RELEASED, load(|s| &s.released));
    counter(metric::COMMANDS_ROUTED, load(|s| &s.commands_routed));
    counter(metric::HEARTBEAT_FAILURES, load(|s| &s.heartbeat_failures));
    let store = store.clone();
    counter(
        metric::STORE_FENCED_WRITES,
        Box::new(move || store.fenced_writes()),
    );
}

/// Runs the server until SIGINT/SIGTERM.
pub async fn run_until_signal(options: ServerOptions) -> Result<(), ServerError> {
    start(options).await?.wait().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(sandbox: Option<&str>, public: bool) -> Endpoints {
        Endpoints {
            callback_url: "http://127.0.0.1:7420".into(),
            public_url_explicit: public,
            listen_addr: "127.0.0.1:7420".parse().unwrap(),
            sandbox_addr: sandbox.map(|a| a.parse().unwrap()),
        }
    }

    #[test]
    fn docker_callback_is_derived_from_the_network_and_overridable() {
        let bridge = DockerConfig::default();
        assert_eq!(
            docker_callback_route(&bridge, &endpoints(Some("0.0.0.0:7421"), false)),
            CallbackRoute::NetworkGateway { port: 7421 }
        );
        assert_eq!(
            docker_callback_route(&bridge, &endpoints(Some("172.17.0.1:7421"), false)),
            CallbackRoute::Fixed("http://172.17.0.1:7421".into())
        );
        assert_eq!(
            docker_callback_route(&bridge, &endpoints(Some("0.0.0.0:7421"), true)),
            CallbackRoute::AsGiven,
            "an explicit public_url wins"
        );
        let host = DockerConfig {
            network: "host".into(),
            ..DockerConfig::default()
        };
        assert_eq!(
            docker_callback_route(&host, &endpoints(Some("0.0.0.0:7421"), false)),
            CallbackRoute::AsGiven
        );
        let fixed = DockerConfig {
            callback_url: Some("http://cp.internal:7420/".parse().unwrap()),
            ..DockerConfig::default()
        };
        assert_eq!(
            docker_callback_route(&fixed, &endpoints(None, true)),
            CallbackRoute::Fixed("http://cp.internal:7420".into())
        );
    }
}
