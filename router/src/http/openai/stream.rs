//! A streamed OpenAI answer, and the text OpenAI's clients expect: the generated text without the
//! stop sequence that ended it (OpenAI leaves it out; TGI's routes keep it).
//!
//! A stop sequence is found once its last token arrives, but its first bytes may have come with
//! earlier tokens. So while a stop sequence could still be completing, the stream holds back the
//! bytes it might start with, and the concatenated chunks are exactly the non-streamed text.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::response::Response;

use futures_util::StreamExt;

use super::logprobs::{chat_logprobs, CompletionLogprobsBuilder};
use super::types::{finish_reason, ChatChunkChoice, ChatLogprobs, CompletionChoice, Delta, Usage};
use super::AnswerHead;
use crate::generation::GenerationStream;
use crate::http::error::ApiError;
use crate::http::sse;
use crate::request::GenerationEnd;
use crate::scheduler::TokenEvent;

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

    /// Bytes of text generated so far.
    pub fn len(&self) -> usize {
        self.text.len()
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// `/v1/completions`.
    Completion,
    /// `/v1/chat/completions`.
    Chat,
}

impl ChunkKind {
    const COMPLETION_OBJECT: &'static str = "text_completion";
    const CHAT_OBJECT: &'static str = "chat.completion.chunk";

    fn object(self) -> &'static str {
        match self {
            Self::Completion => Self::COMPLETION_OBJECT,
            Self::Chat => Self::CHAT_OBJECT,
        }
    }
}

/// One choice of a streamed answer.
pub struct StreamedChoice {
    pub index: u32,
    pub stream: GenerationStream,
    /// `/v1/completions`' `echo`: the prompt, sent first.
    pub echo: Option<String>,
    /// Whether this is its prompt's first sequence, whose cached prompt tokens `usage` counts.
    pub counts_prompt: bool,
}

/// What a streamed answer is made of, besides its choices.
pub struct StreamedAnswer {
    pub kind: ChunkKind,
    pub head: AnswerHead,
    pub include_usage: bool,
    /// Whether chunks carry their tokens' log-probabilities.
    pub logprobs: bool,
    pub stop_sequences: Vec<String>,
    /// The prompts' tokens, counted once per prompt, for `usage`.
    pub prompt_tokens: u32,
}

impl StreamedAnswer {
    /// The chunk before any token: the echoed prompt, or the assistant's role.
    fn opening(&self, choice: &StreamedChoice) -> Option<Bytes> {
        match (self.kind, &choice.echo) {
            (ChunkKind::Completion, None) => None,
            (ChunkKind::Completion, Some(prompt)) => {
                Some(self.chunk(choice.index, prompt.clone(), None, None))
            }
            (ChunkKind::Chat, _) => {
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                };
                Some(self.chat_chunk(choice.index, delta, None, None))
            }
        }
    }

    /// A chunk of one choice's text, with the tokens it came from when `logprobs` asked for
    /// them (`offset`: where the text starts in the choice's), and `finish_reason` on the last.
    fn chunk(
        &self,
        index: u32,
        text: String,
        tokens: Option<(&TokenEvent, usize)>,
        finish_reason: Option<&'static str>,
    ) -> Bytes {
        match self.kind {
            ChunkKind::Completion => {
                let logprobs = tokens.map(|(event, offset)| {
                    let mut builder = CompletionLogprobsBuilder::starting_at(offset);
                    builder.push(&event.token, &event.top_tokens);
                    builder.finish()
                });
                let choice = CompletionChoice {
                    index,
                    text,
                    finish_reason,
                    logprobs,
                };
                let chunk = self.head.envelope(self.kind.object(), vec![choice], None);
                sse::openai_event(&chunk)
            }
            ChunkKind::Chat => {
                let delta = Delta {
                    role: None,
                    content: Some(text),
                };
                let logprobs = tokens.map(|(event, _)| {
                    chat_logprobs(
                        std::slice::from_ref(&event.token),
                        std::slice::from_ref(&event.top_tokens),
                    )
                });
                self.chat_chunk(index, delta, logprobs, finish_reason)
            }
        }
    }

    fn chat_chunk(
        &self,
        index: u32,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<&'static str>,
    ) -> Bytes {
        let choice = ChatChunkChoice {
            index,
            delta,
            finish_reason,
            logprobs,
        };
        sse::openai_event(
            &self
                .head
                .envelope(ChunkKind::CHAT_OBJECT, vec![choice], None),
        )
    }

    /// The chunk after the last one when `stream_options.include_usage` asked for it.
    fn usage(&self, usage: Usage) -> Bytes {
        let chunk = self
            .head
            .envelope::<()>(self.kind.object(), Vec::new(), Some(usage));
        sse::openai_event(&chunk)
    }
}

