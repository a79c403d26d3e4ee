//! What the scheduler task owns: the queue, the running batch, the KV blocks, the ids the shards
//! must forget; and what a step's answer does to them. Building a step is `step_builder`'s.

use std::collections::VecDeque;
use std::sync::Arc;

use sluice_client::pb;
use tracing::Span;

use super::entry::{Entry, Submission};
use super::metrics::Occupancy;
use super::step_times::StepTimes;
use super::{SchedulerConfig, SchedulerError, TokenEvent};
use crate::kv::KvManager;
use crate::request::{GenerationEnd, PromptToken, Token};
use crate::tokenizer::Tokenizer;

pub(super) struct SchedulerState {
    pub config: SchedulerConfig,
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Arc<[u32]>,
    pub waiting: VecDeque<Entry>,
    /// Sibling sequences waiting for their first sequence to compute the shared prompt.
    forks: Vec<Entry>,
    /// In admission order: the last one is the youngest.
    pub running: Vec<Entry>,
    pub kv: KvManager,
    /// Ids the shards still hold state for but must forget at the next step.
    pub to_free: Vec<u64>,
    pub step_times: StepTimes,
    next_id: u64,
}

impl SchedulerState {
    pub fn new(config: SchedulerConfig, tokenizer: Arc<Tokenizer>) -> Self {
        let kv = KvManager::new(config.num_blocks, config.block_size, config.prefix_caching);
        Self {
            eos_token_ids: config.eos_token_ids.as_slice().into(),
            config,
            tokenizer,
            waiting: VecDeque::new(),
            forks: Vec::new(),
            running: Vec::new(),
            kv,
            to_free: Vec::new(),
            step_times: StepTimes::default(),
            next_id: 0,
        }
    }

    /// Queues a new request behind the others; its sibling sequences wait as forks.
    pub fn enqueue(&mut self, submission: Submission) {
        let Submission {
            request,
            events,
            queued,
            span,
        } = submission;
        let first = self.next_id;
        for (index, events) in events.into_iter().enumerate() {
            let mut request = request.clone();
            let mut parent = None;
            if index > 0 {
                // Each sibling draws its own tokens, and only the first scores the prompt.
                request.sampling.seed = request.sampling.sequence_seed(index);
                request.logprobs.prompt = false;
                parent = Some(first);
            }
            let mut entry = Entry::new(
                self.next_id,
                request,
                events,
                queued,
                span.clone(),
                &self.eos_token_ids,
            );
            self.next_id += 1;
            entry.parent = parent;
            match parent {
                None => self.waiting.push_back(entry),
                Some(_) => self.forks.push(entry),
            }
        }
    }

    /// A `step` span for each request in the step, a child of the request's span, open while
    /// the step runs.
    pub fn step_spans(&self, step: &pb::StepRequest) -> Vec<Span> {
        let batch_size = step.scheduled.len();
        step.scheduled
            .iter()
            .filter_map(|scheduled| {
                let entry = self.running.iter().find(|e| e.id == scheduled.id)?;
                Some(tracing::info_span!(
                    parent: &entry.span,
                    "step",
                    tokens = scheduled.num_tokens,
                    batch_size
                ))
            })
            .collect()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty()
            || !self.forks.is_empty()
            || !self.running.is_empty()
            || !self.to_free.is_empty()
    }

