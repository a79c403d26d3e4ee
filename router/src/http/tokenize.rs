//! TGI's `/tokenize` and `/chat_tokenize`: the tokens a prompt becomes, each with its id, its
//! text and where it is in the prompt (byte offsets), without generating anything. A chat is
//! rendered by the chat template exactly as `/v1/chat/completions` renders it.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::json::parse;
use super::openai::handlers::render_chat;
use super::openai::types::ChatCompletionRequest;
use super::openapi::TgiErrors;
use super::types::GenerateRequest;
use super::AppState;
use crate::request::Prompt;
use crate::tokenizer::TokenSpan;
use crate::validation::ValidationError;

/// One token of the prompt; `text` is `prompt[start..stop]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct SimpleToken {
    pub id: u32,
    pub text: String,
    pub start: usize,
    pub stop: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatTokenizeResponse {
    pub tokenize_response: Vec<SimpleToken>,
    pub templated_text: String,
}

/// `/tokenize`: TGI's generate body, whose parameters are read but play no part.
#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "TGI",
    summary = "The prompt's tokens, without generating",
    request_body = GenerateRequest,
    responses((status = 200, description = "One entry per token", body = Vec<SimpleToken>), TgiErrors)
)]
pub async fn tokenize(
    State(state): State<AppState>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Result<Json<Vec<SimpleToken>>, ApiError> {
    let request = parse(body)?;
    Ok(Json(tokens(&state, Prompt::Text(&request.inputs))?))
}

/// `/chat_tokenize`: an OpenAI chat body; the answer adds the rendered prompt.
#[utoipa::path(
    post,
    path = "/chat_tokenize",
    tag = "TGI",
    summary = "A chat's prompt as the chat template renders it, and its tokens",
    request_body = ChatCompletionRequest,
    responses((status = 200, description = "The prompt and its tokens", body = ChatTokenizeResponse), TgiErrors)
)]
pub async fn chat_tokenize(
    State(state): State<AppState>,
    body: Result<Json<ChatCompletionRequest>, JsonRejection>,
) -> Result<Json<ChatTokenizeResponse>, ApiError> {
    let request = parse(body)?;
    let templated_text = render_chat(&state, &request)?;
    let tokenize_response = tokens(&state, Prompt::ChatTemplate(&templated_text))?;
    Ok(Json(ChatTokenizeResponse {
        tokenize_response,
        templated_text,
    }))
}

/// The prompt's tokens as a generation route would run them (with the special tokens the
/// tokenizer adds to a client's text, none added to a rendered chat).
fn tokens(state: &AppState, prompt: Prompt<'_>) -> Result<Vec<SimpleToken>, ApiError> {
    let text = prompt.text();
    if text.is_empty() {
        return Err(ValidationError::EmptyInput.into());
    }
    let spans = state
        .tokenizer
        .encode_with_offsets(text, prompt.adds_special_tokens())
        .map_err(ValidationError::from)?;
    Ok(simple_tokens(text, &spans))
}

fn simple_tokens(text: &str, spans: &[TokenSpan]) -> Vec<SimpleToken> {
    spans
        .iter()
        .map(|span| SimpleToken {
            id: span.id,
            // Offsets fall on character boundaries; `get` keeps a tokenizer that broke this
            // from panicking.
            text: text
                .get(span.start..span.stop)
                .unwrap_or_default()
                .to_string(),
            start: span.start,
            stop: span.stop,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_support::{byte_tokenizer_adding_bos, EOS};

    #[test]
    fn each_token_carries_the_text_it_spans() {
        let tokenizer = byte_tokenizer_adding_bos();
        let text = "hé";
        let spans = tokenizer.encode_with_offsets(text, true).unwrap();
        let tokens = simple_tokens(text, &spans);
        let token = |id, text: &str, start, stop| SimpleToken {
            id,
            text: text.into(),
            start,
            stop,
        };
        let e_acute = &tokens[2].text;
        assert_eq!(e_acute, "é");
        assert_eq!(
            tokens,
            [
                // The beginning-of-sequence token the tokenizer added spans nothing.
                token(EOS, "", 0, 0),
                token(spans[1].id, "h", 0, 1),
                token(spans[2].id, "é", 1, 3),
                token(spans[3].id, "é", 1, 3),
            ]
        );
    }
}
