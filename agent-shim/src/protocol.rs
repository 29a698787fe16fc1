//! Wire protocol between the agent-shim (inside a sandbox) and the control plane.
//!
//! WebSocket text frames carrying one JSON object each, tagged by `type`.
//! Every shim→server message that must not be lost carries a `seq`: a per-run sequence number,
//! starting at 1 and increasing by one. The server acknowledges with a cumulative `ack{seq}` once
//! the message is persisted; the shim keeps unacknowledged messages in a bounded buffer and, after
//! a reconnect, resends every message above the `last_acked` announced in `welcome`. The server
//! drops any `seq` it has already acknowledged, so nothing is lost or duplicated.
//!
//! Server→shim traffic is recovered by state instead of sequence numbers: on `hello` the shim
//! lists the tool calls it still waits for (`pending_calls`) and the server answers each one it
//! has a result for; a `stop` is re-sent to a shim that reconnects to a run that is stopping.
//!
//! This module depends on serde only, so any client can share it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Version spoken by this build. The server refuses a `hello` with a version it does not know.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side accepts (bytes of one WebSocket text message).
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Largest line the shim accepts from the agent's stdout (bytes).
pub const MAX_AGENT_LINE_BYTES: usize = 4 * 1024 * 1024;

/// WebSocket close code sent when a token is missing, wrong, expired, or for another run.
pub const CLOSE_POLICY_VIOLATION: u16 = 1008;

/// Path of the WebSocket endpoint, relative to the callback URL's origin.
pub const CONNECT_PATH: &str = "/v1/sandbox/connect";

/// Environment variables passed to every sandbox (SPEC §6) and read by the shim.
pub mod env {
    pub const RUN_ID: &str = "CODEBOLT_RUN_ID";
    /// Base URL of the control plane as seen from the sandbox, e.g. `http://10.0.0.1:7420`.
    pub const CALLBACK_URL: &str = "CODEBOLT_CALLBACK_URL";
    pub const RUN_TOKEN: &str = "CODEBOLT_RUN_TOKEN";
    pub const TRACEPARENT: &str = "TRACEPARENT";
    /// Seconds the shim keeps trying to reach the control plane before it stops its agent and exits.
    pub const LOST_AFTER_S: &str = "CODEBOLT_LOST_AFTER_S";
    /// Directory where the shim unpacks the bundle (the agent's working directory).
    pub const WORK_DIR: &str = "CODEBOLT_WORK_DIR";
    /// Given to the agent process.
    pub const TASK: &str = "CODEBOLT_TASK";
}

/// Messages the shim sends to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ShimMessage {
    /// First frame on every connection.
    Hello {
        run_id: String,
        protocol_version: u32,
        host: String,
        /// Highest seq the shim has ever received an ack for; `None` on the first connection.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_from: Option<u64>,
        /// Tool calls sent but not yet answered, so the server can answer them again.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pending_calls: Vec<String>,
        /// Tool calls the agent got an answer to whose `tool_call` frames were not acked yet: a
        /// server that receives them again (another replica, after the one that answered
        /// stopped) records them without executing them a second time.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        answered_calls: Vec<AnsweredCall>,
    },
    AgentEvent {
        seq: u64,
        payload: AgentEventPayload,
    },
    ToolCall {
        seq: u64,
        call_id: String,
        tool: String,
        #[serde(default)]
        args: Value,
    },
    Log {
        seq: u64,
        stream: LogStream,
        line: String,
    },
    Usage {
        seq: u64,
        #[serde(flatten)]
        usage: UsageReport,
    },
    /// The agent process ended. The shim waits for this message's ack before it exits.
    Exited {
        seq: u64,
        code: Option<i32>,
        signal: Option<i32>,
    },
    Heartbeat {
        /// Milliseconds since the Unix epoch on the shim's clock.
        at_ms: u64,
    },
    /// The shim's own trace spans (bundle fetch, agent start, each relayed tool call), finished
    /// and batched. Not sequenced: telemetry, best effort. The control plane exports them as
    /// children of the `TRACEPARENT` it gave the sandbox, so they join the run's trace.
    Spans { spans: Vec<ShimSpan> },
}

/// A tool call the shim has the answer to, as `hello` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnsweredCall {
    pub call_id: String,
    pub tool: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
}

/// One finished span of the shim. Times are nanoseconds since the Unix epoch on the shim's clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShimSpan {
    pub name: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Set when the operation failed: what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A `tool_call` frame's fields, read without the buffering an internally tagged enum needs.
#[derive(Deserialize)]
struct ToolCallFields {
    seq: u64,
    call_id: String,
    tool: String,
    #[serde(default)]
    args: Value,
}

