//! The HTTP API: two front-ends over the same domain types and scheduler. TGI's routes
//! (`handlers`, `types`) and OpenAI's (`openai/`) each map their bodies onto
//! `RequestedParameters`; `submission` validates, admits and queues for both, `sse` encodes
//! their streams, `error` is the one mapping from errors to statuses, and `openapi` describes
//! both in one OpenAPI document.

pub mod error;
mod handlers;
pub mod openai;
pub mod openapi;
pub mod sse;
mod submission;
pub mod types;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use sluice_client::ShardedClient;
use tokio::sync::Semaphore;

use crate::scheduler::SchedulerHandle;
use crate::tokenizer::chat_template::ChatTemplate;
use crate::validation::Validator;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub validator: Arc<Validator>,
    pub scheduler: SchedulerHandle,
    /// One permit per request in flight; none left means 429.
    pub admission: Arc<Semaphore>,
    pub shards: ShardedClient,
    pub info: Arc<types::Info>,
    /// The model's chat template; without one, chat requests get 422.
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// When the server started, in Unix seconds (OpenAI's `created` of the model).
    pub started_at: u64,
}

pub fn router(state: AppState) -> Result<Router, serde_json::Error> {
    Ok(Router::new()
        .route("/", post(handlers::compat_generate))
        .route("/generate", post(handlers::generate))
        .route("/generate_stream", post(handlers::generate_stream))
        .route("/health", get(handlers::health))
        .route("/info", get(handlers::info))
        .route("/metrics", get(handlers::metrics))
        .merge(openai::routes())
        .merge(openapi::routes()?)
        .with_state(state))
}
