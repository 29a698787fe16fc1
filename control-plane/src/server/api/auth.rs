//! API authentication: bearer tokens from the server config. A server without tokens only binds
//! loopback (checked at start-up). Run tokens never authorise the API.

use std::future::{ready, Ready};

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};

use crate::server::error::{ApiError, ErrorCode};
use crate::server::state::AppState;

/// Present in a handler's arguments: the request carried a valid API token (or none is needed).
pub struct ApiAuth;

pub fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

impl FromRequest for ApiAuth {
    type Error = ApiError;
    type Future = Ready<Result<ApiAuth, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return ready(Err(ApiError::internal("server state missing")));
        };
        if state.api_tokens.is_empty() {
            return ready(Ok(ApiAuth));
        }
        let result = match bearer(req) {
            None => Err(ApiError::new(
                ErrorCode::Unauthorized,
                "this server requires an API token: send Authorization: Bearer <token>",
            )),
            Some(token) if state.api_tokens.iter().any(|t| t.matches(token)) => Ok(ApiAuth),
            Some(_) => Err(ApiError::new(
                ErrorCode::Unauthorized,
                "the API token is not valid",
            )),
        };
        ready(result)
    }
}
