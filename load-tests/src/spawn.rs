//! `spawn`: many runs of a trivial agent through `POST /v1/runs`; how long the control plane takes
//! from a request to the provider's spawn call, and to `running`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actors::model::{RunRecord, RunState};
use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;

use crate::fixture::{self, Api, InProcessServer, LocalProvider, Workspace};
use crate::stats::{self, Latencies};

/// Reads its task line and reports done at once.
const TRIVIAL_AGENT: &str = r#"read t; printf '{"type":"done","result":1}\n'"#;

/// The issue's target: control-plane overhead per spawn, request → spawn call, at p99.
const TARGET_P99_US: f64 = 5_000.0;

#[derive(Debug, Args)]
pub struct SpawnArgs {
    /// Measured runs.
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Runs started before the measured ones and left out of the figures.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Runs alive at once: each slot creates a run, waits for it to end, then creates the next.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// HTTP worker threads of the server.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// The agent-shim binary; by default the one next to this binary.
    #[arg(long)]
    shim: Option<PathBuf>,
}

/// One measured run.
struct Sample {
    /// Client side: request sent → 201 and its body received.
    post: Duration,
    record: RunRecord,
}

/// Nanoseconds from the run entering `from` to it entering `to`, by the server's clock.
fn between(record: &RunRecord, from: RunState, to: RunState) -> Option<u64> {
    let at = |s: RunState| -> Option<&DateTime<Utc>> { record.state_times.get(&s) };
    let delta = *at(to)? - *at(from)?;
    delta
        .num_nanoseconds()
        .and_then(|ns| u64::try_from(ns).ok())
}

/// The server-side intervals the scenario reports, by their row label.
const INTERVALS: [(&str, RunState, RunState); 5] = [
    (
        "request → spawn call (pending → provisioning)",
        RunState::Pending,
        RunState::Provisioning,
    ),
    (
        "request → provider returned (pending → starting)",
        RunState::Pending,
        RunState::Starting,
    ),
    (
        "request → shim connected (pending → running)",
        RunState::Pending,
        RunState::Running,
    ),
    (
        "  spawn call → provider returned",
        RunState::Provisioning,
        RunState::Starting,
    ),
    (
        "  provider returned → shim connected",
        RunState::Starting,
        RunState::Running,
    ),
];

pub async fn run(args: SpawnArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let shim = fixture::shim_binary(args.shim.as_deref())?;
    let workspace = Workspace::new(1024)?;
    workspace.agent("trivial", TRIVIAL_AGENT)?;
    let server = InProcessServer::start(
        workspace.path(),
        &[LocalProvider {
            name: "local".into(),
            shim_path: shim,
        }],
        fixture::load_timeouts(),
        args.workers,
    )?;
    let api = Api::new(&server.base_url)?;
    println!(
        "spawn: {} runs (+{} warmup) of a trivial agent, {} at once, server in-process on {} ({} HTTP workers)",
        args.runs, args.warmup, args.concurrency, server.base_url, args.workers
    );

    let total = args.warmup + args.runs;
    let next = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::with_capacity(args.runs)));
    let failures = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let started = Instant::now();
    let slots = (0..args.concurrency).map(|_| {
        let (api, next, samples, failures) =
            (api.clone(), next.clone(), samples.clone(), failures.clone());
        let warmup = args.warmup;
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let sent = Instant::now();
                let created = api.create(fixture::run_request("trivial", None)).await?;
                let post = sent.elapsed();
                let record = api.wait_end(&created.id.to_string()).await?;
                if record.state != RunState::Succeeded {
                    let kind = record
                        .failure
                        .as_ref()
                        .map_or_else(|| record.state.to_string(), |f| f.kind.to_string());
                    let mut failures = failures.lock().expect("failures");
                    if failures.is_empty() {
                        eprintln!(
                            "run {} ended {}: {:?}\nevidence: {:#?}",
                            record.id, record.state, record.failure, record.evidence
                        );
                    }
                    *failures.entry(kind).or_default() += 1;
                    continue;
                }
                if i >= warmup {
                    samples
                        .lock()
                        .expect("samples")
                        .push(Sample { post, record });
                }
            }
        }
    });
    let results = futures_util::future::join_all(slots).await;
    let wall = started.elapsed();
    for res in results {
        res.context("a run slot failed")?;
    }
    server.shutdown()?;

    let samples = std::mem::take(&mut *samples.lock().expect("samples"));
    let failures = std::mem::take(&mut *failures.lock().expect("failures"));
    print_report(&args, &samples, &failures, wall);
    Ok(())
}

fn print_report(
    args: &SpawnArgs,
    samples: &[Sample],
    failures: &BTreeMap<String, usize>,
    wall: Duration,
) {
    let mut post = Latencies::default();
    let mut intervals: Vec<Latencies> = INTERVALS.iter().map(|_| Latencies::default()).collect();
    for sample in samples {
        post.record(sample.post);
        for ((_, from, to), hist) in INTERVALS.iter().zip(intervals.iter_mut()) {
            if let Some(ns) = between(&sample.record, *from, *to) {
                hist.record_ns(ns);
            }
        }
    }
    let header = ["interval", "n", "p50", "p90", "p99", "max", "mean"];
    let mut rows = Vec::new();
    let mut row = |label: &str, lat: &Latencies| {
        let mut cells = vec![label.to_string()];
        cells.extend(stats::summary_cells(&lat.summary()));
        rows.push(cells);
    };
    row("client: POST sent → 201 received", &post);
    for ((label, _, _), hist) in INTERVALS.iter().zip(intervals.iter()) {
        row(label, hist);
    }
    println!();
    print!("{}", stats::table(&header, &rows));
    println!();
    println!(
        "{} measured runs succeeded, {} failed{}; all {} runs took {:.2} s ({:.1} runs/s)",
        samples.len(),
        failures.values().sum::<usize>(),
        if failures.is_empty() {
            String::new()
        } else {
            format!(" ({failures:?})")
        },
        args.runs + args.warmup,
        wall.as_secs_f64(),
        (args.runs + args.warmup) as f64 / wall.as_secs_f64(),
    );
    if samples.is_empty() {
        return;
    }
    let p99 = intervals[0].summary().p99_us;
    println!(
        "target: control-plane overhead per spawn (request → spawn call) p99 ≤ {} → {} ({})",
        stats::fmt_us(TARGET_P99_US),
        stats::fmt_us(p99),
        if p99 <= TARGET_P99_US {
            "met"
        } else {
            "missed"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_come_from_state_times() {
        let record: RunRecord = serde_json::from_value(serde_json::json!({
            "id": "8f5d2b9e-4f0a-4c8e-9c1a-2d3e4f5a6b7c",
            "agent": "trivial", "task": "t", "provider": "local", "state": "succeeded",
            "remote_host": null, "sandbox_id": null,
            "created_at": "2024-01-01T00:00:00Z",
            "state_times": {
                "pending": "2024-01-01T00:00:00.000100Z",
                "provisioning": "2024-01-01T00:00:00.001600Z",
            },
            "exit_code": 0, "failure": null, "termination": null, "resources": {},
            "usage": {"reported_at": null}, "cost_estimate": null, "trace_id": "t",
            "owner": "o", "timeout_s": null, "result": 1, "evidence": null,
        }))
        .expect("record");
        assert_eq!(
            between(&record, RunState::Pending, RunState::Provisioning),
            Some(1_500_000)
        );
        assert_eq!(between(&record, RunState::Pending, RunState::Running), None);
    }
}
