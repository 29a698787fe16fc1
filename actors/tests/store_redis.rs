//! What only the Redis store has: outages (a Redis that dies fails calls fast as unavailable, and
//! the store recovers when it returns), cluster isolation.

mod common;

use std::time::{Duration, Instant};

use actors::model::EventKind;
use actors::store::redis::{RedisSettings, RedisStore};
use actors::store::{CreateOutcome, RunFilter, RunStore, StoreError};
use common::redis_server::{free_port, RedisServer};
use common::run;
use futures_util::StreamExt;

/// How fast an outage must show.
const FAIL_FAST: Duration = Duration::from_secs(2);

fn open(url: &str, cluster: &str) -> RedisStore {
    RedisStore::open(url, cluster, RedisSettings::default()).expect("redis url")
}

fn message(text: &str) -> EventKind {
    EventKind::AgentMessage { text: text.into() }
}

/// Runs `call`, which must fail as unavailable within `FAIL_FAST`; returns the message.
async fn unavailable<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> String {
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| panic!("{what} hung with redis down"));
    let elapsed = started.elapsed();
    assert!(elapsed < FAIL_FAST, "{what} took {elapsed:?} to fail");
    match result {
        Err(StoreError::Unavailable { message }) => message,
        other => panic!("{what}: expected unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_fails_fast_and_the_store_recovers() {
    let mut server = RedisServer::start();
    let store = open(&server.url(), "outage");
    let record = run();
    store.create_run(&record, None).await.unwrap();
    store
        .append_event(record.id, message("before"))
        .await
        .unwrap();

    server.kill();
    let msg = unavailable("get_run", store.get_run(record.id)).await;
    assert!(
        msg.contains(&format!("127.0.0.1:{}", server.port())),
        "names the server: {msg}"
    );
    unavailable(
        "append_event",
        store.append_event(record.id, message("during")),
    )
    .await;
    unavailable("ping", store.ping()).await;
    unavailable("create_run", store.create_run(&run(), Some("k"))).await;
    unavailable(
        "list_runs",
        store.list_runs(&RunFilter::default(), 10, None),
    )
    .await;

    // Back on the same port (empty: the test server keeps nothing).
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(err) = store.ping().await {
        assert!(Instant::now() < deadline, "store did not recover: {err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = run();
    assert_eq!(
        store.create_run(&again, None).await.unwrap(),
        CreateOutcome::Created
    );
    assert_eq!(
        store
            .append_event(again.id, message("after"))
            .await
            .unwrap()
            .index,
        1
    );
    assert_eq!(store.get_run(again.id).await.unwrap(), Some(again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_does_not_answer_times_out() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    let server = RedisServer::start();
    let settings = RedisSettings {
        response_timeout: Duration::from_millis(500),
        op_timeout: Duration::from_millis(800),
        ..RedisSettings::default()
    };
    let store = RedisStore::open(&server.url(), "frozen", settings).unwrap();
    store.ping().await.unwrap();
    let pid = Pid::from_raw(server.pid().expect("running") as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP redis-server");
    let msg = unavailable("get_run", store.get_run(uuid::Uuid::new_v4())).await;
    kill(pid, Signal::SIGCONT).expect("SIGCONT redis-server");
    assert!(
        msg.contains(&format!("127.0.0.1:{}", server.port())),
        "{msg}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(err) = store.ping().await {
        assert!(Instant::now() < deadline, "store did not recover: {err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_redis_that_never_came_up_is_unavailable_without_leaking_the_password() {
    let port = free_port();
    let store = open(&format!("redis://user:hunter2@127.0.0.1:{port}/0"), "never");
    let msg = unavailable("ping", store.ping()).await;
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
    unavailable("get_run", store.get_run(uuid::Uuid::new_v4())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_ends_with_an_error_when_redis_dies() {
    let mut server = RedisServer::start();
    let settings = RedisSettings {
        follow_block: Duration::from_millis(300),
        ..RedisSettings::default()
    };
    let store = RedisStore::open(&server.url(), "follow", settings).unwrap();
    let record = run();
    store.create_run(&record, None).await.unwrap();
    store.append_event(record.id, message("one")).await.unwrap();
    let mut events = store.events(record.id, 0, true).await.unwrap();
    assert_eq!(events.next().await.unwrap().unwrap().index, 1);
    let follower = tokio::spawn(async move {
        let mut items = Vec::new();
        while let Some(item) = events.next().await {
            items.push(item);
        }
        items
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.kill();
    let items = tokio::time::timeout(Duration::from_secs(10), follower)
        .await
        .expect("the follower ends when redis dies")
        .unwrap();
    assert!(
        matches!(items.last(), Some(Err(StoreError::Unavailable { .. }))),
        "{items:?}"
    );
}

#[tokio::test]
async fn clusters_sharing_a_redis_do_not_see_each_other() {
    let server = RedisServer::start();
    let blue = open(&server.url(), "blue");
    let green = open(&server.url(), "green");
    let record = run();
    blue.create_run(&record, Some("key")).await.unwrap();
    assert_eq!(green.get_run(record.id).await.unwrap(), None);
    assert!(green
        .list_runs(&RunFilter::default(), 10, None)
        .await
        .unwrap()
        .runs
        .is_empty());
    let other = run();
    assert_eq!(
        green.create_run(&other, Some("key")).await.unwrap(),
        CreateOutcome::Created
    );
}
