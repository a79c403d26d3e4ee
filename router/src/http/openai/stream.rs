//! A streamed OpenAI answer, and the text OpenAI's clients expect: the generated text without the
//! stop sequence that ended it (OpenAI leaves it out; TGI's routes keep it).
//!
//! A stop sequence is found once its last token arrives, but its first bytes may have come with
//! earlier tokens. So while a stop sequence could still be completing, the stream holds back the
//! bytes it might start with, and the concatenated chunks are exactly the non-streamed text.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::response::Response;

use super::types::{finish_reason, ChatChunkChoice, CompletionChoice, Delta, Usage};
use super::AnswerHead;
use crate::http::error::ApiError;
use crate::http::sse;
use crate::http::submission::Submitted;
use crate::request::GenerationEnd;

/// The generated text without the stop sequence that ended it, if one did.
pub fn answer_text(end: &GenerationEnd) -> &str {
    let text = &end.generated_text;
    &text[..end.stop_sequence_start.unwrap_or(text.len())]
}

/// The text of a streamed answer: what was generated, and how much of it was sent.
pub struct StreamedText {
    text: String,
    sent: usize,
    /// Bytes at the end that may be the start of a stop sequence: one less than the longest.
    held_back: usize,
}

impl StreamedText {
    pub fn new(stop_sequences: &[String]) -> Self {
        let longest = stop_sequences.iter().map(String::len).max().unwrap_or(0);
        Self {
            text: String::new(),
            sent: 0,
            held_back: longest.saturating_sub(1),
        }
    }

    /// Adds a token's text; returns what can be sent now (possibly nothing).
    pub fn push(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
        let mut until = self.text.len().saturating_sub(self.held_back);
        while !self.text.is_char_boundary(until) {
            until -= 1;
        }
        if until <= self.sent {
            return String::new();
        }
        let ready = self.text[self.sent..until].to_string();
        self.sent = until;
        ready
    }

    /// The rest of the final `answer` (see `answer_text`), which starts with what was sent.
    pub fn finish(&self, answer: &str) -> String {
        answer.get(self.sent..).unwrap_or_default().to_string()
    }
}

/// The route a stream answers, which decides its chunks' shapes.
pub enum ChunkKind {
    /// `/v1/completions`; the prompt comes first when `echo` asked for it.
    Completion { echo: Option<String> },
    /// `/v1/chat/completions`.
    Chat,
}

impl ChunkKind {
    const COMPLETION_OBJECT: &'static str = "text_completion";
    const CHAT_OBJECT: &'static str = "chat.completion.chunk";

    /// The chunk before any token: the echoed prompt, or the assistant's role.
    fn opening(&self, head: &AnswerHead) -> Option<Bytes> {
        match self {
            Self::Completion { echo: None } => None,
            Self::Completion { echo: Some(prompt) } => Some(self.text(head, prompt.clone(), None)),
            Self::Chat => {
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                };
                Some(chat_chunk(head, delta, None))
            }
        }
    }

    /// A chunk of text; `finish_reason` on the last.
    fn text(&self, head: &AnswerHead, text: String, finish_reason: Option<&'static str>) -> Bytes {
        match self {
            Self::Completion { .. } => {
                let choice = CompletionChoice {
                    index: 0,
                    text,
                    finish_reason,
                    logprobs: (),
                };
                sse::openai_event(&head.envelope(Self::COMPLETION_OBJECT, vec![choice], None))
            }
            Self::Chat => {
                let delta = Delta {
                    role: None,
                    content: Some(text),
                };
                chat_chunk(head, delta, finish_reason)
            }
        }
    }

    /// The chunk after the last one when `stream_options.include_usage` asked for it.
    fn usage(&self, head: &AnswerHead, usage: Usage) -> Bytes {
        let object = match self {
            Self::Completion { .. } => Self::COMPLETION_OBJECT,
            Self::Chat => Self::CHAT_OBJECT,
        };
        sse::openai_event(&head.envelope::<()>(object, Vec::new(), Some(usage)))
    }
}

fn chat_chunk(head: &AnswerHead, delta: Delta, finish_reason: Option<&'static str>) -> Bytes {
    let choice = ChatChunkChoice {
        index: 0,
        delta,
        finish_reason,
        logprobs: (),
    };
    sse::openai_event(&head.envelope(ChunkKind::CHAT_OBJECT, vec![choice], None))
}

