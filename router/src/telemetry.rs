//! What each request reports when it ends: TGI's per-request metrics (same names, types, labels
//! and histogram buckets, so that TGI's dashboards read Sluice unchanged) and one log line with
//! its id, token counts and timings (never its text).

use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

use crate::request::GenerationEnd;

/// TGI's buckets: durations (every metric whose name ends in `duration`) on a geometric scale
/// from 0.15 ms by factors of 1.5; token counts in 100 equal steps up to the router's limit;
/// batch sizes one by one.
pub fn prometheus_builder(
    max_input_tokens: usize,
    max_total_tokens: usize,
) -> Result<PrometheusBuilder, BuildError> {
    let durations: Vec<f64> = (1..=35).map(|power| 0.0001 * 1.5f64.powi(power)).collect();
    let hundredths = |limit: usize| -> Vec<f64> {
        (1..=100)
            .map(|step| limit as f64 / 100.0 * step as f64)
            .collect()
    };
    let batch_sizes: Vec<f64> = (1..=1024).map(f64::from).collect();
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration".to_owned()), &durations)?
        .set_buckets_for_metric(
            Matcher::Full("tgi_request_input_length".to_owned()),
            &hundredths(max_input_tokens),
        )?
        .set_buckets_for_metric(
            Matcher::Full("tgi_request_generated_tokens".to_owned()),
            &hundredths(max_total_tokens),
        )?
        .set_buckets_for_metric(
            Matcher::Full("tgi_request_max_new_tokens".to_owned()),
            &hundredths(max_total_tokens),
        )?
        .set_buckets_for_metric(
            Matcher::Full("tgi_batch_next_size".to_owned()),
            &batch_sizes,
        )
}

/// A generation request arrived at a route.
pub fn record_received() {
    metrics::counter!("tgi_request_count").increment(1);
}

/// A request refused before it was queued (validation, overload, draining), by TGI's error type.
pub fn record_refused(error_type: &'static str) {
    metrics::counter!("tgi_request_failure", "err" => error_type).increment(1);
}

/// One queued request, until it ends. Its sibling sequences (`n`, `best_of`) share it, and only
/// the first sequence's stream reports, so that a request counts once.
#[derive(Debug)]
pub struct RequestTelemetry {
    id: u64,
    received: Instant,
    input_tokens: usize,
    /// When the last token reached the route; None before the first.
    last_token: Option<Instant>,
}

impl RequestTelemetry {
    /// The request passed validation: its sizes are recorded now.
    pub fn validated(id: u64, received: Instant, input_tokens: usize, max_new_tokens: u32) -> Self {
        metrics::histogram!("tgi_request_input_length").record(input_tokens as f64);
        metrics::histogram!("tgi_request_max_new_tokens").record(f64::from(max_new_tokens));
        Self {
            id,
            received,
            input_tokens,
            last_token: None,
        }
    }

    /// A token reached the route: Sluice's time to first token, then inter-token latency.
    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => metrics::histogram!("sluice_time_to_first_token_duration")
                .record(now.saturating_duration_since(self.received).as_secs_f64()),
            Some(last) => metrics::histogram!("sluice_inter_token_latency_duration")
                .record(now.saturating_duration_since(last).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    pub fn succeeded(&self, end: &GenerationEnd) {
        let now = Instant::now();
        let validation = end.queued.saturating_duration_since(self.received);
        let queue = end.started.saturating_duration_since(end.queued);
        let inference = now.saturating_duration_since(end.started);
        let total = now.saturating_duration_since(self.received);
        let per_token = inference / end.generated_tokens.max(1);
        metrics::counter!("tgi_request_success").increment(1);
        metrics::histogram!("tgi_request_duration").record(total.as_secs_f64());
        metrics::histogram!("tgi_request_validation_duration").record(validation.as_secs_f64());
        metrics::histogram!("tgi_request_queue_duration").record(queue.as_secs_f64());
        metrics::histogram!("tgi_request_inference_duration").record(inference.as_secs_f64());
        metrics::histogram!("tgi_request_mean_time_per_token_duration")
            .record(per_token.as_secs_f64());
        metrics::histogram!("tgi_request_generated_tokens").record(f64::from(end.generated_tokens));
        tracing::info!(
            id = self.id,
            input_tokens = self.input_tokens,
            cached_tokens = end.cached_tokens,
            generated_tokens = end.generated_tokens,
            finish_reason = ?end.finish_reason,
            total_ms = millis(total),
            validation_ms = millis(validation),
            queue_ms = millis(queue),
            inference_ms = millis(inference),
            time_per_token_ms = millis(per_token),
            "request finished"
        );
    }

    pub fn failed(&self, error: &dyn std::error::Error) {
        metrics::counter!("tgi_request_failure", "err" => "generation").increment(1);
        tracing::warn!(id = self.id, input_tokens = self.input_tokens, %error, "request failed");
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
