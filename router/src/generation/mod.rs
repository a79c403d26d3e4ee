//! The output side of a request. The scheduler feeds each request's `RequestOutput` the tokens
//! the shards sample: it turns them into text and asks `StopCriteria` whether the request is
//! done, so that every stop (end of sequence, length, stop sequence) is decided in one place,
//! before the next step is built (with overlapped steps, the step after next: see
//! `scheduler::task`). A route handler reads the result through `GenerationStream`;
//! dropping it (a client that went away) cancels the request on the scheduler.

mod stop;

pub use stop::{Stop, StopCriteria, StopSequences};

use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::OwnedSemaphorePermit;

use crate::request::{GenerationEnd, StoppingParameters, Token};
use crate::scheduler::{EventReceiver, SchedulerError, TokenEvent};
use crate::telemetry::RequestTelemetry;
use crate::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};

/// The text of one request so far and the rule that ends it.
pub struct RequestOutput {
    criteria: StopCriteria,
    decoder: IncrementalDecoder,
    /// The generated text, special tokens left out.
    text: String,
    generated: u32,
}

impl RequestOutput {
    pub fn new(stopping: &StoppingParameters, eos_token_ids: &Arc<[u32]>) -> Self {
        Self {
            criteria: StopCriteria::new(stopping, eos_token_ids),
            decoder: IncrementalDecoder::default(),
            text: String::new(),
            generated: 0,
        }
    }

    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// Adds a sampled token; returns it with its text, and the stop it caused if any.
    pub fn push(
        &mut self,
        tokenizer: &Tokenizer,
        id: u32,
        logprob: f32,
    ) -> Result<(Token, Option<Stop>), TokenizerError> {
        self.generated += 1;
        let special = tokenizer.is_special(id);
        let before = self.text.len();
        let text = if special {
            tokenizer.token_text(id)
        } else {
            let text = self.decoder.push(tokenizer, id)?;
            self.text.push_str(&text);
            text
        };
        let stop = self.criteria.check(id, self.generated, &self.text, before);
        if let Some(sequence) = stop.as_ref().and_then(|s| s.sequence.as_ref()) {
            self.text.truncate(sequence.end);
        }
        let token = Token {
            id,
            text,
            logprob,
            special,
        };
        Ok((token, stop))
    }

    /// The generated text, taken once the request has ended.
    pub fn take_text(&mut self) -> String {
        std::mem::take(&mut self.text)
    }
}

/// One sequence read to its end.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<Token>,
    /// Each token's alternatives (empty lists unless the request asked for them).
    pub top_tokens: Vec<Vec<Token>>,
    pub end: GenerationEnd,
}

impl Generated {
    /// The mean log-probability of its tokens: how `best_of` ranks sequences (per token, so a
    /// longer answer is not ranked lower for its length).
    pub fn mean_logprob(&self) -> f32 {
        let total: f32 = self.tokens.iter().map(|token| token.logprob).sum();
        total / self.tokens.len().max(1) as f32
    }
}

/// A request's tokens as the scheduler delivers them, ending after the last one.
pub struct GenerationStream {
    events: EventReceiver,
    done: bool,
    /// Held for the request's lifetime (shared by its sequences): its slot under
    /// --max-concurrent-requests.
    _permit: Option<Arc<OwnedSemaphorePermit>>,
    /// Reports how the request ended; on one stream per request.
    telemetry: Option<RequestTelemetry>,
}

impl GenerationStream {
    pub fn new(
        events: EventReceiver,
        permit: Option<Arc<OwnedSemaphorePermit>>,
        telemetry: Option<RequestTelemetry>,
    ) -> Self {
        Self {
            events,
            done: false,
            _permit: permit,
            telemetry,
        }
    }

