//! API errors: JSON `{error: {code, message}}` with a status code chosen in one table.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use actors::store::StoreError;

/// Error codes and their HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    UnknownAgent,
    UnknownProvider,
    IdempotencyConflict,
    /// A concurrency limit (`max_concurrent_runs`) is reached.
    LimitReached,
    StoreUnavailable,
    ProviderUnavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::UnknownAgent => "unknown_agent",
            ErrorCode::UnknownProvider => "unknown_provider",
            ErrorCode::IdempotencyConflict => "idempotency_conflict",
            ErrorCode::LimitReached => "limit_reached",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::ProviderUnavailable => "provider_unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::UnknownAgent | ErrorCode::UnknownProvider => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ErrorCode::IdempotencyConflict => StatusCode::CONFLICT,
            ErrorCode::LimitReached => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::StoreUnavailable | ErrorCode::ProviderUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Internal, message)
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code.status()
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_string(),
                message: self.message.clone(),
            },
        })
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let code = match &err {
            StoreError::Unavailable { .. } => ErrorCode::StoreUnavailable,
            StoreError::RunNotFound { .. } => ErrorCode::NotFound,
            StoreError::IdempotencyConflict { .. } => ErrorCode::IdempotencyConflict,
            StoreError::BadCursor { .. } => ErrorCode::InvalidRequest,
            _ => ErrorCode::Internal,
        };
        ApiError::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_client_or_server_status() {
        for code in [
            ErrorCode::InvalidRequest,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::UnknownAgent,
            ErrorCode::UnknownProvider,
            ErrorCode::IdempotencyConflict,
            ErrorCode::LimitReached,
            ErrorCode::StoreUnavailable,
            ErrorCode::ProviderUnavailable,
            ErrorCode::Internal,
        ] {
            let status = code.status();
            assert!(
                status.is_client_error() || status.is_server_error(),
                "{code:?}"
            );
        }
    }

    #[test]
    fn store_outage_is_503() {
        let err: ApiError = StoreError::Unavailable {
            message: "down".into(),
        }
        .into();
        assert_eq!(err.code.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
