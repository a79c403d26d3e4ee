//! TGI's route handlers: parse TGI's body, submit it (`submission`), then collect or stream the
//! tokens in TGI's shapes.

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::openapi::{TgiErrors, TgiEvents};
use super::sse;
use super::submission::{submit, Submitted};
use super::types::{
    Details, ErrorResponse, GenerateRequest, GenerateResponse, Info, StreamDetails, StreamResponse,
};
use super::AppState;
use crate::request::{GenerationRequest, Prompt};

/// A TGI request on the scheduler, and the prompt to put before its text when
/// `return_full_text` asked for it.
struct Started {
    submitted: Submitted,
    prefix: Option<String>,
}

fn start(state: &AppState, request: GenerateRequest) -> Result<Started, ApiError> {
    let requested = request.parameters.to_requested()?;
    let submitted = submit(state, Prompt::Text(&request.inputs), &requested)?;
    let prefix = request
        .parameters
        .return_full_text
        .unwrap_or(false)
        .then_some(request.inputs);
    Ok(Started { submitted, prefix })
}

/// Turns axum's JSON rejection into TGI's 422 error body.
fn parse(body: Result<Json<GenerateRequest>, JsonRejection>) -> Result<GenerateRequest, ApiError> {
    body.map(|Json(r)| r)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

/// The generated text, after the prompt when `return_full_text` asked for it.
fn full_text(prefix: Option<&str>, generated: String) -> String {
    match prefix {
        Some(prefix) => format!("{prefix}{generated}"),
        None => generated,
    }
}

fn reported_seed(valid: &GenerationRequest) -> Option<u64> {
    valid.sampling.do_sample.then_some(valid.sampling.seed)
}

/// TGI's `/`: `/generate_stream` when `stream` is set, else `/generate` with its answer in a
/// one-element list (what TGI's Python client reads).
#[utoipa::path(
    post,
    path = "/",
    tag = "TGI",
    summary = "Generate, or stream when `stream` is set",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "The answer in a one-element list, or its stream", content(
            (Vec<GenerateResponse> = "application/json"),
            (inline(TgiEvents) = "text/event-stream"),
        )),
        TgiErrors,
    )
)]
pub async fn compat_generate(
    state: State<AppState>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = parse(body)?;
    if request.stream {
        stream_response(state, request).await
    } else {
        let Json(response) = generate_response(state, request).await?;
        Ok(Json([response]).into_response())
    }
}

/// Generates a whole answer.
#[utoipa::path(
    post,
    path = "/generate",
    tag = "TGI",
    request_body = GenerateRequest,
    responses((status = 200, description = "The answer", body = GenerateResponse), TgiErrors)
)]
pub async fn generate(
    state: State<AppState>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Json<GenerateResponse>, ApiError> {
    generate_response(state, parse(body)?).await
}

/// Streams the answer as server-sent events, one per token; the last holds the whole text and
/// the details.
#[utoipa::path(
    post,
    path = "/generate_stream",
    tag = "TGI",
    request_body = GenerateRequest,
    responses(
        (
            status = 200,
            description = "One event per token",
            body = inline(TgiEvents),
            content_type = "text/event-stream",
        ),
        TgiErrors,
    )
)]
pub async fn generate_stream(
    state: State<AppState>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    stream_response(state, parse(body)?).await
}

async fn generate_response(
    State(state): State<AppState>,
    request: GenerateRequest,
) -> Result<Json<GenerateResponse>, ApiError> {
    let want_details = request.parameters.details;
    let Started { submitted, prefix } = start(&state, request)?;
    let Submitted { stream, valid } = submitted;
    let (tokens, end) = stream.collect().await?;
    let generated_text = full_text(prefix.as_deref(), end.generated_text);
    let details = want_details.then(|| Details {
        finish_reason: end.finish_reason,
        generated_tokens: end.generated_tokens,
        seed: reported_seed(&valid),
        cached_tokens: end.cached_tokens,
        prefill: Vec::new(),
        tokens,
    });
    Ok(Json(GenerateResponse {
        generated_text,
        details,
    }))
}

async fn stream_response(
    State(state): State<AppState>,
    request: GenerateRequest,
) -> Result<Response, ApiError> {
    let Started { submitted, prefix } = start(&state, request)?;
    let Submitted { mut stream, valid } = submitted;
    let input_length = valid.input_ids.len() as u32;
    let seed = reported_seed(&valid);
    let events = async_stream::stream! {
        let mut index = 0;
        while let Some(item) = stream.next().await {
            index += 1;
            match item {
                Ok(item) => {
                    let (generated_text, details) = match item.end {
                        Some(end) => {
                            let text = full_text(prefix.as_deref(), end.generated_text);
                            let details = StreamDetails {
                                finish_reason: end.finish_reason,
                                generated_tokens: end.generated_tokens,
                                seed,
                                input_length,
                                cached_tokens: end.cached_tokens,
                            };
                            (Some(text), Some(details))
                        }
                        None => (None, None),
                    };
                    let response = StreamResponse {
                        index,
                        token: item.token,
                        top_tokens: Vec::new(),
                        generated_text,
                        details,
                    };
                    yield Ok::<_, std::convert::Infallible>(sse::event(&response));
                }
                Err(e) => {
                    let error = ApiError::from(e);
                    tracing::error!(error = %error, "stream failed");
                    yield Ok(sse::event(&error.body()));
                }
            }
        }
    };
    Ok(sse::response(Body::from_stream(events)))
}

/// Whether the shards answer.
#[utoipa::path(
    get,
    path = "/health",
    tag = "TGI",
    responses(
        (status = 200, description = "The shards answer"),
        (status = 503, description = "A shard does not answer", body = ErrorResponse),
    )
)]
pub async fn health(State(state): State<AppState>) -> Result<(), ApiError> {
    state.shards.health().await?;
    Ok(())
}

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "TGI",
    responses((status = 200, description = "Prometheus' text format", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

/// The model served and the server's limits.
#[utoipa::path(
    get,
    path = "/info",
    tag = "TGI",
    responses((status = 200, description = "The model and the limits", body = Info))
)]
pub async fn info(State(state): State<AppState>) -> Json<Info> {
    Json((*state.info).clone())
}