    /// The next token, `None` once the request has ended.
    pub async fn next(&mut self) -> Option<Result<TokenEvent, SchedulerError>> {
        if self.done {
            return None;
        }
        let item = match self.events.recv().await {
            Some(Ok(event)) => {
                if let Some(telemetry) = &mut self.telemetry {
                    telemetry.token();
                    if let Some(end) = &event.end {
                        telemetry.succeeded(end);
                    }
                }
                if event.end.is_some() {
                    self.finish();
                }
                Ok(event)
            }
            Some(Err(e)) => {
                self.failed(&e);
                Err(e)
            }
            None => {
                self.failed(&SchedulerError::Closed);
                Err(SchedulerError::Closed)
            }
        };
        Some(item)
    }

    /// The tokens as a `Stream`, to read several requests' together.
    pub fn into_events(self) -> impl Stream<Item = Result<TokenEvent, SchedulerError>> + Send {
        futures_util::stream::unfold(self, |mut stream| async move {
            stream.next().await.map(|item| (item, stream))
        })
    }

    /// Reads the request to its end: every token, and how it ended. For answers that are not
    /// streamed.
    pub async fn collect(mut self) -> Result<Generated, SchedulerError> {
        let mut tokens = Vec::new();
        let mut top_tokens = Vec::new();
        while let Some(item) = self.next().await {
            let event = item?;
            tokens.push(event.token);
            top_tokens.push(event.top_tokens);
            if let Some(end) = event.end {
                return Ok(Generated {
                    tokens,
                    top_tokens,
                    end,
                });
            }
        }
        Err(SchedulerError::Closed)
    }

    /// Reads every stream to its end, together.
    pub async fn collect_all(streams: Vec<Self>) -> Result<Vec<Generated>, SchedulerError> {
        futures_util::future::try_join_all(streams.into_iter().map(Self::collect)).await
    }

    fn failed(&mut self, error: &SchedulerError) {
        if let Some(telemetry) = &self.telemetry {
            telemetry.failed(error);
        }
        self.finish();
    }

    fn finish(&mut self) {
        self.done = true;
        self.events.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::FinishReason;
    use crate::tokenizer::test_support::{byte_tokenizer, EOS};

    fn output(max_new_tokens: u32, ignore_eos: bool, stop: &[&str]) -> RequestOutput {
        let stopping = StoppingParameters {
            max_new_tokens,
            ignore_eos,
            stop_sequences: stop.iter().map(|s| s.to_string()).collect(),
        };
        RequestOutput::new(&stopping, &Arc::from([EOS]))
    }

    fn feed(output: &mut RequestOutput, text: &str) -> Vec<(Token, Option<Stop>)> {
        let tokenizer = byte_tokenizer();
        let mut ids = tokenizer.encode(text, true).unwrap();
        ids.push(EOS);
        let mut results = Vec::new();
        for id in ids {
            let result = output.push(&tokenizer, id, -0.5).unwrap();
            let stopped = result.1.is_some();
            results.push(result);
            if stopped {
                break;
            }
        }
        results
    }

    #[test]
    fn a_stop_sequence_across_tokens_cuts_the_text() {
        let mut out = output(100, false, &["is P"]);
        let results = feed(&mut out, "The capital is Paris");
        assert_eq!(results.len(), "The capital is P".len());
        let stop = results.last().unwrap().1.clone().unwrap();
        assert_eq!(stop.reason, FinishReason::StopSequence);
        assert_eq!(out.take_text(), "The capital is P");
    }

    #[test]
    fn end_of_sequence_is_special_and_stays_out_of_the_text() {
        let mut out = output(100, false, &[]);
        let results = feed(&mut out, "ok");
        let (token, stop) = results.last().unwrap();
        assert!(token.special);
        assert_eq!(token.text, "<eos>");
        assert_eq!(stop.as_ref().unwrap().reason, FinishReason::EosToken);
        assert_eq!(out.generated(), 3);
        assert_eq!(out.take_text(), "ok");
    }

    #[test]
    fn ignored_end_of_sequence_runs_to_the_length() {
        let mut out = output(3, true, &[]);
        let results = feed(&mut out, "ab");
        assert_eq!(results.len(), 3);
        assert_eq!(
            results.last().unwrap().1.as_ref().unwrap().reason,
            FinishReason::Length
        );
        assert_eq!(out.take_text(), "ab");
    }
}
