//! Run store shared by the replicas of a cluster, kept in Redis (6.2 or later).
//!
//! # Key layout
//!
//! Every key starts with `codebolt:{<cluster_id>}:`; the braces make the cluster id a Redis
//! Cluster hash tag, so all keys of one cluster live in one slot and the Lua scripts below may
//! touch several of them.
//!
//! | key | type | content |
//! |---|---|---|
//! | `run:<id>` | string | the run record as JSON |
//! | `runs` | sorted set | run ids, score = creation time in ms; equal scores order by id |
//! | `idem:<key>` | string | the run id an idempotency key created |
//! | `events:<id>` | stream | the run's events; entry id `<index>-0`, fields `at` (unix ns), `kind` (JSON) |
//! | `logs:<id>:agent`, `logs:<id>:provider` | stream | log lines, entry id `<index>-0`, fields `at`, `stream`, `line`; a `closed` marker entry `<n>-<k>` (k ≥ 1) once the logs are closed |
//! | `logs_closed:<id>` | string | set when the run's logs are closed |
//! | `token:<sha256>` | string | the token record as JSON, expiring (PXAT) when the token does |
//! | `tokens:<run id>` | set | hashes of the run's tokens, so revocation finds them; expires with the last token |
//! | `lease:<id>` | hash | `replica` owning the run, `fence` (raised by every claim) |
//! | `seq:<id>` | string | the highest shim sequence number stored |
//! | `applied:<id>` | hash | `fence` and `batch` of the last numbered write applied (retries are not applied twice) |
//! | `replica:<name>` | string | present while the replica's heartbeat is current (PX expiry) |
//! | `replicas` | set | replicas that own or owned runs |
//! | `owned:<name>` | set | live runs a replica owns |
//! | `unclaimed` | sorted set | runs created but never claimed, score = creation time in ms |
//! | `cmds:<id>` | list | commands (stop, kill) for the run's owner, as JSON |
//! | `cmdq` | set | runs with queued commands |
//! | `slots:<scope>` | set | runs holding a slot of a concurrency limit |
//! | `blob:<key>` | string | bytes every replica reads: agent bundles, run specs |
//!
//! Channel `notices:<replica>` carries [`Notice`]s (JSON) to one replica.
//!
//! A run actor's writes go through `write_run`: one script call that first compares the run's
//! fence with the writer's, then appends events and agent log lines, replaces the record and
//! raises `seq:<id>`. A tool call therefore costs two store calls (the `tool_call` event with
//! its sequence number, then the `tool_result` event), fewer when writes queue up and are merged.
//!
//! Creating a run (record, order index and idempotency key), appending events or log lines and
//! closing logs are Lua scripts, so they are atomic across replicas: one idempotency key yields
//! one run, and the index of an event or a log line (its stream entry id) is dense from 1 and the
//! same on every replica. Listing walks `runs` newest first; the cursor is `<score>:<id>` of the
//! last run returned, and filters are applied while walking, so a page holds `limit` matching
//! runs whenever that many remain.
//!
//! Followers read history with `XRANGE`, then wait for new entries with `XREAD BLOCK` on a
//! connection of their own (the shared connection manager is never blocked). An event follower
//! ends after the run's final event; a log follower ends once it has read past the `closed`
//! marker (or, starting after it, once it finds `logs_closed` set).
//!
//! Every call has a deadline: a Redis that is down or does not answer yields
//! [`StoreError::Unavailable`] naming its address (never its credentials) within
//! [`RedisSettings::op_timeout`], and the store reconnects by itself once Redis is back.
//!
//! Nothing expires but tokens and heartbeats: records, events and logs are kept until removed by hand.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::stream::{self, StreamExt};
use opentelemetry::KeyValue;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError, Script};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::{
    Admission, Claim, ClaimOutcome, CreateOutcome, EventStream, Lease, LogLineStream, Notice,
    NoticeStream, RunCommand, RunFilter, RunPage, RunStore, RunWrite, StoreError, TokenRecord,
};
use crate::metrics::{attr, Metrics};
use crate::model::{EventKind, LogLine, LogSource, RunEvent, RunId, RunRecord};

/// Entries read per `XRANGE` / `XREAD`.
const STREAM_BATCH: usize = 500;

/// Timeouts of the store.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// One attempt to open a connection.
    pub connect_timeout: Duration,
    /// One command on an open connection.
    pub response_timeout: Duration,
    /// One store call, reconnecting included; past it the call fails as unavailable.
    pub op_timeout: Duration,
    /// How long a follower's `XREAD BLOCK` waits before asking again.
    pub follow_block: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            op_timeout: Duration::from_secs(3),
            follow_block: Duration::from_secs(5),
        }
    }
}

/// Creates a run: record, order index and idempotency key, or reports the existing run.
/// KEYS: run, runs, [idem]. ARGV: record json, score, id, run key prefix.
const CREATE_RUN: &str = r"
if KEYS[3] then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    local rec = redis.call('GET', ARGV[4] .. existing)
    if rec then return {'existing', rec} end
    return {'missing', existing}
  end
end
local current = redis.call('GET', KEYS[1])
if current then return {'existing', current} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', ARGV[5], ARGV[2], ARGV[3])
if KEYS[3] then redis.call('SET', KEYS[3], ARGV[3]) end
return {'created'}
";

/// Appends entries `<n+1>-0`, `<n+2>-0`, … to a stream whose last entry is `<n>-<k>`.
/// KEYS: run, stream. ARGV: at, then field/value lists of `ARGV[2]` fields each.
/// Returns the index of the last entry appended, or -1 when the run does not exist.
const APPEND: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local n = 0
if #last > 0 then n = tonumber(string.match(last[1][1], '^(%d+)')) end
local width = tonumber(ARGV[2])
local i = 3
while i + width - 1 <= #ARGV do
  n = n + 1
  local entry = {'XADD', KEYS[2], string.format('%d-0', n), 'at', ARGV[1]}
  for j = 0, width - 1, 2 do
    table.insert(entry, ARGV[i + j])
    table.insert(entry, ARGV[i + j + 1])
  end
  redis.call(unpack(entry))
  i = i + width
end
return n
";

/// Sets the run's `logs_closed` flag and adds a `closed` marker `<n>-<k+1>` after the last entry
/// `<n>-<k>` of each log stream (waking blocked followers). KEYS: run, flag, log streams….
const CLOSE_LOGS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('SET', KEYS[2], '1')
for i = 3, #KEYS do
  local last = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  local n, k = 0, 0
  if #last > 0 then
    local a, b = string.match(last[1][1], '^(%d+)-(%d+)$')
    n, k = tonumber(a), tonumber(b)
  end
  redis.call('XADD', KEYS[i], string.format('%d-%d', n, k + 1), 'closed', '1')
