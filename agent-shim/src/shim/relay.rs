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
        if let Ok(msg) = FromAgent::from_line(&line) {
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

/// A `tool_result` frame, its result left as the server's text.
#[derive(serde::Deserialize)]
struct ResultFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    call_id: String,
    ok: bool,
    #[serde(default, borrow)]
    result: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    error: Option<crate::protocol::ToolError>,
}

/// A server frame that is a `tool_result`, turned into the agent's line (without the newline)
/// with the result's JSON text carried over as it is instead of parsed and encoded again:
/// `(call_id, ok, error, line)`. `None` for any other frame, and for a result whose text spans
/// lines; those go the way of every frame ([`tool_result_line`]). Only a frame that starts with
/// its tag, as the control plane writes it, is tried: any other (an `ack` riding along with
/// every result) is left at once instead of failing a parse that words an error.
pub fn tool_result_passthrough(
    frame: &str,
) -> Option<(String, bool, Option<crate::protocol::ToolError>, String)> {
    if !frame.starts_with(r#"{"type":"tool_result","#) {
        return None;
    }
    let parsed: ResultFrame<'_> = serde_json::from_str(frame).ok()?;
    if parsed.kind != "tool_result" {
        return None;
    }
    let result = parsed.result.map(|raw| raw.get());
    // JSON text has line breaks only between tokens (inside strings they are escaped).
    if result.is_some_and(|raw| memchr::memchr2(b'\n', b'\r', raw.as_bytes()).is_some()) {
        return None;
    }
    let id = serde_json::to_string(&parsed.call_id).ok()?;
    let error = match &parsed.error {
        Some(error) => Some(serde_json::to_string(error).ok()?),
        None => None,
    };
    let mut line = String::with_capacity(
        48 + id.len() + result.map_or(0, str::len) + error.as_ref().map_or(0, String::len),
    );
    line.push_str(r#"{"type":"tool_result","id":"#);
    line.push_str(&id);
    line.push_str(if parsed.ok {
        r#","ok":true"#
    } else {
        r#","ok":false"#
    });
    if let Some(result) = result {
        line.push_str(r#","result":"#);
        line.push_str(result);
    }
    if let Some(error) = &error {
        line.push_str(r#","error":"#);
        line.push_str(error);
    }
    line.push('}');
    Some((parsed.call_id, parsed.ok, parsed.error, line))
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
    use crate::protocol::ToolError;
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
    fn tool_results_pass_through_as_the_lines_parsing_would_give() {
        let results = [
            ServerMessage::ToolResult {
                call_id: "c1".into(),
                ok: true,
                result: Some(
                    json!({"content": "line \"one\"\n\ttwo é \u{2028} \u{1}", "n": [1, 2.5, -3e-7, null, true], "z": {}}),
                ),
                error: None,
            },
            ServerMessage::ToolResult {
                call_id: "c\"2\u{0}".into(),
                ok: false,
                result: None,
                error: Some(ToolError {
                    code: "not_found".into(),
                    message: "`a\nb` does not exist".into(),
                }),
            },
            ServerMessage::ToolResult {
                call_id: "c3".into(),
                ok: true,
                result: Some(json!("just a string")),
                error: None,
            },
        ];
        for message in results {
            let frame = serde_json::to_string(&message).unwrap();
            let (id, parsed_line) = tool_result_line(message.clone()).unwrap();
            let (call_id, ok, error, line) = tool_result_passthrough(&frame).unwrap();
            assert_eq!(line, parsed_line, "{frame}");
            assert_eq!(call_id, id);
            let ServerMessage::ToolResult {
                ok: want_ok,
                error: want_error,
                ..
            } = message
            else {
                unreachable!()
            };
            assert_eq!((ok, error), (want_ok, want_error));
        }
        // A result of null is no result, as when parsed.
        let (_, _, _, line) = tool_result_passthrough(
            r#"{"type":"tool_result","call_id":"c","ok":true,"result":null}"#,
        )
        .unwrap();
        assert_eq!(line, r#"{"type":"tool_result","id":"c","ok":true}"#);
    }

    #[test]
    fn other_frames_and_results_spanning_lines_are_not_passed_through() {
        for frame in [
            r#"{"type":"ack","seq":3}"#,
            r#"{"type":"stop","grace_s":3}"#,
            r#"{"type":"tool_results","call_id":"c","ok":true}"#,
            // The tag not first: left to the parse of every frame.
            r#"{"call_id":"c","type":"tool_result","ok":true}"#,
            r#"{"type":"tool_result","ok":true}"#,
            "{\"type\":\"tool_result\",\"call_id\":\"c\",\"ok\":true,\"result\":{\n\"a\": 1}}",
            "{\"type\":\"tool_result\",\"call_id\":\"c\",\"ok\":true,\"result\":[1,\r2]}",
            "not json",
        ] {
            assert!(tool_result_passthrough(frame).is_none(), "{frame}");
        }
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
