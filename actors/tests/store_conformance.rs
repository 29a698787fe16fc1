//! One suite, every `RunStore`: the in-memory store and the Redis store (against a real
//! `redis-server` started per test). Each test gets a `Harness` with the store and a `peer`: a
//! second handle on the same data (another replica for Redis, the same store in memory), so what
//! one replica writes the other must read and follow.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use actors::model::{EventKind, LogSource, RunEvent, RunState};
use actors::store::memory::MemoryStore;
use actors::store::redis::{RedisSettings, RedisStore};
use actors::store::{
    Admission, Claim, ClaimOutcome, CreateOutcome, Lease, Notice, RunCommand, RunFilter, RunStore,
    RunWrite, StoreError, TokenRecord,
};
use chrono::Utc;
use common::redis_server::RedisServer;
use common::{run, RunRecordExt};
use futures_util::{Stream, StreamExt};
use uuid::Uuid;

/// A stuck follower fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(20);

struct Harness {
    store: Arc<dyn RunStore>,
    peer: Arc<dyn RunStore>,
    _redis: Option<RedisServer>,
}

fn memory_harness() -> Harness {
    let store = Arc::new(MemoryStore::new());
    Harness {
        store: store.clone(),
        peer: store,
        _redis: None,
    }
}

fn redis_harness() -> Harness {
    let server = RedisServer::start();
    let open = || -> Arc<dyn RunStore> {
        let settings = RedisSettings {
            // Short, so a follower's blocking read comes round often in tests.
            follow_block: Duration::from_millis(500),
            ..RedisSettings::default()
        };
        Arc::new(RedisStore::open(&server.url(), "conformance", settings).expect("redis url"))
    };
    Harness {
        store: open(),
        peer: open(),
        _redis: Some(server),
    }
}

/// Every item of a stream that must end by itself.
async fn drain<T, S>(stream: S) -> Vec<T>
where
    S: Stream<Item = Result<T, StoreError>>,
{
    tokio::time::timeout(
        PATIENCE,
        stream.map(|item| item.expect("stream item")).collect(),
    )
    .await
    .expect("the stream did not end")
}

fn message(text: &str) -> EventKind {
    EventKind::AgentMessage { text: text.into() }
}

fn finished(to: RunState) -> EventKind {
    EventKind::StateChanged {
        from: RunState::Running,
        to,
        failure: None,
    }
}

fn indices(events: &[RunEvent]) -> Vec<u64> {
    events.iter().map(|e| e.index).collect()
}

mod suite {
    use super::*;

    pub async fn create_get_put(h: &Harness) {
        let record = run();
        assert_eq!(
            h.store.create_run(&record, None).await.unwrap(),
            CreateOutcome::Created
        );
        assert_eq!(
            h.peer.get_run(record.id).await.unwrap(),
            Some(record.clone())
        );
        // The same run again is the existing one.
        assert_eq!(
            h.peer.create_run(&record, None).await.unwrap(),
            CreateOutcome::Existing(Box::new(record.clone()))
        );

        let mut changed = record.clone().with_state(RunState::Running);
        changed.remote_host = Some("host-1".into());
        changed.state_times.insert(RunState::Running, Utc::now());
        changed.result = Some(serde_json::json!({"ok": true}));
        h.peer.put_run(&changed).await.unwrap();
        assert_eq!(h.store.get_run(record.id).await.unwrap(), Some(changed));

        let unknown = run();
        assert_eq!(h.store.get_run(unknown.id).await.unwrap(), None);
        assert_eq!(
            h.store.put_run(&unknown).await,
            Err(StoreError::RunNotFound { run_id: unknown.id })
        );
        assert_eq!(h.store.get_run(unknown.id).await.unwrap(), None);
        h.store.ping().await.unwrap();
    }