end
return 0
";

/// KEYS: token, run's token index. ARGV: record json, expiry (unix ms), hash, now (unix ms).
const PUT_TOKEN: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
local wanted = tonumber(ARGV[2]) - tonumber(ARGV[4])
if wanted <= 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[3])
local ttl = redis.call('PTTL', KEYS[2])
if ttl < wanted then redis.call('PEXPIRE', KEYS[2], wanted) end
return 0
";

/// Marks every token of a run revoked, keeping their expiry. KEYS: run's token index.
/// ARGV: token key prefix.
const REVOKE_TOKENS: &str = r"
for _, hash in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. hash
  local raw = redis.call('GET', key)
  if raw then
    local doc = cjson.decode(raw)
    doc['revoked'] = true
    redis.call('SET', key, cjson.encode(doc), 'KEEPTTL')
  else
    redis.call('SREM', KEYS[1], hash)
  end
end
return 0
";

/// Makes ARGV[1] the run's owner with a higher fence, unless (mode `orphaned`) a live replica
/// holds it. KEYS: lease, run. ARGV: replica, mode, key prefix, run id.
/// Returns strings: {1, previous owner or '', fence}, {0, owner, fence} when held, {-1} without
/// a run.
const CLAIM: &str = r"
if redis.call('EXISTS', KEYS[2]) == 0 then return {'-1'} end
local owner = redis.call('HGET', KEYS[1], 'replica')
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if ARGV[2] == 'orphaned' and owner and redis.call('EXISTS', ARGV[3] .. 'replica:' .. owner) == 1 then
  return {'0', owner, tostring(fence)}
end
fence = fence + 1
redis.call('HSET', KEYS[1], 'replica', ARGV[1], 'fence', fence)
redis.call('ZREM', ARGV[3] .. 'unclaimed', ARGV[4])
if owner then redis.call('SREM', ARGV[3] .. 'owned:' .. owner, ARGV[4]) end
redis.call('SADD', ARGV[3] .. 'owned:' .. ARGV[1], ARGV[4])
redis.call('SADD', ARGV[3] .. 'replicas', ARGV[1])
return {'1', owner or '', tostring(fence)}
";

/// A run actor's writes, if its fence is current and (numbered) not applied already.
/// KEYS: lease, run, events, agent logs, seq, applied, slots (of the scope to release, or any
/// key when none). ARGV: fence, at, seq or '', record json or '', batch number, run id to take
/// out of the slots or '', number of events, the events' JSON, then stream/line pairs.
/// Returns {0}, {-2, current fence} when fenced, {-1} without a run.
const WRITE_RUN: &str = r"
local current = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if current ~= tonumber(ARGV[1]) then return {-2, current} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {-1} end
local batch = tonumber(ARGV[5])
if batch > 0 then
  local applied = redis.call('HMGET', KEYS[6], 'fence', 'batch')
  if tonumber(applied[1] or '-1') == current and tonumber(applied[2] or '0') >= batch then
    return {0}
  end
  redis.call('HSET', KEYS[6], 'fence', current, 'batch', batch)
end
local function last_index(key)
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #last > 0 then return tonumber(string.match(last[1][1], '^(%d+)')) end
  return 0
end
if ARGV[6] ~= '' then redis.call('SREM', KEYS[7], ARGV[6]) end
local n_events = tonumber(ARGV[7])
if n_events > 0 then
  local n = last_index(KEYS[3])
  for i = 8, 7 + n_events do
    n = n + 1
    redis.call('XADD', KEYS[3], string.format('%d-0', n), 'at', ARGV[2], 'kind', ARGV[i])
  end
end
local first_log = 8 + n_events
if first_log < #ARGV then
  local n = last_index(KEYS[4])
  for i = first_log, #ARGV - 1, 2 do
    n = n + 1
    redis.call('XADD', KEYS[4], string.format('%d-0', n), 'at', ARGV[2], 'stream', ARGV[i], 'line', ARGV[i + 1])
  end
end
if ARGV[4] ~= '' then redis.call('SET', KEYS[2], ARGV[4]) end
if ARGV[3] ~= '' then
  local seq = tonumber(redis.call('GET', KEYS[5]) or '0')
  if tonumber(ARGV[3]) > seq then redis.call('SET', KEYS[5], ARGV[3]) end
end
return {0}
";

/// Runs owned by replicas whose heartbeat lapsed; forgets lapsed replicas that own nothing.
/// KEYS: replicas. ARGV: key prefix.
const ORPHANED: &str = r"
local found = {}
for _, replica in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. 'replica:' .. replica) == 0 then
    local owned = redis.call('SMEMBERS', ARGV[1] .. 'owned:' .. replica)
    if #owned == 0 then redis.call('SREM', KEYS[1], replica) end
    for _, id in ipairs(owned) do table.insert(found, id) end
  end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', ARGV[1] .. 'unclaimed', '-inf', now_ms - tonumber(ARGV[2]))) do
  table.insert(found, id)
end
return found
";

/// Replicas whose heartbeat is current. KEYS: replicas. ARGV: key prefix.
const LIVE_REPLICAS: &str = r"
local live = {}
for _, replica in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. 'replica:' .. replica) == 1 then table.insert(live, replica) end
end
return live
";

/// Queues a command and notifies the run's owner if it is alive. KEYS: lease, cmds, cmdq, run.
/// ARGV: command json, run id, key prefix, notice json. Returns the owner, false, or -1.
const PUSH_COMMAND: &str = r"
if redis.call('EXISTS', KEYS[4]) == 0 then return -1 end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
local owner = redis.call('HGET', KEYS[1], 'replica')
if owner and redis.call('EXISTS', ARGV[3] .. 'replica:' .. owner) == 1 then
  redis.call('PUBLISH', ARGV[3] .. 'notices:' .. owner, ARGV[4])
  return owner
end
return false
";

/// KEYS: cmds, cmdq. ARGV: run id.
const TAKE_COMMANDS: &str = r"
local commands = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return commands
";

/// KEYS: slots. ARGV: limit, run id. Returns {1} when admitted, {0, in use} when full.
const ACQUIRE_SLOT: &str = r"
if redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1 then return {1} end
local n = redis.call('SCARD', KEYS[1])
if n < tonumber(ARGV[1]) then
  redis.call('SADD', KEYS[1], ARGV[2])
  return {1}
end
return {0, n}
";

/// A token record as stored.
#[derive(Serialize, Deserialize)]
struct TokenDoc {
    run_id: RunId,
    expires_at: DateTime<Utc>,
    revoked: bool,
}