/// A choice's progress through its stream.
struct ChoiceProgress {
    index: u32,
    text: StreamedText,
    /// The echoed prompt's length: where the generated text starts in the choice's text.
    echo_len: usize,
    counts_prompt: bool,
}

/// Streams the choices as OpenAI's server-sent events, interleaved as their tokens come, ending
/// with `data: [DONE]`, also after an error.
pub fn stream_answer(choices: Vec<StreamedChoice>, answer: StreamedAnswer) -> Response {
    let events = async_stream::stream! {
        let mut progress = Vec::new();
        let mut streams = Vec::new();
        for (slot, choice) in choices.into_iter().enumerate() {
            if let Some(opening) = answer.opening(&choice) {
                yield Ok::<_, Infallible>(opening);
            }
            progress.push(ChoiceProgress {
                index: choice.index,
                text: StreamedText::new(&answer.stop_sequences),
                echo_len: choice.echo.as_ref().map_or(0, String::len),
                counts_prompt: choice.counts_prompt,
            });
            streams.push(choice.stream.into_events().map(move |item| (slot, item)).boxed());
        }
        let mut merged = futures_util::stream::select_all(streams);
        let mut usage = Usage::new(answer.prompt_tokens, 0, 0);
        while let Some((slot, item)) = merged.next().await {
            let choice = &mut progress[slot];
            let event = match item {
                Ok(event) => event,
                Err(e) => {
                    let error = ApiError::from(e);
                    tracing::error!(error = %error, "stream failed");
                    yield Ok(sse::openai_event(&error.openai_body()));
                    break;
                }
            };
            let offset = choice.echo_len + choice.text.len();
            let tokens = (answer.logprobs && !event.token.special).then_some((&event, offset));
            match &event.end {
                None => {
                    let ready = if event.token.special {
                        String::new()
                    } else {
                        choice.text.push(&event.token.text)
                    };
                    if !ready.is_empty() || tokens.is_some() {
                        yield Ok(answer.chunk(choice.index, ready, tokens, None));
                    }
                }
                // The last token's text is in the final answer.
                Some(end) => {
                    let rest = choice.text.finish(answer_text(end));
                    let reason = finish_reason(end.finish_reason);
                    yield Ok(answer.chunk(choice.index, rest, tokens, Some(reason)));
                    usage.add_completion(end.generated_tokens);
                    if choice.counts_prompt {
                        usage.add_cached(end.cached_tokens);
                    }
                }
            }
        }
        if answer.include_usage {
            yield Ok(answer.usage(usage));
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
            prompt_tokens: Vec::new(),
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

    #[tokio::test]
    async fn a_stream_that_fails_after_it_started_ends_with_an_error_event_and_done() {
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        let token = crate::request::Token {
            id: 1,
            text: "Hi".into(),
            logprob: -0.5,
            special: false,
        };
        events
            .send(Ok(TokenEvent {
                token,
                top_tokens: Vec::new(),
                end: None,
            }))
            .unwrap();
        events
            .send(Err(crate::scheduler::SchedulerError::Generation(
                "the shard is gone".into(),
            )))
            .unwrap();
        let choice = StreamedChoice {
            index: 0,
            stream: GenerationStream::new(receiver, None, None),
            echo: None,
            counts_prompt: true,
        };
        let answer = StreamedAnswer {
            kind: ChunkKind::Chat,
            head: AnswerHead::new("chatcmpl", "m"),
            include_usage: true,
            logprobs: false,
            stop_sequences: Vec::new(),
            prompt_tokens: 3,
        };
        let body = stream_answer(vec![choice], answer).into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let events: Vec<&str> = text
            .split("\n\n")
            .filter(|event| !event.is_empty())
            .collect();
        // The role, the token, the error, the usage so far, and the end.
        assert_eq!(events.len(), 5, "{text}");
        assert!(events[1].contains(r#""content":"Hi""#));
        let error: serde_json::Value =
            serde_json::from_str(events[2].trim_start_matches("data: ")).unwrap();
        assert_eq!(error["error"]["type"], "server_error");
        assert!(error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the shard is gone"));
        assert_eq!(events[4], "data: [DONE]");
    }
}
