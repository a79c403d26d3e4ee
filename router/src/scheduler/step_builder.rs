//! Building one step.
//!
//! Running requests go first, oldest first: each decode takes one token of the budget, and
//! prompts being chunked take what the decodes leave. Then waiting requests are admitted in
//! arrival order, each starting from its longest cached prefix, while the budget and the batch
//! size allow. A prompt longer than what is left of the budget is split across steps (chunked
//! prefill), so a long prompt never stalls the requests that decode.
//!
//! KV blocks are taken as sequences grow. When a running request needs a block and none is
//! left, the youngest running request is preempted: its blocks go back (its computed blocks
//! stay in the prefix cache), it returns to the front of the queue, and it resumes later by
//! recomputing its prompt and the tokens it generated so far.

use std::collections::VecDeque;

use super::entry::Entry;
use super::metrics::StepStats;
use super::SchedulerConfig;
use crate::kv::{KvManager, Placement};
use crate::pb;

/// The most blocks left free after a new sequence's run for it to grow into: a request with a
/// large max_new_tokens should not push every later run far across the pool.
const MAX_HEADROOM: usize = 256;

pub(super) struct SchedulerState {
    pub config: SchedulerConfig,
    pub waiting: VecDeque<Entry>,
    /// In admission order: the last one is the youngest.
    pub running: Vec<Entry>,
    pub kv: KvManager,
    /// Ids the shards still hold state for but must forget at the next step.
    pub to_free: Vec<u64>,
}