struct Scripts {
    create_run: Script,
    append: Script,
    close_logs: Script,
    put_token: Script,
    revoke_tokens: Script,
    claim: Script,
    write_run: Script,
    orphaned: Script,
    live_replicas: Script,
    push_command: Script,
    take_commands: Script,
    acquire_slot: Script,
}

struct Inner {
    client: Client,
    /// `host:port` of the server, for messages (never the credentials).
    addr: String,
    prefix: String,
    settings: RedisSettings,
    manager: OnceCell<ConnectionManager>,
    scripts: Scripts,
    /// Writes refused for an outdated lease.
    fenced: AtomicU64,
    /// Round-trip times go to `db.client.operation.duration`.
    metrics: Arc<Metrics>,
}

/// The Redis-backed [`RunStore`]; cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("addr", &self.inner.addr)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

/// Which of a run's journals a follower reads.
#[derive(Clone, Copy)]
enum Journal {
    Events,
    Logs,
}

impl RedisStore {
    /// A store for `cluster_id` at `url` (`redis://[user:password@]host[:port][/db]`). Connects on
    /// first use, so a control plane can start while Redis is still coming up (`ping` tells).
    pub fn open(url: &str, cluster_id: &str, settings: RedisSettings) -> Result<Self, StoreError> {
        Self::open_observed(url, cluster_id, settings, Metrics::noop())
    }

    /// Like `open`, recording each call's round-trip time in `metrics`.
    pub fn open_observed(
        url: &str,
        cluster_id: &str,
        settings: RedisSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let client = Client::open(url).map_err(|err| StoreError::Backend {
            message: format!("invalid redis url: {err}"),
        })?;
        let addr = client.get_connection_info().addr.to_string();
        Ok(RedisStore {
            inner: Arc::new(Inner {
                client,
                addr,
                prefix: format!("codebolt:{{{cluster_id}}}:"),
                settings,
                manager: OnceCell::new(),
                scripts: Scripts {
                    create_run: Script::new(CREATE_RUN),
                    append: Script::new(APPEND),
                    close_logs: Script::new(CLOSE_LOGS),
                    put_token: Script::new(PUT_TOKEN),
                    revoke_tokens: Script::new(REVOKE_TOKENS),
                    claim: Script::new(CLAIM),
                    write_run: Script::new(WRITE_RUN),
                    orphaned: Script::new(ORPHANED),
                    live_replicas: Script::new(LIVE_REPLICAS),
                    push_command: Script::new(PUSH_COMMAND),
                    take_commands: Script::new(TAKE_COMMANDS),
                    acquire_slot: Script::new(ACQUIRE_SLOT),
                },
                fenced: AtomicU64::new(0),
                metrics,
            }),
        })
    }

    /// `host:port` of the Redis server.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }
}

impl Inner {
    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn run_key(&self, id: RunId) -> String {
        self.key(&format!("run:{id}"))
    }

    fn journal_key(&self, id: RunId, journal: Journal, source: LogSource) -> String {
        match journal {
            Journal::Events => self.key(&format!("events:{id}")),
            Journal::Logs => self.logs_key(id, source),
        }
    }

    fn logs_key(&self, id: RunId, source: LogSource) -> String {
        let source = match source {
            LogSource::Agent => "agent",
            LogSource::Provider => "provider",
        };
        self.key(&format!("logs:{id}:{source}"))
    }

    fn unavailable(&self, message: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable {
            message: format!("redis at {}: {message}", self.addr),
        }
    }

    /// Outages (connection refused or dropped, timeouts, a server loading or refusing writes,
    /// authentication) are `Unavailable`; answers this build cannot use are `Backend`.
    fn error(&self, err: RedisError) -> StoreError {
        match err.kind() {
            ErrorKind::ResponseError
            | ErrorKind::TypeError
            | ErrorKind::ExtensionError
            | ErrorKind::ParseError
            | ErrorKind::NoScriptError
            | ErrorKind::CrossSlot
            | ErrorKind::ClientError
                if !err.is_io_error() && !err.is_timeout() =>
            {
                StoreError::Backend {
                    message: format!("redis at {}: {err}", self.addr),
                }
            }
            _ => self.unavailable(err),
        }
    }

    fn corrupt(&self, key: &str, message: impl std::fmt::Display) -> StoreError {
        StoreError::Backend {
            message: format!(
                "redis at {}: unreadable entry in {key}: {message}",
                self.addr
            ),
        }
    }

    async fn manager(&self) -> Result<ConnectionManager, StoreError> {
        let manager = self
            .manager
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.settings.connect_timeout)
                    .set_response_timeout(self.settings.response_timeout)
                    // One attempt per call: a call fails fast while Redis is away, and the
                    // next call connects again.
                    .set_number_of_retries(0);
                ConnectionManager::new_with_config(self.client.clone(), config)
                    .await
                    .map_err(|err| self.unavailable(err))
            })
            .await?;
        Ok(manager.clone())
    }

    /// Runs one store call (`operation`, for the round-trip metric) on the shared connection,
    /// within the call deadline.
    async fn call<T, F, Fut>(&self, operation: &str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let deadline = self.settings.op_timeout;
        let started = Instant::now();
        let work = async {
            let conn = self.manager().await?;
            f(conn).await
        };
        let result = match tokio::time::timeout(deadline, work).await {
            Ok(result) => result,
            Err(_) => {
                Err(self.unavailable(format_args!("no answer within {} ms", deadline.as_millis())))
            }
        };
        let mut attributes = vec![
            KeyValue::new(attr::DB_SYSTEM, "redis"),
            KeyValue::new(attr::DB_OPERATION, operation.to_string()),
        ];
        if let Err(err) = &result {
            attributes.push(KeyValue::new(attr::ERROR_TYPE, err.kind()));
        }
        Metrics::record(&self.metrics.store_duration, started.elapsed(), &attributes);
        result
    }

    /// A connection of a follower's own, for blocking reads.
    async fn follower_connection(&self) -> Result<MultiplexedConnection, StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(self.settings.connect_timeout)
            .set_response_timeout(self.settings.follow_block + self.settings.response_timeout);
        match tokio::time::timeout(
            self.settings.op_timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(result) => result.map_err(|err| self.unavailable(err)),
            Err(_) => Err(self.unavailable("could not connect in time")),
        }
    }

    async fn run_exists(&self, id: RunId) -> Result<bool, StoreError> {
        self.exists(&self.run_key(id)).await
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.query(redis::cmd("EXISTS").arg(key)).await
    }

    /// Runs one command on the shared connection, within the call deadline.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let operation = match cmd.args_iter().next() {
            Some(redis::Arg::Simple(name)) => String::from_utf8_lossy(name).to_uppercase(),
            _ => "command".to_string(),
        };
        self.call(&operation, move |mut conn| async move {
            cmd.query_async::<T>(&mut conn)
                .await
                .map_err(|err| self.error(err))
        })
        .await
    }

    /// Entries after `last` (exclusive), at most one batch.
    async fn range_after(&self, key: &str, last: &str) -> Result<Vec<StreamId>, StoreError> {
        self.call("range_after", move |mut conn| async move {
            redis::cmd("XRANGE")
                .arg(key)
                .arg(format!("({last}"))
                .arg("+")
                .arg("COUNT")
                .arg(STREAM_BATCH)
                .query_async::<StreamRangeReply>(&mut conn)
                .await
                .map(|reply| reply.ids)
                .map_err(|err| self.error(err))
        })
        .await
    }

    async fn last_entry(&self, key: &str) -> Result<Option<StreamId>, StoreError> {
        self.call("last_entry", move |mut conn| async move {
            redis::cmd("XREVRANGE")
                .arg(key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async::<StreamRangeReply>(&mut conn)
                .await
                .map(|reply| reply.ids.into_iter().next())
                .map_err(|err| self.error(err))
        })
        .await
    }

    /// Entries after `last`, waiting up to `follow_block` for the first.
    async fn read_blocking(
        &self,
        conn: &mut MultiplexedConnection,
        key: &str,
        last: &str,
    ) -> Result<Vec<StreamId>, StoreError> {
        let reply = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(STREAM_BATCH)
            .arg("BLOCK")
            .arg(self.settings.follow_block.as_millis() as u64)
            .arg("STREAMS")
            .arg(key)
            .arg(last)
            .query_async::<Option<StreamReadReply>>(conn)
            .await
            .map_err(|err| self.error(err))?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect())
    }
}

