//! `/v1/runs`: create, list, get, stop, kill, events and logs.

use std::collections::BTreeMap;

use super::sandbox::bundle_blob_key;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use actors::model::{LogSource, Resources, RunId, RunRecord, RunState, Usage};
use actors::run::messages::{CheckCommands, KillRun, StopRun};
use actors::run::{adopt, provider_slot, AdoptError, StoredSpec};
use actors::run::{RunActor, RunSpec};
use actors::store::{Admission, Claim, ClaimOutcome, RunCommand};
use actors::store::{CreateOutcome, RunFilter};
use agent_shim::protocol::BundleInfo;
use bytes::Bytes;
use chrono::Utc;
use futures_util::{Stream, StreamExt};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::ApiAuth;
use crate::bundle::Bundle;
use crate::config::{resolve_execution, resolve_resources, ConfigError, Project};
use crate::server::error::{ApiError, ErrorBody, ErrorCode};
use crate::server::state::AppState;

/// Largest task text accepted.
const MAX_TASK_BYTES: usize = 1024 * 1024;
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// `POST /v1/runs`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    /// Agent name: a directory under `.codebolt/agents/`.
    pub agent: String,
    pub task: String,
    /// Provider name; overrides the agent manifest and the project default.
    pub execution: Option<String>,
    /// Merged field by field over the manifest's and the provider's defaults.
    pub resources: Option<Resources>,
    /// Extra environment for the agent.
    pub env: Option<BTreeMap<String, String>>,
    /// Absolute time to live of the run, in seconds.
    pub timeout_s: Option<u64>,
    /// Client-chosen run id: creating the same id twice returns the first run.
    #[schema(value_type = Option<String>)]
    pub id: Option<Uuid>,
}

/// `POST /v1/runs/{id}/stop`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds the agent gets to exit after SIGTERM; the server default when absent.
    pub grace_s: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub state: Option<String>,
    pub agent: Option<String>,
    pub provider: Option<String>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunList {
    pub runs: Vec<RunRecord>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Keep the stream open and send new events until the run ends.
    #[serde(default)]
    pub follow: bool,
    /// Only events with a higher index (also read from `Last-Event-ID`).
    pub after: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// `agent` (default) or `provider`.
    pub source: Option<String>,
    #[serde(default)]
    pub follow: bool,
    pub after: Option<u64>,
}

pub fn parse_run_id(raw: &str) -> Result<RunId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::invalid(format!("run id '{raw}' is not a UUID")))
}

pub async fn load_run(state: &AppState, id: RunId) -> Result<RunRecord, ApiError> {
    state
        .store
        .get_run(id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("run {id} not found")))
}

fn validate(body: &CreateRun) -> Result<(), ApiError> {
    if body.agent.trim().is_empty() {
        return Err(ApiError::invalid("agent: must not be empty"));
    }
    if body.task.trim().is_empty() {
        return Err(ApiError::invalid("task: must not be empty"));
    }
    if body.task.len() > MAX_TASK_BYTES {
        return Err(ApiError::invalid(format!(
            "task: {} bytes is more than the limit of {MAX_TASK_BYTES}",
            body.task.len()
        )));
    }
    if let Some(res) = &body.resources {
        if res.memory_mb == Some(0) {
            return Err(ApiError::invalid(
                "resources.memory_mb: must be greater than zero",
            ));
        }
        if let Some(cpu) = res.cpu {
            if !cpu.is_finite() || cpu <= 0.0 {
                return Err(ApiError::invalid(format!(
                    "resources.cpu: {cpu} is not a positive number"
                )));
            }
        }
    }
    if body.timeout_s == Some(0) {
        return Err(ApiError::invalid("timeout_s: must be greater than zero"));
    }
    for name in body.env.iter().flat_map(|env| env.keys()) {
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(ApiError::invalid(format!(
                "env.{name}: not a valid environment variable name"
            )));
        }
        if name.starts_with("CODEBOLT_") || name == "TRACEPARENT" {
            return Err(ApiError::invalid(format!(
                "env.{name}: reserved for the control plane"
            )));
        }
    }
    Ok(())
}

fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get("Idempotency-Key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::invalid("Idempotency-Key header: must be visible ASCII"))?;
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::invalid(format!(
            "Idempotency-Key header: must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
        )));
    }
    Ok(Some(key.to_string()))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

/// The run's trace id and the W3C `traceparent` handed to its sandbox, from the root span's
/// OpenTelemetry context (random ids when no OpenTelemetry layer is installed).
fn trace_context(span: &tracing::Span) -> (String, String) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = span.context();
    let otel = context.span();
    let sc = otel.span_context();
    if sc.is_valid() {
        let trace_id = sc.trace_id().to_string();
        let traceparent = format!("00-{trace_id}-{}-01", sc.span_id());
        (trace_id, traceparent)
    } else {
        let trace_id = random_hex(16);
        let traceparent = format!("00-{trace_id}-{}-01", random_hex(8));
        (trace_id, traceparent)
    }
}

fn config_error(err: ConfigError, agent: &str) -> ApiError {
    match err {
        ConfigError::AgentNotFound { .. } => ApiError::new(
            ErrorCode::UnknownAgent,
            format!("agent: no agent named '{agent}' ({err})"),
        ),
        ConfigError::InvalidAgentName { .. } => ApiError::invalid(format!("agent: {err}")),
        other => ApiError::new(ErrorCode::UnknownAgent, other.to_string()),
    }
}

/// A retried create must describe the same run as the first one.
fn same_request(existing: &RunRecord, body: &CreateRun) -> bool {
    existing.agent == body.agent && existing.task == body.task
}

