//! OpenAI's route handlers: parse the body, map it onto the domain, submit it
//! (`http::submission`), then answer whole or streamed. Every error is answered in OpenAI's shape.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::logprobs::{chat_logprobs, CompletionLogprobsBuilder};
use super::stream::{answer_text, stream_answer, ChunkKind, StreamedAnswer, StreamedChoice};
use super::types::{
    finish_reason, AssistantMessage, ChatChoice, ChatCompletionRequest, Completion,
    CompletionChoice, CompletionRequest, Model, ModelList, Usage,
};
use super::AnswerHead;
use crate::generation::{Generated, GenerationStream};
use crate::http::error::ApiError;
use crate::http::json::parse;
use crate::http::openapi::{ChatEvents, CompletionEvents, OpenAiErrors};
use crate::http::submission::{submit, Submitted};
use crate::http::AppState;
use crate::request::Prompt;
use crate::tokenizer::chat_template::ChatTemplateError;
use crate::validation::ValidationError;

/// `usage` of sequences read to their end: each prompt counted once (with what its first
/// sequence found cached), every sequence's tokens counted.
fn usage_of(prompt_tokens: u32, prompts: &[Vec<Generated>]) -> Usage {
    let mut usage = Usage::new(prompt_tokens, 0, 0);
    for sequences in prompts {
        if let Some(first) = sequences.first() {
            usage.add_cached(first.end.cached_tokens);
        }
        for generated in sequences {
            usage.add_completion(generated.end.generated_tokens);
        }
    }
    usage
}

/// The `n` sequences to answer with: with `best_of` > `n`, the most likely ones (by mean
/// log-probability per token, OpenAI's rule), most likely first.
fn best_first(mut sequences: Vec<Generated>, n: u32) -> Vec<Generated> {
    if sequences.len() > n as usize {
        sequences.sort_by(|a, b| b.mean_logprob().total_cmp(&a.mean_logprob()));
        sequences.truncate(n as usize);
    }
    sequences
}

/// Each prompt's submission, with its choices numbered across prompts (OpenAI's rule: prompt
/// `p`'s `i`th choice is `p * n + i`).
fn streamed_choices(
    submissions: Vec<Submitted>,
    prompts: Vec<String>,
    n: u32,
    echo: bool,
) -> Vec<StreamedChoice> {
    let mut choices = Vec::new();
    for (prompt_index, (submitted, prompt)) in submissions.into_iter().zip(prompts).enumerate() {
        for (index, stream) in submitted.streams.into_iter().enumerate() {
            choices.push(StreamedChoice {
                index: prompt_index as u32 * n + index as u32,
                stream,
                echo: echo.then(|| prompt.clone()),
                counts_prompt: index == 0,
            });
        }
    }
    choices
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
    let n = request.sampling.choices();
    let logprobs = request.logprobs.is_some();
    if request.sampling.stream && request.echo && logprobs {
        // The prompt's log-probabilities are known only once the answer ends.
        return Err(ValidationError::UnsupportedForm {
            param: "echo",
            what: "`echo` with `logprobs` in a stream".into(),
        }
        .into());
    }
    let prompts = request
        .prompt
        .into_texts(state.info.max_client_batch_size)?;
    // Every prompt is queued before any answer is read, so that they run together.
    let submissions = prompts
        .iter()
        .map(|prompt| submit(&state, Prompt::Text(prompt), &requested))
        .collect::<Result<Vec<_>, _>>()?;
    let prompt_tokens = submissions
        .iter()
        .map(|submitted| submitted.valid.input_ids.len() as u32)
        .sum();
    let head = AnswerHead::new("cmpl", &state.info.model_id);
    if request.sampling.stream {
        let answer = StreamedAnswer {
            kind: ChunkKind::Completion,
            head,
            include_usage: request.sampling.include_usage(),
            logprobs,
            stop_sequences: requested.stop.clone(),
            prompt_tokens,
        };
        let choices = streamed_choices(submissions, prompts, n, request.echo);
        return Ok(stream_answer(choices, answer));
    }

    let mut generated = Vec::new();
    for submitted in submissions {
        generated.push(GenerationStream::collect_all(submitted.streams).await?);
    }
    let usage = usage_of(prompt_tokens, &generated);
    let mut choices = Vec::new();
    for (prompt_index, (sequences, prompt)) in generated.into_iter().zip(prompts).enumerate() {
        // Only the first sequence scored the prompt; every sequence shares it.
        let prompt_scores = sequences
            .first()
            .map(|first| first.end.prompt_tokens.clone())
            .unwrap_or_default();
        for (index, sequence) in best_first(sequences, n).into_iter().enumerate() {
            let echo = request.echo.then_some(prompt.as_str());
            let logprobs = logprobs.then(|| {
                let mut builder = CompletionLogprobsBuilder::starting_at(0);
                if echo.is_some() {
                    builder.push_prompt(&prompt_scores);
                }
                for (token, alternatives) in sequence.tokens.iter().zip(&sequence.top_tokens) {
                    builder.push(token, alternatives);
                }
                builder.finish()
            });
            choices.push(CompletionChoice {
                index: prompt_index as u32 * n + index as u32,
                text: format!("{}{}", echo.unwrap_or_default(), answer_text(&sequence.end)),
                finish_reason: Some(finish_reason(sequence.end.finish_reason)),
                logprobs,
            });
        }
    }
    Ok(Json(head.envelope("text_completion", choices, Some(usage))).into_response())
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
    let prompt_tokens = submitted.valid.input_ids.len() as u32;
    let logprobs = request.logprobs == Some(true);
    let head = AnswerHead::new("chatcmpl", &state.info.model_id);
    if request.sampling.stream {
        let answer = StreamedAnswer {
            kind: ChunkKind::Chat,
            head,
            include_usage: request.sampling.include_usage(),
            logprobs,
            stop_sequences: requested.stop.clone(),
            prompt_tokens,
        };
        let choices = streamed_choices(vec![submitted], vec![prompt], 1, false);
        return Ok(stream_answer(choices, answer));
    }

    let sequences = GenerationStream::collect_all(submitted.streams).await?;
    let choices = sequences
        .iter()
        .enumerate()
        .map(|(index, sequence)| ChatChoice {
            index: index as u32,
            message: AssistantMessage {
                role: "assistant",
                content: answer_text(&sequence.end).to_string(),
                refusal: None,
            },
            finish_reason: finish_reason(sequence.end.finish_reason),
            logprobs: logprobs.then(|| chat_logprobs(&sequence.tokens, &sequence.top_tokens)),
        })
        .collect();
    let usage = usage_of(prompt_tokens, &[sequences]);
    Ok(Json(head.envelope("chat.completion", choices, Some(usage))).into_response())
}
