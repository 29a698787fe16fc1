//! Single-node run store kept in process memory.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use futures_util::stream::{self, StreamExt};
use tokio::sync::{broadcast, mpsc};

use super::{
    Admission, Claim, ClaimOutcome, CreateOutcome, EventStream, Lease, LogLineStream, Notice,
    NoticeStream, RunCommand, RunFilter, RunPage, RunStore, RunWrite, StoreError, TokenRecord,
};
use crate::model::{EventKind, LogLine, LogSource, RunEvent, RunId, RunRecord};

/// Capacity of the live channel of one journal; a follower that falls further behind re-reads
/// the history it missed.
const LIVE_CAPACITY: usize = 1024;

/// Entries of a journal know their position.
trait Indexed: Clone + Send + 'static {
    fn index(&self) -> u64;
}

impl Indexed for RunEvent {
    fn index(&self) -> u64 {
        self.index
    }
}

impl Indexed for LogLine {
    fn index(&self) -> u64 {
        self.index
    }
}

/// An append-only list with live followers.
struct Journal<T> {
    entries: Vec<T>,
    live: broadcast::Sender<T>,
    closed: bool,
}

impl<T: Indexed> Journal<T> {
    fn new() -> Self {
        Journal {
            entries: Vec::new(),
            live: broadcast::channel(LIVE_CAPACITY).0,
            closed: false,
        }
    }

    fn next_index(&self) -> u64 {
        self.entries.len() as u64 + 1
    }

    fn push(&mut self, entry: T) {
        self.entries.push(entry.clone());
        // No follower listening is not an error.
        if self.live.receiver_count() > 0 && self.live.send(entry).is_err() {
            tracing::trace!("journal follower went away");
        }
    }

    fn after(&self, after: u64) -> Vec<T> {
        self.entries.iter().skip(after as usize).cloned().collect()
    }
}

#[derive(Default)]
struct RunSlot {
    record: Option<RunRecord>,
    /// Owner and fence.
    lease: Option<(String, u64)>,
    /// When `create_run` stored it (for runs never claimed).
    created: Option<Instant>,
    last_seq: u64,
    /// Fence and number of the last numbered write applied.
    applied: (u64, u64),
    commands: VecDeque<RunCommand>,
    events: Option<Journal<RunEvent>>,
    agent_logs: Option<Journal<LogLine>>,
    provider_logs: Option<Journal<LogLine>>,
}

impl RunSlot {
    fn events(&mut self) -> &mut Journal<RunEvent> {
        self.events.get_or_insert_with(Journal::new)
    }

    fn logs(&mut self, source: LogSource) -> &mut Journal<LogLine> {
        match source {
            LogSource::Agent => self.agent_logs.get_or_insert_with(Journal::new),
            LogSource::Provider => self.provider_logs.get_or_insert_with(Journal::new),
        }
    }
}

#[derive(Default)]
struct Inner {
    runs: HashMap<RunId, RunSlot>,
    /// Run ids, oldest first.
    order: Vec<RunId>,
    idempotency: HashMap<String, RunId>,
    tokens: HashMap<String, TokenRecord>,
    /// Heartbeat deadlines of replicas.
    replicas: HashMap<String, Instant>,
    listeners: HashMap<String, Vec<mpsc::UnboundedSender<Notice>>>,
    blobs: HashMap<String, Vec<u8>>,
    slots: HashMap<String, BTreeSet<RunId>>,
}

impl Inner {
    fn alive(&self, replica: &str) -> bool {
        self.replicas
            .get(replica)
            .is_some_and(|deadline| *deadline > Instant::now())
    }

    fn slot(&mut self, id: RunId) -> Result<&mut RunSlot, StoreError> {
        self.runs
            .get_mut(&id)
            .filter(|slot| slot.record.is_some())
            .ok_or(StoreError::RunNotFound { run_id: id })
    }

    fn notify(&mut self, replica: &str, notice: &Notice) {
        if let Some(listeners) = self.listeners.get_mut(replica) {
            listeners.retain(|tx| tx.send(notice.clone()).is_ok());
        }
    }
}