/// Index and sequence of a stream entry id `<index>-<seq>`.
fn parse_entry_id(id: &str) -> Option<(u64, u64)> {
    let (index, seq) = id.split_once('-')?;
    Some((index.parse().ok()?, seq.parse().ok()?))
}

fn field(entry: &StreamId, name: &str) -> Result<String, String> {
    entry
        .get::<String>(name)
        .ok_or_else(|| format!("entry {} has no field `{name}`", entry.id))
}

fn timestamp_field(entry: &StreamId) -> Result<DateTime<Utc>, String> {
    let nanos: i64 = field(entry, "at")?
        .parse()
        .map_err(|err| format!("entry {}: bad `at`: {err}", entry.id))?;
    Ok(DateTime::from_timestamp_nanos(nanos))
}

fn timestamp_arg(at: DateTime<Utc>) -> String {
    // Out of range only after the year 2262.
    at.timestamp_nanos_opt().unwrap_or(i64::MAX).to_string()
}

fn decode_event(entry: &StreamId) -> Result<RunEvent, String> {
    let (index, _) =
        parse_entry_id(&entry.id).ok_or_else(|| format!("bad entry id {}", entry.id))?;
    let kind: EventKind = serde_json::from_str(&field(entry, "kind")?)
        .map_err(|err| format!("entry {}: {err}", entry.id))?;
    Ok(RunEvent {
        index,
        at: timestamp_field(entry)?,
        kind,
    })
}

/// A log line, or `None` for the `closed` marker.
fn decode_log(entry: &StreamId) -> Result<Option<LogLine>, String> {
    if entry.contains_key("closed") {
        return Ok(None);
    }
    let (index, _) =
        parse_entry_id(&entry.id).ok_or_else(|| format!("bad entry id {}", entry.id))?;
    Ok(Some(LogLine {
        index,
        at: timestamp_field(entry)?,
        stream: field(entry, "stream")?,
        line: field(entry, "line")?,
    }))
}

/// Position in the newest-first listing: creation time in ms, then id.
#[derive(Debug, Clone, PartialEq)]
struct ListCursor {
    score: i64,
    id: String,
}

impl ListCursor {
    fn parse(raw: &str) -> Option<ListCursor> {
        let (score, id) = raw.split_once(':')?;
        let id = uuid::Uuid::parse_str(id).ok()?;
        Some(ListCursor {
            score: score.parse().ok()?,
            id: id.to_string(),
        })
    }

    fn encode(&self) -> String {
        format!("{}:{}", self.score, self.id)
    }
}

/// Reads a journal: history after `after`, then, with `follow`, live entries until `end`.
struct Follower {
    inner: Arc<Inner>,
    key: String,
    /// Set once the journal is complete (`logs_closed:<id>`), for logs.
    closed_flag: Option<String>,
    journal: Journal,
    follow: bool,
    /// Stream id of the last entry read.
    last_id: String,
    pending: VecDeque<StreamId>,
    history_done: bool,
    /// A log's `closed` marker was read: finish once nothing more is there.
    closed: bool,
    finished: bool,
    conn: Option<MultiplexedConnection>,
}

/// What a follower hands out.
enum Item {
    Event(RunEvent),
    Log(LogLine),
}

impl Follower {
    fn new(
        inner: Arc<Inner>,
        run_id: RunId,
        journal: Journal,
        source: LogSource,
        after: u64,
        follow: bool,
    ) -> Self {
        let key = inner.journal_key(run_id, journal, source);
        let closed_flag = match journal {
            Journal::Events => None,
            Journal::Logs => Some(inner.key(&format!("logs_closed:{run_id}"))),
        };
        Follower {
            inner,
            key,
            closed_flag,
            journal,
            follow,
            // Exclusive: the first line read is `<after+1>-0`, or the marker `<after>-k` if the
            // logs were closed right after line `after`.
            last_id: format!("{after}-0"),
            pending: VecDeque::new(),
            history_done: false,
            closed: false,
            finished: false,
            conn: None,
        }
    }

    async fn next_item(&mut self) -> Option<Result<Item, StoreError>> {
        loop {
            if self.finished {
                return None;
            }
            if let Some(entry) = self.pending.pop_front() {
                self.last_id.clone_from(&entry.id);
                match self.journal {
                    Journal::Events => match decode_event(&entry) {
                        Ok(event) => {
                            self.finished = event.kind.is_final();
                            return Some(Ok(Item::Event(event)));
                        }
                        Err(message) => return Some(Err(self.fail(message))),
                    },
                    Journal::Logs => match decode_log(&entry) {
                        Ok(Some(line)) => return Some(Ok(Item::Log(line))),
                        Ok(None) => {
                            self.closed = true;
                            continue;
                        }
                        Err(message) => return Some(Err(self.fail(message))),
                    },
                }
            }
            if let Err(err) = self.refill().await {
                self.finished = true;
                return Some(Err(err));
            }
        }
    }

    fn fail(&mut self, message: String) -> StoreError {
        self.finished = true;
        self.inner.corrupt(&self.key, message)
    }

