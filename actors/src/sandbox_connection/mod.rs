//! `SandboxConnection`: one actor per shim WebSocket. Reads frames, checks the run token on
//! `hello`, hands sequenced frames to the run's actor, and writes the run's frames back through a
//! bounded outbound queue.

pub mod messages;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Session};
use agent_shim::protocol::{ServerMessage, ShimMessage, CLOSE_POLICY_VIOLATION, MAX_FRAME_BYTES};
use bytes::Bytes;
use bytestring::ByteString;
use futures_util::FutureExt;
use tokio::sync::mpsc;

use crate::metrics::{QueueCounter, QueueKind};
use crate::model::RunId;
use crate::run::actor::{check_protocol_version, tool_call_span};
use crate::run::messages::{AnsweredHere, Attachment, ShimFrame, ShimFrames, ShimGone, ShimHello};
use crate::run::{adopt, AdoptError, RunDeps, RunRegistry};
use crate::store::RunStore;
use crate::store::{Claim, StoreError};
use crate::token::{self, TokenError};
use messages::ToShim;

/// Frames waiting to be written to one shim; a shim that falls further behind is disconnected
/// (it resumes from its last ack when it reconnects).
pub const OUTBOUND_CAPACITY: usize = 1024;

/// How long an ack may wait for a frame to ride along with. Acks are cumulative, so one sent
/// late covers every frame stored before it; a tool call's ack and its result leave in one write
/// instead of two, and a stream of log lines is acked once per interval instead of per line.
pub const ACK_DELAY: Duration = Duration::from_millis(5);

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

enum Outbound {
    Text(ByteString),
    Pong(Bytes),
    Close(u16, String),
}

/// What every connection needs.
#[derive(Clone)]
pub struct ConnectionDeps {
    pub store: Arc<dyn RunStore>,
    pub registry: RunRegistry,
    /// For taking over a run whose shim connects here while another replica drives it.
    pub run_deps: RunDeps,
    /// A shim silent for this long (no frame, no heartbeat) is disconnected.
    pub silence_limit: Duration,
}

enum Stage {
    AwaitingHello,
    /// Hello received, token being checked.
    Checking,
    Attached {
        run_id: RunId,
        /// Counts frames handed to the run actor until it handled them.
        mailbox: QueueCounter,
        /// Which tool calls this connection may answer itself.
        gate: AnswerGate,
        /// The run's span, parent of the spans of calls answered here.
        span: tracing::Span,
        /// Frames on their way to the run actor (see [`hand_to_run`]).
        to_run: mpsc::UnboundedSender<ToRun>,
    },
}

/// What the connection hands to its run's actor, in order.
enum ToRun {
    Frame(ShimFrame),
    Gone(ShimGone),
}

/// Decides which tool calls a connection may answer on receipt instead of leaving them to the
/// run actor: only calls the run has never seen. A frame whose sequence number is not the next
/// one after what the run had taken (a resend, or a gap the run actor deals with) is left to
/// the run actor, and so is a call whose id is known: one the run had taken when it accepted
/// the shim, one the shim said in its hello it already has an answer to, or one that came
/// earlier on this connection (an agent that uses an id twice gets the run actor's refusal).
#[derive(Debug)]
pub struct AnswerGate {
    next_seq: u64,
    known_calls: HashSet<String>,
}

impl AnswerGate {
    /// `last_seq`: the highest sequence number the run had taken when it accepted the shim;
    /// `known_calls`: the ids of the calls the run had taken and those the shim has answers to.
    pub fn new(last_seq: u64, known_calls: HashSet<String>) -> AnswerGate {
        AnswerGate {
            next_seq: last_seq + 1,
            known_calls,
        }
    }

    /// Notes a sequenced frame going to the run actor; true if it is a tool call the connection
    /// may answer itself.
    pub fn admit(&mut self, message: &ShimMessage) -> bool {
        let Some(seq) = message.seq() else {
            return false;
        };
        if seq != self.next_seq {
            return false;
        }
        self.next_seq += 1;
        match message {
            ShimMessage::ToolCall { call_id, .. } => self.known_calls.insert(call_id.clone()),
            _ => false,
        }
    }
}

