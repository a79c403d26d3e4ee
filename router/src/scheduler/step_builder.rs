//! Building one step, in two phases.
//!
//! Schedule the running: oldest first, each decode takes one token of the budget, and prompts
//! being chunked take what the decodes leave. Admit the waiting: in arrival order, each starting
//! from its longest cached prefix, while the budget and the batch size allow. A prompt longer
//! than what is left of the budget is split across steps (chunked prefill), so a long prompt
//! never stalls the requests that decode for longer than one chunk. With a decode stall target
//! (`SchedulerConfig::max_decode_stall`), a step with decodes carries only the prompt tokens
//! that recent step times say fit in it (`step_times`).
//!
//! KV blocks are taken as sequences grow. When a running request needs a block and none is
//! left, the youngest running request is preempted: its blocks go back (its computed blocks
//! stay in the prefix cache), it returns to the front of the queue, and it resumes later by
//! recomputing its prompt and the tokens it generated so far. A prompt chunk that is itself the
//! youngest runs shorter, on the blocks that are free, instead of preempting itself. A step that
//! preempted admits nobody: the queue's head is then a request that just lost its blocks, and
//! admitting it would only preempt it again.

use std::time::Instant;

use sluice_client::pb;

use super::entry::Entry;
use super::metrics::StepStats;
use super::state::SchedulerState;
use crate::kv::{CachedPrefix, Placement};

/// The most blocks left free after a new sequence's run for it to grow into: a request with a
/// large max_new_tokens should not push every later run far across the pool.
const MAX_HEADROOM: usize = 256;

/// What is left of one step's token budget.
struct Budget {
    /// One token for each decode.
    decode: usize,
    /// For prompt chunks, running or newly admitted.
    prefill: usize,
}

impl SchedulerState {
    /// Builds the next step, or `None` if there is nothing to send.
    pub fn build_step(&mut self, stats: &mut StepStats) -> Option<pb::StepRequest> {
        self.release_forks();
        let mut step = pb::StepRequest {
            free_ids: std::mem::take(&mut self.to_free),
            ..Default::default()
        };
        let total = self.config.max_batch_tokens as usize;
        let decodes = self.running.iter().filter(|e| runs_a_decode(e)).count();
        let mut budget = Budget {
            decode: decodes.min(total),
            prefill: total - decodes.min(total),
        };
        if decodes > 0 {
            let target = self.config.max_decode_stall;
            if let Some(allowance) = target.and_then(|t| self.step_times.prefill_allowance(t)) {
                budget.prefill = budget.prefill.min(allowance);
            }
        }
        let preempted = self.schedule_running(&mut step, &mut budget, stats);
        if !preempted {
            self.admit_waiting(&mut step, &mut budget, stats);
        }
        let empty = step.scheduled.is_empty() && step.free_ids.is_empty();
        (!empty).then_some(step)
    }

    /// Gives each running request its next tokens: a decode, or the next chunk of its prompt.
    /// Returns whether it preempted any.
    fn schedule_running(
        &mut self,
        step: &mut pb::StepRequest,
        budget: &mut Budget,
        stats: &mut StepStats,
    ) -> bool {
        let preemptions_before = stats.preemptions;
        let mut index = 0;
        while index < self.running.len() {
            let entry = &self.running[index];
            if entry.is_decoding() {
                if budget.decode == 0 || !runs_a_decode(entry) {
                    index += 1;
                    continue;
                }
                let needed = self.kv.blocks_for(entry.num_computed + 1) - entry.blocks.len();
                let Some(fresh) = self.allocate_or_preempt(needed, index, step, stats) else {
                    // The request itself was the youngest and is now back in the queue.
                    break;
                };
                budget.decode -= 1;
                step.scheduled
                    .push(schedule(&mut self.running[index], 1, fresh));
            } else {
                let wanted = entry.pending_tokens().min(budget.prefill);
                if wanted > 0 {
                    if let Some((n, fresh)) = self.allocate_chunk(wanted, index, step, stats) {
                        budget.prefill -= n;
                        stats.prefill_chunks += 1;
                        stats.prefill_tokens += n as u64;
                        step.scheduled
                            .push(schedule(&mut self.running[index], n, fresh));
                    }
                }
            }
            index += 1;
        }
        stats.preemptions > preemptions_before
    }