#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    fenced: Arc<AtomicU64>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data behind; keep serving it.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// History after `after`, then live entries until `is_end` says so (or the journal closes).
fn follow_journal<T: Indexed>(
    history: Vec<T>,
    live: Option<broadcast::Receiver<T>>,
    after: u64,
    refill: impl Fn(u64) -> Vec<T> + Send + Sync + 'static,
    is_end: impl Fn(&T) -> bool + Send + Sync + 'static,
) -> impl futures_util::Stream<Item = T> + Send {
    struct Follow<T, R, E> {
        rx: broadcast::Receiver<T>,
        last: u64,
        pending: VecDeque<T>,
        /// Stop once `pending` is drained.
        finishing: bool,
        refill: R,
        is_end: E,
    }
    let ended_in_history = history.iter().any(&is_end);
    let last = history.last().map_or(after, Indexed::index);
    let live_part = match live {
        Some(rx) if !ended_in_history => {
            let state = Follow {
                rx,
                last,
                pending: VecDeque::new(),
                finishing: false,
                refill,
                is_end,
            };
            stream::unfold(state, |mut st| async move {
                loop {
                    if let Some(entry) = st.pending.pop_front() {
                        if entry.index() <= st.last {
                            continue;
                        }
                        st.last = entry.index();
                        if (st.is_end)(&entry) {
                            st.finishing = true;
                            st.pending.clear();
                        }
                        return Some((entry, st));
                    }
                    if st.finishing {
                        return None;
                    }
                    match st.rx.recv().await {
                        Ok(entry) => st.pending.push_back(entry),
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            st.pending = (st.refill)(st.last).into();
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            st.pending = (st.refill)(st.last).into();
                            st.finishing = true;
                        }
                    }
                }
            })
            .boxed()
        }
        _ => stream::empty().boxed(),
    };
    stream::iter(history).chain(live_part)
}

#[async_trait]
impl RunStore for MemoryStore {
    async fn create_run(
        &self,
        record: &RunRecord,
        idempotency_key: Option<&str>,
    ) -> Result<CreateOutcome, StoreError> {
        let mut inner = self.lock();
        if let Some(key) = idempotency_key {
            if let Some(existing) = inner.idempotency.get(key).copied() {
                let existing = inner
                    .runs
                    .get(&existing)
                    .and_then(|slot| slot.record.clone())
                    .ok_or(StoreError::RunNotFound { run_id: existing })?;
                return Ok(CreateOutcome::Existing(Box::new(existing)));
            }
        }
        if let Some(existing) = inner.runs.get(&record.id).and_then(|s| s.record.clone()) {
            return Ok(CreateOutcome::Existing(Box::new(existing)));
        }
        if let Some(key) = idempotency_key {
            inner.idempotency.insert(key.to_string(), record.id);
        }
        inner.order.push(record.id);
        let slot = inner.runs.entry(record.id).or_default();
        slot.record = Some(record.clone());
        slot.created = Some(Instant::now());
        Ok(CreateOutcome::Created)
    }

