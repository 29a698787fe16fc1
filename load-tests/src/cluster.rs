//! `cluster`: the control plane scaled out. Real `codebolt server` processes on one
//! `redis-server`, behind a TCP load balancer that is their `public_url`; many simulated shims
//! make tool calls through it. Measures the tool-call round trip, messages and events per second
//! and Redis work per call for each replica count, then kills one replica with SIGKILL and times
//! how long its shims take to be served again by the others.

mod fleet;
mod lb;
pub(crate) mod procs;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use actors::model::{EventKind, RunState};
use agent_shim::protocol;
use anyhow::{ensure, Context};
use chrono::{DateTime, Utc};
use clap::Args;
use futures_util::{stream, StreamExt, TryStreamExt};

use self::fleet::{Fleet, Mode, ShimSpec, Tally};
use self::procs::{cpu_seconds, Cluster, RedisCounters};
use crate::fixture::{self, Api, Workspace};
use crate::sim_shim;
use crate::stats::{self, fmt_us, Latencies};

/// The agent every run names; its command never runs (each sandbox only sleeps).
const AGENT: &str = "sim";
/// The targets: failover within 5 s (for 200 runs), and Redis not the bottleneck
/// below 20k messages/s.
const TARGET_FAILOVER_S: f64 = 5.0;
const TARGET_MESSAGES_PER_S: f64 = 20_000.0;
/// Requests in flight at once while creating runs and reading them back.
const API_CONCURRENCY: usize = 8;
/// How long the shims keep calling after the last affected one was served again.
const SETTLE: Duration = Duration::from_secs(2);
/// Give up waiting for the affected shims after this long.
const FAILOVER_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Runs, each with its simulated shim.
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Measured seconds of tool calls per replica count.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Seconds of calls before the measured ones, left out of the figures.
    #[arg(long, default_value_t = 2)]
    warmup_s: u64,
    /// Milliseconds each shim waits between an answer and its next call (0: a closed loop).
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
    /// `timeouts.heartbeat_interval_ms` of the replicas (a shim silent for 3 intervals is
    /// disconnected).
    #[arg(long, default_value_t = 500)]
    heartbeat_ms: u64,
    /// Replica counts to measure, each on a cluster of its own.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    replicas: Vec<usize>,
    /// Skip killing a replica (done on the cluster with the most replicas, at least 2).
    #[arg(long)]
    no_failover: bool,
    /// Size of the workspace's README.md, the file each `fs.read_file` call reads.
    #[arg(long, default_value_t = 1024)]
    file_bytes: usize,
    /// Copy each cluster's config and replica logs (JSON lines) to `<DIR>/replicas-<n>/`.
    #[arg(long, value_name = "DIR")]
    keep_logs: Option<std::path::PathBuf>,
}

/// Steady state of one cluster.
struct Steady {
    replicas: usize,
    window: Duration,
    tally: Tally,
    events_in_window: u64,
    redis: RedisCounters,
    cpu: Cpu,
}

/// CPU seconds used during the measured window.
#[derive(Default)]
struct Cpu {
    replicas: f64,
    redis: f64,
    /// This process: the simulated shims and the load balancer.
    harness: f64,
}

/// What the failover did.
struct Failover {
    replicas: usize,
    victim: usize,
    victim_pid: String,
    open_before: Vec<usize>,
    affected: usize,
    /// From the kill to: the shim seeing its connection end, its welcome from another replica,
    /// its first call answered `ok` there.
    detected: Latencies,
    reconnected: Latencies,
    resumed: Latencies,
    slowest: Duration,
    unresumed: usize,
    /// Counted from the kill until `SETTLE` after the last affected shim was served.
    tally: Tally,
    other_disconnects: usize,
    survivors: BTreeMap<String, f64>,
    refused_by_victim: u64,
}

