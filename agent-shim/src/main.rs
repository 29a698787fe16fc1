//! `agent-shim`: runs inside a sandbox, connects back to the control plane and runs the agent.
//!
//! Exit codes: 0 the agent ran and exited (with any status; the status is reported as `exited`)
//! and everything was acknowledged; 1 internal error; 2 invalid configuration (the message names
//! the variable); 3 the control plane was unreachable for `lost_after` (agent stopped);
//! 4 the run token was refused (HTTP 401/403 or close 1008; agent stopped); 5 the bundle could
//! not be fetched, verified or unpacked, or the agent could not be started.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use agent_shim::shim::{self, config::Config, ShimExit, EXIT_CONFIG};

/// Every relayed line is parsed and encoded into strings of about a result's size; mimalloc
/// serves those from per-size pages where glibc's malloc takes its slower paths above 1 KiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let vars: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let config = match Config::from_env(&vars) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("agent-shim: {e}");
            return exit_code(EXIT_CONFIG);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("agent-shim: cannot start the runtime: {e}");
            return exit_code(ShimExit::Failed.code());
        }
    };
    let exit = runtime.block_on(async move {
        let shutdown = match shim::shutdown_signals() {
            Ok(shutdown) => shutdown,
            Err(e) => {
                eprintln!("agent-shim: cannot install signal handlers: {e}");
                return ShimExit::Failed;
            }
        };
        shim::run(config, shutdown).await
    });
    exit_code(exit.code())
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
