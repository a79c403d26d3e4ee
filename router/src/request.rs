//! The domain of a generation request, below any HTTP API: what a front-end asks for, what
//! validation makes of it, and what comes back. TGI's routes (`http/`) map their JSON onto these
//! types; another API can be a second front-end on the same ones. The scheduler runs them, and
//! only the shard-client edge (`shard.rs`) turns them into protobuf.

use std::time::Instant;

use serde::Serialize;
use utoipa::ToSchema;

/// A prompt's text and where it came from, which decides whether the tokenizer adds the model's
/// special tokens (such as a beginning-of-sequence token) around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prompt<'a> {
    /// Text as a client sent it (TGI's `inputs`, OpenAI's `prompt`): tokenized with the special
    /// tokens the tokenizer adds to any input.
    Text(&'a str),
    /// Rendered by the model's chat template, which already wrote the special tokens it wants;
    /// adding them again would, for example, start a Llama 3 prompt with two BOS tokens.
    ChatTemplate(&'a str),
}

impl<'a> Prompt<'a> {
    pub fn text(&self) -> &'a str {
        match self {
            Self::Text(text) | Self::ChatTemplate(text) => text,
        }
    }

    pub fn adds_special_tokens(&self) -> bool {
        matches!(self, Self::Text(_))
    }
}

/// Generation parameters as a front-end received them, before validation. `None` means "not
/// given": validation applies the defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestedParameters {
    pub temperature: Option<f32>,
    pub top_k: Option<i32>,
    pub top_p: Option<f32>,
    pub do_sample: bool,
    pub seed: Option<u64>,
    pub repetition_penalty: Option<f32>,
    pub typical_p: Option<f32>,
    pub min_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub max_new_tokens: Option<u32>,
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Keep only the prompt's last `truncate` tokens.
    pub truncate: Option<usize>,
    /// Alternatives to report with each generated token.
    pub top_n_tokens: Option<u32>,
    /// Report each prompt token's log-probability.
    pub prompt_logprobs: bool,
    /// Sequences to generate from the one prompt (TGI's `best_of`, OpenAI's `n`).
    pub sequences: Option<u32>,
}

/// How the next token is chosen. Greedy unless `do_sample`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParameters {
    pub temperature: f32,
    /// 0: no top-k cut.
    pub top_k: u32,
    pub top_p: f32,
    pub do_sample: bool,
    pub seed: u64,
    /// Over prompt and output (transformers' rule); 1: off.
    pub repetition_penalty: f32,
    /// 1: off.
    pub typical_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// OpenAI's, over the output only; 0: off.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
}

impl SamplingParameters {
    /// The seed sequence `index` of a request draws with: each of its sequences has its own.
    pub fn sequence_seed(&self, index: usize) -> u64 {
        self.seed.wrapping_add(index as u64)
    }
}

/// When a request stops; the scheduler applies them (see `generation::StopCriteria`).
#[derive(Debug, Clone, PartialEq)]
pub struct StoppingParameters {
    pub max_new_tokens: u32,
    pub ignore_eos: bool,
    pub stop_sequences: Vec<String>,
}

/// What a request reports beyond its tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportedLogprobs {
    /// Alternatives with each generated token (0: none).
    pub top_n_tokens: u32,
    /// Each prompt token's log-probability (computed, so never from the prefix cache).
    pub prompt: bool,
}

/// A request that passed validation: the prompt's token ids and its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub input_ids: Vec<u32>,
    pub sampling: SamplingParameters,
    pub stopping: StoppingParameters,
    pub logprobs: ReportedLogprobs,
    /// Sequences generated from the prompt, each with its own stream. The prompt is computed
    /// once: the others start from its blocks in the prefix cache.
    pub sequences: u32,
}

/// Why a request ended. Serialized under TGI's names, which the TGI routes return as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// The model produced one of its end-of-sequence tokens.
    EosToken,
    /// The text produced one of the request's stop sequences.
    StopSequence,
}

/// One generated token with its text.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Token {
    pub id: u32,
    /// What the token adds to the text (a special token's own text, which the generated text
    /// leaves out).
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

/// One prompt token with its log-probability given the tokens before it (none for the first).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PromptToken {
    pub id: u32,
    pub text: String,
    #[schema(required)]
    pub logprob: Option<f32>,
}

/// How a finished request ended.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationEnd {
    pub finish_reason: FinishReason,
    /// The generated text, cut just after a stop sequence when one ended it.
    pub generated_text: String,
    /// Where in `generated_text` the stop sequence that ended it starts (OpenAI's answers end
    /// there).
    pub stop_sequence_start: Option<usize>,
    pub generated_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    /// The prompt's tokens with their log-probabilities, when the request asked for them.
    pub prompt_tokens: Vec<PromptToken>,
    /// When the scheduler was handed the request, and when a step first ran it (TGI's queue
    /// and inference times).
    pub queued: Instant,
    pub started: Instant,
}
