//! Execution providers: the `Provider` trait every backend implements, the provider actor that
//! wraps one, and the backends.

pub mod actor;
pub mod docker;
pub mod local;

use std::collections::BTreeMap;
use std::pin::Pin;

use async_trait::async_trait;
use futures_util::Stream;
use serde::Serialize;
use utoipa::ToSchema;

use crate::model::{Resources, RunId, Usage};

/// Labels set on every sandbox so the reconciler can find it again.
pub mod labels {
    pub const RUN_ID: &str = "codebolt.run-id";
    pub const AGENT: &str = "codebolt.agent";
    pub const CLUSTER: &str = "codebolt.cluster-id";
}

/// What a provider needs to start one sandbox.
#[derive(Debug, Clone)]
pub struct SpawnRequest {
    pub run_id: RunId,
    pub agent: String,
    /// Image requested by the agent manifest, if any.
    pub image: Option<String>,
    /// Resources merged over the provider's defaults.
    pub resources: Resources,
    /// Environment of the sandbox: the `CODEBOLT_*` variables and `TRACEPARENT` (SPEC §6).
    /// Contains the run token: never log it.
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// Where the provider reports progress while it spawns (image pulls); may be full or
    /// closed, which never fails the spawn.
    pub progress: Option<tokio::sync::mpsc::Sender<SpawnProgress>>,
    /// The run's `sandbox.create` span: the provider's own steps (image pull, container or
    /// process start) are its children.
    pub span: tracing::Span,
}

/// Progress of a spawn, recorded as run events.
#[derive(Debug, Clone, PartialEq)]
pub enum SpawnProgress {
    ImagePull {
        image: String,
        status: String,
        current_bytes: Option<u64>,
        total_bytes: Option<u64>,
    },
}

/// A started sandbox, as the provider knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SandboxHandle {
    /// Provider's id: container id, pod name, pid, …
    pub id: String,
    /// Where it runs, for run details.
    pub remote_host: String,
}

/// How a sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The provider saw the sandbox killed for exceeding its memory limit.
    pub oom_killed: bool,
}

/// A sandbox found by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxInfo {
    pub handle: SandboxHandle,
    pub labels: BTreeMap<String, String>,
    pub running: bool,
}

/// One line of a sandbox's own output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderLogLine {
    pub stream: String,
    pub line: String,
}

pub type LogStream = Pin<Box<dyn Stream<Item = Result<ProviderLogLine, ProviderError>> + Send>>;

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    #[error("provider '{provider}' is unavailable: {message}")]
    Unavailable { provider: String, message: String },
    #[error("image '{image}' could not be pulled: {message}")]
    ImagePull { image: String, message: String },
    #[error("sandbox '{id}' not found")]
    SandboxNotFound { id: String },
    #[error("spawn refused: {message}")]
    SpawnFailed { message: String },
    #[error("{operation} failed: {message}")]
    Operation {
        operation: &'static str,
        message: String,
    },
}

impl ProviderError {
    /// A short, stable name of the error's kind (for metrics' `error.type`).
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::Unavailable { .. } => "unavailable",
            ProviderError::ImagePull { .. } => "image_pull",
            ProviderError::SandboxNotFound { .. } => "sandbox_not_found",
            ProviderError::SpawnFailed { .. } => "spawn_failed",
            ProviderError::Operation { .. } => "operation_failed",
        }
    }
}

/// Health of a provider as shown by `GET /v1/providers`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ProviderHealth {
    pub healthy: bool,
    pub message: Option<String>,
}

/// A backend that starts and stops sandboxes. Implementations must not block: every method is
/// awaited from an actor's context.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// `local`, `docker`, `kubernetes`, `ssh`, …
    fn kind(&self) -> &'static str;

    /// Creates and starts the sandbox; returns once it exists (the shim may not be connected yet).
    async fn spawn(&self, request: SpawnRequest) -> Result<SandboxHandle, ProviderError>;

    /// Resolves when the sandbox ends.
    async fn wait(&self, sandbox: &SandboxHandle) -> Result<SandboxExit, ProviderError>;

    /// Asks the sandbox to terminate (SIGTERM or the provider's equivalent).
    async fn stop(&self, sandbox: &SandboxHandle) -> Result<(), ProviderError>;

    /// Ends the sandbox at once and frees its resources. Idempotent: an already gone sandbox is Ok.
    async fn kill(&self, sandbox: &SandboxHandle) -> Result<(), ProviderError>;

    /// The sandbox's own output; with `follow`, the stream continues until the sandbox ends.
    async fn logs(&self, sandbox: &SandboxHandle, follow: bool)
        -> Result<LogStream, ProviderError>;

    /// Latest resource usage, if the provider can read it.
    async fn usage(&self, sandbox: &SandboxHandle) -> Result<Option<Usage>, ProviderError>;

    /// Sandboxes carrying all the given labels.
    async fn list(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<SandboxInfo>, ProviderError>;

    /// Whether the backend is reachable.
    async fn health(&self) -> ProviderHealth;
}
