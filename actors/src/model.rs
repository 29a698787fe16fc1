//! Records shared by the store, the actors and the API: runs, their failures, events and logs.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

pub type RunId = Uuid;

/// Lifecycle state of a run (SPEC §5).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Pending,
    Provisioning,
    Starting,
    Running,
    Stopping,
    Succeeded,
    Failed,
    Stopped,
    Killed,
}

impl RunState {
    pub const ALL: [RunState; 9] = [
        RunState::Pending,
        RunState::Provisioning,
        RunState::Starting,
        RunState::Running,
        RunState::Stopping,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Stopped,
        RunState::Killed,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Stopped | RunState::Killed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Provisioning => "provisioning",
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Stopping => "stopping",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Stopped => "stopped",
            RunState::Killed => "killed",
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RunState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown run state '{s}' (expected one of: {})",
                    RunState::ALL.map(RunState::as_str).join(", ")
                )
            })
    }
}

/// Why a run failed. Each has its own hint for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The sandbox is up but the shim never connected back.
    UnreachableCallback,
    ImagePullFailed,
    /// The sandbox did not come up within the startup timeout.
    StartupTimeout,
    /// OOM-killed or another resource limit hit.
    ResourceExhausted,
    ProviderError,
    /// The agent exited non-zero.
    AgentError,
    /// The shim lost its connection and did not come back in time.
    ConnectionLost,
    /// No agent activity within the idle timeout.
    IdleTimeout,
    /// The run exceeded its absolute time to live.
    RunTimeout,
    /// The shim broke the protocol.
    ProtocolError,
    /// The sandbox disappeared while the run was live.
    SandboxVanished,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::UnreachableCallback => "unreachable_callback",
            FailureKind::ImagePullFailed => "image_pull_failed",
            FailureKind::StartupTimeout => "startup_timeout",
            FailureKind::ResourceExhausted => "resource_exhausted",
            FailureKind::ProviderError => "provider_error",
            FailureKind::AgentError => "agent_error",
            FailureKind::ConnectionLost => "connection_lost",
            FailureKind::IdleTimeout => "idle_timeout",
            FailureKind::RunTimeout => "run_timeout",
            FailureKind::ProtocolError => "protocol_error",
            FailureKind::SandboxVanished => "sandbox_vanished",
        }
    }

    /// What an operator should check, as the seed's debugging section says.
    pub fn hint(self) -> &'static str {
        match self {
            FailureKind::UnreachableCallback => {
                "the sandbox started but never connected back: check the callback URL (public_url), firewall rules and DNS from inside the sandbox"
            }
            FailureKind::ImagePullFailed => {
                "check the image name and the registry credentials of the provider"
            }
            FailureKind::StartupTimeout => {
                "the sandbox took too long to start: increase the startup timeout or use a smaller image"
            }
            FailureKind::ResourceExhausted => {
                "the sandbox ran out of memory or CPU: raise the limits in the agent manifest or the provider's default_resources"
            }
            FailureKind::ProviderError => {
                "the execution provider refused or failed: see `codebolt agent logs <run_id> --source provider` and `codebolt providers list`"
            }
            FailureKind::AgentError => {
                "the agent exited with a non-zero code: see `codebolt agent logs <run_id>`"
            }
            FailureKind::ConnectionLost => {
                "the sandbox stopped talking to the control plane: check the network between them and the sandbox's health"
            }
            FailureKind::IdleTimeout => {
                "the agent produced no events or tool calls within the idle timeout: raise timeouts.idle_s or check the agent for a hang"
            }
            FailureKind::RunTimeout => {
                "the run exceeded its time to live: raise timeout_s for the run or timeouts.run_ttl_s"
            }
            FailureKind::ProtocolError => {
                "the shim sent frames the control plane could not accept: check that shim and control plane versions match"
            }
            FailureKind::SandboxVanished => {
                "the sandbox disappeared without reporting an exit: it may have been removed or its host restarted"
            }
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
    pub hint: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
            hint: kind.hint().to_string(),
        }
    }
}

