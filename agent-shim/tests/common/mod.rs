//! A scripted fake control plane speaking the real wire protocol, and helpers to run the real
//! `agent-shim` binary against it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_shim::protocol::{
    env, AgentEventPayload, BundleInfo, ServerMessage, ShimMessage, CONNECT_PATH,
};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub const RUN_ID: &str = "run-test";
pub const TOKEN: &str = "test-token-abcdefghijklmnopqrstuvwxyz";
pub const TASK: &str = "do the thing";
/// Upper bound for any single wait in a test.
pub const STEP: Duration = Duration::from_secs(15);

/// A gzip-compressed tar holding `agent.sh` with the given script.
pub fn bundle_with_script(script: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut header = tar::Header::new_gnu();
    header.set_size(script.len() as u64);
    header.set_mode(0o755);
    builder
        .append_data(&mut header, "agent.sh", script.as_bytes())
        .unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

/// The fake control plane: a WebSocket endpoint and a bundle download endpoint.
pub struct FakeControlPlane {
    pub ws_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub bundle: Vec<u8>,
    /// `Authorization` headers of bundle requests.
    pub bundle_auth: Arc<Mutex<Vec<String>>>,
    conns: mpsc::UnboundedReceiver<ServerConn>,
    ws_task: JoinHandle<()>,
    http_task: JoinHandle<()>,
}

impl FakeControlPlane {
    pub async fn start(bundle: Vec<u8>) -> Self {
        Self::start_with_bundle_token(bundle, TOKEN).await
    }

    /// `bundle_token` is what the bundle endpoint accepts (to provoke a 401).
    pub async fn start_with_bundle_token(bundle: Vec<u8>, bundle_token: &str) -> Self {
        let ws_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws_addr = ws_listener.local_addr().unwrap();
        let http_addr = http_listener.local_addr().unwrap();
        let (tx, conns) = mpsc::unbounded_channel();
        let ws_task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = ws_listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Some(conn) = ServerConn::accept(stream).await {
                        let _ = tx.send(conn);
                    }
                });
            }
        });
        let bundle_auth = Arc::new(Mutex::new(Vec::new()));
        let http_task = tokio::spawn(serve_bundle(
            http_listener,
            bundle.clone(),
            format!("Bearer {bundle_token}"),
            bundle_auth.clone(),
        ));
        FakeControlPlane {
            ws_addr,
            http_addr,
            bundle,
            bundle_auth,
            conns,
            ws_task,
            http_task,
        }
    }

    pub fn callback_url(&self) -> String {
        format!("http://{}", self.ws_addr)
    }

    pub fn bundle_info(&self) -> BundleInfo {
        BundleInfo {
            url: format!("http://{}/bundle.tar.gz", self.http_addr),
            sha256: hex::encode(Sha256::digest(&self.bundle)),
            size: self.bundle.len() as u64,
            command: "sh ./agent.sh".into(),
        }
    }

    /// The next accepted (and authorised) shim connection.
    pub async fn accept(&mut self) -> ServerConn {
        timeout(STEP, self.conns.recv())
            .await
            .expect("no shim connection within the step timeout")
            .expect("listener stopped")
    }

    /// Stops listening: new connections are refused.
    pub fn go_away(&self) {
        self.ws_task.abort();
        self.http_task.abort();
    }
}

impl Drop for FakeControlPlane {
    fn drop(&mut self) {
        self.go_away();
    }
}

async fn serve_bundle(
    listener: TcpListener,
    bundle: Vec<u8>,
    expected_auth: String,
    seen: Arc<Mutex<Vec<String>>>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let auth = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("authorization")
                    .then(|| value.trim().to_owned())
            })
            .unwrap_or_default();
        seen.lock().unwrap().push(auth.clone());
        let response = if auth == expected_auth && head.starts_with("GET /bundle.tar.gz ") {
            let mut r = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bundle.len()
            )
            .into_bytes();
            r.extend_from_slice(&bundle);
            r
        } else {
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
        };
        let _ = stream.write_all(&response).await;
        let _ = stream.shutdown().await;
    }
}

/// One shim connection, read continuously in the background (so pings are answered).
pub struct ServerConn {
    sink: SplitSink<WebSocketStream<TcpStream>, Message>,
    frames: mpsc::UnboundedReceiver<Message>,
    reader: JoinHandle<()>,
    /// The shim's spans received so far (`spans` frames are kept here, not returned by `recv`).
    pub spans: Vec<agent_shim::protocol::ShimSpan>,
}

