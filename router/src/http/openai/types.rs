//! OpenAI's request and response bodies for `/v1/completions`, `/v1/chat/completions` and
//! `/v1/models`, and their mapping onto the domain's `RequestedParameters`. Fields OpenAI defines
//! that Sluice cannot honour yet are refused by name when given a non-neutral value, never
//! silently ignored; fields that change nothing about the answer (`user`, `metadata`, ...) are
//! ignored, as OpenAI-compatible servers do.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::http::openapi::{AssistantRole, OpenAiFinishReason};
use crate::request::{FinishReason, RequestedParameters};
use crate::tokenizer::chat_template::ChatMessage;
use crate::validation::ValidationError;

/// `stop`: one sequence or a list.
#[derive(Debug, Clone, Deserialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

impl StopSequences {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(stop) => vec![stop],
            Self::Many(stops) => stops,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The parameters both routes share, as OpenAI spells them.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stop: Option<StopSequences>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logit_bias: Option<Value>,
    /// Extensions beyond OpenAI's API, spelled as vLLM spells them.
    pub top_k: Option<i32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
}

impl SamplingFields {
    /// Whether a streamed answer ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|options| options.include_usage)
    }

    /// The refusals both routes share.
    fn refusals(&self) -> [(bool, &'static str); 1] {
        [(is_given(&self.logit_bias), "logit_bias")]
    }

    /// The choices asked for.
    pub fn choices(&self) -> u32 {
        self.n.unwrap_or(1)
    }

    /// OpenAI's sampling onto the domain's: sampling at temperature 1 unless told otherwise,
    /// temperature 0 meaning greedy; `top_p` 1 is no cut, which validation spells as absent.
    fn to_requested(&self, max_new_tokens: Option<u32>) -> RequestedParameters {
        let greedy = self.temperature == Some(0.0);
        RequestedParameters {
            temperature: self.temperature.filter(|_| !greedy),
            top_p: self.top_p.filter(|&p| !greedy && p != 1.0),
            // vLLM's "no cut" values, which validation spells as absent.
            top_k: self.top_k.filter(|&k| !greedy && k > 0),
            min_p: self.min_p.filter(|&p| !greedy && p > 0.0),
            repetition_penalty: self.repetition_penalty,
            ignore_eos: self.ignore_eos,
            do_sample: !greedy,
            seed: self.seed,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            // Absent: the room the prompt leaves under --max-total-tokens, as on `/generate`.
            max_new_tokens,
            stop: self
                .stop
                .clone()
                .map(StopSequences::into_vec)
                .unwrap_or_default(),
            ..RequestedParameters::default()
        }
    }
}

/// A JSON value that asks for something: present, not null, not an empty list or object.
fn is_given(value: &Option<Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Array(items)) => !items.is_empty(),
        Some(Value::Object(fields)) => !fields.is_empty(),
        Some(_) => true,
    }
}

