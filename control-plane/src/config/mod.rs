//! Configuration files (SPEC §3).
//!
//! - [`ServerConfig`]: `codebolt.yaml` (providers, store, public URL, timeouts) plus the
//!   `CODEBOLT_*` environment overrides, validated once at startup.
//! - [`Project`]: the workspace's `.codebolt/settings.yaml` and agent manifests.
//! - [`resolve_execution`] / [`resolve_resources`]: where a run goes and with what.
//!
//! Unknown keys and bad values are errors naming the file and the dotted key path, e.g.
//! `codebolt.yaml: providers.docker.sockett: unknown key (expected one of: socket, …)`.

mod error;
mod project;
mod provider;
mod resolve;
mod server;
mod yaml;

pub use error::ConfigError;
pub use project::{
    validate_agent_name, AgentExecution, AgentManifest, ExecutionSettings, Project,
    ProjectSettings, MANIFEST_FILE, PROJECT_DIR,
};
pub use provider::{
    BackendConfig, CostRates, DockerConfig, DockerHardening, KubernetesConfig, LocalConfig,
    ProviderConfig, ProviderKind, SshConfig, LOCAL_PROVIDER,
};
pub use resolve::{resolve_execution, resolve_resources};
pub use server::{env_vars, ApiToken, ServerConfig, StoreConfig, Timeouts};

/// Names of agents and providers: one path component of letters, digits, `.`, `_` and `-`.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > 128 {
        return Err("must be at most 128 characters");
    }
    if name.chars().all(|c| c == '.') {
        return Err("must not be `.` or `..`");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err("use only letters, digits, `.`, `_` and `-`");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
