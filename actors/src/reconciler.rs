//! `Reconciler`: brings sandboxes and run records back in line, whatever the provider (SPEC §5).
//!
//! At start-up and then periodically it lists, for every provider, the sandboxes labelled with
//! this cluster's id, and
//! - removes those whose run is unknown to the store or already terminal (left behind by a
//!   control plane that stopped, or by a removal that failed);
//! - fails with `sandbox_vanished` the live runs whose sandbox is gone and that no replica
//!   drives: no run actor here, and no live replica holding the run's lease (a run actor notices
//!   a vanished sandbox itself, through the provider's `wait`). The run is claimed first, so the
//!   failure is written under a fresh lease and cannot race an adopting replica.
//!
//! The decisions are plain functions ([`verdict`], [`vanished`]); the actor only does the I/O and
//! keeps counters of what it did.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::Utc;
use opentelemetry::KeyValue;
use serde::Serialize;

use crate::metrics::{attr, Metrics};
use crate::model::{Failure, FailureKind, RunId, RunRecord, RunState, Termination};
use crate::provider::{labels, SandboxInfo};
use crate::router::{KillSandbox, ListProviders, ListSandboxes, ProviderRouter};
use crate::run::actor::{final_write, wind_up};
use crate::run::{RunRegistry, DEFAULT_EVIDENCE_LINES};
use crate::store::{Claim, ClaimOutcome, Lease, RunFilter, RunStore, StoreError};

/// What to do with one labelled sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Remove { reason: String },
}

/// A sandbox is kept while its run is live; removed when the run is terminal or unknown.
pub fn verdict(run_label: Option<&str>, record: Option<&RunRecord>) -> Verdict {
    match (run_label, record) {
        (None, _) => Verdict::Remove {
            reason: "sandbox has no run id label".into(),
        },
        (Some(id), None) => Verdict::Remove {
            reason: format!("run {id} is unknown"),
        },
        (Some(_), Some(r)) if r.state.is_terminal() => Verdict::Remove {
            reason: format!("run {} is {}", r.id, r.state),
        },
        (Some(_), Some(_)) => Verdict::Keep,
    }
}

/// Whether a live run lost its sandbox: it has one on record, the provider no longer lists it,
/// and no run actor of this replica watches it.
pub fn vanished(record: &RunRecord, listed: &HashSet<String>, has_actor: bool) -> bool {
    !has_actor
        && !record.state.is_terminal()
        && record
            .sandbox_id
            .as_ref()
            .is_some_and(|id| !listed.contains(id))
}

/// What the reconciler has done since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcilerCounters {
    pub passes: u64,
    pub sandboxes_removed: u64,
    pub runs_failed: u64,
    pub errors: u64,
}

pub struct Reconciler {
    router: Addr<ProviderRouter>,
    store: Arc<dyn RunStore>,
    registry: RunRegistry,
    cluster_id: String,
    /// This replica's name, under which abandoned runs are claimed.
    replica_id: String,
    interval: Duration,
    counters: ReconcilerCounters,
    busy: bool,
    metrics: Arc<Metrics>,
}

impl Reconciler {
    pub fn new(
        router: Addr<ProviderRouter>,
        store: Arc<dyn RunStore>,
        registry: RunRegistry,
        cluster_id: String,
        replica_id: String,
        interval: Duration,
    ) -> Self {
        Reconciler {
            router,
            store,
            registry,
            cluster_id,
            replica_id,
            interval,
            counters: ReconcilerCounters::default(),
            busy: false,
            metrics: Metrics::noop(),
        }
    }

    /// Counts what the reconciler does in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    fn start_pass(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let pass = reconcile(
            self.router.clone(),
            self.store.clone(),
            self.registry.clone(),
            self.cluster_id.clone(),
            self.replica_id.clone(),
        );
        ctx.spawn(pass.into_actor(self).map(|done, act, _| {
            act.busy = false;
            act.counters.passes += 1;
            act.counters.sandboxes_removed += done.sandboxes_removed;
            act.counters.runs_failed += done.runs_failed;
            act.counters.errors += done.errors;
            let actions = &act.metrics.reconciler_actions;
            for (action, n) in [
                ("pass", 1),
                ("sandbox_removed", done.sandboxes_removed),
                ("run_failed", done.runs_failed),
                ("error", done.errors),
            ] {
                if n > 0 {
                    actions.add(n, &[KeyValue::new(attr::RECONCILER_ACTION, action)]);
                }
            }
        }));
    }
}

