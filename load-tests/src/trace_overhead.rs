//! `trace-overhead`: what exporting spans costs the tool-call throughput. The `toolcall`
//! workload (one call at a time, the next as soon as one is answered) runs in a child process of
//! this binary per measurement, because the tracing subscriber is process-wide: with export off
//! (`telemetry::init` without an OTLP endpoint: spans are made, none is exported) and with export
//! on (OTLP/gRPC to a receiver this process runs on loopback). Rounds alternate the order (off,
//! on, then on, off, …) so that a drift of the machine weighs on both modes alike.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use actors::model::RunState;
use anyhow::{bail, ensure, Context};
use clap::Args;
use codebolt::telemetry::TelemetrySettings;
use serde::{Deserialize, Serialize};

use crate::agent::AgentReport;
use crate::cluster::procs::cpu_seconds;
use crate::fixture::{self, Api};
use crate::otlp::{Received, Receiver};
use crate::sim_shim;
use crate::stats::{self, Budget, Summary};
use crate::toolcall::{Bench, PATH, TOOL};

/// The target: export on costs at most this share of the throughput, sampling 100 %.
const TARGET_COST_PCT: f64 = 10.0;
/// Starts the child's result line on its stdout.
const RESULT_PREFIX: &str = "trace-overhead result: ";

/// What each child does; the parent hands its own values on.
#[derive(Debug, Clone, Args)]
pub struct Workload {
    /// Measured seconds of each variant (simulated shim, full path) in each child.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Round trips each variant makes first, left out of the figures.
    #[arg(long, default_value_t = 1000)]
    warmup: u64,
    /// Size of the workspace's README.md, the file each `fs.read_file` call reads.
    #[arg(long, default_value_t = 1024)]
    file_bytes: usize,
    /// HTTP worker threads of the server.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Leave out the simulated-shim variant (the server's share of a call).
    #[arg(long)]
    no_sim_shim: bool,
    /// The server's log filter (`RUST_LOG`) in both modes; it also decides which spans are made.
    #[arg(long, default_value = "info")]
    filter: String,
    /// `OTEL_METRIC_EXPORT_INTERVAL` (ms) with export on.
    #[arg(long, default_value_t = 5000)]
    metric_interval_ms: u64,
}

impl Workload {
    fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--duration-s={}", self.duration_s),
            format!("--warmup={}", self.warmup),
            format!("--file-bytes={}", self.file_bytes),
            format!("--workers={}", self.workers),
            format!("--filter={}", self.filter),
            format!("--metric-interval-ms={}", self.metric_interval_ms),
        ];
        if self.no_sim_shim {
            args.push("--no-sim-shim".into());
        }
        args
    }
}

#[derive(Debug, Args)]
pub struct TraceOverheadArgs {
    #[command(flatten)]
    workload: Workload,
    /// Rounds, each one child with export off and one with it on.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// The agent-shim binary; by default the one next to this binary.
    #[arg(long)]
    shim: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ChildArgs {
    #[command(flatten)]
    workload: Workload,
    /// Export spans and metrics over OTLP/gRPC to this endpoint; without it, nothing is exported.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    #[arg(long)]
    shim: PathBuf,
}

/// Closed-loop throughput and round trip of one variant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub per_s: f64,
    pub latency: Summary,
}

/// The line a child prints on its stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildReport {
    pub exporting: bool,
    /// agent → shim → server → shim → agent.
    pub full: Throughput,
    /// simulated shim → server → simulated shim.
    pub sim: Option<Throughput>,
    /// Tool calls made, warmup included.
    pub tool_calls: u64,
    /// CPU seconds of the child (server and simulated shim; not the shim and agent processes),
    /// from its start to its end.
    pub cpu_s: f64,
}

/// The child's report, from the line of its stdout that carries it.
fn parse_report(stdout: &str) -> anyhow::Result<ChildReport> {
    let line = stdout
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix(RESULT_PREFIX))
        .context("the child printed no result line")?;
    serde_json::from_str(line).with_context(|| format!("the child's result line: {line}"))
}