    /// Fills `pending`, or marks the follower finished.
    async fn refill(&mut self) -> Result<(), StoreError> {
        if !self.history_done || self.closed {
            let batch = self.inner.range_after(&self.key, &self.last_id).await?;
            if !batch.is_empty() {
                self.pending = batch.into();
                return Ok(());
            }
            self.history_done = true;
            if !self.follow || self.closed || self.already_ended().await? {
                self.finished = true;
                return Ok(());
            }
        }
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self.conn.insert(self.inner.follower_connection().await?),
        };
        let batch = self
            .inner
            .read_blocking(conn, &self.key, &self.last_id)
            .await?;
        self.pending = batch.into();
        Ok(())
    }

    /// Whether the journal was complete before the part this follower reads (a follower that
    /// starts after a run's final event, or after the logs closed).
    async fn already_ended(&self) -> Result<bool, StoreError> {
        if let Some(flag) = &self.closed_flag {
            return self.inner.exists(flag).await;
        }
        let Some(last) = self.inner.last_entry(&self.key).await? else {
            return Ok(false);
        };
        Ok(decode_event(&last).is_ok_and(|e| e.kind.is_final()))
    }

    fn into_stream(self) -> impl futures_util::Stream<Item = Result<Item, StoreError>> + Send {
        stream::unfold(self, |mut follower| async move {
            let item = follower.next_item().await?;
            Some((item, follower))
        })
    }
}

