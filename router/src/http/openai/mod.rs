//! OpenAI's API, a second front-end next to TGI's on the same domain types: each route maps
//! OpenAI's body onto `RequestedParameters` (and, for chat, renders the conversation with the
//! model's chat template), then goes through the same validation, admission and scheduler
//! (`http::submission`) and answers in OpenAI's shapes, errors included (`ApiError::openai_body`).
//!
//! - `types`: the bodies, the refusals, the mapping onto the domain.
//! - `handlers`: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.
//! - `stream`: a streamed answer's chunks, and the answer text OpenAI's clients expect.

pub(super) mod handlers;
mod stream;
pub mod types;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::routing::{get, post};
use axum::Router;

use super::AppState;
use types::{Completion, Usage};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(handlers::models))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
}

/// Seconds since the Unix epoch, OpenAI's `created`.
pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// What every chunk of one answer repeats: its id, creation time and model.
#[derive(Debug, Clone)]
struct AnswerHead {
    id: String,
    created: u64,
    model: String,
}

impl AnswerHead {
    /// A new answer; `kind` is OpenAI's id prefix (`cmpl`, `chatcmpl`).
    fn new(kind: &str, model: &str) -> Self {
        Self {
            id: format!("{kind}-{:032x}", rand::random::<u128>()),
            created: unix_seconds(),
            model: model.to_string(),
        }
    }

    fn envelope<C>(
        &self,
        object: &'static str,
        choices: Vec<C>,
        usage: Option<Usage>,
    ) -> Completion<C> {
        Completion {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }
}
