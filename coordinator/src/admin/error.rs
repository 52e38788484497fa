//! The admin API's errors, and the one place they map to HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::ErrorBody;
use crate::authkey::CreateError;
use crate::flows::{FilterError, SegmentError};
use crate::nodes::DeleteError;
use crate::store::StoreError;

/// A failed admin request. The message names the problem and the fix.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// The policy did not parse or failed its tests; the policy in force is unchanged.
    #[error("policy refused; the policy in force is unchanged:\n{0}")]
    PolicyRejected(String),
    /// The request body is over the size the endpoint takes.
    #[error("{0}")]
    TooLarge(String),
    /// The store failed; the request may be retried.
    #[error("{0}")]
    Internal(#[from] StoreError),
    /// The flow records could not be read.
    #[error("{0}")]
    Flows(#[from] SegmentError),
    /// The task answering the request failed.
    #[error("the coordinator failed to answer: {0}")]
    Task(#[source] tokio::task::JoinError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PolicyRejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Internal(_) | ApiError::Flows(_) | ApiError::Task(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        if status.is_server_error() {
            tracing::error!("admin request failed: {self}");
        }
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

impl From<CreateError> for ApiError {
    fn from(e: CreateError) -> Self {
        match e {
            CreateError::BadTag(message) => ApiError::BadRequest(message),
            CreateError::Store(e) => e.into(),
        }
    }
}

impl From<FilterError> for ApiError {
    fn from(e: FilterError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<DeleteError> for ApiError {
    fn from(e: DeleteError) -> Self {
        match e {
            DeleteError::NotFound(_) => ApiError::NotFound(e.to_string()),
            DeleteError::Ambiguous { .. } => ApiError::BadRequest(e.to_string()),
            DeleteError::Store(e) => e.into(),
        }
    }
}
