//! Simulated shims that survive their replica: each speaks the shim protocol over its own
//! WebSocket through the load balancer and, like the real shim (`agent-shim/src/shim`), numbers
//! its frames, keeps them until acknowledged, heartbeats, and after a lost connection reconnects
//! with backoff, says `hello` with `resume_from` (its last ack) and `pending_calls`, and resends
//! what the `welcome`'s `last_acked` does not cover.
//!
//! While calling, each shim makes `fs.read_file` calls in a closed loop: one at a time, the next
//! as soon as the previous is answered (or a fixed think time later). A call answered `retryable` (lost with a replica) is
//! made again under a new id.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use agent_shim::protocol::{
    AnsweredCall, ServerMessage, ShimMessage, CLOSE_POLICY_VIOLATION, PROTOCOL_VERSION,
};

use anyhow::bail;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::stats::Latencies;

const TOOL: &str = "fs.read_file";
const PATH: &str = "README.md";
/// The error code of a tool call whose result was lost with a replica.
const RETRYABLE: &str = "retryable";
/// Handshake bound, as the real shim's.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The real shim's reconnect backoff: 100 ms doubling to 5 s, each delay in its upper half.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// A connection on which nothing arrived for this many heartbeats (at least 3 s) is dead.
const DEAD_AFTER_HEARTBEATS: u32 = 3;
const MIN_DEAD_AFTER: Duration = Duration::from_secs(3);
/// Answered calls with acked frames that `hello` lists, as many as the real shim lists.
const RECENT_ANSWERS: usize = 64;

/// How many answered call ids a shim remembers, to recognise a second answer.
const ANSWERED_KEPT: usize = 4096;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Where and as whom a shim connects.
#[derive(Debug, Clone)]
pub struct ShimSpec {
    pub run_id: String,
    pub token: String,
    /// `ws://<load balancer>/v1/sandbox/connect`.
    pub ws_url: String,
}

/// What the shims do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Connected, heartbeating, no new calls (a call in flight is finished).
    Idle,
    /// Tool calls in a closed loop.
    Calling,
    /// Close the connections and end.
    Closing,
}

/// Counts of what the shims saw; the latencies only while recording.
#[derive(Default)]
pub struct Tally {
    pub latencies: Latencies,
    /// Calls answered `ok` while recording.
    pub calls_ok: u64,
    /// Acks received while recording.
    pub acks: u64,
    /// Reconnects: from opening the connection to the `welcome`.
    pub rehandshakes: Latencies,
    /// Calls answered `retryable` (made again under a new id), recording or not.
    pub retryable: u64,
    /// Calls answered with any other error.
    pub call_errors: u64,
    /// `error` frames from the server.
    pub error_frames: u64,
    /// Second results for a call already answered `ok`: the call was executed again (its frame,
    /// answered but not yet acknowledged when the replica died, was resent).
    pub answered_twice: u64,
    /// Results for a call that was neither in flight nor among the last answered ones.
    pub stray_results: u64,
    /// Welcomes whose `last_acked` was below what the shim had been acked before.
    pub lost_acks: u64,
    /// Connections that ended other than by closing the fleet.
    pub disconnects: u64,
    /// Connection attempts that failed (refused, handshake error, closed before welcome).
    pub failed_connects: u64,
    /// How often each reason of the above was seen (close frames, errors, failed calls).
    pub seen: BTreeMap<String, u64>,
}

impl Tally {
    fn note(&mut self, what: String) {
        // Bounded: reasons carrying varying details could otherwise grow without end.
        if self.seen.len() < 64 || self.seen.contains_key(&what) {
            *self.seen.entry(what).or_default() += 1;
        }
    }
}