/// Streams a submitted request as OpenAI's server-sent events, ending with `data: [DONE]`, also
/// after an error.
pub fn stream_answer(
    submitted: Submitted,
    kind: ChunkKind,
    head: AnswerHead,
    include_usage: bool,
) -> Response {
    let Submitted { mut stream, valid } = submitted;
    let prompt_tokens = valid.input_ids.len() as u32;
    let stop_sequences = valid.stopping.stop_sequences;
    let events = async_stream::stream! {
        if let Some(opening) = kind.opening(&head) {
            yield Ok::<_, Infallible>(opening);
        }
        let mut text = StreamedText::new(&stop_sequences);
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => match event.end {
                    None if event.token.special => {}
                    None => {
                        let ready = text.push(&event.token.text);
                        if !ready.is_empty() {
                            yield Ok(kind.text(&head, ready, None));
                        }
                    }
                    // The last token's text is in the final answer.
                    Some(end) => {
                        let rest = text.finish(answer_text(&end));
                        let reason = finish_reason(end.finish_reason);
                        yield Ok(kind.text(&head, rest, Some(reason)));
                        if include_usage {
                            let usage =
                                Usage::new(prompt_tokens, end.generated_tokens, end.cached_tokens);
                            yield Ok(kind.usage(&head, usage));
                        }
                    }
                },
                Err(e) => {
                    let error = ApiError::from(e);
                    tracing::error!(error = %error, "stream failed");
                    yield Ok(sse::openai_event(&error.openai_body()));
                }
            }
        }
        yield Ok(sse::OPENAI_DONE);
    };
    sse::response(Body::from_stream(events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::FinishReason;

    /// How a request ended: with the stop sequence `stop` at the end of `text`, or (`None`)
    /// at an end-of-sequence token.
    fn end(text: &str, stop: Option<&str>) -> GenerationEnd {
        GenerationEnd {
            finish_reason: match stop {
                Some(_) => FinishReason::StopSequence,
                None => FinishReason::EosToken,
            },
            generated_text: text.into(),
            stop_sequence_start: stop.map(|stop| text.len() - stop.len()),
            generated_tokens: 1,
            cached_tokens: 0,
            queued: std::time::Instant::now(),
            started: std::time::Instant::now(),
        }
    }

    fn stops(sequences: &[&str]) -> Vec<String> {
        sequences.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_answer_leaves_out_the_stop_sequence_that_ended_it() {
        assert_eq!(answer_text(&end("It is Paris", Some("Paris"))), "It is ");
        assert_eq!(answer_text(&end("xyzba", Some("ba"))), "xyz");
        // Other endings keep the whole text, even one that happens to end like a stop sequence.
        assert_eq!(answer_text(&end("Paris", None)), "Paris");
    }

    /// Streams `pieces` as tokens, then the final answer; returns each chunk sent.
    fn stream(pieces: &[&str], stop: &[&str], answer: &str) -> Vec<String> {
        let mut text = StreamedText::new(&stops(stop));
        // The last token arrives with the end of the request, and its text only in the answer.
        let (_, earlier) = pieces.split_last().unwrap();
        let mut chunks: Vec<String> = earlier.iter().map(|piece| text.push(piece)).collect();
        chunks.push(text.finish(answer));
        chunks
    }

    #[test]
    fn without_stop_sequences_every_piece_goes_out_at_once() {
        assert_eq!(
            stream(&["Hel", "lo", "!"], &[], "Hello!"),
            ["Hel", "lo", "!"]
        );
    }

    #[test]
    fn the_start_of_a_stop_sequence_is_held_back_and_never_sent() {
        let stop = ["Paris"];
        let pieces = ["The capital", " is Pa", "ris"];
        let ended = end(&pieces.concat(), Some("Paris"));
        let chunks = stream(&pieces, &stop, answer_text(&ended));
        assert_eq!(chunks.concat(), "The capital is ");
        assert!(chunks.iter().all(|chunk| !chunk.contains('P')));
    }

    #[test]
    fn held_back_text_that_is_no_stop_sequence_goes_out_later() {
        let stop = ["Paris"];
        let pieces = ["Pa", "rty", " time", "!"];
        let chunks = stream(&pieces, &stop, &pieces.concat());
        assert_eq!(chunks.concat(), "Party time!");
        assert_eq!(chunks[0], "");
    }

    #[test]
    fn held_back_text_keeps_to_character_boundaries() {
        let mut text = StreamedText::new(&stops(&["xy"]));
        // "é" is two bytes: holding back one would split it.
        assert_eq!(text.push("aé"), "a");
        assert_eq!(text.push("b"), "é");
        assert_eq!(text.finish("aéb"), "b");
    }
}
