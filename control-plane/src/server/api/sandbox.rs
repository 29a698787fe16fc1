//! Endpoints for sandboxes, authorised by run tokens only: the shim's WebSocket and its bundle.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use actors::sandbox_connection::{ConnectionDeps, SandboxConnection};
use actors::token::{self, TokenError};

use super::auth::bearer;
use super::runs::parse_run_id;
use crate::server::error::{ApiError, ErrorCode};
use crate::server::state::AppState;

/// `GET /v1/sandbox/connect`: upgrades to the shim protocol. The token is checked on `hello`; a
/// refused token closes the socket with 1008 (policy violation) and the reason.
pub async fn connect(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let token = bearer(&req).unwrap_or_default().to_string();
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let timeouts = state.run_deps.settings.timeouts;
    SandboxConnection::start(
        session,
        stream,
        token,
        ConnectionDeps {
            store: state.store.clone(),
            registry: state.registry.clone(),
            run_deps: state.run_deps.clone(),
            silence_limit: timeouts.heartbeat_interval * 3,
        },
    );
    Ok(response)
}

fn token_error(err: TokenError) -> ApiError {
    match err {
        TokenError::Store(store) => store.into(),
        TokenError::Missing => ApiError::new(ErrorCode::Unauthorized, err.to_string()),
        other => ApiError::new(ErrorCode::Forbidden, other.to_string()),
    }
}

/// `GET /v1/sandbox/runs/{id}/bundle/{sha256}`: the agent bundle, to that run's token only.
pub async fn bundle(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, sha) = path.into_inner();
    let id = parse_run_id(&id)?;
    let secret = bearer(&req).unwrap_or_default();
    token::verify(&*state.store, secret, id)
        .await
        .map_err(token_error)?;
    // Built here, or by the replica that created the run (kept in the store for every replica).
    let bytes = match state.bundle(&sha) {
        Some(bundle) => bundle.bytes.clone(),
        None => state
            .store
            .get_blob(&bundle_blob_key(&sha))
            .await?
            .map(bytes::Bytes::from)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("no bundle {sha} in this cluster"),
                )
            })?,
    };
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/gzip"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(bytes))
}

/// Store key of an agent bundle, by its SHA-256.
pub fn bundle_blob_key(sha256: &str) -> String {
    format!("bundle:{sha256}")
}