/// The stored histories, checked after the calls stopped.
#[derive(Default)]
struct HistoryCheck {
    runs: usize,
    events: u64,
    /// Events stored during the measured window.
    events_in_window: u64,
    not_dense: usize,
    duplicate_calls: usize,
    tool_calls: u64,
    ok_results: u64,
    calls_without_result: u64,
    /// Calls a shim had answered `ok` beyond the `ok` results its history holds.
    answered_not_stored: u64,
    answered_by_shims: u64,
    /// Calls still waiting for their answer 10 s after the shims stopped making new ones.
    unanswered: usize,
    /// Runs whose record or history could not be read.
    unreadable: usize,
    states: BTreeMap<String, usize>,
    problems: Vec<String>,
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(
        !args.replicas.is_empty() && args.replicas.iter().all(|n| (1..=16).contains(n)),
        "--replicas takes counts from 1 to 16, e.g. 1,2,3"
    );
    let codebolt = procs::codebolt_binary()?;
    let workspace = Workspace::new(args.file_bytes)?;
    workspace.agent(AGENT, "true")?;
    let scripts = tempfile::Builder::new()
        .prefix("codebolt-load-bin-")
        .tempdir()?;
    let sleeper = sim_shim::write_sleeper(scripts.path())?;
    let failover_on = (!args.no_failover)
        .then(|| args.replicas.iter().copied().max())
        .flatten()
        .filter(|n| *n >= 2);
    println!(
        "cluster: {} runs, each a simulated shim through the load balancer making fs.read_file \
         README.md calls ({} bytes) one at a time, {}; {} s warm-up + {} s measured per replica \
         count ({}); `codebolt server` processes on one redis-server; {} cores",
        args.runs,
        args.file_bytes,
        if args.think_ms == 0 {
            "the next as soon as one is answered".to_string()
        } else {
            format!("the next {} ms after one is answered", args.think_ms)
        },
        args.warmup_s,
        args.duration_s,
        args.replicas
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );

    let mut steady = Vec::new();
    let mut failover = None;
    let mut histories = Vec::new();
    for &n in &args.replicas {
        // Once, on the first cluster of the largest size.
        let kill = failover_on == Some(n) && failover.is_none();
        let mut cluster =
            Cluster::start(n, &codebolt, workspace.path(), &sleeper, args.heartbeat_ms)
                .await
                .with_context(|| format!("starting a cluster of {n}"))?;
        let measured = measure(&mut cluster, &args, kill).await;
        print_log_findings(&cluster);
        if let Some(dir) = &args.keep_logs {
            let dir = dir.join(format!("replicas-{n}"));
            cluster.copy_logs(&dir)?;
            if let Ok((_, _, history)) = &measured {
                std::fs::write(dir.join("problems.txt"), history.problems.join("\n"))?;
            }
        }
        let (row, killed, history) = measured
            .with_context(|| format!("cluster of {n} (logs in {})", cluster.dir().display()))?;
        steady.push(row);
        if killed.is_some() {
            failover = killed;
        }
        histories.push((n, history));
    }
    print_report(&args, &steady, failover.as_ref(), &histories);
    Ok(())
}

/// Creates the runs, connects their shims, measures the steady state and, with `kill`, the
/// failover; checks the histories.
async fn measure(
    cluster: &mut Cluster,
    args: &ClusterArgs,
    kill: bool,
) -> anyhow::Result<(Steady, Option<Failover>, HistoryCheck)> {
    let n = cluster.replicas.len();
    let started = Instant::now();
    let ids = create_runs(cluster, args.runs).await?;
    let specs: Vec<ShimSpec> = stream::iter(ids.iter().enumerate().map(|(i, id)| {
        let api = cluster.replicas[i % n].api.clone();
        async move { shim_spec(&api, id).await }
    }))
    .buffered(API_CONCURRENCY)
    .try_collect()
    .await?;
    let fleet = Fleet::start(specs, Duration::from_millis(args.think_ms));
    fleet.wait_connected(Duration::from_secs(120)).await?;
    println!(
        "\n{n} replica(s): {} runs created and their shims connected in {:.1} s; connections per replica {:?}",
        ids.len(),
        started.elapsed().as_secs_f64(),
        cluster.lb.open_per_backend()
    );

    fleet.set_mode(Mode::Calling);
    tokio::time::sleep(Duration::from_secs(args.warmup_s)).await;
    fleet.take_tally();
    let redis_before = cluster.redis.counters().await?;
    let cpu_before = cpu_now(cluster);
    let from = Utc::now();
    let t0 = Instant::now();
    fleet.start_recording();
    tokio::time::sleep(Duration::from_secs(args.duration_s)).await;
    fleet.stop_recording();
    let window = t0.elapsed();
    let to = Utc::now();
    let cpu_after = cpu_now(cluster);
    let redis = cluster.redis.counters().await?.since(&redis_before);
    let tally = fleet.take_tally();
    let calls = tally.calls_ok;
    println!(
        "  steady: {calls} calls in {:.1} s ({:.0}/s), p50 {} p99 {}; retryable {}, errors {}, disconnects {}",
        window.as_secs_f64(),
        calls as f64 / window.as_secs_f64(),
        fmt_us(tally.latencies.summary().p50_us),
        fmt_us(tally.latencies.summary().p99_us),
        tally.retryable,
        tally.call_errors,
        tally.disconnects
    );

    let failover = if kill {
        Some(kill_one(cluster, &fleet).await?)
    } else {
        None
    };

    fleet.set_mode(Mode::Idle);
    let unanswered = fleet.wait_idle(Duration::from_secs(10)).await;
    let mut history = check_histories(cluster, &fleet, &ids, (from, to)).await;
    history.unanswered = unanswered;
    fleet.close().await;
    let steady = Steady {
        replicas: n,
        window,
        tally,
        events_in_window: history.events_in_window,
        redis,
        cpu: Cpu {
            replicas: cpu_after.replicas - cpu_before.replicas,
            redis: cpu_after.redis - cpu_before.redis,
            harness: cpu_after.harness - cpu_before.harness,
        },
    };
    Ok((steady, failover, history))
}