/// `trace-overhead-child` (hidden): one measurement, with telemetry installed as given.
pub async fn child(args: ChildArgs) -> anyhow::Result<()> {
    let w = &args.workload;
    // An explicit map: the variables of this process do not count.
    let mut env = HashMap::from([("RUST_LOG".to_string(), w.filter.clone())]);
    if let Some(endpoint) = &args.otlp_endpoint {
        env.insert("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone());
        env.insert("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "grpc".into());
        env.insert(
            "OTEL_METRIC_EXPORT_INTERVAL".into(),
            w.metric_interval_ms.to_string(),
        );
    }
    let settings = TelemetrySettings::from_env(&env, "info")?;
    let exporting = settings.otlp.is_some();
    ensure!(
        exporting == args.otlp_endpoint.is_some(),
        "span export is {} against the request",
        if exporting { "on" } else { "off" }
    );

    let bench = Bench::start(
        &format!(
            "--warmup {} --duration-ms {}",
            w.warmup,
            w.duration_s * 1000
        ),
        w.file_bytes,
        args.shim.clone(),
        w.workers,
        Some(settings),
    )?;
    let api = Api::new(&bench.server.base_url)?;
    let budget = Budget {
        warmup: w.warmup,
        calls: u64::MAX,
        duration: Some(Duration::from_secs(w.duration_s)),
    };
    let mut tool_calls = 0;

    let sim = if w.no_sim_shim {
        None
    } else {
        let sim = sim_shim::measure(&api, "toolcall", TOOL, PATH, budget, false).await?;
        tool_calls += w.warmup + sim.latency.count;
        Some(Throughput {
            per_s: sim.per_s,
            latency: sim.latency,
        })
    };

    let created = api.create(fixture::run_request("toolcall", None)).await?;
    let record = api.wait_end(&created.id.to_string()).await?;
    if record.state != RunState::Succeeded {
        bail!(
            "the toolcall agent's run ended {}: {:?}",
            record.state,
            record.failure
        );
    }
    let agent: AgentReport =
        serde_json::from_value(record.result.context("the toolcall run has no result")?)
            .context("the toolcall agent's report")?;
    ensure!(
        agent.errors == 0,
        "{} tool calls of the agent failed",
        agent.errors
    );
    tool_calls += w.warmup + agent.latency.count;
    // Stops the server, then flushes what the exporter still holds.
    bench.server.shutdown()?;

    let report = ChildReport {
        exporting,
        full: Throughput {
            per_s: agent.calls_per_s,
            latency: agent.latency,
        },
        sim,
        tool_calls,
        cpu_s: cpu_seconds("self").context("CPU time of this process")?,
    };
    println!("{RESULT_PREFIX}{}", serde_json::to_string(&report)?);
    Ok(())
}

/// One child's figures, as the parent saw them.
struct Measured {
    round: usize,
    report: ChildReport,
    received: Received,
    /// CPU seconds of this process (the receiver) while the child ran.
    receiver_cpu_s: f64,
    /// Lines the child logged at WARN or ERROR.
    problems: Vec<String>,
}

pub async fn run(args: TraceOverheadArgs) -> anyhow::Result<()> {
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    let shim = fixture::shim_binary(args.shim.as_deref())?;
    let exe = std::env::current_exe().context("path of the load-tests binary")?;
    let (receiver, addr) = Receiver::start_idle()?;
    let endpoint = format!("http://{addr}");
    let w = &args.workload;
    println!(
        "trace-overhead: {} rounds of export off and on, each a fresh process: {TOOL} {{path: {PATH}}} ({} bytes), one call at a time, {} s measured per variant after {} warmup calls; RUST_LOG={}; OTLP/gRPC receiver on {endpoint}",
        args.rounds, w.file_bytes, w.duration_s, w.warmup, w.filter
    );

    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        let order = if round % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for exporting in order {
            let mut command = tokio::process::Command::new(&exe);
            command
                .arg("trace-overhead-child")
                .args(w.to_args())
                .arg("--shim")
                .arg(&shim);
            if exporting {
                command.arg("--otlp-endpoint").arg(&endpoint);
            }
            // The SDK reads OTEL_* itself (sampler, batch sizes): its defaults apply to both.
            for (var, _) in std::env::vars_os() {
                if var.to_string_lossy().starts_with("OTEL_") {
                    command.env_remove(var);
                }
            }
            command.stdin(Stdio::null()).kill_on_drop(true);
            receiver.take();
            let cpu_before = cpu_seconds("self").unwrap_or(0.0);
            let out = command.output().await.context("trace-overhead child")?;
            let receiver_cpu_s = cpu_seconds("self").unwrap_or(0.0) - cpu_before;
            let received = receiver.take();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "round {round}, export {}: the child {}; its stderr ends with:\n{}",
                    on_off(exporting),
                    out.status,
                    tail.join("\n")
                );
            }
            let report = parse_report(&String::from_utf8_lossy(&out.stdout))?;
            ensure!(
                report.exporting == exporting,
                "the child's export mode differs"
            );
            if exporting {
                ensure!(
                    received.spans > 0,
                    "no span arrived with export on: the filter '{}' keeps none of the server's spans",
                    w.filter
                );
            } else {
                ensure!(
                    received.spans == 0 && received.metric_points == 0,
                    "spans arrived with export off"
                );
            }
            let problems = stderr
                .lines()
                .filter(|line| line.contains("WARN") || line.contains("ERROR"))
                .map(str::to_string)
                .collect();
            let measured = Measured {
                round,
                report,
                received,
                receiver_cpu_s,
                problems,
            };
            println!("{}", progress_line(&measured));
            runs.push(measured);
        }
    }
    print_report(&runs);
    Ok(())
}

