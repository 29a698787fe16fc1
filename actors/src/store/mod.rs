//! Where run state lives: run records, token hashes, event history and logs. The in-memory store
//! serves a single node; the Redis store lets several replicas serve one cluster.

pub mod memory;
pub mod redis;

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use crate::model::{EventKind, LogLine, LogSource, RunEvent, RunId, RunRecord, RunState};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("run store unavailable: {message}")]
    Unavailable { message: String },
    #[error("run {run_id} not found")]
    RunNotFound { run_id: RunId },
    #[error("idempotency key '{key}' was used for a different request (run {run_id})")]
    IdempotencyConflict { key: String, run_id: RunId },
    #[error("cursor '{cursor}' is not valid")]
    BadCursor { cursor: String },
    /// The run is driven by a newer lease: this writer lost it (another replica adopted the run).
    #[error("run {run_id} is owned by a newer lease (fence {current}); a write with fence {fence} was refused")]
    Fenced {
        run_id: RunId,
        fence: u64,
        current: u64,
    },
    /// The store answered with something this build cannot use (unreadable data, a refused
    /// command, a bad store url).
    #[error("run store error: {message}")]
    Backend { message: String },
}

impl StoreError {
    /// A short, stable name of the error's kind (for metrics' `error.type`).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable { .. } => "unavailable",
            StoreError::RunNotFound { .. } => "run_not_found",
            StoreError::IdempotencyConflict { .. } => "idempotency_conflict",
            StoreError::BadCursor { .. } => "bad_cursor",
            StoreError::Fenced { .. } => "fenced",
            StoreError::Backend { .. } => "backend",
        }
    }
}

/// Result of creating a run: new, or the run an earlier request with the same key created.
#[derive(Debug, Clone, PartialEq)]
pub enum CreateOutcome {
    Created,
    Existing(Box<RunRecord>),
}

/// Filters of `GET /v1/runs`.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub state: Option<RunState>,
    pub agent: Option<String>,
    pub provider: Option<String>,
}

impl RunFilter {
    pub fn matches(&self, record: &RunRecord) -> bool {
        self.state.is_none_or(|s| record.state == s)
            && self.agent.as_deref().is_none_or(|a| record.agent == a)
            && self
                .provider
                .as_deref()
                .is_none_or(|p| record.provider == p)
    }
}

/// One page of runs, newest first.
#[derive(Debug, Clone)]
pub struct RunPage {
    pub runs: Vec<RunRecord>,
    pub next_cursor: Option<String>,
}

/// What the store knows about a run token (stored by hash only).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub run_id: RunId,
    pub expires_at: DateTime<Utc>,
    pub revoked: bool,
}

/// Which replica drives a run, and the fencing token its writes carry. Every claim raises the
/// fence, so the writes of an earlier owner (a replica that was paused or cut off) are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub run_id: RunId,
    pub replica: String,
    pub fence: u64,
}

/// When a replica may take a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Only if nobody owns it or its owner's heartbeat lapsed (a new run, or adoption).
    IfOrphaned,
    /// Whoever owns it: the run's shim connected to this replica, so the run moves here.
    Takeover,
}

/// The outcome of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This replica owns the run now (and the previous owner, if there was one).
    Claimed {
        lease: Lease,
        previous: Option<String>,
    },
    /// A live replica owns it.
    Held { owner: String },
}

/// Writes of one run's actor, applied together and only while its lease is current.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunWrite {
    pub events: Vec<EventKind>,
    pub agent_logs: Vec<(String, String)>,
    pub record: Option<RunRecord>,
    /// The highest shim sequence number these writes complete.
    pub seq: Option<u64>,
    /// Number of this write in its writer's order under one lease (0: not numbered). A
    /// numbered write is applied at most once, so one retried after its reply was lost (the
    /// store went away mid-call) is not applied twice.
    pub batch: u64,
    /// A concurrency-limit scope whose slot the run gives back with these writes (its end).
    pub release_slot: Option<String>,
}

impl RunWrite {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.agent_logs.is_empty()
            && self.record.is_none()
            && self.seq.is_none()
    }

    /// Adds `later` after these writes (its record, if any, replaces this one's).
    pub fn merge(&mut self, later: RunWrite) {
        self.events.extend(later.events);
        self.agent_logs.extend(later.agent_logs);
        if later.record.is_some() {
            self.record = later.record;
        }
        self.seq = self.seq.max(later.seq);
        if later.release_slot.is_some() {
            self.release_slot = later.release_slot;
        }
    }
}

/// A request about a run, carried to the replica that owns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum RunCommand {
    Stop { grace_s: Option<u64> },
    Kill { reason: Option<String> },
}

/// A note to one replica about one of its runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum Notice {
    /// Commands wait in the run's queue.
    Commands { run_id: RunId },
    /// Another replica took the run over: stop driving it.
    Released { run_id: RunId, by: String },
}

/// Whether a run got a slot under a concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// `in_use` runs hold the scope's slots already.
    Full {
        in_use: u64,
    },
}

pub type NoticeStream = Pin<Box<dyn Stream<Item = Notice> + Send>>;

