//! The local provider: the agent-shim as a child process of the control plane's machine.
//!
//! Each sandbox is a directory `<work_root>/<run_id>/` holding `sandbox.json` (pid and labels),
//! the shim's output `provider.log`, and `work/`, where the shim unpacks the bundle and runs the
//! agent. The shim runs in its own process group, so it outlives the control plane that spawned
//! it; the agent runs in a process group of its own, whose id the shim writes to `work/agent.pid`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use super::{
    LogStream, Provider, ProviderError, ProviderHealth, ProviderLogLine, SandboxExit,
    SandboxHandle, SandboxInfo, SpawnRequest,
};
use crate::model::Usage;

/// Environment variables a local sandbox inherits from the control plane; nothing else leaks in.
const INHERITED_ENV: [&str; 6] = ["PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "RUST_LOG"];

#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub shim_path: PathBuf,
    pub work_root: PathBuf,
    /// How often `wait` polls a sandbox this process did not start (after a restart).
    pub poll_interval: Duration,
}

#[derive(Debug, Serialize, Deserialize)]
struct SandboxFile {
    pid: u32,
    labels: BTreeMap<String, String>,
}

/// A sandbox this process started: its exit is observed directly.
struct Child {
    exit: watch::Receiver<Option<SandboxExit>>,
    /// The sandbox's directory.
    dir: PathBuf,
}

pub struct LocalProvider {
    config: LocalConfig,
    host: String,
    children: Mutex<HashMap<u32, Child>>,
}

fn op_error(operation: &'static str, err: impl std::fmt::Display) -> ProviderError {
    ProviderError::Operation {
        operation,
        message: err.to_string(),
    }
}

fn pid_of(sandbox: &SandboxHandle) -> Result<u32, ProviderError> {
    sandbox
        .id
        .parse()
        .map_err(|_| ProviderError::SandboxNotFound {
            id: sandbox.id.clone(),
        })
}

fn alive(pid: u32) -> bool {
    // Signal 0 checks existence; a zombie still counts until reaped, so also read its state.
    let exists = nix::sys::signal::kill(Pid::from_raw(pid as i32), None).is_ok();
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    != Some("Z")
            })
            .unwrap_or(false)
}

/// Sends `signal` to a process group, treating "no such process" as done.
fn signal_group(pgid: u32, signal: Signal) -> Result<(), ProviderError> {
    match killpg(Pid::from_raw(pgid as i32), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(err) => Err(op_error(
            "signal",
            format!("{signal} to group {pgid}: {err}"),
        )),
    }
}

impl LocalProvider {
    /// The pid of a sandbox this provider started on this machine. A handle naming another
    /// machine (a run adopted by a replica elsewhere) is refused: its pid means nothing here,
    /// and signalling it would reach an unrelated process.
    fn own_pid(&self, sandbox: &SandboxHandle) -> Result<u32, ProviderError> {
        let pid = pid_of(sandbox)?;
        if sandbox.remote_host != self.remote_host(pid) {
            return Err(op_error(
                "reach",
                format!(
                    "sandbox {} runs on '{}', not on this machine ('{}'); the local provider \
                     reaches only its own machine's processes",
                    sandbox.id, sandbox.remote_host, self.host
                ),
            ));
        }
        Ok(pid)
    }

    fn remote_host(&self, pid: u32) -> String {
        format!("{} (pid {pid})", self.host)
    }

    pub fn new(config: LocalConfig) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".to_string());
        LocalProvider {
            config,
            host,
            children: Mutex::new(HashMap::new()),
        }
    }

    fn sandbox_dir(&self, run_id: &str) -> PathBuf {
        self.config.work_root.join(run_id)
    }

    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Child>> {
        self.children
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The sandbox directory of a pid: known for sandboxes this process started; for others
    /// (started before a restart) found by reading the sandbox files.
    async fn dir_of(&self, pid: u32) -> Option<PathBuf> {
        if let Some(child) = self.children().get(&pid) {
            return Some(child.dir.clone());
        }
        let mut entries = tokio::fs::read_dir(&self.config.work_root).await.ok()?;
        while let Ok(Some(entry)) = entries.next_entry().await {
            let file = entry.path().join("sandbox.json");
            if let Ok(text) = tokio::fs::read_to_string(&file).await {
                if serde_json::from_str::<SandboxFile>(&text).is_ok_and(|f| f.pid == pid) {
                    return Some(entry.path());
                }
            }
        }
        None
    }
}