    pub async fn idempotency_key_returns_the_first_run(h: &Harness) {
        let first = run();
        assert_eq!(
            h.store.create_run(&first, Some("k1")).await.unwrap(),
            CreateOutcome::Created
        );
        let second = run();
        match h.peer.create_run(&second, Some("k1")).await.unwrap() {
            CreateOutcome::Existing(r) => assert_eq!(*r, first),
            other => panic!("expected the existing run, got {other:?}"),
        }
        assert!(h.store.get_run(second.id).await.unwrap().is_none());
        // Another key makes another run.
        assert_eq!(
            h.store.create_run(&second, Some("k2")).await.unwrap(),
            CreateOutcome::Created
        );
    }

    pub async fn concurrent_creates_with_one_key_make_one_run(h: &Harness) {
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let store = if i % 2 == 0 {
                    h.store.clone()
                } else {
                    h.peer.clone()
                };
                tokio::spawn(async move {
                    let record = run();
                    let outcome = store.create_run(&record, Some("same-key")).await.unwrap();
                    (record.id, outcome)
                })
            })
            .collect();
        let mut created = Vec::new();
        let mut existing = HashSet::new();
        for task in tasks {
            match task.await.unwrap() {
                (id, CreateOutcome::Created) => created.push(id),
                (_, CreateOutcome::Existing(r)) => {
                    existing.insert(r.id);
                }
            }
        }
        assert_eq!(created.len(), 1, "exactly one create wins: {created:?}");
        assert!(existing.iter().all(|id| *id == created[0]), "{existing:?}");
        let page = h
            .store
            .list_runs(&RunFilter::default(), 100, None)
            .await
            .unwrap();
        assert_eq!(page.runs.iter().map(|r| r.id).collect::<Vec<_>>(), created);
    }

    pub async fn list_pages_newest_first_with_filters(h: &Harness) {
        let base = Utc::now();
        let agents = ["alpha", "beta", "gamma"];
        let providers = ["local", "docker"];
        let states = [RunState::Pending, RunState::Running, RunState::Succeeded];
        let mut all = Vec::new();
        for i in 0..40i64 {
            // Runs 10..20 share one creation instant: ties must neither repeat nor vanish.
            let at =
                base + chrono::Duration::milliseconds(if (10..20).contains(&i) { 10 } else { i });
            let record = run()
                .with_agent(agents[i as usize % 3])
                .with_provider(providers[i as usize % 2])
                .with_state(states[i as usize % 3])
                .created(at);
            h.store.create_run(&record, None).await.unwrap();
            all.push(record);
        }
        let filters = [
            RunFilter::default(),
            RunFilter {
                agent: Some("beta".into()),
                ..Default::default()
            },
            RunFilter {
                provider: Some("docker".into()),
                ..Default::default()
            },
            RunFilter {
                state: Some(RunState::Succeeded),
                ..Default::default()
            },
            RunFilter {
                agent: Some("alpha".into()),
                provider: Some("local".into()),
                state: Some(RunState::Pending),
            },
            RunFilter {
                agent: Some("nobody".into()),
                ..Default::default()
            },
        ];
        for filter in &filters {
            let expected: HashSet<Uuid> = all
                .iter()
                .filter(|r| filter.matches(r))
                .map(|r| r.id)
                .collect();
            for limit in [1, 2, 3, 7, 16, 100] {
                let mut seen = Vec::new();
                let mut cursor: Option<String> = None;
                let mut pages = 0;
                loop {
                    let store = if pages % 2 == 0 { &h.store } else { &h.peer };
                    let page = store
                        .list_runs(filter, limit, cursor.as_deref())
                        .await
                        .unwrap();
                    pages += 1;
                    assert!(page.runs.len() <= limit);
                    assert!(page.runs.iter().all(|r| filter.matches(r)));
                    seen.extend(page.runs.iter().cloned());
                    match page.next_cursor {
                        Some(next) => {
                            assert_eq!(page.runs.len(), limit, "only a full page has a next");
                            cursor = Some(next);
                        }
                        None => break,
                    }
                    assert!(
                        pages <= 41,
                        "paging does not end ({filter:?}, limit {limit})"
                    );
                }
                let ids: Vec<Uuid> = seen.iter().map(|r| r.id).collect();
                let unique: HashSet<Uuid> = ids.iter().copied().collect();
                assert_eq!(
                    unique.len(),
                    ids.len(),
                    "a run repeated: {filter:?} {limit}"
                );
                assert_eq!(unique, expected, "runs missing: {filter:?} {limit}");
                assert!(
                    seen.windows(2).all(|w| w[0].created_at >= w[1].created_at),
                    "not newest first: {filter:?} {limit}"
                );
            }
        }
        // With distinct creation times the order is exact.
        let newest: Vec<Uuid> = all.iter().rev().take(5).map(|r| r.id).collect();
        let page = h
            .store
            .list_runs(&RunFilter::default(), 5, None)
            .await
            .unwrap();
        assert_eq!(page.runs.iter().map(|r| r.id).collect::<Vec<_>>(), newest);
        assert!(matches!(
            h.store
                .list_runs(&RunFilter::default(), 10, Some("zz"))
                .await,
            Err(StoreError::BadCursor { .. })
        ));
    }

    pub async fn events_replay_history_then_follow_until_final(h: &Harness) {
        let r = run();
        h.store.create_run(&r, None).await.unwrap();
        let first = h.store.append_event(r.id, message("one")).await.unwrap();
        assert_eq!(first.index, 1);
        assert_eq!(first.kind, message("one"));

        let mut follow = h.peer.events(r.id, 0, true).await.unwrap();
        let got = tokio::time::timeout(PATIENCE, follow.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, first);
        let follower = tokio::spawn(drain(follow));

        tokio::time::sleep(Duration::from_millis(50)).await;
        let two = h.store.append_event(r.id, message("two")).await.unwrap();
        let three = h
            .store
            .append_event(r.id, finished(RunState::Succeeded))
            .await
            .unwrap();
        assert_eq!((two.index, three.index), (2, 3));
        let rest = follower.await.unwrap();
        assert_eq!(rest, vec![two.clone(), three.clone()]);

        // After the end: history, then the end, with or without `after`.
        let all = drain(h.peer.events(r.id, 0, true).await.unwrap()).await;
        assert_eq!(all, vec![first, two, three]);
        let after_one = drain(h.store.events(r.id, 1, true).await.unwrap()).await;
        assert_eq!(indices(&after_one), vec![2, 3]);
        let after_all = drain(h.store.events(r.id, 3, true).await.unwrap()).await;
        assert!(after_all.is_empty());
        let history = drain(h.store.events(r.id, 2, false).await.unwrap()).await;
        assert_eq!(indices(&history), vec![3]);
    }

    pub async fn events_follow_from_an_empty_history(h: &Harness) {
        let r = run();
        h.store.create_run(&r, None).await.unwrap();
        assert!(drain(h.store.events(r.id, 0, false).await.unwrap())
            .await
            .is_empty());
        let follower = tokio::spawn(drain(h.peer.events(r.id, 0, true).await.unwrap()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..5 {
            h.store
                .append_event(r.id, message(&i.to_string()))
                .await
                .unwrap();
        }
        h.store
            .append_event(r.id, finished(RunState::Failed))
            .await
            .unwrap();
        let events = follower.await.unwrap();
        assert_eq!(indices(&events), vec![1, 2, 3, 4, 5, 6]);
        assert!(events.last().unwrap().kind.is_final());
    }

    pub async fn unknown_runs_are_not_found(h: &Harness) {
        let id = Uuid::new_v4();
        let not_found = Err(StoreError::RunNotFound { run_id: id });
        assert_eq!(h.store.append_event(id, message("x")).await, not_found);
        assert!(matches!(
            h.store.events(id, 0, true).await,
            Err(StoreError::RunNotFound { .. })
        ));
        assert_eq!(
            h.store
                .append_logs(id, LogSource::Agent, vec![("stdout".into(), "x".into())])
                .await,
            Err(StoreError::RunNotFound { run_id: id })
        );
        assert!(matches!(
            h.store.logs(id, LogSource::Agent, 0, false).await,
            Err(StoreError::RunNotFound { .. })
        ));
        assert_eq!(
            h.store.close_logs(id).await,
            Err(StoreError::RunNotFound { run_id: id })
        );
    }

    pub async fn concurrent_appends_keep_indices_dense(h: &Harness) {
        let r = run();
        h.store.create_run(&r, None).await.unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let store = if t % 2 == 0 {
                    h.store.clone()
                } else {
                    h.peer.clone()
                };
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    for i in 0..25 {
                        let event = store
                            .append_event(r.id, message(&format!("{t}/{i}")))
                            .await
                            .unwrap();
                        got.push(event.index);
                    }
                    got
                })
            })
            .collect();
        let mut returned = Vec::new();
        for task in tasks {
            let got = task.await.unwrap();
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "one writer's order kept"
            );
            returned.extend(got);
        }
        returned.sort_unstable();
        assert_eq!(returned, (1..=200).collect::<Vec<u64>>());
        let stored = drain(h.peer.events(r.id, 0, false).await.unwrap()).await;
        assert_eq!(indices(&stored), (1..=200).collect::<Vec<u64>>());
    }

    pub async fn logs_append_follow_and_close(h: &Harness) {
        let r = run();
        h.store.create_run(&r, None).await.unwrap();
        h.store
            .append_logs(
                r.id,
                LogSource::Agent,
                vec![("stdout".into(), "a".into()), ("stderr".into(), "b".into())],
            )
            .await
            .unwrap();
        h.store
            .append_logs(
                r.id,
                LogSource::Provider,
                vec![("stdout".into(), "p".into())],
            )
            .await
            .unwrap();
        let follower = tokio::spawn(drain(
            h.peer.logs(r.id, LogSource::Agent, 0, true).await.unwrap(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        h.store
            .append_logs(r.id, LogSource::Agent, vec![("stdout".into(), "c".into())])
            .await
            .unwrap();
        h.store
            .append_logs(r.id, LogSource::Agent, vec![])
            .await
            .unwrap();
        h.store.close_logs(r.id).await.unwrap();
        let lines = follower.await.unwrap();
        assert_eq!(
            lines
                .iter()
                .map(|l| (l.index, l.stream.as_str(), l.line.as_str()))
                .collect::<Vec<_>>(),
            vec![(1, "stdout", "a"), (2, "stderr", "b"), (3, "stdout", "c")]
        );

        // Closed: followers get the history and end, from any point.
        let again = drain(h.store.logs(r.id, LogSource::Agent, 1, true).await.unwrap()).await;
        assert_eq!(
            again.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
            vec!["b", "c"]
        );
        assert!(
            drain(h.store.logs(r.id, LogSource::Agent, 3, true).await.unwrap())
                .await
                .is_empty()
        );
        let provider = drain(
            h.peer
                .logs(r.id, LogSource::Provider, 0, true)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            provider
                .iter()
                .map(|l| (l.index, l.line.as_str()))
                .collect::<Vec<_>>(),
            vec![(1, "p")]
        );
        // Closing twice is harmless.
        h.store.close_logs(r.id).await.unwrap();
        let history = drain(
            h.store
                .logs(r.id, LogSource::Agent, 0, false)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(history.len(), 3);
        // A line after the close (a sandbox's last output) is kept, and followers still end.
        h.store
            .append_logs(
                r.id,
                LogSource::Provider,
                vec![("stdout".into(), "late".into())],
            )
            .await
            .unwrap();
        let late = drain(
            h.peer
                .logs(r.id, LogSource::Provider, 1, true)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            late.iter()
                .map(|l| (l.index, l.line.as_str()))
                .collect::<Vec<_>>(),
            vec![(2, "late")]
        );
        let none = drain(
            h.peer
                .logs(r.id, LogSource::Provider, 2, true)
                .await
                .unwrap(),
        )
        .await;
        assert!(none.is_empty());
    }

    pub async fn tokens_put_get_revoke(h: &Harness) {
        let run_a = Uuid::new_v4();
        let run_b = Uuid::new_v4();
        let expires_at = Utc::now() + chrono::Duration::minutes(10);
        let token = |run_id| TokenRecord {
            run_id,
            expires_at,
            revoked: false,
        };
        h.store.put_token("hash-a1", &token(run_a)).await.unwrap();
        h.store.put_token("hash-a2", &token(run_a)).await.unwrap();
        h.store.put_token("hash-b", &token(run_b)).await.unwrap();
        let got = h.peer.get_token("hash-a1").await.unwrap().unwrap();
        assert_eq!(got.run_id, run_a);
        assert!(!got.revoked);
        assert!((got.expires_at - expires_at).num_milliseconds().abs() < 1);
        assert_eq!(h.peer.get_token("nope").await.unwrap(), None);

        h.peer.revoke_tokens(run_a).await.unwrap();
        for hash in ["hash-a1", "hash-a2"] {
            let got = h.store.get_token(hash).await.unwrap().unwrap();
            assert!(got.revoked, "{hash}");
            assert!(matches!(
                actors::token::check(Some(&got), run_a, Utc::now()),
                Err(actors::token::TokenError::RunEnded { .. })
            ));
        }
        assert!(!h.store.get_token("hash-b").await.unwrap().unwrap().revoked);
        // Revoking a run without tokens is fine.
        h.store.revoke_tokens(Uuid::new_v4()).await.unwrap();
    }

    pub async fn expired_tokens_are_gone_or_expired(h: &Harness) {
        let run_id = Uuid::new_v4();
        let soon = TokenRecord {
            run_id,
            expires_at: Utc::now() + chrono::Duration::milliseconds(300),
            revoked: false,
        };
        let past = TokenRecord {
            run_id,
            expires_at: Utc::now() - chrono::Duration::seconds(1),
            revoked: false,
        };
        h.store.put_token("soon", &soon).await.unwrap();
        h.store.put_token("past", &past).await.unwrap();
        assert!(actors::token::check(
            h.store.get_token("soon").await.unwrap().as_ref(),
            run_id,
            Utc::now()
        )
        .is_ok());
        tokio::time::sleep(Duration::from_millis(400)).await;
        for hash in ["soon", "past"] {
            let got = h.peer.get_token(hash).await.unwrap();
            if let Some(record) = &got {
                assert!(record.expires_at <= Utc::now(), "{hash}");
            }
            assert!(
                actors::token::check(got.as_ref(), run_id, Utc::now()).is_err(),
                "{hash} must not be accepted"
            );
        }
        // Revoking after expiry does not bring a token back.
        h.store.revoke_tokens(run_id).await.unwrap();
        if let Some(record) = h.store.get_token("past").await.unwrap() {
            assert!(record.expires_at <= Utc::now());
        }
    }

    fn claimed(outcome: ClaimOutcome) -> Lease {
        match outcome {
            ClaimOutcome::Claimed { lease, .. } => lease,
            held => panic!("expected a claim, got {held:?}"),
        }
    }

    pub async fn claims_raise_the_fence_and_refuse_older_owners(h: &Harness) {
        let record = run();
        let id = record.id;
        h.store.create_run(&record, None).await.unwrap();
        assert_eq!(h.store.lease(id).await.unwrap(), None);
        h.store
            .heartbeat("a", Duration::from_secs(30))
            .await
            .unwrap();
        h.peer
            .heartbeat("b", Duration::from_secs(30))
            .await
            .unwrap();

        let outcome = h.store.claim_run(id, "a", Claim::IfOrphaned).await.unwrap();
        assert_eq!(
            outcome,
            ClaimOutcome::Claimed {
                lease: Lease {
                    run_id: id,
                    replica: "a".into(),
                    fence: 1
                },
                previous: None
            }
        );
        let a = claimed(outcome);
        assert_eq!(
            h.peer.claim_run(id, "b", Claim::IfOrphaned).await.unwrap(),
            ClaimOutcome::Held { owner: "a".into() },
            "a live owner keeps its run"
        );
        let outcome = h.peer.claim_run(id, "b", Claim::Takeover).await.unwrap();
        assert!(
            matches!(&outcome, ClaimOutcome::Claimed { previous: Some(p), lease } if p == "a" && lease.fence == 2),
            "{outcome:?}"
        );
        let b = claimed(outcome);
        assert_eq!(h.store.lease(id).await.unwrap(), Some(b.clone()));

        let before = h.store.fenced_writes();
        assert_eq!(
            h.store
                .acquire_slot("provider:fenced", 1, id)
                .await
                .unwrap(),
            Admission::Admitted
        );
        let stale = RunWrite {
            events: vec![message("from the stale owner")],
            record: Some(record.clone().with_state(RunState::Failed)),
            seq: Some(9),
            release_slot: Some("provider:fenced".into()),
            ..RunWrite::default()
        };
        assert_eq!(
            h.store.write_run(&a, stale).await,
            Err(StoreError::Fenced {
                run_id: id,
                fence: 1,
                current: 2
            })
        );
        assert_eq!(h.store.fenced_writes(), before + 1, "refusals are counted");
        let other = Uuid::new_v4();
        assert_eq!(
            h.store
                .acquire_slot("provider:fenced", 1, other)
                .await
                .unwrap(),
            Admission::Full { in_use: 1 },
            "a refused end does not give the run's slot back"
        );
        let fresh = RunWrite {
            events: vec![message("from the owner")],
            record: Some(record.clone().with_state(RunState::Running)),
            seq: Some(3),
            release_slot: Some("provider:fenced".into()),
            ..RunWrite::default()
        };
        h.peer.write_run(&b, fresh).await.unwrap();
        assert_eq!(
            h.store
                .acquire_slot("provider:fenced", 1, other)
                .await
                .unwrap(),
            Admission::Admitted,
            "the owner's write gave the slot back"
        );
        let stored = h.store.get_run(id).await.unwrap().unwrap();
        assert_eq!(
            stored.state,
            RunState::Running,
            "the stale write changed nothing"
        );
        let events = drain(h.store.events(id, 0, false).await.unwrap()).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, message("from the owner"));
        assert_eq!(h.store.last_seq(id).await.unwrap(), 3);

        let unknown = run();
        assert_eq!(
            h.store.claim_run(unknown.id, "a", Claim::Takeover).await,
            Err(StoreError::RunNotFound { run_id: unknown.id })
        );
    }

    pub async fn write_run_applies_events_logs_record_and_seq(h: &Harness) {
        let record = run();
        let id = record.id;
        h.store.create_run(&record, None).await.unwrap();
        let lease = claimed(h.store.claim_run(id, "a", Claim::Takeover).await.unwrap());
        let mut write = RunWrite {
            events: vec![message("one"), message("two")],
            agent_logs: vec![
                ("stdout".into(), "l1".into()),
                ("stderr".into(), "l2".into()),
            ],
            record: None,
            seq: Some(5),
            batch: 0,
            release_slot: None,
        };
        write.merge(RunWrite {
            events: vec![message("three")],
            agent_logs: vec![("stdout".into(), "l3".into())],
            record: Some(record.clone().with_state(RunState::Running)),
            seq: Some(4),
            batch: 0,
            release_slot: None,
        });
        assert_eq!(
            write.seq,
            Some(5),
            "merging keeps the highest sequence number"
        );
        h.store.write_run(&lease, write).await.unwrap();
        h.store
            .write_run(
                &lease,
                RunWrite {
                    seq: Some(2),
                    ..RunWrite::default()
                },
            )
            .await
            .unwrap();
        // A numbered write retried (its reply was lost) is applied once.
        let numbered = RunWrite {
            events: vec![message("four")],
            batch: 7,
            ..RunWrite::default()
        };
        h.store.write_run(&lease, numbered.clone()).await.unwrap();
        h.peer.write_run(&lease, numbered).await.unwrap();
        let events = drain(h.peer.events(id, 0, false).await.unwrap()).await;
        assert_eq!(indices(&events), vec![1, 2, 3, 4]);
        assert_eq!(events[2].kind, message("three"));
        h.store.close_logs(id).await.unwrap();
        let lines = drain(h.peer.logs(id, LogSource::Agent, 0, true).await.unwrap()).await;
        let text: Vec<_> = lines
            .iter()
            .map(|l| (l.index, l.stream.as_str(), l.line.as_str()))
            .collect();
        assert_eq!(
            text,
            vec![
                (1, "stdout", "l1"),
                (2, "stderr", "l2"),
                (3, "stdout", "l3")
            ]
        );
        assert_eq!(
            h.peer.get_run(id).await.unwrap().unwrap().state,
            RunState::Running
        );
        assert_eq!(
            h.peer.last_seq(id).await.unwrap(),
            5,
            "the sequence number never goes down"
        );
    }

    pub async fn runs_of_a_lapsed_replica_are_orphaned(h: &Harness) {
        let record = run();
        let id = record.id;
        h.store.create_run(&record, None).await.unwrap();
        h.store
            .heartbeat("a", Duration::from_millis(400))
            .await
            .unwrap();
        h.store
            .heartbeat("b", Duration::from_secs(30))
            .await
            .unwrap();
        claimed(h.store.claim_run(id, "a", Claim::IfOrphaned).await.unwrap());
        assert!(h
            .peer
            .orphaned_runs(Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            h.peer.live_replicas().await.unwrap(),
            vec!["a".to_string(), "b".to_string()]
        );
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(h.peer.live_replicas().await.unwrap(), vec!["b".to_string()]);
        assert_eq!(
            h.peer.orphaned_runs(Duration::from_secs(60)).await.unwrap(),
            vec![id]
        );
        let outcome = h.peer.claim_run(id, "b", Claim::IfOrphaned).await.unwrap();
        assert!(
            matches!(&outcome, ClaimOutcome::Claimed { previous: Some(p), lease } if p == "a" && lease.fence == 2),
            "{outcome:?}"
        );
        assert!(
            h.store
                .orphaned_runs(Duration::from_secs(60))
                .await
                .unwrap()
                .is_empty(),
            "adopted runs are not orphans"
        );
    }

    pub async fn runs_never_claimed_are_orphaned_after_a_while(h: &Harness) {
        let record = run();
        let id = record.id;
        h.store.create_run(&record, None).await.unwrap();
        let soon = Duration::from_millis(300);
        assert!(
            h.peer.orphaned_runs(soon).await.unwrap().is_empty(),
            "a run just created is its creator's to claim"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(h.peer.orphaned_runs(soon).await.unwrap(), vec![id]);
        assert!(
            h.peer
                .orphaned_runs(Duration::from_secs(60))
                .await
                .unwrap()
                .is_empty(),
            "not before the given time"
        );
        h.peer
            .heartbeat("b", Duration::from_secs(30))
            .await
            .unwrap();
        claimed(h.peer.claim_run(id, "b", Claim::IfOrphaned).await.unwrap());
        assert!(
            h.peer.orphaned_runs(soon).await.unwrap().is_empty(),
            "claimed runs are not orphans"
        );
    }

    pub async fn commands_queue_for_the_owner_and_notify_it(h: &Harness) {
        let record = run();
        let id = record.id;
        h.store.create_run(&record, None).await.unwrap();
        let stop = RunCommand::Stop { grace_s: Some(4) };
        let kill = RunCommand::Kill {
            reason: Some("enough".into()),
        };
        // Nobody owns it yet: queued, nobody notified.
        assert_eq!(h.store.push_command(id, &stop).await.unwrap(), None);
        h.store
            .heartbeat("a", Duration::from_secs(30))
            .await
            .unwrap();
        claimed(h.store.claim_run(id, "a", Claim::IfOrphaned).await.unwrap());
        let mut notices = h.store.notices("a").await.unwrap();
        // The subscription may take a moment; notify until the first notice arrives.
        let first = tokio::time::timeout(PATIENCE, async {
            loop {
                h.peer
                    .notify(
                        "a",
                        &Notice::Released {
                            run_id: id,
                            by: "b".into(),
                        },
                    )
                    .await
                    .unwrap();
                if let Ok(Some(n)) =
                    tokio::time::timeout(Duration::from_millis(200), notices.next()).await
                {
                    return n;
                }
            }
        })
        .await
        .expect("no notice arrived");
        assert_eq!(
            first,
            Notice::Released {
                run_id: id,
                by: "b".into()
            }
        );
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(300), notices.next()).await
        {}

        assert_eq!(
            h.peer.push_command(id, &kill).await.unwrap(),
            Some("a".into())
        );
        let notice = tokio::time::timeout(PATIENCE, notices.next())
            .await
            .expect("notice")
            .expect("stream");
        assert_eq!(notice, Notice::Commands { run_id: id });
        assert_eq!(h.store.runs_with_commands().await.unwrap(), vec![id]);
        assert_eq!(h.store.take_commands(id).await.unwrap(), vec![stop, kill]);
        assert!(h.store.take_commands(id).await.unwrap().is_empty());
        assert!(h.peer.runs_with_commands().await.unwrap().is_empty());
        let unknown = run();
        assert_eq!(
            h.store
                .push_command(unknown.id, &RunCommand::Kill { reason: None })
                .await,
            Err(StoreError::RunNotFound { run_id: unknown.id })
        );
    }

    pub async fn slots_admit_exactly_the_limit(h: &Harness) {
        let ids: Vec<_> = (0..30).map(|_| Uuid::new_v4()).collect();
        let attempts = ids.iter().enumerate().map(|(i, id)| {
            let store = if i % 2 == 0 {
                h.store.clone()
            } else {
                h.peer.clone()
            };
            let id = *id;
            tokio::spawn(async move {
                (
                    id,
                    store.acquire_slot("provider:local", 10, id).await.unwrap(),
                )
            })
        });
        let mut admitted = Vec::new();
        for attempt in attempts {
            let (id, admission) = attempt.await.unwrap();
            match admission {
                Admission::Admitted => admitted.push(id),
                Admission::Full { in_use } => assert_eq!(in_use, 10),
            }
        }
        assert_eq!(admitted.len(), 10, "exactly the limit is admitted");
        assert_eq!(
            h.store
                .acquire_slot("provider:local", 10, admitted[0])
                .await
                .unwrap(),
            Admission::Admitted,
            "a run keeps its slot"
        );
        let outsider = ids.iter().find(|id| !admitted.contains(id)).unwrap();
        h.peer
            .release_slot("provider:local", admitted[0])
            .await
            .unwrap();
        assert_eq!(
            h.store
                .acquire_slot("provider:local", 10, *outsider)
                .await
                .unwrap(),
            Admission::Admitted
        );
        assert_eq!(
            h.store
                .acquire_slot("provider:other", 1, admitted[0])
                .await
                .unwrap(),
            Admission::Admitted,
            "scopes are separate"
        );
    }

    pub async fn blobs_round_trip(h: &Harness) {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        h.store.put_blob("bundle:abc", &bytes).await.unwrap();
        assert_eq!(h.peer.get_blob("bundle:abc").await.unwrap(), Some(bytes));
        assert_eq!(h.peer.get_blob("bundle:none").await.unwrap(), None);
    }
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let harness = super::memory_harness();
                    super::suite::$test(&harness).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let harness = super::redis_harness();
                    super::suite::$test(&harness).await;
                }
            )*
        }
    };
}

conformance!(
    create_get_put,
    idempotency_key_returns_the_first_run,
    concurrent_creates_with_one_key_make_one_run,
    list_pages_newest_first_with_filters,
    events_replay_history_then_follow_until_final,
    events_follow_from_an_empty_history,
    unknown_runs_are_not_found,
    concurrent_appends_keep_indices_dense,
    logs_append_follow_and_close,
    tokens_put_get_revoke,
    expired_tokens_are_gone_or_expired,
    claims_raise_the_fence_and_refuse_older_owners,
    write_run_applies_events_logs_record_and_seq,
    runs_of_a_lapsed_replica_are_orphaned,
    runs_never_claimed_are_orphaned_after_a_while,
    commands_queue_for_the_owner_and_notify_it,
    slots_admit_exactly_the_limit,
    blobs_round_trip,
);
