//! A tiny byte-level tokenizer built in memory for unit tests: one token per byte, so a
//! multi-byte character always spans several tokens, plus one special token `<eos>`.

use std::str::FromStr;

use serde_json::json;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use super::Tokenizer;

/// The id of `<eos>` in `byte_tokenizer()`.
pub const EOS: u32 = 256;

pub fn byte_tokenizer() -> Tokenizer {
    build(serde_json::Value::Null)
}

/// `byte_tokenizer()` whose post-processor starts every input with `<eos>`, as a Llama
/// tokenizer starts it with its BOS token.
pub fn byte_tokenizer_adding_bos() -> Tokenizer {
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    build(json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<eos>", "type_id": 0}}, sequence("A", 0)],
        "pair": [sequence("A", 0), sequence("B", 1)],
        "special_tokens": {"<eos>": {"id": "<eos>", "ids": [EOS], "tokens": ["<eos>"]}}
    }))
}

fn build(post_processor: serde_json::Value) -> Tokenizer {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let vocab: serde_json::Map<String, serde_json::Value> = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
    });
    let config = json!({
        "version": "1.0",
        "added_tokens": [{
            "id": EOS, "content": "<eos>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": post_processor,
        "decoder": byte_level,
        "model": { "type": "BPE", "vocab": vocab, "merges": [] }
    });
    let inner = tokenizers::Tokenizer::from_str(&config.to_string())
        .expect("the test tokenizer's JSON is valid");
    Tokenizer::new(inner)
}
