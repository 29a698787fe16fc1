//! The `codebolt` binary: `codebolt server` and the client verbs that talk to it.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Parser;
use codebolt::telemetry::{self, TelemetrySettings};
use tracing_subscriber::EnvFilter;

mod cli;

use cli::{Cli, Command};

#[global_allocator]
static ALLOCATOR: codebolt::Allocator = codebolt::Allocator;

#[actix_web::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Server(_) = cli.command {
        // The server's logs and traces: text or JSON lines, spans over OTLP when configured.
        let env: HashMap<String, String> = std::env::vars().collect();
        let telemetry = match TelemetrySettings::from_env(&env, "info")
            .and_then(|settings| telemetry::init(&settings))
        {
            Ok(telemetry) => telemetry,
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::from(2);
            }
        };
        let code = cli::run(cli).await;
        // Flushing blocks until the exporter is done: off the async thread.
        if let Err(err) = tokio::task::spawn_blocking(move || telemetry.shutdown()).await {
            eprintln!("telemetry: flush task failed: {err}");
        }
        return code;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    cli::run(cli).await
}
