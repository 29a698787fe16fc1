//! Taking a run over from another replica: when its shim connects here, when a command for it
//! finds no live owner, or when its owner's heartbeat lapsed. The run's actor is rebuilt from
//! the stored record, spec, sandbox handle, last stored sequence number and history.

use std::collections::{HashMap, HashSet};

use actix::Addr;
use futures_util::StreamExt;

use super::actor::{sandbox_blob_key, Adoption, RunActor, RunDeps, RunSpec, StoredSpec};
use crate::model::{EventKind, RunId};
use crate::provider::SandboxHandle;
use crate::store::{Claim, ClaimOutcome, Notice, StoreError};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdoptError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("run {run_id} is driven by replica {owner}")]
    Held { run_id: RunId, owner: String },
    #[error("run {run_id} cannot be adopted: {message}")]
    Incomplete { run_id: RunId, message: String },
}

/// The run's actor on this replica: the one it has, or a new one after claiming the run
/// (`claim` says whether a live owner is displaced). `None` when the run has ended.
pub async fn adopt(
    id: RunId,
    deps: &RunDeps,
    claim: Claim,
) -> Result<Option<Addr<RunActor>>, AdoptError> {
    let _turn = deps.registry.adoption_turn(id).await;
    if let Some(addr) = deps.registry.get(id) {
        return Ok(Some(addr));
    }
    let store = &*deps.store;
    match store.get_run(id).await? {
        None => return Err(StoreError::RunNotFound { run_id: id }.into()),
        Some(record) if record.state.is_terminal() => return Ok(None),
        Some(_) => {}
    }
    let replica = &deps.settings.replica_id;
    let (lease, previous) = match store.claim_run(id, replica, claim).await? {
        ClaimOutcome::Claimed { lease, previous } => (lease, previous),
        ClaimOutcome::Held { owner } => return Err(AdoptError::Held { run_id: id, owner }),
    };
    if let Some(previous) = previous.as_ref().filter(|p| *p != replica) {
        let notice = Notice::Released {
            run_id: id,
            by: replica.clone(),
        };
        // Its writes are refused from now on anyway; the notice only makes it step down sooner.
        if let Err(err) = store.notify(previous, &notice).await {
            tracing::warn!(run_id = %id, previous, error = %err, "could not tell the previous owner");
        }
    }
    // Read after the claim: the previous owner can no longer change it.
    let mut record = store
        .get_run(id)
        .await?
        .ok_or(StoreError::RunNotFound { run_id: id })?;
    if record.state.is_terminal() {
        if let Err(err) = store.release_run(&lease).await {
            tracing::warn!(run_id = %id, error = %err, "could not release an ended run");
        }
        return Ok(None);
    }
    let incomplete = |message: String| AdoptError::Incomplete {
        run_id: id,
        message,
    };
    let spec: StoredSpec = match store.get_blob(&StoredSpec::blob_key(id)).await? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map_err(|err| incomplete(format!("its stored spec is unreadable: {err}")))?,
        None => return Err(incomplete("no spec was stored for it".into())),
    };
    let sandbox = match store.get_blob(&sandbox_blob_key(id)).await? {
        Some(bytes) => Some(
            serde_json::from_slice::<SandboxHandle>(&bytes)
                .map_err(|err| incomplete(format!("its sandbox handle is unreadable: {err}")))?,
        ),
        None => match (&record.sandbox_id, &record.remote_host) {
            (Some(id), Some(host)) => Some(SandboxHandle {
                id: id.clone(),
                remote_host: host.clone(),
            }),
            _ => None,
        },
    };
    // The previous owner may have stored the sandbox's handle but not yet the record naming it
    // (a shim that calls back here first, right after its spawn).
    if let (None, Some(handle)) = (&record.sandbox_id, &sandbox) {
        record.sandbox_id = Some(handle.id.clone());
        record.remote_host = Some(handle.remote_host.clone());
    }
    let last_seq = store.last_seq(id).await?;
    let mut seen_calls = HashMap::new();
    let mut recorded_results = HashSet::new();
    let mut sandbox_recorded = false;
    let mut history = store.events(id, 0, false).await?;
    while let Some(event) = history.next().await {
        match event?.kind {
            EventKind::ToolCall { call_id, tool } => {
                seen_calls.insert(call_id, tool);
            }
            EventKind::ToolResult { call_id, .. } => {
                recorded_results.insert(call_id);
            }
            EventKind::SandboxCreated { .. } => sandbox_recorded = true,
            _ => {}
        }
    }
    record.owner = replica.clone();
    let span = (deps.adopt_span)(&record, &spec.traceparent);
    tracing::info!(run_id = %id, trace_id = %record.trace_id, state = %record.state, previous = ?previous, fence = lease.fence, last_seq, "adopting run");
    let addr = RunActor::resume(
        RunSpec {
            record,
            image: spec.image,
            bundle: spec.bundle,
            env: spec.env,
            traceparent: spec.traceparent,
            span,
        },
        lease,
        deps.clone(),
        Adoption {
            sandbox,
            last_seq,
            seen_calls,
            recorded_results,
            sandbox_recorded,
        },
    );
    Ok(Some(addr))
}