fn first_refused<const N: usize>(
    refusals: [(bool, &'static str); N],
) -> Result<(), ValidationError> {
    match refusals.into_iter().find(|(refused, _)| *refused) {
        Some((_, name)) => Err(ValidationError::Unsupported(name)),
        None => Ok(()),
    }
}

/// `prompt` of `/v1/completions`: OpenAI also allows several prompts and token ids.
#[derive(Debug, Clone, Deserialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum CompletionPrompt {
    Text(String),
    Texts(Vec<String>),
    TokenIds(Vec<u32>),
    TokenIdLists(Vec<Vec<u32>>),
}

impl CompletionPrompt {
    /// The text prompts, at most `max` of them (`--max-client-batch-size`).
    pub fn into_texts(self, max: usize) -> Result<Vec<String>, ValidationError> {
        let texts = match self {
            Self::Text(text) => vec![text],
            Self::Texts(texts) if texts.is_empty() => return Err(ValidationError::EmptyInput),
            Self::Texts(texts) => texts,
            Self::TokenIds(_) | Self::TokenIdLists(_) => {
                return Err(ValidationError::UnsupportedForm {
                    param: "prompt",
                    what: "token ids".to_string(),
                })
            }
        };
        if texts.len() > max {
            return Err(ValidationError::ClientBatchSize {
                max,
                given: texts.len(),
            });
        }
        Ok(texts)
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub prompt: CompletionPrompt,
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub suffix: Option<String>,
    pub best_of: Option<u32>,
    pub logprobs: Option<u32>,
}

impl CompletionRequest {
    pub fn to_requested(&self) -> Result<RequestedParameters, ValidationError> {
        first_refused(self.sampling.refusals())?;
        first_refused([(
            self.suffix.as_ref().is_some_and(|s| !s.is_empty()),
            "suffix",
        )])?;
        let n = self.sampling.choices();
        let best_of = self.best_of.unwrap_or(n);
        if best_of < n {
            return Err(ValidationError::BestOfBelowN { n, best_of });
        }
        if self.sampling.stream && best_of > n {
            return Err(ValidationError::BestOfStreamed);
        }
        Ok(RequestedParameters {
            top_n_tokens: self.logprobs,
            // Echoed prompt tokens come with their log-probabilities too.
            prompt_logprobs: self.echo && self.logprobs.is_some(),
            sequences: Some(best_of),
            ..self.sampling.to_requested(self.max_tokens)
        })
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// A message's `content`: text, or a list of parts of which Sluice reads the text ones.
#[derive(Debug, Clone, Deserialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, PartialEq, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct RequestMessage {
    pub role: Role,
    /// May be null on an assistant message that only called tools.
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    pub tool_call_id: Option<String>,
    pub tool_calls: Option<Value>,
}

impl RequestMessage {
    /// The message as the chat template sees it: text parts joined into one string.
    fn to_template_message(&self) -> Result<ChatMessage, ValidationError> {
        if is_given(&self.tool_calls) {
            return Err(ValidationError::UnsupportedForm {
                param: "messages",
                what: "an assistant message with `tool_calls`".into(),
            });
        }
        let content = match &self.content {
            None => String::new(),
            Some(MessageContent::Text(text)) => text.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut content = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(text)) => content.push_str(text),
                        ("text", None) => {
                            return Err(ValidationError::UnsupportedForm {
                                param: "messages",
                                what: "a text content part without `text`".into(),
                            })
                        }
                        (kind, _) => {
                            return Err(ValidationError::UnsupportedForm {
                                param: "messages",
                                what: format!("a content part of type `{kind}`"),
                            })
                        }
                    }
                }
                content
            }
        };
        Ok(ChatMessage {
            role: self.role.as_str().to_string(),
            content,
            name: self.name.clone(),
            tool_call_id: self.tool_call_id.clone(),
        })
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    pub messages: Vec<RequestMessage>,
    /// OpenAI's newer name for `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<u32>,
    pub max_tokens: Option<u32>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<Value>,
}

impl ChatCompletionRequest {
    pub fn to_requested(&self) -> Result<RequestedParameters, ValidationError> {
        first_refused(self.sampling.refusals())?;
        let plain_text_format = self
            .response_format
            .as_ref()
            .is_none_or(|format| format.is_null() || format["type"] == "text");
        // Without tools, "none" and "auto" both mean answering in text.
        let tool_choice_asks_for_tools = self
            .tool_choice
            .as_ref()
            .is_some_and(|choice| !(choice.is_null() || choice == "none" || choice == "auto"));
        first_refused([
            (is_given(&self.tools), "tools"),
            (tool_choice_asks_for_tools, "tool_choice"),
            (is_given(&self.functions), "functions"),
            (is_given(&self.function_call), "function_call"),
            (!plain_text_format, "response_format"),
        ])?;
        let logprobs = self.logprobs == Some(true);
        if !logprobs && self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(ValidationError::TopLogprobsWithoutLogprobs);
        }
        let max_new_tokens = self.max_completion_tokens.or(self.max_tokens);
        Ok(RequestedParameters {
            top_n_tokens: logprobs.then(|| self.top_logprobs.unwrap_or(0)),
            sequences: Some(self.sampling.choices()),
            ..self.sampling.to_requested(max_new_tokens)
        })
    }

    /// The conversation as the chat template sees it.
    pub fn template_messages(&self) -> Result<Vec<ChatMessage>, ValidationError> {
        if self.messages.is_empty() {
            return Err(ValidationError::UnsupportedForm {
                param: "messages",
                what: "an empty conversation".into(),
            });
        }
        self.messages
            .iter()
            .map(RequestMessage::to_template_message)
            .collect()
    }
}