impl SchedulerState {
    pub fn new(config: SchedulerConfig) -> Self {
        let kv = KvManager::new(config.num_blocks, config.block_size, config.prefix_caching);
        Self {
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv,
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

    /// Forgets a running request and schedules its release on the shards.
    pub fn retire(&mut self, entry: Entry) {
        if entry.on_shard {
            self.to_free.push(entry.id);
        }
        self.kv.release(&entry.blocks);
    }

    /// Records the newly completed full blocks of every running request in the prefix cache.
    pub fn register_computed_blocks(&mut self) {
        let block_size = self.kv.block_size();
        for entry in &mut self.running {
            let full_blocks = entry.num_computed / block_size;
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

    /// Builds the next step, or `None` if there is nothing to send.
    pub fn build_step(&mut self, stats: &mut StepStats) -> Option<pb::StepRequest> {
        let mut step = pb::StepRequest {
            free_ids: std::mem::take(&mut self.to_free),
            ..Default::default()
        };
        let budget = self.config.max_batch_tokens as usize;
        let decodes = self.running.iter().filter(|e| e.is_decoding()).count();
        let mut decode_budget = decodes.min(budget);
        let mut prefill_budget = budget - decode_budget;

        let mut index = 0;
        while index < self.running.len() {
            let entry = &self.running[index];
            let decoding = entry.is_decoding();
            let n = if decoding {
                decode_budget.min(1)
            } else {
                entry.pending_tokens().min(prefill_budget)
            };
            if n == 0 {
                index += 1;
                continue;
            }
            let needed = self.kv.blocks_for(entry.num_computed + n) - entry.blocks.len();
            let placement = match entry.blocks.last() {
                Some(&last) => Placement::After(last),
                None => Placement::NewRun { headroom: 0 },
            };
            let Some(fresh) = self.allocate_or_preempt(needed, placement, index, &mut step, stats)
            else {
                // The request itself was the youngest and is now back in the queue.
                break;
            };
            if decoding {
                decode_budget -= 1;
            } else {
                prefill_budget -= n;
                stats.prefill_chunks += 1;
            }
            let entry = &mut self.running[index];
            step.scheduled.push(schedule(entry, n, fresh));
            index += 1;
        }

        while prefill_budget > 0 && self.running.len() < self.config.max_batch_size {
            let Some(mut entry) = self.waiting.pop_front() else {
                break;
            };
            let prefix = self.kv.lookup(&entry.tokens);
            let cached = prefix.blocks.len() * self.kv.block_size();
            let wanted = (entry.tokens.len() - cached).min(prefill_budget);
            let now = self.kv.blocks_for(cached + wanted);
            // Room after the run for the rest of the prompt and the output, so the sequence can
            // grow into contiguous blocks (see kv::Placement).
            let expected = entry.request.input_ids.len() + entry.request.max_new_tokens as usize;
            let headroom = self
                .kv
                .blocks_for(expected)
                .saturating_sub(now)
                .min(MAX_HEADROOM);
            let fresh = self.kv.allocate_up_to(
                now - prefix.blocks.len(),
                Placement::NewRun {
                    headroom: headroom as u32,
                },
            );
            // With fewer blocks than the chunk wants, a shorter chunk still makes progress.
            let room = (prefix.blocks.len() + fresh.len()) * self.kv.block_size() - cached;
            let n = wanted.min(room);
            if n == 0 {
                self.kv.release(&prefix.blocks);
                self.kv.release(&fresh);
                self.waiting.push_front(entry);
                break;
            }
            if entry.cached_prompt_tokens.is_none() {
                entry.cached_prompt_tokens = Some(cached as u32);
                stats.prompt_tokens += entry.request.input_ids.len() as u64;
                stats.cached_prompt_tokens += cached as u64;
            }
            entry.registered_blocks = prefix.blocks.len();
            entry.prefix_node = prefix.node;
            entry.num_computed = cached;
            entry.on_shard = true;
            step.new_requests.push(new_request(&entry, cached));
            prefill_budget -= n;
            stats.prefill_chunks += 1;
            let mut blocks = prefix.blocks;
            blocks.extend(fresh);
            step.scheduled.push(schedule(&mut entry, n, blocks));
            self.running.push(entry);
        }

        let empty = step.scheduled.is_empty() && step.free_ids.is_empty();
        (!empty).then_some(step)
    }

    /// Takes `n` blocks for the running request at `index`, preempting the youngest running
    /// requests until they fit. `None` if the request at `index` had to be preempted itself.
    fn allocate_or_preempt(
        &mut self,
        n: usize,
        placement: Placement,
        index: usize,
        step: &mut pb::StepRequest,
        stats: &mut StepStats,
    ) -> Option<Vec<u32>> {
        loop {
            if let Some(blocks) = self.kv.allocate(n, placement) {
                return Some(blocks);
            }
            // Requests after `index` are not in this step yet, so the youngest can go.
            let mut victim = self.running.pop()?;
            let was_self = self.running.len() == index;
            tracing::debug!(id = victim.id, "preempting");
            stats.preemptions += 1;
            if victim.on_shard {
                step.free_ids.push(victim.id);
            }
            self.kv.release(&victim.blocks);
            victim.reset_for_recompute();
            self.waiting.push_front(victim);
            if was_self {
                return None;
            }
        }
    }
}

fn schedule(entry: &mut Entry, num_tokens: usize, new_blocks: Vec<u32>) -> pb::ScheduledRequest {
    entry.num_computed += num_tokens;
    entry.blocks.extend_from_slice(&new_blocks);
    pb::ScheduledRequest {
        id: entry.id,
        num_tokens: num_tokens as u32,
        new_blocks,
    }
}

/// The shard's view of a request being (re)admitted. Its block table starts empty on the
/// shard, so the first `ScheduledRequest` carries the cached blocks too.
fn new_request(entry: &Entry, cached_tokens: usize) -> pb::NewRequest {
    pb::NewRequest {
        id: entry.id,
        token_ids: entry.tokens.clone(),
        cached_tokens: cached_tokens as u32,
        generated_before: entry.generated(),
        sampling: Some(entry.request.sampling),
        stopping: Some(pb::StoppingParameters {
            max_new_tokens: entry.request.max_new_tokens,
            ignore_eos: entry.request.ignore_eos,
        }),
    }
}