#[async_trait]
impl RunStore for RedisStore {
    async fn create_run(
        &self,
        record: &RunRecord,
        idempotency_key: Option<&str>,
    ) -> Result<CreateOutcome, StoreError> {
        let inner = &self.inner;
        let json = serde_json::to_string(record).map_err(|err| StoreError::Backend {
            message: format!("could not encode run {}: {err}", record.id),
        })?;
        let (run_key, json) = (&inner.run_key(record.id), &json);
        let reply: Vec<String> = inner
            .call("create_run", move |mut conn| async move {
                let mut invocation = inner.scripts.create_run.key(run_key);
                invocation.key(inner.key("runs"));
                if let Some(key) = idempotency_key {
                    invocation.key(inner.key(&format!("idem:{key}")));
                }
                invocation
                    .arg(json)
                    .arg(record.created_at.timestamp_millis())
                    .arg(record.id.to_string())
                    .arg(inner.key("run:"))
                    .arg(inner.key("unclaimed"))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        match reply.as_slice() {
            [created] if created == "created" => Ok(CreateOutcome::Created),
            [existing, json] if existing == "existing" => serde_json::from_str(json)
                .map(|r| CreateOutcome::Existing(Box::new(r)))
                .map_err(|err| inner.corrupt("a run record", err)),
            [missing, id] if missing == "missing" => Err(StoreError::RunNotFound {
                run_id: id.parse().map_err(|err| inner.corrupt("idem", err))?,
            }),
            other => Err(inner.corrupt("create_run", format!("unexpected reply {other:?}"))),
        }
    }

    async fn put_run(&self, record: &RunRecord) -> Result<(), StoreError> {
        let inner = &self.inner;
        let json = serde_json::to_string(record).map_err(|err| StoreError::Backend {
            message: format!("could not encode run {}: {err}", record.id),
        })?;
        let (key, json) = (&inner.run_key(record.id), &json);
        let replaced: Option<String> = inner
            .query(redis::cmd("SET").arg(key).arg(json).arg("XX"))
            .await?;
        match replaced {
            Some(_) => Ok(()),
            None => Err(StoreError::RunNotFound { run_id: record.id }),
        }
    }

    async fn get_run(&self, id: RunId) -> Result<Option<RunRecord>, StoreError> {
        let inner = &self.inner;
        let key = &inner.run_key(id);
        let raw: Option<String> = inner.query(redis::cmd("GET").arg(key)).await?;
        raw.map(|json| serde_json::from_str(&json).map_err(|err| inner.corrupt(key, err)))
            .transpose()
    }

    async fn list_runs(
        &self,
        filter: &RunFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RunPage, StoreError> {
        let inner = &self.inner;
        let mut bound = match cursor {
            None => None,
            Some(raw) => Some(ListCursor::parse(raw).ok_or_else(|| StoreError::BadCursor {
                cursor: raw.to_string(),
            })?),
        };
        let mut runs = Vec::new();
        if limit == 0 {
            return Ok(RunPage {
                runs,
                next_cursor: None,
            });
        }
        let order = &inner.key("runs");
        let batch = limit.clamp(16, 500);
        // Walk: runs created in the same ms as the bound and ordered after it, then one batch of
        // older ones; repeat from the last run seen.
        loop {
            let bound_ref = &bound;
            let candidates: Vec<ListCursor> = inner
                .call("list_runs", move |mut conn| async move {
                    let mut found = Vec::new();
                    if let Some(b) = bound_ref {
                        let same: Vec<String> = redis::cmd("ZREVRANGEBYSCORE")
                            .arg(order)
                            .arg(b.score)
                            .arg(b.score)
                            .query_async(&mut conn)
                            .await
                            .map_err(|err| inner.error(err))?;
                        found.extend(
                            same.into_iter()
                                .filter(|id| *id < b.id)
                                .map(|id| ListCursor { score: b.score, id }),
                        );
                    }
                    let max = bound_ref
                        .as_ref()
                        .map_or_else(|| "+inf".to_string(), |b| format!("({}", b.score));
                    let older: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
                        .arg(order)
                        .arg(max)
                        .arg("-inf")
                        .arg("WITHSCORES")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(batch)
                        .query_async(&mut conn)
                        .await
                        .map_err(|err| inner.error(err))?;
                    found.extend(older.into_iter().map(|(id, score)| ListCursor {
                        score: score as i64,
                        id,
                    }));
                    Ok(found)
                })
                .await?;
            if candidates.is_empty() {
                return Ok(RunPage {
                    runs,
                    next_cursor: None,
                });
            }
            let keys: &Vec<String> = &candidates
                .iter()
                .map(|c| inner.key(&format!("run:{}", c.id)))
                .collect();
            let records: Vec<Option<String>> = inner.query(redis::cmd("MGET").arg(keys)).await?;
            for (position, (candidate, raw)) in candidates.iter().zip(records).enumerate() {
                bound = Some(candidate.clone());
                let Some(raw) = raw else { continue };
                let record: RunRecord = serde_json::from_str(&raw)
                    .map_err(|err| inner.corrupt(&keys[position], err))?;
                if !filter.matches(&record) {
                    continue;
                }
                runs.push(record);
                if runs.len() == limit {
                    let more =
                        position + 1 < candidates.len() || self.any_before(candidate).await?;
                    return Ok(RunPage {
                        runs,
                        next_cursor: more.then(|| candidate.encode()),
                    });
                }
            }
        }
    }

    async fn append_event(&self, id: RunId, kind: EventKind) -> Result<RunEvent, StoreError> {
        let inner = &self.inner;
        let at = Utc::now();
        let json = serde_json::to_string(&kind).map_err(|err| StoreError::Backend {
            message: format!("could not encode an event of run {id}: {err}"),
        })?;
        let json = &json;
        let index: i64 = inner
            .call("append_event", move |mut conn| async move {
                inner
                    .scripts
                    .append
                    .key(inner.run_key(id))
                    .key(inner.journal_key(id, Journal::Events, LogSource::Agent))
                    .arg(timestamp_arg(at))
                    .arg(2)
                    .arg("kind")
                    .arg(json)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        let index = u64::try_from(index).map_err(|_| StoreError::RunNotFound { run_id: id })?;
        Ok(RunEvent { index, at, kind })
    }

    async fn events(&self, id: RunId, after: u64, follow: bool) -> Result<EventStream, StoreError> {
        let inner = &self.inner;
        if !inner.run_exists(id).await? {
            return Err(StoreError::RunNotFound { run_id: id });
        }
        let follower = Follower::new(
            inner.clone(),
            id,
            Journal::Events,
            LogSource::Agent,
            after,
            follow,
        );
        Ok(follower
            .into_stream()
            .filter_map(|item| async move {
                match item {
                    Ok(Item::Event(event)) => Some(Ok(event)),
                    Ok(Item::Log(_)) => None,
                    Err(err) => Some(Err(err)),
                }
            })
            .boxed())
    }

    async fn append_logs(
        &self,
        id: RunId,
        source: LogSource,
        lines: Vec<(String, String)>,
    ) -> Result<(), StoreError> {
        if lines.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        let (at, lines) = (&timestamp_arg(Utc::now()), &lines);
        let appended: i64 = inner
            .call("append_logs", move |mut conn| async move {
                let mut invocation = inner.scripts.append.key(inner.run_key(id));
                invocation.key(inner.logs_key(id, source)).arg(at).arg(4);
                for (stream, line) in lines {
                    invocation.arg("stream").arg(stream).arg("line").arg(line);
                }
                invocation
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        if appended < 0 {
            return Err(StoreError::RunNotFound { run_id: id });
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
        let inner = &self.inner;
        if !inner.run_exists(id).await? {
            return Err(StoreError::RunNotFound { run_id: id });
        }
        let follower = Follower::new(inner.clone(), id, Journal::Logs, source, after, follow);
        Ok(follower
            .into_stream()
            .filter_map(|item| async move {
                match item {
                    Ok(Item::Log(line)) => Some(Ok(line)),
                    Ok(Item::Event(_)) => None,
                    Err(err) => Some(Err(err)),
                }
            })
            .boxed())
    }

    async fn close_logs(&self, id: RunId) -> Result<(), StoreError> {
        let inner = &self.inner;
        let status: i64 = inner
            .call("close_logs", move |mut conn| async move {
                inner
                    .scripts
                    .close_logs
                    .key(inner.run_key(id))
                    .key(inner.key(&format!("logs_closed:{id}")))
                    .key(inner.logs_key(id, LogSource::Agent))
                    .key(inner.logs_key(id, LogSource::Provider))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        if status < 0 {
            return Err(StoreError::RunNotFound { run_id: id });
        }
        Ok(())
    }

    async fn put_token(&self, token_hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        let inner = &self.inner;
        let doc = TokenDoc {
            run_id: record.run_id,
            expires_at: record.expires_at,
            revoked: record.revoked,
        };
        let json = serde_json::to_string(&doc).map_err(|err| StoreError::Backend {
            message: format!("could not encode a token record: {err}"),
        })?;
        let json = &json;
        inner
            .call("put_token", move |mut conn| async move {
                inner
                    .scripts
                    .put_token
                    .key(inner.key(&format!("token:{token_hash}")))
                    .key(inner.key(&format!("tokens:{}", record.run_id)))
                    .arg(json)
                    .arg(record.expires_at.timestamp_millis())
                    .arg(token_hash)
                    .arg(Utc::now().timestamp_millis())
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        Ok(())
    }

    async fn get_token(&self, token_hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let inner = &self.inner;
        let key = &inner.key(&format!("token:{token_hash}"));
        let raw: Option<String> = inner.query(redis::cmd("GET").arg(key)).await?;
        let Some(raw) = raw else { return Ok(None) };
        let doc: TokenDoc = serde_json::from_str(&raw).map_err(|err| inner.corrupt(key, err))?;
        Ok(Some(TokenRecord {
            run_id: doc.run_id,
            expires_at: doc.expires_at,
            revoked: doc.revoked,
        }))
    }

    async fn revoke_tokens(&self, id: RunId) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner
            .call("revoke_tokens", move |mut conn| async move {
                inner
                    .scripts
                    .revoke_tokens
                    .key(inner.key(&format!("tokens:{id}")))
                    .arg(inner.key("token:"))
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner.query::<String>(&redis::cmd("PING")).await?;
        Ok(())
    }

    async fn heartbeat(&self, replica: &str, ttl: Duration) -> Result<(), StoreError> {
        let inner = &self.inner;
        let key = &inner.key(&format!("replica:{replica}"));
        let replicas = &inner.key("replicas");
        inner
            .call("heartbeat", move |mut conn| async move {
                redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(key)
                    .arg("1")
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64)
                    .ignore()
                    .cmd("SADD")
                    .arg(replicas)
                    .arg(replica)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await
    }

    async fn live_replicas(&self) -> Result<Vec<String>, StoreError> {
        let inner = &self.inner;
        let mut live: Vec<String> = inner
            .call("live_replicas", move |mut conn| async move {
                inner
                    .scripts
                    .live_replicas
                    .key(inner.key("replicas"))
                    .arg(&inner.prefix)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        live.sort();
        Ok(live)
    }

    async fn claim_run(
        &self,
        id: RunId,
        replica: &str,
        claim: Claim,
    ) -> Result<ClaimOutcome, StoreError> {
        let inner = &self.inner;
        let mode = match claim {
            Claim::IfOrphaned => "orphaned",
            Claim::Takeover => "takeover",
        };
        let reply: Vec<String> = inner
            .call("claim_run", move |mut conn| async move {
                inner
                    .scripts
                    .claim
                    .key(inner.key(&format!("lease:{id}")))
                    .key(inner.run_key(id))
                    .arg(replica)
                    .arg(mode)
                    .arg(&inner.prefix)
                    .arg(id.to_string())
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        let bad = || StoreError::Backend {
            message: format!("redis at {}: unexpected claim reply {reply:?}", inner.addr),
        };
        match reply.as_slice() {
            [code] if code == "-1" => Err(StoreError::RunNotFound { run_id: id }),
            [code, owner, fence] => {
                let fence: u64 = fence.parse().map_err(|_| bad())?;
                match code.as_str() {
                    "1" => Ok(ClaimOutcome::Claimed {
                        lease: Lease {
                            run_id: id,
                            replica: replica.to_string(),
                            fence,
                        },
                        previous: (!owner.is_empty()).then(|| owner.clone()),
                    }),
                    "0" => Ok(ClaimOutcome::Held {
                        owner: owner.clone(),
                    }),
                    _ => Err(bad()),
                }
            }
            _ => Err(bad()),
        }
    }

    async fn lease(&self, id: RunId) -> Result<Option<Lease>, StoreError> {
        let inner = &self.inner;
        let key = &inner.key(&format!("lease:{id}"));
        let (replica, fence): (Option<String>, Option<u64>) = inner
            .query(redis::cmd("HMGET").arg(key).arg("replica").arg("fence"))
            .await?;
        Ok(match (replica, fence) {
            (Some(replica), Some(fence)) => Some(Lease {
                run_id: id,
                replica,
                fence,
            }),
            _ => None,
        })
    }

    async fn write_run(&self, lease: &Lease, write: RunWrite) -> Result<(), StoreError> {
        let inner = &self.inner;
        let id = lease.run_id;
        let encode = |what: &str, err: serde_json::Error| StoreError::Backend {
            message: format!("could not encode {what} of run {id}: {err}"),
        };
        let record = match &write.record {
            Some(record) => serde_json::to_string(record).map_err(|e| encode("the record", e))?,
            None => String::new(),
        };
        let events = write
            .events
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| encode("an event", e))?;
        let (record, events, logs) = (&record, &events, &write.agent_logs);
        let at = &timestamp_arg(Utc::now());
        let seq = &write.seq.map(|s| s.to_string()).unwrap_or_default();
        let batch = write.batch;
        let slot_scope = write.release_slot.as_deref().unwrap_or_default();
        let slot_member = &if write.release_slot.is_some() {
            id.to_string()
        } else {
            String::new()
        };
        let reply: Vec<i64> = inner
            .call("write_run", move |mut conn| async move {
                let mut invocation = inner
                    .scripts
                    .write_run
                    .key(inner.key(&format!("lease:{id}")));
                invocation
                    .key(inner.run_key(id))
                    .key(inner.journal_key(id, Journal::Events, LogSource::Agent))
                    .key(inner.logs_key(id, LogSource::Agent))
                    .key(inner.key(&format!("seq:{id}")))
                    .key(inner.key(&format!("applied:{id}")))
                    .key(inner.key(&format!("slots:{slot_scope}")))
                    .arg(lease.fence)
                    .arg(at)
                    .arg(seq)
                    .arg(record)
                    .arg(batch)
                    .arg(slot_member)
                    .arg(events.len());
                for event in events {
                    invocation.arg(event);
                }
                for (stream, line) in logs {
                    invocation.arg(stream).arg(line);
                }
                invocation
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        match reply.as_slice() {
            [0] => Ok(()),
            [-1] => Err(StoreError::RunNotFound { run_id: id }),
            [-2, current] => {
                inner.fenced.fetch_add(1, Ordering::Relaxed);
                Err(StoreError::Fenced {
                    run_id: id,
                    fence: lease.fence,
                    current: u64::try_from(*current).unwrap_or(0),
                })
            }
            other => Err(StoreError::Backend {
                message: format!("redis at {}: unexpected write reply {other:?}", inner.addr),
            }),
        }
    }

    async fn release_run(&self, lease: &Lease) -> Result<(), StoreError> {
        let inner = &self.inner;
        let owned = &inner.key(&format!("owned:{}", lease.replica));
        inner
            .query::<()>(redis::cmd("SREM").arg(owned).arg(lease.run_id.to_string()))
            .await
    }

    async fn last_seq(&self, id: RunId) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let key = &inner.key(&format!("seq:{id}"));
        let seq: Option<u64> = inner.query(redis::cmd("GET").arg(key)).await?;
        Ok(seq.unwrap_or(0))
    }

    async fn orphaned_runs(&self, unclaimed_after: Duration) -> Result<Vec<RunId>, StoreError> {
        let inner = &self.inner;
        let unclaimed_after = unclaimed_after.as_millis() as u64;
        let ids: Vec<String> = inner
            .call("orphaned_runs", move |mut conn| async move {
                inner
                    .scripts
                    .orphaned
                    .key(inner.key("replicas"))
                    .arg(&inner.prefix)
                    .arg(unclaimed_after)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        parse_ids(inner, ids)
    }

    async fn push_command(
        &self,
        id: RunId,
        command: &RunCommand,
    ) -> Result<Option<String>, StoreError> {
        let inner = &self.inner;
        let encode = |err: serde_json::Error| StoreError::Backend {
            message: format!("could not encode a command for run {id}: {err}"),
        };
        let json = &serde_json::to_string(command).map_err(encode)?;
        let notice = &serde_json::to_string(&Notice::Commands { run_id: id }).map_err(encode)?;
        let reply: redis::Value = inner
            .call("push_command", move |mut conn| async move {
                inner
                    .scripts
                    .push_command
                    .key(inner.key(&format!("lease:{id}")))
                    .key(inner.key(&format!("cmds:{id}")))
                    .key(inner.key("cmdq"))
                    .key(inner.run_key(id))
                    .arg(json)
                    .arg(id.to_string())
                    .arg(&inner.prefix)
                    .arg(notice)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        match reply {
            redis::Value::Int(-1) => Err(StoreError::RunNotFound { run_id: id }),
            redis::Value::Nil => Ok(None),
            other => redis::from_redis_value::<String>(&other)
                .map(Some)
                .map_err(|err| inner.error(err)),
        }
    }

    async fn take_commands(&self, id: RunId) -> Result<Vec<RunCommand>, StoreError> {
        let inner = &self.inner;
        let key = &inner.key(&format!("cmds:{id}"));
        let raw: Vec<String> = inner
            .call("take_commands", move |mut conn| async move {
                inner
                    .scripts
                    .take_commands
                    .key(key)
                    .key(inner.key("cmdq"))
                    .arg(id.to_string())
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        raw.iter()
            .map(|json| serde_json::from_str(json).map_err(|err| inner.corrupt(key, err)))
            .collect()
    }

    async fn runs_with_commands(&self) -> Result<Vec<RunId>, StoreError> {
        let inner = &self.inner;
        let key = &inner.key("cmdq");
        let ids: Vec<String> = inner.query(redis::cmd("SMEMBERS").arg(key)).await?;
        parse_ids(inner, ids)
    }

    async fn notify(&self, replica: &str, notice: &Notice) -> Result<(), StoreError> {
        let inner = &self.inner;
        let channel = &inner.key(&format!("notices:{replica}"));
        let json = &serde_json::to_string(notice).map_err(|err| StoreError::Backend {
            message: format!("could not encode a notice: {err}"),
        })?;
        inner
            .query::<()>(redis::cmd("PUBLISH").arg(channel).arg(json))
            .await
    }

    async fn notices(&self, replica: &str) -> Result<NoticeStream, StoreError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = self.inner.clone();
        let channel = inner.key(&format!("notices:{replica}"));
        tokio::spawn(async move {
            let mut failures = 0u32;
            while !tx.is_closed() {
                match subscribe(&inner, &channel).await {
                    Ok(pubsub) => {
                        failures = 0;
                        let mut messages = pubsub.into_on_message();
                        loop {
                            tokio::select! {
                                message = messages.next() => {
                                    let Some(message) = message else { break };
                                    let payload: String = match message.get_payload() {
                                        Ok(p) => p,
                                        Err(err) => {
                                            tracing::warn!(error = %err, "unreadable notice");
                                            continue;
                                        }
                                    };
                                    match serde_json::from_str::<Notice>(&payload) {
                                        Ok(notice) => {
                                            if tx.send(notice).is_err() {
                                                return;
                                            }
                                        }
                                        Err(err) => tracing::warn!(error = %err, payload, "unreadable notice"),
                                    }
                                }
                                _ = tx.closed() => return,
                            }
                        }
                        tracing::warn!(redis = %inner.addr, "notice subscription ended; subscribing again");
                    }
                    Err(err) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(30) {
                            tracing::warn!(error = %err, "cannot subscribe to notices; retrying");
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed())
    }

    async fn put_blob(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let inner = &self.inner;
        let key = &inner.key(&format!("blob:{key}"));
        inner
            .query::<()>(redis::cmd("SET").arg(key).arg(bytes))
            .await
    }

    async fn get_blob(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let inner = &self.inner;
        let key = &inner.key(&format!("blob:{key}"));
        inner.query(redis::cmd("GET").arg(key)).await
    }

    async fn acquire_slot(
        &self,
        scope: &str,
        limit: u32,
        id: RunId,
    ) -> Result<Admission, StoreError> {
        let inner = &self.inner;
        let reply: Vec<i64> = inner
            .call("acquire_slot", move |mut conn| async move {
                inner
                    .scripts
                    .acquire_slot
                    .key(inner.key(&format!("slots:{scope}")))
                    .arg(limit)
                    .arg(id.to_string())
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))
            })
            .await?;
        match reply.as_slice() {
            [1] => Ok(Admission::Admitted),
            [0, n] => Ok(Admission::Full {
                in_use: u64::try_from(*n).unwrap_or(0),
            }),
            other => Err(StoreError::Backend {
                message: format!("redis at {}: unexpected slot reply {other:?}", inner.addr),
            }),
        }
    }

    async fn release_slot(&self, scope: &str, id: RunId) -> Result<(), StoreError> {
        let inner = &self.inner;
        let key = &inner.key(&format!("slots:{scope}"));
        inner
            .query::<()>(redis::cmd("SREM").arg(key).arg(id.to_string()))
            .await
    }

    fn fenced_writes(&self) -> u64 {
        self.inner.fenced.load(Ordering::Relaxed)
    }
}

/// A pub/sub connection subscribed to `channel`, within the call deadline.
async fn subscribe(inner: &Inner, channel: &str) -> Result<redis::aio::PubSub, StoreError> {
    let work = async {
        let mut pubsub = inner
            .client
            .get_async_pubsub()
            .await
            .map_err(|err| inner.error(err))?;
        pubsub
            .subscribe(channel)
            .await
            .map_err(|err| inner.error(err))?;
        Ok(pubsub)
    };
    match tokio::time::timeout(inner.settings.op_timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(inner.unavailable("could not subscribe in time")),
    }
}

fn parse_ids(inner: &Inner, ids: Vec<String>) -> Result<Vec<RunId>, StoreError> {
    ids.iter()
        .map(|raw| {
            raw.parse::<RunId>().map_err(|err| StoreError::Backend {
                message: format!("redis at {}: bad run id '{raw}': {err}", inner.addr),
            })
        })
        .collect()
}

impl RedisStore {
    /// Whether any run is ordered after `position` in the newest-first listing.
    async fn any_before(&self, position: &ListCursor) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let order = &inner.key("runs");
        inner
            .call("any_before", move |mut conn| async move {
                let older: i64 = redis::cmd("ZCOUNT")
                    .arg(order)
                    .arg("-inf")
                    .arg(format!("({}", position.score))
                    .query_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))?;
                if older > 0 {
                    return Ok(true);
                }
                let same: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                    .arg(order)
                    .arg(position.score)
                    .arg(position.score)
                    .query_async(&mut conn)
                    .await
                    .map_err(|err| inner.error(err))?;
                Ok(same.iter().any(|id| *id < position.id))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_refuses_garbage() {
        let id = uuid::Uuid::new_v4().to_string();
        let cursor = ListCursor {
            score: 1_700_000_000_123,
            id: id.clone(),
        };
        assert_eq!(ListCursor::parse(&cursor.encode()), Some(cursor));
        for bad in ["", "zz", "12", "12:nope", &format!("x:{id}")] {
            assert_eq!(ListCursor::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn entry_ids_parse() {
        assert_eq!(parse_entry_id("12-0"), Some((12, 0)));
        assert_eq!(parse_entry_id("3-1"), Some((3, 1)));
        assert_eq!(parse_entry_id("3"), None);
        assert_eq!(parse_entry_id("a-1"), None);
    }

    #[test]
    fn keys_carry_the_cluster_hash_tag() {
        let store = RedisStore::open(
            "redis://:secret@127.0.0.1:6390/0",
            "blue",
            RedisSettings::default(),
        )
        .unwrap();
        assert_eq!(store.inner.key("runs"), "codebolt:{blue}:runs");
        assert_eq!(store.addr(), "127.0.0.1:6390");
        assert!(!format!("{store:?}").contains("secret"));
    }

    #[test]
    fn timestamps_keep_nanoseconds() {
        let at = Utc::now();
        let entry = StreamId {
            id: "1-0".into(),
            map: [(
                "at".to_string(),
                redis::Value::BulkString(timestamp_arg(at).into_bytes()),
            )]
            .into_iter()
            .collect(),
        };
        assert_eq!(timestamp_field(&entry).unwrap(), at);
    }
}
