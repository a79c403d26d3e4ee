//! What the scheduler task owns: the queue, the running batch, the KV blocks, the ids the shards
//! must forget; and what a step's answer does to them. Building a step is `step_builder`'s.

use std::collections::VecDeque;
use std::sync::Arc;

use sluice_client::pb;

use super::entry::{Entry, Submission};
use super::metrics::Occupancy;
use super::{SchedulerConfig, SchedulerError, TokenEvent};
use crate::kv::KvManager;
use crate::request::GenerationEnd;
use crate::tokenizer::Tokenizer;

pub(super) struct SchedulerState {
    pub config: SchedulerConfig,
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Arc<[u32]>,
    pub waiting: VecDeque<Entry>,
    /// In admission order: the last one is the youngest.
    pub running: Vec<Entry>,
    pub kv: KvManager,
    /// Ids the shards still hold state for but must forget at the next step.
    pub to_free: Vec<u64>,
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
            running: Vec::new(),
            kv,
            to_free: Vec::new(),
            next_id: 0,
        }
    }

    /// Queues a new request behind the others.
    pub fn enqueue(&mut self, submission: Submission) {
        let entry = Entry::new(self.next_id, submission, &self.eos_token_ids);
        self.next_id += 1;
        self.waiting.push_back(entry);
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.to_free.is_empty()
    }

    pub fn occupancy(&self) -> Occupancy {
        Occupancy {
            waiting: self.waiting.len(),
            running: self.running.len(),
            kv_blocks_used: self.kv.num_used(),
            kv_blocks_cached: self.kv.num_cached(),
            kv_blocks_total: self.kv.num_blocks(),
        }
    }

    /// Drops requests whose client went away and gives their blocks back; returns how many.
    pub fn reap_cancelled(&mut self) -> usize {
        let queued = self.waiting.len();
        self.waiting.retain(|e| !e.is_cancelled());
        let mut reaped = queued - self.waiting.len();
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

    /// Hands every sampled token to its request, and ends the requests it stops: they leave the
    /// batch now and the shards forget them at the next step.
    pub fn deliver(&mut self, generations: Vec<pb::Generation>) {
        for generation in generations {
            let Some(index) = self.running.iter().position(|e| e.id == generation.id) else {
                tracing::warn!(
                    id = generation.id,
                    "shard returned a token for an unknown request"
                );
                continue;
            };
            let entry = &mut self.running[index];
            entry.tokens.push(generation.token_id);
            let pushed =
                entry
                    .output
                    .push(&self.tokenizer, generation.token_id, generation.logprob);
            let (event, finished) = match pushed {
                Ok((token, stop)) => {
                    let end = stop.map(|stop| GenerationEnd {
                        finish_reason: stop.reason,
                        stop_sequence_start: stop.sequence.map(|sequence| sequence.start),
                        generated_text: entry.output.take_text(),
                        generated_tokens: entry.output.generated(),
                        cached_tokens: entry.cached_prompt_tokens.unwrap_or(0),
                        queued: entry.queued,
                        // A token comes from a step that ran the request, so this is set.
                        started: entry.started.unwrap_or(entry.queued),
                    });
                    let finished = end.is_some();
                    (Ok(TokenEvent { token, end }), finished)
                }
                Err(e) => (Err(SchedulerError::Generation(e.to_string())), true),
            };
            // A failed send means the client left; the request is reaped before the next step.
            let _ = entry.events.send(event);
            if finished {
                // Keep the running order (the youngest is last): preemption relies on it.
                let entry = self.running.remove(index);
                self.retire(entry);
            }
        }
    }

    /// Fails every running request after a step whose effect on the shards is unknown; the
    /// caller then has the shards forget everything.
    pub fn fail_running(&mut self, message: &str) {
        for mut entry in std::mem::take(&mut self.running) {
            let _ = entry
                .events
                .send(Err(SchedulerError::Generation(message.to_string())));
            entry.on_shard = false;
            self.retire(entry);
        }
        self.to_free.clear();
    }
}
