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
    let text = state
        .metrics_pipeline
        .render()
        .map_err(|err| ApiError::internal(format!("metrics could not be collected: {err}")))?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text))
}
