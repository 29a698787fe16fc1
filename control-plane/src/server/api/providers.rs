//! `/v1/providers`, health, readiness and metrics.

use actix_web::{web, HttpResponse};
use actors::router::{ListProviders, ProviderStatus};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::ApiAuth;
use crate::server::error::{ApiError, ErrorBody};
use crate::server::state::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderList {
    pub providers: Vec<ProviderStatus>,
}

async fn statuses(state: &AppState) -> Result<Vec<ProviderStatus>, ApiError> {
    state
        .router
        .send(ListProviders)
        .await
        .map_err(|err| ApiError::internal(format!("provider router unavailable: {err}")))
}

#[utoipa::path(
    get, path = "/v1/providers", tag = "providers",
    responses((status = 200, body = ProviderList), (status = 401, body = ErrorBody))
)]
pub async fn list_providers(
    _auth: ApiAuth,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(ProviderList {
        providers: statuses(&state).await?,
    }))
}

#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "the process is up")))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "health", responses((status = 200, description = "ready to serve"), (status = 503, body = ErrorBody)))]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.store.ping().await?;
    statuses(&state).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})))
}

#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let providers = statuses(&state).await?;
    let mut out = String::new();
    out.push_str("# HELP codebolt_runs_active Runs with a live run actor on this replica.\n");
    out.push_str("# TYPE codebolt_runs_active gauge\n");
    out.push_str(&format!("codebolt_runs_active {}\n", state.registry.len()));
    out.push_str(
        "# HELP codebolt_provider_healthy Whether a provider is healthy (1) or not (0).\n",
    );
    out.push_str("# TYPE codebolt_provider_healthy gauge\n");
    for p in &providers {
        out.push_str(&format!(
            "codebolt_provider_healthy{{provider=\"{}\",kind=\"{}\"}} {}\n",
            p.name,
            p.kind,
            u8::from(p.healthy)
        ));
    }
    out.push_str("# HELP codebolt_provider_restarts_total Restarts of a provider actor.\n");
    out.push_str("# TYPE codebolt_provider_restarts_total counter\n");
    for p in &providers {
        out.push_str(&format!(
            "codebolt_provider_restarts_total{{provider=\"{}\"}} {}\n",
            p.name, p.restarts
        ));
    }
    out.push_str(
        "# HELP codebolt_provider_active_runs Sandboxes a provider holds for live runs.\n",
    );
    out.push_str("# TYPE codebolt_provider_active_runs gauge\n");
    for p in &providers {
        out.push_str(&format!(
            "codebolt_provider_active_runs{{provider=\"{}\"}} {}\n",
            p.name, p.active_runs
        ));
    }
    let stats = &state.cluster_stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let counters = [
        (
            "codebolt_store_fenced_writes_total",
            "Run writes the store refused because another replica holds a newer lease.",
            state.store.fenced_writes(),
        ),
        (
            "codebolt_runs_adopted_total",
            "Runs this replica adopted from replicas whose heartbeat lapsed.",
            load(&stats.adopted_orphans),
        ),
        (
            "codebolt_runs_released_total",
            "Runs this replica gave up because another replica took them over.",
            load(&stats.released),
        ),
        (
            "codebolt_commands_routed_total",
            "Stop and kill commands from other replicas delivered to this replica's runs.",
            load(&stats.commands_routed),
        ),
        (
            "codebolt_heartbeat_failures_total",
            "Replica heartbeats the store did not take.",
            load(&stats.heartbeat_failures),
        ),
    ];
    for (name, help, value) in counters {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        ));
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out))
}
