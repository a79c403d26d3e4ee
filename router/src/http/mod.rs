//! The HTTP API: TGI's routes over the scheduler.

pub mod error;
mod handlers;
pub mod sse;
pub mod types;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use sluice_client::ShardedClient;
use tokio::sync::Semaphore;

use crate::scheduler::SchedulerHandle;
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
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", post(handlers::compat_generate))
        .route("/generate", post(handlers::generate))
        .route("/generate_stream", post(handlers::generate_stream))
        .route("/health", get(handlers::health))
        .route("/info", get(handlers::info))
        .route("/metrics", get(handlers::metrics))
        .with_state(state)
}