#[utoipa::path(
    post, path = "/v1/runs", tag = "runs",
    request_body = CreateRun,
    params(("Idempotency-Key" = Option<String>, Header, description = "retries with the same key return the same run")),
    responses(
        (status = 201, description = "run created", body = RunRecord),
        (status = 200, description = "the run an earlier request with the same key or id created", body = RunRecord),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody),
    )
)]
pub async fn create_run(
    _auth: ApiAuth,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<CreateRun>,
) -> Result<HttpResponse, ApiError> {
    // The run's `pending` time is when its request arrived.
    let received = Utc::now();
    let body = body.into_inner();
    validate(&body)?;
    let key = idempotency_key(&req)?;

    // A retry returns the run the first request created, before any other work.
    let replay = |existing: RunRecord| -> Result<HttpResponse, ApiError> {
        if !same_request(&existing, &body) {
            return Err(ApiError::new(
                ErrorCode::IdempotencyConflict,
                format!(
                    "run {} was created by an earlier request with the same key or id but a different agent or task",
                    existing.id
                ),
            ));
        }
        Ok(HttpResponse::Ok().json(existing))
    };
    if let Some(id) = body.id {
        if let Some(existing) = state.store.get_run(id).await? {
            return replay(existing);
        }
    }

    let id = body.id.unwrap_or_else(Uuid::new_v4);
    // The root of the run's trace: everything the run does is a descendant.
    let run_span = tracing::info_span!(
        parent: None,
        "codebolt.run",
        run.id = %id,
        trace_id = tracing::field::Empty,
        run.agent = %body.agent,
        run.provider = tracing::field::Empty,
        run.state = tracing::field::Empty,
        run.failure = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let routing = tracing::info_span!(
        parent: &run_span,
        "provider.route",
        provider = tracing::field::Empty
    );
    let workspace = state.workspace.clone();
    let agent = body.agent.clone();
    let (manifest, settings, agent_dir) = web::block(move || {
        let project = Project::load(&workspace)?;
        let manifest = project.agent(&agent)?;
        let dir = project.agent_dir(&agent)?;
        Ok::<_, ConfigError>((manifest, project.settings().clone(), dir))
    })
    .await
    .map_err(|err| ApiError::internal(format!("project loading failed: {err}")))?
    .map_err(|err| config_error(err, &body.agent))?;

    let provider_name = resolve_execution(body.execution.as_deref(), &manifest, &settings);
    let provider = state.config.provider(&provider_name).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownProvider,
            format!(
                "execution: no provider named '{provider_name}' (configured: {})",
                state
                    .config
                    .providers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let resources = resolve_resources(
        &body.resources.clone().unwrap_or_default(),
        &manifest,
        provider,
    );
    routing.record("provider", provider_name.as_str());
    run_span.record("run.provider", provider_name.as_str());
    drop(routing);

    let bundle_span = tracing::info_span!(parent: &run_span, "bundle.build");
    let bundle = web::block(move || bundle_span.in_scope(|| Bundle::build(&agent_dir)))
        .await
        .map_err(|err| ApiError::internal(format!("bundle building failed: {err}")))?
        .map_err(|err| ApiError::invalid(format!("agent: bundle could not be built: {err}")))?;
    // Every replica may be asked for it (the shim calls back through the load balancer).
    let bundle = match state.bundle(&bundle.sha256) {
        Some(kept) => kept,
        None => {
            state
                .store
                .put_blob(&bundle_blob_key(&bundle.sha256), &bundle.bytes)
                .await?;
            state.keep_bundle(bundle)
        }
    };

    let (trace_id, traceparent) = trace_context(&run_span);
    // On the root span, so every JSON log line within the run names its trace.
    run_span.record("trace_id", trace_id.as_str());
    let mut env = manifest.env.clone();
    env.extend(body.env.clone().unwrap_or_default());
    let now = received;
    let record = RunRecord {
        id,
        agent: body.agent.clone(),
        task: body.task.clone(),
        provider: provider_name,
        state: RunState::Pending,
        remote_host: None,
        sandbox_id: None,
        created_at: now,
        state_times: BTreeMap::from([(RunState::Pending, now)]),
        exit_code: None,
        failure: None,
        termination: None,
        resources,
        usage: Usage::default(),
        cost_estimate: None,
        trace_id,
        owner: state.replica_id.clone(),
        timeout_s: body.timeout_s,
        result: None,
        evidence: None,
        env_names: env.keys().cloned().collect(),
    };
    // Admission against the provider's limit, counted across all replicas.
    let slot = provider_slot(&record.provider);
    let limited = provider.max_concurrent_runs;
    if let Some(limit) = limited {
        if let Admission::Full { in_use } = state.store.acquire_slot(&slot, limit, id).await? {
            return Err(ApiError::new(
                ErrorCode::LimitReached,
                format!(
                    "execution: provider '{}' is at its max_concurrent_runs limit of {limit} ({in_use} runs active); retry later",
                    record.provider
                ),
            ));
        }
    }
    let release_slot = || async {
        if limited.is_some() {
            if let Err(err) = state.store.release_slot(&slot, id).await {
                tracing::warn!(run_id = %id, error = %err, "could not release a concurrency slot");
            }
        }
    };
    let bundle_info = BundleInfo {
        // A path: each sandbox resolves it against its own callback URL.
        url: format!("/v1/sandbox/runs/{id}/bundle/{}", bundle.sha256),
        sha256: bundle.sha256.clone(),
        size: bundle.size(),
        command: manifest.command.clone(),
    };
    // What another replica needs to take the run over.
    let stored = StoredSpec {
        image: manifest.image.clone(),
        bundle: bundle_info.clone(),
        env: env.clone(),
        traceparent: traceparent.clone(),
    };
    let stored = serde_json::to_vec(&stored)
        .map_err(|err| ApiError::internal(format!("could not encode the run spec: {err}")))?;
    // Stored before the run exists, so a replica that adopts a run whose creator stopped right
    // after creating it always finds what it needs to drive it.
    if let Err(err) = state
        .store
        .put_blob(&StoredSpec::blob_key(id), &stored)
        .await
    {
        release_slot().await;
        return Err(err.into());
    }
    match state.store.create_run(&record, key.as_deref()).await {
        Ok(CreateOutcome::Created) => {}
        Ok(CreateOutcome::Existing(existing)) => {
            if existing.id != id {
                release_slot().await;
            }
            return replay(*existing);
        }
        Err(err) => {
            release_slot().await;
            return Err(err.into());
        }
    }
    let lease = match state
        .store
        .claim_run(id, &state.replica_id, Claim::IfOrphaned)
        .await?
    {
        ClaimOutcome::Claimed { lease, .. } => lease,
        ClaimOutcome::Held { owner } => {
            return Err(ApiError::internal(format!(
                "run {id} was claimed by replica {owner} as it was created"
            )))
        }
    };
    tracing::info!(run_id = %id, trace_id = %record.trace_id, agent = %record.agent, provider = %record.provider, "run created");
    RunActor::launch(
        RunSpec {
            record: record.clone(),
            image: manifest.image.clone(),
            bundle: bundle_info,
            env,
            traceparent,
            span: run_span,
        },
        lease,
        state.run_deps.clone(),
    );
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/v1/runs/{id}")))
        .json(record))
}

#[utoipa::path(
    get, path = "/v1/runs", tag = "runs", params(ListQuery),
    responses((status = 200, body = RunList), (status = 400, body = ErrorBody))
)]
pub async fn list_runs(
    _auth: ApiAuth,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let query = query.into_inner();
    let state_filter = query
        .state
        .as_deref()
        .map(str::parse::<RunState>)
        .transpose()
        .map_err(|err| ApiError::invalid(format!("state: {err}")))?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit: {limit} is not between 1 and 500"
        )));
    }
    let filter = RunFilter {
        state: state_filter,
        agent: query.agent,
        provider: query.provider,
    };
    let page = state
        .store
        .list_runs(&filter, limit, query.cursor.as_deref())
        .await?;
    Ok(HttpResponse::Ok().json(RunList {
        runs: page.runs,
        next_cursor: page.next_cursor,
    }))
}

