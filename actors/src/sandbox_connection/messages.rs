//! Messages a `SandboxConnection` handles.

use actix::prelude::*;
use agent_shim::protocol::ServerMessage;
use bytestring::ByteString;

/// Send a frame to the shim, or close the connection.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum ToShim {
    Frame(ServerMessage),
    /// A frame already encoded (an answer the connection sent before, sent again).
    Text(ByteString),
    Close {
        code: u16,
        reason: String,
    },
}
