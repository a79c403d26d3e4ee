//! SageMaker's `/invocations`, as TGI serves it: one route for every kind of body, each
//! answered by the route it belongs to. A body with `inputs` is TGI's (`/`), one with
//! `messages` a chat (`/v1/chat/completions`), one with `prompt` a completion
//! (`/v1/completions`).

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::error::ApiError;
use super::handlers::compat_generate;
use super::json::{from_value, parse};
use super::openai::handlers::{chat_completions, completions};
use super::openapi::{EitherErrors, InvocationEvents, InvocationRequest};
use super::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Generate,
    Chat,
    Completion,
}

impl BodyKind {
    /// Checked in TGI's order, so a body with several of the fields goes where TGI sends it.
    fn of(body: &Value) -> Option<Self> {
        [
            ("inputs", Self::Generate),
            ("messages", Self::Chat),
            ("prompt", Self::Completion),
        ]
        .into_iter()
        .find(|(field, _)| body.get(field).is_some())
        .map(|(_, kind)| kind)
    }
}

#[utoipa::path(
    post,
    path = "/invocations",
    tag = "TGI",
    summary = "SageMaker's route: each body answered by the route it belongs to",
    request_body = InvocationRequest,
    responses(
        (status = 200, description = "The answer of `/`, `/v1/chat/completions` or \
                                      `/v1/completions`, whole or streamed", content(
            (serde_json::Value = "application/json"),
            (inline(InvocationEvents) = "text/event-stream"),
        )),
        EitherErrors,
    )
)]
pub async fn invocations(
    state: State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let body = match parse(body) {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    match BodyKind::of(&body) {
        Some(BodyKind::Generate) => match from_value(body) {
            Ok(request) => compat_generate(state, Ok(Json(request)))
                .await
                .into_response(),
            Err(error) => error.into_response(),
        },
        Some(BodyKind::Chat) => match from_value(body) {
            Ok(request) => chat_completions(state, Ok(Json(request))).await,
            Err(error) => error.into_openai_response(),
        },
        Some(BodyKind::Completion) => match from_value(body) {
            Ok(request) => completions(state, Ok(Json(request))).await,
            Err(error) => error.into_openai_response(),
        },
        None => ApiError::BadRequest(
            "the body must have `inputs` (TGI), `messages` (chat) or `prompt` (completion)".into(),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_body_decides_the_route() {
        let kind = |body: Value| BodyKind::of(&body);
        assert_eq!(kind(json!({"inputs": "a"})), Some(BodyKind::Generate));
        assert_eq!(kind(json!({"messages": []})), Some(BodyKind::Chat));
        assert_eq!(kind(json!({"prompt": "a"})), Some(BodyKind::Completion));
        assert_eq!(
            kind(json!({"prompt": "a", "inputs": "b"})),
            Some(BodyKind::Generate)
        );
        assert_eq!(kind(json!({"text": "a"})), None);
        assert_eq!(kind(json!(["inputs"])), None);
    }
}
