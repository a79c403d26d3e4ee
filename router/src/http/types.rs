//! TGI's request and response bodies, field for field, so TGI clients work unchanged.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::request::RequestedParameters;
pub use crate::request::{FinishReason, PromptToken, Token};
use crate::validation::ValidationError;

#[derive(Debug, Clone, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
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

impl GenerateParameters {
    /// The parameters as the domain spells them, or the first one given that Sluice does not
    /// support or that TGI's rules refuse (`stream`: whether the answer is streamed).
    pub fn to_requested(&self, stream: bool) -> Result<RequestedParameters, ValidationError> {
        let refusals: [(bool, &'static str); 3] = [
            (self.adapter_id.is_some(), "adapter_id"),
            (self.watermark, "watermark"),
            (
                self.grammar.as_ref().is_some_and(|g| !g.is_null()),
                "grammar",
            ),
        ];
        if let Some((_, name)) = refusals.into_iter().find(|(refused, _)| *refused) {
            return Err(ValidationError::Unsupported(name));
        }
        let best_of = self.best_of.unwrap_or(1);
        if best_of > 1 {
            let sampling = self.do_sample
                || self.temperature.is_some()
                || self.top_k.is_some()
                || self.top_p.is_some()
                || self.typical_p.is_some();
            if !sampling {
                return Err(ValidationError::BestOfSampling);
            }
            if self.seed.is_some() {
                return Err(ValidationError::BestOfSeed);
            }
            if stream {
                return Err(ValidationError::BestOfStream);
            }
        }
        if stream && self.decoder_input_details {
            return Err(ValidationError::PrefillDetailsStream);
        }
        Ok(RequestedParameters {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            do_sample: self.do_sample,
            seed: self.seed,
            repetition_penalty: self.repetition_penalty,
            typical_p: self.typical_p,
            min_p: None,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: None,
            max_new_tokens: self.max_new_tokens,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            truncate: self.truncate,
            top_n_tokens: self.top_n_tokens,
            prompt_logprobs: self.decoder_input_details,
            sequences: Some(u32::try_from(best_of).unwrap_or(u32::MAX)),
        })
    }
}

/// One of the sequences `best_of` generated besides the answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BestOfSequence {
    pub generated_text: String,
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PromptToken>,
    pub tokens: Vec<Token>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    #[schema(required)]
    pub seed: Option<u64>,
    /// Sluice extension: prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    /// Prompt tokens with their logprobs, with `decoder_input_details`.
    pub prefill: Vec<PromptToken>,
    pub tokens: Vec<Token>,
    /// Each token's alternatives, with `top_n_tokens`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
    /// The other sequences, with `best_of`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of_sequences: Option<Vec<BestOfSequence>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub details: Option<Details>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    #[schema(required)]
    pub seed: Option<u64>,
    pub input_length: u32,
    /// Sluice extension: prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

/// One server-sent event of `/generate_stream`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StreamResponse {
    pub index: u32,
    pub token: Token,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Token>,
    /// On the last event only.
    #[schema(required)]
    pub generated_text: Option<String>,
    /// On the last event only.
    #[schema(required)]
    pub details: Option<StreamDetails>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: String,
    pub error_type: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Info {
    pub model_id: String,
    pub model_dtype: String,
    pub model_device_type: String,
    pub max_concurrent_requests: usize,
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
    /// TGI's tokenizing threads. Sluice tokenizes on each request's own task, so this is the
    /// runtime's worker threads, which run those tasks.
    pub validation_workers: usize,
    /// Prompts one `/v1/completions` request may carry.
    pub max_client_batch_size: usize,
    pub max_batch_total_tokens: u32,
    #[schema(required)]
    pub max_batch_size: Option<usize>,
    pub block_size: u32,
    pub num_kv_blocks: u32,
    pub prefix_caching: bool,
    pub version: &'static str,
    pub router: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_parameters_are_refused_by_name_and_neutral_ones_accepted() {
        let params = GenerateParameters {
            best_of: Some(1),
            typical_p: Some(1.0),
            watermark: false,
            temperature: Some(0.5),
            ..Default::default()
        };
        assert_eq!(params.to_requested(false).unwrap().temperature, Some(0.5));
        let params = GenerateParameters {
            adapter_id: Some("lora".into()),
            ..Default::default()
        };
        assert_eq!(
            params.to_requested(false).unwrap_err(),
            ValidationError::Unsupported("adapter_id")
        );
    }

    #[test]
    fn best_of_follows_tgis_rules() {
        let sampled = GenerateParameters {
            best_of: Some(2),
            do_sample: true,
            ..Default::default()
        };
        assert_eq!(sampled.to_requested(false).unwrap().sequences, Some(2));
        let cases = [
            (
                GenerateParameters {
                    do_sample: false,
                    ..sampled.clone()
                },
                false,
                ValidationError::BestOfSampling,
            ),
            (
                GenerateParameters {
                    seed: Some(1),
                    ..sampled.clone()
                },
                false,
                ValidationError::BestOfSeed,
            ),
            (sampled.clone(), true, ValidationError::BestOfStream),
            (
                GenerateParameters {
                    decoder_input_details: true,
                    ..Default::default()
                },
                true,
                ValidationError::PrefillDetailsStream,
            ),
        ];
        for (params, stream, error) in cases {
            assert_eq!(params.to_requested(stream).unwrap_err(), error);
        }
    }
}
