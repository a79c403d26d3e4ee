//! Server-sent events: one `data:` line of JSON per event, in TGI's spelling (`data:<json>`) or
//! OpenAI's (`data: <json>`, ended by `data: [DONE]`), and the response that carries them.

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Event streams are UTF-8; saying so keeps clients that fall back to Latin-1 for `text/*`
/// (Python's `requests`) from garbling multi-byte characters.
pub const CONTENT_TYPE: &str = "text/event-stream; charset=utf-8";

/// OpenAI's last event, after which the client stops reading.
pub const OPENAI_DONE: Bytes = Bytes::from_static(b"data: [DONE]\n\n");

/// Encodes one event in TGI's spelling.
pub fn event<T: Serialize>(payload: &T) -> Bytes {
    encode("data:", payload, |e| {
        format!(r#"{{"error":"cannot encode event: {e}","error_type":"internal"}}"#)
    })
}

/// Encodes one event in OpenAI's spelling.
pub fn openai_event<T: Serialize>(payload: &T) -> Bytes {
    encode("data: ", payload, |e| {
        format!(
            r#"{{"error":{{"message":"cannot encode event: {e}","type":"server_error","param":null,"code":"internal"}}}}"#
        )
    })
}

/// JSON never holds a raw newline, so one `data:` line always suffices.
fn encode<T: Serialize>(
    prefix: &str,
    payload: &T,
    on_error: impl FnOnce(serde_json::Error) -> String,
) -> Bytes {
    let json = serde_json::to_string(payload).unwrap_or_else(on_error);
    Bytes::from(format!("{prefix}{json}\n\n"))
}

/// A streamed response over a body of encoded events.
pub fn response(events: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        events,
    )
        .into_response()
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
    fn encodes_openai_events_with_a_space() {
        let bytes = openai_event(&serde_json::json!({"a": 1}));
        assert_eq!(&bytes[..], b"data: {\"a\":1}\n\n");
        assert_eq!(&OPENAI_DONE[..], b"data: [DONE]\n\n");
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