/// Copies one output of the shim into the provider log, a line at a time, tagged by stream.
async fn pump(
    reader: impl tokio::io::AsyncRead + Unpin,
    stream: &'static str,
    log: Arc<tokio::sync::Mutex<tokio::fs::File>>,
) {
    let mut lines = BufReader::new(reader).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => {
                let entry = format!("{stream}\t{line}\n");
                if let Err(err) = log.lock().await.write_all(entry.as_bytes()).await {
                    tracing::warn!(error = %err, "could not write provider log");
                    return;
                }
            }
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(error = %err, stream, "could not read sandbox output");
                return;
            }
        }
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn spawn(&self, request: SpawnRequest) -> Result<SandboxHandle, ProviderError> {
        let dir = self.sandbox_dir(&request.run_id.to_string());
        let work = dir.join("work");
        tokio::fs::create_dir_all(&work)
            .await
            .map_err(|err| ProviderError::SpawnFailed {
                message: format!("cannot create {}: {err}", work.display()),
            })?;
        let log_path = dir.join("provider.log");
        let log =
            tokio::fs::File::create(&log_path)
                .await
                .map_err(|err| ProviderError::SpawnFailed {
                    message: format!("cannot create {}: {err}", log_path.display()),
                })?;
        let mut command = tokio::process::Command::new(&self.config.shim_path);
        command
            .env_clear()
            .envs(
                INHERITED_ENV
                    .iter()
                    .filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))),
            )
            .envs(&request.env)
            .env(agent_shim::protocol::env::WORK_DIR, &work)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: survives the control plane, killed as a group.
            .process_group(0)
            .kill_on_drop(false);
        let spawned = {
            let _start = tracing::info_span!(
                "process.start",
                process.executable.path = %self.config.shim_path.display()
            )
            .entered();
            command.spawn()
        };
        let mut child = spawned.map_err(|err| ProviderError::SpawnFailed {
            message: format!(
                "cannot start the agent-shim at {}: {err}",
                self.config.shim_path.display()
            ),
        })?;
        let pid = child.id().ok_or_else(|| ProviderError::SpawnFailed {
            message: "the agent-shim exited at once".into(),
        })?;
        let file = SandboxFile {
            pid,
            labels: request.labels.clone(),
        };
        let json = serde_json::to_vec(&file).map_err(|err| op_error("spawn", err))?;
        tokio::fs::write(dir.join("sandbox.json"), json)
            .await
            .map_err(|err| ProviderError::SpawnFailed {
                message: format!("cannot write sandbox file in {}: {err}", dir.display()),
            })?;

        let log = Arc::new(tokio::sync::Mutex::new(log));
        let (tx, rx) = watch::channel(None);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        tokio::spawn(async move {
            let out = async {
                if let Some(s) = stdout {
                    pump(s, "stdout", log.clone()).await;
                }
            };
            let err = async {
                if let Some(s) = stderr {
                    pump(s, "stderr", log.clone()).await;
                }
            };
            let status = async { child.wait().await };
            let (_, _, status) = tokio::join!(out, err, status);
            let exit = match status {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    SandboxExit {
                        code: status.code(),
                        signal: status.signal(),
                        oom_killed: false,
                    }
                }
                Err(err) => {
                    tracing::warn!(pid, error = %err, "could not wait for the agent-shim");
                    SandboxExit {
                        code: None,
                        signal: None,
                        oom_killed: false,
                    }
                }
            };
            if tx.send(Some(exit)).is_err() {
                tracing::debug!(pid, "sandbox exit observed with nobody waiting");
            }
        });
        self.children().insert(pid, Child { exit: rx, dir });
        Ok(SandboxHandle {
            id: pid.to_string(),
            remote_host: self.remote_host(pid),
        })
    }

    async fn wait(&self, sandbox: &SandboxHandle) -> Result<SandboxExit, ProviderError> {
        let pid = self.own_pid(sandbox)?;
        let watcher = self.children().get(&pid).map(|c| c.exit.clone());
        match watcher {
            Some(mut rx) => {
                let exit = rx
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|err| op_error("wait", err))?;
                Ok(exit.clone().unwrap_or(SandboxExit {
                    code: None,
                    signal: None,
                    oom_killed: false,
                }))
            }
            None => {
                // Started by an earlier control-plane process: poll until it is gone.
                while alive(pid) {
                    tokio::time::sleep(self.config.poll_interval).await;
                }
                Ok(SandboxExit {
                    code: None,
                    signal: None,
                    oom_killed: false,
                })
            }
        }
    }

    async fn stop(&self, sandbox: &SandboxHandle) -> Result<(), ProviderError> {
        signal_group(self.own_pid(sandbox)?, Signal::SIGTERM)
    }

    async fn kill(&self, sandbox: &SandboxHandle) -> Result<(), ProviderError> {
        let pid = self.own_pid(sandbox)?;
        let dir = self.dir_of(pid).await;
        if let Some(dir) = &dir {
            // The agent runs in its own group; the shim recorded its id.
            if let Ok(text) = tokio::fs::read_to_string(dir.join("work").join("agent.pid")).await {
                if let Ok(agent) = text.trim().parse::<u32>() {
                    signal_group(agent, Signal::SIGKILL)?;
                }
            }
        }
        signal_group(pid, Signal::SIGKILL)?;
        let watcher = self.children().get(&pid).map(|c| c.exit.clone());
        if let Some(mut rx) = watcher {
            if let Err(err) = rx.wait_for(Option::is_some).await {
                tracing::debug!(pid, error = %err, "sandbox watcher gone");
            }
        }
        if let Some(dir) = dir {
            tokio::fs::remove_dir_all(&dir).await.map_err(|err| {
                op_error("kill", format!("cannot remove {}: {err}", dir.display()))
            })?;
        }
        self.children().remove(&pid);
        Ok(())
    }

    async fn logs(
        &self,
        sandbox: &SandboxHandle,
        follow: bool,
    ) -> Result<LogStream, ProviderError> {
        let pid = self.own_pid(sandbox)?;
        let dir = self
            .dir_of(pid)
            .await
            .ok_or_else(|| ProviderError::SandboxNotFound {
                id: sandbox.id.clone(),
            })?;
        let file = tokio::fs::File::open(dir.join("provider.log"))
            .await
            .map_err(|err| op_error("logs", err))?;
        let interval = self.config.poll_interval;
        let lines = BufReader::new(file).lines();
        let stream = futures_util::stream::unfold(
            (lines, follow, pid),
            move |(mut lines, mut follow, pid)| async move {
                loop {
                    match lines.next_line().await {
                        Ok(Some(raw)) => {
                            return Some((Ok(parse_log_line(&raw)), (lines, follow, pid)))
                        }
                        // Keep following while the sandbox runs; then read what it wrote last.
                        Ok(None) if follow && alive(pid) => tokio::time::sleep(interval).await,
                        Ok(None) if follow => follow = false,
                        Ok(None) => return None,
                        Err(err) => return Some((Err(op_error("logs", err)), (lines, false, pid))),
                    }
                }
            },
        );
        Ok(stream.boxed())
    }

    async fn usage(&self, sandbox: &SandboxHandle) -> Result<Option<Usage>, ProviderError> {
        let pid = self.own_pid(sandbox)?;
        let Some(dir) = self.dir_of(pid).await else {
            return Ok(None);
        };
        // The shim leads one process group, the agent (and whatever it starts) another.
        let mut groups = vec![pid];
        if let Ok(text) = tokio::fs::read_to_string(dir.join("work").join("agent.pid")).await {
            if let Ok(agent) = text.trim().parse::<u32>() {
                groups.push(agent);
            }
        }
        let total = groups_rss(&groups)
            .await
            .map_err(|err| op_error("usage", format!("cannot read /proc: {err}")))?;
        Ok(Some(Usage {
            memory_bytes: Some(total),
            reported_at: Some(chrono::Utc::now()),
            ..Usage::default()
        }))
    }

    async fn list(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<SandboxInfo>, ProviderError> {
        let mut found = Vec::new();
        let mut entries = match tokio::fs::read_dir(&self.config.work_root).await {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(err) => return Err(op_error("list", err)),
        };
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|err| op_error("list", err))?
        {
            let Ok(text) = tokio::fs::read_to_string(entry.path().join("sandbox.json")).await
            else {
                continue;
            };
            let file: SandboxFile = match serde_json::from_str(&text) {
                Ok(file) => file,
                Err(err) => {
                    tracing::warn!(dir = %entry.path().display(), error = %err, "unreadable sandbox file");
                    continue;
                }
            };
            if labels.iter().all(|(k, v)| file.labels.get(k) == Some(v)) {
                found.push(SandboxInfo {
                    handle: SandboxHandle {
                        id: file.pid.to_string(),
                        remote_host: self.remote_host(file.pid),
                    },
                    labels: file.labels,
                    running: alive(file.pid),
                });
            }
        }
        Ok(found)
    }

    async fn health(&self) -> ProviderHealth {
        let shim = &self.config.shim_path;
        match tokio::fs::metadata(shim).await {
            Ok(meta) if meta.is_file() => ProviderHealth {
                healthy: true,
                message: None,
            },
            Ok(_) => ProviderHealth {
                healthy: false,
                message: Some(format!("{} is not a file", shim.display())),
            },
            Err(err) => ProviderHealth {
                healthy: false,
                message: Some(format!(
                    "agent-shim not usable at {}: {err}",
                    shim.display()
                )),
            },
        }
    }
}