impl Actor for Reconciler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.start_pass(ctx);
        ctx.run_interval(self.interval, |act, ctx| act.start_pass(ctx));
    }
}

/// The counters so far.
#[derive(Message)]
#[rtype(result = "ReconcilerCounters")]
pub struct GetCounters;

impl Handler<GetCounters> for Reconciler {
    type Result = MessageResult<GetCounters>;
    fn handle(&mut self, _: GetCounters, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.counters.clone())
    }
}

/// Runs a pass now (unless one is running).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReconcileNow;

impl Handler<ReconcileNow> for Reconciler {
    type Result = ();
    fn handle(&mut self, _: ReconcileNow, ctx: &mut Context<Self>) {
        self.start_pass(ctx);
    }
}

/// What one pass did.
#[derive(Debug, Default)]
struct PassOutcome {
    sandboxes_removed: u64,
    runs_failed: u64,
    errors: u64,
}

async fn reconcile(
    router: Addr<ProviderRouter>,
    store: Arc<dyn RunStore>,
    registry: RunRegistry,
    cluster_id: String,
    replica_id: String,
) -> PassOutcome {
    let mut out = PassOutcome::default();
    let providers = match router.send(ListProviders).await {
        Ok(providers) => providers,
        Err(err) => {
            tracing::warn!(error = %err, "reconciler: provider router unavailable");
            out.errors += 1;
            return out;
        }
    };
    let selector = BTreeMap::from([(labels::CLUSTER.to_string(), cluster_id)]);
    for provider in providers {
        let name = provider.name;
        let listed = router
            .send(ListSandboxes {
                provider: name.clone(),
                labels: selector.clone(),
            })
            .await;
        let sandboxes: Vec<SandboxInfo> = match listed {
            Ok(Ok(sandboxes)) => sandboxes,
            Ok(Err(err)) => {
                tracing::debug!(provider = %name, error = %err, "reconciler: cannot list sandboxes");
                out.errors += 1;
                continue;
            }
            Err(err) => {
                tracing::warn!(provider = %name, error = %err, "reconciler: provider router unavailable");
                out.errors += 1;
                continue;
            }
        };
        let mut seen = HashSet::new();
        for sandbox in sandboxes {
            seen.insert(sandbox.handle.id.clone());
            let label = sandbox.labels.get(labels::RUN_ID).map(String::as_str);
            let run_id = label.and_then(|l| l.parse::<RunId>().ok());
            let record = match run_id {
                Some(id) => match store.get_run(id).await {
                    Ok(record) => record,
                    Err(err) => {
                        tracing::warn!(run_id = %id, error = %err, "reconciler: store unavailable");
                        out.errors += 1;
                        continue;
                    }
                },
                None => None,
            };
            let label = if run_id.is_some() { label } else { None };
            if let Verdict::Remove { reason } = verdict(label, record.as_ref()) {
                let kill = KillSandbox {
                    provider: name.clone(),
                    run_id: run_id.unwrap_or_default(),
                    sandbox: sandbox.handle.clone(),
                };
                match router.send(kill).await {
                    Ok(Ok(())) => {
                        tracing::info!(provider = %name, sandbox = %sandbox.handle.id, reason, "reconciler removed a sandbox");
                        out.sandboxes_removed += 1;
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(provider = %name, sandbox = %sandbox.handle.id, error = %err, "reconciler could not remove a sandbox");
                        out.errors += 1;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "reconciler: provider router unavailable");
                        out.errors += 1;
                    }
                }
            }
        }
        for state in [RunState::Starting, RunState::Running, RunState::Stopping] {
            let live = match live_runs(&*store, &name, state).await {
                Ok(runs) => runs,
                Err(err) => {
                    tracing::warn!(provider = %name, error = %err, "reconciler: cannot list runs");
                    out.errors += 1;
                    continue;
                }
            };
            for record in live {
                if !vanished(&record, &seen, registry.get(record.id).is_some()) {
                    continue;
                }
                let lease = match claim_abandoned(&*store, record.id, &replica_id).await {
                    Ok(Some(lease)) => lease,
                    Ok(None) => continue,
                    Err(err) => {
                        tracing::warn!(run_id = %record.id, error = %err, "reconciler: cannot claim a run");
                        out.errors += 1;
                        continue;
                    }
                };
                match fail_vanished(&*store, record, &lease).await {
                    Ok(id) => {
                        tracing::warn!(run_id = %id, provider = %name, "reconciler failed a run whose sandbox vanished");
                        out.runs_failed += 1;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "reconciler could not fail a run");
                        out.errors += 1;
                    }
                }
            }
        }
    }
    out
}

