//! The agent-shim runtime: connects to the control plane, fetches and starts the agent, and
//! relays its traffic with sequence numbers, acks and reconnects (SPEC §6–7).
//!
//! One task owns all state ([`Shim`]) and reacts to one event at a time: a frame from the
//! server, a line of agent output, the agent's exit, a timer or a signal. I/O helpers live in
//! the submodules; the bookkeeping that needs no I/O ([`outbox`], [`relay`]) is pure.

pub mod agent;
pub mod bundle;
pub mod config;
pub mod connection;
pub mod outbox;
pub mod relay;
pub mod spans;
pub mod usage;

use std::future::{pending, Future};
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, SinkExt, StreamExt};
use nix::sys::signal::Signal;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant, Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use self::agent::{AgentOutput, AgentProcess, AgentSpec, OutputLine, Progress};
use self::bundle::BundleError;
use self::config::Config;
use self::connection::{ConnectError, Welcome, Ws};
use self::outbox::{AckOutcome, Outbox, PendingCalls};
use self::relay::Relayed;
use self::spans::SpanRecorder;
use self::usage::UsageSampler;
use crate::protocol::agent::ToAgent;
use crate::protocol::{
    AgentEventPayload, BundleInfo, LogStream, ServerMessage, ShimMessage, ToolError,
    MAX_FRAME_BYTES, PROTOCOL_VERSION,
};

pub use self::config::ConfigError;

/// Exit code for a configuration error (reported by `main` before the runtime starts).
pub const EXIT_CONFIG: i32 = 2;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
const MIN_HEARTBEAT: Duration = Duration::from_millis(50);
/// A connection on which nothing (not even a pong) arrived for this many heartbeats is dead.
const DEAD_AFTER_HEARTBEATS: u32 = 3;
const MIN_DEAD_AFTER: Duration = Duration::from_secs(3);
/// After the agent exits, how long to wait for the rest of its output before reporting the exit.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Why the shim ended; each maps to a process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShimExit {
    /// The agent ran and exited (with any code) and everything was acknowledged.
    Completed,
    /// An internal error or a protocol situation the shim cannot handle.
    Failed,
    /// The control plane was unreachable for `lost_after`; the agent was stopped.
    ControlPlaneLost,
    /// The control plane refused the run token; the agent (if any) was stopped.
    TokenRefused,
    /// The bundle could not be fetched/verified/unpacked or the agent could not be started.
    AgentNotStarted,
}

impl ShimExit {
    pub fn code(self) -> i32 {
        match self {
            ShimExit::Completed => 0,
            ShimExit::Failed => 1,
            ShimExit::ControlPlaneLost => 3,
            ShimExit::TokenRefused => 4,
            ShimExit::AgentNotStarted => 5,
        }
    }
}