pub struct SandboxConnection {
    id: u64,
    /// The bearer token the shim presented. Never logged.
    token: String,
    deps: ConnectionDeps,
    /// The socket's frame queue, written straight to while the writer task holds nothing.
    session: Session,
    /// Frames handed to the writer task: the ones that found the socket's queue full, and
    /// everything after them until they are through (order is kept).
    out: mpsc::Sender<Outbound>,
    /// How many frames the writer task holds.
    backlog: Arc<AtomicUsize>,
    stage: Stage,
    last_seen: Instant,
    closing: bool,
    /// The highest stored sequence number not yet acked to the shim.
    pending_ack: Option<u64>,
    /// Sends `pending_ack` on its own when no other frame took it along in time.
    ack_timer: Option<SpawnHandle>,
}

impl SandboxConnection {
    /// Starts the actor for an upgraded WebSocket.
    pub fn start(
        session: Session,
        stream: actix_ws::MessageStream,
        token: String,
        deps: ConnectionDeps,
    ) -> Addr<SandboxConnection> {
        let (out, rx) = mpsc::channel(OUTBOUND_CAPACITY);
        deps.run_deps
            .metrics
            .queue(QueueKind::ConnectionOutbound)
            .channel(&out);
        let backlog = Arc::new(AtomicUsize::new(0));
        actix_rt::spawn(write_frames(session.clone(), rx, backlog.clone()));
        let stream: AggregatedMessageStream = stream
            .max_frame_size(MAX_FRAME_BYTES)
            .aggregate_continuations()
            .max_continuation_size(MAX_FRAME_BYTES);
        SandboxConnection::create(move |ctx| {
            ctx.add_stream(stream);
            SandboxConnection {
                id: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
                token,
                deps,
                session,
                out,
                backlog,
                stage: Stage::AwaitingHello,
                last_seen: Instant::now(),
                closing: false,
                pending_ack: None,
                ack_timer: None,
            }
        })
    }

    fn queue(&mut self, frame: Outbound, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        // Whatever leaves takes the pending ack along, ahead of it (a close included: the shim
        // learns what was stored before the connection ends).
        if !matches!(frame, Outbound::Pong(_)) {
            self.flush_ack(ctx);
        }
        // Straight into the socket's queue when nothing waits before it: the frame is out of
        // this actor's hands before any message it sends next is handled.
        if self.backlog.load(Ordering::Relaxed) == 0 {
            let put = match &frame {
                Outbound::Text(text) => self.session.text(text.clone()).now_or_never(),
                Outbound::Pong(bytes) => self.session.pong(bytes).now_or_never(),
                Outbound::Close(..) => None,
            };
            match put {
                Some(Ok(())) => return,
                Some(Err(actix_ws::Closed)) => {
                    self.closing = true;
                    ctx.stop();
                    return;
                }
                // The socket's queue is full (or the task's budget spent): the writer waits.
                None => {}
            }
        }
        let closing = matches!(frame, Outbound::Close(..));
        self.backlog.fetch_add(1, Ordering::Relaxed);
        match self.out.try_send(frame) {
            Ok(()) => {
                if closing {
                    self.closing = true;
                    ctx.stop();
                }
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.backlog.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(conn = self.id, "shim is not reading; disconnecting it");
                self.closing = true;
                ctx.stop();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.backlog.fetch_sub(1, Ordering::Relaxed);
                self.closing = true;
                ctx.stop();
            }
        }
    }

    fn send(&mut self, message: &ServerMessage, ctx: &mut Context<Self>) {
        match serde_json::to_string(message) {
            Ok(text) => self.queue(Outbound::Text(text.into()), ctx),
            Err(err) => tracing::error!(conn = self.id, error = %err, "could not encode a frame"),
        }
    }

    /// Holds an ack back until another frame leaves or [`ACK_DELAY`] passed.
    fn defer_ack(&mut self, seq: u64, ctx: &mut Context<Self>) {
        self.pending_ack = Some(self.pending_ack.map_or(seq, |pending| pending.max(seq)));
        if self.ack_timer.is_none() {
            self.ack_timer = Some(ctx.run_later(ACK_DELAY, |act, ctx| {
                act.ack_timer = None;
                act.flush_ack(ctx);
            }));
        }
    }

