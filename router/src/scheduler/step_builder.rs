//! Building one step. Running requests go first (decodes, then prompts already being chunked),
//! then waiting requests are admitted in arrival order while the token budget, the batch size
//! and the free KV blocks allow. A prompt longer than what is left of the budget is split
//! across steps (chunked prefill), so a long prompt never stalls the requests that decode.

use std::collections::VecDeque;

use super::entry::Entry;
use super::SchedulerConfig;
use crate::kv::BlockAllocator;
use crate::pb;

pub(super) struct SchedulerState {
    pub config: SchedulerConfig,
    pub waiting: VecDeque<Entry>,
    pub running: Vec<Entry>,
    pub allocator: BlockAllocator,
    /// Ids the shards still hold state for but must forget at the next step.
    pub to_free: Vec<u64>,
}

impl SchedulerState {
    pub fn new(config: SchedulerConfig) -> Self {
        let allocator = BlockAllocator::new(config.num_blocks, config.block_size);
        Self {
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            allocator,
            to_free: Vec::new(),
        }
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.to_free.is_empty()
    }

    /// Drops requests whose client went away and gives their blocks back.
    pub fn reap_cancelled(&mut self) {
        self.waiting.retain(|e| !e.is_cancelled());
        let (cancelled, kept): (Vec<Entry>, Vec<Entry>) =
            self.running.drain(..).partition(Entry::is_cancelled);
        self.running = kept;
        for entry in cancelled {
            self.retire(entry);
        }
    }

    /// Forgets a running request on the router side and schedules its release on the shards.
    pub fn retire(&mut self, mut entry: Entry) {
        if entry.on_shard {
            self.to_free.push(entry.id);
        }
        self.allocator.release(std::mem::take(&mut entry.blocks));
    }

    /// Builds the next step, or `None` if there is nothing to send.
    pub fn build_step(&mut self) -> Option<pb::StepRequest> {
        let mut budget = self.config.max_batch_tokens as usize;
        let mut step = pb::StepRequest {
            free_ids: std::mem::take(&mut self.to_free),
            ..Default::default()
        };

        // Decodes first: one token each, so they never wait behind a prompt.
        let (decoding, prefilling): (Vec<&mut Entry>, Vec<&mut Entry>) =
            self.running.iter_mut().partition(|e| !e.is_prefilling());
        for entry in decoding.into_iter().chain(prefilling) {
            if budget == 0 {
                break;
            }
            let n = entry.pending_tokens().min(budget);
            if n == 0 {
                continue;
            }
            budget -= n;
            step.scheduled.push(schedule(entry, n, Vec::new()));
        }

        while budget > 0 && self.running.len() < self.config.max_batch_size {
            let Some(front) = self.waiting.front() else {
                break;
            };
            // Blocks for the whole sequence are taken at admission, so a running request can
            // never run out of KV memory.
            let needed = self.allocator.blocks_for(front.max_len());
            let Some(blocks) = self.allocator.allocate(needed) else {
                break;
            };
            let Some(mut entry) = self.waiting.pop_front() else {
                break;
            };
            entry.blocks = blocks.clone();
            entry.on_shard = true;
            step.new_requests.push(new_request(&entry));
            let n = entry.pending_tokens().min(budget);
            budget -= n;
            step.scheduled.push(schedule(&mut entry, n, blocks));
            self.running.push(entry);
        }

        let empty = step.scheduled.is_empty() && step.free_ids.is_empty();
        (!empty).then_some(step)
    }
}

fn schedule(entry: &mut Entry, num_tokens: usize, new_blocks: Vec<u32>) -> pb::ScheduledRequest {
    entry.num_computed += num_tokens;
    pb::ScheduledRequest {
        id: entry.id,
        num_tokens: num_tokens as u32,
        new_blocks,
    }
}

fn new_request(entry: &Entry) -> pb::NewRequest {
    pb::NewRequest {
        id: entry.id,
        token_ids: entry.request.input_ids.clone(),
        cached_tokens: 0,
        generated_before: 0,
        sampling: Some(entry.request.sampling.clone()),
        stopping: Some(pb::StoppingParameters {
            max_new_tokens: entry.request.max_new_tokens,
            ignore_eos: entry.request.ignore_eos,
        }),
    }
}