impl ShimMessage {
    /// Reads a frame. A `tool_call` that starts with its tag, as the shim writes it, is read
    /// field by field into its variant; everything else goes through the derived reading (which
    /// first buffers the whole frame to find its tag). Both give the same message.
    pub fn from_frame(text: &str) -> serde_json::Result<ShimMessage> {
        if text.starts_with(r#"{"type":"tool_call","#) {
            let ToolCallFields {
                seq,
                call_id,
                tool,
                args,
            } = serde_json::from_str(text)?;
            return Ok(ShimMessage::ToolCall {
                seq,
                call_id,
                tool,
                args,
            });
        }
        serde_json::from_str(text)
    }

    /// Sequence number of a message that needs an ack; `None` for hello and heartbeats.
    pub fn seq(&self) -> Option<u64> {
        match self {
            ShimMessage::AgentEvent { seq, .. }
            | ShimMessage::ToolCall { seq, .. }
            | ShimMessage::Log { seq, .. }
            | ShimMessage::Usage { seq, .. }
            | ShimMessage::Exited { seq, .. } => Some(*seq),
            ShimMessage::Hello { .. }
            | ShimMessage::Heartbeat { .. }
            | ShimMessage::Spans { .. } => None,
        }
    }
}

/// Which output of the agent a log line came from; `shim` is the shim's own diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
    Shim,
}

/// What happened in the agent, as recorded in the run's event history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentEventPayload {
    /// The bundle is unpacked and the agent process started.
    AgentStarted { pid: u32 },
    /// `{"type":"message","text":…}` from the agent.
    Message { text: String },
    /// `{"type":"done","result":…}` from the agent.
    Done { result: Value },
    /// The agent received SIGTERM after a `stop`.
    StopForwarded { grace_s: u64 },
}

/// Resource usage read inside the sandbox (cgroup or /proc).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pct: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

/// Messages the server sends to the shim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        run_id: String,
        task: String,
        bundle: BundleInfo,
        /// Highest seq the server has persisted; the shim resends everything above it.
        last_acked: u64,
        /// How often the shim sends heartbeats.
        heartbeat_interval_ms: u64,
        /// How long the shim may stay disconnected before it stops the agent and exits.
        lost_after_ms: u64,
        /// False when the shim reconnects to a run whose agent it already started.
        start_agent: bool,
        /// Whether the control plane exports the shim's spans into the run's trace; when false
        /// the shim records none (absent: true, as before this field existed).
        #[serde(default = "yes")]
        trace_spans: bool,
    },
    ToolResult {
        call_id: String,
        ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<ToolError>,
    },
    Stop {
        grace_s: u64,
    },
    Ack {
        seq: u64,
    },
    /// A frame the server could not accept; the connection stays open unless `fatal`.
    Error {
        code: String,
        message: String,
        fatal: bool,
    },
}

fn yes() -> bool {
    true
}

/// Where and how to fetch the agent bundle (a gzip-compressed tar of the agent directory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleInfo {
    /// Absolute URL, or an absolute path resolved against the origin of the sandbox's callback
    /// URL (the address that reaches the control plane from inside the sandbox); fetched with
    /// the run token as bearer.
    pub url: String,
    /// Hex SHA-256 of the archive bytes.
    pub sha256: String,
    pub size: u64,
    /// The agent's command, run with `sh -c` in the unpacked bundle directory.
    pub command: String,
}

/// Error of a tool call, as seen by the agent (SPEC §7a).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolError {
    pub code: String,
    pub message: String,
}

/// Lines between the shim and the agent process (SPEC §7a), newline-delimited JSON.
pub mod agent {
    use serde::{Deserialize, Serialize};
    use serde_json::Value;

    use super::ToolError;

