//! The HTTP routes.

pub mod auth;
pub mod openapi;
pub mod providers;
pub mod runs;
pub mod sandbox;

use actix_web::{error, web, HttpResponse};

use crate::server::error::ApiError;

/// The sandbox endpoints alone (shim connect and bundle download, authorised by run tokens),
/// for the `sandbox_listen` listener.
pub fn sandbox_routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::PathConfig::default()
            .error_handler(|err, _| ApiError::invalid(format!("path: {err}")).into()),
    )
    .service(
        web::scope("/v1/sandbox")
            .route("/connect", web::get().to(sandbox::connect))
            .route("/runs/{id}/bundle/{sha256}", web::get().to(sandbox::bundle)),
    )
    .default_service(web::to(|| async {
        HttpResponse::NotFound().json(serde_json::json!({
            "error": {"code": "not_found", "message": "this listener serves the sandbox endpoints only"}
        }))
    }));
}

/// Every route of the API and the sandbox endpoints.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(2 * 1024 * 1024)
            .error_handler(|err, _| {
                let message = match &err {
                    error::JsonPayloadError::Deserialize(inner) => format!("request body: {inner}"),
                    other => format!("request body: {other}"),
                };
                ApiError::invalid(message).into()
            }),
    )
    .app_data(
        web::QueryConfig::default()
            .error_handler(|err, _| ApiError::invalid(format!("query: {err}")).into()),
    )
    .app_data(
        web::PathConfig::default()
            .error_handler(|err, _| ApiError::invalid(format!("path: {err}")).into()),
    )
    .route("/healthz", web::get().to(providers::healthz))
    .route("/readyz", web::get().to(providers::readyz))
    .route("/metrics", web::get().to(providers::metrics))
    .service(
        web::scope("/v1")
            .route("/openapi.json", web::get().to(openapi::openapi_json))
            .route("/runs", web::post().to(runs::create_run))
            .route("/runs", web::get().to(runs::list_runs))
            .route("/runs/{id}", web::get().to(runs::get_run))
            .route("/runs/{id}/stop", web::post().to(runs::stop_run))
            .route("/runs/{id}/kill", web::post().to(runs::kill_run))
            .route("/runs/{id}/events", web::get().to(runs::run_events))
            .route("/runs/{id}/logs", web::get().to(runs::run_logs))
            .route("/providers", web::get().to(providers::list_providers))
            .route("/sandbox/connect", web::get().to(sandbox::connect))
            .route(
                "/sandbox/runs/{id}/bundle/{sha256}",
                web::get().to(sandbox::bundle),
            ),
    )
    .default_service(web::to(|| async {
        HttpResponse::NotFound().json(serde_json::json!({
            "error": {"code": "not_found", "message": "no such endpoint"}
        }))
    }));
}
