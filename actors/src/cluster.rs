//! `ReplicaKeeper`: this replica's part in a cluster. It heartbeats in the store (the lease
//! under which it owns runs), adopts the runs of replicas whose heartbeat lapsed, and turns
//! notices from other replicas into messages to its run actors: queued commands (stop, kill
//! issued on another replica) and runs taken over elsewhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::run::messages::{CheckCommands, Superseded};
use crate::run::{adopt, AdoptError, RunDeps};
use crate::store::{Claim, Notice};

/// What the keeper did, for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Runs this replica took over from replicas whose heartbeat lapsed.
    pub adopted_orphans: AtomicU64,
    /// Heartbeats the store did not take.
    pub heartbeat_failures: AtomicU64,
    /// Commands carried to local run actors by notice or sweep.
    pub commands_routed: AtomicU64,
    /// Runs given up because another replica took them over.
    pub released: AtomicU64,
}

/// A run no replica claimed this long after its creation was abandoned by its creator (which
/// stopped, or lost the store, between creating and claiming it): any replica adopts it.
pub const UNCLAIMED_AFTER: Duration = Duration::from_secs(10);

pub struct ReplicaKeeper {
    deps: RunDeps,
    /// How long a heartbeat keeps this replica's runs its own.
    lease: Duration,
    stats: Arc<ClusterStats>,
    sweeping: bool,
    /// Since when this replica's heartbeats have been stored without a failure. Orphans are
    /// adopted only after a whole lease of that: when the store was away, every replica's
    /// heartbeat lapsed, and the live ones need a lease to renew theirs before any run counts as
    /// orphaned.
    healthy_since: Arc<Mutex<Option<Instant>>>,
}

impl ReplicaKeeper {
    pub fn new(deps: RunDeps, lease: Duration, stats: Arc<ClusterStats>) -> Self {
        ReplicaKeeper {
            deps,
            lease,
            stats,
            sweeping: false,
            healthy_since: Arc::new(Mutex::new(None)),
        }
    }

    fn replica(&self) -> &str {
        &self.deps.settings.replica_id
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        let store = self.deps.store.clone();
        let replica = self.replica().to_string();
        let lease = self.lease;
        let stats = self.stats.clone();
        let healthy_since = self.healthy_since.clone();
        ctx.spawn(
            async move {
                let result = store.heartbeat(&replica, lease).await;
                {
                    let mut since = healthy_since.lock().unwrap_or_else(|p| p.into_inner());
                    match (&result, *since) {
                        (Ok(()), None) => *since = Some(Instant::now()),
                        (Err(_), _) => *since = None,
                        (Ok(()), Some(_)) => {}
                    }
                }
                if let Err(err) = result {
                    let failures = stats.heartbeat_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(replica, error = %err, "heartbeat not stored; other replicas may adopt this replica's runs");
                    }
                }
            }
            .into_actor(self),
        );
    }

    /// Adopts orphaned runs and delivers queued commands the notices may have missed.
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.sweeping {
            return;
        }
        let settled = self
            .healthy_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|since| since.elapsed() >= self.lease);
        if !settled {
            return;
        }
        self.sweeping = true;
        let deps = self.deps.clone();
        let stats = self.stats.clone();
        let work = async move {
            let store = &deps.store;
            match store.live_replicas().await {
                Ok(live) => deps.metrics.replicas_live.record(live.len() as u64, &[]),
                Err(err) => tracing::debug!(error = %err, "could not list live replicas"),
            }
            match store.orphaned_runs(UNCLAIMED_AFTER).await {
                Ok(orphans) => {
                    for id in orphans {
                        if deps.registry.get(id).is_some() {
                            continue;
                        }
                        match adopt(id, &deps, Claim::IfOrphaned).await {
                            Ok(Some(_)) => {
                                stats.adopted_orphans.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(None) | Err(AdoptError::Held { .. }) => {}
                            Err(err) => {
                                tracing::warn!(run_id = %id, error = %err, "could not adopt an orphaned run")
                            }
                        }
                    }
                }
                Err(err) => tracing::debug!(error = %err, "could not look for orphaned runs"),
            }
            match store.runs_with_commands().await {
                Ok(ids) => {
                    for id in ids {
                        let run = match deps.registry.get(id) {
                            Some(run) => Some(run),
                            // Nobody alive drives it: take it, and its commands with it.
                            None => match adopt(id, &deps, Claim::IfOrphaned).await {
                                Ok(run) => run,
                                Err(AdoptError::Held { .. }) => None,
                                Err(err) => {
                                    tracing::warn!(run_id = %id, error = %err, "could not adopt a run with queued commands");
                                    None
                                }
                            },
                        };
                        if let Some(run) = run {
                            stats.commands_routed.fetch_add(1, Ordering::Relaxed);
                            run.do_send(CheckCommands);
                        }
                    }
                }
                Err(err) => tracing::debug!(error = %err, "could not look for queued commands"),
            }
        };
        ctx.spawn(work.into_actor(self).map(|(), act, _| act.sweeping = false));
    }
}

impl Actor for ReplicaKeeper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.heartbeat(ctx);
        ctx.run_interval(self.lease / 3, |act, ctx| act.heartbeat(ctx));
        ctx.run_interval(self.lease / 2, |act, ctx| act.sweep(ctx));
        let store = self.deps.store.clone();
        let replica = self.replica().to_string();
        ctx.spawn(
            async move { store.notices(&replica).await }
                .into_actor(self)
                .map(|res, _, ctx| match res {
                    Ok(notices) => {
                        ctx.add_stream(notices);
                    }
                    Err(err) => tracing::error!(error = %err, "cannot listen for notices; commands from other replicas arrive by sweep only"),
                }),
        );
    }
}

impl StreamHandler<Notice> for ReplicaKeeper {
    fn handle(&mut self, notice: Notice, _: &mut Context<Self>) {
        match notice {
            Notice::Commands { run_id } => {
                if let Some(run) = self.deps.registry.get(run_id) {
                    self.stats.commands_routed.fetch_add(1, Ordering::Relaxed);
                    run.do_send(CheckCommands);
                }
            }
            Notice::Released { run_id, by } => {
                if let Some(run) = self.deps.registry.get(run_id) {
                    self.stats.released.fetch_add(1, Ordering::Relaxed);
                    run.do_send(Superseded { by: Some(by) });
                }
            }
        }
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        tracing::error!("notice stream ended; commands from other replicas arrive by sweep only");
    }
}
