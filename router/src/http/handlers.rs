//! TGI's route handlers: parse TGI's body, submit it (`submission`), then collect or stream the
//! tokens in TGI's shapes.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::compute_headers::ComputeHeaders;
use super::error::ApiError;
use super::json::parse;
use super::openapi::{TgiErrors, TgiEvents};
use super::sse;
use super::submission::{submit, Submitted};
use super::types::{
    BestOfSequence, Details, ErrorResponse, GenerateRequest, GenerateResponse, Info, StreamDetails,
    StreamResponse, Token,
};
use super::AppState;
use crate::generation::GenerationStream;
use crate::request::{GenerationRequest, Prompt};
use crate::scheduler::{SchedulerError, ShardsSeen};

/// A TGI request on the scheduler, the prompt to put before its text when
/// `return_full_text` asked for it, and what its response headers report.
struct Started {
    submitted: Submitted,
    prefix: Option<String>,
    headers: ComputeHeaders,
}

/// `received`: when the route got the request; `stream`: whether the answer is streamed.
fn start(
    state: &AppState,
    request: GenerateRequest,
    received: Instant,
    stream: bool,
) -> Result<Started, ApiError> {
    let requested = request.parameters.to_requested(stream)?;
    let submitted = submit(state, Prompt::Text(&request.inputs), &requested)?;
    let headers = ComputeHeaders::new(
        &state.info.model_device_type,
        &request.inputs,
        submitted.valid.input_ids.len(),
        received,
    );
    let prefix = request
        .parameters
        .return_full_text
        .unwrap_or(false)
        .then_some(request.inputs);
    Ok(Started {
        submitted,
        prefix,
        headers,
    })
}

/// The generated text, after the prompt when `return_full_text` asked for it.
fn full_text(prefix: Option<&str>, generated: String) -> String {
    match prefix {
        Some(prefix) => format!("{prefix}{generated}"),
        None => generated,
    }
}

/// The seed of sequence `index` (each sibling draws with its own), when it was sampled.
fn reported_seed(valid: &GenerationRequest, index: usize) -> Option<u64> {
    valid
        .sampling
        .do_sample
        .then(|| valid.sampling.sequence_seed(index))
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
        let (headers, Json(response)) = generate_response(state, request).await?;
        Ok((headers, Json([response])).into_response())
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
) -> Result<(HeaderMap, Json<GenerateResponse>), ApiError> {
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
) -> Result<(HeaderMap, Json<GenerateResponse>), ApiError> {
    let received = Instant::now();
    let want_details = request.parameters.details;
    let Started {
        submitted,
        prefix,
        headers,
    } = start(&state, request, received, false)?;
    let Submitted { streams, valid } = submitted;
    let sequences = GenerationStream::collect_all(streams).await?;
    // Only the first sequence scored the prompt; every sequence shares it.
    let prefill = sequences
        .first()
        .map(|first| first.end.prompt_tokens.clone())
        .unwrap_or_default();
    // With best_of, the answer is the most likely sequence (mean log-probability per token).
    let best = (0..sequences.len())
        .max_by(|&a, &b| {
            let (a, b) = (sequences[a].mean_logprob(), sequences[b].mean_logprob());
            a.total_cmp(&b)
        })
        .ok_or(SchedulerError::Closed)?;
    let mut others = Vec::new();
    let mut answer = None;
    for (index, generated) in sequences.into_iter().enumerate() {
        let seed = reported_seed(&valid, index);
        if index == best {
            answer = Some((generated, seed));
        } else {
            others.push(BestOfSequence {
                generated_text: full_text(prefix.as_deref(), generated.end.generated_text),
                finish_reason: generated.end.finish_reason,
                generated_tokens: generated.end.generated_tokens,
                seed,
                prefill: prefill.clone(),
                tokens: generated.tokens,
                top_tokens: without_empty(generated.top_tokens),
            });
        }
    }
    let (generated, seed) = answer.ok_or(SchedulerError::Closed)?;
    let headers = headers.at_end(&generated.end);
    let generated_text = full_text(prefix.as_deref(), generated.end.generated_text);
    let details = want_details.then(|| Details {
        finish_reason: generated.end.finish_reason,
        generated_tokens: generated.end.generated_tokens,
        seed,
        cached_tokens: generated.end.cached_tokens,
        prefill,
        tokens: generated.tokens,
        top_tokens: without_empty(generated.top_tokens),
        best_of_sequences: (valid.sequences > 1).then_some(others),
    });
    Ok((
        headers,
        Json(GenerateResponse {
            generated_text,
            details,
        }),
    ))
}

/// Per-token alternatives, or nothing when none were asked for.
fn without_empty(top_tokens: Vec<Vec<Token>>) -> Vec<Vec<Token>> {
    if top_tokens.iter().all(Vec::is_empty) {
        Vec::new()
    } else {
        top_tokens
    }
}

async fn stream_response(
    State(state): State<AppState>,
    request: GenerateRequest,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let Started {
        submitted,
        prefix,
        headers,
    } = start(&state, request, received, true)?;
    let (mut stream, valid) = submitted.into_single()?;
    let input_length = valid.input_ids.len() as u32;
    let seed = reported_seed(&valid, 0);
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
                        top_tokens: item.top_tokens,
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
    let mut response = sse::response(Body::from_stream(events));
    response.headers_mut().extend(headers.at_stream_start());
    Ok(response)
}

/// While the scheduler runs steps, `/health` answers from their answers if the last came within
/// this long, and asks the shards otherwise (a shard answers only once its step is done, so a
/// stuck step shows as a `/health` that does not answer).
const STEPS_TRUSTED_FOR: Duration = Duration::from_secs(30);

/// Whether the shards answer and are ready to serve (not restarting).
#[utoipa::path(
    get,
    path = "/health",
    tag = "TGI",
    responses(
        (status = 200, description = "The shards answer, or answered a step in the last 30 s"),
        (status = 503, description = "A shard does not answer, or the shards are coming back from a failure (restarted, being warmed up again)", body = ErrorResponse),
    )
)]
pub async fn health(State(state): State<AppState>) -> Result<(), ApiError> {
    // A draining router asks load balancers to send its traffic elsewhere.
    if state.draining.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    // The shards answer only between steps (and after a warmup): while the scheduler's steps
    // come back, they are what shows the shards healthy.
    match state.scheduler.shards_seen() {
        ShardsSeen::Recovering => return Err(ApiError::ShardsRecovering),
        ShardsSeen::Working { since_progress } if since_progress < STEPS_TRUSTED_FOR => {
            return Ok(())
        }
        ShardsSeen::Working { .. } | ShardsSeen::Idle => {}
    }
    if !state.shards.health().await?.warmed_up {
        return Err(ApiError::ShardsRecovering);
    }
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