/// Forwards SIGTERM and SIGINT as named events. Must be called inside a Tokio runtime.
pub fn shutdown_signals() -> std::io::Result<mpsc::Receiver<&'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if tx.send(name).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Runs the shim until the run is over.
pub async fn run(config: Config, mut shutdown: mpsc::Receiver<&'static str>) -> ShimExit {
    let mut shim = Shim::new(config);
    tracing::info!(
        run_id = %shim.config.run_id,
        url = %shim.config.connect_url,
        work_dir = %shim.config.work_dir.display(),
        "agent-shim starting"
    );
    loop {
        if let Some(exit) = shim.finished() {
            shim.close("run finished").await;
            return exit;
        }
        let event = shim.next_event(&mut shutdown).await;
        if let Some(exit) = shim.handle(event).await {
            return exit;
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<(Ws, Welcome), ConnectError>> + Send>>;

enum AgentState {
    /// No welcome with `start_agent` yet.
    NotStarted,
    /// Fetching and unpacking the bundle.
    Preparing(JoinHandle<Result<String, BundleError>>),
    Running {
        process: Box<AgentProcess>,
        usage: UsageSampler,
    },
    /// The process was reaped; its remaining output is being relayed before `exited`.
    Exiting {
        code: Option<i32>,
        signal: Option<i32>,
        since: Instant,
    },
    /// `exited` is queued (or there is nothing to report).
    Done,
}

enum Event {
    Signal(&'static str),
    Connected(Box<Result<(Ws, Welcome), ConnectError>>),
    RetryDue,
    Frame(Option<Result<Message, tungstenite::Error>>),
    Heartbeat,
    Prepared(Result<Result<String, BundleError>, tokio::task::JoinError>),
    AgentExited(std::io::Result<std::process::ExitStatus>),
    Output(Option<OutputLine>),
    /// What waited for room in the agent's stdin is written.
    InputWritten,
    DrainDue,
    Lost,
    UsageDue,
}

struct Shim {
    config: Config,
    host: String,
    outbox: Outbox,
    pending: PendingCalls,
    ws: Option<Ws>,
    connecting: Option<Connecting>,
    retry_at: Option<Instant>,
    attempt: u32,
    welcomed: bool,
    last_heard: Instant,
    unreachable_since: Instant,
    lost_after: Duration,
    heartbeat_every: Duration,
    heartbeat: Interval,
    usage_tick: Interval,
    task: String,
    agent: AgentState,
    output: Option<AgentOutput>,
    stop_forwarded: bool,
    signals: u32,
    exit: ShimExit,
    /// The shim's own spans, sent to the control plane in batches.
    spans: SpanRecorder,
    /// When the bundle fetch began (for its span).
    preparing_since: Option<SystemTime>,
}

impl Shim {
    fn new(config: Config) -> Shim {
        let host = match nix::unistd::gethostname() {
            Ok(name) => name.to_string_lossy().into_owned(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the hostname");
                "unknown".to_owned()
            }
        };
        let now = Instant::now();
        let mut usage_tick = tokio::time::interval(config.usage_interval);
        usage_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Shim {
            host,
            outbox: Outbox::default(),
            pending: PendingCalls::default(),
            ws: None,
            connecting: None,
            retry_at: Some(now),
            attempt: 0,
            welcomed: false,
            last_heard: now,
            unreachable_since: now,
            lost_after: config.lost_after,
            heartbeat_every: DEFAULT_HEARTBEAT,
            heartbeat: heartbeat_interval(DEFAULT_HEARTBEAT),
            usage_tick,
            task: String::new(),
            agent: AgentState::NotStarted,
            output: None,
            stop_forwarded: false,
            signals: 0,
            exit: ShimExit::Completed,
            spans: SpanRecorder::new(config.traceparent.as_deref()),
            preparing_since: None,
            config,
        }
    }

    /// The run is over once the agent is done and the server has acknowledged everything.
    fn finished(&self) -> Option<ShimExit> {
        (matches!(self.agent, AgentState::Done) && self.outbox.all_acked()).then_some(self.exit)
    }

    async fn next_event(&mut self, shutdown: &mut mpsc::Receiver<&'static str>) -> Event {
        let connected = self.ws.is_some();
        let lost_at = self.unreachable_since + self.lost_after;
        let can_read_output = self.output.is_some() && !self.outbox.is_full();
        let drain_at = match self.agent {
            AgentState::Exiting { since, .. } if can_read_output => Some(since + OUTPUT_DRAIN),
            _ => None,
        };
        let running = matches!(self.agent, AgentState::Running { .. });
        tokio::select! {
            Some(name) = shutdown.recv() => Event::Signal(name),
            result = poll_connecting(&mut self.connecting) => Event::Connected(Box::new(result)),
            _ = sleep_until_opt(self.retry_at) => Event::RetryDue,
            frame = next_frame(&mut self.ws) => Event::Frame(frame),
            _ = self.heartbeat.tick(), if connected => Event::Heartbeat,
            event = agent_progress(&mut self.agent) => event,
            line = recv_output(&mut self.output), if can_read_output => Event::Output(line),
            _ = sleep_until_opt(drain_at) => Event::DrainDue,
            _ = sleep_until(lost_at), if !connected => Event::Lost,
            _ = self.usage_tick.tick(), if running => Event::UsageDue,
        }
    }

    async fn handle(&mut self, event: Event) -> Option<ShimExit> {
        match event {
            Event::Signal(name) => self.on_signal(name).await,
            Event::Connected(result) => return self.on_connected(*result).await,
            Event::RetryDue => self.start_connecting(),
            Event::Frame(frame) => return self.on_frame(frame).await,
            Event::Heartbeat => return self.on_heartbeat().await,
            Event::Prepared(result) => return self.on_prepared(result).await,
            Event::AgentExited(status) => self.on_agent_exit(status).await,
            Event::Output(Some(line)) => self.on_output(line).await,
            Event::Output(None) => {
                self.output = None;
                self.report_exit_if_drained().await;
            }
            Event::InputWritten => {}
            Event::DrainDue => self.drain_after_exit().await,
            Event::Lost => return Some(self.lost().await),
            Event::UsageDue => {
                if let AgentState::Running { usage, .. } = &mut self.agent {
                    if let Some(report) = usage.sample() {
                        let pushed = self
                            .push(|seq| ShimMessage::Usage { seq, usage: report })
                            .await;
                        if let Err(e) = pushed {
                            tracing::error!(error = %e, "cannot queue a usage report");
                        }
                    }
                }
            }
        }
        None
    }

    // --- connection -------------------------------------------------------------------------

    fn start_connecting(&mut self) {
        self.retry_at = None;
        let hello = ShimMessage::Hello {
            run_id: self.config.run_id.clone(),
            protocol_version: PROTOCOL_VERSION,
            host: self.host.clone(),
            resume_from: self.welcomed.then(|| self.outbox.acked()),
            pending_calls: self.pending.ids(),
            answered_calls: self.pending.answered_calls(),
        };
        let url = self.config.connect_url.clone();
        let token = self.config.token.clone();
        tracing::debug!(attempt = self.attempt, %url, "connecting");
        self.connecting = Some(Box::pin(async move {
            connection::open(&url, &token, &hello, CONNECT_TIMEOUT).await
        }));
    }

    fn schedule_retry(&mut self) {
        let jitter = rand::thread_rng().gen::<f64>();
        let delay = self.config.reconnect.delay(self.attempt, jitter);
        self.attempt = self.attempt.saturating_add(1);
        self.retry_at = Some(Instant::now() + delay);
    }

    fn disconnected(&mut self, reason: &str) {
        if self.ws.take().is_some() {
            tracing::warn!(
                reason,
                "lost the connection to the control plane; reconnecting"
            );
            self.unreachable_since = self.last_heard;
            self.schedule_retry();
        }
    }

    async fn on_connected(
        &mut self,
        result: Result<(Ws, Welcome), ConnectError>,
    ) -> Option<ShimExit> {
        self.connecting = None;
        match result {
            Ok((ws, welcome)) => self.on_welcome(ws, welcome).await,
            Err(ConnectError::Refused { reason }) => Some(self.refused(&reason).await),
            Err(e) => {
                tracing::warn!(error = %e, attempt = self.attempt, "cannot reach the control plane");
                self.schedule_retry();
                None
            }
        }
    }

    async fn on_welcome(&mut self, ws: Ws, welcome: Welcome) -> Option<ShimExit> {
        self.connecting = None;
        if welcome.run_id != self.config.run_id {
            tracing::error!(expected = %self.config.run_id, got = %welcome.run_id, "welcome for another run");
            self.exit = ShimExit::Failed;
            self.terminate_agent().await;
            return Some(ShimExit::Failed);
        }
        let first = !self.welcomed;
        self.ws = Some(ws);
        self.welcomed = true;
        self.attempt = 0;
        self.last_heard = Instant::now();
        if !welcome.heartbeat_interval.is_zero() {
            self.heartbeat_every = welcome.heartbeat_interval.max(MIN_HEARTBEAT);
        }
        self.heartbeat = heartbeat_interval(self.heartbeat_every);
        if !welcome.lost_after.is_zero() {
            self.lost_after = welcome.lost_after;
        }
        self.spans.set_wanted(welcome.trace_spans);
        tracing::info!(
            last_acked = welcome.last_acked,
            start_agent = welcome.start_agent,
            unacked = self.outbox.len(),
            "connected to the control plane"
        );

        if first && welcome.last_acked > 0 && self.outbox.continue_after(welcome.last_acked) {
            tracing::info!(
                last_acked = welcome.last_acked,
                "the run already has messages; numbering continues after them"
            );
        } else if welcome.last_acked < self.outbox.acked() {
            tracing::error!(
                server = welcome.last_acked,
                shim = self.outbox.acked(),
                "the control plane lost messages it had acknowledged; they cannot be resent"
            );
        } else {
            self.on_ack(welcome.last_acked);
        }

        if matches!(self.agent, AgentState::NotStarted) {
            if welcome.start_agent {
                self.start_preparing(welcome.task, welcome.bundle);
            } else {
                tracing::error!("the control plane says the agent already started, but this shim never started one");
                self.agent = AgentState::Done;
                self.exit = ShimExit::Failed;
            }
        }

        let resend: Vec<String> = self
            .outbox
            .after(welcome.last_acked)
            .map(|e| e.text.clone())
            .collect();
        if !resend.is_empty() {
            tracing::info!(count = resend.len(), "resending unacknowledged messages");
        }
        for text in resend {
            if !self.send_text(text).await {
                break;
            }
        }
        None
    }

    async fn on_frame(
        &mut self,
        frame: Option<Result<Message, tungstenite::Error>>,
    ) -> Option<ShimExit> {
        let message = match frame {
            None => {
                self.disconnected("connection closed");
                return None;
            }
            Some(Err(e)) => {
                self.disconnected(&e.to_string());
                return None;
            }
            Some(Ok(message)) => message,
        };
        self.last_heard = Instant::now();
        match message {
            Message::Text(text) if self.answer_passed_through(&text) => {}
            Message::Text(text) => match serde_json::from_str::<ServerMessage>(&text) {
                Ok(msg) => self.on_server_message(msg).await,
                Err(e) => {
                    let preview: String = text.chars().take(200).collect();
                    tracing::warn!(error = %e, frame = %preview, "ignoring a server frame that does not parse");
                }
            },
            Message::Close(frame) => {
                if let Some(reason) = connection::refusal(frame.as_ref()) {
                    return Some(self.refused(&reason).await);
                }
                let reason = match &frame {
                    Some(f) => format!("closed by the control plane ({}: {})", f.code, f.reason),
                    None => "closed by the control plane".to_owned(),
                };
                self.disconnected(&reason);
            }
            Message::Binary(_) => tracing::warn!("ignoring a binary frame from the control plane"),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        None
    }

    async fn on_server_message(&mut self, msg: ServerMessage) {
        match msg {
            ServerMessage::Ack { seq } => self.on_ack(seq),
            ServerMessage::ToolResult {
                call_id,
                ok,
                result,
                error,
            } => {
                let failure = error.as_ref().map(|e| e.code.clone());
                let line = ToAgent::ToolResult {
                    id: call_id.clone(),
                    ok,
                    result,
                    error,
                };
                match serde_json::to_string(&line) {
                    Ok(line) => self.answer_agent(&call_id, ok, failure, line),
                    Err(e) => tracing::error!(error = %e, "cannot encode a line for the agent"),
                }
            }
            ServerMessage::Stop { grace_s } => self.on_stop(grace_s).await,
            ServerMessage::Error {
                code,
                message,
                fatal,
            } => {
                if fatal {
                    tracing::error!(%code, %message, "the control plane reported a fatal error");
                } else {
                    tracing::warn!(%code, %message, "the control plane rejected a frame");
                }
            }
            ServerMessage::Welcome { .. } => {
                tracing::warn!("ignoring a second welcome on the same connection");
            }
        }
    }

    /// A `tool_result` frame goes to the agent with its result's text as the server sent it
    /// (see [`relay::tool_result_passthrough`]); false for any other frame.
    fn answer_passed_through(&mut self, frame: &str) -> bool {
        let Some((call_id, ok, error, line)) = relay::tool_result_passthrough(frame) else {
            return false;
        };
        self.answer_agent(&call_id, ok, error.map(|e| e.code), line);
        true
    }

    /// Gives the agent a pending call's answer (its encoded line) and closes the call's span;
    /// an answer to a call that is not pending is dropped.
    fn answer_agent(&mut self, call_id: &str, ok: bool, failure: Option<String>, line: String) {
        if !self.pending.answer(call_id, ok, failure.clone()) {
            tracing::warn!(%call_id, "ignoring a result for a tool call that is not pending");
            return;
        }
        self.send_line_to_agent(line);
        self.spans
            .call_answered(call_id, failure.as_deref().or((!ok).then_some("failed")));
    }

    fn on_ack(&mut self, seq: u64) {
        let outcome = self.outbox.ack(seq);
        self.pending.acked(self.outbox.acked());
        if let AckOutcome::BeyondSent { highest_sent } = outcome {
            tracing::warn!(
                seq,
                highest_sent,
                "the control plane acknowledged a seq never sent"
            );
        }
    }

    async fn on_heartbeat(&mut self) -> Option<ShimExit> {
        let dead_after = (self.heartbeat_every * DEAD_AFTER_HEARTBEATS).max(MIN_DEAD_AFTER);
        if self.last_heard.elapsed() > dead_after {
            // Frames may be waiting while the shim was busy sending: look before giving up.
            match self.ws.as_mut().and_then(|ws| ws.next().now_or_never()) {
                Some(frame) => return self.on_frame(frame).await,
                None => {
                    self.disconnected("no frame from the control plane (not even a pong)");
                    return None;
                }
            }
        }
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        if let Ok(text) = serde_json::to_string(&ShimMessage::Heartbeat { at_ms }) {
            if self.send_text(text).await {
                self.send_frame(Message::Ping(Vec::new())).await;
            }
        }
        self.send_spans().await;
        None
    }

    /// Sends the finished spans, a batch a frame, if connected; unsent ones wait for the next
    /// chance.
    async fn send_spans(&mut self) {
        while self.ws.is_some() && !self.spans.is_empty() {
            let mut batch = self.spans.take();
            let rest = batch.split_off(batch.len().min(spans::BATCH));
            self.spans.restore(rest);
            let text = match serde_json::to_string(&ShimMessage::Spans {
                spans: batch.clone(),
            }) {
                Ok(text) => text,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot encode spans; dropping them");
                    continue;
                }
            };
            if !self.send_text(text).await {
                self.spans.restore(batch);
                return;
            }
        }
    }

    /// Sends a frame if connected; a failure drops the connection (the outbox keeps the data).
    async fn send_text(&mut self, text: String) -> bool {
        self.send_frame(Message::text(text)).await
    }

    async fn send_frame(&mut self, frame: Message) -> bool {
        let Some(ws) = self.ws.as_mut() else {
            return false;
        };
        // Nearly always the socket takes the frame at once; only a send that has to wait gets a
        // deadline (and its clock reading and timer).
        let mut send = ws.send(frame);
        let sent = match (&mut send).now_or_never() {
            Some(result) => Ok(result),
            None => timeout(SEND_TIMEOUT, send).await,
        };
        match sent {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                self.disconnected(&format!("send failed: {e}"));
                false
            }
            Err(_) => {
                self.disconnected("send timed out");
                false
            }
        }
    }

    /// Queues a sequenced message and sends it now if connected.
    async fn push(
        &mut self,
        build: impl FnOnce(u64) -> ShimMessage,
    ) -> Result<(), relay::TooLarge> {
        let seq = self.outbox.next_seq();
        let text = relay::encode_within(build(seq), MAX_FRAME_BYTES)?;
        self.outbox.push(|_| text.clone());
        self.send_text(text).await;
        Ok(())
    }

    /// Queues a shim diagnostic line for the run's log.
    async fn push_note(&mut self, line: String) {
        let result = self
            .push(|seq| ShimMessage::Log {
                seq,
                stream: LogStream::Shim,
                line,
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot queue a shim log line");
        }
    }

    /// Closes the connection (if open) with a normal close, and waits briefly for the reply.
    async fn close(&mut self, reason: &str) {
        let Some(mut ws) = self.ws.take() else {
            return;
        };
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: reason.to_owned().into(),
        };
        let closing = async {
            ws.close(Some(frame)).await?;
            // Wait for the server's close reply so the close is clean.
            while let Some(frame) = ws.next().await {
                if matches!(frame?, Message::Close(_)) {
                    break;
                }
            }
            Ok::<(), tungstenite::Error>(())
        };
        match timeout(CLOSE_TIMEOUT, closing).await {
            Ok(Ok(())) => tracing::info!(reason, "connection closed"),
            Ok(Err(e)) => tracing::debug!(error = %e, "closing the connection"),
            Err(_) => tracing::debug!("the control plane did not answer the close"),
        }
    }

    // --- agent ------------------------------------------------------------------------------

    fn start_preparing(&mut self, task: String, mut bundle: BundleInfo) {
        self.task = task;
        // A path is resolved against the callback URL's origin, which is what reaches the
        // control plane from inside this sandbox.
        match self.config.callback_url.join(&bundle.url) {
            Ok(url) => bundle.url = url.to_string(),
            Err(e) => tracing::warn!(url = %bundle.url, error = %e, "bundle URL not resolvable"),
        }
        let token = self.config.token.clone();
        let dir = self.config.work_dir.clone();
        tracing::info!(url = %bundle.url, size = bundle.size, "fetching the agent bundle");
        self.preparing_since = Some(SystemTime::now());
        self.agent = AgentState::Preparing(tokio::spawn(async move {
            bundle::fetch_and_unpack(&bundle, &token, &dir)
                .await
                .map(|()| bundle.command)
        }));
    }

    async fn on_prepared(
        &mut self,
        result: Result<Result<String, BundleError>, tokio::task::JoinError>,
    ) -> Option<ShimExit> {
        if let Some(started) = self.preparing_since.take() {
            let error = match &result {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("bundle preparation stopped: {e}")),
            };
            self.spans
                .finish("shim.bundle.fetch", started, Default::default(), error);
        }
        let command = match result {
            Ok(Ok(command)) => command,
            Ok(Err(e)) if e.is_unauthorized() => {
                self.agent = AgentState::NotStarted;
                return Some(self.refused(&e.to_string()).await);
            }
            Ok(Err(e)) => {
                self.agent = AgentState::NotStarted;
                self.fail_before_start(e.to_string()).await;
                return None;
            }
            Err(e) => {
                self.agent = AgentState::NotStarted;
                self.fail_before_start(format!("bundle preparation stopped: {e}"))
                    .await;
                return None;
            }
        };
        let spec = AgentSpec {
            command: &command,
            work_dir: &self.config.work_dir,
            run_id: &self.config.run_id,
            task: &self.task,
            traceparent: self.config.traceparent.as_deref(),
        };
        let spawning = SystemTime::now();
        let spawned = AgentProcess::spawn(&spec);
        self.spans.finish(
            "shim.agent.start",
            spawning,
            std::collections::BTreeMap::from([("process.command".to_string(), command.clone())]),
            spawned.as_ref().err().map(|e| e.to_string()),
        );
        match spawned {
            Ok((process, output)) => {
                let pid = process.pid;
                tracing::info!(pid, %command, "agent started");
                self.agent = AgentState::Running {
                    process: Box::new(process),
                    usage: UsageSampler::new(pid),
                };
                self.output = Some(output);
                self.usage_tick.reset();
                self.push_event(AgentEventPayload::AgentStarted { pid })
                    .await;
                let task = ToAgent::Task {
                    run_id: self.config.run_id.clone(),
                    task: self.task.clone(),
                };
                self.send_to_agent(&task);
            }
            Err(e) => self.fail_before_start(e.to_string()).await,
        }
        None
    }

    /// The agent could not be started: tell the run's log, report an exit without status.
    async fn fail_before_start(&mut self, reason: String) {
        tracing::error!(%reason, "the agent could not be started");
        self.push_note(format!(
            "agent-shim: the agent could not be started: {reason}"
        ))
        .await;
        self.push_exited(None, None).await;
        self.exit = ShimExit::AgentNotStarted;
    }

    async fn push_event(&mut self, payload: AgentEventPayload) {
        if let Err(e) = self
            .push(|seq| ShimMessage::AgentEvent { seq, payload })
            .await
        {
            tracing::error!(error = %e, "cannot queue an agent event");
        }
    }

    async fn push_exited(&mut self, code: Option<i32>, signal: Option<i32>) {
        // Before the exit: the control plane closes the connection once the run's end is stored.
        self.send_spans().await;
        if let Err(e) = self
            .push(|seq| ShimMessage::Exited { seq, code, signal })
            .await
        {
            tracing::error!(error = %e, "cannot queue the exit report");
        }
        self.agent = AgentState::Done;
    }

    fn send_to_agent(&mut self, line: &ToAgent) {
        match serde_json::to_string(line) {
            Ok(text) => self.send_line_to_agent(text),
            Err(e) => tracing::error!(error = %e, "cannot encode a line for the agent"),
        }
    }

    /// Queues an encoded line (without its newline) for the agent's stdin.
    fn send_line_to_agent(&mut self, line: String) {
        let AgentState::Running { process, .. } = &mut self.agent else {
            tracing::debug!("the agent is gone; dropping a line for its stdin");
            return;
        };
        if !process.send_line(line) {
            tracing::warn!("the agent's stdin is closed; dropping a line");
        }
    }

    async fn on_output(&mut self, line: OutputLine) {
        let relayed = if line.truncated() {
            self.push_note(format!(
                "agent-shim: a {:?} line of {} bytes was truncated to {} bytes",
                line.stream,
                line.original_len,
                line.line.len()
            ))
            .await;
            Relayed::Log {
                stream: line.stream,
                line: line.line,
            }
        } else {
            relay::classify(line.stream, line.line)
        };
        match relayed {
            Relayed::ToolCall { call_id, tool, .. } if self.pending.is_pending(&call_id) => {
                // Its answer could not be told from the first call's: refused here, not sent.
                let message = format!(
                    "tool call id '{call_id}' is already used by a call that waits for its answer; \
                     give every call an id of its own"
                );
                self.push_note(format!(
                    "agent-shim: tool call {call_id} ({tool}) refused: {message}"
                ))
                .await;
                self.send_to_agent(&ToAgent::ToolResult {
                    id: call_id,
                    ok: false,
                    result: None,
                    error: Some(ToolError {
                        code: "duplicate_call_id".into(),
                        message,
                    }),
                });
            }
            Relayed::ToolCall {
                call_id,
                tool,
                args,
            } => {
                let id = call_id.clone();
                let tool_name = tool.clone();
                let seq = self.outbox.next_seq();
                let pushed = self
                    .push(|seq| ShimMessage::ToolCall {
                        seq,
                        call_id,
                        tool,
                        args,
                    })
                    .await;
                match pushed {
                    Ok(()) => {
                        self.spans.call_started(&id, &tool_name);
                        self.pending.insert(id, seq, tool_name);
                        if self.spans.batch_due() {
                            self.send_spans().await;
                        }
                    }
                    Err(e) => {
                        self.push_note(format!("agent-shim: tool call {id} refused: {e}"))
                            .await;
                        self.send_to_agent(&ToAgent::ToolResult {
                            id,
                            ok: false,
                            result: None,
                            error: Some(ToolError {
                                code: "invalid_args".into(),
                                message: e.to_string(),
                            }),
                        });
                    }
                }
            }
            other => {
                if let Err(e) = self.push(|seq| other.into_message(seq)).await {
                    tracing::error!(error = %e, "cannot queue agent output");
                }
            }
        }
    }

    async fn on_agent_exit(&mut self, status: std::io::Result<std::process::ExitStatus>) {
        let (code, signal) = match status {
            Ok(status) => (status.code(), status.signal()),
            Err(e) => {
                tracing::error!(error = %e, "cannot wait for the agent");
                (None, None)
            }
        };
        if let AgentState::Running { process, .. } = &self.agent {
            tracing::info!(pid = process.pid, ?code, ?signal, "agent exited");
            // Whatever the agent left behind in its group goes with it.
            process.signal(Signal::SIGKILL);
        }
        // Results for its calls can no longer be delivered.
        self.pending.clear();
        self.agent = AgentState::Exiting {
            code,
            signal,
            since: Instant::now(),
        };
        self.report_exit_if_drained().await;
    }

    async fn report_exit_if_drained(&mut self) {
        if let AgentState::Exiting { code, signal, .. } = self.agent {
            if self.output.is_none() {
                self.push_exited(code, signal).await;
            }
        }
    }

    /// The agent exited a while ago but its output is still open (a process escaped its group):
    /// relay what is buffered, then report the exit.
    async fn drain_after_exit(&mut self) {
        while !self.outbox.is_full() {
            let Some(output) = self.output.as_mut() else {
                break;
            };
            match output.try_line() {
                Some(Some(line)) => self.on_output(line).await,
                Some(None) => self.output = None,
                None => {
                    tracing::warn!(
                        "the agent's output is still open after it exited; not reading further"
                    );
                    self.output = None;
                }
            }
        }
        self.report_exit_if_drained().await;
    }

    async fn on_stop(&mut self, grace_s: u64) {
        match &self.agent {
            AgentState::Running { process, .. } => {
                if self.stop_forwarded {
                    tracing::debug!("stop already forwarded");
                    return;
                }
                tracing::info!(grace_s, "stop requested; sending SIGTERM to the agent");
                process.signal(Signal::SIGTERM);
                self.stop_forwarded = true;
                self.push_event(AgentEventPayload::StopForwarded { grace_s })
                    .await;
            }
            AgentState::NotStarted | AgentState::Preparing(_) => {
                tracing::info!("stop requested before the agent started");
                self.abort_preparing();
                self.stop_forwarded = true;
                self.push_event(AgentEventPayload::StopForwarded { grace_s })
                    .await;
                self.push_exited(None, Some(Signal::SIGTERM as i32)).await;
            }
            AgentState::Exiting { .. } | AgentState::Done => {}
        }
    }

    async fn on_signal(&mut self, name: &'static str) {
        self.signals += 1;
        match &self.agent {
            AgentState::NotStarted if !self.welcomed => {
                tracing::info!(signal = name, "stopping before the run started");
                self.agent = AgentState::Done;
            }
            AgentState::NotStarted | AgentState::Preparing(_) => {
                tracing::info!(signal = name, "stopping before the agent started");
                self.abort_preparing();
                self.push_note(format!(
                    "agent-shim: received {name} before the agent started"
                ))
                .await;
                self.push_exited(None, Some(Signal::SIGTERM as i32)).await;
            }
            AgentState::Running { process, .. } => {
                // A second signal insists.
                let forward = if self.signals > 1 {
                    Signal::SIGKILL
                } else {
                    Signal::SIGTERM
                };
                tracing::info!(signal = name, ?forward, "forwarding to the agent");
                process.signal(forward);
                self.push_note(format!(
                    "agent-shim: received {name}; sent {forward} to the agent"
                ))
                .await;
            }
            AgentState::Exiting { .. } | AgentState::Done => {
                tracing::info!(
                    signal = name,
                    "the agent already exited; finishing delivery"
                );
            }
        }
    }

    fn abort_preparing(&mut self) {
        if let AgentState::Preparing(handle) = &self.agent {
            handle.abort();
        }
    }

    /// SIGTERM to the agent's group, SIGKILL if it outlives `kill_after`.
    async fn terminate_agent(&mut self) {
        self.abort_preparing();
        let kill_after = self.config.kill_after;
        if let AgentState::Running { process, .. } = &mut self.agent {
            process.signal(Signal::SIGTERM);
            if timeout(kill_after, process.wait()).await.is_err() {
                tracing::warn!(
                    pid = process.pid,
                    "the agent ignored SIGTERM; sending SIGKILL"
                );
                process.signal(Signal::SIGKILL);
                if timeout(Duration::from_secs(5), process.wait())
                    .await
                    .is_err()
                {
                    tracing::error!(pid = process.pid, "the agent did not die after SIGKILL");
                }
            } else {
                // Anything it left in its group.
                process.signal(Signal::SIGKILL);
            }
        }
        self.agent = AgentState::Done;
    }

    async fn lost(&mut self) -> ShimExit {
        tracing::error!(
            lost_after_s = self.lost_after.as_secs_f64(),
            "the control plane has been unreachable too long; stopping the agent and exiting"
        );
        self.terminate_agent().await;
        ShimExit::ControlPlaneLost
    }

    async fn refused(&mut self, reason: &str) -> ShimExit {
        tracing::error!(%reason, "the control plane refused the run token; stopping the agent and exiting");
        self.terminate_agent().await;
        // Refused by an HTTP endpoint (the bundle's) while the WebSocket is open: leave it with
        // a close frame rather than a dropped socket.
        self.close("run token refused").await;
        ShimExit::TokenRefused
    }
}

fn heartbeat_interval(every: Duration) -> Interval {
    let mut interval = tokio::time::interval_at(Instant::now() + every, every);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

async fn poll_connecting(
    connecting: &mut Option<Connecting>,
) -> Result<(Ws, Welcome), ConnectError> {
    match connecting {
        Some(future) => future.await,
        None => pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => pending().await,
    }
}

async fn next_frame(ws: &mut Option<Ws>) -> Option<Result<Message, tungstenite::Error>> {
    match ws {
        Some(ws) => ws.next().await,
        None => pending().await,
    }
}

async fn recv_output(output: &mut Option<AgentOutput>) -> Option<OutputLine> {
    match output {
        Some(output) => output.next_line().await,
        None => pending().await,
    }
}

async fn agent_progress(agent: &mut AgentState) -> Event {
    match agent {
        AgentState::Preparing(handle) => Event::Prepared(handle.await),
        AgentState::Running { process, .. } => match process.progress().await {
            Progress::Exited(status) => Event::AgentExited(status),
            Progress::InputWritten => Event::InputWritten,
        },
        _ => pending().await,
    }
}
