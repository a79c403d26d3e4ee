//! OpenAI's route handlers: parse the body, map it onto the domain, submit it
//! (`http::submission`), then answer whole or streamed. Every error is answered in OpenAI's shape.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::stream::{answer_text, stream_answer, ChunkKind};
use super::types::{
    finish_reason, AssistantMessage, ChatChoice, ChatCompletionRequest, CompletionChoice,
    CompletionRequest, Model, ModelList, Usage,
};
use super::AnswerHead;
use crate::http::error::ApiError;
use crate::http::json::parse;
use crate::http::submission::{submit, Submitted};
use crate::http::AppState;
use crate::request::{GenerationEnd, Prompt};
use crate::tokenizer::chat_template::ChatTemplateError;

fn usage_of(prompt_tokens: usize, end: &GenerationEnd) -> Usage {
    Usage::new(
        prompt_tokens as u32,
        end.generated_tokens,
        end.cached_tokens,
    )
}

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

pub async fn completions(
    State(state): State<AppState>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Response {
    completion(state, body)
        .await
        .unwrap_or_else(ApiError::into_openai_response)
}

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

/// The prompt a chat runs as: its conversation through the model's chat template.
pub fn render_chat(state: &AppState, request: &ChatCompletionRequest) -> Result<String, ApiError> {
    let messages = request.template_messages()?;
    let template = state
        .chat_template
        .as_deref()
        .ok_or(ChatTemplateError::Missing)?;
    Ok(template.render(&messages)?)
}

async fn chat_completion(
    state: AppState,
    body: Result<Json<ChatCompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let request = parse(body)?;
    let requested = request.to_requested()?;
    let prompt = render_chat(&state, &request)?;
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
        },
        finish_reason: finish_reason(end.finish_reason),
        logprobs: (),
    };
    let usage = usage_of(valid.input_ids.len(), &end);
    Ok(Json(head.envelope("chat.completion", vec![choice], Some(usage))).into_response())
}
