//! Route handlers: parse, validate, admit, submit, then collect or stream the tokens.

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::sse;
use super::types::{
    Details, GenerateRequest, GenerateResponse, Info, StreamDetails, StreamResponse,
};
use super::AppState;
use crate::generation::GenerationStream;
use crate::request::GenerationRequest;

/// A request that passed validation and admission and is queued on the scheduler.
struct Started {
    stream: GenerationStream,
    valid: GenerationRequest,
    prefix: Option<String>,
}

fn start(state: &AppState, request: GenerateRequest) -> Result<Started, ApiError> {
    let requested = request.parameters.to_requested()?;
    let valid = state.validator.validate(&request.inputs, &requested)?;
    let permit = state
        .admission
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded)?;
    let events = state.scheduler.submit(valid.clone())?;
    let stream = GenerationStream::new(events, Some(permit));
    let prefix = request
        .parameters
        .return_full_text
        .unwrap_or(false)
        .then_some(request.inputs);
    Ok(Started {
        stream,
        valid,
        prefix,
    })
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

pub async fn generate(
    state: State<AppState>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Json<GenerateResponse>, ApiError> {
    generate_response(state, parse(body)?).await
}

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
    let Started {
        mut stream,
        valid,
        prefix,
    } = start(&state, request)?;
    let mut tokens = Vec::new();
    while let Some(item) = stream.next().await {
        let item = item?;
        tokens.push(item.token);
        if let Some(end) = item.end {
            let generated_text = full_text(prefix.as_deref(), end.generated_text);
            let details = want_details.then(|| Details {
                finish_reason: end.finish_reason,
                generated_tokens: end.generated_tokens,
                seed: reported_seed(&valid),
                cached_tokens: end.cached_tokens,
                prefill: Vec::new(),
                tokens,
            });
            return Ok(Json(GenerateResponse {
                generated_text,
                details,
            }));
        }
    }
    Err(crate::scheduler::SchedulerError::Closed.into())
}

async fn stream_response(
    State(state): State<AppState>,
    request: GenerateRequest,
) -> Result<Response, ApiError> {
    let Started {
        mut stream,
        valid,
        prefix,
    } = start(&state, request)?;
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
    Ok((
        [
            (header::CONTENT_TYPE, sse::CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response())
}

pub async fn health(State(state): State<AppState>) -> Result<(), ApiError> {
    state.shards.health().await?;
    Ok(())
}

pub async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

pub async fn info(State(state): State<AppState>) -> Json<Info> {
    Json((*state.info).clone())
}