    /// Queues, at the front, the forks whose first sequence has computed the prompt (it has
    /// sampled a token) or has left.
    pub fn release_forks(&mut self) {
        let started = |parent: u64| match self.running.iter().find(|e| e.id == parent) {
            Some(entry) => entry.output.generated() > 0,
            None => !self.waiting.iter().any(|e| e.id == parent),
        };
        let (ready, held): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut self.forks)
            .into_iter()
            .partition(|fork| fork.parent.is_none_or(started));
        self.forks = held;
        for entry in ready.into_iter().rev() {
            self.waiting.push_front(entry);
        }
    }

    pub fn occupancy(&self) -> Occupancy {
        Occupancy {
            waiting: self.waiting.len() + self.forks.len(),
            running: self.running.len(),
            kv_blocks_used: self.kv.num_used(),
            kv_blocks_cached: self.kv.num_cached(),
            kv_blocks_total: self.kv.num_blocks(),
            block_size: self.kv.block_size(),
        }
    }

    /// Drops requests whose client went away and gives their blocks back; returns how many.
    pub fn reap_cancelled(&mut self) -> usize {
        let queued = self.waiting.len() + self.forks.len();
        self.waiting.retain(|e| !e.is_cancelled());
        self.forks.retain(|e| !e.is_cancelled());
        let mut reaped = queued - self.waiting.len() - self.forks.len();
        let (cancelled, kept): (Vec<Entry>, Vec<Entry>) =
            self.running.drain(..).partition(Entry::is_cancelled);
        self.running = kept;
        for entry in cancelled {
            reaped += 1;
            self.retire(entry);
        }
        reaped
    }

    /// Forgets a running request and schedules its release on the shards.
    pub fn retire(&mut self, entry: Entry) {
        if entry.on_shard {
            self.to_free.push(entry.id);
        }
        self.kv.release(&entry.blocks);
    }

    /// Records the newly completed full blocks of every running request in the prefix cache:
    /// those the shards have computed, of tokens the router knows.
    fn register_computed_blocks(&mut self) {
        let block_size = self.kv.block_size();
        for entry in &mut self.running {
            let full_blocks = entry.num_confirmed.min(entry.tokens.len()) / block_size;
            while entry.sharing && entry.registered_blocks < full_blocks {
                let i = entry.registered_blocks;
                let key = &entry.tokens[i * block_size..(i + 1) * block_size];
                match self.kv.register(entry.prefix_node, key, entry.blocks[i]) {
                    Some(node) => {
                        entry.prefix_node = node;
                        entry.registered_blocks += 1;
                    }
                    None => entry.sharing = false,
                }
            }
        }
    }

    /// Keeps the prompt tokens' log-probabilities a step computed.
    fn record_prompt_logprobs(&mut self, scores: Vec<pb::PromptLogprobs>) {
        for score in scores {
            if let Some(entry) = self.running.iter_mut().find(|e| e.id == score.id) {
                entry.add_prompt_logprobs(score.start as usize, &score.logprobs);
            }
        }
    }

    /// What a step's answer does: the tokens it computed are confirmed, the blocks they
    /// complete enter the prefix cache, and its tokens go to their requests. `scheduled` is the
    /// step's (request id, tokens) list.
    pub fn finish_step(&mut self, scheduled: &[(u64, u32)], response: pb::StepResponse) {
        for &(id, num_tokens) in scheduled {
            if let Some(entry) = self.running.iter_mut().find(|e| e.id == id) {
                entry.num_confirmed += num_tokens as usize;
            }
        }
        // Before delivering: finished requests leave the batch there.
        self.register_computed_blocks();
        self.record_prompt_logprobs(response.prompt_logprobs);
        self.deliver(response.generations);
    }

    /// Hands every sampled token to its request, and ends the requests it stops: they leave the
    /// batch now and the shards forget them at the next step. A request preempted while the
    /// step ran is in the queue, and keeps its token; a request that ended while the step ran
    /// (with overlapped steps, the step before it stopped it) has no use for one.
    fn deliver(&mut self, generations: Vec<pb::Generation>) {
        for generation in generations {
            let place = match self.running.iter().position(|e| e.id == generation.id) {
                Some(index) => Place::Running(index),
                None => match self.waiting.iter().position(|e| e.id == generation.id) {
                    Some(index) => Place::Waiting(index),
                    None => {
                        tracing::debug!(id = generation.id, "a token for an ended request");
                        continue;
                    }
                },
            };
            let entry = match place {
                Place::Running(index) => &mut self.running[index],
                Place::Waiting(index) => &mut self.waiting[index],
            };
            entry.awaiting = entry.awaiting.saturating_sub(1);
            let (event, finished) = take_token(entry, &self.tokenizer, &generation);
            // A failed send means the client left; the request is reaped before the next step.
            let _ = entry.events.send(event);
            if finished {
                let entry = match place {
                    // Keep the running order (the youngest is last): preemption relies on it.
                    Place::Running(index) => Some(self.running.remove(index)),
                    Place::Waiting(index) => self.waiting.remove(index),
                };
                if let Some(entry) = entry {
                    self.retire(entry);
                }
            }
        }
    }

    /// Fails every running request after a step whose effect on the shards is unknown; the
    /// caller then has the shards forget everything.
    pub fn fail_running(&mut self, message: &str) {
        // Preempted requests wait for no token from a step that failed.
        for entry in &mut self.waiting {
            entry.awaiting = 0;
        }
        for mut entry in std::mem::take(&mut self.running) {
            let _ = entry
                .events
                .send(Err(SchedulerError::Generation(message.to_string())));
            entry.on_shard = false;
            self.retire(entry);
        }
        self.to_free.clear();
    }

    /// After the shards restarted (with nothing running): the blocks the prefix cache points at
    /// no longer hold what it says, so the cache starts empty.
    pub fn forget_cached_blocks(&mut self) {
        debug_assert!(self.running.is_empty());
        self.kv = KvManager::new(
            self.config.num_blocks,
            self.config.block_size,
            self.config.prefix_caching,
        );
    }

    /// Fails every request, queued or running: the shards are gone for good.
    pub fn fail_all(&mut self, message: &str) {
        self.fail_running(message);
        for entry in self.waiting.drain(..).chain(self.forks.drain(..)) {
            let _ = entry
                .events
                .send(Err(SchedulerError::Generation(message.to_string())));
        }
    }
}

