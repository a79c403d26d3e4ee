//! The HTTP API: two front-ends over the same domain types and scheduler. TGI's routes
//! (`handlers`, `types`) and OpenAI's (`openai/`) each map their bodies onto
//! `RequestedParameters`; `submission` validates, admits and queues for both, `sse` encodes
//! their streams, `error` is the one mapping from errors to statuses, and `openapi` describes
//! both in one OpenAPI document.
//!
//! Around them: `json` (reading a body, the same way everywhere), `tokenize` (`/tokenize`,
//! `/chat_tokenize`), `invocations` (SageMaker's one route for every body), `compute_headers`
//! (TGI's `x-*` headers), and the layers in front of every route: `auth` (`--api-key`), the
//! body size limit (`--payload-limit`) and `cors` (`--cors-allow-origin`).

pub mod auth;
mod compute_headers;
pub mod cors;
pub mod error;
mod handlers;
mod invocations;
pub mod json;
pub mod openai;
pub mod openapi;
pub mod sse;
mod submission;
mod tokenize;
pub mod types;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use sluice_client::ShardedClient;
use tokio::sync::Semaphore;
use tower_http::cors::CorsLayer;

use crate::drain::Draining;
use crate::scheduler::SchedulerHandle;
use crate::tokenizer::chat_template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::validation::Validator;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub validator: Arc<Validator>,
    /// The validator's tokenizer, for `/tokenize`.
    pub tokenizer: Arc<Tokenizer>,
    pub scheduler: SchedulerHandle,
    /// One permit per request in flight; none left means 429.
    pub admission: Arc<Semaphore>,
    /// Set on SIGTERM: new requests get 503 and /health fails.
    pub draining: Draining,
    /// The next request's id, for the logs.
    pub request_ids: Arc<AtomicU64>,
    pub shards: ShardedClient,
    pub info: Arc<types::Info>,
    /// The model's chat template; without one, chat requests get 422.
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// When the server started, in Unix seconds (OpenAI's `created` of the model).
    pub started_at: u64,
}

/// What stands in front of every route.
pub struct Edges {
    /// Requests must carry it, except on `auth::is_open` routes.
    pub api_key: Option<auth::ApiKey>,
    /// The largest body read, in bytes; a larger one is a 413.
    pub payload_limit: usize,
    /// None: no CORS headers.
    pub cors: Option<CorsLayer>,
}

pub fn router(state: AppState, edges: Edges) -> Result<Router, serde_json::Error> {
    let mut app = Router::new()
        .route("/", post(handlers::compat_generate))
        .route("/generate", post(handlers::generate))
        .route("/generate_stream", post(handlers::generate_stream))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/chat_tokenize", post(tokenize::chat_tokenize))
        .route("/invocations", post(invocations::invocations))
        .route("/health", get(handlers::health))
        .route("/info", get(handlers::info))
        .route("/metrics", get(handlers::metrics))
        .merge(openai::routes())
        .merge(openapi::routes()?)
        .with_state(state)
        .layer(DefaultBodyLimit::max(edges.payload_limit));
    // Each layer wraps those before it: CORS answers preflights before authentication, and
    // a 401 still carries CORS headers, so a browser can read it.
    if let Some(key) = edges.api_key {
        app = app.layer(middleware::from_fn_with_state(
            Arc::new(key),
            auth::require_api_key,
        ));
    }
    if let Some(cors) = edges.cors {
        app = app.layer(cors);
    }
    // Outermost: the span covers the whole request.
    app = app.layer(middleware::from_fn(crate::trace::http_request_span));
    Ok(app)
}
