//! The model's tokenizer (Hugging Face `tokenizers`), loaded from tokenizer.json, the
//! incremental detokenizer that turns a stream of token ids back into text, and the model's chat
//! template (`chat_template`), which turns a conversation into a prompt.

pub mod chat_template;
mod incremental;

pub use incremental::IncrementalDecoder;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer from {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error("detokenization failed: {0}")]
    Decode(String),
}

/// A token of an input and the bytes of the input it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSpan {
    pub id: u32,
    pub start: usize,
    pub stop: usize,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special_ids: HashSet<u32>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory, or from the given file.
    pub fn from_path(path: &Path) -> Result<Self, TokenizerError> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| TokenizerError::Load {
            path: file.clone(),
            message: e.to_string(),
        })?;
        Ok(Self::new(inner))
    }

    pub fn new(inner: tokenizers::Tokenizer) -> Self {
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        Self { inner, special_ids }
    }

    /// Token ids of `text`; `add_special_tokens` runs the tokenizer's post-processor (which may
    /// add a beginning-of-sequence token). Special tokens written in the text are recognised
    /// either way.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Like `encode`, with each token's span in `text` as byte offsets (`start..stop`). A token
    /// the tokenizer added (a beginning-of-sequence token) spans nothing; several tokens of one
    /// character share its span.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenSpan>, TokenizerError> {
        // `encode` (unlike `encode_fast`) tracks offsets, in bytes by default.
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .map(|(&id, &(start, stop))| TokenSpan { id, start, stop })
            .collect())
    }

    /// Decodes a whole sequence at once, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// The literal text of a token (e.g. `<|im_end|>` for a special token).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_default()
    }

    /// A token's text decoded on its own, special tokens included: how a token is shown among
    /// alternatives and prompt tokens (a piece of a multi-byte character shows as U+FFFD).
    pub fn text_alone(&self, id: u32) -> String {
        self.inner
            .decode(&[id], false)
            .unwrap_or_else(|_| self.token_text(id))
    }

    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
#[cfg(test)]
pub mod test_support;

#[cfg(test)]
mod tests {
    use super::test_support::{byte_tokenizer, EOS};
    use super::*;

    #[test]
    fn round_trips_text() {
        let tokenizer = byte_tokenizer();
        let text = "Héllo, wörld! 日本 🦀";
        let ids = tokenizer.encode(text, true).unwrap();
        assert_eq!(ids.len(), text.len(), "one token per byte");
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    }

    #[test]
    fn incremental_decoding_waits_for_whole_characters() {
        let tokenizer = byte_tokenizer();
        let text = "a🦀é z";
        let ids = tokenizer.encode(text, true).unwrap();
        let mut decoder = IncrementalDecoder::default();
        let pieces: Vec<String> = ids
            .iter()
            .map(|id| decoder.push(&tokenizer, *id).unwrap())
            .collect();
        // The crab is four bytes: nothing shows until the last of them arrives.
        assert_eq!(pieces[1..5], ["", "", "", "🦀"]);
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn offsets_are_bytes_of_the_input() {
        let tokenizer = byte_tokenizer();
        let text = "aé🦀";
        let spans = tokenizer.encode_with_offsets(text, true).unwrap();
        let ids = tokenizer.encode(text, true).unwrap();
        assert_eq!(spans.iter().map(|s| s.id).collect::<Vec<_>>(), ids);
        // One token per byte, each spanning the whole character its byte belongs to.
        let spans: Vec<(usize, usize)> = spans.iter().map(|s| (s.start, s.stop)).collect();
        let crab = (3, 7);
        assert_eq!(spans, [(0, 1), (1, 3), (1, 3), crab, crab, crab, crab]);
    }

    #[test]
    fn knows_special_tokens() {
        let tokenizer = byte_tokenizer();
        assert!(tokenizer.is_special(EOS));
        assert!(!tokenizer.is_special(65));
        assert_eq!(tokenizer.token_text(EOS), "<eos>");
        let mut ids = tokenizer.encode("ok", true).unwrap();
        ids.push(EOS);
        assert_eq!(tokenizer.decode(&ids).unwrap(), "ok");
    }
}