/// The prompt's tokens with their scores, for a request that asked for them (the first token
/// has none: nothing comes before it).
fn prompt_tokens(entry: &Entry, tokenizer: &Tokenizer) -> Vec<PromptToken> {
    if !entry.request.logprobs.prompt {
        return Vec::new();
    }
    let logprobs = std::iter::once(None).chain(entry.prompt_logprobs.iter().copied().map(Some));
    entry
        .request
        .input_ids
        .iter()
        .zip(logprobs)
        .map(|(&id, logprob)| PromptToken {
            id,
            text: tokenizer.text_alone(id),
            logprob,
        })
        .collect()
}

/// A step's (request id, tokens) list, kept until its answer is handled (`finish_step`).
pub(super) fn scheduled_tokens(step: &pb::StepRequest) -> Vec<(u64, u32)> {
    step.scheduled
        .iter()
        .map(|s| (s.id, s.num_tokens))
        .collect()
}

/// Where a request that gets a token is.
#[derive(Clone, Copy)]
enum Place {
    Running(usize),
    Waiting(usize),
}

/// Adds a sampled token to the request: the event for its client, and whether it ended it.
fn take_token(
    entry: &mut Entry,
    tokenizer: &Tokenizer,
    generation: &pb::Generation,
) -> (Result<TokenEvent, SchedulerError>, bool) {
    entry.tokens.push(generation.token_id);
    let pushed = entry
        .output
        .push(tokenizer, generation.token_id, generation.logprob);
    let (token, stop) = match pushed {
        Ok(pushed) => pushed,
        Err(e) => return (Err(SchedulerError::Generation(e.to_string())), true),
    };
    let end = stop.map(|stop| GenerationEnd {
        finish_reason: stop.reason,
        stop_sequence_start: stop.sequence.map(|sequence| sequence.start),
        generated_text: entry.output.take_text(),
        generated_tokens: entry.output.generated(),
        cached_tokens: entry.cached_prompt_tokens.unwrap_or(0),
        prompt_tokens: prompt_tokens(entry, tokenizer),
        queued: entry.queued,
        // A token comes from a step that ran the request, so this is set.
        started: entry.started.unwrap_or(entry.queued),
    });
    let finished = end.is_some();
    let top_tokens = generation
        .top_tokens
        .iter()
        .map(|top| Token {
            id: top.token_id,
            text: tokenizer.text_alone(top.token_id),
            logprob: top.logprob,
            special: tokenizer.is_special(top.token_id),
        })
        .collect();
    let event = TokenEvent {
        token,
        top_tokens,
        end,
    };
    (Ok(event), finished)
}