impl ServerConn {
    async fn accept(stream: TcpStream) -> Option<ServerConn> {
        // The callback's signature is tungstenite's.
        #[allow(clippy::result_large_err)]
        let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if req.uri().path() != CONNECT_PATH || auth != Some(&format!("Bearer {TOKEN}")) {
                let mut refused = ErrorResponse::new(Some("run token refused".into()));
                *refused.status_mut() = StatusCode::UNAUTHORIZED;
                return Err(refused);
            }
            Ok(resp)
        };
        let ws = tokio_tungstenite::accept_hdr_async(stream, check)
            .await
            .ok()?;
        let (sink, mut stream) = ws.split();
        let (tx, frames) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                if matches!(frame, Message::Ping(_) | Message::Pong(_)) {
                    continue;
                }
                if tx.send(frame).is_err() {
                    return;
                }
            }
        });
        Some(ServerConn {
            sink,
            frames,
            reader,
            spans: Vec::new(),
        })
    }

    /// The next frame (text or close), or `None` once the connection ended.
    pub async fn next_frame(&mut self) -> Option<Message> {
        timeout(STEP, self.frames.recv())
            .await
            .expect("no frame from the shim within the step timeout")
    }

    /// The next protocol message other than a heartbeat.
    pub async fn recv(&mut self) -> ShimMessage {
        loop {
            match self.next_frame().await {
                Some(Message::Text(text)) => {
                    let msg: ShimMessage = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("shim sent an unparseable frame {text}: {e}"));
                    match msg {
                        ShimMessage::Heartbeat { .. } => {}
                        ShimMessage::Spans { spans } => self.spans.extend(spans),
                        msg => return msg,
                    }
                }
                other => panic!("expected a message from the shim, got {other:?}"),
            }
        }
    }

    /// Expects `hello`; returns `(resume_from, pending_calls)`.
    pub async fn recv_hello(&mut self) -> (Option<u64>, Vec<String>) {
        match self.recv().await {
            ShimMessage::Hello {
                run_id,
                protocol_version,
                host,
                resume_from,
                pending_calls,
                ..
            } => {
                assert_eq!(run_id, RUN_ID);
                assert_eq!(protocol_version, agent_shim::protocol::PROTOCOL_VERSION);
                assert!(!host.is_empty());
                (resume_from, pending_calls)
            }
            other => panic!("expected hello, got {other:?}"),
        }
    }

    pub async fn send(&mut self, msg: &ServerMessage) {
        self.send_raw(&serde_json::to_string(msg).unwrap()).await;
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.sink.send(Message::text(text)).await.unwrap();
    }

    pub async fn ack(&mut self, seq: u64) {
        self.send(&ServerMessage::Ack { seq }).await;
    }

    pub async fn close_with(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_owned().into(),
        };
        let _ = self.sink.send(Message::Close(Some(frame))).await;
    }

    /// Waits for the shim's close frame; returns its code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.next_frame().await {
                Some(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Some(Message::Text(text)) => {
                    let msg: ShimMessage = serde_json::from_str(&text).unwrap();
                    assert!(
                        matches!(msg, ShimMessage::Heartbeat { .. }),
                        "expected close, got {msg:?}"
                    );
                }
                Some(other) => panic!("expected close, got {other:?}"),
                None => return None,
            }
        }
    }
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Builds the server's `welcome`.
pub struct WelcomeBuilder {
    pub bundle: BundleInfo,
    pub last_acked: u64,
    pub start_agent: bool,
    pub heartbeat_interval_ms: u64,
    pub lost_after_ms: u64,
    pub trace_spans: bool,
}

impl WelcomeBuilder {
    pub fn new(bundle: BundleInfo) -> Self {
        WelcomeBuilder {
            bundle,
            last_acked: 0,
            start_agent: true,
            heartbeat_interval_ms: 100,
            lost_after_ms: 10_000,
            trace_spans: true,
        }
    }

    pub fn resumed(mut self, last_acked: u64) -> Self {
        self.start_agent = false;
        self.last_acked = last_acked;
        self
    }

    pub fn lost_after_ms(mut self, ms: u64) -> Self {
        self.lost_after_ms = ms;
        self
    }

    /// The control plane exports no spans: the shim should send none.
    pub fn without_spans(mut self) -> Self {
        self.trace_spans = false;
        self
    }

    pub fn build(&self) -> ServerMessage {
        ServerMessage::Welcome {
            run_id: RUN_ID.into(),
            task: TASK.into(),
            bundle: self.bundle.clone(),
            last_acked: self.last_acked,
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            lost_after_ms: self.lost_after_ms,
            start_agent: self.start_agent,
            trace_spans: self.trace_spans,
        }
    }
}

/// The server's view of a run's sequenced messages, with dedup by seq as the real server does.
#[derive(Debug, Default)]
pub struct Ledger {
    pub messages: BTreeMap<u64, ShimMessage>,
    pub duplicates: Vec<u64>,
}

impl Ledger {
    /// Records a sequenced message; false if it is a duplicate. Panics on a gap.
    pub fn record(&mut self, msg: &ShimMessage) -> bool {
        let seq = msg.seq().expect("not a sequenced message");
        let highest = self.highest();
        if seq <= highest {
            assert_eq!(
                self.messages.get(&seq),
                Some(msg),
                "a resent message differs from the original"
            );
            self.duplicates.push(seq);
            return false;
        }
        assert_eq!(seq, highest + 1, "gap in seqs: got {seq} after {highest}");
        self.messages.insert(seq, msg.clone());
        true
    }

