//! Messages a `SandboxConnection` handles.

use actix::prelude::*;
use agent_shim::protocol::ServerMessage;

/// Send a frame to the shim, or close the connection.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum ToShim {
    Frame(ServerMessage),
    Close { code: u16, reason: String },
}
