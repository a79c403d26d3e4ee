//! The text side of one request: turns the token events the scheduler sends into tokens with
//! text, applies stop sequences, and ends the stream. Dropping a `GenerationStream` (a client
//! that went away, a stop sequence) cancels the request on the scheduler.

mod stop;

pub use stop::StopSequences;

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use crate::http::types::{FinishReason, Token};
use crate::scheduler::{EventReceiver, SchedulerError, ShardFinish};
use crate::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// How a finished request ended.
#[derive(Debug, Clone)]
pub struct GenerationEnd {
    pub finish_reason: FinishReason,
    pub generated_text: String,
    pub generated_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

#[derive(Debug, Clone)]
pub struct StreamItem {
    pub token: Token,
    /// Set on the last item.
    pub end: Option<GenerationEnd>,
}

pub struct GenerationStream {
    events: EventReceiver,
    tokenizer: Arc<Tokenizer>,
    decoder: IncrementalDecoder,
    stops: StopSequences,
    text: String,
    generated: u32,
    done: bool,
    /// Held for the request's lifetime: its slot under --max-concurrent-requests.
    _permit: Option<OwnedSemaphorePermit>,
}

impl GenerationStream {
    pub fn new(
        events: EventReceiver,
        tokenizer: Arc<Tokenizer>,
        stop_sequences: Vec<String>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Self {
            events,
            tokenizer,
            decoder: IncrementalDecoder::default(),
            stops: StopSequences::new(stop_sequences),
            text: String::new(),
            generated: 0,
            done: false,
            _permit: permit,
        }
    }

    /// The next token, `None` once the request has ended.
    pub async fn next(&mut self) -> Option<Result<StreamItem, GenerationError>> {
        if self.done {
            return None;
        }
        let event = match self.events.recv().await {
            Some(Ok(event)) => event,
            Some(Err(e)) => return Some(Err(self.end_with(e))),
            None => return Some(Err(self.end_with(SchedulerError::Closed))),
        };
        self.generated += 1;
        let special = self.tokenizer.is_special(event.id);
        let before = self.text.len();
        let text = if special {
            self.tokenizer.token_text(event.id)
        } else {
            match self.decoder.push(&self.tokenizer, event.id) {
                Ok(text) => text,
                Err(e) => return Some(Err(self.end_with(e))),
            }
        };
        if !special {
            self.text.push_str(&text);
        }

        let mut finish_reason = match event.finish {
            Some(ShardFinish::EosToken) => Some(FinishReason::EosToken),
            Some(ShardFinish::Length) => Some(FinishReason::Length),
            None => None,
        };
        if let Some(end) = self.stops.find(&self.text, before) {
            self.text.truncate(end);
            finish_reason = Some(FinishReason::StopSequence);
        }

        let end = finish_reason.map(|finish_reason| {
            self.finish();
            GenerationEnd {
                finish_reason,
                generated_text: std::mem::take(&mut self.text),
                generated_tokens: self.generated,
                cached_tokens: event.cached_prompt_tokens,
            }
        });
        let token = Token {
            id: event.id,
            text,
            logprob: event.logprob,
            special,
        };
        Some(Ok(StreamItem { token, end }))
    }

    fn end_with(&mut self, error: impl Into<GenerationError>) -> GenerationError {
        self.finish();
        error.into()
    }

    /// Ends the stream and tells the scheduler (via the closed channel) to free the request.
    fn finish(&mut self) {
        self.done = true;
        self.events.close();
    }
}