/// How a run that was asked to end, ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Termination {
    /// The agent exited on its own.
    Exited,
    /// A stop was requested and the agent exited within the grace period.
    StoppedGracefully,
    /// A stop was requested and the grace period ran out, so the sandbox was killed.
    KilledAfterGrace,
    /// A kill was requested.
    Killed,
    /// The control plane ended the run (a timeout or a lost sandbox).
    Failed,
}

/// Requested or effective resources of a sandbox; every field optional so they merge field by field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_count: Option<u32>,
}

impl Resources {
    /// `self` over `base`, field by field.
    pub fn over(&self, base: &Resources) -> Resources {
        Resources {
            memory_mb: self.memory_mb.or(base.memory_mb),
            cpu: self.cpu.or(base.cpu),
            gpu_count: self.gpu_count.or(base.gpu_count),
        }
    }
}

/// Latest resource usage reported for a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pct: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    pub reported_at: Option<DateTime<Utc>>,
}

/// Evidence kept on a failed run: the last provider log lines and events before the end.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Evidence {
    pub provider_logs: Vec<String>,
    pub agent_logs: Vec<String>,
}

/// Everything known about one run; what `GET /v1/runs/{id}` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunRecord {
    #[schema(value_type = String)]
    pub id: RunId,
    pub agent: String,
    pub task: String,
    pub provider: String,
    pub state: RunState,
    /// Where the sandbox runs (host name, container or process id).
    pub remote_host: Option<String>,
    /// Provider's own id of the sandbox.
    pub sandbox_id: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When the run entered each state it went through.
    pub state_times: BTreeMap<RunState, DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub failure: Option<Failure>,
    pub termination: Option<Termination>,
    pub resources: Resources,
    pub usage: Usage,
    pub cost_estimate: Option<f64>,
    pub trace_id: String,
    pub owner: String,
    /// Absolute time to live in seconds, if the run has one.
    pub timeout_s: Option<u64>,
    /// Result reported by the agent's `done` line.
    pub result: Option<Value>,
    pub evidence: Option<Evidence>,
    /// Extra environment requested for the agent (names only are shown, values kept server-side).
    #[serde(default)]
    pub env_names: Vec<String>,
}

/// One entry of a run's history (`GET /v1/runs/{id}/events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunEvent {
    /// Position in the run's history, from 1.
    pub index: u64,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    StateChanged {
        from: RunState,
        to: RunState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failure: Option<Failure>,
    },
    /// The provider pulls the sandbox's image.
    ImagePull {
        image: String,
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        current_bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total_bytes: Option<u64>,
    },
    SandboxCreated {
        sandbox_id: String,
        remote_host: String,
    },
    ShimConnected {
        host: String,
        resumed: bool,
    },
    ShimDisconnected {
        reason: String,
    },
    AgentStarted {
        pid: u32,
    },
    AgentMessage {
        text: String,
    },
    AgentDone {
        result: Value,
    },
    ToolCall {
        call_id: String,
        tool: String,
    },
    ToolResult {
        call_id: String,
        tool: String,
        ok: bool,
        duration_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error_code: Option<String>,
    },
    StopRequested {
        grace_s: u64,
    },
    /// The shim forwarded SIGTERM to the agent.
    StopForwarded {
        grace_s: u64,
    },
    KillRequested {
        reason: String,
    },
    Usage {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cpu_pct: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_bytes: Option<u64>,
    },
    AgentExited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    Warning {
        message: String,
    },
}

impl EventKind {
    /// True for the event that closes a run's history.
    pub fn is_final(&self) -> bool {
        matches!(self, EventKind::StateChanged { to, .. } if to.is_terminal())
    }
}

/// Which log a line belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogSource {
    /// The agent's stdout/stderr relayed by the shim.
    Agent,
    /// The sandbox's own output as the provider sees it (container logs, process output).
    Provider,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    pub index: u64,
    pub at: DateTime<Utc>,
    pub stream: String,
    pub line: String,
}
