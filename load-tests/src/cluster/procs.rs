//! The processes of a cluster: one `redis-server`, N `codebolt server` replicas sharing it and one
//! config file, and the load balancer that is their `public_url`.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::lb::LoadBalancer;
use crate::fixture::{self, Api};

/// How long a replica may take from spawn to `/readyz` answering 200.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Variables that would override the config file; not passed on to the replicas.
const OVERRIDE_VARS: [&str; 5] = [
    "CODEBOLT_CONFIG",
    "CODEBOLT_STORE",
    "CODEBOLT_PUBLIC_URL",
    "CODEBOLT_CLUSTER_ID",
    "CODEBOLT_API_TOKENS",
];

/// A loopback port nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("looking for a free port")?;
    Ok(listener.local_addr()?.port())
}

/// CPU time (user + system) a process used so far, in seconds; `None` once it is gone.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name; in ticks of
    // USER_HZ, which Linux fixes at 100.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// A `redis-server` child on a free port, without persistence; killed when dropped.
pub struct RedisServer {
    port: u16,
    child: Child,
    conn: redis::aio::MultiplexedConnection,
    _dir: tempfile::TempDir,
}

/// What `INFO` says about the work Redis did so far.
#[derive(Debug, Clone, Default)]
pub struct RedisCounters {
    /// Calls per command (`INFO commandstats`), commands run inside scripts included.
    pub calls: BTreeMap<String, u64>,
    /// `total_commands_processed` (`INFO stats`).
    pub commands_processed: u64,
    /// `used_cpu_user + used_cpu_sys` (`INFO cpu`), seconds.
    pub cpu_s: f64,
}

impl RedisCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &RedisCounters) -> RedisCounters {
        let delta = |now: &BTreeMap<String, u64>, then: &BTreeMap<String, u64>| {
            now.iter()
                .map(|(name, n)| {
                    let before = then.get(name).copied().unwrap_or(0);
                    (name.clone(), n.saturating_sub(before))
                })
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        RedisCounters {
            calls: delta(&self.calls, &earlier.calls),
            commands_processed: self
                .commands_processed
                .saturating_sub(earlier.commands_processed),
            cpu_s: self.cpu_s - earlier.cpu_s,
        }
    }

    pub fn total_calls(&self) -> u64 {
        self.calls.values().sum()
    }
}