pub type EventStream = Pin<Box<dyn Stream<Item = Result<RunEvent, StoreError>> + Send>>;
pub type LogLineStream = Pin<Box<dyn Stream<Item = Result<LogLine, StoreError>> + Send>>;

#[async_trait]
pub trait RunStore: Send + Sync + 'static {
    /// Stores a new run; with an idempotency key already used, returns that key's run instead.
    async fn create_run(
        &self,
        record: &RunRecord,
        idempotency_key: Option<&str>,
    ) -> Result<CreateOutcome, StoreError>;

    /// Replaces the record of an existing run.
    async fn put_run(&self, record: &RunRecord) -> Result<(), StoreError>;

    async fn get_run(&self, id: RunId) -> Result<Option<RunRecord>, StoreError>;

    async fn list_runs(
        &self,
        filter: &RunFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RunPage, StoreError>;

    /// Appends to the run's history and returns the stored event with its index.
    async fn append_event(&self, id: RunId, kind: EventKind) -> Result<RunEvent, StoreError>;

    /// History after `after` (exclusive), then, with `follow`, new events until the run's final
    /// event.
    async fn events(&self, id: RunId, after: u64, follow: bool) -> Result<EventStream, StoreError>;

    async fn append_logs(
        &self,
        id: RunId,
        source: LogSource,
        lines: Vec<(String, String)>,
    ) -> Result<(), StoreError>;

    /// Log lines after `after`; with `follow`, continues until the run's logs are closed.
    async fn logs(
        &self,
        id: RunId,
        source: LogSource,
        after: u64,
        follow: bool,
    ) -> Result<LogLineStream, StoreError>;

    /// Marks a run's logs complete, ending followers.
    async fn close_logs(&self, id: RunId) -> Result<(), StoreError>;

    async fn put_token(&self, token_hash: &str, record: &TokenRecord) -> Result<(), StoreError>;

    async fn get_token(&self, token_hash: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// Revokes every token of the run.
    async fn revoke_tokens(&self, id: RunId) -> Result<(), StoreError>;

    /// Whether the store is reachable (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Records that `replica` is alive for `ttl` (its runs are orphaned once it lapses).
    async fn heartbeat(&self, replica: &str, ttl: Duration) -> Result<(), StoreError>;

    /// Replicas whose heartbeat is current.
    async fn live_replicas(&self) -> Result<Vec<String>, StoreError>;

    /// Makes `replica` the run's owner under a new, higher fence, when `claim` allows.
    async fn claim_run(
        &self,
        id: RunId,
        replica: &str,
        claim: Claim,
    ) -> Result<ClaimOutcome, StoreError>;

    /// The run's current lease, if it was ever claimed.
    async fn lease(&self, id: RunId) -> Result<Option<Lease>, StoreError>;

    /// Applies `write` (events, then agent log lines, then the record and the sequence number)
    /// at once, if `lease` is still the run's current one; otherwise [`StoreError::Fenced`].
    async fn write_run(&self, lease: &Lease, write: RunWrite) -> Result<(), StoreError>;

    /// The run ended: it no longer counts among its owner's runs. The lease stays, so writes
    /// of earlier owners are still refused.
    async fn release_run(&self, lease: &Lease) -> Result<(), StoreError>;

    /// The highest shim sequence number stored for the run (0 when none).
    async fn last_seq(&self, id: RunId) -> Result<u64, StoreError>;

    /// Runs owned by replicas whose heartbeat lapsed, and runs created longer than
    /// `unclaimed_after` ago that no replica ever claimed (their creator stopped, or lost the
    /// store, between creating and claiming them).
    async fn orphaned_runs(&self, unclaimed_after: Duration) -> Result<Vec<RunId>, StoreError>;

    /// Queues a command for the run and notifies its owner; returns the owner if it is alive.
    async fn push_command(
        &self,
        id: RunId,
        command: &RunCommand,
    ) -> Result<Option<String>, StoreError>;

    /// Takes the run's queued commands, oldest first.
    async fn take_commands(&self, id: RunId) -> Result<Vec<RunCommand>, StoreError>;

    /// Runs that have queued commands.
    async fn runs_with_commands(&self) -> Result<Vec<RunId>, StoreError>;

    /// Sends a notice to one replica (lost if it is not listening; queues are the record).
    async fn notify(&self, replica: &str, notice: &Notice) -> Result<(), StoreError>;

    /// Notices to `replica` for as long as the stream is held, reconnecting by itself.
    async fn notices(&self, replica: &str) -> Result<NoticeStream, StoreError>;

    /// Stores bytes every replica can read (agent bundles, what adopting a run needs).
    async fn put_blob(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError>;

    async fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Takes one of `limit` slots of `scope` for the run, atomically across replicas (a run
    /// that holds one already keeps it).
    async fn acquire_slot(
        &self,
        scope: &str,
        limit: u32,
        id: RunId,
    ) -> Result<Admission, StoreError>;

    /// Gives the run's slot of `scope` back.
    async fn release_slot(&self, scope: &str, id: RunId) -> Result<(), StoreError>;

    /// How many writes this handle had refused for an outdated lease.
    fn fenced_writes(&self) -> u64;
}
