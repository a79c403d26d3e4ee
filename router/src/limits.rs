//! The token limits requests are validated against. Unset limits follow TGI 3: the longest
//! sequence is the model's context length, capped by what the KV cache holds once the shards
//! have sized it, and the longest prompt is one token shorter.

/// A 512-token prompt chunk plus room for 50 decodes. On a CPU a step's time grows with its
/// tokens, so a bounded chunk bounds the running requests' inter-token latency while a long
/// prompt is prefilled over several steps; 512 measured ahead of 256, 1,024, 2,048 and 4,096
/// in time to first token (docs/architecture.md, "Token limits").
pub const DEFAULT_MAX_BATCH_PREFILL_TOKENS: u32 = 512 + 50;

/// The limits as the operator gave them; `None` where the default applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestedLimits {
    pub max_input_tokens: Option<usize>,
    pub max_total_tokens: Option<usize>,
}

/// The limits in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLimits {
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitsError {
    #[error("--max-input-tokens ({input}) must be smaller than --max-total-tokens ({total})")]
    InputNotBelowTotal { input: usize, total: usize },
    #[error("--max-input-tokens must be at least 1")]
    NoRoomForPrompt,
    #[error("--max-total-tokens ({total}) exceeds the model's maximum positions ({context})")]
    BeyondContext { total: usize, context: usize },
    #[error(
        "the KV cache holds {cache} tokens, fewer than --max-total-tokens ({total}); lower \
         --max-total-tokens or give the cache more memory (--kv-cache-memory)"
    )]
    BeyondCache { total: usize, cache: usize },
}

impl RequestedLimits {
    /// The longest sequence the shards size the KV cache for, checked against the model's
    /// context length before warmup so that a wrong flag fails before the slow part.
    pub fn sequence_to_size_for(&self, context: usize) -> Result<usize, LimitsError> {
        let total = self.max_total_tokens.unwrap_or(context);
        if total > context {
            return Err(LimitsError::BeyondContext { total, context });
        }
        self.input_within(total)?;
        Ok(total)
    }

    /// The limits in force once warmup has sized the cache to hold `cache` tokens.
    pub fn resolve(&self, context: usize, cache: usize) -> Result<TokenLimits, LimitsError> {
        let wanted = self.sequence_to_size_for(context)?;
        let total = match self.max_total_tokens {
            Some(total) if total > cache => return Err(LimitsError::BeyondCache { total, cache }),
            Some(total) => total,
            None => wanted.min(cache),
        };
        Ok(TokenLimits {
            max_input_tokens: self.input_within(total)?,
            max_total_tokens: total,
        })
    }

    fn input_within(&self, total: usize) -> Result<usize, LimitsError> {
        let input = self.max_input_tokens.unwrap_or(total.saturating_sub(1));
        if input == 0 {
            return Err(LimitsError::NoRoomForPrompt);
        }
        if input >= total {
            return Err(LimitsError::InputNotBelowTotal { input, total });
        }
        Ok(input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requested(input: Option<usize>, total: Option<usize>) -> RequestedLimits {
        RequestedLimits {
            max_input_tokens: input,
            max_total_tokens: total,
        }
    }

    fn limits(input: usize, total: usize) -> TokenLimits {
        TokenLimits {
            max_input_tokens: input,
            max_total_tokens: total,
        }
    }

    #[test]
    fn defaults_take_the_context_length() {
        let defaults = RequestedLimits::default();
        assert_eq!(defaults.sequence_to_size_for(8192), Ok(8192));
        assert_eq!(defaults.resolve(8192, 100_000), Ok(limits(8191, 8192)));
    }

    #[test]
    fn defaults_are_capped_by_the_cache() {
        let defaults = RequestedLimits::default();
        assert_eq!(defaults.resolve(8192, 3000), Ok(limits(2999, 3000)));
        assert_eq!(
            requested(Some(1000), None).resolve(8192, 3000),
            Ok(limits(1000, 3000))
        );
        assert_eq!(
            requested(None, None).resolve(8192, 1),
            Err(LimitsError::NoRoomForPrompt)
        );
    }

    #[test]
    fn an_explicit_total_sets_the_input_default() {
        assert_eq!(
            requested(None, Some(600)).resolve(8192, 100_000),
            Ok(limits(599, 600))
        );
    }

    #[test]
    fn explicit_values_pass_when_they_fit() {
        let explicit = requested(Some(4000), Some(5000));
        assert_eq!(explicit.sequence_to_size_for(8192), Ok(5000));
        assert_eq!(explicit.resolve(8192, 5000), Ok(limits(4000, 5000)));
    }

    #[test]
    fn explicit_values_that_do_not_fit_are_refused() {
        assert_eq!(
            requested(None, Some(9000)).sequence_to_size_for(8192),
            Err(LimitsError::BeyondContext {
                total: 9000,
                context: 8192
            })
        );
        assert_eq!(
            requested(None, Some(512)).resolve(8192, 160),
            Err(LimitsError::BeyondCache {
                total: 512,
                cache: 160
            })
        );
        assert_eq!(
            requested(Some(512), Some(512)).sequence_to_size_for(8192),
            Err(LimitsError::InputNotBelowTotal {
                input: 512,
                total: 512
            })
        );
        // An explicit prompt limit above the context length, with the total left to default.
        assert_eq!(
            requested(Some(9000), None).sequence_to_size_for(8192),
            Err(LimitsError::InputNotBelowTotal {
                input: 9000,
                total: 8192
            })
        );
    }
}