/// OpenAI's `finish_reason`: a stop sequence and an end-of-sequence token are both "stop".
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::EosToken | FinishReason::StopSequence => "stop",
        FinishReason::Length => "length",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32, cached_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }

    /// Counts one more sequence's generated tokens.
    pub fn add_completion(&mut self, tokens: u32) {
        self.completion_tokens += tokens;
        self.total_tokens += tokens;
    }

    pub fn add_cached(&mut self, tokens: u32) {
        self.prompt_tokens_details.cached_tokens += tokens;
    }
}

/// Every answer's envelope: a whole completion, or one chunk of a streamed one (whose last may
/// hold no choice, only `usage`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion<C> {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<C>,
    /// On a whole answer, and on the last chunk when `stream_options.include_usage` asks.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub usage: Option<Usage>,
}

/// A choice of `/v1/completions`, whole or streamed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    /// `None` on the chunks before the last.
    #[schema(required, value_type = Option<OpenAiFinishReason>)]
    pub finish_reason: Option<&'static str>,
    /// Null unless `logprobs` asked for them.
    #[schema(required)]
    pub logprobs: Option<CompletionLogprobs>,
}

/// `logprobs` of a completion choice, token by token (OpenAI's legacy shape); with `echo` the
/// prompt's tokens come first, without alternatives.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// Null for the prompt's first token, which nothing predicts.
    pub token_logprobs: Vec<Option<f32>>,
    /// Each token's alternatives by text; null where none were computed.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Where each token starts in the choice's text, in bytes.
    pub text_offset: Vec<u32>,
}

/// `logprobs` of a chat choice: one entry per generated token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    /// Always null: a refusal would be text of its own, which Sluice's answers never hold.
    #[schema(required)]
    pub refusal: Option<Vec<ChatTokenLogprob>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    #[schema(value_type = AssistantRole)]
    pub role: &'static str,
    pub content: String,
    /// Always null: Sluice's models do not refuse apart from their text, and OpenAI's clients
    /// read the field.
    #[schema(required)]
    pub refusal: Option<String>,
}

/// A choice of a whole `/v1/chat/completions` answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    #[schema(value_type = OpenAiFinishReason)]
    pub finish_reason: &'static str,
    /// Null unless `logprobs` asked for them.
    #[schema(required)]
    pub logprobs: Option<ChatLogprobs>,
}

/// What a chat chunk adds to the message: the role once, first, then content.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, value_type = Option<AssistantRole>)]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub content: Option<String>,
}

