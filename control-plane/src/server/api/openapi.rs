//! The OpenAPI document, generated from the handlers and types.

use actix_web::HttpResponse;
use utoipa::OpenApi;

use super::{providers, runs};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "codebolt control plane",
        description = "Spawn, watch, stop and kill agent runs on remote execution providers."
    ),
    paths(
        runs::create_run,
        runs::list_runs,
        runs::get_run,
        runs::stop_run,
        runs::kill_run,
        runs::run_events,
        runs::run_logs,
        providers::list_providers,
        providers::healthz,
        providers::readyz,
        providers::metrics,
    ),
    components(schemas(
        actors::model::RunRecord,
        actors::model::RunEvent,
        actors::model::LogLine,
        actors::model::RunState,
        actors::model::Failure,
        actors::model::FailureKind,
        actors::router::ProviderStatus,
    ))
)]
pub struct ApiDoc;

pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}