fn cpu_now(cluster: &Cluster) -> Cpu {
    Cpu {
        replicas: cluster
            .replicas
            .iter()
            .filter_map(|r| r.pid().and_then(|pid| cpu_seconds(&pid)))
            .sum(),
        redis: cpu_seconds(&cluster.redis.pid()).unwrap_or(0.0),
        harness: cpu_seconds("self").unwrap_or(0.0),
    }
}

/// Creates `count` runs, spread round-robin over the replicas' APIs.
async fn create_runs(cluster: &Cluster, count: usize) -> anyhow::Result<Vec<String>> {
    let n = cluster.replicas.len();
    stream::iter((0..count).map(|i| {
        let api = cluster.replicas[i % n].api.clone();
        async move {
            let record = api.create(fixture::run_request(AGENT, None)).await?;
            Ok::<_, anyhow::Error>(record.id.to_string())
        }
    }))
    .buffered(API_CONCURRENCY)
    .try_collect()
    .await
}

/// Waits until the run's sandbox (a sleeping process) is up, and reads the run token and
/// callback URL from its environment.
async fn shim_spec(api: &Api, id: &str) -> anyhow::Result<ShimSpec> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let record = loop {
        let record = api.get(id).await?;
        if record.state == RunState::Starting && record.sandbox_id.is_some() {
            break record;
        }
        ensure!(
            record.state < RunState::Starting,
            "run {id} is {} before its simulated shim connected: {:?}",
            record.state,
            record.failure
        );
        ensure!(Instant::now() < deadline, "run {id} never reached starting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let pid = record.sandbox_id.context("sandbox id")?;
    let env = sim_shim::sandbox_environ(&pid, deadline).await?;
    let token = env
        .get(protocol::env::RUN_TOKEN)
        .context("no run token in the sandbox environment")?;
    let callback = env
        .get(protocol::env::CALLBACK_URL)
        .context("no callback URL in the sandbox environment")?;
    Ok(ShimSpec {
        run_id: id.to_string(),
        token: token.clone(),
        ws_url: format!(
            "{}{}",
            callback
                .replacen("http://", "ws://", 1)
                .trim_end_matches('/'),
            protocol::CONNECT_PATH
        ),
    })
}

/// Kills (SIGKILL) the replica holding the most shim connections while every shim is calling,
/// and times how long its shims take to be served by the others.
async fn kill_one(cluster: &mut Cluster, fleet: &Fleet) -> anyhow::Result<Failover> {
    let open_before = cluster.lb.open_per_backend();
    let victim = (0..open_before.len())
        .max_by_key(|i| open_before[*i])
        .context("no replica")?;
    let affected: Vec<usize> = fleet
        .statuses()
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            s.connected && s.local_addr.and_then(|a| cluster.lb.backend_of(a)) == Some(victim)
        })
        .map(|(i, _)| i)
        .collect();
    let survivors: Vec<usize> = (0..cluster.replicas.len())
        .filter(|i| *i != victim)
        .collect();
    let counters_before = survivor_counters(cluster, &survivors).await?;
    let refused_before = cluster.lb.failed_per_backend()[victim];
    let victim_pid = cluster.replicas[victim].pid().unwrap_or_default();
    fleet.take_tally();
    fleet.mark();

    let killed = Instant::now();
    cluster.replicas[victim].kill9();
    let served_again = |s: &fleet::ShimStatus| {
        s.connected
            && s.welcomed_at.is_some_and(|t| t > killed)
            && s.answered_at.is_some_and(|t| t > killed)
    };
    loop {
        let statuses = fleet.statuses();
        if affected.iter().all(|i| served_again(&statuses[*i])) || killed.elapsed() > FAILOVER_LIMIT
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let statuses = fleet.statuses();
    let (mut detected, mut reconnected, mut resumed) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    let mut slowest = Duration::ZERO;
    let mut unresumed = 0;
    for i in &affected {
        let s = &statuses[*i];
        let since = |t: Option<Instant>| t.filter(|t| *t > killed).map(|t| t - killed);
        if let Some(d) = since(s.first_lost_at) {
            detected.record(d);
        }
        if let Some(d) = since(s.welcomed_at) {
            reconnected.record(d);
        }
        match since(s.answered_at) {
            Some(d) if served_again(s) => {
                resumed.record(d);
                slowest = slowest.max(d);
            }
            _ => unresumed += 1,
        }
    }
    tokio::time::sleep(SETTLE).await;
    let tally = fleet.take_tally();
    let affected_set: HashSet<usize> = affected.iter().copied().collect();
    let other_disconnects = fleet
        .statuses()
        .iter()
        .enumerate()
        .filter(|(i, s)| !affected_set.contains(i) && s.disconnected_at.is_some_and(|t| t > killed))
        .count();
    let counters_after = survivor_counters(cluster, &survivors).await?;
    let survivors = counters_after
        .iter()
        .map(|(name, after)| {
            let before = counters_before.get(name).copied().unwrap_or(0.0);
            (name.clone(), after - before)
        })
        .collect();
    Ok(Failover {
        replicas: cluster.replicas.len(),
        victim,
        victim_pid,
        open_before,
        affected: affected.len(),
        detected,
        reconnected,
        resumed,
        slowest,
        unresumed,
        tally,
        other_disconnects,
        survivors,
        refused_by_victim: cluster.lb.failed_per_backend()[victim] - refused_before,
    })
}

