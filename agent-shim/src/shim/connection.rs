//! Opening a WebSocket to the control plane and the `hello` / `welcome` handshake.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::Url;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::config::RunToken;
use crate::protocol::{
    BundleInfo, ServerMessage, ShimMessage, CLOSE_POLICY_VIOLATION, MAX_FRAME_BYTES,
};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The server's `welcome`, unpacked.
#[derive(Debug, Clone, PartialEq)]
pub struct Welcome {
    pub run_id: String,
    pub task: String,
    pub bundle: BundleInfo,
    pub last_acked: u64,
    pub heartbeat_interval: Duration,
    pub lost_after: Duration,
    pub start_agent: bool,
    /// Whether the shim's spans are wanted.
    pub trace_spans: bool,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The server refused the run token (HTTP 401/403 or close code 1008). Never retried.
    #[error("the control plane refused the run token: {reason}")]
    Refused { reason: String },
    #[error("cannot connect to the control plane: {source}")]
    Transport {
        #[source]
        source: tungstenite::Error,
    },
    #[error("handshake with the control plane failed: {reason}")]
    Handshake { reason: String },
    #[error("no welcome from the control plane within {0:?}")]
    Timeout(Duration),
}

pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: Some(MAX_FRAME_BYTES),
        max_frame_size: Some(MAX_FRAME_BYTES),
        ..WebSocketConfig::default()
    }
}

/// The reason of a close frame if it says the token was refused.
pub fn refusal(frame: Option<&CloseFrame<'_>>) -> Option<String> {
    let frame = frame?;
    (u16::from(frame.code) == CLOSE_POLICY_VIOLATION).then(|| {
        if frame.reason.is_empty() {
            "policy violation".to_owned()
        } else {
            frame.reason.to_string()
        }
    })
}

/// Connects, sends `hello` and waits for `welcome`, all within `timeout`.
pub async fn open(
    url: &Url,
    token: &RunToken,
    hello: &ShimMessage,
    timeout: Duration,
) -> Result<(Ws, Welcome), ConnectError> {
    match tokio::time::timeout(timeout, handshake(url, token, hello)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}

async fn handshake(
    url: &Url,
    token: &RunToken,
    hello: &ShimMessage,
) -> Result<(Ws, Welcome), ConnectError> {
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|source| ConnectError::Transport { source })?;
    let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
        ConnectError::Handshake {
            reason: "run token is not a valid header value".into(),
        }
    })?;
    auth.set_sensitive(true);
    request.headers_mut().insert(header::AUTHORIZATION, auth);

    let (mut ws, _response) = match tokio_tungstenite::connect_async_with_config(
        request,
        Some(ws_config()),
        true,
    )
    .await
    {
        Ok(ok) => ok,
        Err(tungstenite::Error::Http(response))
            if matches!(
                response.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ) =>
        {
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            return Err(ConnectError::Refused {
                reason: format!("http {} on upgrade {}", response.status(), body.trim()),
            });
        }
        Err(source) => return Err(ConnectError::Transport { source }),
    };

    let hello = serde_json::to_string(hello).map_err(|e| ConnectError::Handshake {
        reason: e.to_string(),
    })?;
    ws.send(Message::text(hello))
        .await
        .map_err(|source| ConnectError::Transport { source })?;

    loop {
        let frame = match ws.next().await {
            None => {
                return Err(ConnectError::Handshake {
                    reason: "connection closed before welcome".into(),
                })
            }
            Some(Err(source)) => return Err(ConnectError::Transport { source }),
            Some(Ok(frame)) => frame,
        };
        match frame {
            Message::Text(text) => match serde_json::from_str::<ServerMessage>(&text) {
                Ok(ServerMessage::Welcome {
                    run_id,
                    task,
                    bundle,
                    last_acked,
                    heartbeat_interval_ms,
                    lost_after_ms,
                    start_agent,
                    trace_spans,
                }) => {
                    return Ok((
                        ws,
                        Welcome {
                            run_id,
                            task,
                            bundle,
                            last_acked,
                            heartbeat_interval: Duration::from_millis(heartbeat_interval_ms),
                            lost_after: Duration::from_millis(lost_after_ms),
                            start_agent,
                            trace_spans,
                        },
                    ))
                }
                Ok(ServerMessage::Error {
                    code,
                    message,
                    fatal,
                }) => {
                    tracing::error!(%code, %message, fatal, "control plane rejected hello");
                }
                Ok(other) => {
                    tracing::warn!(message = ?other, "unexpected frame before welcome; ignored");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unparseable frame before welcome; ignored");
                }
            },
            Message::Close(frame) => {
                if let Some(reason) = refusal(frame.as_ref()) {
                    return Err(ConnectError::Refused { reason });
                }
                return Err(ConnectError::Handshake {
                    reason: format!("closed before welcome: {frame:?}"),
                });
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            Message::Binary(_) => tracing::warn!("binary frame before welcome; ignored"),
        }
    }
}