fn on_off(exporting: bool) -> &'static str {
    if exporting {
        "on"
    } else {
        "off"
    }
}

fn progress_line(m: &Measured) -> String {
    let r = &m.report;
    let sim = r
        .sim
        .map(|s| format!(", simulated shim {:.0} calls/s", s.per_s))
        .unwrap_or_default();
    format!(
        "  round {} export {:>3}: full path {:.0} calls/s{sim}; {} spans received",
        m.round,
        on_off(r.exporting),
        r.full.per_s,
        m.received.spans
    )
}

/// The median; the mean of the middle two for an even count.
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Throughput lost with export on, in percent of the throughput with it off.
fn cost_pct(off: f64, on: f64) -> f64 {
    (off - on) / off * 100.0
}

fn full(r: &ChildReport) -> Option<Throughput> {
    Some(r.full)
}

fn sim(r: &ChildReport) -> Option<Throughput> {
    r.sim
}

/// Median throughput, p50 and p99 of one variant over the runs of one mode.
fn medians(runs: &[&Measured], variant: fn(&ChildReport) -> Option<Throughput>) -> [f64; 3] {
    let figures: Vec<Throughput> = runs.iter().filter_map(|m| variant(&m.report)).collect();
    [
        median(figures.iter().map(|t| t.per_s).collect()),
        median(figures.iter().map(|t| t.latency.p50_us).collect()),
        median(figures.iter().map(|t| t.latency.p99_us).collect()),
    ]
}

