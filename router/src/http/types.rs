//! TGI's request and response bodies, field for field, so TGI clients work unchanged.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize)]
pub struct GenerateRequest {
    pub inputs: String,
    #[serde(default)]
    pub parameters: GenerateParameters,
    /// Read by the compatibility route `/` only: stream the answer or not.
    #[serde(default)]
    pub stream: bool,
}

/// Every field TGI's clients send. Unsupported ones are accepted at their neutral value and
/// refused with a validation error otherwise, never silently ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerateParameters {
    pub best_of: Option<usize>,
    pub temperature: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub top_k: Option<i32>,
    pub top_p: Option<f32>,
    pub typical_p: Option<f32>,
    #[serde(default)]
    pub do_sample: bool,
    pub max_new_tokens: Option<u32>,
    pub return_full_text: Option<bool>,
    #[serde(default)]
    pub stop: Vec<String>,
    pub truncate: Option<usize>,
    #[serde(default)]
    pub watermark: bool,
    #[serde(default)]
    pub details: bool,
    #[serde(default)]
    pub decoder_input_details: bool,
    pub seed: Option<u64>,
    pub top_n_tokens: Option<u32>,
    pub grammar: Option<serde_json::Value>,
    pub adapter_id: Option<String>,
    /// Sluice extension (as in vLLM): keep generating past end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    /// Sluice extension: prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    /// Prompt tokens with logprobs; filled only with `decoder_input_details`, which is refused
    /// for now, so always empty.
    pub prefill: Vec<Token>,
    pub tokens: Vec<Token>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub input_length: u32,
    /// Sluice extension: prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

/// One server-sent event of `/generate_stream`.
#[derive(Debug, Clone, Serialize)]
pub struct StreamResponse {
    pub index: u32,
    pub token: Token,
    pub top_tokens: Vec<Token>,
    pub generated_text: Option<String>,
    pub details: Option<StreamDetails>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub model_id: String,
    pub model_dtype: String,
    pub model_device_type: String,
    pub max_concurrent_requests: usize,
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
    pub max_batch_total_tokens: u32,
    pub max_batch_size: Option<usize>,
    pub block_size: u32,
    pub num_kv_blocks: u32,
    pub prefix_caching: bool,
    pub version: &'static str,
    pub router: &'static str,
}