/// One shim's connection, as the scenario watches it.
#[derive(Debug, Clone, Default)]
pub struct ShimStatus {
    /// The local address of its current connection (the load balancer keys on it).
    pub local_addr: Option<SocketAddr>,
    /// Welcomed on the current connection.
    pub connected: bool,
    pub disconnected_at: Option<Instant>,
    /// The first connection loss since [`Fleet::mark`].
    pub first_lost_at: Option<Instant>,
    pub welcomed_at: Option<Instant>,
    /// First call answered `ok` on the current connection.
    pub answered_at: Option<Instant>,
    /// Calls answered `ok` over the shim's life.
    pub answered_total: u64,
    /// A call is waiting for its answer.
    pub in_flight: bool,
    /// Set when the shim gave up (its token was refused).
    pub gave_up: Option<String>,
}

struct Shared {
    recording: AtomicBool,
    tally: Mutex<Tally>,
    shims: Vec<Mutex<ShimStatus>>,
}

impl Shared {
    fn tally(&self) -> MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status(&self, i: usize) -> MutexGuard<'_, ShimStatus> {
        self.shims[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The simulated shims of every run, each its own task.
pub struct Fleet {
    shared: Arc<Shared>,
    mode: watch::Sender<Mode>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Starts one shim per spec, idle; while calling, each waits `think` between an answer and
    /// its next call.
    pub fn start(specs: Vec<ShimSpec>, think: Duration) -> Fleet {
        let shared = Arc::new(Shared {
            recording: AtomicBool::new(false),
            tally: Mutex::new(Tally::default()),
            shims: specs.iter().map(|_| Mutex::default()).collect(),
        });
        let (mode, _) = watch::channel(Mode::Idle);
        let tasks = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let shim = Shim::new(i, spec, think, shared.clone());
                tokio::spawn(shim.run(mode.subscribe()))
            })
            .collect();
        Fleet {
            shared,
            mode,
            tasks,
        }
    }