fn print_report(runs: &[Measured]) {
    let has_sim = runs.iter().all(|m| m.report.sim.is_some());

    let mut header = vec!["round", "export", "full calls/s", "p50", "p99"];
    if has_sim {
        header.extend(["sim calls/s", "p50", "p99"]);
    }
    header.extend([
        "tool calls",
        "spans rcvd",
        "spans/call",
        "metric points",
        "CPU µs/call",
        "receiver CPU",
        "warn lines",
    ]);
    let cells: Vec<Vec<String>> = runs
        .iter()
        .map(|m| {
            let r = &m.report;
            let mut row = vec![m.round.to_string(), on_off(r.exporting).to_string()];
            let mut push = |t: Throughput| {
                row.push(format!("{:.0}", t.per_s));
                row.push(stats::fmt_us(t.latency.p50_us));
                row.push(stats::fmt_us(t.latency.p99_us));
            };
            push(r.full);
            if let (true, Some(s)) = (has_sim, r.sim) {
                push(s);
            }
            row.extend([
                r.tool_calls.to_string(),
                m.received.spans.to_string(),
                format!("{:.2}", m.received.spans as f64 / r.tool_calls as f64),
                m.received.metric_points.to_string(),
                format!("{:.0}", r.cpu_s * 1e6 / r.tool_calls as f64),
                format!("{:.2} s", m.receiver_cpu_s),
                m.problems.len().to_string(),
            ]);
            row
        })
        .collect();
    println!();
    print!("{}", stats::table(&header, &cells));

    let off: Vec<&Measured> = runs.iter().filter(|m| !m.report.exporting).collect();
    let on: Vec<&Measured> = runs.iter().filter(|m| m.report.exporting).collect();
    let mut header = vec!["median", "full calls/s", "p50", "p99"];
    if has_sim {
        header.extend(["sim calls/s", "p50", "p99"]);
    }
    header.extend(["spans rcvd", "CPU µs/call", "receiver CPU"]);
    let row = |label: &str, runs: &[&Measured]| {
        let mut row = vec![format!("export {label} ({} runs)", runs.len())];
        let mut push = |[per_s, p50, p99]: [f64; 3]| {
            row.push(format!("{per_s:.0}"));
            row.push(stats::fmt_us(p50));
            row.push(stats::fmt_us(p99));
        };
        push(medians(runs, full));
        if has_sim {
            push(medians(runs, sim));
        }
        let of = |figure: fn(&Measured) -> f64| median(runs.iter().map(|m| figure(m)).collect());
        row.extend([
            format!("{:.0}", of(|m| m.received.spans as f64)),
            format!(
                "{:.0}",
                of(|m| m.report.cpu_s * 1e6 / m.report.tool_calls as f64)
            ),
            format!("{:.2} s", of(|m| m.receiver_cpu_s)),
        ]);
        row
    };
    let rows = vec![row("off", &off), row("on", &on)];
    println!();
    print!("{}", stats::table(&header, &rows));
    println!();

    let full_cost = Cost::of(runs, full);
    println!("throughput cost of export, full path: {full_cost}");
    if has_sim {
        println!(
            "throughput cost of export, simulated shim (server's share): {}",
            Cost::of(runs, sim)
        );
    }
    let problems: Vec<&str> = runs
        .iter()
        .flat_map(|m| m.problems.iter().map(String::as_str))
        .collect();
    if !problems.is_empty() {
        println!(
            "{} lines logged at WARN or ERROR; the first:",
            problems.len()
        );
        for line in problems.iter().take(5) {
            println!("  {line}");
        }
    }
    println!(
        "target: throughput cost of span export ≤ {TARGET_COST_PCT} % at 100 % sampling → full path {:.1} % (medians) / {:.1} % (rounds): {}",
        full_cost.of_medians,
        full_cost.round_median,
        full_cost.verdict(TARGET_COST_PCT)
    );
}

/// The throughput cost of export, estimated two ways: from the medians of each mode, and as the
/// median of each round's own cost (its off and on runs, made one after the other, so a drift
/// of the machine weighs less).
#[derive(Debug, Clone, PartialEq)]
struct Cost {
    of_medians: f64,
    round_median: f64,
    rounds: Vec<f64>,
}

impl Cost {
    fn of(runs: &[Measured], variant: fn(&ChildReport) -> Option<Throughput>) -> Cost {
        let per_s = |exporting: bool| -> Vec<(usize, f64)> {
            runs.iter()
                .filter(|m| m.report.exporting == exporting)
                .filter_map(|m| Some((m.round, variant(&m.report)?.per_s)))
                .collect()
        };
        Cost::from_rounds(&per_s(false), &per_s(true))
    }