/// A provider log line is `stream<TAB>line`.
fn parse_log_line(raw: &str) -> ProviderLogLine {
    match raw.split_once('\t') {
        Some((stream, line)) => ProviderLogLine {
            stream: stream.to_string(),
            line: line.to_string(),
        },
        None => ProviderLogLine {
            stream: "stdout".to_string(),
            line: raw.to_string(),
        },
    }
}

/// Resident memory of every process in the process groups `groups`, in bytes.
async fn groups_rss(groups: &[u32]) -> std::io::Result<u64> {
    let mut total = 0;
    let mut entries = tokio::fs::read_dir("/proc").await?;
    while let Some(entry) = entries.next_entry().await? {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end between the listing and the reads: it no longer counts.
        let Ok(stat) = tokio::fs::read_to_string(format!("/proc/{pid}/stat")).await else {
            continue;
        };
        if !stat_group(&stat).is_some_and(|group| groups.contains(&group)) {
            continue;
        }
        if let Ok(status) = tokio::fs::read_to_string(format!("/proc/{pid}/status")).await {
            total += rss_bytes(&status).unwrap_or(0);
        }
    }
    Ok(total)
}

/// The process group in a `/proc/<pid>/stat` line (the third field after the command name,
/// which is in parentheses and may hold anything).
fn stat_group(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(2)?.parse().ok()
}

