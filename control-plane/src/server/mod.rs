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
use actors::provider::local::{
    default_shim_path, LocalConfig as LocalProviderConfig, LocalProvider,
};
use actors::provider::{Provider, ProviderError};
use actors::router::{ProviderFactory, ProviderRouter, ProviderSpec, SupervisorSettings};
use actors::run::{RunDeps, RunRegistry, RunSettings, RunTimeouts};
use actors::store::memory::MemoryStore;
use actors::store::RunStore;

use crate::config::{BackendConfig, ConfigError, ProviderConfig, ServerConfig, StoreConfig};
use crate::tools::WorkspaceTools;
use state::AppState;

/// Default address of `codebolt server`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

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
    /// Base URL of the API, e.g. `http://127.0.0.1:7420`.
    pub base_url: String,
    handle: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Stops accepting, finishes in-flight requests, and returns. Runs keep their sandboxes.
    pub async fn stop(self) -> Result<(), ServerError> {
        self.handle.stop(true).await;
        match self.task.await {
            Ok(res) => res.map_err(ServerError::Io),
            Err(err) => Err(ServerError::Io(std::io::Error::other(err))),
        }
    }

    /// Waits until the server stops (on SIGINT or SIGTERM).
    pub async fn wait(self) -> Result<(), ServerError> {
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
    let callback_url = match &config.public_url {
        Some(url) => url.as_str().trim_end_matches('/').to_string(),
        None if local_addr.ip().is_unspecified() => {
            format!("http://127.0.0.1:{}", local_addr.port())
        }
        None => base_url.clone(),
    };

    let store: Arc<dyn RunStore> = match &config.store {
        StoreConfig::Memory => Arc::new(MemoryStore::new()),
        other => {
            return Err(ServerError::Store {
                store: other.redacted(),
                message: "only the in-memory store is available in this build".into(),
            })
        }
    };
    let data_dir = config
        .data_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("codebolt-{}", config.cluster_id)));
    let specs = config
        .providers
        .values()
        .map(|p| ProviderSpec {
            name: p.name.clone(),
            kind: p.kind().to_string(),
            factory: provider_factory(p, &data_dir, &options.env),
            default_resources: p.default_resources.clone(),
            max_concurrent_runs: p.max_concurrent_runs,
            cost: p.cost.clone(),
        })
        .collect();
    let router = ProviderRouter::new(specs, SupervisorSettings::default()).start();
    let tools = WorkspaceTools::new(workspace.clone()).map_err(|err| ServerError::Workspace {
        path: workspace.clone(),
        message: err.to_string(),
    })?;
    let registry = RunRegistry::default();
    let timeouts = options
        .run_timeouts
        .unwrap_or_else(|| to_run_timeouts(&config));
    let replica_id = format!(
        "{}-{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "replica".into()),
        std::process::id()
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
            evidence_lines: 50,
            usage_interval: Duration::from_secs(10),
        }),
    };
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
        bundles: Mutex::new(HashMap::new()),
        api_tokens,
    });

    let mut server =
        HttpServer::new(move || App::new().app_data(state.clone()).configure(api::routes))
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
        base_url,
        handle,
        task,
    })
}

/// Runs the server until SIGINT/SIGTERM.
pub async fn run_until_signal(options: ServerOptions) -> Result<(), ServerError> {
    start(options).await?.wait().await
}