/// The cluster counters of `/metrics`, summed over the given replicas.
async fn survivor_counters(
    cluster: &Cluster,
    replicas: &[usize],
) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut sum = BTreeMap::new();
    for i in replicas {
        for (name, value) in cluster.replicas[*i].counters().await? {
            if name.ends_with("_total") {
                *sum.entry(name).or_insert(0.0) += value;
            }
        }
    }
    Ok(sum)
}

/// Reads every run's record and history from the live replicas; counts the events stored in
/// `window` and checks the history: indices 1..=n, no tool call stored twice, no call a shim had
/// answered missing.
async fn check_histories(
    cluster: &Cluster,
    fleet: &Fleet,
    ids: &[String],
    window: (DateTime<Utc>, DateTime<Utc>),
) -> HistoryCheck {
    let fetched: Vec<_> = stream::iter(ids.iter().enumerate().map(|(i, id)| {
        let api = cluster.live_api(i).clone();
        async move {
            let read =
                async { Ok::<_, anyhow::Error>((api.get(id).await?, api.events(id).await?)) };
            (i, read.await)
        }
    }))
    .buffered(API_CONCURRENCY)
    .collect()
    .await;
    let mut check = HistoryCheck::default();
    for (i, read) in fetched {
        let (record, events) = match read {
            Ok(read) => read,
            Err(err) => {
                check.unreadable += 1;
                check.problems.push(format!("run {}: {err:#}", ids[i]));
                continue;
            }
        };
        check.runs += 1;
        *check.states.entry(record.state.to_string()).or_default() += 1;
        check.events += events.len() as u64;
        check.events_in_window += events
            .iter()
            .filter(|e| e.at >= window.0 && e.at <= window.1)
            .count() as u64;
        let dense = events
            .iter()
            .enumerate()
            .all(|(k, e)| e.index == k as u64 + 1);
        if !dense {
            check.not_dense += 1;
            check.problems.push(format!(
                "run {}: event indices not 1..={}",
                record.id,
                events.len()
            ));
        }
        let (mut calls, mut results) = (HashSet::new(), HashSet::new());
        let mut ok_results = 0;
        for event in &events {
            match &event.kind {
                EventKind::ToolCall { call_id, .. } if !calls.insert(call_id.clone()) => {
                    check.duplicate_calls += 1;
                    check.problems.push(format!(
                        "run {}: tool call {call_id} stored twice",
                        record.id
                    ));
                }
                EventKind::ToolResult { call_id, ok, .. } => {
                    results.insert(call_id.clone());
                    if *ok {
                        ok_results += 1;
                    }
                }
                _ => {}
            }
        }
        check.tool_calls += calls.len() as u64;
        check.ok_results += ok_results;
        check.calls_without_result += calls.difference(&results).count() as u64;
        let answered = fleet.status(i).answered_total;
        check.answered_by_shims += answered;
        check.answered_not_stored += answered.saturating_sub(ok_results);
    }
    check
}

