//! The physical floor of a tool call: a bare WebSocket request/response on loopback.
//! A tokio-tungstenite server on its own thread answers every text frame with a frame of the
//! size of a tool_result; the client sends frames of the size of a tool_call and times each
//! round trip.

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
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let server = std::thread::Builder::new()
        .name("echo-server".into())
        .spawn(move || -> anyhow::Result<()> {
            crate::runtime()?.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let (tcp, _) = listener.accept().await?;
                tcp.set_nodelay(true)?;
                let mut ws = tokio_tungstenite::accept_async(tcp).await?;
                let answer = Message::Text(response);
                while let Some(msg) = ws.next().await {
                    match msg? {
                        Message::Text(_) => ws.send(answer.clone()).await?,
                        Message::Close(_) => break,
                        _ => {}
                    }
                }
                Ok(())
            })
        })?;

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
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(_))) => break,
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Err(err.into()),
                None => bail!("echo server closed the connection"),
            }
        }
        if i >= warmup {
            latencies.record(sent.elapsed());
        }
    }
    let measured = measured_from.elapsed();
    ws.close(None).await?;
    // Drain until the server's close frame, so its thread ends.
    while let Some(Ok(_)) = ws.next().await {}
    match server.join() {
        Ok(res) => res?,
        Err(_) => bail!("echo server thread panicked"),
    }
    Ok(EchoFigures {
        latency: latencies.summary(),
        per_s: rounds as f64 / measured.as_secs_f64(),
    })
}
