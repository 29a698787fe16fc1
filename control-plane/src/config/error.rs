//! The one error type of configuration loading.

use std::path::PathBuf;

/// Why a configuration file, a project file or an environment override was refused.
///
/// Every variant that comes from a file names the file and the dotted key path inside it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid yaml: {message}", file.display())]
    Syntax { file: PathBuf, message: String },
    #[error("{}: {key}: unknown key (expected one of: {})", file.display(), expected.join(", "))]
    UnknownKey {
        file: PathBuf,
        key: String,
        expected: Vec<String>,
    },
    #[error("{}: {key}: missing required key", file.display())]
    MissingKey { file: PathBuf, key: String },
    #[error("{}: {key}: {message}", file.display())]
    InvalidValue {
        file: PathBuf,
        key: String,
        message: String,
    },
    #[error("environment variable {var}: {message}")]
    InvalidEnv { var: String, message: String },
    #[error("workspace {} is not a directory", path.display())]
    WorkspaceNotFound { path: PathBuf },
    #[error("invalid agent name `{name}`: {reason}")]
    InvalidAgentName { name: String, reason: &'static str },
    #[error("agent `{name}` not found: {} does not exist", path.display())]
    AgentNotFound { name: String, path: PathBuf },
}