    async fn put_run(&self, record: &RunRecord) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let slot = inner
            .runs
            .get_mut(&record.id)
            .ok_or(StoreError::RunNotFound { run_id: record.id })?;
        slot.record = Some(record.clone());
        Ok(())
    }

    async fn get_run(&self, id: RunId) -> Result<Option<RunRecord>, StoreError> {
        Ok(self.lock().runs.get(&id).and_then(|s| s.record.clone()))
    }

    async fn list_runs(
        &self,
        filter: &RunFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RunPage, StoreError> {
        let inner = self.lock();
        // The cursor is the position (in creation order) to continue below.
        let start = match cursor {
            None => inner.order.len(),
            Some(c) => c
                .parse::<usize>()
                .ok()
                .filter(|p| *p <= inner.order.len())
                .ok_or_else(|| StoreError::BadCursor {
                    cursor: c.to_string(),
                })?,
        };
        let mut runs = Vec::new();
        let mut pos = start;
        while pos > 0 && runs.len() < limit {
            pos -= 1;
            let record = inner
                .runs
                .get(&inner.order[pos])
                .and_then(|s| s.record.as_ref());
            if let Some(record) = record.filter(|r| filter.matches(r)) {
                runs.push(record.clone());
            }
        }
        let next_cursor = (pos > 0 && runs.len() == limit).then(|| pos.to_string());
        Ok(RunPage { runs, next_cursor })
    }

    async fn append_event(&self, id: RunId, kind: EventKind) -> Result<RunEvent, StoreError> {
        let mut inner = self.lock();
        let slot = inner
            .runs
            .get_mut(&id)
            .ok_or(StoreError::RunNotFound { run_id: id })?;
        let journal = slot.events();
        let event = RunEvent {
            index: journal.next_index(),
            at: Utc::now(),
            kind,
        };
        journal.push(event.clone());
        Ok(event)
    }

    async fn events(&self, id: RunId, after: u64, follow: bool) -> Result<EventStream, StoreError> {
        let (history, live) = {
            let mut inner = self.lock();
            let slot = inner
                .runs
                .get_mut(&id)
                .ok_or(StoreError::RunNotFound { run_id: id })?;
            let journal = slot.events();
            // A run that already ended has nothing to follow, whatever `after` skipped.
            let ended = journal.entries.last().is_some_and(|e| e.kind.is_final());
            let live = (follow && !ended).then(|| journal.live.subscribe());
            (journal.after(after), live)
        };
        let store = self.clone();
        let refill = move |after: u64| {
            let mut inner = store.lock();
            inner
                .runs
                .get_mut(&id)
                .map(|slot| slot.events().after(after))
                .unwrap_or_default()
        };
        let stream = follow_journal(history, live, after, refill, |e: &RunEvent| {
            e.kind.is_final()
        });
        Ok(stream.map(Ok).boxed())
    }

    async fn append_logs(
        &self,
        id: RunId,
        source: LogSource,
        lines: Vec<(String, String)>,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let slot = inner
            .runs
            .get_mut(&id)
            .ok_or(StoreError::RunNotFound { run_id: id })?;
        let journal = slot.logs(source);
        let at = Utc::now();
        for (stream, line) in lines {
            let entry = LogLine {
                index: journal.next_index(),
                at,
                stream,
                line,
            };
            journal.push(entry);
        }
        Ok(())
    }

    async fn logs(
        &self,
        id: RunId,
        source: LogSource,
        after: u64,
        follow: bool,
    ) -> Result<LogLineStream, StoreError> {
        let (history, live) = {
            let mut inner = self.lock();
            let slot = inner
                .runs
                .get_mut(&id)
                .ok_or(StoreError::RunNotFound { run_id: id })?;
            let journal = slot.logs(source);
            let live = (follow && !journal.closed).then(|| journal.live.subscribe());
            (journal.after(after), live)
        };
        let store = self.clone();
        let refill = move |after: u64| {
            let mut inner = store.lock();
            inner
                .runs
                .get_mut(&id)
                .map(|slot| slot.logs(source).after(after))
                .unwrap_or_default()
        };
        let stream = follow_journal(history, live, after, refill, |_: &LogLine| false);
        Ok(stream.map(Ok).boxed())
    }

    async fn close_logs(&self, id: RunId) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let slot = inner
            .runs
            .get_mut(&id)
            .ok_or(StoreError::RunNotFound { run_id: id })?;
        for source in [LogSource::Agent, LogSource::Provider] {
            let journal = slot.logs(source);
            journal.closed = true;
            // Dropping the sender ends live followers once they drain.
            journal.live = broadcast::channel(1).0;
        }
        Ok(())
    }

    async fn put_token(&self, token_hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.lock()
            .tokens
            .insert(token_hash.to_string(), record.clone());
        Ok(())
    }

    async fn get_token(&self, token_hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self.lock().tokens.get(token_hash).cloned())
    }

    async fn revoke_tokens(&self, id: RunId) -> Result<(), StoreError> {
        for record in self.lock().tokens.values_mut() {
            if record.run_id == id {
                record.revoked = true;
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn heartbeat(&self, replica: &str, ttl: Duration) -> Result<(), StoreError> {
        self.lock()
            .replicas
            .insert(replica.to_string(), Instant::now() + ttl);
        Ok(())
    }

    async fn live_replicas(&self) -> Result<Vec<String>, StoreError> {
        let inner = self.lock();
        let mut live: Vec<String> = inner
            .replicas
            .keys()
            .filter(|r| inner.alive(r))
            .cloned()
            .collect();
        live.sort();
        Ok(live)
    }

    async fn claim_run(
        &self,
        id: RunId,
        replica: &str,
        claim: Claim,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut inner = self.lock();
        let current = inner.slot(id)?.lease.clone();
        if let Some((owner, _)) = &current {
            if claim == Claim::IfOrphaned && inner.alive(owner) {
                return Ok(ClaimOutcome::Held {
                    owner: owner.clone(),
                });
            }
        }
        let fence = current.as_ref().map_or(0, |(_, f)| *f) + 1;
        inner.slot(id)?.lease = Some((replica.to_string(), fence));
        Ok(ClaimOutcome::Claimed {
            lease: Lease {
                run_id: id,
                replica: replica.to_string(),
                fence,
            },
            previous: current.map(|(owner, _)| owner),
        })
    }

    async fn lease(&self, id: RunId) -> Result<Option<Lease>, StoreError> {
        let mut inner = self.lock();
        Ok(inner.slot(id)?.lease.clone().map(|(replica, fence)| Lease {
            run_id: id,
            replica,
            fence,
        }))
    }

    async fn write_run(&self, lease: &Lease, write: RunWrite) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let slot = inner.slot(lease.run_id)?;
        let current = slot.lease.as_ref().map_or(0, |(_, f)| *f);
        if current != lease.fence {
            self.fenced.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Fenced {
                run_id: lease.run_id,
                fence: lease.fence,
                current,
            });
        }
        if write.batch > 0 {
            if slot.applied.0 == current && slot.applied.1 >= write.batch {
                return Ok(());
            }
            slot.applied = (current, write.batch);
        }
        let at = Utc::now();
        for kind in write.events {
            let journal = slot.events();
            let event = RunEvent {
                index: journal.next_index(),
                at,
                kind,
            };
            journal.push(event);
        }
        let logs = slot.logs(LogSource::Agent);
        for (stream, line) in write.agent_logs {
            let entry = LogLine {
                index: logs.next_index(),
                at,
                stream,
                line,
            };
            logs.push(entry);
        }
        if let Some(record) = write.record {
            slot.record = Some(record);
        }
        if let Some(seq) = write.seq {
            slot.last_seq = slot.last_seq.max(seq);
        }
        if let Some(scope) = write.release_slot {
            if let Some(held) = inner.slots.get_mut(&scope) {
                held.remove(&lease.run_id);
            }
        }
        Ok(())
    }

    async fn release_run(&self, lease: &Lease) -> Result<(), StoreError> {
        // Nothing counts runs per owner here: a single replica owns them all.
        self.lock().slot(lease.run_id)?;
        Ok(())
    }

    async fn last_seq(&self, id: RunId) -> Result<u64, StoreError> {
        Ok(self.lock().slot(id)?.last_seq)
    }

    async fn orphaned_runs(&self, unclaimed_after: Duration) -> Result<Vec<RunId>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .order
            .iter()
            .filter(|id| {
                inner.runs.get(id).is_some_and(|slot| {
                    slot.record.as_ref().is_some_and(|r| !r.state.is_terminal())
                        && match &slot.lease {
                            Some((owner, _)) => !inner.alive(owner),
                            None => slot
                                .created
                                .is_some_and(|at| at.elapsed() >= unclaimed_after),
                        }
                })
            })
            .copied()
            .collect())
    }

    async fn push_command(
        &self,
        id: RunId,
        command: &RunCommand,
    ) -> Result<Option<String>, StoreError> {
        let mut inner = self.lock();
        let slot = inner.slot(id)?;
        slot.commands.push_back(command.clone());
        let owner = slot.lease.as_ref().map(|(owner, _)| owner.clone());
        match owner {
            Some(owner) if inner.alive(&owner) => {
                inner.notify(&owner, &Notice::Commands { run_id: id });
                Ok(Some(owner))
            }
            _ => Ok(None),
        }
    }

    async fn take_commands(&self, id: RunId) -> Result<Vec<RunCommand>, StoreError> {
        Ok(self.lock().slot(id)?.commands.drain(..).collect())
    }

    async fn runs_with_commands(&self) -> Result<Vec<RunId>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .runs
            .iter()
            .filter(|(_, slot)| !slot.commands.is_empty())
            .map(|(id, _)| *id)
            .collect())
    }

    async fn notify(&self, replica: &str, notice: &Notice) -> Result<(), StoreError> {
        self.lock().notify(replica, notice);
        Ok(())
    }

    async fn notices(&self, replica: &str) -> Result<NoticeStream, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock()
            .listeners
            .entry(replica.to_string())
            .or_default()
            .push(tx);
        Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed())
    }

    async fn put_blob(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.lock().blobs.insert(key.to_string(), bytes.to_vec());
        Ok(())
    }

    async fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().blobs.get(key).cloned())
    }

    async fn acquire_slot(
        &self,
        scope: &str,
        limit: u32,
        id: RunId,
    ) -> Result<Admission, StoreError> {
        let mut inner = self.lock();
        let held = inner.slots.entry(scope.to_string()).or_default();
        if held.contains(&id) || held.len() < limit as usize {
            held.insert(id);
            Ok(Admission::Admitted)
        } else {
            Ok(Admission::Full {
                in_use: held.len() as u64,
            })
        }
    }

    async fn release_slot(&self, scope: &str, id: RunId) -> Result<(), StoreError> {
        if let Some(held) = self.lock().slots.get_mut(scope) {
            held.remove(&id);
        }
        Ok(())
    }

    fn fenced_writes(&self) -> u64 {
        self.fenced.load(Ordering::Relaxed)
    }
}