    /// Sends the pending ack, if any.
    fn flush_ack(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.ack_timer.take() {
            ctx.cancel_future(timer);
        }
        if let Some(seq) = self.pending_ack.take() {
            self.send(&ServerMessage::Ack { seq }, ctx);
        }
    }

    fn close(&mut self, code: u16, reason: impl Into<String>, ctx: &mut Context<Self>) {
        let reason = reason.into();
        tracing::info!(conn = self.id, code, reason = %reason, "closing shim connection");
        self.queue(Outbound::Close(code, reason), ctx);
    }

    /// A frame the server cannot accept: tell the shim, keep the connection.
    fn reject(&mut self, code: &str, message: String, ctx: &mut Context<Self>) {
        tracing::warn!(conn = self.id, code, message = %message, "rejected shim frame");
        self.send(
            &ServerMessage::Error {
                code: code.to_string(),
                message,
                fatal: false,
            },
            ctx,
        );
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        let message = match ShimMessage::from_frame(text) {
            Ok(message) => message,
            Err(err) => {
                return self.reject(
                    "malformed_frame",
                    format!("frame is not a valid message: {err}"),
                    ctx,
                )
            }
        };
        match (&self.stage, message) {
            (
                Stage::AwaitingHello,
                ShimMessage::Hello {
                    run_id,
                    protocol_version,
                    host,
                    resume_from,
                    pending_calls,
                    answered_calls,
                },
            ) => {
                if let Err(reason) = check_protocol_version(protocol_version) {
                    return self.close(CLOSE_POLICY_VIOLATION, reason, ctx);
                }
                let run_id: RunId = match run_id.parse() {
                    Ok(id) => id,
                    Err(_) => {
                        return self.close(
                            CLOSE_POLICY_VIOLATION,
                            format!("hello names run '{run_id}', which is not a run id"),
                            ctx,
                        )
                    }
                };
                self.stage = Stage::Checking;
                let store = self.deps.store.clone();
                let registry = self.deps.registry.clone();
                let run_deps = self.deps.run_deps.clone();
                let secret = std::mem::take(&mut self.token);
                let conn_id = self.id;
                let answered_before: Vec<String> =
                    answered_calls.iter().map(|a| a.call_id.clone()).collect();
                let recipient = ctx.address().recipient();
                ctx.wait(
                    async move {
                        token::verify(&*store, &secret, run_id).await?;
                        let run = match registry.get(run_id) {
                            Some(run) => run,
                            // Driven elsewhere (or by nobody): the run moves to this replica.
                            None => match adopt(run_id, &run_deps, Claim::Takeover).await {
                                Ok(Some(run)) => run,
                                Ok(None) => return Err(TokenError::RunEnded { run_id }),
                                Err(AdoptError::Store(err)) => return Err(TokenError::Store(err)),
                                Err(err) => {
                                    return Err(TokenError::Store(StoreError::Backend {
                                        message: err.to_string(),
                                    }))
                                }
                            },
                        };
                        let attachment = run.send(ShimHello {
                            conn_id,
                            conn: recipient,
                            host,
                            resume_from,
                            pending_calls,
                            answered_calls,
                        })
                        .await
                        // The actor stopped in between (the run moved to another replica): not
                        // the shim's fault, it reconnects and finds the run's new owner.
                        .map_err(|_| {
                            TokenError::Store(StoreError::Unavailable {
                                message: format!("run {run_id} is moving between replicas"),
                            })
                        })??;
                        Ok::<_, TokenError>((run, attachment))
                    }
                    .into_actor(self)
                    .map(move |res, act, ctx| match res {
                        Ok((
                            run,
                            Attachment {
                                mailbox,
                                last_seq,
                                span,
                                mut calls_seen,
                            },
                        )) => {
                            calls_seen.extend(answered_before);
                            // The shim could send nothing while it waited for its welcome.
                            act.last_seen = Instant::now();
                            let (to_run, frames) = mpsc::unbounded_channel();
                            actix_rt::spawn(hand_to_run(
                                act.id,
                                RunInbox {
                                    frames: run.clone().recipient(),
                                    gone: run.recipient(),
                                },
                                frames,
                                ctx.address().downgrade().recipient(),
                            ));
                            act.stage = Stage::Attached {
                                run_id,
                                mailbox,
                                gate: AnswerGate::new(last_seq, calls_seen),
                                span,
                                to_run,
                            };
                        }
                        Err(TokenError::Store(err)) => {
                            // Not the shim's fault: it reconnects and tries again.
                            tracing::warn!(conn = act.id, run_id = %run_id, error = %err, "shim turned away for now");
                            act.close(1013, format!("control plane cannot serve the run right now: {err}; reconnect"), ctx);
                        }
                        Err(err) => {
                            tracing::warn!(conn = act.id, run_id = %run_id, error = %err, "shim refused");
                            act.close(CLOSE_POLICY_VIOLATION, err.to_string(), ctx);
                        }
                    }),
                );
            }
            (Stage::AwaitingHello, _) => {
                self.close(CLOSE_POLICY_VIOLATION, "the first frame must be hello", ctx)
            }
            (Stage::Checking, _) => self.reject(
                "not_ready",
                "frame sent before the welcome; it was dropped".into(),
                ctx,
            ),
            (Stage::Attached { .. }, ShimMessage::Hello { .. }) => {
                self.reject("duplicate_hello", "hello was already received".into(), ctx)
            }
            (Stage::Attached { .. }, ShimMessage::Heartbeat { .. }) => {}
            (Stage::Attached { .. }, message) => {
                let answered = self.answer_now(&message);
                if let Some(answered) = &answered {
                    self.queue(Outbound::Text(answered.frame.clone()), ctx);
                }
                let Stage::Attached {
                    mailbox, to_run, ..
                } = &self.stage
                else {
                    return;
                };
                let frame = ShimFrame {
                    conn_id: self.id,
                    message,
                    queued: Some(mailbox.enter()),
                    answered,
                };
                if to_run.send(ToRun::Frame(frame)).is_err() {
                    // The hand-off ended (the run actor was busy and the connection is closing):
                    // not acked, so the shim resends it after reconnecting.
                    tracing::debug!(conn = self.id, "frame dropped; the connection is closing");
                }
            }
        }
    }
}

