//! The one place where errors become HTTP statuses, in TGI's `{error, error_type}` shape.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sluice_client::ClientError;

use super::types::ErrorResponse;
use crate::scheduler::SchedulerError;
use crate::validation::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Input validation error: {0}")]
    Validation(#[from] ValidationError),
    #[error("Model is overloaded")]
    Overloaded,
    #[error(transparent)]
    Generation(#[from] SchedulerError),
    #[error("unhealthy: {0}")]
    Unhealthy(#[from] ClientError),
    #[error("Request failed: {0}")]
    BadRequest(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Validation(_) | Self::BadRequest(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Generation(_) => StatusCode::FAILED_DEPENDENCY,
            Self::Unhealthy(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Validation(_) | Self::BadRequest(_) => "validation",
            Self::Overloaded => "overloaded",
            Self::Generation(_) => "generation",
            Self::Unhealthy(_) => "healthcheck",
        }
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.to_string(),
            error_type: self.error_type().to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, Self::Generation(_)) {
            tracing::error!(error = %self, "request failed");
        }
        (self.status(), Json(self.body())).into_response()
    }
}
