//! The server's share of a tool call: a WebSocket client that speaks the shim protocol itself.
//!
//! The run goes to a second `local`-kind provider whose "shim" is a script that only sleeps, so
//! nothing else connects for the run. Its run token is read from the sleeping process's
//! environment (`/proc/<pid>/environ`), as the control plane's own integration tests do; then
//! this client says hello, makes the tool calls one after the other, and kills the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actors::model::RunState;
use agent_shim::protocol::{self, ServerMessage, ShimMessage, PROTOCOL_VERSION};
use anyhow::{bail, ensure, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::fixture::Api;
use crate::stats::{Budget, Latencies, Summary};

/// Name of the provider whose sandboxes only sleep.
pub const PROVIDER: &str = "sleeper";

/// Writes the sleeping stand-in for the shim into `dir`.
pub fn write_sleeper(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("sleeping-shim.sh");
    std::fs::write(&path, "#!/bin/sh\nexec sleep 3600\n")?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

pub struct SimFigures {
    pub latency: Summary,
    pub per_s: f64,
    pub call_frame_bytes: usize,
    pub result_frame_bytes: usize,
}

/// Environment of a sandbox process once it holds the run token. Read from `/proc`, which shows
/// an empty environment while the process is between two programs (the sleeping shim is a script
/// that `exec`s `sleep`), so an environment without the token is read again until `deadline`.
pub(crate) async fn sandbox_environ(
    pid: &str,
    deadline: Instant,
) -> anyhow::Result<BTreeMap<String, String>> {
    loop {
        let env = environ(pid)?;
        if env.contains_key(protocol::env::RUN_TOKEN) || Instant::now() >= deadline {
            return Ok(env);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Environment of a process, read from `/proc`.
fn environ(pid: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))
        .with_context(|| format!("environment of sandbox process {pid}"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect())
}

pub async fn measure(
    api: &Api,
    agent: &str,
    tool: &str,
    path: &str,
    budget: Budget,
    quickack: bool,
) -> anyhow::Result<SimFigures> {
    let created = api
        .create(crate::fixture::run_request(agent, Some(PROVIDER)))
        .await?;
    let id = created.id.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let record = loop {
        let record = api.get(&id).await?;
        if record.state == RunState::Starting && record.sandbox_id.is_some() {
            break record;
        }
        ensure!(
            record.state < RunState::Starting,
            "run {id} is {} before the simulated shim connected",
            record.state
        );
        ensure!(Instant::now() < deadline, "run {id} never reached starting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let pid = record.sandbox_id.clone().context("sandbox id")?;
    let env = sandbox_environ(&pid, deadline).await?;
    let token = env
        .get(protocol::env::RUN_TOKEN)
        .context("no run token in the sandbox environment")?;
    let callback = env
        .get(protocol::env::CALLBACK_URL)
        .context("no callback URL in the sandbox environment")?;
    let ws_url = format!(
        "{}{}",
        callback
            .replacen("http://", "ws://", 1)
            .trim_end_matches('/'),
        protocol::CONNECT_PATH
    );

    let res = drive(&ws_url, token, &id, tool, path, budget, quickack).await;
    api.kill(&id).await?;
    api.wait_end(&id).await?;
    res
}

async fn drive(
    ws_url: &str,
    token: &str,
    run_id: &str,
    tool: &str,
    path: &str,
    budget: Budget,
    quickack: bool,
) -> anyhow::Result<SimFigures> {
    let mut request = ws_url.into_client_request()?;
    request.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    // As the shim does: Nagle off.
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
        .await
        .context("connect as the shim")?;
    let hello = ShimMessage::Hello {
        run_id: run_id.to_string(),
        protocol_version: PROTOCOL_VERSION,
        host: "load-tests".into(),
        resume_from: None,
        pending_calls: Vec::new(),
        answered_calls: Vec::new(),
    };
    ws.send(Message::Text(serde_json::to_string(&hello)?))
        .await?;
    match next_message(&mut ws).await?.0 {
        ServerMessage::Welcome { .. } => {}
        other => bail!("expected welcome, got {other:?}"),
    }

    let mut latencies = Latencies::default();
    let (mut call_frame_bytes, mut result_frame_bytes) = (0, 0);
    let mut measured_from = Instant::now();
    let mut measured = 0;
    for i in 0.. {
        if i == budget.warmup {
            measured_from = Instant::now();
        }
        if i >= budget.warmup && budget.spent(measured, measured_from) {
            break;
        }
        let call_id = format!("s{i}");
        let frame = serde_json::to_string(&ShimMessage::ToolCall {
            seq: i + 1,
            call_id: call_id.clone(),
            tool: tool.to_string(),
            args: json!({"path": path}),
        })?;
        call_frame_bytes = frame.len();
        let sent = Instant::now();
        ws.send(Message::Text(frame)).await?;
        if quickack {
            // Sending re-enters delayed-ACK (ping-pong) mode; leave it before every wait.
            quick_ack(&ws)?;
        }
        loop {
            match next_message(&mut ws).await? {
                (
                    ServerMessage::ToolResult {
                        call_id: got, ok, ..
                    },
                    bytes,
                ) if got == call_id => {
                    ensure!(ok, "tool call {call_id} failed");
                    result_frame_bytes = bytes;
                    break;
                }
                (ServerMessage::Ack { .. }, _) => {}
                (ServerMessage::Error { code, message, .. }, _) => {
                    bail!("server refused a frame: {code}: {message}")
                }
                (other, _) => bail!("unexpected frame {other:?}"),
            }
        }
        if i >= budget.warmup {
            latencies.record(sent.elapsed());
            measured += 1;
        }
    }
    let elapsed = measured_from.elapsed();
    ws.close(None).await?;
    Ok(SimFigures {
        latency: latencies.summary(),
        per_s: measured as f64 / elapsed.as_secs_f64(),
        call_frame_bytes,
        result_frame_bytes,
    })
}

/// Diagnostic: acknowledge every segment at once instead of delaying the ACK (`TCP_QUICKACK`).
fn quick_ack(ws: &Socket) -> anyhow::Result<()> {
    match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => {
            socket2::SockRef::from(tcp).set_tcp_quickack(true)?;
            Ok(())
        }
        _ => bail!("the simulated shim expects a plain TCP connection"),
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next protocol message and the size of its frame.
async fn next_message(ws: &mut Socket) -> anyhow::Result<(ServerMessage, usize)> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let message = serde_json::from_str(&text)
                    .with_context(|| format!("unreadable frame {text:?}"))?;
                return Ok((message, text.len()));
            }
            Some(Ok(Message::Close(frame))) => bail!("server closed the connection: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(err.into()),
            None => bail!("connection ended"),
        }
    }
}