impl SandboxConnection {
    /// Answers a tool call on receipt when the gate lets it through and the tools can answer
    /// without waiting (`ToolHost::call_now`): the agent's answer then skips the trip through
    /// the run actor, which records the call and its answer afterwards. The answer's frame is
    /// written around the result's JSON text as the tools gave it.
    fn answer_now(&mut self, message: &ShimMessage) -> Option<Box<AnsweredHere>> {
        let Stage::Attached {
            run_id, gate, span, ..
        } = &mut self.stage
        else {
            return None;
        };
        if !gate.admit(message) {
            return None;
        }
        let ShimMessage::ToolCall {
            call_id,
            tool,
            args,
            ..
        } = message
        else {
            return None;
        };
        let started = Instant::now();
        let ready = self.deps.run_deps.tools.call_now(*run_id, tool, args)?;
        let took = started.elapsed();
        let frame = ByteString::from(tool_result_frame(call_id, &ready.json)?);
        // Opened once there is an answer, so a call left to the run actor has one span only;
        // it starts the few microseconds of the read late (the metric has the exact time).
        let call_span = tool_call_span(span, tool, call_id, args);
        Some(Box::new(AnsweredHere {
            frame,
            result_bytes: ready.json.len(),
            took,
            span: call_span,
        }))
    }
}

/// The text of a successful `tool_result` frame, exactly as encoding the
/// [`ServerMessage::ToolResult`] would write it, around `result`'s JSON text.
fn tool_result_frame(call_id: &str, result: &str) -> Option<String> {
    const HEAD: &str = r#"{"type":"tool_result","call_id":"#;
    const OK: &str = r#","ok":true,"result":"#;
    let id = serde_json::to_string(call_id).ok()?;
    let mut frame = String::with_capacity(HEAD.len() + id.len() + OK.len() + result.len() + 1);
    frame.push_str(HEAD);
    frame.push_str(&id);
    frame.push_str(OK);
    frame.push_str(result);
    frame.push('}');
    Some(frame)
}

