//! The physical floor of a tool call: a bare WebSocket request/response on loopback.
//! A tokio-tungstenite server on its own thread answers every text frame with a frame of the
//! size of a tool_result; the client sends frames of the size of a tool_call and times each
//! round trip.

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::stats::{Latencies, Summary};

pub struct EchoFigures {
    pub latency: Summary,
    pub per_s: f64,
}

/// Runs `warmup + rounds` round trips of `request` answered by `response`.
pub async fn measure(
    request: String,
    response: String,
    warmup: u64,
    rounds: u64,
) -> anyhow::Result<EchoFigures> {
    let (addr, server) = answering_server("echo-server", move |_| Ok(response.clone()))?;
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/"), None, true)
            .await
            .context("connect to the echo server")?;
    let mut latencies = Latencies::default();
    let mut measured_from = Instant::now();
    for i in 0..warmup + rounds {
        if i == warmup {
            measured_from = Instant::now();
        }
        let sent = Instant::now();
        ws.send(Message::Text(request.clone())).await?;
        next_text(&mut ws, "echo server").await?;
        if i >= warmup {
            latencies.record(sent.elapsed());
        }
    }
    let measured = measured_from.elapsed();
    ws.close(None).await?;
    // Drain until the server's close frame, so its thread ends.
    while let Some(Ok(_)) = ws.next().await {}
    join(server, "echo server")?;
    Ok(EchoFigures {
        latency: latencies.summary(),
        per_s: rounds as f64 / measured.as_secs_f64(),
    })
}

/// A WebSocket server for one connection on a loopback port, on a thread of its own (a one-thread
/// runtime, as a peer process would have): every text frame is answered with `answer(frame)`
/// until the peer closes. Returns the address and the thread, whose result is the server's.
pub fn answering_server(
    name: &str,
    mut answer: impl FnMut(&str) -> anyhow::Result<String> + Send + 'static,
) -> anyhow::Result<(SocketAddr, JoinHandle<anyhow::Result<()>>)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let thread =
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || -> anyhow::Result<()> {
                crate::runtime()?.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let (tcp, _) = listener.accept().await?;
                    tcp.set_nodelay(true)?;
                    let mut ws = tokio_tungstenite::accept_async(tcp).await?;
                    while let Some(msg) = ws.next().await {
                        match msg? {
                            Message::Text(text) => ws.send(Message::Text(answer(&text)?)).await?,
                            Message::Close(_) => break,
                            _ => {}
                        }
                    }
                    Ok(())
                })
            })?;
    Ok((addr, thread))
}

/// The next text frame from `peer`, skipping other frames.
pub async fn next_text<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    peer: &str,
) -> anyhow::Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(err.into()),
            None => bail!("the {peer} closed the connection"),
        }
    }
}

/// The result of a harness thread; its panic as an error naming it.
pub fn join<T>(thread: JoinHandle<anyhow::Result<T>>, what: &str) -> anyhow::Result<T> {
    match thread.join() {
        Ok(res) => res,
        Err(_) => bail!("the {what} thread panicked"),
    }
}
