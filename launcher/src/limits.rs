//! Token limits handed to the router. Defaults follow TGI's shape, bounded by what the model
//! supports so the default works for short-context models; explicit values pass through
//! unchanged and the router validates them.

use crate::args::Args;

const DEFAULT_MAX_INPUT_TOKENS: usize = 1024;
const DEFAULT_MAX_TOTAL_TOKENS: usize = 2048;
/// TGI's margin between the longest prompt and the prefill budget.
const PREFILL_MARGIN: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLimits {
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
    pub max_batch_prefill_tokens: usize,
}

impl TokenLimits {
    /// `max_positions` is the model's context length, when its config says.
    pub fn new(args: &Args, max_positions: Option<usize>) -> Self {
        let cap = max_positions.unwrap_or(usize::MAX);
        let max_total_tokens = args
            .max_total_tokens
            .unwrap_or(DEFAULT_MAX_TOTAL_TOKENS.min(cap));
        let max_input_tokens = args.max_input_tokens.unwrap_or(
            DEFAULT_MAX_INPUT_TOKENS
                .min(cap.saturating_sub(1))
                .min(max_total_tokens.saturating_sub(1)),
        );
        let max_batch_prefill_tokens = args
            .max_batch_prefill_tokens
            .unwrap_or(max_input_tokens + PREFILL_MARGIN);
        Self {
            max_input_tokens,
            max_total_tokens,
            max_batch_prefill_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn limits(flags: &[&str], max_positions: Option<usize>) -> TokenLimits {
        let command_line = std::iter::once("sluice-launcher").chain(flags.iter().copied());
        let args = Args::try_parse_from(command_line).expect("valid flags");
        TokenLimits::new(&args, max_positions)
    }

    fn expected(input: usize, total: usize, prefill: usize) -> TokenLimits {
        TokenLimits {
            max_input_tokens: input,
            max_total_tokens: total,
            max_batch_prefill_tokens: prefill,
        }
    }

    #[test]
    fn defaults_for_a_long_context_model() {
        assert_eq!(limits(&[], Some(8192)), expected(1024, 2048, 1074));
        assert_eq!(limits(&[], None), expected(1024, 2048, 1074));
    }

    #[test]
    fn defaults_fit_a_short_context_model() {
        assert_eq!(limits(&[], Some(512)), expected(511, 512, 561));
        assert_eq!(limits(&[], Some(1024)), expected(1023, 1024, 1073));
    }

    #[test]
    fn default_input_stays_below_an_explicit_total() {
        assert_eq!(
            limits(&["--max-total-tokens", "600"], Some(8192)),
            expected(599, 600, 649)
        );
    }

    #[test]
    fn explicit_values_pass_through() {
        let flags = [
            "--max-input-tokens",
            "4000",
            "--max-total-tokens",
            "5000",
            "--max-batch-prefill-tokens",
            "8192",
        ];
        assert_eq!(limits(&flags, Some(2048)), expected(4000, 5000, 8192));
    }
}
