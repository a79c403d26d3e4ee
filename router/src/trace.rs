//! Logs and traces. Logs go to stdout (human-readable, or JSON lines). With `--otlp-endpoint`,
//! spans are also exported over OTLP/gRPC: a request's `http_request` span (its parent taken
//! from an incoming W3C `traceparent`), `validation`, `queue`, and a `step` span for every step
//! it takes part in. Each step's trace context goes to the shards in the gRPC metadata, so their
//! spans of the step join the trace of the step's first request.

use std::collections::HashMap;

use axum::extract::Request;
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use sluice_client::TraceHeaders;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Where spans go, when they are exported.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// An OTLP/gRPC collector, e.g. `http://collector:4317`.
    pub endpoint: String,
    pub service_name: String,
}

/// The span exporter, when there is one; `shutdown` flushes what it still holds.
pub struct SpanExport {
    provider: Option<SdkTracerProvider>,
}

impl SpanExport {
    /// Flushes the buffered spans to the collector.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The processor's shutdown blocks until its export task, on this runtime, is done.
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "flushing the last spans to the OTLP collector failed");
            }
        }
    }
}

/// Installs the global subscriber: logs at info level (or RUST_LOG) and, with `otlp`, the span
/// exporter. Needs a Tokio runtime, which runs the exporter.
pub fn init(json_logs: bool, otlp: Option<&OtlpConfig>) -> anyhow::Result<SpanExport> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let logs = if json_logs {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        tracing_subscriber::fmt::layer().with_ansi(ansi).boxed()
    };
    let provider = otlp.map(tracer_provider).transpose()?;
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer("sluice-router"))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init()?;
    if let Some(otlp) = otlp {
        tracing::info!(endpoint = %otlp.endpoint, service = %otlp.service_name, "exporting traces");
    }
    Ok(SpanExport { provider })
}

fn tracer_provider(otlp: &OtlpConfig) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&otlp.endpoint)
        .build()?;
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let resource = Resource::builder()
        .with_service_name(otlp.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build())
}

/// The W3C trace context of `span`, for a shard call's metadata; empty when it is not traced.
pub fn headers_for(span: &Span) -> TraceHeaders {
    let mut headers = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut headers);
    headers
}

/// Middleware: each POST (the routes that do work) runs in an `http_request` span, the child of
/// the caller's span when the request carries a `traceparent`.
pub async fn http_request_span(request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let span = tracing::info_span!(
        "http_request",
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    let caller = TraceContextPropagator::new().extract(&Headers(request.headers()));
    // Fails only without the OpenTelemetry layer, when there is no trace to join.
    let _ = span.set_parent(caller);
    let response = next.run(request).instrument(span.clone()).await;
    // As an integer attribute, as OpenTelemetry's HTTP conventions have it.
    span.record(
        "http.response.status_code",
        i64::from(response.status().as_u16()),
    );
    response
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}