    pub fn len(&self) -> usize {
        self.shared.shims.len()
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Latencies and counts are kept from now until [`Fleet::stop_recording`].
    pub fn start_recording(&self) {
        self.shared.recording.store(true, Ordering::SeqCst);
    }

    pub fn stop_recording(&self) {
        self.shared.recording.store(false, Ordering::SeqCst);
    }

    /// What was counted so far; counting starts again from zero.
    pub fn take_tally(&self) -> Tally {
        std::mem::take(&mut *self.shared.tally())
    }

    /// Forgets every shim's first connection loss, so the next one is recorded.
    pub fn mark(&self) {
        for i in 0..self.len() {
            self.shared.status(i).first_lost_at = None;
        }
    }

    pub fn status(&self, i: usize) -> ShimStatus {
        self.shared.status(i).clone()
    }

    pub fn statuses(&self) -> Vec<ShimStatus> {
        (0..self.len()).map(|i| self.status(i)).collect()
    }

    /// Waits until every shim is welcomed (and, with `answered`, had a call answered on its
    /// current connection).
    pub async fn wait_connected(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let statuses = self.statuses();
            if let Some(gave_up) = statuses.iter().find_map(|s| s.gave_up.clone()) {
                bail!("a simulated shim gave up: {gave_up}");
            }
            let waiting = statuses.iter().filter(|s| !s.connected).count();
            if waiting == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{waiting} of {} simulated shims not connected within {within:?}; seen: {:?}",
                    self.len(),
                    self.shared.tally().seen
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until no call is in flight (after [`Mode::Idle`]); the number still in flight.
    pub async fn wait_idle(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let busy = self.statuses().iter().filter(|s| s.in_flight).count();
            if busy == 0 || Instant::now() > deadline {
                return busy;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes every connection and waits for the tasks.
    pub async fn close(mut self) {
        self.set_mode(Mode::Closing);
        for task in self.tasks.drain(..) {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                eprintln!("a simulated shim did not close within 5 s");
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The call in flight.
struct Call {
    id: String,
    /// The seq of its `tool_call` frame.
    seq: u64,
    sent: Instant,
}

/// How a connection ended.
enum End {
    Lost(String),
    Closing,
}

/// One simulated shim.
struct Shim {
    index: usize,
    spec: ShimSpec,
    shared: Arc<Shared>,
    /// The seq the next sequenced frame gets.
    next_seq: u64,
    /// Highest seq the server acknowledged.
    acked: u64,
    /// Sent, unacknowledged frames, oldest first.
    outbox: VecDeque<(u64, String)>,
    welcomed_once: bool,
    call: Option<Call>,
    calls_made: u64,
    /// The latest calls answered `ok`, newest last, and the same as a set.
    answered_order: VecDeque<String>,
    answered: HashSet<String>,
    /// Answered calls whose `tool_call` frame is not acked yet (listed in `hello`, so a replica
    /// taking the run over does not execute them again), by frame seq.
    unacked_answers: VecDeque<(u64, AnsweredCall)>,
    /// The latest answered calls whose frames were acked (also listed: their results may not
    /// be stored yet when the replica that answered stops).
    recent_answers: VecDeque<AnsweredCall>,
    heartbeat_every: Duration,
    /// Between an answer and the next call.
    think: Duration,
    /// State of the jitter of the reconnect backoff.
    rng: u64,
}

impl Shim {
    fn new(index: usize, spec: ShimSpec, think: Duration, shared: Arc<Shared>) -> Shim {
        Shim {
            index,
            spec,
            shared,
            next_seq: 1,
            acked: 0,
            outbox: VecDeque::new(),
            welcomed_once: false,
            call: None,
            calls_made: 0,
            answered_order: VecDeque::new(),
            answered: HashSet::new(),
            unacked_answers: VecDeque::new(),
            recent_answers: VecDeque::new(),
            heartbeat_every: Duration::from_secs(5),
            think,
            rng: 0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1),
        }
    }

    async fn run(mut self, mut mode: watch::Receiver<Mode>) {
        let mut attempt = 0u32;
        loop {
            if *mode.borrow() == Mode::Closing {
                return;
            }
            match self.connect().await {
                Ok(ws) => {
                    attempt = 0;
                    let end = self.serve(ws, &mut mode).await;
                    let mut status = self.shared.status(self.index);
                    status.connected = false;
                    status.local_addr = None;
                    match end {
                        End::Closing => return,
                        End::Lost(reason) => {
                            let now = Instant::now();
                            status.disconnected_at = Some(now);
                            status.first_lost_at.get_or_insert(now);
                            drop(status);
                            let mut tally = self.shared.tally();
                            tally.disconnects += 1;
                            tally.note(format!("connection lost: {reason}"));
                        }
                    }
                }
                Err(Refused(message)) => {
                    // As the real shim: a refused token is never retried.
                    self.shared.status(self.index).gave_up = Some(message.clone());
                    self.shared.tally().note(format!("gave up: {message}"));
                    return;
                }
                Err(Failed(err)) => {
                    let mut tally = self.shared.tally();
                    tally.failed_connects += 1;
                    tally.note(format!("connect failed: {err:#}"));
                }
            }
            let delay = self.backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = mode.wait_for(|m| *m == Mode::Closing) => return,
            }
        }
    }

    /// `min * 2^attempt` capped at `max`, then a random point in its upper half.
    fn backoff(&mut self, attempt: u32) -> Duration {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let jitter = (self.rng % 1000) as f64 / 1000.0;
        let base = RECONNECT_MIN
            .saturating_mul(2u32.saturating_pow(attempt.min(20)))
            .min(RECONNECT_MAX);
        base.mul_f64(0.5 + 0.5 * jitter)
    }

    /// Connects, says hello, waits for the welcome and resends what it does not cover.
    async fn connect(&mut self) -> Result<Ws, ConnectError> {
        let mut request = self
            .spec
            .ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| Failed(e.into()))?;
        let auth = HeaderValue::from_str(&format!("Bearer {}", self.spec.token))
            .map_err(|e| Failed(e.into()))?;
        request.headers_mut().insert("Authorization", auth);
        let hello = ShimMessage::Hello {
            run_id: self.spec.run_id.clone(),
            protocol_version: PROTOCOL_VERSION,
            host: format!("load-tests-{}", self.index),
            resume_from: self.welcomed_once.then_some(self.acked),
            pending_calls: self.call.iter().map(|c| c.id.clone()).collect(),
            answered_calls: self
                .recent_answers
                .iter()
                .chain(self.unacked_answers.iter().map(|(_, answered)| answered))
                .cloned()
                .collect(),
        };
        let opened = Instant::now();
        let (mut ws, last_acked, heartbeat_ms) =
            match tokio::time::timeout(CONNECT_TIMEOUT, handshake(request, &hello)).await {
                Ok(res) => res?,
                Err(_) => {
                    return Err(Failed(anyhow::anyhow!(
                        "no welcome within {CONNECT_TIMEOUT:?}"
                    )))
                }
            };
        if self.welcomed_once {
            self.shared.tally().rehandshakes.record(opened.elapsed());
        }
        let local_addr = match ws.get_ref() {
            tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.local_addr().ok(),
            _ => None,
        };
        if heartbeat_ms > 0 {
            self.heartbeat_every =
                Duration::from_millis(heartbeat_ms).max(Duration::from_millis(50));
        }
        if !self.welcomed_once && last_acked > 0 && self.next_seq == 1 {
            // A run with an earlier shim's messages: number after them.
            self.next_seq = last_acked + 1;
            self.acked = last_acked;
        } else if last_acked < self.acked {
            let mut tally = self.shared.tally();
            tally.lost_acks += 1;
            tally.note(format!(
                "welcome says last_acked {last_acked}, but {} was acked before",
                self.acked
            ));
        } else {
            self.ack(last_acked);
        }
        self.welcomed_once = true;
        let resend: Vec<String> = self
            .outbox
            .iter()
            .filter(|(seq, _)| *seq > last_acked)
            .map(|(_, text)| text.clone())
            .collect();
        for text in resend {
            ws.send(Message::Text(text))
                .await
                .map_err(|e| Failed(e.into()))?;
        }
        let mut status = self.shared.status(self.index);
        status.local_addr = local_addr;
        status.connected = true;
        status.welcomed_at = Some(Instant::now());
        status.answered_at = None;
        Ok(ws)
    }

    fn ack(&mut self, seq: u64) {
        if seq <= self.acked {
            return;
        }
        self.acked = seq.min(self.next_seq - 1);
        while self.outbox.front().is_some_and(|(s, _)| *s <= seq) {
            self.outbox.pop_front();
        }
        while self.unacked_answers.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, answered)) = self.unacked_answers.pop_front() {
                if self.recent_answers.len() == RECENT_ANSWERS {
                    self.recent_answers.pop_front();
                }
                self.recent_answers.push_back(answered);
            }
        }
    }

    /// Sends a new tool call (queued for resending until acked).
    async fn call(&mut self, ws: &mut Ws) -> Result<(), String> {
        self.calls_made += 1;
        let id = format!("c{}", self.calls_made);
        let seq = self.next_seq;
        self.next_seq += 1;
        let text = serde_json::to_string(&ShimMessage::ToolCall {
            seq,
            call_id: id.clone(),
            tool: TOOL.into(),
            args: json!({"path": PATH}),
        })
        .map_err(|e| e.to_string())?;
        self.outbox.push_back((seq, text.clone()));
        self.call = Some(Call {
            id,
            seq,
            sent: Instant::now(),
        });
        self.shared.status(self.index).in_flight = true;
        ws.send(Message::Text(text))
            .await
            .map_err(|e| format!("send failed: {e}"))
    }

    /// Relays until the connection ends or the fleet closes.
    async fn serve(&mut self, mut ws: Ws, mode: &mut watch::Receiver<Mode>) -> End {
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + self.heartbeat_every,
            self.heartbeat_every,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let dead_after = (self.heartbeat_every * DEAD_AFTER_HEARTBEATS).max(MIN_DEAD_AFTER);
        let mut last_heard = Instant::now();
        let mut next_call = None;
        if *mode.borrow_and_update() == Mode::Calling && self.call.is_none() {
            if let Err(reason) = self.call(&mut ws).await {
                return End::Lost(reason);
            }
        }
        loop {
            tokio::select! {
                frame = ws.next() => {
                    last_heard = Instant::now();
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(frame))) => {
                            return End::Lost(format!("closed by the server: {frame:?}"))
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(err)) => return End::Lost(err.to_string()),
                        None => return End::Lost("connection ended".into()),
                    };
                    let message = match serde_json::from_str::<ServerMessage>(&text) {
                        Ok(message) => message,
                        Err(err) => {
                            self.shared.tally().note(format!("unreadable frame: {err}"));
                            continue;
                        }
                    };
                    if self.on_message(message) && *mode.borrow() == Mode::Calling {
                        if self.think.is_zero() {
                            if let Err(reason) = self.call(&mut ws).await {
                                return End::Lost(reason);
                            }
                        } else {
                            next_call = Some(tokio::time::Instant::now() + self.think);
                        }
                    }
                }
                () = sleep_until(next_call) => {
                    next_call = None;
                    if *mode.borrow() == Mode::Calling && self.call.is_none() {
                        if let Err(reason) = self.call(&mut ws).await {
                            return End::Lost(reason);
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > dead_after {
                        return End::Lost(format!("nothing heard for {dead_after:?}"));
                    }
                    let at_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or_default();
                    let beat = match serde_json::to_string(&ShimMessage::Heartbeat { at_ms }) {
                        Ok(text) => text,
                        Err(err) => return End::Lost(err.to_string()),
                    };
                    let sent = async {
                        ws.send(Message::Text(beat)).await?;
                        ws.send(Message::Ping(Vec::new())).await
                    };
                    if let Err(err) = sent.await {
                        return End::Lost(format!("heartbeat not sent: {err}"));
                    }
                }
                changed = mode.changed() => {
                    let now = if changed.is_ok() { *mode.borrow_and_update() } else { Mode::Closing };
                    match now {
                        Mode::Closing => {
                            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                            return End::Closing;
                        }
                        Mode::Calling if self.call.is_none() => {
                            if let Err(reason) = self.call(&mut ws).await {
                                return End::Lost(reason);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Handles one server message; true when the call in flight was answered (so the next may
    /// be made).
    fn on_message(&mut self, message: ServerMessage) -> bool {
        let recording = self.shared.recording.load(Ordering::Relaxed);
        match message {
            ServerMessage::Ack { seq } => {
                self.ack(seq);
                if recording {
                    self.shared.tally().acks += 1;
                }
                false
            }
            ServerMessage::ToolResult {
                call_id, ok, error, ..
            } => {
                let Some(call) = self.call.take_if(|c| c.id == call_id) else {
                    let mut tally = self.shared.tally();
                    if self.answered.contains(&call_id) {
                        tally.answered_twice += 1;
                    } else {
                        tally.stray_results += 1;
                    }
                    return false;
                };
                let now = Instant::now();
                self.shared.status(self.index).in_flight = false;
                if call.seq > self.acked {
                    self.unacked_answers.push_back((
                        call.seq,
                        AnsweredCall {
                            call_id: call_id.clone(),
                            tool: TOOL.into(),
                            ok,
                            error_code: error.as_ref().map(|e| e.code.clone()),
                        },
                    ));
                }
                if ok {
                    if self.answered_order.len() == ANSWERED_KEPT {
                        if let Some(old) = self.answered_order.pop_front() {
                            self.answered.remove(&old);
                        }
                    }
                    self.answered.insert(call_id.clone());
                    self.answered_order.push_back(call_id);
                    {
                        let mut status = self.shared.status(self.index);
                        status.answered_total += 1;
                        status.answered_at.get_or_insert(now);
                    }
                    if recording {
                        let mut tally = self.shared.tally();
                        tally.latencies.record(now - call.sent);
                        tally.calls_ok += 1;
                    }
                } else {
                    let code = error.map(|e| e.code).unwrap_or_default();
                    let mut tally = self.shared.tally();
                    if code == RETRYABLE {
                        tally.retryable += 1;
                    } else {
                        tally.call_errors += 1;
                        tally.note(format!("call {call_id} failed: {code}"));
                    }
                }
                true
            }
            ServerMessage::Error { code, message, .. } => {
                let mut tally = self.shared.tally();
                tally.error_frames += 1;
                tally.note(format!("error frame {code}: {message}"));
                false
            }
            ServerMessage::Stop { .. } | ServerMessage::Welcome { .. } => false,
        }
    }
}

/// Sleeps until `at`, or forever without it.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why a connection attempt failed.
enum ConnectError {
    /// The server refused the run token (HTTP 401/403, or close code 1008).
    Refused(String),
    Failed(anyhow::Error),
}

use ConnectError::{Failed, Refused};

/// Opens the WebSocket, says `hello` and waits for the `welcome`: the connection, the welcome's
/// `last_acked` and `heartbeat_interval_ms`.
async fn handshake(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
    hello: &ShimMessage,
) -> Result<(Ws, u64, u64), ConnectError> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let (mut ws, _) = match tokio_tungstenite::connect_async_with_config(request, None, true).await
    {
        Ok(ok) => ok,
        Err(WsError::Http(res)) if matches!(res.status().as_u16(), 401 | 403) => {
            return Err(Refused(format!("HTTP {} on upgrade", res.status())))
        }
        Err(err) => return Err(Failed(err.into())),
    };
    let hello = serde_json::to_string(hello).map_err(|e| Failed(e.into()))?;
    ws.send(Message::Text(hello))
        .await
        .map_err(|e| Failed(e.into()))?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerMessage>(&text) {
                Ok(ServerMessage::Welcome {
                    last_acked,
                    heartbeat_interval_ms,
                    ..
                }) => return Ok((ws, last_acked, heartbeat_interval_ms)),
                Ok(other) => return Err(Failed(anyhow::anyhow!("{other:?} before the welcome"))),
                Err(err) => return Err(Failed(err.into())),
            },
            Some(Ok(Message::Close(frame))) => {
                let refused = frame
                    .as_ref()
                    .is_some_and(|f| u16::from(f.code) == CLOSE_POLICY_VIOLATION);
                let message = format!("closed before the welcome: {frame:?}");
                return Err(if refused {
                    Refused(message)
                } else {
                    Failed(anyhow::anyhow!(message))
                });
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(Failed(err.into())),
            None => {
                return Err(Failed(anyhow::anyhow!(
                    "connection ended before the welcome"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_double_within_their_upper_half() {
        let spec = ShimSpec {
            run_id: "r".into(),
            token: "t".into(),
            ws_url: "ws://127.0.0.1:1/v1/sandbox/connect".into(),
        };
        let shared = Arc::new(Shared {
            recording: AtomicBool::new(false),
            tally: Mutex::default(),
            shims: vec![Mutex::default()],
        });
        let mut shim = Shim::new(0, spec, Duration::ZERO, shared);
        for attempt in 0..12 {
            let full = RECONNECT_MIN
                .saturating_mul(2u32.pow(attempt))
                .min(RECONNECT_MAX);
            let delay = shim.backoff(attempt);
            assert!(delay >= full / 2 && delay <= full, "{attempt}: {delay:?}");
        }
    }

    #[test]
    fn acks_release_the_outbox_up_to_their_seq() {
        let shared = Arc::new(Shared {
            recording: AtomicBool::new(false),
            tally: Mutex::default(),
            shims: vec![Mutex::default()],
        });
        let spec = ShimSpec {
            run_id: "r".into(),
            token: "t".into(),
            ws_url: String::new(),
        };
        let mut shim = Shim::new(0, spec, Duration::ZERO, shared);
        for seq in 1..=3 {
            shim.outbox.push_back((seq, format!("f{seq}")));
        }
        shim.next_seq = 4;
        shim.ack(2);
        assert_eq!(shim.acked, 2);
        assert_eq!(
            shim.outbox.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![3]
        );
        shim.ack(1);
        assert_eq!(shim.acked, 2, "a stale ack changes nothing");
        shim.ack(9);
        assert_eq!(shim.acked, 3, "an ack beyond what was sent is clamped");
        assert!(shim.outbox.is_empty());
    }
}