/// Warnings and errors in the replicas' logs (JSON lines), grouped by level, target and message.
fn print_log_findings(cluster: &Cluster) {
    let mut grouped: BTreeMap<String, usize> = BTreeMap::new();
    for replica in &cluster.replicas {
        for line in replica.log_lines() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let level = entry["level"].as_str().unwrap_or_default();
            if level != "WARN" && level != "ERROR" {
                continue;
            }
            let key = format!(
                "{level} {}: {}",
                entry["target"].as_str().unwrap_or_default(),
                entry["fields"]["message"].as_str().unwrap_or_default()
            );
            *grouped.entry(key).or_default() += 1;
        }
    }
    if grouped.is_empty() {
        println!("  replica logs: no warnings or errors");
        return;
    }
    let mut by_count: Vec<(String, usize)> = grouped.into_iter().collect();
    by_count.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
    println!("  replica logs, warnings and errors by message:");
    for (message, count) in by_count.iter().take(10) {
        println!("    {count:>6} × {message}");
    }
}

fn print_report(
    args: &ClusterArgs,
    steady: &[Steady],
    failover: Option<&Failover>,
    histories: &[(usize, HistoryCheck)],
) {
    let header = [
        "replicas",
        "calls",
        "p50",
        "p90",
        "p99",
        "max",
        "calls/s",
        "msgs/s",
        "events/s",
        "redis cmds/call",
        "EVALSHA/call",
        "CPU s: replicas",
        "redis",
        "harness",
    ];
    let rows: Vec<Vec<String>> = steady
        .iter()
        .map(|s| {
            let secs = s.window.as_secs_f64();
            let calls = s.tally.calls_ok.max(1) as f64;
            let lat = s.tally.latencies.summary();
            vec![
                s.replicas.to_string(),
                s.tally.calls_ok.to_string(),
                fmt_us(lat.p50_us),
                fmt_us(lat.p90_us),
                fmt_us(lat.p99_us),
                fmt_us(lat.max_us),
                format!("{:.0}", s.tally.calls_ok as f64 / secs),
                format!("{:.0}", 2.0 * s.tally.calls_ok as f64 / secs),
                format!("{:.0}", s.events_in_window as f64 / secs),
                format!("{:.1}", s.redis.total_calls() as f64 / calls),
                format!(
                    "{:.2}",
                    s.redis.calls.get("evalsha").copied().unwrap_or(0) as f64 / calls
                ),
                format!("{:.1}", s.cpu.replicas),
                format!("{:.1}", s.cpu.redis),
                format!("{:.1}", s.cpu.harness),
            ]
        })
        .collect();
    println!(
        "\nsteady state: {} shims calling for {} s (msgs = tool_call + tool_result frames; acks not counted)\n",
        args.runs, args.duration_s
    );
    print!("{}", stats::table(&header, &rows));

    println!("\nRedis commands per tool call, by command (commands inside scripts included):");
    for s in steady {
        let calls = s.tally.calls_ok.max(1) as f64;
        let mut by: Vec<(&String, &u64)> = s.redis.calls.iter().collect();
        by.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
        let parts: Vec<String> = by
            .iter()
            .take(10)
            .map(|(name, n)| format!("{name} {:.2}", **n as f64 / calls))
            .collect();
        println!(
            "  {} replica(s): {} (total_commands_processed {:.1}/call; Redis CPU {:.1} µs/call)",
            s.replicas,
            parts.join(", "),
            s.redis.commands_processed as f64 / calls,
            s.redis.cpu_s * 1e6 / calls
        );
    }
    for s in steady {
        let t = &s.tally;
        if t.retryable
            + t.call_errors
            + t.error_frames
            + t.disconnects
            + t.lost_acks
            + t.stray_results
            + t.answered_twice
            > 0
        {
            println!(
                "  {} replica(s) steady state: retryable {}, call errors {}, error frames {}, disconnects {}, failed connects {}, lost acks {}, answered twice {}, stray results {}; {:?}",
                s.replicas, t.retryable, t.call_errors, t.error_frames, t.disconnects, t.failed_connects, t.lost_acks, t.answered_twice, t.stray_results, t.seen
            );
        }
    }

    println!("\nhistories after the calls stopped:");
    for (n, h) in histories {
        println!(
            "  {n} replica(s): {} runs {:?} ({} unreadable), {} events; indices dense in {} of {}; tool calls stored twice {}; \
             stored calls {} / ok results {} / calls without a stored result {}; shims had {} calls answered ok, {} of them without a stored ok result; \
             calls never answered {}",
            h.runs, h.states, h.unreadable, h.events, h.runs - h.not_dense, h.runs, h.duplicate_calls,
            h.tool_calls, h.ok_results, h.calls_without_result, h.answered_by_shims, h.answered_not_stored,
            h.unanswered
        );
        for problem in h.problems.iter().take(5) {
            println!("    {problem}");
        }
    }

    if let Some(f) = failover {
        let t = &f.tally;
        println!(
            "\nfailover: {} replicas, connections per replica {:?}; SIGKILL to replica {} (pid {}) with {} shims on it, all shims calling",
            f.replicas, f.open_before, f.victim, f.victim_pid, f.affected
        );
        let row = |label: &str, l: &Latencies| {
            let s = l.summary();
            vec![
                label.to_string(),
                s.count.to_string(),
                fmt_us(s.p50_us),
                fmt_us(s.p90_us),
                fmt_us(s.p99_us),
                fmt_us(s.max_us),
            ]
        };
        print!(
            "{}",
            stats::table(
                &[
                    "from the kill until an affected shim…",
                    "n",
                    "p50",
                    "p90",
                    "p99",
                    "max"
                ],
                &[
                    row("saw its connection end", &f.detected),
                    row("was welcomed by another replica", &f.reconnected),
                    row("had a call answered ok there", &f.resumed),
                    row(
                        "(each reconnect: connection opened → welcome)",
                        &f.tally.rehandshakes
                    ),
                ]
            )
        );
        println!(
            "  not served again within {FAILOVER_LIMIT:?}: {}; calls answered retryable {}, other call errors {}, error frames {}, \
             disconnects {} (shims not on the killed replica: {}), failed connects {}, connects the load balancer sent to the dead replica {}, lost acks {}; \
             calls answered twice (executed again after a resend) {}, stray results {}",
            f.unresumed, t.retryable, t.call_errors, t.error_frames, t.disconnects, f.other_disconnects,
            t.failed_connects, f.refused_by_victim, t.lost_acks, t.answered_twice, t.stray_results
        );
        if !t.seen.is_empty() {
            println!("  what the shims saw (count × reason):");
            for (what, count) in &t.seen {
                println!("    {count:>6} × {what}");
            }
        }
        println!("  survivors' counters (change): {:?}", f.survivors);
    }

    println!();
    if let Some(f) = failover {
        let secs = f.slowest.as_secs_f64();
        let met = f.unresumed == 0 && secs <= TARGET_FAILOVER_S;
        println!(
            "target: failover ≤ {TARGET_FAILOVER_S} s for 200 runs → {} runs, {} affected, every one served again within {:.2} s{} ({})",
            args.runs,
            f.affected,
            secs,
            if f.unresumed > 0 {
                format!(", {} never", f.unresumed)
            } else {
                String::new()
            },
            if met && args.runs >= 200 {
                "met"
            } else if met {
                "met, with fewer runs than the target names"
            } else {
                "missed"
            }
        );
    }
    if let Some(s) = steady.iter().max_by_key(|s| s.replicas) {
        let calls = s.tally.calls_ok.max(1) as f64;
        let cpu_per_message = s.redis.cpu_s / (2.0 * calls);
        let ceiling = if cpu_per_message > 0.0 {
            1.0 / cpu_per_message
        } else {
            f64::INFINITY
        };
        println!(
            "target: Redis not the bottleneck before {TARGET_MESSAGES_PER_S:.0} messages/s → {:.1} Redis commands ({:.2} script calls) \
             and {:.1} µs of Redis CPU per tool call (2 messages) at {} replicas: one Redis core saturates at ≈ {:.0} messages/s ({})",
            s.redis.total_calls() as f64 / calls,
            s.redis.calls.get("evalsha").copied().unwrap_or(0) as f64 / calls,
            s.redis.cpu_s * 1e6 / calls,
            s.replicas,
            ceiling,
            if ceiling >= TARGET_MESSAGES_PER_S { "met" } else { "missed" }
        );
    }
}
