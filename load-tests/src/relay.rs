//! The floor of the full path's shape: the same agent process, its lines carried by a relay that
//! only moves bytes (no sequencing, no outbox, no spans) over a WebSocket on loopback to a server
//! that only answers (it reads the call's id and returns a `tool_result` line of the real size).
//! What the full path costs above this is the shim's and the control plane's own work; what this
//! costs above the bare echo is the path's shape: two more processes and two pipes.

use std::path::Path;
use std::process::Stdio;

use agent_shim::protocol::agent::{FromAgent, ToAgent};
use anyhow::{bail, ensure, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

use crate::agent::AgentReport;
use crate::echo;

/// Runs the agent (`exe agent …`) behind the relay; `content` is what each result carries.
pub fn measure(
    exe: &Path,
    tool: &str,
    path: &str,
    content: String,
    warmup: u64,
    calls: u64,
) -> anyhow::Result<AgentReport> {
    let result = Some(serde_json::json!({ "content": content }));
    // Server and relay each on a thread of their own, as the control plane and the shim are
    // processes of their own.
    let (addr, server) = echo::answering_server("relay-server", move |text| {
        let id = match serde_json::from_str::<FromAgent>(text)? {
            FromAgent::ToolCall { id, .. } => id,
            other => bail!("the relay forwarded a line that is not a tool call: {other:?}"),
        };
        Ok(serde_json::to_string(&ToAgent::ToolResult {
            id,
            ok: true,
            result: result.clone(),
            error: None,
        })?)
    })?;
    let args = [
        "agent".to_string(),
        format!("--calls={calls}"),
        format!("--warmup={warmup}"),
        format!("--tool={tool}"),
        format!("--path={path}"),
    ];
    let exe = exe.to_path_buf();
    let relay = std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || crate::runtime()?.block_on(relay(&exe, &args, addr)))?;
    let report = echo::join(relay, "relay")?;
    echo::join(server, "relay's server")?;
    Ok(report)
}

/// Starts the agent, hands it a task, and carries its tool calls to the server and the answers
/// back, byte for byte, until the agent reports.
async fn relay(
    exe: &Path,
    args: &[String],
    addr: std::net::SocketAddr,
) -> anyhow::Result<AgentReport> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/"), None, true)
            .await
            .context("connect to the relay's server")?;
    let mut agent = tokio::process::Command::new(exe)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the agent behind the relay")?;
    let mut stdin = agent.stdin.take().context("the agent's stdin")?;
    let mut lines = BufReader::new(agent.stdout.take().context("the agent's stdout")?).lines();
    let task = serde_json::to_string(&ToAgent::Task {
        run_id: "relay".into(),
        task: "measure".into(),
    })?;
    stdin.write_all(format!("{task}\n").as_bytes()).await?;
    let report = loop {
        let Some(line) = lines.next_line().await? else {
            bail!("the agent ended without a report");
        };
        if line.contains(r#""type":"tool_call""#) {
            ws.send(Message::Text(line)).await?;
            let mut bytes = echo::next_text(&mut ws, "relay's server")
                .await?
                .into_bytes();
            bytes.push(b'\n');
            stdin.write_all(&bytes).await?;
        } else {
            match serde_json::from_str::<FromAgent>(&line)? {
                FromAgent::Done { result } => {
                    break serde_json::from_value::<AgentReport>(result)
                        .context("the agent's report")?
                }
                other => bail!("unexpected line from the agent: {other:?}"),
            }
        }
    };
    ws.close(None).await?;
    while let Some(Ok(_)) = ws.next().await {}
    drop(stdin);
    let status = agent.wait().await?;
    ensure!(status.success(), "the agent behind the relay {status}");
    ensure!(
        report.errors == 0,
        "{} calls failed behind the relay",
        report.errors
    );
    Ok(report)
}
