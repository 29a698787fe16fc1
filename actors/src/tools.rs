//! The seam through which run actors execute tool calls; the control plane implements it.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::model::RunId;

/// Error codes agents see (SPEC §7a).
pub mod codes {
    pub const NOT_FOUND: &str = "not_found";
    pub const OUTSIDE_WORKSPACE: &str = "outside_workspace";
    pub const INVALID_ARGS: &str = "invalid_args";
    pub const UNKNOWN_TOOL: &str = "unknown_tool";
    pub const TIMEOUT: &str = "timeout";
    pub const IO_ERROR: &str = "io_error";
    pub const TOO_LARGE: &str = "too_large";
    pub const RETRYABLE: &str = "retryable";
    /// A tool call whose id an earlier call of the run already used.
    pub const DUPLICATE_CALL_ID: &str = "duplicate_call_id";
}

/// A tool call's failure, as returned to the agent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ToolFailure {
    pub code: &'static str,
    pub message: String,
}

impl ToolFailure {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ToolFailure {
            code,
            message: message.into(),
        }
    }
}

/// A tool call's result had at once ([`ToolHost::call_now`]), as its JSON text, so the answer
/// is written around it without encoding the result again.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyResult {
    /// The result as `serde_json` encodes it.
    pub json: Arc<str>,
}

impl ReadyResult {
    /// A result's encoding.
    pub fn new(value: &Value) -> Result<ReadyResult, serde_json::Error> {
        Ok(ReadyResult {
            json: serde_json::to_string(value)?.into(),
        })
    }
}

/// Executes tools for a run against the project workspace.
#[async_trait]
pub trait ToolHost: Send + Sync + 'static {
    /// Runs one tool call. Must not block the calling thread (use `spawn_blocking` for file I/O).
    async fn call(&self, run_id: RunId, tool: &str, args: Value) -> Result<Value, ToolFailure>;

    /// The answer to a call that can be had at once, without waiting for anything (a read the
    /// kernel serves from memory, say), or `None` to leave the call to [`ToolHost::call`]. The
    /// connection that received the call answers it on the spot with this; it must be exactly
    /// what `call` would answer, and safe to run again for a call that is resent.
    fn call_now(&self, _run_id: RunId, _tool: &str, _args: &Value) -> Option<ReadyResult> {
        None
    }

    /// Names of the tools this host serves.
    fn tools(&self) -> Vec<&'static str>;
}
