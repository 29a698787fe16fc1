//! Command line of the `codebolt` binary: `codebolt server` and the client verbs.
//!
//! The verbs are thin: [`client`] speaks the HTTP API, [`output`] renders what comes back and
//! [`commands`] strings the two together. Everything that can be tested without a server lives in
//! [`output`] and [`exit`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use uuid::Uuid;

mod client;
mod commands;
mod exit;
mod output;

pub use exit::EXIT_CODES_HELP;

/// Run AI agents in sandboxes: the control-plane server and its client.
#[derive(Debug, Parser)]
#[command(name = "codebolt", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control-plane server (HTTP API and sandbox endpoint).
    Server(ServerArgs),
    /// Start, watch, stop and inspect agent runs.
    Agent(AgentArgs),
    /// Inspect the configured execution providers.
    Providers(ProvidersArgs),
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on [default: 127.0.0.1:7420].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Server configuration file (providers, store, public_url).
    #[arg(long, value_name = "FILE", env = "CODEBOLT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Project workspace whose `.codebolt/` holds agents and settings [default: current directory].
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
}

/// How client verbs reach the server.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// URL of the codebolt server.
    #[arg(
        long = "server",
        value_name = "URL",
        env = "CODEBOLT_SERVER",
        default_value = "http://127.0.0.1:7420",
        global = true
    )]
    pub server: String,
    /// API bearer token (required by servers listening beyond loopback).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CODEBOLT_API_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub api_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    #[command(subcommand)]
    pub command: AgentCommand,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Start a run of an agent, print its id and follow its progress.
    #[command(after_help = EXIT_CODES_HELP)]
    Start(StartArgs),
    /// Ask a run to stop gracefully; the sandbox is killed if the agent outlives the grace period.
    Stop(StopArgs),
    /// Kill a run's sandbox at once.
    Kill(KillArgs),
    /// Print a run's agent or provider logs.
    Logs(LogsArgs),
    /// List runs.
    List(ListArgs),
    /// Show every detail of one run.
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Agent name, as in `.codebolt/agents/<name>/` of the server's workspace.
    pub agent: String,
    /// Execution provider for this run; overrides the agent manifest and project default.
    #[arg(long, value_name = "PROVIDER")]
    pub execution: Option<String>,
    /// The task handed to the agent.
    #[arg(long)]
    pub task: String,
    /// Memory limit of the sandbox in MB.
    #[arg(long, value_name = "N")]
    pub memory_mb: Option<u64>,
    /// CPU limit of the sandbox, in cores.
    #[arg(long, value_name = "F")]
    pub cpu: Option<f64>,
    /// Time to live of the run in seconds.
    #[arg(long, value_name = "S")]
    pub timeout: Option<u64>,
    /// Extra environment for the agent (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,
    /// Makes retries of this request start at most one run.
    #[arg(long, value_name = "K")]
    pub idempotency_key: Option<String>,
    /// Print the run id and return without following the run.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Run id, as printed by `codebolt agent start`.
    pub run_id: Uuid,
    /// Seconds the agent gets to exit after SIGTERM before the sandbox is killed.
    #[arg(long, value_name = "S")]
    pub grace: Option<u64>,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Run id, as printed by `codebolt agent start`.
    pub run_id: Uuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogSourceArg {
    /// The agent's stdout and stderr.
    Agent,
    /// The sandbox as the provider sees it (container logs, process output).
    Provider,
}

impl LogSourceArg {
    pub fn as_str(self) -> &'static str {
        match self {
            LogSourceArg::Agent => "agent",
            LogSourceArg::Provider => "provider",
        }
    }
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Run id, as printed by `codebolt agent start`.
    pub run_id: Uuid,
    /// Which log to print.
    #[arg(long, value_enum, default_value_t = LogSourceArg::Agent)]
    pub source: LogSourceArg,
    /// Keep printing new lines until the run ends.
    #[arg(short, long)]
    pub follow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TableOrJson {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TextOrJson {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only runs in this state (pending, running, succeeded, failed, …).
    #[arg(long, value_name = "S")]
    pub state: Option<actors::model::RunState>,
    /// Only runs of this agent.
    #[arg(long, value_name = "A")]
    pub agent: Option<String>,
    /// Only runs on this execution provider.
    #[arg(long, value_name = "P")]
    pub provider: Option<String>,
    /// At most this many runs [default: all].
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub limit: Option<usize>,
    #[arg(long, short, value_enum, default_value_t = TableOrJson::Table)]
    pub output: TableOrJson,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Run id, as printed by `codebolt agent start`.
    pub run_id: Uuid,
    #[arg(long, short, value_enum, default_value_t = TextOrJson::Text)]
    pub output: TextOrJson,
}

#[derive(Debug, Args)]
pub struct ProvidersArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    #[command(subcommand)]
    pub command: ProvidersCommand,
}

#[derive(Debug, Subcommand)]
pub enum ProvidersCommand {
    /// List the configured providers with their health and load.
    List {
        #[arg(long, short, value_enum, default_value_t = TableOrJson::Table)]
        output: TableOrJson,
    },
}

fn parse_limit(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) | Err(_) => Err(format!("expected a positive number, got '{s}'")),
        Ok(n) => Ok(n),
    }
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got '{s}'")),
    }
}

/// Runs the parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Server(args) => commands::server(args).await,
        Command::Agent(AgentArgs {
            connection,
            command,
        }) => commands::agent(connection, command).await,
        Command::Providers(ProvidersArgs {
            connection,
            command,
        }) => commands::providers(connection, command).await,
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit::USAGE_OR_CONNECTION)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn env_pairs_split_on_the_first_equals_sign() {
        assert_eq!(
            parse_env_pair("A=b=c"),
            Ok(("A".to_string(), "b=c".to_string()))
        );
        assert_eq!(parse_env_pair("A="), Ok(("A".to_string(), String::new())));
        assert!(parse_env_pair("=x").is_err());
        assert!(parse_env_pair("novalue").is_err());
    }

    #[test]
    fn start_parses_the_seed_example() {
        let cli = Cli::try_parse_from([
            "codebolt",
            "agent",
            "start",
            "my-agent",
            "--execution",
            "docker",
            "--task",
            "fix the bug",
            "--env",
            "A=1",
            "--server",
            "http://example:1",
        ])
        .unwrap();
        let Command::Agent(AgentArgs {
            connection,
            command: AgentCommand::Start(start),
        }) = cli.command
        else {
            panic!("expected agent start");
        };
        assert_eq!(connection.server, "http://example:1");
        assert_eq!(start.agent, "my-agent");
        assert_eq!(start.execution.as_deref(), Some("docker"));
        assert_eq!(start.env, vec![("A".to_string(), "1".to_string())]);
        assert!(!start.detach);
    }

    #[test]
    fn list_rejects_an_unknown_state() {
        assert!(Cli::try_parse_from(["codebolt", "agent", "list", "--state", "bogus"]).is_err());
    }
}