    /// Admits queued requests in arrival order while the budget, the batch size and the blocks
    /// allow.
    fn admit_waiting(
        &mut self,
        step: &mut pb::StepRequest,
        budget: &mut Budget,
        stats: &mut StepStats,
    ) {
        while budget.prefill > 0 && self.running.len() < self.config.max_batch_size {
            let Some(mut entry) = self.waiting.pop_front() else {
                break;
            };
            if entry.awaiting > 0 {
                // Preempted while a step in flight samples its next token: it is readmitted
                // with that token, once the step's answer has brought it.
                self.waiting.push_front(entry);
                break;
            }
            let prefix = if entry.needs_prompt_logprobs() {
                CachedPrefix::none()
            } else {
                self.kv.lookup(&entry.tokens)
            };
            let cached = prefix.blocks.len() * self.kv.block_size();
            let wanted = (entry.tokens.len() - cached).min(budget.prefill);
            let now = self.kv.blocks_for(cached + wanted);
            // Room after the run for the rest of the prompt and the output, so the sequence can
            // grow into contiguous blocks (see kv::Placement).
            let expected =
                entry.request.input_ids.len() + entry.request.stopping.max_new_tokens as usize;
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
                entry.started = Some(Instant::now());
                entry.queue_span = None;
                stats.prompt_tokens += entry.request.input_ids.len() as u64;
                stats.cached_prompt_tokens += cached as u64;
            }
            entry.registered_blocks = prefix.blocks.len();
            entry.prefix_node = prefix.node;
            entry.num_computed = cached;
            entry.num_confirmed = cached;
            entry.on_shard = true;
            step.new_requests.push(new_request(&entry, cached));
            budget.prefill -= n;
            stats.prefill_chunks += 1;
            stats.prefill_tokens += n as u64;
            let mut blocks = prefix.blocks;
            blocks.extend(fresh);
            step.scheduled.push(schedule(&mut entry, n, blocks));
            self.running.push(entry);
        }
    }

    /// Takes `n` blocks for the decode of the running request at `index`, preempting the
    /// youngest running requests until they fit. `None` if that request had to be preempted
    /// itself.
    fn allocate_or_preempt(
        &mut self,
        n: usize,
        index: usize,
        step: &mut pb::StepRequest,
        stats: &mut StepStats,
    ) -> Option<Vec<u32>> {
        let placement = growth_placement(&self.running[index]);
        loop {
            if let Some(blocks) = self.kv.allocate(n, placement) {
                return Some(blocks);
            }
            let was_self = self.running.len() == index + 1;
            // Requests after `index` are not in this step yet, so the youngest can go.
            self.preempt_youngest(step, stats)?;
            if was_self {
                return None;
            }
        }
    }

    /// Blocks for a prompt chunk of up to `wanted` tokens of the running request at `index`:
    /// younger requests are preempted for them, and when none is left, the chunk shrinks to the
    /// blocks that are free. Returns the chunk's length and its new blocks, `None` if no token
    /// fits.
    fn allocate_chunk(
        &mut self,
        wanted: usize,
        index: usize,
        step: &mut pb::StepRequest,
        stats: &mut StepStats,
    ) -> Option<(usize, Vec<u32>)> {
        let placement = growth_placement(&self.running[index]);
        let entry = &self.running[index];
        let (computed, held) = (entry.num_computed, entry.blocks.len());
        let needed = self.kv.blocks_for(computed + wanted) - held;
        loop {
            if let Some(blocks) = self.kv.allocate(needed, placement) {
                return Some((wanted, blocks));
            }
            if self.running.len() == index + 1 {
                break;
            }
            self.preempt_youngest(step, stats);
        }
        let fresh = self.kv.allocate_up_to(needed, placement);
        let room = (held + fresh.len()) * self.kv.block_size() - computed;
        let n = wanted.min(room);
        if n == 0 {
            self.kv.release(&fresh);
            return None;
        }
        Some((n, fresh))
    }

    /// Sends the youngest running request back to the front of the queue, to be recomputed.
    fn preempt_youngest(
        &mut self,
        step: &mut pb::StepRequest,
        stats: &mut StepStats,
    ) -> Option<()> {
        let mut victim = self.running.pop()?;
        tracing::debug!(id = victim.id, "preempting");
        stats.preemptions += 1;
        if victim.on_shard {
            step.free_ids.push(victim.id);
        }
        self.kv.release(&victim.blocks);
        victim.reset_for_recompute();
        self.waiting.push_front(victim);
        Some(())
    }
}

/// Where a running sequence's next blocks should go: right after its last one.
fn growth_placement(entry: &Entry) -> Placement {
    match entry.blocks.last() {
        Some(&last) => Placement::After(last),
        None => Placement::NewRun { headroom: 0 },
    }
}

/// Whether a decoding request takes a decode in this step: not when the tokens it has and awaits
/// already end it by length (with overlapped steps, one is still to come from the step in
/// flight).
fn runs_a_decode(entry: &Entry) -> bool {
    entry.is_decoding() && !entry.reaches_its_length()
}

fn schedule(entry: &mut Entry, num_tokens: usize, new_blocks: Vec<u32>) -> pb::ScheduledRequest {
    entry.num_computed += num_tokens;
    if entry.pending_tokens() == 0 {
        // The step computes every token the request has: the shards sample its next one.
        entry.awaiting += 1;
    }
    entry.blocks.extend_from_slice(&new_blocks);
    pb::ScheduledRequest {
        id: entry.id,
        num_tokens: num_tokens as u32,
        new_blocks,
    }
}

/// The shard's view of a request being (re)admitted: after a preemption its tokens are the
/// prompt and everything generated so far, all recomputed. Its block table starts empty on the
/// shard, so the first `ScheduledRequest` carries the cached blocks too.
fn new_request(entry: &Entry, cached_tokens: usize) -> pb::NewRequest {
    pb::NewRequest {
        id: entry.id,
        token_ids: entry.tokens.clone(),
        cached_tokens: cached_tokens as u32,
        sampling: Some((&entry.request.sampling).into()),
        prompt_len: entry.request.input_ids.len() as u32,
        top_n_tokens: entry.request.logprobs.top_n_tokens,
        prompt_logprobs: entry.needs_prompt_logprobs(),
    }
}