#[utoipa::path(
    get, path = "/v1/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "run id")),
    responses((status = 200, body = RunRecord), (status = 404, body = ErrorBody))
)]
pub async fn get_run(
    _auth: ApiAuth,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_run_id(&id)?;
    Ok(HttpResponse::Ok().json(load_run(&state, id).await?))
}

#[utoipa::path(
    post, path = "/v1/runs/{id}/stop", tag = "runs",
    params(("id" = String, Path, description = "run id")),
    request_body(content = Option<StopRequest>),
    responses((status = 202, description = "stop accepted; a finished run is returned unchanged", body = RunRecord), (status = 404, body = ErrorBody))
)]
pub async fn stop_run(
    _auth: ApiAuth,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: Option<web::Json<StopRequest>>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_run_id(&id)?;
    let record = load_run(&state, id).await?;
    let grace_s = body.and_then(|b| b.into_inner().grace_s);
    if !record.state.is_terminal() {
        deliver(&state, id, RunCommand::Stop { grace_s }).await?;
    }
    Ok(HttpResponse::Accepted().json(load_run(&state, id).await?))
}

#[utoipa::path(
    post, path = "/v1/runs/{id}/kill", tag = "runs",
    params(("id" = String, Path, description = "run id")),
    responses((status = 202, description = "kill accepted; a finished run is returned unchanged", body = RunRecord), (status = 404, body = ErrorBody))
)]
pub async fn kill_run(
    _auth: ApiAuth,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_run_id(&id)?;
    let record = load_run(&state, id).await?;
    if !record.state.is_terminal() {
        let command = RunCommand::Kill {
            reason: Some("kill requested through the API".into()),
        };
        deliver(&state, id, command).await?;
    }
    Ok(HttpResponse::Accepted().json(load_run(&state, id).await?))
}

