//! A cluster of real `codebolt server` processes sharing one real `redis-server`, behind an
//! in-test TCP load balancer: the fixture for multi-replica tests (a run spawned through one
//! replica whose shim lands on another, a replica killed with SIGKILL or frozen with SIGSTOP).
//!
//! - [`LoadBalancer`]: spreads new client connections round-robin over the replicas, skipping one
//!   that refuses or does not answer; can be pinned to one replica and cut connections.
//! - [`Replica`]: one `codebolt server` child process on a fixed loopback port, its output in a log
//!   file; killed (SIGKILL) and reaped when dropped.
//! - [`Cluster`]: the Redis server, the load balancer as every replica's `public_url`, one shared
//!   config file and work root, and HTTP helpers addressing a given replica.
//!
//! All replicas share the `local` provider's work root, as replicas of a real cluster share their
//! provider (a Docker engine, a Kubernetes cluster): each one sees, stops and reconciles the
//! sandboxes the others spawned.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actors::model::{RunEvent, RunRecord, RunState};
use actors::run::RunTimeouts;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use super::{fast_timeouts, parse_sse, pid_alive, shim_path, Workspace};

// Test files that start their own Redis (runs_redis.rs) include this file as well.
#[allow(clippy::duplicate_mod)]
#[path = "../../../actors/tests/common/redis_server.rs"]
pub mod redis_server;

pub use redis_server::RedisServer;

/// How long the load balancer waits for a backend to accept a connection before trying the next.
pub const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a replica may take from spawn to `GET /readyz` answering 200.
pub const REPLICA_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on each request of the HTTP helpers, so a frozen replica fails a test instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of each log printed by [`Cluster::dump_logs`].
const LOG_TAIL_LINES: usize = 60;
/// Environment variables that would override the cluster's config file; not passed on to replicas.
const OVERRIDE_VARS: [&str; 5] = [
    "CODEBOLT_CONFIG",
    "CODEBOLT_STORE",
    "CODEBOLT_PUBLIC_URL",
    "CODEBOLT_CLUSTER_ID",
    "CODEBOLT_API_TOKENS",
];

// ---------------------------------------------------------------------------------------------
// Load balancer

/// A loopback TCP load balancer in front of the replicas.
///
/// Each new client connection goes to the next backend, round-robin; when a backend refuses or
/// does not accept within [`BACKEND_CONNECT_TIMEOUT`], the next one is tried, so a dead replica is
/// skipped. Bytes are copied both ways until either side ends. It runs on its own thread and
/// runtime, so it keeps serving while the test's runtime is busy or blocked.
///
/// A SIGSTOPped replica still completes TCP handshakes (the kernel queues them on its listen
/// backlog), so it is *not* skipped: connections to it stall, without holding up any other
/// connection. Tests that freeze a replica route around it with [`LoadBalancer::pin`] or
/// [`LoadBalancer::set_backends`].
pub struct LoadBalancer {
    addr: SocketAddr,
    shared: Arc<LbShared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct LbShared {
    routing: Mutex<Routing>,
    /// Per backend index, a generation bumped by [`LoadBalancer::cut`]; a connection ends when the
    /// generation of its backend changes.
    cuts: watch::Sender<Vec<u64>>,
}

#[derive(Default)]
struct Routing {
    backends: Vec<SocketAddr>,
    pinned: Option<usize>,
    next: usize,
    /// Per backend index: connections routed to it so far.
    routed: Vec<usize>,
    /// Per backend index: connections open right now.
    open: Vec<usize>,
    /// Per backend index: connection attempts that failed (refused or timed out).
    failed: Vec<usize>,
}

impl Routing {
    fn slot(counts: &mut Vec<usize>, index: usize) -> &mut usize {
        if counts.len() <= index {
            counts.resize(index + 1, 0);
        }
        &mut counts[index]
    }