    /// shim → agent.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum ToAgent {
        Task {
            run_id: String,
            task: String,
        },
        ToolResult {
            id: String,
            ok: bool,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            result: Option<Value>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            error: Option<ToolError>,
        },
    }

    /// agent → shim.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum FromAgent {
        ToolCall {
            id: String,
            tool: String,
            #[serde(default)]
            args: Value,
        },
        Message {
            text: String,
        },
        Done {
            #[serde(default)]
            result: Value,
        },
    }

    /// A `tool_call` line's fields, read without the buffering an internally tagged enum needs.
    #[derive(Deserialize)]
    struct ToolCallFields {
        id: String,
        tool: String,
        #[serde(default)]
        args: Value,
    }

    impl FromAgent {
        /// Reads an agent's line. A `tool_call` that starts with its tag (as agents usually
        /// write it) is read field by field into its variant; everything else goes through the
        /// derived reading (which first buffers the whole line to find its tag). Both give the
        /// same message.
        pub fn from_line(line: &str) -> serde_json::Result<FromAgent> {
            if line.starts_with(r#"{"type":"tool_call","#) {
                let ToolCallFields { id, tool, args } = serde_json::from_str(line)?;
                return Ok(FromAgent::ToolCall { id, tool, args });
            }
            serde_json::from_str(line)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shim_messages_use_snake_case_type_tags() {
        let msg = ShimMessage::ToolCall {
            seq: 3,
            call_id: "c1".into(),
            tool: "fs.read_file".into(),
            args: json!({"path": "README.md"}),
        };
        let v = serde_json::to_value(&msg).unwrap();
        assert_eq!(v["type"], "tool_call");
        assert_eq!(v["seq"], 3);
        let back: ShimMessage = serde_json::from_value(v).unwrap();
        assert_eq!(back, msg);
        assert_eq!(back.seq(), Some(3));
    }

    #[test]
    fn usage_fields_are_flattened() {
        let msg = ShimMessage::Usage {
            seq: 9,
            usage: UsageReport {
                cpu_pct: Some(12.5),
                memory_bytes: Some(1024),
            },
        };
        let v = serde_json::to_value(&msg).unwrap();
        assert_eq!(
            v,
            json!({"type": "usage", "seq": 9, "cpu_pct": 12.5, "memory_bytes": 1024})
        );
    }

    #[test]
    fn agent_lines_match_the_documented_shapes() {
        let call: agent::FromAgent = serde_json::from_str(
            r#"{"type":"tool_call","id":"c1","tool":"fs.read_file","args":{"path":"README.md"}}"#,
        )
        .unwrap();
        assert!(matches!(call, agent::FromAgent::ToolCall { ref id, .. } if id == "c1"));
        let err = agent::ToAgent::ToolResult {
            id: "c1".into(),
            ok: false,
            result: None,
            error: Some(ToolError {
                code: "not_found".into(),
                message: "no such file".into(),
            }),
        };
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"type":"tool_result","id":"c1","ok":false,"error":{"code":"not_found","message":"no such file"}}"#
        );
    }

    #[test]
    fn unknown_type_is_rejected() {
        let err = serde_json::from_str::<ShimMessage>(r#"{"type":"bogus"}"#).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn frames_read_the_same_by_from_frame_as_by_the_derived_reading() {
        let frames = [
            r#"{"type":"tool_call","seq":4,"call_id":"c\"1","tool":"fs.read_file","args":{"path":"a b\n","n":[1,2.5,null]}}"#,
            r#"{"type":"tool_call","seq":5,"call_id":"c2","tool":"fs.list_dir"}"#,
            r#"{"type":"tool_call","seq":6,"call_id":"c3","tool":"x","args":null,"extra":true}"#,
            r#"{"type":"tool_call","call_id":"c4","seq":7,"args":"s","tool":"t"}"#,
            r#"{"seq":8,"type":"tool_call","call_id":"c5","tool":"t"}"#,
            r#"{"type":"log","seq":9,"stream":"stdout","line":"hi"}"#,
            r#"{"type":"heartbeat","at_ms":1}"#,
        ];
        for frame in frames {
            let derived: ShimMessage = serde_json::from_str(frame).unwrap();
            assert_eq!(ShimMessage::from_frame(frame).unwrap(), derived, "{frame}");
        }
        // What the derived reading refuses, so does from_frame.
        for frame in [
            r#"{"type":"tool_call","seq":1,"tool":"t"}"#,
            r#"{"type":"tool_call","seq":"one","call_id":"c","tool":"t"}"#,
            r#"{"type":"tool_call","seq":1,"call_id":"c","tool":"t""#,
            r#"{"type":"tool_calls","seq":1,"call_id":"c","tool":"t"}"#,
        ] {
            assert!(
                serde_json::from_str::<ShimMessage>(frame).is_err(),
                "{frame}"
            );
            assert!(ShimMessage::from_frame(frame).is_err(), "{frame}");
        }
    }

    #[test]
    fn agent_lines_read_the_same_by_from_line_as_by_the_derived_reading() {
        use agent::FromAgent;
        let lines = [
            r#"{"type":"tool_call","id":"c\"1","tool":"fs.read_file","args":{"path":"a b\n","n":[1,2.5,null]}}"#,
            r#"{"type":"tool_call","id":"c2","tool":"fs.list_dir"}"#,
            r#"{"type":"tool_call","id":"c3","tool":"x","args":null,"extra":true}"#,
            r#"{"type":"tool_call","tool":"t","args":"s","id":"c4"}"#,
            r#"{"id":"c5","type":"tool_call","tool":"t"}"#,
            r#"{"type":"message","text":"hi"}"#,
            r#"{"type":"done","result":{"ok":1}}"#,
        ];
        for line in lines {
            let derived: FromAgent = serde_json::from_str(line).unwrap();
            assert_eq!(FromAgent::from_line(line).unwrap(), derived, "{line}");
        }
        // What the derived reading refuses, so does from_line.
        for line in [
            r#"{"type":"tool_call","tool":"t"}"#,
            r#"{"type":"tool_call","id":7,"tool":"t"}"#,
            r#"{"type":"tool_call","id":"c","tool":"t""#,
            r#"{"type":"tool_calls","id":"c","tool":"t"}"#,
            r#"{"type":"tool_call","id":"c","tool":"t"} trailing"#,
        ] {
            assert!(serde_json::from_str::<FromAgent>(line).is_err(), "{line}");
            assert!(FromAgent::from_line(line).is_err(), "{line}");
        }
    }
}