/// A stop or kill: to the run's actor when this replica drives the run, else (also when the
/// actor has just stepped down because the run moved) through the store to its owner.
async fn deliver(state: &AppState, id: RunId, command: RunCommand) -> Result<(), ApiError> {
    if let Some(run) = state.registry.get(id) {
        let sent = match &command {
            RunCommand::Stop { grace_s } => run.send(StopRun { grace_s: *grace_s }).await,
            RunCommand::Kill { reason } => {
                run.send(KillRun {
                    reason: reason.clone().unwrap_or_default(),
                })
                .await
            }
        };
        match sent {
            Ok(()) => return Ok(()),
            Err(err) => {
                tracing::info!(run_id = %id, error = %err, "run actor gone; routing the command")
            }
        }
    }
    route_command(state, id, command).await
}

/// A command for a run another replica drives: queued in the store for its owner, who is
/// notified. When no live replica owns the run, this one adopts it, commands included.
async fn route_command(state: &AppState, id: RunId, command: RunCommand) -> Result<(), ApiError> {
    match state.store.push_command(id, &command).await? {
        Some(owner) => {
            tracing::info!(run_id = %id, owner, ?command, "command queued for the run's owner");
            Ok(())
        }
        None => match adopt(id, &state.run_deps, Claim::IfOrphaned).await {
            Ok(Some(run)) => {
                // It takes its queued commands when it starts; asking again is harmless.
                run.do_send(CheckCommands);
                Ok(())
            }
            // Ended meanwhile, or just taken by a replica that will find the command queued.
            Ok(None) | Err(AdoptError::Held { .. }) => Ok(()),
            Err(AdoptError::Store(err)) => Err(err.into()),
            Err(err) => Err(ApiError::internal(err.to_string())),
        },
    }
}

fn last_event_id(req: &HttpRequest) -> Result<Option<u64>, ApiError> {
    req.headers()
        .get("Last-Event-ID")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID header: not an event index"))
        })
        .transpose()
}

/// One server-sent event.
fn sse_frame(index: u64, event: &str, data: &impl Serialize) -> Bytes {
    let json = serde_json::to_string(data).unwrap_or_else(|err| {
        serde_json::json!({"error": format!("could not encode: {err}")}).to_string()
    });
    Bytes::from(format!("id: {index}\nevent: {event}\ndata: {json}\n\n"))
}

/// How often a quiet event stream sends a comment, so proxies keep it open.
const SSE_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// Interleaves `: keep-alive` comments into a quiet stream; ends when the stream ends.
fn with_keepalive<S>(stream: S) -> impl Stream<Item = Result<Bytes, actix_web::Error>>
where
    S: Stream<Item = Result<Bytes, actix_web::Error>> + Unpin + 'static,
{
    futures_util::stream::unfold(stream, |mut stream| async move {
        tokio::select! {
            item = stream.next() => item.map(|item| (item, stream)),
            () = tokio::time::sleep(SSE_KEEPALIVE) => {
                Some((Ok(Bytes::from_static(b": keep-alive\n\n")), stream))
            }
        }
    })
}

fn sse_response<S>(stream: S) -> HttpResponse
where
    S: Stream<Item = Result<Bytes, actix_web::Error>> + Unpin + 'static,
{
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(with_keepalive(stream))
}

