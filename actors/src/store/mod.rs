//! Where run state lives: run records, token hashes, event history and logs. The in-memory store
//! serves a single node; the Redis store lets several replicas serve one cluster.

pub mod memory;
pub mod redis;

use std::pin::Pin;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::Stream;

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
    /// The store answered with something this build cannot use (unreadable data, a refused
    /// command, a bad store url).
    #[error("run store error: {message}")]
    Backend { message: String },
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
}
