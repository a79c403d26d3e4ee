//! A request's state inside the scheduler.

use tokio::sync::mpsc;

use super::{SchedulerError, TokenEvent};
use crate::validation::ValidRequest;

pub(super) struct Submission {
    pub request: ValidRequest,
    pub events: mpsc::UnboundedSender<Result<TokenEvent, SchedulerError>>,
}

pub(super) struct Entry {
    pub id: u64,
    pub request: ValidRequest,
    pub events: mpsc::UnboundedSender<Result<TokenEvent, SchedulerError>>,
    /// KV blocks held for this request, in block-table order.
    pub blocks: Vec<u32>,
    /// Tokens whose K/V are computed or scheduled in an earlier step.
    pub num_computed: usize,
    /// Tokens generated so far.
    pub generated: u32,
    /// Whether the shards know this request (its `NewRequest` went out).
    pub on_shard: bool,
}

impl Entry {
    pub fn new(id: u64, submission: Submission) -> Self {
        Self {
            id,
            request: submission.request,
            events: submission.events,
            blocks: Vec::new(),
            num_computed: 0,
            generated: 0,
            on_shard: false,
        }
    }

    pub fn prompt_len(&self) -> usize {
        self.request.input_ids.len()
    }

    /// Every token the request has: prompt plus generated.
    pub fn known_tokens(&self) -> usize {
        self.prompt_len() + self.generated as usize
    }

    /// Tokens the next step must still run before the request can sample again.
    pub fn pending_tokens(&self) -> usize {
        self.known_tokens() - self.num_computed
    }

    pub fn is_prefilling(&self) -> bool {
        self.num_computed < self.prompt_len()
    }

    /// Longest the sequence can grow: the KV room it must hold.
    pub fn max_len(&self) -> usize {
        self.prompt_len() + self.request.max_new_tokens as usize
    }

    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }
}
