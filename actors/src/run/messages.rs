//! Messages a `RunActor` handles, named as verbs.

use std::time::Duration;

use actix::prelude::*;
use agent_shim::protocol::{AnsweredCall, ShimMessage};
use bytestring::ByteString;

use crate::metrics::{QueueCounter, QueuedMessage};
use crate::sandbox_connection::messages::ToShim;
use crate::token::TokenError;

/// Ask the run to stop gracefully (`None`: the configured grace).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopRun {
    pub grace_s: Option<u64>,
}

/// Kill the run's sandbox at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct KillRun {
    pub reason: String,
}

/// A shim said hello on a connection whose token is valid for this run.
#[derive(Message)]
#[rtype(result = "Result<Attachment, TokenError>")]
pub struct ShimHello {
    pub conn_id: u64,
    pub conn: Recipient<ToShim>,
    pub host: String,
    pub resume_from: Option<u64>,
    pub pending_calls: Vec<String>,
    /// Calls the shim has answers to whose frames may not be recorded yet.
    pub answered_calls: Vec<AnsweredCall>,
}

/// What a connection learns when the run accepts its shim.
pub struct Attachment {
    /// Counts the frames the connection hands to the run actor until they are handled.
    pub mailbox: QueueCounter,
    /// The highest sequence number the run has taken; frames up to it are resends.
    pub last_seq: u64,
    /// The run's span, parent of the spans of the calls the connection answers itself.
    pub span: tracing::Span,
    /// The ids of the tool calls the run has taken: a call that uses one again is the run
    /// actor's to refuse, not the connection's to answer.
    pub calls_seen: std::collections::HashSet<String>,
}

/// A frame from the shim on the run's current connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShimFrame {
    pub conn_id: u64,
    pub message: ShimMessage,
    /// Counts the frame in the run actor's mailbox until it is handled.
    pub queued: Option<QueuedMessage>,
    /// A tool call the connection already answered (see `ToolHost::call_now`): the run records
    /// it and its answer instead of executing it.
    pub answered: Option<Box<AnsweredHere>>,
}

/// Frames from the shim on the run's current connection, in the order received.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShimFrames(pub Vec<ShimFrame>);

/// A tool call's answer sent by the connection that received the call.
pub struct AnsweredHere {
    /// The `tool_result` frame sent.
    pub frame: ByteString,
    /// Bytes of the result's JSON text.
    pub result_bytes: usize,
    pub took: Duration,
    /// The call's `tool.call` span, still open.
    pub span: tracing::Span,
}

/// The connection went away.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShimGone {
    pub conn_id: u64,
    pub reason: String,
}

/// Commands for the run wait in the store's queue: take and carry them out.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CheckCommands;

/// Another replica owns the run now: stop driving it, without writing anything.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Superseded {
    pub by: Option<String>,
}
