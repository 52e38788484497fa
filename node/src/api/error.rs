//! The local API's errors and their one mapping to HTTP status codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use weft_engine::device::CommandError;

/// Why an API call failed. Every message names the problem and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The request itself is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// The coordinator refused the node; the message is the coordinator's.
    #[error("{0}")]
    Refused(String),
    /// The coordinator could not be authenticated (wrong pinned key).
    #[error("{0}")]
    Handshake(String),
    /// The coordinator did not answer in time; weftd keeps trying.
    #[error("{0}")]
    Timeout(String),
    /// The caller may read but not change the node.
    #[error("{0}")]
    Forbidden(String),
    /// What was asked for does not exist (e.g. an address no peer has).
    #[error("{0}")]
    NotFound(String),
    /// weftd is shutting down.
    #[error("weftd is shutting down; start it again and retry")]
    ShuttingDown,
    /// weftd failed on its side (e.g. cannot configure the network interface).
    #[error("{0}")]
    Internal(String),
}

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The sentence to show the operator.
    pub error: String,
    /// A machine-readable kind: `bad-request`, `refused`, `forbidden`, `handshake`, `timeout`, `not-found`, `shutting-down`, `internal`.
    pub kind: String,
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Invalid(message) => ApiError::BadRequest(message),
            CommandError::Refused(message) => ApiError::Refused(message),
            CommandError::Handshake(message) => ApiError::Handshake(message),
            CommandError::NotFound(message) => ApiError::NotFound(message),
            CommandError::Internal(message) => ApiError::Internal(message),
        }
    }
}

impl ApiError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Refused(_) | ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Handshake(_) => StatusCode::BAD_GATEWAY,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad-request",
            ApiError::Refused(_) => "refused",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Handshake(_) => "handshake",
            ApiError::Timeout(_) => "timeout",
            ApiError::NotFound(_) => "not-found",
            ApiError::ShuttingDown => "shutting-down",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.to_string(),
            kind: self.kind().to_owned(),
        };
        (self.status(), Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_status_codes() {
        let cases = [
            (ApiError::BadRequest("x".into()), 400),
            (ApiError::Refused("x".into()), 403),
            (ApiError::Handshake("x".into()), 502),
            (ApiError::Timeout("x".into()), 504),
            (ApiError::NotFound("x".into()), 404),
            (ApiError::ShuttingDown, 503),
            (ApiError::Internal("x".into()), 500),
        ];
        for (error, code) in cases {
            assert_eq!(error.status().as_u16(), code, "{error:?}");
            assert_eq!(error.into_response().status().as_u16(), code);
        }
    }

    #[test]
    fn refusals_and_handshake_failures_are_client_visible_failures() {
        assert!(ApiError::Refused("x".into()).status().is_client_error());
        assert!(!ApiError::Handshake("x".into()).status().is_success());
    }
}
