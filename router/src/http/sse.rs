//! Server-sent events in TGI's format: `data:<json>\n\n` per event.

use axum::body::Bytes;
use serde::Serialize;

pub const CONTENT_TYPE: &str = "text/event-stream";

/// Encodes one event. JSON never holds a raw newline, so one `data:` line always suffices.
pub fn event<T: Serialize>(payload: &T) -> Bytes {
    let json = serde_json::to_string(payload).unwrap_or_else(|e| {
        format!(r#"{{"error":"cannot encode event: {e}","error_type":"internal"}}"#)
    });
    Bytes::from(format!("data:{json}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::types::{ErrorResponse, StreamResponse, Token};

    #[test]
    fn encodes_one_data_line_per_event() {
        let response = StreamResponse {
            index: 1,
            token: Token {
                id: 7,
                text: "a\nb\"".into(),
                logprob: -0.5,
                special: false,
            },
            top_tokens: vec![],
            generated_text: None,
            details: None,
        };
        let bytes = event(&response);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with("data:{"));
        assert!(text.ends_with("}\n\n"));
        assert_eq!(text.matches('\n').count(), 2);
        let parsed: serde_json::Value = serde_json::from_str(&text[5..text.len() - 2]).unwrap();
        assert_eq!(parsed["token"]["text"], "a\nb\"");
        assert_eq!(parsed["generated_text"], serde_json::Value::Null);
    }

    #[test]
    fn encodes_errors_like_tgi() {
        let bytes = event(&ErrorResponse {
            error: "boom".into(),
            error_type: "generation".into(),
        });
        assert_eq!(
            &bytes[..],
            b"data:{\"error\":\"boom\",\"error_type\":\"generation\"}\n\n"
        );
    }
}
