//! Tokens and their log-probabilities in OpenAI's two shapes: chat's list of entries, and the
//! legacy completions' parallel lists. Special tokens (an end-of-sequence token) are left out, as
//! they are of the text.

use super::types::{ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob};
use crate::request::{PromptToken, Token};

/// Chat's entries for generated tokens and their alternatives (`top` runs parallel to `tokens`).
pub fn chat_logprobs(tokens: &[Token], top: &[Vec<Token>]) -> ChatLogprobs {
    let content = tokens
        .iter()
        .zip(top)
        .filter(|(token, _)| !token.special)
        .map(|(token, alternatives)| ChatTokenLogprob {
            token: token.text.clone(),
            logprob: token.logprob,
            bytes: token.text.as_bytes().to_vec(),
            top_logprobs: alternatives
                .iter()
                .map(|alternative| TopLogprob {
                    token: alternative.text.clone(),
                    logprob: alternative.logprob,
                    bytes: alternative.text.as_bytes().to_vec(),
                })
                .collect(),
        })
        .collect();
    ChatLogprobs {
        content,
        refusal: None,
    }
}

/// Builds a completion's `logprobs`, token by token, keeping each token's offset in the text.
#[derive(Debug, Default)]
pub struct CompletionLogprobsBuilder {
    logprobs: CompletionLogprobs,
    offset: usize,
}

impl CompletionLogprobsBuilder {
    /// Starts at `offset` bytes into the choice's text (a stream's later chunks go on from
    /// where the earlier ones ended).
    pub fn starting_at(offset: usize) -> Self {
        Self {
            logprobs: CompletionLogprobs::default(),
            offset,
        }
    }

    /// The echoed prompt's tokens; no alternatives were computed for them.
    pub fn push_prompt(&mut self, prompt: &[PromptToken]) {
        for token in prompt {
            self.push_entry(&token.text, token.logprob, None);
        }
    }

    pub fn push(&mut self, token: &Token, alternatives: &[Token]) {
        if token.special {
            return;
        }
        let top = alternatives
            .iter()
            .map(|alternative| (alternative.text.clone(), alternative.logprob))
            .collect();
        self.push_entry(&token.text, Some(token.logprob), Some(top));
    }

    fn push_entry(
        &mut self,
        text: &str,
        logprob: Option<f32>,
        top: Option<std::collections::BTreeMap<String, f32>>,
    ) {
        let entries = &mut self.logprobs;
        entries.tokens.push(text.to_string());
        entries.token_logprobs.push(logprob);
        entries.top_logprobs.push(top);
        entries
            .text_offset
            .push(u32::try_from(self.offset).unwrap_or(u32::MAX));
        self.offset += text.len();
    }

    pub fn finish(self) -> CompletionLogprobs {
        self.logprobs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str, logprob: f32, special: bool) -> Token {
        Token {
            id: 0,
            text: text.into(),
            logprob,
            special,
        }
    }

    #[test]
    fn chat_entries_carry_bytes_and_alternatives_and_skip_special_tokens() {
        let tokens = [token("Hé", -0.5, false), token("<eos>", -0.1, true)];
        let top = [
            vec![token("Hé", -0.5, false), token("Ho", -1.5, false)],
            vec![],
        ];
        let logprobs = chat_logprobs(&tokens, &top);
        assert_eq!(logprobs.content.len(), 1);
        let entry = &logprobs.content[0];
        assert_eq!(entry.bytes, "Hé".as_bytes());
        assert_eq!(entry.top_logprobs[1].token, "Ho");
        assert_eq!(entry.top_logprobs[1].logprob, -1.5);
    }

    #[test]
    fn completion_offsets_run_through_prompt_and_answer() {
        let mut builder = CompletionLogprobsBuilder::starting_at(0);
        builder.push_prompt(&[
            PromptToken {
                id: 1,
                text: "Hi".into(),
                logprob: None,
            },
            PromptToken {
                id: 2,
                text: " there".into(),
                logprob: Some(-2.0),
            },
        ]);
        builder.push(&token("!", -0.25, false), &[token("!", -0.25, false)]);
        builder.push(&token("<eos>", -0.1, true), &[]);
        let logprobs = builder.finish();
        assert_eq!(logprobs.tokens, ["Hi", " there", "!"]);
        assert_eq!(logprobs.token_logprobs, [None, Some(-2.0), Some(-0.25)]);
        assert_eq!(logprobs.text_offset, [0, 2, 8]);
        assert_eq!(logprobs.top_logprobs[0], None);
        assert_eq!(logprobs.top_logprobs[2].as_ref().unwrap()["!"], -0.25);
    }
}