/// A choice of a streamed `/v1/chat/completions` chunk.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: Delta,
    /// `None` on the chunks before the last.
    #[schema(required, value_type = Option<OpenAiFinishReason>)]
    pub finish_reason: Option<&'static str>,
    /// The tokens of this chunk, when `logprobs` asked for them.
    #[schema(required)]
    pub logprobs: Option<ChatLogprobs>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<Model>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiError {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[schema(required)]
    pub param: Option<&'static str>,
    #[schema(required)]
    pub code: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiErrorResponse {
    pub error: OpenAiError,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn completion(body: Value) -> CompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    fn chat(body: Value) -> ChatCompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn a_completion_maps_onto_the_domain_parameters() {
        let request = completion(json!({
            "model": "anything", "prompt": ["Once upon"], "max_tokens": 7, "temperature": 0.5,
            "top_p": 0.9, "stop": "\n", "seed": 3, "stream": true, "logprobs": 2,
            "stream_options": {"include_usage": true}, "echo": true, "n": 1, "best_of": 1,
            "frequency_penalty": 0.5, "presence_penalty": -0.25, "logit_bias": {}, "suffix": "",
            "user": "ignored",
        }));
        let requested = request.to_requested().unwrap();
        assert_eq!(
            requested,
            RequestedParameters {
                temperature: Some(0.5),
                top_p: Some(0.9),
                do_sample: true,
                seed: Some(3),
                frequency_penalty: Some(0.5),
                presence_penalty: Some(-0.25),
                max_new_tokens: Some(7),
                stop: vec!["\n".into()],
                top_n_tokens: Some(2),
                prompt_logprobs: true,
                sequences: Some(1),
                ..Default::default()
            }
        );
        assert!(request.sampling.stream && request.sampling.include_usage() && request.echo);
        assert_eq!(request.prompt.into_texts(4).unwrap(), ["Once upon"]);
    }

    #[test]
    fn temperature_zero_is_greedy_and_no_temperature_samples_as_openai_does() {
        let greedy = completion(json!({"prompt": "x", "temperature": 0, "top_p": 0.5}));
        let requested = greedy.to_requested().unwrap();
        assert!(!requested.do_sample);
        assert_eq!((requested.temperature, requested.top_p), (None, None));

        let default = completion(json!({"prompt": "x", "top_p": 1.0, "stop": ["a", "b"]}));
        let requested = default.to_requested().unwrap();
        assert!(requested.do_sample);
        assert_eq!((requested.temperature, requested.top_p), (None, None));
        assert_eq!(requested.stop, ["a", "b"]);
        assert_eq!(requested.max_new_tokens, None);
    }

    #[test]
    fn n_and_best_of_ask_for_sequences() {
        let request = completion(json!({"prompt": "x", "n": 2, "best_of": 3}));
        assert_eq!(request.to_requested().unwrap().sequences, Some(3));
        assert_eq!(request.sampling.choices(), 2);
        let below = completion(json!({"prompt": "x", "n": 3, "best_of": 2}));
        assert_eq!(
            below.to_requested().unwrap_err(),
            ValidationError::BestOfBelowN { n: 3, best_of: 2 }
        );
        let streamed = completion(json!({"prompt": "x", "best_of": 2, "stream": true}));
        assert_eq!(
            streamed.to_requested().unwrap_err(),
            ValidationError::BestOfStreamed
        );
        let chat = chat(
            json!({"messages": [{"role": "user", "content": "x"}], "n": 4,
                               "logprobs": true, "top_logprobs": 3}),
        );
        let requested = chat.to_requested().unwrap();
        assert_eq!(
            (requested.sequences, requested.top_n_tokens),
            (Some(4), Some(3))
        );
    }

    #[test]
    fn unsupported_completion_parameters_are_refused_by_name() {
        let cases = [
            (json!({"suffix": "end"}), "suffix"),
            (json!({"logit_bias": {"50256": -100}}), "logit_bias"),
        ];
        for (fields, name) in cases {
            let mut body = json!({"prompt": "x"});
            body.as_object_mut()
                .unwrap()
                .extend(fields.as_object().unwrap().clone());
            assert_eq!(
                completion(body).to_requested().unwrap_err(),
                ValidationError::Unsupported(name)
            );
        }
    }

    #[test]
    fn text_prompts_are_answered_up_to_the_client_batch_size() {
        let several = completion(json!({"prompt": ["a", "b", "c"]})).prompt;
        assert_eq!(several.clone().into_texts(3).unwrap(), ["a", "b", "c"]);
        assert_eq!(
            several.into_texts(2).unwrap_err(),
            ValidationError::ClientBatchSize { max: 2, given: 3 }
        );
        let ids = completion(json!({"prompt": [1, 2, 3]})).prompt;
        assert_eq!(ids, CompletionPrompt::TokenIds(vec![1, 2, 3]));
        assert!(matches!(
            ids.into_texts(4).unwrap_err(),
            ValidationError::UnsupportedForm {
                param: "prompt",
                ..
            }
        ));
        let empty = completion(json!({"prompt": []})).prompt;
        assert_eq!(
            empty.into_texts(4).unwrap_err(),
            ValidationError::EmptyInput
        );
    }

    #[test]
    fn chat_messages_become_template_messages() {
        let request = chat(json!({
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Hello, "}, {"type": "text", "text": "there."}
                ], "name": "ann"},
                {"role": "assistant", "content": null},
                {"role": "tool", "content": "42", "tool_call_id": "call_1"},
            ],
            "max_tokens": 5, "max_completion_tokens": 9, "temperature": 0,
            "tool_choice": "none", "response_format": {"type": "text"}, "logprobs": false,
        }));
        let messages = request.template_messages().unwrap();
        let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(messages[1].content, "Hello, there.");
        assert_eq!(messages[1].name.as_deref(), Some("ann"));
        assert_eq!(messages[2].content, "");
        assert_eq!(messages[3].tool_call_id.as_deref(), Some("call_1"));
        let requested = request.to_requested().unwrap();
        assert_eq!(requested.max_new_tokens, Some(9));
        assert!(!requested.do_sample);
    }

    #[test]
    fn unsupported_chat_parameters_and_contents_are_refused() {
        let without = chat(json!({"messages": [{"role": "user", "content": "x"}],
                                  "top_logprobs": 2}));
        assert_eq!(
            without.to_requested().unwrap_err(),
            ValidationError::TopLogprobsWithoutLogprobs
        );
        let cases = [
            (json!({"tools": [{"type": "function"}]}), "tools"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
        ];
        for (fields, name) in cases {
            let mut body = json!({"messages": [{"role": "user", "content": "x"}]});
            body.as_object_mut()
                .unwrap()
                .extend(fields.as_object().unwrap().clone());
            assert_eq!(
                chat(body).to_requested().unwrap_err(),
                ValidationError::Unsupported(name)
            );
        }
        let image = chat(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
        ]}]}));
        assert_eq!(
            image.template_messages().unwrap_err().to_string(),
            "`messages`: a content part of type `image_url` is not supported yet"
        );
        assert!(chat(json!({"messages": []})).template_messages().is_err());
        assert!(serde_json::from_value::<ChatCompletionRequest>(
            json!({"messages": [{"role": "wizard", "content": "x"}]})
        )
        .is_err());
    }

    #[test]
    fn responses_have_openai_shapes() {
        let chunk = Completion {
            id: "chatcmpl-1".into(),
            object: "chat.completion.chunk",
            created: 5,
            model: "m".into(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                finish_reason: None,
                logprobs: None,
            }],
            usage: None,
        };
        assert_eq!(
            serde_json::to_value(&chunk).unwrap(),
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5,
                   "model": "m", "choices": [{"index": 0,
                   "delta": {"role": "assistant", "content": ""},
                   "finish_reason": null, "logprobs": null}]})
        );
        let usage = serde_json::to_value(Usage::new(3, 4, 2)).unwrap();
        assert_eq!(
            usage,
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                   "prompt_tokens_details": {"cached_tokens": 2}})
        );
        assert_eq!(finish_reason(FinishReason::StopSequence), "stop");
        assert_eq!(finish_reason(FinishReason::EosToken), "stop");
        assert_eq!(finish_reason(FinishReason::Length), "length");
    }
}
