//! Streaming detokenization: each new token id yields the text it adds, which is only known once
//! the bytes of a multi-byte character are complete and the decoder's spacing rules have seen
//! the neighbouring tokens. The state machine is the `tokenizers` crate's; this keeps its state
//! owned (no borrow of the tokenizer) so it can live inside a request's task.

use super::{Tokenizer, TokenizerError};

#[derive(Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl IncrementalDecoder {
    /// Feeds one (non-special) token; returns the text it completes, possibly empty.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        let text = tokenizers::tokenizer::step_decode_stream(
            tokenizer.inner(),
            vec![id],
            true,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(|e| TokenizerError::Decode(e.to_string()))?;
        Ok(text.unwrap_or_default())
    }
}
