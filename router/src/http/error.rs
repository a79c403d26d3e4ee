//! The one place where errors become HTTP statuses, with the two bodies they are answered in:
//! TGI's `{error, error_type}` and, on the OpenAI routes, `{error: {message, type, param, code}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sluice_client::ClientError;

use super::openai::types::{OpenAiError, OpenAiErrorResponse};
use super::types::ErrorResponse;
use crate::scheduler::SchedulerError;
use crate::tokenizer::chat_template::ChatTemplateError;
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
    /// The scheduler is bringing the shards back after a failure: waiting for them to answer,
    /// or warming up shards that restarted.
    #[error("unhealthy: the shards are coming back from a failure and are not ready yet")]
    ShardsRecovering,
    /// The router is draining after SIGTERM.
    #[error("Server is shutting down")]
    ShuttingDown,
    /// A body that parsed as JSON but does not fit the route's request.
    #[error("Request failed: {0}")]
    BadRequest(String),
    /// A body that is not JSON at all.
    #[error("Malformed request: {0}")]
    MalformedJson(String),
    /// A body not declared as JSON (`Content-Type`).
    #[error("Unsupported media type: {0}")]
    UnsupportedMediaType(String),
    /// A body over `--payload-limit`.
    #[error("Payload too large: the request body is over this server's size limit")]
    PayloadTooLarge,
    /// `--api-key` is set and the request does not carry it.
    #[error("Unauthorized: this server requires `Authorization: Bearer <api key>`")]
    Unauthorized,
    #[error("{0}")]
    ChatTemplate(#[from] ChatTemplateError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Validation(_) | Self::BadRequest(_) | Self::ChatTemplate(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::MalformedJson(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Generation(_) => StatusCode::FAILED_DEPENDENCY,
            Self::Unhealthy(_) | Self::ShardsRecovering | Self::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Validation(_)
            | Self::BadRequest(_)
            | Self::MalformedJson(_)
            | Self::UnsupportedMediaType(_)
            | Self::PayloadTooLarge
            | Self::ChatTemplate(_) => "validation",
            Self::Unauthorized => "unauthorized",
            Self::Overloaded => "overloaded",
            Self::Generation(_) => "generation",
            Self::Unhealthy(_) | Self::ShardsRecovering => "healthcheck",
            Self::ShuttingDown => "unavailable",
        }
    }

    pub fn body(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.to_string(),
            error_type: self.error_type().to_string(),
        }
    }

    /// The request parameter at fault, when there is one, as OpenAI spells it.
    fn param(&self) -> Option<&'static str> {
        match self {
            Self::Validation(error) => error.parameter().map(openai_name),
            Self::ChatTemplate(_) => Some("messages"),
            _ => None,
        }
    }

    /// OpenAI's `code`: TGI's `error_type`, except where OpenAI has its own.
    fn openai_code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "invalid_api_key",
            _ => self.error_type(),
        }
    }

    /// The body on OpenAI's routes: OpenAI's error `type` is read off the status, and `code`
    /// carries TGI's `error_type` (`openai_code`).
    pub fn openai_body(&self) -> OpenAiErrorResponse {
        let status = self.status();
        let kind = if status == StatusCode::TOO_MANY_REQUESTS {
            "rate_limit_error"
        } else if status.is_server_error() || status == StatusCode::FAILED_DEPENDENCY {
            "server_error"
        } else {
            "invalid_request_error"
        };
        OpenAiErrorResponse {
            error: OpenAiError {
                message: openai_spelling(self.to_string()),
                kind,
                param: self.param(),
                code: Some(self.openai_code()),
            },
        }
    }

    /// Answers in OpenAI's body, with the same status as anywhere else.
    pub fn into_openai_response(self) -> Response {
        self.log();
        (self.status(), Json(self.openai_body())).into_response()
    }

    fn log(&self) {
        if matches!(self, Self::Generation(_)) {
            tracing::error!(error = %self, "request failed");
        }
    }
}

/// TGI's names of the parameters that OpenAI's API spells otherwise.
const OPENAI_NAMES: [(&str, &str); 2] = [("inputs", "prompt"), ("max_new_tokens", "max_tokens")];

fn openai_name(tgi_name: &'static str) -> &'static str {
    OPENAI_NAMES
        .iter()
        .find(|(tgi, _)| *tgi == tgi_name)
        .map_or(tgi_name, |(_, openai)| openai)
}

/// A message with the parameters it names in backticks spelled as OpenAI's API spells them.
fn openai_spelling(message: String) -> String {
    OPENAI_NAMES.iter().fold(message, |message, (tgi, openai)| {
        message.replace(&format!("`{tgi}`"), &format!("`{openai}`"))
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        (self.status(), Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsupported_parameter_is_a_422_naming_it_in_both_shapes() {
        let error = ApiError::from(ValidationError::Unsupported("n"));
        assert_eq!(error.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let openai = serde_json::to_value(error.openai_body()).unwrap();
        assert_eq!(
            openai,
            serde_json::json!({"error": {
                "message": "Input validation error: `n` is not supported yet",
                "type": "invalid_request_error",
                "param": "n",
                "code": "validation",
            }})
        );
        let tgi = serde_json::to_value(error.body()).unwrap();
        assert_eq!(tgi["error_type"], "validation");
    }

    #[test]
    fn statuses_and_openai_types_follow_the_one_mapping() {
        let cases = [
            (
                ApiError::MalformedJson("x".into()),
                400,
                "invalid_request_error",
            ),
            (
                ApiError::ChatTemplate(ChatTemplateError::Missing),
                422,
                "invalid_request_error",
            ),
            (
                ApiError::UnsupportedMediaType("x".into()),
                415,
                "invalid_request_error",
            ),
            (ApiError::PayloadTooLarge, 413, "invalid_request_error"),
            (ApiError::Unauthorized, 401, "invalid_request_error"),
            (ApiError::Overloaded, 429, "rate_limit_error"),
            (ApiError::ShardsRecovering, 503, "server_error"),
            (
                ApiError::Generation(SchedulerError::Closed),
                424,
                "server_error",
            ),
        ];
        for (error, status, kind) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
            let body = serde_json::to_value(error.openai_body()).unwrap();
            assert_eq!(body["error"]["type"], kind, "{error}");
            assert_eq!(body["error"]["code"], error.openai_code());
            assert_eq!(body["error"]["message"], error.to_string());
        }
        let unauthorized = ApiError::Unauthorized.openai_body().error;
        assert_eq!(
            (unauthorized.kind, unauthorized.code),
            ("invalid_request_error", Some("invalid_api_key"))
        );
        assert_eq!(ApiError::Unauthorized.body().error_type, "unauthorized");
        let too_long = ApiError::from(ValidationError::TotalTooLong {
            max: 10,
            input: 8,
            new: 5,
        });
        let body = too_long.openai_body().error;
        assert_eq!(body.param, Some("max_tokens"));
        assert_eq!(
            body.message,
            "Input validation error: `prompt` tokens + `max_tokens` must be <= 10. \
             Given: 8 `prompt` tokens and 5 `max_tokens`"
        );
        assert!(too_long.body().error.contains("`max_new_tokens`"));
        let missing = ApiError::ChatTemplate(ChatTemplateError::Missing);
        assert_eq!(missing.to_string(), "the model has no chat template");
        assert_eq!(missing.openai_body().error.param, Some("messages"));
    }
}
