//! `codebolt server`: the HTTP API, the sandbox WebSocket endpoint and the actors behind them.

use std::collections::HashMap;
use std::path::PathBuf;

/// What `codebolt server` was given on its command line.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    pub listen: Option<String>,
    pub config: Option<PathBuf>,
    pub workspace: Option<PathBuf>,
    /// The process environment, read once by the binary.
    pub env: HashMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("server not assembled yet")]
    NotReady,
}

/// Runs the server until SIGINT/SIGTERM.
pub async fn run_until_signal(_options: ServerOptions) -> Result<(), ServerError> {
    Err(ServerError::NotReady)
}