impl Actor for SandboxConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Frames for the shim (acks, results) queue here before the writer task takes them.
        ctx.set_mailbox_capacity(OUTBOUND_CAPACITY);
        self.deps.run_deps.metrics.connections_active.add(1, &[]);
        if self.token.is_empty() {
            self.close(CLOSE_POLICY_VIOLATION, TokenError::Missing.to_string(), ctx);
            return;
        }
        let limit = self.deps.silence_limit;
        ctx.run_interval(limit / 3, move |act, ctx| {
            if act.last_seen.elapsed() > limit {
                act.close(
                    1001,
                    format!("no frame from the shim for {} ms", limit.as_millis()),
                    ctx,
                );
            }
        });
    }

    fn stopping(&mut self, ctx: &mut Context<Self>) -> Running {
        // Stopped without a close (the stream ended): the ack still goes out if it can.
        self.flush_ack(ctx);
        Running::Stop
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.deps.run_deps.metrics.connections_active.add(-1, &[]);
        if let Stage::Attached { run_id, to_run, .. } = &self.stage {
            tracing::debug!(conn = self.id, run_id = %run_id, "shim connection ended");
            let gone = ToRun::Gone(ShimGone {
                conn_id: self.id,
                reason: "connection closed".into(),
            });
            if to_run.send(gone).is_err() {
                tracing::debug!(conn = self.id, "the run's hand-off already ended");
            }
        }
    }
}

