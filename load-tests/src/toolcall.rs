//! `toolcall`: the round trip of a tool call, agent → shim → server → shim → agent, next to the
//! server's share of it (a simulated shim) and the physical floor (a bare WebSocket echo).

use std::path::PathBuf;

use actors::model::RunState;
use agent_shim::protocol::{ServerMessage, ShimMessage};
use anyhow::{bail, ensure, Context};
use clap::Args;
use serde_json::json;

use crate::agent::AgentReport;
use codebolt::telemetry::TelemetrySettings;

use crate::fixture::{self, shell_quote, Api, InProcessServer, LocalProvider, Workspace};
use crate::relay;
use crate::stats::{self, Budget, Summary};
use crate::{echo, sim_shim};

/// The target: a tool call's round trip, at p50, within twice the echo floor.
const TARGET_RATIO: f64 = 2.0;

#[derive(Debug, Args)]
pub struct ToolcallArgs {
    /// Measured round trips of each variant.
    #[arg(long, default_value_t = 2000)]
    calls: u64,
    /// Round trips made first and left out of the figures.
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Size of the workspace's README.md, the file each `fs.read_file` call reads.
    #[arg(long, default_value_t = 1024)]
    file_bytes: usize,
    /// HTTP worker threads of the server.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Leave out the simulated-shim variant.
    #[arg(long)]
    no_sim_shim: bool,
    /// Follow the full-path run's events while it runs (as `codebolt agent start` does) instead
    /// of reading its record every 50 ms until it ends. The follower is this process, on the
    /// server's cores, woken for each call's two events.
    #[arg(long)]
    follow_events: bool,
    /// The agent-shim binary; by default the one next to this binary.
    #[arg(long)]
    shim: Option<PathBuf>,
}

/// How often the full path's run record is read while nobody follows its events.
const FULL_PATH_POLL: std::time::Duration = std::time::Duration::from_millis(50);

pub(crate) const TOOL: &str = "fs.read_file";
pub(crate) const PATH: &str = "README.md";

/// What `toolcall` and `trace-overhead` measure with: a workspace whose `toolcall` agent is this
/// binary (`agent <agent args> --tool fs.read_file --path README.md`), and the server in-process
/// with two `local` providers: the real shim (`local`) and the simulated shim's sleeping stand-in.
pub(crate) struct Bench {
    /// First, so it stops before the directories go.
    pub server: InProcessServer,
    pub workspace: Workspace,
    _scripts: tempfile::TempDir,
}

impl Bench {
    /// `telemetry`: installed on the server's thread first (see `InProcessServer::start_traced`).
    pub fn start(
        agent_args: &str,
        file_bytes: usize,
        shim: PathBuf,
        workers: usize,
        telemetry: Option<TelemetrySettings>,
    ) -> anyhow::Result<Bench> {
        let exe = std::env::current_exe().context("path of the load-tests binary")?;
        let workspace = Workspace::new(file_bytes)?;
        workspace.agent(
            "toolcall",
            &format!(
                "{} agent {agent_args} --tool {TOOL} --path {PATH}",
                shell_quote(&exe.display().to_string())
            ),
        )?;
        let scripts = tempfile::Builder::new()
            .prefix("codebolt-load-bin-")
            .tempdir()?;
        let server = InProcessServer::start_traced(
            workspace.path(),
            &[
                LocalProvider {
                    name: "local".into(),
                    shim_path: shim,
                },
                LocalProvider {
                    name: sim_shim::PROVIDER.into(),
                    shim_path: sim_shim::write_sleeper(scripts.path())?,
                },
            ],
            fixture::load_timeouts(),
            workers,
            telemetry,
        )?;
        Ok(Bench {
            server,
            workspace,
            _scripts: scripts,
        })
    }
}

struct Row {
    label: &'static str,
    latency: Summary,
    per_s: f64,
    frames: String,
}

