//! Turns a front-end's prompt and parameters into a `GenerationRequest` the scheduler can run,
//! or says precisely why not. It knows nothing of HTTP: each front-end maps its own body onto
//! `RequestedParameters` first.

use std::sync::Arc;

use crate::request::{
    GenerationRequest, Prompt, ReportedLogprobs, RequestedParameters, SamplingParameters,
    StoppingParameters,
};
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ValidationError {
    #[error("`inputs` cannot be empty")]
    EmptyInput,
    #[error("`inputs` must have less than {max} tokens. Given: {given}")]
    InputTooLong { max: usize, given: usize },
    #[error("`inputs` tokens + `max_new_tokens` must be <= {max}. Given: {input} `inputs` tokens and {new} `max_new_tokens`")]
    TotalTooLong { max: usize, input: usize, new: u32 },
    #[error("`max_new_tokens` must be strictly positive")]
    MaxNewTokens,
    #[error("`temperature` must be strictly positive")]
    Temperature,
    #[error("`top_p` must be > 0.0 and < 1.0")]
    TopP,
    #[error("`top_k` must be strictly positive")]
    TopK,
    #[error("`repetition_penalty` must be strictly positive")]
    RepetitionPenalty,
    #[error("`typical_p` must be > 0.0 and <= 1.0")]
    TypicalP,
    #[error("`min_p` must be >= 0.0 and <= 1.0")]
    MinP,
    #[error("`{0}` must be >= -2.0 and <= 2.0")]
    Penalty(&'static str),
    #[error("`stop` supports up to {max} stop sequences. Given: {given}")]
    TooManyStopSequences { max: usize, given: usize },
    #[error("`stop` sequences cannot be empty strings")]
    EmptyStopSequence,
    #[error("`top_n_tokens` must be >= 0 and <= {max}. Given: {given}")]
    TopNTokens { max: u32, given: u32 },
    #[error("`best_of` must be > 0 and <= {max}. Given: {given}")]
    BestOf { max: u32, given: u32 },
    #[error("you must use sampling when `best_of` is > 1")]
    BestOfSampling,
    #[error("`seed` must not be set when `best_of` > 1")]
    BestOfSeed,
    #[error("`best_of` != 1 is not supported when streaming tokens")]
    BestOfStream,
    #[error("`decoder_input_details` == true is not supported when streaming tokens")]
    PrefillDetailsStream,
    #[error("`best_of` must be >= `n`. Given: best_of={best_of}, n={n}")]
    BestOfBelowN { n: u32, best_of: u32 },
    #[error("`best_of` must equal `n` when streaming")]
    BestOfStreamed,
    #[error("`top_logprobs` requires `logprobs` to be true")]
    TopLogprobsWithoutLogprobs,
    #[error("`prompt` holds at most {max} prompts. Given: {given}")]
    ClientBatchSize { max: usize, given: usize },
    #[error("`truncate` must be strictly positive and less than {max}. Given: {given}")]
    Truncate { max: usize, given: usize },
    #[error("`{0}` is not supported yet")]
    Unsupported(&'static str),
    /// A parameter Sluice supports, given in a form it does not support yet.
    #[error("`{param}`: {what} is not supported yet")]
    UnsupportedForm { param: &'static str, what: String },
    #[error("token id {id} is outside the model's vocabulary of {vocab_size}")]
    OutOfVocabulary { id: u32, vocab_size: u32 },
    #[error("{0}")]
    Tokenizer(String),
}

impl ValidationError {
    /// The request parameter at fault, under TGI's name.
    pub fn parameter(&self) -> Option<&'static str> {
        let name = match self {
            Self::EmptyInput
            | Self::InputTooLong { .. }
            | Self::OutOfVocabulary { .. }
            | Self::Tokenizer(_) => "inputs",
            Self::TotalTooLong { .. } | Self::MaxNewTokens => "max_new_tokens",
            Self::Temperature => "temperature",
            Self::TopP => "top_p",
            Self::TopK => "top_k",
            Self::RepetitionPenalty => "repetition_penalty",
            Self::TypicalP => "typical_p",
            Self::MinP => "min_p",
            Self::Penalty(name)
            | Self::Unsupported(name)
            | Self::UnsupportedForm { param: name, .. } => name,
            Self::TooManyStopSequences { .. } | Self::EmptyStopSequence => "stop",
            Self::TopNTokens { .. } => "top_n_tokens",
            Self::BestOf { .. }
            | Self::BestOfSampling
            | Self::BestOfStream
            | Self::BestOfBelowN { .. }
            | Self::BestOfStreamed => "best_of",
            Self::BestOfSeed => "seed",
            Self::PrefillDetailsStream => "decoder_input_details",
            Self::Truncate { .. } => "truncate",
            Self::TopLogprobsWithoutLogprobs => "top_logprobs",
            Self::ClientBatchSize { .. } => "prompt",
        };
        Some(name)
    }
}

impl From<TokenizerError> for ValidationError {
    fn from(e: TokenizerError) -> Self {
        Self::Tokenizer(e.to_string())
    }
}

/// Limits the validator enforces.
#[derive(Debug, Clone)]
pub struct ValidationConfig {
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
    pub max_stop_sequences: usize,
    pub max_top_n_tokens: u32,
    /// The most sequences one request may ask for.
    pub max_best_of: u32,
    /// The model's vocabulary: a tokenizer with more tokens than the model must not reach it.
    pub vocab_size: u32,
}

pub struct Validator {
    tokenizer: Arc<Tokenizer>,
    config: ValidationConfig,
}

impl Validator {
    pub fn new(tokenizer: Arc<Tokenizer>, config: ValidationConfig) -> Self {
        Self { tokenizer, config }
    }

    #[tracing::instrument(name = "validation", skip_all)]
    pub fn validate(
        &self,
        prompt: Prompt<'_>,
        params: &RequestedParameters,
    ) -> Result<GenerationRequest, ValidationError> {
        if prompt.text().is_empty() {
            return Err(ValidationError::EmptyInput);
        }
        let sampling = sampling_parameters(params)?;
        let stop_sequences = self.stop_sequences(params)?;
        let logprobs = self.reported_logprobs(params)?;
        let sequences = match params.sequences.unwrap_or(1) {
            n if n == 0 || n > self.config.max_best_of => {
                return Err(ValidationError::BestOf {
                    max: self.config.max_best_of,
                    given: n,
                })
            }
            n => n,
        };

        let mut input_ids = self
            .tokenizer
            .encode(prompt.text(), prompt.adds_special_tokens())?;
        if let Some(truncate) = params.truncate {
            if truncate == 0 || truncate > self.config.max_input_tokens {
                return Err(ValidationError::Truncate {
                    max: self.config.max_input_tokens,
                    given: truncate,
                });
            }
            // The prompt's end is what the next token continues: keep that.
            let excess = input_ids.len().saturating_sub(truncate);
            input_ids.drain(..excess);
        }
        if input_ids.is_empty() {
            return Err(ValidationError::EmptyInput);
        }
        if let Some(&id) = input_ids.iter().find(|&&id| id >= self.config.vocab_size) {
            return Err(ValidationError::OutOfVocabulary {
                id,
                vocab_size: self.config.vocab_size,
            });
        }
        let input_len = input_ids.len();
        if input_len > self.config.max_input_tokens {
            return Err(ValidationError::InputTooLong {
                max: self.config.max_input_tokens,
                given: input_len,
            });
        }
        let room = (self.config.max_total_tokens - input_len.min(self.config.max_total_tokens))
            .try_into()
            .unwrap_or(u32::MAX);
        let max_new_tokens = match params.max_new_tokens {
            Some(0) => return Err(ValidationError::MaxNewTokens),
            Some(n) => n,
            // TGI's default: whatever room the sequence has left.
            None => room.max(1),
        };
        if input_len + max_new_tokens as usize > self.config.max_total_tokens {
            return Err(ValidationError::TotalTooLong {
                max: self.config.max_total_tokens,
                input: input_len,
                new: max_new_tokens,
            });
        }
        Ok(GenerationRequest {
            input_ids,
            sampling,
            stopping: StoppingParameters {
                max_new_tokens,
                ignore_eos: params.ignore_eos,
                stop_sequences,
            },
            logprobs,
            sequences,
        })
    }

    fn reported_logprobs(
        &self,
        params: &RequestedParameters,
    ) -> Result<ReportedLogprobs, ValidationError> {
        let top_n_tokens = params.top_n_tokens.unwrap_or(0);
        if top_n_tokens > self.config.max_top_n_tokens {
            return Err(ValidationError::TopNTokens {
                max: self.config.max_top_n_tokens,
                given: top_n_tokens,
            });
        }
        Ok(ReportedLogprobs {
            top_n_tokens,
            prompt: params.prompt_logprobs,
        })
    }

    fn stop_sequences(&self, params: &RequestedParameters) -> Result<Vec<String>, ValidationError> {
        if params.stop.len() > self.config.max_stop_sequences {
            return Err(ValidationError::TooManyStopSequences {
                max: self.config.max_stop_sequences,
                given: params.stop.len(),
            });
        }
        if params.stop.iter().any(String::is_empty) {
            return Err(ValidationError::EmptyStopSequence);
        }
        Ok(params.stop.clone())
    }
}

fn sampling_parameters(
    params: &RequestedParameters,
) -> Result<SamplingParameters, ValidationError> {
    let temperature = params.temperature.unwrap_or(1.0);
    if temperature.is_nan() || temperature <= 0.0 {
        return Err(ValidationError::Temperature);
    }
    let top_p = params.top_p.unwrap_or(1.0);
    if params.top_p.is_some() && !(top_p > 0.0 && top_p < 1.0) {
        return Err(ValidationError::TopP);
    }
    let top_k = match params.top_k {
        Some(k) if k <= 0 => return Err(ValidationError::TopK),
        Some(k) => k as u32,
        None => 0,
    };
    let repetition_penalty = params.repetition_penalty.unwrap_or(1.0);
    if repetition_penalty.is_nan() || repetition_penalty <= 0.0 {
        return Err(ValidationError::RepetitionPenalty);
    }
    let typical_p = params.typical_p.unwrap_or(1.0);
    if !(typical_p > 0.0 && typical_p <= 1.0) {
        return Err(ValidationError::TypicalP);
    }
    let min_p = params.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ValidationError::MinP);
    }
    let penalty = |value: Option<f32>, name| match value.unwrap_or(0.0) {
        p if (-2.0..=2.0).contains(&p) => Ok(p),
        _ => Err(ValidationError::Penalty(name)),
    };
    let frequency_penalty = penalty(params.frequency_penalty, "frequency_penalty")?;
    let presence_penalty = penalty(params.presence_penalty, "presence_penalty")?;
    // Like TGI, any sampling parameter turns sampling on; the penalties apply to greedy
    // requests too.
    let do_sample = params.do_sample
        || params.temperature.is_some_and(|t| t != 1.0)
        || params.top_k.is_some()
        || params.top_p.is_some()
        || typical_p < 1.0
        || min_p > 0.0;
    Ok(SamplingParameters {
        temperature,
        top_k,
        top_p,
        do_sample,
        seed: params.seed.unwrap_or_else(rand::random),
        repetition_penalty,
        typical_p,
        min_p,
        frequency_penalty,
        presence_penalty,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_support::{byte_tokenizer, byte_tokenizer_adding_bos, EOS};

    fn config() -> ValidationConfig {
        ValidationConfig {
            max_input_tokens: 8,
            max_total_tokens: 12,
            max_stop_sequences: 2,
            max_top_n_tokens: 5,
            max_best_of: 2,
            vocab_size: 256,
        }
    }

    fn validator() -> Validator {
        Validator::new(Arc::new(byte_tokenizer()), config())
    }

    fn params() -> RequestedParameters {
        RequestedParameters::default()
    }

    #[test]
    fn accepts_a_plain_request_and_fills_max_new_tokens() {
        let valid = validator()
            .validate(Prompt::Text("abc"), &params())
            .unwrap();
        assert_eq!(valid.input_ids.len(), 3);
        assert_eq!(valid.stopping.max_new_tokens, 9);
        assert!(!valid.sampling.do_sample);
    }

    #[test]
    fn refuses_bad_inputs() {
        let v = validator();
        assert_eq!(
            v.validate(Prompt::Text(""), &params()).unwrap_err(),
            ValidationError::EmptyInput
        );
        assert!(matches!(
            v.validate(Prompt::Text("123456789"), &params())
                .unwrap_err(),
            ValidationError::InputTooLong { max: 8, given: 9 }
        ));
        let mut p = params();
        p.max_new_tokens = Some(10);
        assert!(matches!(
            v.validate(Prompt::Text("abc"), &p).unwrap_err(),
            ValidationError::TotalTooLong { .. }
        ));
        let mut p = params();
        p.temperature = Some(-0.5);
        assert_eq!(
            v.validate(Prompt::Text("abc"), &p).unwrap_err(),
            ValidationError::Temperature
        );
        let mut p = params();
        p.top_p = Some(1.5);
        assert_eq!(
            v.validate(Prompt::Text("abc"), &p).unwrap_err(),
            ValidationError::TopP
        );
        let mut p = params();
        p.stop = vec!["a".into(), "b".into(), "c".into()];
        assert!(matches!(
            v.validate(Prompt::Text("abc"), &p).unwrap_err(),
            ValidationError::TooManyStopSequences { .. }
        ));
    }

    #[test]
    fn refuses_a_prompt_the_model_has_no_embedding_for() {
        let v = Validator::new(
            Arc::new(byte_tokenizer()),
            ValidationConfig {
                // The byte tokenizer's `a`, `b` and `c` are ids 64, 65 and 66.
                vocab_size: 66,
                ..config()
            },
        );
        assert!(v.validate(Prompt::Text("ab"), &params()).is_ok());
        assert!(matches!(
            v.validate(Prompt::Text("abc"), &params()).unwrap_err(),
            ValidationError::OutOfVocabulary { vocab_size: 66, .. }
        ));
    }

    #[test]
    fn refuses_filters_and_penalties_out_of_range() {
        let v = validator();
        type Setter = fn(&mut RequestedParameters);
        let cases: [(Setter, ValidationError); 5] = [
            (|p| p.typical_p = Some(0.0), ValidationError::TypicalP),
            (|p| p.typical_p = Some(1.5), ValidationError::TypicalP),
            (|p| p.min_p = Some(-0.1), ValidationError::MinP),
            (
                |p| p.frequency_penalty = Some(2.5),
                ValidationError::Penalty("frequency_penalty"),
            ),
            (
                |p| p.presence_penalty = Some(f32::NAN),
                ValidationError::Penalty("presence_penalty"),
            ),
        ];
        for (set, error) in cases {
            let mut p = params();
            set(&mut p);
            assert_eq!(v.validate(Prompt::Text("abc"), &p).unwrap_err(), error);
        }
    }

    #[test]
    fn typical_p_and_min_p_turn_sampling_on_and_penalties_do_not() {
        let mut p = params();
        p.frequency_penalty = Some(0.5);
        p.presence_penalty = Some(-0.5);
        let valid = validator().validate(Prompt::Text("abc"), &p).unwrap();
        assert!(!valid.sampling.do_sample);
        assert_eq!(valid.sampling.frequency_penalty, 0.5);
        assert_eq!(valid.sampling.presence_penalty, -0.5);
        for set in [
            |p: &mut RequestedParameters| p.typical_p = Some(0.9),
            |p: &mut RequestedParameters| p.min_p = Some(0.1),
        ] {
            let mut p = params();
            set(&mut p);
            assert!(
                validator()
                    .validate(Prompt::Text("abc"), &p)
                    .unwrap()
                    .sampling
                    .do_sample
            );
        }
    }

    #[test]
    fn a_chat_template_prompt_gets_no_second_bos() {
        let v = Validator::new(
            Arc::new(byte_tokenizer_adding_bos()),
            ValidationConfig {
                vocab_size: EOS + 1,
                ..config()
            },
        );
        let text = v.validate(Prompt::Text("ab"), &params()).unwrap();
        assert_eq!(text.input_ids, [EOS, 64, 65]);
        // The template wrote the BOS itself.
        let templated = v
            .validate(Prompt::ChatTemplate("<eos>ab"), &params())
            .unwrap();
        assert_eq!(templated.input_ids, [EOS, 64, 65]);
    }

    #[test]
    fn sampling_parameters_turn_sampling_on() {
        let mut p = params();
        p.top_k = Some(5);
        p.seed = Some(7);
        let valid = validator().validate(Prompt::Text("abc"), &p).unwrap();
        assert!(valid.sampling.do_sample);
        assert_eq!(valid.sampling.top_k, 5);
        assert_eq!(valid.sampling.seed, 7);
    }

    #[test]
    fn truncate_keeps_the_prompts_end_within_the_input_limit() {
        let mut p = params();
        p.truncate = Some(3);
        let valid = validator()
            .validate(Prompt::Text("123456789abc"), &p)
            .unwrap();
        assert_eq!(
            valid.input_ids,
            byte_tokenizer().encode("abc", true).unwrap()
        );
        for truncate in [0, 9] {
            p.truncate = Some(truncate);
            assert_eq!(
                validator().validate(Prompt::Text("abc"), &p).unwrap_err(),
                ValidationError::Truncate {
                    max: 8,
                    given: truncate
                }
            );
        }
    }

    #[test]
    fn top_n_tokens_and_sequences_stay_within_their_limits() {
        let mut p = params();
        p.top_n_tokens = Some(5);
        p.prompt_logprobs = true;
        p.sequences = Some(2);
        let valid = validator().validate(Prompt::Text("abc"), &p).unwrap();
        assert_eq!(
            valid.logprobs,
            ReportedLogprobs {
                top_n_tokens: 5,
                prompt: true
            }
        );
        assert_eq!(valid.sequences, 2);
        p.top_n_tokens = Some(6);
        assert_eq!(
            validator().validate(Prompt::Text("abc"), &p).unwrap_err(),
            ValidationError::TopNTokens { max: 5, given: 6 }
        );
        p.top_n_tokens = None;
        for given in [0, 3] {
            p.sequences = Some(given);
            assert_eq!(
                validator().validate(Prompt::Text("abc"), &p).unwrap_err(),
                ValidationError::BestOf { max: 2, given }
            );
        }
    }
}
