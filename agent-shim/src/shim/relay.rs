//! Pure translation between agent lines (SPEC §7a) and protocol messages.

use serde_json::Value;

use crate::protocol::agent::{FromAgent, ToAgent};
use crate::protocol::{AgentEventPayload, LogStream, ServerMessage, ShimMessage, MAX_FRAME_BYTES};

/// What one line of agent output becomes. `seq` is filled in by the outbox.
#[derive(Debug, Clone, PartialEq)]
pub enum Relayed {
    ToolCall {
        call_id: String,
        tool: String,
        args: Value,
    },
    Event(AgentEventPayload),
    Log {
        stream: LogStream,
        line: String,
    },
}

/// Classifies a complete line from the agent's stdout or stderr.
pub fn classify(stream: LogStream, line: String) -> Relayed {
    if stream == LogStream::Stdout {
        if let Ok(msg) = serde_json::from_str::<FromAgent>(&line) {
            return match msg {
                FromAgent::ToolCall { id, tool, args } => Relayed::ToolCall {
                    call_id: id,
                    tool,
                    args,
                },
                FromAgent::Message { text } => Relayed::Event(AgentEventPayload::Message { text }),
                FromAgent::Done { result } => Relayed::Event(AgentEventPayload::Done { result }),
            };
        }
    }
    Relayed::Log { stream, line }
}

impl Relayed {
    pub fn into_message(self, seq: u64) -> ShimMessage {
        match self {
            Relayed::ToolCall {
                call_id,
                tool,
                args,
            } => ShimMessage::ToolCall {
                seq,
                call_id,
                tool,
                args,
            },
            Relayed::Event(payload) => ShimMessage::AgentEvent { seq, payload },
            Relayed::Log { stream, line } => ShimMessage::Log { seq, stream, line },
        }
    }
}

/// A tool result from the server as the agent's stdin line (without the newline).
pub fn tool_result_line(msg: ServerMessage) -> Option<(String, String)> {
    match msg {
        ServerMessage::ToolResult {
            call_id,
            ok,
            result,
            error,
        } => {
            let line = ToAgent::ToolResult {
                id: call_id.clone(),
                ok,
                result,
                error,
            };
            serde_json::to_string(&line).ok().map(|l| (call_id, l))
        }
        _ => None,
    }
}

/// A message that cannot be made to fit in one frame.
#[derive(Debug, thiserror::Error)]
#[error("{what} of {bytes} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit")]
pub struct TooLarge {
    pub what: &'static str,
    pub bytes: usize,
}

/// Encodes a message so it fits in one frame of `limit` bytes: log lines and message texts are
/// truncated, an oversized `done` result is replaced by a note; a tool call cannot be shortened.
pub fn encode_within(msg: ShimMessage, limit: usize) -> Result<String, TooLarge> {
    let mut msg = msg;
    loop {
        let text = serde_json::to_string(&msg).map_err(|_| TooLarge {
            what: "unencodable message",
            bytes: 0,
        })?;
        if text.len() <= limit {
            return Ok(text);
        }
        let excess = text.len() - limit;
        match &mut msg {
            ShimMessage::Log { line: s, .. }
            | ShimMessage::AgentEvent {
                payload: AgentEventPayload::Message { text: s },
                ..
            } => {
                const NOTE: &str = " [truncated]";
                let base = s.strip_suffix(NOTE).unwrap_or(s).len();
                // Escaping can make each byte cost up to six in the frame; always shrink by at least the excess.
                let keep = floor_char_boundary(s, base.saturating_sub(excess + NOTE.len()));
                s.truncate(keep);
                s.push_str(NOTE);
            }
            ShimMessage::AgentEvent {
                payload: AgentEventPayload::Done { result },
                ..
            } => {
                if matches!(&*result, Value::String(s) if s.starts_with(DROPPED)) {
                    return Err(TooLarge {
                        what: "done event",
                        bytes: text.len(),
                    });
                }
                *result = Value::String(format!(
                    "{DROPPED} {} bytes dropped: exceeds the frame limit>",
                    text.len()
                ));
            }
            ShimMessage::ToolCall { .. } => {
                return Err(TooLarge {
                    what: "tool call",
                    bytes: text.len(),
                })
            }
            _ => {
                return Err(TooLarge {
                    what: "message",
                    bytes: text.len(),
                })
            }
        }
    }
}

const DROPPED: &str = "<result of";

fn floor_char_boundary(s: &str, mut index: usize) -> usize {
    if index >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stdout_protocol_lines_are_recognised() {
        let call = classify(
            LogStream::Stdout,
            r#"{"type":"tool_call","id":"c1","tool":"fs.read_file","args":{"path":"a"}}"#.into(),
        );
        assert_eq!(
            call,
            Relayed::ToolCall {
                call_id: "c1".into(),
                tool: "fs.read_file".into(),
                args: json!({"path": "a"})
            }
        );
        let done = classify(LogStream::Stdout, r#"{"type":"done","result":"ok"}"#.into());
        assert_eq!(
            done,
            Relayed::Event(AgentEventPayload::Done {
                result: json!("ok")
            })
        );
    }

    #[test]
    fn anything_else_is_a_log_line() {
        for line in ["not json", r#"{"type":"bogus"}"#, "", "[1,2]"] {
            assert_eq!(
                classify(LogStream::Stdout, line.into()),
                Relayed::Log {
                    stream: LogStream::Stdout,
                    line: line.into()
                }
            );
        }
        // stderr is never interpreted.
        let line = r#"{"type":"message","text":"x"}"#;
        assert_eq!(
            classify(LogStream::Stderr, line.into()),
            Relayed::Log {
                stream: LogStream::Stderr,
                line: line.into()
            }
        );
    }

    #[test]
    fn long_log_lines_are_truncated_to_fit() {
        let line = "\u{1}é".repeat(1000);
        let msg = ShimMessage::Log {
            seq: 1,
            stream: LogStream::Stdout,
            line,
        };
        let text = encode_within(msg, 500).unwrap();
        assert!(text.len() <= 500, "{}", text.len());
        let back: ShimMessage = serde_json::from_str(&text).unwrap();
        assert!(matches!(back, ShimMessage::Log { line, .. } if line.ends_with("[truncated]")));
    }

    #[test]
    fn oversized_tool_calls_are_refused() {
        let msg = ShimMessage::ToolCall {
            seq: 1,
            call_id: "c1".into(),
            tool: "fs.write_file".into(),
            args: json!({"content": "x".repeat(1000)}),
        };
        assert!(encode_within(msg, 500).is_err());
    }

    #[test]
    fn oversized_done_result_is_replaced() {
        let msg = ShimMessage::AgentEvent {
            seq: 1,
            payload: AgentEventPayload::Done {
                result: json!("x".repeat(1000)),
            },
        };
        let text = encode_within(msg, 500).unwrap();
        assert!(text.contains("dropped"), "{text}");
    }

    #[test]
    fn tool_results_become_agent_lines() {
        let (id, line) = tool_result_line(ServerMessage::ToolResult {
            call_id: "c1".into(),
            ok: true,
            result: Some(json!({"content": "hi"})),
            error: None,
        })
        .unwrap();
        assert_eq!(id, "c1");
        assert_eq!(
            line,
            r#"{"type":"tool_result","id":"c1","ok":true,"result":{"content":"hi"}}"#
        );
    }
}
