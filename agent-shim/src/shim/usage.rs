//! Resource usage of the agent: the container's cgroup v2 when the shim runs in its own cgroup
//! namespace, otherwise the processes of the agent's process group from /proc.

use std::path::PathBuf;
use std::time::Instant;

use crate::protocol::UsageReport;

/// Linux reports /proc CPU times in USER_HZ, which is 100 on every mainstream architecture.
const USER_HZ: f64 = 100.0;

#[derive(Debug)]
enum Source {
    /// cgroup v2 directory (cpu.stat usage_usec, memory.current).
    Cgroup(PathBuf),
    /// Every /proc/<pid> whose process group is this one.
    ProcessGroup(u32),
}

#[derive(Debug)]
pub struct UsageSampler {
    source: Source,
    last: Option<(Instant, f64)>,
}

impl UsageSampler {
    pub fn new(agent_pid: u32) -> Self {
        let source = match namespaced_cgroup() {
            Some(dir) => Source::Cgroup(dir),
            None => Source::ProcessGroup(agent_pid),
        };
        UsageSampler { source, last: None }
    }

    /// Reads current usage; CPU is the average over the interval since the previous sample.
    pub fn sample(&mut self) -> Option<UsageReport> {
        let now = Instant::now();
        let (cpu_seconds, memory_bytes) = match &self.source {
            Source::Cgroup(dir) => {
                let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok();
                let cpu = stat.as_deref().and_then(parse_cgroup_cpu_usec);
                let mem = std::fs::read_to_string(dir.join("memory.current"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok());
                (cpu.map(|usec| usec as f64 / 1e6), mem)
            }
            Source::ProcessGroup(pgid) => group_usage(*pgid)?,
        };
        let cpu_pct = match (cpu_seconds, self.last) {
            (Some(now_s), Some((then, then_s))) => {
                let wall = now.duration_since(then).as_secs_f64();
                (wall > 0.0)
                    .then(|| ((now_s - then_s).max(0.0) / wall * 100.0 * 10.0).round() / 10.0)
            }
            _ => None,
        };
        if let Some(s) = cpu_seconds {
            self.last = Some((now, s));
        }
        if cpu_pct.is_none() && memory_bytes.is_none() {
            return None;
        }
        Some(UsageReport {
            cpu_pct,
            memory_bytes,
        })
    }
}

/// The shim's cgroup directory if it sits at the root of its own cgroup namespace (a container),
/// where the cgroup holds exactly the sandbox.
fn namespaced_cgroup() -> Option<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    if path.trim() != "/" {
        return None;
    }
    let dir = PathBuf::from("/sys/fs/cgroup");
    dir.join("memory.current").exists().then_some(dir)
}

/// CPU seconds and resident bytes summed over the members of a process group.
fn group_usage(pgid: u32) -> Option<(Option<f64>, Option<u64>)> {
    let mut ticks = 0u64;
    let mut rss = 0u64;
    let mut members = 0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((group, cpu)) = parse_proc_stat(&stat) else {
            continue;
        };
        if group != pgid {
            continue;
        }
        members += 1;
        ticks += cpu;
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            rss += parse_vm_rss(&status).unwrap_or(0);
        }
    }
    (members > 0).then(|| (Some(ticks as f64 / USER_HZ), Some(rss)))
}

/// Process group (field 5) and utime + stime + cutime + cstime (fields 14–17) from /proc/<pid>/stat.
fn parse_proc_stat(stat: &str) -> Option<(u32, u64)> {
    // The command name (field 2) may contain spaces; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field n is at index n - 3.
    let pgrp: u32 = fields.get(2)?.parse().ok()?;
    let mut ticks = 0u64;
    for index in 11..=14 {
        ticks += fields.get(index)?.parse::<u64>().ok()?;
    }
    Some((pgrp, ticks))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn parse_cgroup_cpu_usec(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_parsed() {
        let stat =
            "1234 (my agent) S 1 1230 1234 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0 100 1000 200";
        assert_eq!(parse_proc_stat(stat), Some((1230, 310)));
        assert_eq!(
            parse_vm_rss("Name:\tsh\nVmRSS:\t    2048 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(
            parse_cgroup_cpu_usec("usage_usec 1500\nuser_usec 1000\n"),
            Some(1500)
        );
    }

    #[test]
    fn own_process_group_can_be_sampled() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let (pgid, _) = parse_proc_stat(&stat).unwrap();
        let mut sampler = UsageSampler {
            source: Source::ProcessGroup(pgid),
            last: None,
        };
        let first = sampler.sample().unwrap();
        assert!(first.memory_bytes.unwrap() > 0);
        assert_eq!(first.cpu_pct, None);
        assert!(sampler.sample().unwrap().cpu_pct.is_some());
    }
}