    /// From (round, calls/s) of the runs with export off and on.
    fn from_rounds(off: &[(usize, f64)], on: &[(usize, f64)]) -> Cost {
        let rounds: Vec<f64> = off
            .iter()
            .filter_map(|(round, off)| {
                let (_, on) = on.iter().find(|(r, _)| r == round)?;
                Some(cost_pct(*off, *on))
            })
            .collect();
        let values = |runs: &[(usize, f64)]| runs.iter().map(|(_, v)| *v).collect();
        Cost {
            of_medians: cost_pct(median(values(off)), median(values(on))),
            round_median: median(rounds.clone()),
            rounds,
        }
    }

    /// Met or missed when both estimates agree; otherwise the runs do not settle it.
    fn verdict(&self, target: f64) -> &'static str {
        match (self.of_medians <= target, self.round_median <= target) {
            (true, true) => "met",
            (false, false) => "missed",
            _ => "not settled (the two estimates fall on either side of the target)",
        }
    }
}

impl std::fmt::Display for Cost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rounds: Vec<String> = self.rounds.iter().map(|c| format!("{c:.1}")).collect();
        write!(
            f,
            "{:.1} % from the medians; {:.1} % median of the rounds ({} %)",
            self.of_medians,
            self.round_median,
            rounds.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(exporting: bool) -> ChildReport {
        ChildReport {
            exporting,
            full: Throughput {
                per_s: 2800.5,
                latency: Summary {
                    count: 28005,
                    p50_us: 334.0,
                    ..Summary::default()
                },
            },
            sim: None,
            tool_calls: 30005,
            cpu_s: 12.5,
        }
    }

    #[test]
    fn the_result_line_is_found_among_other_output() {
        let sent = report(true);
        let stdout = format!(
            "something else\n{RESULT_PREFIX}{}\n",
            serde_json::to_string(&sent).unwrap()
        );
        assert_eq!(parse_report(&stdout).unwrap(), sent);
        assert!(parse_report("no result here\n").is_err());
        assert!(parse_report(&format!("{RESULT_PREFIX}{{\"exporting\":")).is_err());
    }

    #[test]
    fn medians_and_costs() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
        assert!((cost_pct(2000.0, 1900.0) - 5.0).abs() < 1e-9);
        assert!(cost_pct(2000.0, 2100.0) < 0.0);
    }

    #[test]
    fn costs_from_medians_and_from_rounds() {
        let off = [(1, 1000.0), (2, 800.0), (3, 900.0)];
        let on = [(1, 950.0), (2, 600.0), (3, 810.0)];
        let cost = Cost::from_rounds(&off, &on);
        assert_eq!(cost.rounds.len(), 3);
        assert!((cost.rounds[1] - 25.0).abs() < 1e-9);
        // Medians 900 and 810.
        assert!((cost.of_medians - 10.0).abs() < 1e-9);
        // Rounds 5 %, 25 %, 10 %.
        assert!((cost.round_median - 10.0).abs() < 1e-9);
        assert_eq!(cost.verdict(10.5), "met");
        assert_eq!(cost.verdict(5.0), "missed");
        let split = Cost {
            of_medians: 7.0,
            round_median: 12.0,
            rounds: Vec::new(),
        };
        assert!(split.verdict(10.0).starts_with("not settled"));
        // A round without its pair is left out.
        assert_eq!(Cost::from_rounds(&off, &on[..1]).rounds.len(), 1);
    }

    #[test]
    fn the_workload_is_handed_on_as_given() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            workload: Workload,
        }
        let given = Cli::parse_from(["x", "--duration-s", "3", "--filter", "warn,actors=info"]);
        let again =
            Cli::parse_from(std::iter::once("x".to_string()).chain(given.workload.to_args()));
        assert_eq!(again.workload.to_args(), given.workload.to_args());
        assert_eq!(again.workload.duration_s, 3);
        assert_eq!(again.workload.filter, "warn,actors=info");
    }
}