impl RedisServer {
    pub async fn start() -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir = tempfile::Builder::new()
            .prefix("codebolt-load-redis-")
            .tempdir()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting redis-server (install it: apt-get install redis-server)")?;
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = loop {
            match client.get_multiplexed_async_connection().await {
                Ok(conn) => break conn,
                Err(err) if Instant::now() > deadline => {
                    bail!("redis-server on port {port} did not answer within 10 s: {err}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        Ok(RedisServer {
            port,
            child,
            conn,
            _dir: dir,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    async fn info(&self, section: &str) -> anyhow::Result<String> {
        let mut conn = self.conn.clone();
        redis::cmd("INFO")
            .arg(section)
            .query_async::<String>(&mut conn)
            .await
            .with_context(|| format!("INFO {section}"))
    }

    pub async fn counters(&self) -> anyhow::Result<RedisCounters> {
        let mut counters = RedisCounters::default();
        for line in self.info("commandstats").await?.lines() {
            // cmdstat_evalsha:calls=12,usec=34,...
            let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("INFO commandstats line {line:?}"))?;
            counters.calls.insert(name.to_string(), calls);
        }
        let value = |text: &str, key: &str| -> Option<String> {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        };
        let stats = self.info("stats").await?;
        counters.commands_processed = value(&stats, "total_commands_processed")
            .and_then(|v| v.parse().ok())
            .context("INFO stats: total_commands_processed")?;
        let cpu = self.info("cpu").await?;
        for key in ["used_cpu_user", "used_cpu_sys"] {
            counters.cpu_s += value(&cpu, key)
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("INFO cpu: {key}"))?;
        }
        Ok(counters)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Err: it already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `codebolt server` child: a loopback port, the cluster's config file, its output in a log
/// file. Killed (SIGKILL) when dropped.
pub struct Replica {
    pub index: usize,
    pub addr: SocketAddr,
    pub api: Api,
    log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn spawn(
        index: usize,
        binary: &Path,
        config: &Path,
        workspace: &Path,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("server")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--config")
            .arg(config)
            .arg("--workspace")
            .arg(workspace)
            .current_dir(workspace)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // One JSON object a line: level, target and message are fields.
            .env("CODEBOLT_LOG_FORMAT", "json");
        for var in OVERRIDE_VARS {
            command.env_remove(var);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting replica {index}: {}", binary.display()))?;
        Ok(Replica {
            index,
            addr,
            api: Api::new(&format!("http://{addr}"))?,
            log,
            child: Some(child),
        })
    }

    /// Polls `GET /readyz` until it answers 200.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("{}/readyz", self.api.base);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                bail!(
                    "replica {} exited ({status}) before it was ready; its log ends with:\n{}",
                    self.index,
                    self.log_tail(30)
                );
            }
            let last = match self
                .api
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                Ok(res) if res.status() == 200 => return Ok(()),
                Ok(res) => res.status().to_string(),
                Err(err) => err.to_string(),
            };
            if Instant::now() > deadline {
                bail!(
                    "replica {} was not ready at {url} within {READY_TIMEOUT:?} (last: {last}); its log ends with:\n{}",
                    self.index,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<String> {
        self.child.as_ref().map(|c| c.id().to_string())
    }

    pub fn is_alive(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, as a crash would, and reap. Its sandboxes live on.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Every line of its log.
    pub fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// `GET /metrics`: the value of each unlabelled counter.
    pub async fn counters(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let text = self
            .api
            .http
            .get(format!("{}/metrics", self.api.base))
            .timeout(Duration::from_secs(10))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains('{'))
            .filter_map(|l| {
                let (name, value) = l.split_once(' ')?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Timing of the cluster's runs (`timeouts:` of the config file); the server closes a shim
/// connection silent for 3 heartbeat intervals.
fn timeouts_yaml(heartbeat_ms: u64) -> String {
    format!(
        "timeouts:\n  heartbeat_interval_ms: {heartbeat_ms}\n  lost_after_s: 20\n  \
         replica_lease_ms: 2000\n  idle_s: 600\n  startup_s: 60\n"
    )
}

/// Replicas of one control plane on one Redis behind one load balancer. Dropping it kills the
/// replicas, then every sandbox left in the work root, then Redis.
pub struct Cluster {
    pub replicas: Vec<Replica>,
    pub lb: LoadBalancer,
    pub redis: RedisServer,
    work_root: PathBuf,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts Redis, the load balancer and `n` replicas of `codebolt` (the binary) serving
    /// `workspace`, whose `local` provider starts `sandbox` for every run; waits until all are
    /// ready.
    pub async fn start(
        n: usize,
        codebolt: &Path,
        workspace: &Path,
        sandbox: &Path,
        heartbeat_ms: u64,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("codebolt-load-cluster-")
            .tempdir()?;
        let redis = RedisServer::start().await?;
        let lb = LoadBalancer::start()?;
        let work_root = dir.path().join("sandboxes");
        std::fs::create_dir_all(&work_root)?;
        let quoted = |p: &Path| serde_json::to_string(&p.display().to_string());
        let yaml = format!(
            "providers:\n  local:\n    kind: local\n    shim_path: {}\n    work_root: {}\n\
             store: {}\ncluster_id: load-{}-{}\npublic_url: {}\ndata_dir: {}\n{}",
            quoted(sandbox)?,
            quoted(&work_root)?,
            redis.url(),
            std::process::id(),
            n,
            lb.base_url(),
            quoted(&dir.path().join("data"))?,
            timeouts_yaml(heartbeat_ms),
        );
        let config = dir.path().join("codebolt.yaml");
        std::fs::write(&config, yaml)?;
        let mut replicas = Vec::with_capacity(n);
        for index in 0..n {
            replicas.push(Replica::spawn(
                index,
                codebolt,
                &config,
                workspace,
                dir.path().join(format!("replica-{index}.log")),
            )?);
        }
        for replica in &mut replicas {
            replica.wait_ready().await?;
        }
        lb.set_backends(replicas.iter().map(|r| r.addr).collect());
        Ok(Cluster {
            replicas,
            lb,
            redis,
            work_root,
            dir,
        })
    }

    /// Where the replicas' logs and the config file are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Copies the config file and the replicas' logs into `to`.
    pub fn copy_logs(&self, to: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
        for entry in std::fs::read_dir(self.dir.path())?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".log") || name.ends_with(".yaml") {
                std::fs::copy(entry.path(), to.join(&*name))
                    .with_context(|| format!("copying {name} to {}", to.display()))?;
            }
        }
        Ok(())
    }

    /// The API of a replica that is alive, chosen by `i` round-robin.
    pub fn live_api(&self, i: usize) -> &Api {
        let live: Vec<&Replica> = self.replicas.iter().filter(|r| r.is_alive()).collect();
        &live[i % live.len()].api
    }

    /// Kills (SIGKILL) the process group of every sandbox in the work root.
    fn kill_sandboxes(&self) {
        let Ok(entries) = std::fs::read_dir(&self.work_root) else {
            return;
        };
        for entry in entries.flatten() {
            let pid = std::fs::read_to_string(entry.path().join("sandbox.json"))
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|file| file["pid"].as_i64())
                .and_then(|pid| i32::try_from(pid).ok());
            if let Some(pid) = pid {
                // Each sandbox is its own process group; ESRCH: already gone.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for replica in &mut self.replicas {
            replica.kill9();
        }
        self.kill_sandboxes();
    }
}

/// The `codebolt` binary next to this one.
pub fn codebolt_binary() -> anyhow::Result<PathBuf> {
    fixture::sibling_binary("codebolt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_since_subtract_and_drop_idle_commands() {
        let before = RedisCounters {
            calls: BTreeMap::from([("evalsha".into(), 10), ("get".into(), 5)]),
            commands_processed: 15,
            cpu_s: 1.0,
        };
        let after = RedisCounters {
            calls: BTreeMap::from([
                ("evalsha".into(), 30),
                ("get".into(), 5),
                ("xadd".into(), 40),
            ]),
            commands_processed: 75,
            cpu_s: 1.5,
        };
        let delta = after.since(&before);
        assert_eq!(
            delta.calls,
            BTreeMap::from([("evalsha".into(), 20), ("xadd".into(), 40)])
        );
        assert_eq!(delta.total_calls(), 60);
        assert_eq!(delta.commands_processed, 60);
        assert!((delta.cpu_s - 0.5).abs() < 1e-9);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        assert!(cpu_seconds("self").is_some_and(|s| s >= 0.0));
        assert_eq!(cpu_seconds("not-a-pid"), None);
    }
}