impl StreamHandler<Result<AggregatedMessage, actix_ws::ProtocolError>> for SandboxConnection {
    fn handle(
        &mut self,
        item: Result<AggregatedMessage, actix_ws::ProtocolError>,
        ctx: &mut Context<Self>,
    ) {
        self.last_seen = Instant::now();
        match item {
            Ok(AggregatedMessage::Text(text)) => self.on_text(&text, ctx),
            Ok(AggregatedMessage::Binary(_)) => self.reject(
                "malformed_frame",
                "binary frames are not part of the protocol; send JSON text frames".into(),
                ctx,
            ),
            Ok(AggregatedMessage::Ping(bytes)) => self.queue(Outbound::Pong(bytes), ctx),
            Ok(AggregatedMessage::Pong(_)) => {}
            Ok(AggregatedMessage::Close(reason)) => {
                tracing::debug!(conn = self.id, ?reason, "shim closed the connection");
                self.closing = true;
                ctx.stop();
            }
            Err(err) => {
                let (code, reason) = match err {
                    actix_ws::ProtocolError::Overflow => {
                        (1009, format!("frame larger than {MAX_FRAME_BYTES} bytes"))
                    }
                    other => (1002, format!("websocket protocol error: {other}")),
                };
                self.close(code, reason, ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<ToShim> for SandboxConnection {
    type Result = ();
    fn handle(&mut self, msg: ToShim, ctx: &mut Context<Self>) {
        match msg {
            ToShim::Frame(ServerMessage::Ack { seq }) => self.defer_ack(seq, ctx),
            ToShim::Frame(frame) => self.send(&frame, ctx),
            ToShim::Text(text) => self.queue(Outbound::Text(text), ctx),
            ToShim::Close { code, reason } => self.close(code, reason, ctx),
        }
    }
}

/// Hands a connection's frames to its run's actor, in order, then its end. A separate task so
/// that the hand-off happens after whatever the connection queued for the socket in the same
/// turn: this thread's tasks run in the order they were woken, so the socket's dispatcher writes
/// a tool call's answer before the frame wakes the run actor's thread for the bookkeeping.
///
/// A frame the connection answered itself leaves the run actor only bookkeeping, so it is held
/// for up to [`HOLD`] (and [`HOLD_MAX`] frames) and goes with those after it: one wake of the
/// run's thread, and one store write and ack, then serve several calls. Any other frame, and the
/// connection's end, takes the held ones along at once.
///
/// A run actor too busy to take a frame gets none after it; the connection is closed instead
/// (nothing after the last ack is lost: the shim resends it on reconnecting).
async fn hand_to_run(
    conn_id: u64,
    run: RunInbox,
    mut frames: mpsc::UnboundedReceiver<ToRun>,
    conn: actix::WeakRecipient<ToShim>,
) {
    let mut held = Held {
        conn_id,
        run,
        conn,
        frames: Vec::new(),
        refused: false,
    };
    let release = tokio::time::sleep(HOLD);
    tokio::pin!(release);
    loop {
        let item = tokio::select! {
            biased;
            item = frames.recv() => item,
            () = &mut release, if !held.frames.is_empty() => {
                held.release();
                continue;
            }
        };
        match item {
            Some(ToRun::Frame(frame)) => {
                let bookkeeping = frame.answered.is_some();
                if held.frames.is_empty() {
                    release.as_mut().reset(tokio::time::Instant::now() + HOLD);
                }
                held.frames.push(frame);
                if !bookkeeping || held.frames.len() >= HOLD_MAX {
                    held.release();
                }
            }
            Some(ToRun::Gone(gone)) => {
                held.release();
                held.run.gone.do_send(gone);
            }
            None => {
                held.release();
                return;
            }
        }
    }
}

/// How long a frame the connection answered may wait for others to go to the run actor with.
/// Each burst wakes the run actor's thread, and with one CPU to spare that wake slows the calls
/// around it far beyond the burst's own work: bursts 1 ms apart slowed nearly half of all calls
/// of a busy agent by 5–25 µs, bursts 5 ms apart still a tenth of the runs' p50s; 14 ms apart
/// (a busy agent's [`HOLD_MAX`] calls) none (`load-tests toolcall`, one vCPU). The run's history
/// and the shim's acks lag by as much; followers of a run do not notice 20 ms.
pub const HOLD: Duration = Duration::from_millis(20);
/// How many such frames may wait: bounds the run actor's work per burst (about 1.5 ms at 3 µs
/// a frame), which other runs on its thread wait out.
pub const HOLD_MAX: usize = 512;

/// The frames [`hand_to_run`] holds, and where they go.
struct Held {
    conn_id: u64,
    run: RunInbox,
    conn: actix::WeakRecipient<ToShim>,
    frames: Vec<ShimFrame>,
    refused: bool,
}

impl Held {
    /// Sends the held frames, as one message.
    fn release(&mut self) {
        if self.frames.is_empty() {
            return;
        }
        let frames = ShimFrames(std::mem::take(&mut self.frames));
        if !self.refused {
            if let Err(err) = self.run.frames.try_send(frames) {
                tracing::warn!(conn = self.conn_id, error = %err, "run actor busy; disconnecting the shim");
                self.refused = true;
                if let Some(conn) = self.conn.upgrade() {
                    conn.do_send(ToShim::Close {
                        code: 1013,
                        reason: "control plane busy; reconnect and resume".into(),
                    });
                }
            }
        }
    }
}

/// Where a connection's frames and its end go: the run's actor.
struct RunInbox {
    frames: Recipient<ShimFrames>,
    gone: Recipient<ShimGone>,
}

/// Writes the frames the actor could not put straight into the socket's queue, counting each
/// off `backlog` once it is there; a close frame ends the session.
async fn write_frames(
    mut session: Session,
    mut rx: mpsc::Receiver<Outbound>,
    backlog: Arc<AtomicUsize>,
) {
    while let Some(frame) = rx.recv().await {
        let sent = match frame {
            Outbound::Text(text) => session.text(text).await,
            Outbound::Pong(bytes) => session.pong(&bytes).await,
            Outbound::Close(code, reason) => {
                let reason = CloseReason {
                    code: CloseCode::from(code),
                    description: Some(reason),
                };
                if session.close(Some(reason)).await.is_err() {
                    tracing::debug!("socket already closed");
                }
                return;
            }
        };
        backlog.fetch_sub(1, Ordering::Relaxed);
        if sent.is_err() {
            tracing::debug!("socket closed while writing");
            return;
        }
    }
    // The actor stopped without closing: close normally.
    if session.close(None).await.is_err() {
        tracing::debug!("socket already closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_shim::protocol::LogStream;
    use serde_json::json;

    fn call(seq: u64, id: &str) -> ShimMessage {
        ShimMessage::ToolCall {
            seq,
            call_id: id.into(),
            tool: "fs.read_file".into(),
            args: json!({"path": "README.md"}),
        }
    }

    #[test]
    fn a_result_frame_is_written_as_its_message_is_encoded() {
        for (call_id, result) in [
            ("c1", json!({"content": "line \"one\"\n\ttwo é"})),
            (
                "id with \"quotes\" and \\ and \u{1}",
                json!({"entries": []}),
            ),
        ] {
            let message = ServerMessage::ToolResult {
                call_id: call_id.into(),
                ok: true,
                result: Some(result.clone()),
                error: None,
            };
            let frame = tool_result_frame(call_id, &result.to_string()).unwrap();
            assert_eq!(frame, serde_json::to_string(&message).unwrap());
            assert_eq!(
                serde_json::from_str::<ServerMessage>(&frame).ok(),
                Some(message)
            );
        }
    }

    #[test]
    fn only_calls_new_to_the_run_may_be_answered_by_the_connection() {
        let mut gate = AnswerGate::new(3, HashSet::from(["told".to_string(), "taken".to_string()]));
        // Resends of what the run took already.
        assert!(!gate.admit(&call(2, "a")));
        assert!(!gate.admit(&call(3, "b")));
        // The next frame, a call: yes.
        assert!(gate.admit(&call(4, "c")));
        // A log line moves the sequence on but is no call.
        assert!(!gate.admit(&ShimMessage::Log {
            seq: 5,
            stream: LogStream::Stdout,
            line: "x".into()
        }));
        // A call the shim has an answer to from before (its hello said so), or one the run had
        // taken before this connection.
        assert!(!gate.admit(&call(6, "told")));
        assert!(!gate.admit(&call(7, "taken")));
        // Unsequenced frames change nothing; a gap is left to the run actor, and so is all after.
        assert!(!gate.admit(&ShimMessage::Heartbeat { at_ms: 1 }));
        assert!(gate.admit(&call(8, "d")));
        assert!(!gate.admit(&call(10, "e")));
        assert!(!gate.admit(&call(11, "f")));
        // The same seq twice (a resend on this connection): only the first.
        assert!(gate.admit(&call(9, "g")));
        assert!(!gate.admit(&call(9, "g")));
        // An id used again in a new frame (the agent's mistake): left to the run actor.
        assert!(!gate.admit(&call(10, "c")));
        assert!(gate.admit(&call(11, "h")));
    }

    /// Keeps what it is sent.
    #[derive(Default)]
    struct Recorder {
        seqs: Vec<u64>,
        gone: Vec<u64>,
        to_shim: Vec<String>,
    }

    impl Actor for Recorder {
        type Context = Context<Self>;
    }

    impl Handler<ShimFrames> for Recorder {
        type Result = ();
        fn handle(&mut self, frames: ShimFrames, _: &mut Context<Self>) {
            self.seqs
                .extend(frames.0.iter().filter_map(|frame| frame.message.seq()));
        }
    }

    impl Handler<ShimGone> for Recorder {
        type Result = ();
        fn handle(&mut self, gone: ShimGone, _: &mut Context<Self>) {
            self.gone.push(gone.conn_id);
        }
    }

    impl Handler<ToShim> for Recorder {
        type Result = ();
        fn handle(&mut self, msg: ToShim, _: &mut Context<Self>) {
            self.to_shim.push(format!("{msg:?}"));
        }
    }

    #[derive(Message)]
    #[rtype(result = "(Vec<u64>, Vec<u64>, Vec<String>)")]
    struct Seen;

    impl Handler<Seen> for Recorder {
        type Result = MessageResult<Seen>;
        fn handle(&mut self, _: Seen, _: &mut Context<Self>) -> Self::Result {
            MessageResult((self.seqs.clone(), self.gone.clone(), self.to_shim.clone()))
        }
    }

    /// The end of connection 7.
    fn gone() -> ToRun {
        ToRun::Gone(ShimGone {
            conn_id: 7,
            reason: "closed".into(),
        })
    }

    fn frame(seq: u64) -> ToRun {
        ToRun::Frame(ShimFrame {
            conn_id: 7,
            message: call(seq, &format!("c{seq}")),
            queued: None,
            answered: None,
        })
    }

    /// Runs `hand_to_run` over frames 1..=`frames` and the connection's end, queued before it
    /// starts, into a run actor taking `capacity` at a time; what the run and the connection got.
    async fn hand_off(frames: u64, capacity: usize) -> (Vec<u64>, Vec<u64>, Vec<String>) {
        let run = Recorder::create(|ctx| {
            ctx.set_mailbox_capacity(capacity);
            Recorder::default()
        });
        let conn = Recorder::default().start();
        let (to_run, rx) = mpsc::unbounded_channel();
        for seq in 1..=frames {
            to_run.send(frame(seq)).unwrap();
        }
        to_run.send(gone()).unwrap();
        drop(to_run);
        let inbox = RunInbox {
            frames: run.clone().recipient(),
            gone: run.clone().recipient(),
        };
        hand_to_run(7, inbox, rx, conn.downgrade().recipient()).await;
        let (seqs, gone, _) = run.send(Seen).await.unwrap();
        let (_, _, to_shim) = conn.send(Seen).await.unwrap();
        (seqs, gone, to_shim)
    }

    #[actix_rt::test]
    async fn frames_reach_the_run_in_order_then_the_end() {
        let (seqs, gone, to_shim) = hand_off(20, 64).await;
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        assert_eq!(gone, vec![7]);
        assert!(to_shim.is_empty(), "{to_shim:?}");
    }

    #[actix_rt::test]
    async fn a_busy_run_gets_no_frame_after_one_it_refused_and_the_connection_is_closed() {
        let (seqs, gone, to_shim) = hand_off(20, 2).await;
        // What it took is a gapless start; nothing after the refused frame slipped through.
        assert!(!seqs.is_empty() && seqs.len() < 20, "{seqs:?}");
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        // The end still arrives, so the run knows its shim is gone.
        assert_eq!(gone, vec![7]);
        assert_eq!(to_shim.len(), 1, "{to_shim:?}");
        assert!(to_shim[0].contains("1013"), "{to_shim:?}");
    }

    fn answered(seq: u64) -> ToRun {
        let ToRun::Frame(mut frame) = frame(seq) else {
            unreachable!()
        };
        frame.answered = Some(Box::new(AnsweredHere {
            frame: ByteString::from_static("{}"),
            result_bytes: 0,
            took: Duration::ZERO,
            span: tracing::Span::none(),
        }));
        ToRun::Frame(frame)
    }

    /// Lets every task that can run, run (the clock stays where it is).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[actix_rt::test]
    async fn answered_frames_wait_a_moment_for_company_and_anything_else_takes_them_along() {
        tokio::time::pause();
        let run = Recorder::default().start();
        let conn = Recorder::default().start();
        let (to_run, rx) = mpsc::unbounded_channel();
        let inbox = RunInbox {
            frames: run.clone().recipient(),
            gone: run.clone().recipient(),
        };
        let handing = actix_rt::spawn(hand_to_run(7, inbox, rx, conn.downgrade().recipient()));
        let seen = |run: Addr<Recorder>| async move { run.send(Seen).await.unwrap() };

        // Answered calls are held...
        for seq in 1..=3 {
            to_run.send(answered(seq)).unwrap();
        }
        settle().await;
        assert!(seen(run.clone()).await.0.is_empty());
        tokio::time::advance(HOLD / 2).await;
        assert!(seen(run.clone()).await.0.is_empty());
        // ...until the hold is over (the timer's resolution is a millisecond: give it one more).
        tokio::time::advance(HOLD / 2 + Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(seen(run.clone()).await.0, vec![1, 2, 3]);

        // A frame the run actor has to act on goes at once, with the held ones before it.
        to_run.send(answered(4)).unwrap();
        to_run.send(frame(5)).unwrap();
        settle().await;
        assert_eq!(seen(run.clone()).await.0, vec![1, 2, 3, 4, 5]);

        // No more than HOLD_MAX wait.
        for seq in 6..6 + HOLD_MAX as u64 {
            to_run.send(answered(seq)).unwrap();
        }
        settle().await;
        assert_eq!(seen(run.clone()).await.0.len(), 5 + HOLD_MAX);

        // The connection's end takes the held ones along, then ends the hand-off.
        to_run.send(answered(6 + HOLD_MAX as u64)).unwrap();
        to_run.send(gone()).unwrap();
        drop(to_run);
        handing.await.unwrap();
        let (seqs, gone, to_shim) = seen(run.clone()).await;
        assert_eq!(seqs, (1..=6 + HOLD_MAX as u64).collect::<Vec<_>>());
        assert_eq!(gone, vec![7]);
        assert!(seen(conn).await.2.is_empty(), "{to_shim:?}");
    }
}