    pub fn highest(&self) -> u64 {
        self.messages.keys().next_back().copied().unwrap_or(0)
    }

    pub fn assert_contiguous(&self) {
        let seqs: Vec<u64> = self.messages.keys().copied().collect();
        let expected: Vec<u64> = (1..=self.highest()).collect();
        assert_eq!(seqs, expected);
    }

    pub fn events(&self) -> Vec<&AgentEventPayload> {
        self.messages
            .values()
            .filter_map(|m| match m {
                ShimMessage::AgentEvent { payload, .. } => Some(payload),
                _ => None,
            })
            .collect()
    }

    pub fn logs(&self) -> Vec<(agent_shim::protocol::LogStream, &str)> {
        self.messages
            .values()
            .filter_map(|m| match m {
                ShimMessage::Log { stream, line, .. } => Some((*stream, line.as_str())),
                _ => None,
            })
            .collect()
    }

    pub fn exited(&self) -> Option<(Option<i32>, Option<i32>)> {
        self.messages.values().find_map(|m| match m {
            ShimMessage::Exited { code, signal, .. } => Some((*code, *signal)),
            _ => None,
        })
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.events().into_iter().find_map(|e| match e {
            AgentEventPayload::AgentStarted { pid } => Some(*pid),
            _ => None,
        })
    }
}

/// Acks every message, answers tool calls, and returns once `exited` was received and acked.
pub async fn serve_until_exited(conn: &mut ServerConn, ledger: &mut Ledger) {
    loop {
        let msg = conn.recv().await;
        let seq = msg.seq().unwrap_or_else(|| panic!("unexpected {msg:?}"));
        ledger.record(&msg);
        conn.ack(seq).await;
        match msg {
            ShimMessage::ToolCall { call_id, .. } => {
                conn.send(&tool_result(&call_id)).await;
            }
            ShimMessage::Exited { .. } => return,
            _ => {}
        }
    }
}

pub fn tool_result(call_id: &str) -> ServerMessage {
    ServerMessage::ToolResult {
        call_id: call_id.into(),
        ok: true,
        result: Some(serde_json::json!({ "content": format!("result of {call_id}") })),
        error: None,
    }
}

/// The real shim binary, run against a fake control plane.
pub struct ShimProcess {
    child: tokio::process::Child,
    stderr: Arc<Mutex<String>>,
    pub work_dir: tempfile::TempDir,
}

pub struct ShimOptions {
    pub token: String,
    pub lost_after_s: u64,
    pub extra: Vec<(String, String)>,
}

impl Default for ShimOptions {
    fn default() -> Self {
        ShimOptions {
            token: TOKEN.into(),
            lost_after_s: 10,
            extra: Vec::new(),
        }
    }
}

impl ShimProcess {
    pub fn spawn(cp: &FakeControlPlane) -> Self {
        Self::spawn_with(cp, ShimOptions::default())
    }

    pub fn spawn_with(cp: &FakeControlPlane, options: ShimOptions) -> Self {
        let work_dir = tempfile::tempdir().unwrap();
        let mut vars: HashMap<String, String> = [
            (env::RUN_ID, RUN_ID.to_owned()),
            (env::CALLBACK_URL, cp.callback_url()),
            (env::RUN_TOKEN, options.token),
            (env::LOST_AFTER_S, options.lost_after_s.to_string()),
            (env::WORK_DIR, work_dir.path().display().to_string()),
            (
                env::TRACEPARENT,
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
            ),
            ("CODEBOLT_SHIM_RECONNECT_MIN_MS", "20".to_owned()),
            ("CODEBOLT_SHIM_RECONNECT_MAX_MS", "200".to_owned()),
            ("CODEBOLT_SHIM_KILL_AFTER_MS", "2000".to_owned()),
            ("CODEBOLT_SHIM_USAGE_INTERVAL_MS", "3600000".to_owned()),
            ("RUST_LOG", "agent_shim=debug".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        vars.insert(
            "PATH".into(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        );
        vars.extend(options.extra);
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agent-shim"))
            .env_clear()
            .envs(&vars)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[shim] {line}");
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        ShimProcess {
            child,
            stderr,
            work_dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for the shim to exit within `within`.
    pub async fn wait(&mut self, within: Duration) -> ExitStatus {
        match timeout(within, self.child.wait()).await {
            Ok(status) => {
                let status = status.unwrap();
                // Let the stderr reader catch up.
                tokio::time::sleep(Duration::from_millis(50)).await;
                status
            }
            Err(_) => panic!(
                "the shim did not exit within {within:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }
}

/// True while a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Polls until the process is gone.
pub async fn assert_process_gone(pid: u32) {
    let gone = timeout(Duration::from_secs(5), async {
        while process_alive(pid) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "agent process {pid} is still alive");
}
