//! TGI's route handlers: parse TGI's body, submit it (`submission`), then collect or stream the
//! tokens in TGI's shapes.

use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::compute_headers::ComputeHeaders;
use super::error::ApiError;
use super::json::parse;
use super::sse;
use super::submission::{submit, Submitted};
use super::types::{
    Details, GenerateRequest, GenerateResponse, Info, StreamDetails, StreamResponse,
};
use super::AppState;
use crate::request::{GenerationRequest, Prompt};

/// A TGI request on the scheduler, the prompt to put before its text when
/// `return_full_text` asked for it, and what its response headers report.
struct Started {
    submitted: Submitted,
    prefix: Option<String>,
    headers: ComputeHeaders,
}

/// `received`: when the route got the request.
fn start(
    state: &AppState,
    request: GenerateRequest,
    received: Instant,
) -> Result<Started, ApiError> {
    let requested = request.parameters.to_requested()?;
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
        let (headers, Json(response)) = generate_response(state, request).await?;
        Ok((headers, Json([response])).into_response())
    }
}

pub async fn generate(
    state: State<AppState>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<(HeaderMap, Json<GenerateResponse>), ApiError> {
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
) -> Result<(HeaderMap, Json<GenerateResponse>), ApiError> {
    let received = Instant::now();
    let want_details = request.parameters.details;
    let Started {
        submitted,
        prefix,
        headers,
    } = start(&state, request, received)?;
    let Submitted { stream, valid } = submitted;
    let (tokens, end) = stream.collect().await?;
    let headers = headers.at_end(&end);
    let generated_text = full_text(prefix.as_deref(), end.generated_text);
    let details = want_details.then(|| Details {
        finish_reason: end.finish_reason,
        generated_tokens: end.generated_tokens,
        seed: reported_seed(&valid),
        cached_tokens: end.cached_tokens,
        prefill: Vec::new(),
        tokens,
    });
    Ok((
        headers,
        Json(GenerateResponse {
            generated_text,
            details,
        }),
    ))
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
    } = start(&state, request, received)?;
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
    let mut response = sse::response(Body::from_stream(events));
    response.headers_mut().extend(headers.at_stream_start());
    Ok(response)
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
