//! OpenAI's route handlers: parse the body, map it onto the domain, submit it
//! (`http::submission`), then answer whole or streamed. Every error is answered in OpenAI's shape.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::stream::{answer_text, stream_answer, ChunkKind};
use super::types::{
    finish_reason, AssistantMessage, ChatChoice, ChatCompletionRequest, Completion,
    CompletionChoice, CompletionRequest, Model, ModelList, Usage,
};
use super::AnswerHead;
use crate::http::error::ApiError;
use crate::http::openapi::{ChatEvents, CompletionEvents, OpenAiErrors};
use crate::http::submission::{submit, Submitted};
use crate::http::AppState;
use crate::request::{GenerationEnd, Prompt};
use crate::tokenizer::chat_template::ChatTemplateError;

/// A body that is not JSON is a 400, as on OpenAI; JSON that does not fit the request is a 422,
/// like any other invalid request here.
fn parse<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(request)| request)
        .map_err(|rejection| match rejection {
            JsonRejection::JsonDataError(e) => ApiError::BadRequest(e.body_text()),
            other => ApiError::MalformedJson(other.body_text()),
        })
}

fn usage_of(prompt_tokens: usize, end: &GenerationEnd) -> Usage {
    Usage::new(
        prompt_tokens as u32,
        end.generated_tokens,
        end.cached_tokens,
    )
}

/// The one model served.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "OpenAI",
    responses((status = 200, description = "The model served", body = ModelList))
)]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![Model {
            id: state.info.model_id.clone(),
            object: "model",
            created: state.started_at,
            owned_by: "sluice",
        }],
    })
}

/// Completes a prompt; streamed as server-sent events ending with `data: [DONE]` when `stream`
/// is set.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "OpenAI",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or its chunks", content(
            (Completion<CompletionChoice> = "application/json"),
            (inline(CompletionEvents) = "text/event-stream"),
        )),
        OpenAiErrors,
    )
)]
pub async fn completions(
    State(state): State<AppState>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    completion(state, body)
        .await
        .unwrap_or_else(ApiError::into_openai_response)
}

/// Answers a conversation, rendered by the model's chat template; streamed as server-sent events
/// ending with `data: [DONE]` when `stream` is set.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "OpenAI",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The answer, or its chunks", content(
            (Completion<ChatChoice> = "application/json"),
            (inline(ChatEvents) = "text/event-stream"),
        )),
        OpenAiErrors,
    )
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    body: Result<Json<ChatCompletionRequest>, JsonRejection>,
) -> Response {
    chat_completion(state, body)
        .await
        .unwrap_or_else(ApiError::into_openai_response)
}

async fn completion(
    state: AppState,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = parse(body)?;
    let requested = request.to_requested()?;
    let prompt = request.prompt.into_text()?;
    let submitted = submit(&state, Prompt::Text(&prompt), &requested)?;
    let head = AnswerHead::new("cmpl", &state.info.model_id);
    let echo = request.echo.then_some(prompt);
    if request.sampling.stream {
        let include_usage = request.sampling.include_usage();
        let kind = ChunkKind::Completion { echo };
        return Ok(stream_answer(submitted, kind, head, include_usage));
    }

    let Submitted { stream, valid } = submitted;
    let (_, end) = stream.collect().await?;
    let answer = answer_text(&end).to_string();
    let choice = CompletionChoice {
        index: 0,
        text: match echo {
            Some(prompt) => prompt + &answer,
            None => answer,
        },
        finish_reason: Some(finish_reason(end.finish_reason)),
        logprobs: (),
    };
    let usage = usage_of(valid.input_ids.len(), &end);
    Ok(Json(head.envelope("text_completion", vec![choice], Some(usage))).into_response())
}

async fn chat_completion(
    state: AppState,
    body: Result<Json<ChatCompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = parse(body)?;
    let requested = request.to_requested()?;
    let messages = request.template_messages()?;
    let template = state
        .chat_template
        .as_deref()
        .ok_or(ChatTemplateError::Missing)?;
    let prompt = template.render(&messages)?;
    let submitted = submit(&state, Prompt::ChatTemplate(&prompt), &requested)?;
    let head = AnswerHead::new("chatcmpl", &state.info.model_id);
    if request.sampling.stream {
        let include_usage = request.sampling.include_usage();
        return Ok(stream_answer(
            submitted,
            ChunkKind::Chat,
            head,
            include_usage,
        ));
    }

    let Submitted { stream, valid } = submitted;
    let (_, end) = stream.collect().await?;
    let choice = ChatChoice {
        index: 0,
        message: AssistantMessage {
            role: "assistant",
            content: answer_text(&end).to_string(),
            refusal: None,
        },
        finish_reason: finish_reason(end.finish_reason),
        logprobs: (),
    };
    let usage = usage_of(valid.input_ids.len(), &end);
    Ok(Json(head.envelope("chat.completion", vec![choice], Some(usage))).into_response())
}