pub async fn run(args: ToolcallArgs) -> anyhow::Result<()> {
    let shim = fixture::shim_binary(args.shim.as_deref())?;
    let exe = std::env::current_exe().context("path of the load-tests binary")?;
    let bench = Bench::start(
        &format!("--calls {} --warmup {}", args.calls, args.warmup),
        args.file_bytes,
        shim,
        args.workers,
        None,
    )?;
    let server = &bench.server;
    let readme = std::fs::read_to_string(bench.workspace.path().join(PATH))?;
    let api = Api::new(&server.base_url)?;
    println!(
        "toolcall: {} round trips (+{} warmup) of {TOOL} {{path: {PATH}}} ({} bytes), one at a time; server in-process on {} ({} HTTP workers)",
        args.calls, args.warmup, args.file_bytes, server.base_url, args.workers
    );

    // Frames of the sizes the shim and the server exchange for one of these calls.
    let call_frame = serde_json::to_string(&ShimMessage::ToolCall {
        seq: args.warmup + args.calls,
        call_id: format!("c{}", args.warmup + args.calls),
        tool: TOOL.into(),
        args: json!({"path": PATH}),
    })?;
    let result_frame = serde_json::to_string(&ServerMessage::ToolResult {
        call_id: format!("c{}", args.warmup + args.calls),
        ok: true,
        result: Some(json!({"content": readme})),
        error: None,
    })?;
    let mut rows = Vec::new();

    let floor = echo::measure(
        call_frame.clone(),
        result_frame.clone(),
        args.warmup,
        args.calls,
    )
    .await?;
    rows.push(Row {
        label: "bare WebSocket echo, loopback (floor)",
        latency: floor.latency,
        per_s: floor.per_s,
        frames: format!("{} → {}", call_frame.len(), result_frame.len()),
    });

    if !args.no_sim_shim {
        for (quickack, label) in [
            (false, "simulated shim → server → simulated shim"),
            (true, "  same, shim socket in TCP_QUICKACK"),
        ] {
            let sim = sim_shim::measure(
                &api,
                "toolcall",
                TOOL,
                PATH,
                Budget {
                    warmup: args.warmup,
                    calls: args.calls,
                    duration: None,
                },
                quickack,
            )
            .await?;
            rows.push(Row {
                label,
                latency: sim.latency,
                per_s: sim.per_s,
                frames: format!(
                    "{} → {} (+ ack)",
                    sim.call_frame_bytes, sim.result_frame_bytes
                ),
            });
        }
    }

    let created = api.create(fixture::run_request("toolcall", None)).await?;
    let record = if args.follow_events {
        api.wait_end(&created.id.to_string()).await?
    } else {
        api.poll_end(&created.id.to_string(), FULL_PATH_POLL)
            .await?
    };
    if record.state != RunState::Succeeded {
        bail!(
            "the toolcall agent's run ended {}: {:?}",
            record.state,
            record.failure
        );
    }
    let report: AgentReport = serde_json::from_value(
        record
            .result
            .clone()
            .context("the toolcall run has no result")?,
    )
    .context("the toolcall agent's report")?;
    ensure!(
        report.errors == 0,
        "{} tool calls of the agent failed",
        report.errors
    );
    let relay = {
        let (exe, readme) = (exe.clone(), readme.clone());
        let (warmup, calls) = (args.warmup, args.calls);
        tokio::task::spawn_blocking(move || relay::measure(&exe, TOOL, PATH, readme, warmup, calls))
            .await
            .context("the relay measurement")??
    };
    let path_floor_p50 = relay.latency.p50_us;
    rows.push(Row {
        label: "agent → relay → answering server → relay → agent",
        latency: relay.latency,
        per_s: relay.calls_per_s,
        frames: format!(
            "lines {} → {}",
            relay.call_line_bytes, relay.result_line_bytes
        ),
    });
    rows.push(Row {
        label: if args.follow_events {
            "agent → shim → server → shim → agent (events followed)"
        } else {
            "agent → shim → server → shim → agent"
        },
        latency: report.latency,
        per_s: report.calls_per_s,
        frames: format!(
            "lines {} → {}",
            report.call_line_bytes, report.result_line_bytes
        ),
    });
    bench.server.shutdown()?;

    print_report(&rows, floor.latency.p50_us, path_floor_p50);
    Ok(())
}

fn print_report(rows: &[Row], floor_p50_us: f64, path_floor_p50_us: f64) {
    let header = [
        "round trip",
        "n",
        "p50",
        "p90",
        "p99",
        "max",
        "mean",
        "per s",
        "p50 ÷ floor",
        "bytes out → in",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let mut cells = vec![row.label.to_string()];
            cells.extend(stats::summary_cells(&row.latency));
            cells.push(format!("{:.0}", row.per_s));
            cells.push(format!("{:.1}×", row.latency.p50_us / floor_p50_us));
            cells.push(row.frames.clone());
            cells
        })
        .collect();
    println!();
    print!("{}", stats::table(&header, &cells));
    println!();
    if let Some(full) = rows.last() {
        let ratio = full.latency.p50_us / floor_p50_us;
        println!(
            "target: tool-call round trip p50 ≤ {TARGET_RATIO}× the echo floor → {} vs {} = {ratio:.1}× ({})",
            stats::fmt_us(full.latency.p50_us),
            stats::fmt_us(floor_p50_us),
            if ratio <= TARGET_RATIO { "met" } else { "missed" }
        );
        println!(
            "the path's own floor (agent → relay → answering server → relay → agent) is {} = {:.1}× the echo; the full path is {:.1}× that",
            stats::fmt_us(path_floor_p50_us),
            path_floor_p50_us / floor_p50_us,
            full.latency.p50_us / path_floor_p50_us
        );
    }
}