/// The run's lease when no other live replica drives it: claimed if orphaned, or taken over
/// from this replica itself (its run actor is gone). `None` when another replica holds it.
async fn claim_abandoned(
    store: &dyn RunStore,
    id: RunId,
    replica: &str,
) -> Result<Option<Lease>, StoreError> {
    match store.claim_run(id, replica, Claim::IfOrphaned).await? {
        ClaimOutcome::Claimed { lease, .. } => Ok(Some(lease)),
        ClaimOutcome::Held { owner } if owner == replica => {
            match store.claim_run(id, replica, Claim::Takeover).await? {
                ClaimOutcome::Claimed { lease, .. } => Ok(Some(lease)),
                ClaimOutcome::Held { .. } => Ok(None),
            }
        }
        ClaimOutcome::Held { .. } => Ok(None),
    }
}

async fn live_runs(
    store: &dyn RunStore,
    provider: &str,
    state: RunState,
) -> Result<Vec<RunRecord>, crate::store::StoreError> {
    let filter = RunFilter {
        state: Some(state),
        agent: None,
        provider: Some(provider.to_string()),
    };
    let mut runs = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store.list_runs(&filter, 500, cursor.as_deref()).await?;
        runs.extend(page.runs);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(runs),
        }
    }
}

/// Marks a run failed with `sandbox_vanished` and closes its history.
async fn fail_vanished(
    store: &dyn RunStore,
    mut record: RunRecord,
    lease: &Lease,
) -> Result<RunId, StoreError> {
    let id = record.id;
    let from = record.state;
    let failure = Failure::new(
        FailureKind::SandboxVanished,
        format!(
            "sandbox {} is gone and no control plane is watching the run",
            record.sandbox_id.as_deref().unwrap_or("?")
        ),
    );
    record.state = RunState::Failed;
    record.state_times.insert(RunState::Failed, Utc::now());
    record.failure = Some(failure);
    record.termination = Some(Termination::Failed);
    record.owner = lease.replica.clone();
    let last = final_write(store, from, &mut record, DEFAULT_EVIDENCE_LINES).await;
    store.write_run(lease, last).await?;
    if let Some((_, err)) = wind_up(store, lease).await.into_iter().next() {
        return Err(err);
    }
    tracing::debug!(run_id = %id, provider = %record.provider, "run failed as vanished");
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: RunState, sandbox: Option<&str>) -> RunRecord {
        let mut r: RunRecord = serde_json::from_value(serde_json::json!({
            "id": uuid::Uuid::new_v4(),
            "agent": "a", "task": "t", "provider": "docker", "state": "running",
            "remote_host": null, "sandbox_id": null,
            "created_at": Utc::now(), "state_times": {}, "exit_code": null, "failure": null,
            "termination": null, "resources": {}, "usage": {}, "cost_estimate": null,
            "trace_id": "0", "owner": "r", "timeout_s": null, "result": null, "evidence": null
        }))
        .expect("record");
        r.state = state;
        r.sandbox_id = sandbox.map(str::to_string);
        r
    }

    #[test]
    fn sandboxes_of_unknown_or_terminal_runs_are_removed() {
        assert!(matches!(verdict(None, None), Verdict::Remove { .. }));
        assert!(matches!(verdict(Some("x"), None), Verdict::Remove { .. }));
        let done = record(RunState::Succeeded, Some("c1"));
        assert!(matches!(
            verdict(Some("x"), Some(&done)),
            Verdict::Remove { .. }
        ));
        let live = record(RunState::Running, Some("c1"));
        assert_eq!(verdict(Some("x"), Some(&live)), Verdict::Keep);
    }

    #[test]
    fn a_live_run_without_its_sandbox_or_actor_vanished() {
        let listed: HashSet<String> = ["c1".to_string()].into();
        let present = record(RunState::Running, Some("c1"));
        let gone = record(RunState::Running, Some("c2"));
        let no_sandbox_yet = record(RunState::Starting, None);
        assert!(!vanished(&present, &listed, false));
        assert!(vanished(&gone, &listed, false));
        assert!(!vanished(&gone, &listed, true), "its actor watches it");
        assert!(!vanished(&no_sandbox_yet, &listed, false));
        assert!(!vanished(
            &record(RunState::Failed, Some("c2")),
            &listed,
            false
        ));
    }
}