    /// The backends to try for a new connection, in order.
    fn candidates(&mut self) -> Vec<(usize, SocketAddr)> {
        let n = self.backends.len();
        if let Some(index) = self.pinned {
            return self
                .backends
                .get(index)
                .map(|addr| vec![(index, *addr)])
                .unwrap_or_default();
        }
        if n == 0 {
            return Vec::new();
        }
        let start = self.next % n;
        self.next = (start + 1) % n;
        (0..n)
            .map(|k| (start + k) % n)
            .map(|i| (i, self.backends[i]))
            .collect()
    }
}

impl LbShared {
    fn routing(&self) -> MutexGuard<'_, Routing> {
        self.routing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Decrements the open-connection count of a backend when the connection ends.
struct OpenGuard {
    shared: Arc<LbShared>,
    index: usize,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut routing = self.shared.routing();
        let open = Routing::slot(&mut routing.open, self.index);
        *open = open.saturating_sub(1);
    }
}

impl LoadBalancer {
    /// Listens on a free loopback port, with no backends yet (connections are closed at once until
    /// [`LoadBalancer::set_backends`]).
    pub fn start() -> LoadBalancer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("load balancer bind");
        let addr = listener.local_addr().expect("load balancer address");
        listener
            .set_nonblocking(true)
            .expect("load balancer listener non-blocking");
        let (cuts, _) = watch::channel(Vec::new());
        let shared = Arc::new(LbShared {
            routing: Mutex::new(Routing::default()),
            cuts,
        });
        let (stop, stopped) = oneshot::channel();
        let serving = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cluster-load-balancer".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("load balancer runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("load balancer listener");
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept_loop(listener, serving) => {}
                    }
                });
                // Dropping the runtime drops every connection task, closing their sockets.
            })
            .expect("load balancer thread");
        LoadBalancer {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The address clients (and shims, through `public_url`) connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the backends; their indices are what [`LoadBalancer::pin`] and the counters refer
    /// to. Open connections are left alone.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        let mut routing = self.shared.routing();
        routing.next = 0;
        routing.backends = backends;
    }

    /// Sends every new connection to backend `index` only (no failover: when it is down, the
    /// connection is closed), or back to round-robin with `None`.
    pub fn pin(&self, index: Option<usize>) {
        self.shared.routing().pinned = index;
    }

    /// Connections routed to backend `index` so far (those whose backend connect succeeded).
    pub fn connections_to(&self, index: usize) -> usize {
        self.shared
            .routing()
            .routed
            .get(index)
            .copied()
            .unwrap_or(0)
    }

    /// Connections to backend `index` open right now.
    pub fn open_connections_to(&self, index: usize) -> usize {
        self.shared.routing().open.get(index).copied().unwrap_or(0)
    }

    /// Attempts to connect to backend `index` that failed (refused, or no answer in time).
    pub fn failed_connects_to(&self, index: usize) -> usize {
        self.shared
            .routing()
            .failed
            .get(index)
            .copied()
            .unwrap_or(0)
    }

    /// Drops every open connection to backend `index`, as a network blip between the load
    /// balancer and that replica would.
    pub fn cut(&self, index: usize) {
        self.shared.cuts.send_modify(|cuts| {
            if cuts.len() <= index {
                cuts.resize(index + 1, 0);
            }
            cuts[index] += 1;
        });
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            if stop.send(()).is_err() {
                eprintln!("load balancer thread already gone");
            }
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("load balancer thread panicked");
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<LbShared>) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(relay(client, shared.clone()));
            }
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("load balancer: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Connects `client` to the first backend that accepts, then copies both ways until either side
/// ends or the backend's connections are cut.
async fn relay(mut client: TcpStream, shared: Arc<LbShared>) {
    let candidates = shared.routing().candidates();
    let mut connected = None;
    for (index, addr) in candidates {
        match tokio::time::timeout(BACKEND_CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(server)) => {
                connected = Some((index, server));
                break;
            }
            Ok(Err(_)) | Err(_) => {
                *Routing::slot(&mut shared.routing().failed, index) += 1;
            }
        }
    }
    let Some((index, mut server)) = connected else {
        eprintln!("load balancer: no backend accepted a connection; closing it");
        return;
    };
    let _open = {
        let mut routing = shared.routing();
        *Routing::slot(&mut routing.routed, index) += 1;
        *Routing::slot(&mut routing.open, index) += 1;
        OpenGuard {
            shared: shared.clone(),
            index,
        }
    };
    // Small frames (acks, heartbeats) go out at once, as the server sends them.
    for (side, stream) in [("client", &client), ("backend", &server)] {
        if let Err(err) = stream.set_nodelay(true) {
            eprintln!("load balancer: cannot set TCP_NODELAY on the {side} side: {err}");
        }
    }
    let mut cuts = shared.cuts.subscribe();
    let generation = cuts.borrow_and_update().get(index).copied().unwrap_or(0);
    let cut = async {
        loop {
            if cuts.changed().await.is_err() {
                // The load balancer is going away; its runtime drops this task.
                std::future::pending::<()>().await;
            }
            if cuts.borrow_and_update().get(index).copied().unwrap_or(0) != generation {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut => {}
    }
    // Dropping both streams closes both sides.
}

// ---------------------------------------------------------------------------------------------
// Replica

/// One `codebolt server` child process: a fixed loopback port, the cluster's config file, its
/// stdout and stderr appended to a log file. Killed (SIGKILL) and reaped when dropped.
pub struct Replica {
    index: usize,
    addr: SocketAddr,
    config: PathBuf,
    workspace: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    http: reqwest::Client,
}

impl Replica {
    /// Spawns replica `index` on a free loopback port. It is not ready yet: see
    /// [`Replica::wait_ready`].
    pub fn spawn(
        index: usize,
        config: &Path,
        workspace: &Path,
        log: PathBuf,
        env: Vec<(String, String)>,
    ) -> Replica {
        let port = redis_server::free_port();
        let mut replica = Replica {
            index,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            config: config.to_path_buf(),
            workspace: workspace.to_path_buf(),
            log,
            env,
            child: None,
            http: reqwest::Client::new(),
        };
        replica.respawn();
        replica
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    /// The process id, while the process runs (it is `None` after [`Replica::kill9`]).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether `owner` (a run's `owner`) is this process's replica id, which the server makes of
    /// its host name and pid (`<hostname>-<pid>`, possibly followed by `-<random suffix>`).
    pub fn is_owner(&self, owner: &str) -> bool {
        let Some(pid) = self.pid() else {
            return false;
        };
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "replica".into());
        let prefix = format!("{host}-{pid}");
        owner
            .strip_prefix(&prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    }

    /// Whether the process is still running (a frozen one counts as running).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The log file holding the replica's stdout and stderr, across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the replica's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Kills the process at once (SIGKILL), as a crash would, and reaps it. Its sandboxes live on.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(err) = child.kill() {
                eprintln!("could not kill replica {}: {err}", self.index);
            }
            if let Err(err) = child.wait() {
                eprintln!("could not reap replica {}: {err}", self.index);
            }
        }
    }

    /// Freezes the process (SIGSTOP): its sockets stay open and accept, nothing answers.
    pub fn sigstop(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// Resumes a frozen process (SIGCONT).
    pub fn sigcont(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// Asks the process to shut down (SIGTERM); see [`Replica::wait_exit`].
    pub fn sigterm(&self) {
        self.signal(Signal::SIGTERM);
    }

    fn signal(&self, signal: Signal) {
        let pid = self.pid().unwrap_or_else(|| {
            panic!(
                "replica {} is not running: cannot send {signal}",
                self.index
            )
        });
        let pid = Pid::from_raw(i32::try_from(pid).expect("pid fits in i32"));
        kill(pid, signal)
            .unwrap_or_else(|err| panic!("{signal} to replica {} failed: {err}", self.index));
    }

    /// Waits (polling) until the process exits on its own, and reaps it.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let child = self
                .child
                .as_mut()
                .unwrap_or_else(|| panic!("replica {} is not running", self.index));
            if let Some(status) = child.try_wait().expect("try_wait on replica") {
                self.child = None;
                return status;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "replica {} did not exit within {within:?}; its log ends with:\n{}",
                    self.index,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process if it runs, then starts it again on the same port with the same config,
    /// without waiting for it to be ready.
    pub fn respawn(&mut self) {
        self.kill9();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|err| panic!("cannot open {}: {err}", self.log.display()));
        writeln!(
            log,
            "=== codebolt server, replica {} on {} ===",
            self.index, self.addr
        )
        .expect("write replica log header");
        let stderr: File = log.try_clone().expect("clone replica log handle");
        let mut command = Command::new(env!("CARGO_BIN_EXE_codebolt"));
        command
            .arg("server")
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--config")
            .arg(&self.config)
            .arg("--workspace")
            .arg(&self.workspace)
            .current_dir(&self.workspace)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        for var in OVERRIDE_VARS {
            command.env_remove(var);
        }
        // Plain text in the log files.
        command.env("NO_COLOR", "1");
        command.envs(self.env.clone());
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start replica {}: {err}", self.index));
        self.child = Some(child);
    }

    /// [`Replica::respawn`], then [`Replica::wait_ready`].
    pub async fn restart(&mut self) {
        self.respawn();
        self.wait_ready(REPLICA_READY_TIMEOUT).await;
    }

    /// Polls `GET /readyz` until it answers 200. Panics, with the tail of the replica's log, when
    /// the process exits or the deadline passes first.
    pub async fn wait_ready(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let url = self.url("/readyz");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "replica {} exited ({status}) before it was ready; its log ends with:\n{}",
                        self.index,
                        self.log_tail(LOG_TAIL_LINES)
                    );
                }
            } else {
                panic!("replica {} is not running", self.index);
            }
            let last = match self
                .http
                .get(&url)
                .timeout(Duration::from_secs(1))
                .send()
                .await
            {
                Ok(res) if res.status() == 200 => return,
                Ok(res) => {
                    let status = res.status();
                    format!("{status}: {}", res.text().await.unwrap_or_default())
                }
                Err(err) => err.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "replica {} was not ready at {url} within {within:?} (last: {last}); its log ends with:\n{}",
                    self.index,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster

/// What differs between clusters.
pub struct ClusterSetup {
    /// Written as the config's `timeouts:` section; whole seconds, except the heartbeat
    /// (milliseconds).
    pub timeouts: RunTimeouts,
    /// `timeouts.replica_lease_ms`: how long a replica's heartbeat keeps its runs its own.
    pub replica_lease_ms: u64,
    /// Extra providers, appended under `providers:` after `local` (indented two spaces).
    pub extra_providers: String,
    /// Extra server-level YAML appended verbatim to the config file.
    pub extra_config: String,
    /// Redis keeps its data across a restart (append-only file).
    pub persistent_redis: bool,
    /// Environment of every replica, on top of the test's (minus the `CODEBOLT_*` overrides of
    /// the config file, plus `NO_COLOR=1`).
    pub replicas_env: Vec<(String, String)>,
}

impl Default for ClusterSetup {
    fn default() -> Self {
        ClusterSetup {
            timeouts: fast_timeouts(),
            replica_lease_ms: 1500,
            extra_providers: String::new(),
            extra_config: String::new(),
            persistent_redis: false,
            replicas_env: Vec::new(),
        }
    }
}

/// Replicas of one control plane sharing a `redis-server`, behind a [`LoadBalancer`] that is
/// their `public_url`. Replica `i` is backend `i` of the load balancer.
///
/// When dropped during a panic it prints the tail of every replica's and sandbox's log. Dropping
/// it kills the replicas, then any sandbox (shim and agent) left in the shared work root.
pub struct Cluster {
    /// Client for requests straight to a replica (pooled connections).
    pub http: reqwest::Client,
    /// Client for requests through the load balancer: a new connection per request, so that
    /// consecutive requests are spread over the replicas.
    pub lb_http: reqwest::Client,
    pub workspace: Workspace,
    replicas: Vec<Replica>,
    lb: LoadBalancer,
    redis: RedisServer,
    cluster_id: String,
    config: PathBuf,
    replicas_env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    /// Held while the cluster lives: clusters of one test binary run one at a time, so the
    /// replicas of parallel tests do not starve each other on a small machine.
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl Cluster {
    /// Starts Redis, the load balancer and `n` replicas, waits until every replica is ready, and
    /// routes the load balancer to them.
    pub async fn start(n: usize, workspace: Workspace, setup: ClusterSetup) -> Cluster {
        static CLUSTERS: AtomicUsize = AtomicUsize::new(0);
        static TURN: std::sync::OnceLock<Arc<tokio::sync::Mutex<()>>> = std::sync::OnceLock::new();
        let turn = TURN
            .get_or_init(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone()
            .lock_owned()
            .await;
        let dir = tempfile::tempdir().expect("tempdir for the cluster");
        let redis = if setup.persistent_redis {
            RedisServer::start_persistent()
        } else {
            RedisServer::start()
        };
        let lb = LoadBalancer::start();
        let cluster_id = format!(
            "test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::SeqCst)
        );
        let work_root = dir.path().join("sandboxes");
        std::fs::create_dir_all(&work_root).expect("cluster work root");
        let yaml = format!(
            "providers:\n  local:\n    kind: local\n    shim_path: {}\n    work_root: {}\n{}\
             store: {}\ncluster_id: {cluster_id}\npublic_url: {}\ndata_dir: {}\n{}{}",
            yaml_path(&shim_path()),
            yaml_path(&work_root),
            setup.extra_providers,
            redis.url(),
            lb.base_url(),
            yaml_path(&dir.path().join("data")),
            timeouts_yaml(&setup.timeouts, setup.replica_lease_ms),
            setup.extra_config,
        );
        let config = dir.path().join("codebolt.yaml");
        std::fs::write(&config, yaml).expect("write the cluster config");
        let mut cluster = Cluster {
            http: reqwest::Client::new(),
            lb_http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("load balancer client"),
            workspace,
            replicas: Vec::new(),
            lb,
            redis,
            cluster_id,
            config,
            replicas_env: setup.replicas_env,
            dir,
            _turn: turn,
        };
        for _ in 0..n {
            let replica = cluster.spawn_replica();
            cluster.replicas.push(replica);
        }
        for replica in &mut cluster.replicas {
            replica.wait_ready(REPLICA_READY_TIMEOUT).await;
        }
        cluster.route_all();
        cluster
    }

    fn spawn_replica(&self) -> Replica {
        let index = self.replicas.len();
        Replica::spawn(
            index,
            &self.config,
            self.workspace.path(),
            self.dir.path().join(format!("replica-{index}.log")),
            self.replicas_env.clone(),
        )
    }

    /// Starts one more replica with the same config, waits until it is ready and adds it to the
    /// load balancer. Returns its index.
    pub async fn add_replica(&mut self) -> usize {
        let mut replica = self.spawn_replica();
        replica.wait_ready(REPLICA_READY_TIMEOUT).await;
        self.replicas.push(replica);
        self.route_all();
        self.replicas.len() - 1
    }

    /// Points the load balancer at every replica, dead or alive, replica `i` as backend `i`.
    pub fn route_all(&self) {
        self.lb
            .set_backends(self.replicas.iter().map(Replica::addr).collect());
    }

    /// How many replicas were started (killed ones included).
    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }

    pub fn replica(&self, i: usize) -> &Replica {
        self.replicas
            .get(i)
            .unwrap_or_else(|| panic!("no replica {i}: the cluster has {}", self.replicas.len()))
    }

    pub fn replica_mut(&mut self, i: usize) -> &mut Replica {
        let n = self.replicas.len();
        self.replicas
            .get_mut(i)
            .unwrap_or_else(|| panic!("no replica {i}: the cluster has {n}"))
    }

    pub fn lb(&self) -> &LoadBalancer {
        &self.lb
    }

    /// The shared Redis server (kill it and restart it to simulate an outage).
    pub fn redis(&mut self) -> &mut RedisServer {
        &mut self.redis
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The config file every replica reads.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The `local` provider's work root, shared by all replicas: `<run_id>/` per sandbox.
    pub fn work_root(&self) -> PathBuf {
        self.dir.path().join("sandboxes")
    }

    /// `http://<load balancer><path>`.
    pub fn lb_url(&self, path: &str) -> String {
        format!("{}{path}", self.lb.base_url())
    }

    /// `GET` through the load balancer on a fresh connection: status and JSON body (`Null` when
    /// the body is not JSON).
    pub async fn lb_get(&self, path: &str) -> (u16, Value) {
        let url = self.lb_url(path);
        let res = self
            .lb_http
            .get(&url)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {url} through the load balancer: {err}"));
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// `<replica i><path>`.
    pub fn url_on(&self, i: usize, path: &str) -> String {
        self.replica(i).url(path)
    }

    /// `GET` on replica `i`: status and JSON body (`Null` when the body is not JSON).
    pub async fn get_json_on(&self, i: usize, path: &str) -> (u16, Value) {
        let url = self.url_on(i, path);
        let res = self
            .http
            .get(&url)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {url} on replica {i}: {err}"));
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// `POST /v1/runs` on replica `i`.
    pub async fn create_on(&self, i: usize, body: Value) -> (u16, Value) {
        self.post_on(i, "/v1/runs", Some(body)).await
    }

    /// Creates a run of `agent` on replica `i`, asserting 201.
    pub async fn start_run_on(&self, i: usize, agent: &str, task: &str) -> RunRecord {
        let (status, body) = self
            .create_on(i, json!({"agent": agent, "task": task}))
            .await;
        assert_eq!(
            status, 201,
            "creating a run of {agent} on replica {i} failed: {body}"
        );
        serde_json::from_value(body).expect("run record")
    }

    /// `GET /v1/runs/{id}` on replica `i`, asserting 200.
    pub async fn get_on(&self, i: usize, id: uuid::Uuid) -> RunRecord {
        let (status, body) = self.get_json_on(i, &format!("/v1/runs/{id}")).await;
        assert_eq!(status, 200, "GET run {id} on replica {i}: {body}");
        serde_json::from_value(body).expect("run record")
    }

    /// `POST <path>` on replica `i`: status and JSON body (`Null` when there is none).
    pub async fn post_on(&self, i: usize, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = self.url_on(i, path);
        let mut req = self.http.post(&url).timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req
            .send()
            .await
            .unwrap_or_else(|err| panic!("POST {url} on replica {i}: {err}"));
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Polls the run on replica `i` until `pred` holds.
    pub async fn wait_for_on(
        &self,
        i: usize,
        id: uuid::Uuid,
        pred: impl Fn(&RunRecord) -> bool,
        within: Duration,
    ) -> RunRecord {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let record = self.get_on(i, id).await;
            if pred(&record) {
                return record;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {id} (read on replica {i}) did not reach the expected state within {within:?}; last: {} {:?}",
                record.state,
                record.failure
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_state_on(
        &self,
        i: usize,
        id: uuid::Uuid,
        state: RunState,
        within: Duration,
    ) -> RunRecord {
        self.wait_for_on(i, id, |r| r.state == state, within).await
    }

    pub async fn wait_terminal_on(&self, i: usize, id: uuid::Uuid, within: Duration) -> RunRecord {
        let record = self
            .wait_for_on(i, id, |r| r.state.is_terminal(), within)
            .await;
        // The final event is written right after the record; let it land.
        self.events_on(i, id).await;
        record
    }

    /// The run's whole history as replica `i` serves it (not following).
    pub async fn events_on(&self, i: usize, id: uuid::Uuid) -> Vec<RunEvent> {
        parse_sse(&self.text_on(i, &format!("/v1/runs/{id}/events")).await)
    }

    /// The run's log lines from `source` (`agent` or `provider`) as replica `i` serves them.
    pub async fn logs_on(&self, i: usize, id: uuid::Uuid, source: &str) -> Vec<String> {
        parse_sse::<Value>(
            &self
                .text_on(i, &format!("/v1/runs/{id}/logs?source={source}"))
                .await,
        )
        .into_iter()
        .map(|l| l["line"].as_str().unwrap_or_default().to_string())
        .collect()
    }

    async fn text_on(&self, i: usize, path: &str) -> String {
        let url = self.url_on(i, path);
        let res = self
            .http
            .get(&url)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {url} on replica {i}: {err}"));
        assert_eq!(res.status(), 200, "GET {url} on replica {i}");
        res.text()
            .await
            .unwrap_or_else(|err| panic!("body of GET {url} on replica {i}: {err}"))
    }

    /// Prints the tail of every replica's log and of every sandbox's `provider.log` to stderr.
    pub fn dump_logs(&self) {
        for replica in &self.replicas {
            eprintln!(
                "----- replica {} ({}, {}) log tail -----\n{}",
                replica.index,
                replica.addr,
                replica.log.display(),
                replica.log_tail(LOG_TAIL_LINES)
            );
        }
        for sandbox in self.sandbox_dirs() {
            let log = sandbox.join("provider.log");
            eprintln!(
                "----- sandbox {} provider.log tail -----\n{}",
                sandbox.display(),
                tail(&log, 20)
            );
        }
    }

    fn sandbox_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(self.work_root())
            .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        dirs.sort();
        dirs
    }

    /// Kills the process groups of every shim and agent left in the shared work root.
    fn kill_sandboxes(&self) {
        for dir in self.sandbox_dirs() {
            let shim = std::fs::read_to_string(dir.join("sandbox.json"))
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .and_then(|file| file["pid"].as_u64());
            let agent = std::fs::read_to_string(dir.join("work/agent.pid"))
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok());
            for pid in [shim, agent].into_iter().flatten() {
                let Ok(pid) = u32::try_from(pid) else {
                    continue;
                };
                if pid_alive(pid) {
                    if let Ok(pid) = i32::try_from(pid) {
                        if let Err(err) = killpg(Pid::from_raw(pid), Signal::SIGKILL) {
                            eprintln!("could not kill leftover process group {pid}: {err}");
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for replica in &mut self.replicas {
            replica.kill9();
        }
        self.kill_sandboxes();
    }
}

/// A path as a YAML scalar (a JSON string is a valid double-quoted YAML scalar).
fn yaml_path(path: &Path) -> String {
    serde_json::to_string(&path.display().to_string()).expect("path as yaml")
}

/// The `timeouts:` section for `t`. Panics on values the config file cannot express.
fn timeouts_yaml(t: &RunTimeouts, replica_lease_ms: u64) -> String {
    fn secs(key: &str, d: Duration) -> u64 {
        assert!(
            d.subsec_nanos() == 0,
            "ClusterSetup.timeouts: {key} = {d:?}, but the config file takes whole seconds"
        );
        d.as_secs()
    }
    let heartbeat_ms = u64::try_from(t.heartbeat_interval.as_millis()).expect("heartbeat in ms");
    assert!(
        heartbeat_ms > 0 && Duration::from_millis(heartbeat_ms) == t.heartbeat_interval,
        "ClusterSetup.timeouts: heartbeat_interval = {:?}, but the config file takes whole milliseconds",
        t.heartbeat_interval
    );
    let mut yaml = format!(
        "timeouts:\n  startup_s: {}\n  tool_call_s: {}\n  idle_s: {}\n  stop_grace_s: {}\n  \
         lost_after_s: {}\n  heartbeat_interval_ms: {heartbeat_ms}\n  token_max_lifetime_s: {}\n  \
         replica_lease_ms: {replica_lease_ms}\n",
        secs("startup", t.startup),
        secs("tool_call", t.tool_call),
        secs("idle", t.idle),
        secs("stop_grace", t.stop_grace),
        secs("lost_after", t.lost_after),
        secs("token_max_lifetime", t.token_max_lifetime),
    );
    if let Some(ttl) = t.run_ttl {
        yaml.push_str(&format!("  run_ttl_s: {}\n", secs("run_ttl", ttl)));
    }
    yaml
}

/// The last `lines` lines of a file, or a note that it cannot be read.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}