fn rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Where the shim binary is expected when no path is configured: next to the running executable.
pub fn default_shim_path(exe: &Path) -> PathBuf {
    exe.parent()
        .map(|dir| dir.join("agent-shim"))
        .unwrap_or_else(|| PathBuf::from("agent-shim"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_from_proc_status() {
        let status = "Name:\tsh\nVmRSS:\t    1234 kB\nThreads:\t1\n";
        assert_eq!(rss_bytes(status), Some(1234 * 1024));
        assert_eq!(rss_bytes("Name:\tsh\n"), None);
    }

    #[test]
    fn the_group_is_read_from_a_stat_line_whatever_the_command_name() {
        assert_eq!(
            stat_group("42 (a) b (c) S 1 4242 4242 0 -1 4194560 ..."),
            Some(4242)
        );
        assert_eq!(stat_group("7 (sh) R 1 7 7 0"), Some(7));
        assert_eq!(stat_group("7 (sh"), None);
    }

    #[tokio::test]
    async fn usage_counts_every_process_of_the_groups() {
        use std::os::unix::process::CommandExt;
        let rss = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|status| rss_bytes(&status))
                .unwrap_or(0)
        };
        // A group leader that starts two more processes of the group.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let group = leader.id();
        let mut counted = (0, 0);
        for _ in 0..100 {
            let children: Vec<u32> =
                std::fs::read_to_string(format!("/proc/{group}/task/{group}/children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|pid| pid.parse().ok())
                    .collect();
            // Counted once both children run `sleep` (their memory no longer changes).
            let sleeping = children.len() == 2
                && children.iter().all(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|comm| comm.trim() == "sleep")
                });
            if sleeping {
                let expected = rss(group) + children.iter().map(|pid| rss(*pid)).sum::<u64>();
                counted = (groups_rss(&[group]).await.unwrap(), expected);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        signal_group(group, Signal::SIGKILL).unwrap();
        leader.wait().unwrap();
        let (seen, expected) = counted;
        assert!(expected > 0, "the group never came up");
        assert_eq!(seen, expected, "the leader and both children, nothing else");
        // A group nobody is in holds nothing.
        assert_eq!(groups_rss(&[u32::MAX - 1]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_sandbox_on_another_machine_is_refused_not_signalled() {
        let root = tempfile::tempdir().unwrap();
        let provider = LocalProvider::new(LocalConfig {
            shim_path: PathBuf::from("/nonexistent/agent-shim"),
            work_root: root.path().to_path_buf(),
            poll_interval: Duration::from_millis(10),
        });
        // This test's own process group: were it signalled, the test would die.
        let own = nix::unistd::getpgrp().as_raw() as u32;
        let elsewhere = SandboxHandle {
            id: own.to_string(),
            remote_host: format!("not-{} (pid {own})", provider.host),
        };
        let named = |err: ProviderError| {
            let text = err.to_string();
            assert!(
                text.contains(&elsewhere.remote_host) && text.contains("not on this machine"),
                "{text}"
            );
        };
        named(provider.stop(&elsewhere).await.unwrap_err());
        named(provider.kill(&elsewhere).await.unwrap_err());
        named(provider.wait(&elsewhere).await.unwrap_err());
        named(provider.usage(&elsewhere).await.unwrap_err());
        named(provider.logs(&elsewhere, false).await.err().unwrap());
        // The same pid named on this machine is this provider's to reach: polled, not refused.
        let here = SandboxHandle {
            id: own.to_string(),
            remote_host: provider.remote_host(own),
        };
        assert_eq!(provider.own_pid(&here).unwrap(), own);
    }
}
