//! `load-tests`: load and latency harness for the codebolt control plane. Each scenario starts
//! the real server (in-process; as `codebolt server` processes on one Redis for `cluster`) and
//! drives it through its public interfaces; see the README for the figures and the commands that
//! reproduce them.

mod agent;
mod cluster;
mod docker_spawn;
mod echo;
mod fixture;
mod otlp;
mod relay;
mod sim_shim;
mod spawn;
mod stats;
mod toolcall;
mod trace_overhead;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "load-tests", about = "Load and latency harness for codebolt")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Many runs of a trivial agent: control-plane time from request to spawn call and to running.
    Spawn(spawn::SpawnArgs),
    /// Tool-call round trip through shim and server, next to a bare WebSocket echo.
    Toolcall(toolcall::ToolcallArgs),
    /// Replicas on one Redis: tool-call round trip, events/s, Redis work per call, failover time.
    Cluster(cluster::ClusterArgs),
    /// Spawn-to-connected of the Docker provider next to plain `docker run` of the same image.
    DockerSpawn(docker_spawn::DockerSpawnArgs),
    /// Tool-call throughput with span export over OTLP off and on, alternating, each a fresh process.
    TraceOverhead(trace_overhead::TraceOverheadArgs),
    /// One measurement of `trace-overhead`, with telemetry installed in this process.
    #[command(hide = true)]
    TraceOverheadChild(trace_overhead::ChildArgs),
    /// The agent the toolcall scenario runs in its sandbox (speaks SPEC §7a on stdin/stdout).
    #[command(hide = true)]
    Agent(agent::AgentArgs),
}

/// The same allocator as `codebolt`, since the harness hosts the server in-process.
#[global_allocator]
static ALLOCATOR: codebolt::Allocator = codebolt::Allocator;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => agent::run(args),
        Command::Spawn(args) => runtime()?.block_on(spawn::run(args)),
        Command::Toolcall(args) => runtime()?.block_on(toolcall::run(args)),
        Command::Cluster(args) => runtime()?.block_on(cluster::run(args)),
        Command::DockerSpawn(args) => runtime()?.block_on(docker_spawn::run(args)),
        Command::TraceOverhead(args) => runtime()?.block_on(trace_overhead::run(args)),
        Command::TraceOverheadChild(args) => runtime()?.block_on(trace_overhead::child(args)),
    }
}

/// A one-thread runtime: the client's (so the server's threads keep the rest of the machine),
/// and those of the harness's own servers and relay, each on a thread of its own.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