#[utoipa::path(
    get, path = "/v1/runs/{id}/events", tag = "runs",
    params(("id" = String, Path, description = "run id"), EventsQuery),
    responses((status = 200, description = "server-sent events, each `data` a RunEvent plus the run's `trace_id`; history first", content_type = "text/event-stream", body = actors::model::RunEvent), (status = 404, body = ErrorBody))
)]
pub async fn run_events(
    _auth: ApiAuth,
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: web::Query<EventsQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let id = parse_run_id(&id)?;
    let record = load_run(&state, id).await?;
    let after = query.after.or(last_event_id(&req)?).unwrap_or(0);
    let events = state.store.events(id, after, query.follow).await?;
    let trace_id = record.trace_id;
    let stream = events.map(move |item| match item {
        Ok(event) => {
            // Each event names the run's trace, so a dashboard can jump from it to the trace.
            let mut data = serde_json::to_value(&event).map_err(|err| {
                actix_web::error::ErrorInternalServerError(format!("event encoding: {err}"))
            })?;
            let name = data
                .get("event")
                .and_then(|e| e.as_str())
                .map_or_else(|| "event".to_string(), String::from);
            if let Some(fields) = data.as_object_mut() {
                fields.insert("trace_id".into(), trace_id.clone().into());
            }
            Ok(sse_frame(event.index, &name, &data))
        }
        Err(err) => Err(actix_web::error::ErrorServiceUnavailable(err.to_string())),
    });
    Ok(sse_response(stream))
}

#[utoipa::path(
    get, path = "/v1/runs/{id}/logs", tag = "runs",
    params(("id" = String, Path, description = "run id"), LogsQuery),
    responses((status = 200, description = "server-sent events, each `data` a LogLine", content_type = "text/event-stream", body = actors::model::LogLine), (status = 404, body = ErrorBody))
)]
pub async fn run_logs(
    _auth: ApiAuth,
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: web::Query<LogsQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let id = parse_run_id(&id)?;
    load_run(&state, id).await?;
    let source = match query.source.as_deref() {
        None | Some("agent") => LogSource::Agent,
        Some("provider") => LogSource::Provider,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "source: '{other}' is not a log source (expected agent or provider)"
            )))
        }
    };
    let after = query.after.or(last_event_id(&req)?).unwrap_or(0);
    let lines = state.store.logs(id, source, after, query.follow).await?;
    let stream = lines.map(|item| match item {
        Ok(line) => Ok(sse_frame(line.index, "log", &line)),
        Err(err) => Err(actix_web::error::ErrorServiceUnavailable(err.to_string())),
    });
    Ok(sse_response(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> CreateRun {
        CreateRun {
            agent: "a".into(),
            task: "t".into(),
            execution: None,
            resources: None,
            env: None,
            timeout_s: None,
            id: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_event_streams_get_keepalive_comments_and_end_with_their_source() {
        let quiet = futures_util::stream::pending::<Result<Bytes, actix_web::Error>>();
        let mut s = Box::pin(with_keepalive(quiet));
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(&first[..], b": keep-alive\n\n");
        let one = futures_util::stream::iter(vec![Ok::<_, actix_web::Error>(Bytes::from("x"))]);
        let items: Vec<_> = with_keepalive(one).collect().await;
        assert_eq!(items.len(), 1);
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut b = body();
        b.task = " ".into();
        assert!(validate(&b).unwrap_err().message.starts_with("task:"));
        let mut b = body();
        b.resources = Some(Resources {
            cpu: Some(-1.0),
            ..Resources::default()
        });
        assert!(validate(&b)
            .unwrap_err()
            .message
            .starts_with("resources.cpu"));
        let mut b = body();
        b.env = Some(BTreeMap::from([("CODEBOLT_RUN_TOKEN".into(), "x".into())]));
        assert!(validate(&b)
            .unwrap_err()
            .message
            .contains("env.CODEBOLT_RUN_TOKEN"));
        let mut b = body();
        b.env = Some(BTreeMap::from([("1BAD".into(), "x".into())]));
        assert!(validate(&b).unwrap_err().message.contains("env.1BAD"));
        let mut b = body();
        b.timeout_s = Some(0);
        assert!(validate(&b).unwrap_err().message.starts_with("timeout_s"));
        assert!(validate(&body()).is_ok());
    }
}
