//! A request's state inside the scheduler.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::Span;

use super::{SchedulerError, TokenEvent};
use crate::generation::RequestOutput;
use crate::kv::{NodeId, RadixCache};
use crate::request::GenerationRequest;

pub(super) type EventSender = mpsc::UnboundedSender<Result<TokenEvent, SchedulerError>>;

pub(super) struct Submission {
    pub request: GenerationRequest,
    /// One per sequence.
    pub events: Vec<EventSender>,
    /// When the request was handed to the scheduler.
    pub queued: Instant,
    /// The span of the HTTP request that submitted it.
    pub span: Span,
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
    /// Tokens whose K/V are computed, or scheduled in a step sent or being built.
    pub num_computed: usize,
    /// Tokens whose K/V the shards have computed in steps already answered.
    pub num_confirmed: usize,
    /// Tokens that steps sent but not yet answered will sample for this request: the shards
    /// hold them already and a step built now can decode them (overlapped steps).
    pub awaiting: usize,
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
    /// The log-probabilities of prompt tokens 1, 2, ... received so far (`logprobs.prompt`).
    pub prompt_logprobs: Vec<f32>,
    /// For a sibling sequence: the entry that computes the shared prompt first.
    pub parent: Option<u64>,
    /// When the request was handed to the scheduler.
    pub queued: Instant,
    /// When a step first ran the request.
    pub started: Option<Instant>,
    /// The request's span: the spans of its wait and of its steps are its children.
    pub span: Span,
    /// Open until a step first runs the request.
    pub queue_span: Option<Span>,
}

impl Entry {
    pub fn new(
        id: u64,
        request: GenerationRequest,
        events: EventSender,
        queued: Instant,
        span: Span,
        eos_token_ids: &Arc<[u32]>,
    ) -> Self {
        Self {
            id,
            tokens: request.input_ids.clone(),
            output: RequestOutput::new(&request.stopping, eos_token_ids),
            request,
            events,
            blocks: Vec::new(),
            num_computed: 0,
            num_confirmed: 0,
            awaiting: 0,
            on_shard: false,
            prefix_node: RadixCache::ROOT,
            registered_blocks: 0,
            sharing: true,
            cached_prompt_tokens: None,
            prompt_logprobs: Vec::new(),
            parent: None,
            queued,
            started: None,
            queue_span: Some(tracing::info_span!(parent: &span, "queue")),
            span,
        }
    }

    /// Whether prompt tokens are still to be scored, which the prefix cache would skip.
    pub fn needs_prompt_logprobs(&self) -> bool {
        self.request.logprobs.prompt
            && self.prompt_logprobs.len() + 1 < self.request.input_ids.len()
    }

    /// Takes the scores of prompt tokens `start`, `start + 1`, ...; those already known (sent
    /// again after a preemption) are skipped.
    pub fn add_prompt_logprobs(&mut self, start: usize, logprobs: &[f32]) {
        for (position, &logprob) in (start..).zip(logprobs) {
            if position == self.prompt_logprobs.len() + 1 {
                self.prompt_logprobs.push(logprob);
            }
        }
    }

    /// Tokens the next step must still run before the request can sample again (a token still
    /// to be sampled in a step in flight counts: the shards will have it).
    pub fn pending_tokens(&self) -> usize {
        self.tokens.len() + self.awaiting - self.num_computed
    }

    /// Whether the tokens already sampled or awaited reach `max_new_tokens`: the request ends
    /// by length with them, so no step needs to run it again.
    pub fn reaches_its_length(&self) -> bool {
        self.output.generated() as usize + self.awaiting
            >= self.request.stopping.max_new_tokens as usize
    }

    /// Running with only its newest token to compute.
    pub fn is_decoding(&self) -> bool {
        self.on_shard && self.pending_tokens() == 1
    }

    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Back to the state of a request that was never run, keeping what it generated (and
    /// what a step in flight will still sample for it).
    pub fn reset_for_recompute(&mut self) {
        self.blocks.clear();
        self.num_computed = 0;
        self.num_confirmed = 0;
        self.on_shard = false;
        self.prefix_node = RadixCache::ROOT;
        self.registered_blocks = 0;
        self.sharing = true;
    }
}
