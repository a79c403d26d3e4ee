//! A request's state inside the scheduler.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{SchedulerError, TokenEvent};
use crate::generation::RequestOutput;
use crate::kv::{NodeId, RadixCache};
use crate::request::GenerationRequest;

pub(super) type EventSender = mpsc::UnboundedSender<Result<TokenEvent, SchedulerError>>;

pub(super) struct Submission {
    pub request: GenerationRequest,
    pub events: EventSender,
    /// When the request was handed to the scheduler.
    pub queued: Instant,
}

pub(super) struct Entry {
    pub id: u64,
    pub request: GenerationRequest,
    pub events: EventSender,
    /// Text so far, and the decision when the request stops.
    pub output: RequestOutput,
    /// Prompt followed by every token generated so far.
    pub tokens: Vec<u32>,
    /// KV blocks held, in block-table order.
    pub blocks: Vec<u32>,
    /// Tokens whose K/V are computed (or scheduled in the step being built).
    pub num_computed: usize,
    /// Whether the shards know this request (its `NewRequest` went out).
    pub on_shard: bool,
    /// Where this request's registered blocks end in the prefix cache, and how many there are.
    pub prefix_node: NodeId,
    pub registered_blocks: usize,
    /// False once a block of this request turned out to be cached elsewhere: the rest of its
    /// blocks stay private.
    pub sharing: bool,
    /// Prompt tokens found in the prefix cache when the request was first admitted.
    pub cached_prompt_tokens: Option<u32>,
    /// When the request was handed to the scheduler.
    pub queued: Instant,
    /// When a step first ran the request.
    pub started: Option<Instant>,
}

impl Entry {
    pub fn new(id: u64, submission: Submission, eos_token_ids: &Arc<[u32]>) -> Self {
        Self {
            id,
            tokens: submission.request.input_ids.clone(),
            output: RequestOutput::new(&submission.request.stopping, eos_token_ids),
            request: submission.request,
            events: submission.events,
            blocks: Vec::new(),
            num_computed: 0,
            on_shard: false,
            prefix_node: RadixCache::ROOT,
            registered_blocks: 0,
            sharing: true,
            cached_prompt_tokens: None,
            queued: submission.queued,
            started: None,
        }
    }

    /// Tokens the next step must still run before the request can sample again.
    pub fn pending_tokens(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Running with only its newest token to compute.
    pub fn is_decoding(&self) -> bool {
        self.on_shard && self.pending_tokens() == 1
    }

    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Back to the state of a request that was never run, keeping what it generated.
    pub fn reset_for_recompute(&mut self) {
        self.blocks.clear();
        self.num_computed = 0;
        self.on_shard = false;
        self.prefix_node = RadixCache::ROOT;
        self.registered_blocks = 0;
        self.sharing = true;
    }
}
