//! A fake shard for the scheduler's tests: it keeps per-request state like a real one, generates
//! `last token + 1` (mod 250) with `top_n_tokens` alternatives, scores prompt token `p` with
//! log-probability `-p`, never stops a request by itself, reports the step times of
//! `FakeStepCost`, and checks everything it is sent against the contract.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sluice_client::{pb, ClientError, TraceHeaders};

use crate::shard::{Recovery, Shard, ShardsLost};

/// The fake's token rule: the token after `last`.
pub fn next_token(last: u32) -> u32 {
    (last + 1) % 250
}

pub struct FakeSequence {
    pub tokens: Vec<u32>,
    pub computed: usize,
    pub blocks: Vec<u32>,
    prompt_len: usize,
    top_n_tokens: u32,
    prompt_logprobs: bool,
}

/// What the fake reports that a step took: `base`, and `per_prompt_token` for each token of a
/// prompt chunk (zero for every step unless a test sets them).
#[derive(Debug, Clone, Copy, Default)]
pub struct FakeStepCost {
    pub base: Duration,
    pub per_prompt_token: Duration,
}

pub struct FakeShardState {
    pub cost: FakeStepCost,
    block_size: usize,
    num_blocks: u32,
    pub sequences: HashMap<u64, FakeSequence>,
    pub steps: Vec<pb::StepRequest>,
    /// What each KV block holds: the token written into each of its slots.
    block_contents: HashMap<u32, Vec<Option<u32>>>,
}

impl FakeShardState {
    pub fn new(block_size: usize, num_blocks: u32) -> Self {
        Self {
            cost: FakeStepCost::default(),
            block_size,
            num_blocks,
            sequences: HashMap::new(),
            steps: Vec::new(),
            block_contents: HashMap::new(),
        }
    }

    /// Runs one step, panicking on anything the contract forbids.
    pub fn step(&mut self, request: pb::StepRequest) -> pb::StepResponse {
        self.steps.push(request.clone());
        for id in &request.free_ids {
            assert!(self.sequences.remove(id).is_some(), "freed unknown id {id}");
        }
        for new in request.new_requests {
            assert!(!new.token_ids.is_empty(), "a new request without tokens");
            assert!((new.cached_tokens as usize) < new.token_ids.len());
            assert!(!new.prompt_logprobs || new.cached_tokens == 0);
            let previous = self.sequences.insert(
                new.id,
                FakeSequence {
                    prompt_len: new.prompt_len as usize,
                    tokens: new.token_ids,
                    computed: new.cached_tokens as usize,
                    blocks: Vec::new(),
                    top_n_tokens: new.top_n_tokens,
                    prompt_logprobs: new.prompt_logprobs,
                },
            );
            assert!(previous.is_none(), "id {} admitted twice", new.id);
        }
        let mut generations = Vec::new();
        let mut prompt_logprobs = Vec::new();
        let mut scheduled_ids = HashSet::new();
        let mut took = self.cost.base;
        for scheduled in request.scheduled {
            assert!(scheduled_ids.insert(scheduled.id), "scheduled twice");
            assert!(scheduled.num_tokens > 0, "an empty chunk");
            let block_size = self.block_size;
            let seq = self
                .sequences
                .get_mut(&scheduled.id)
                .expect("scheduled unknown id");
            let fresh = seq.blocks.is_empty();
            for block in &scheduled.new_blocks {
                assert!(*block < self.num_blocks, "block {block} out of range");
            }
            seq.blocks.extend(scheduled.new_blocks);
            if fresh {
                // A cached prefix must hold exactly this request's leading tokens.
                for position in 0..seq.computed {
                    let block = seq.blocks[position / block_size];
                    let held = self
                        .block_contents
                        .get(&block)
                        .and_then(|b| b[position % block_size]);
                    assert_eq!(
                        held,
                        Some(seq.tokens[position]),
                        "cached block {block} is stale"
                    );
                }
            }
            let end = seq.computed + scheduled.num_tokens as usize;
            assert!(end <= seq.tokens.len(), "ran past the known tokens");
            // A decode computes the last known token; a prompt chunk's last token may look the
            // same, and is timed as one.
            if seq.computed + 1 < seq.tokens.len() {
                took += self.cost.per_prompt_token * scheduled.num_tokens;
            }
            assert!(seq.blocks.len() * block_size >= end, "not enough blocks");
            for position in seq.computed..end {
                let block = seq.blocks[position / block_size];
                self.block_contents
                    .entry(block)
                    .or_insert_with(|| vec![None; block_size])[position % block_size] =
                    Some(seq.tokens[position]);
            }
            // Position p predicts token p + 1.
            let scored = (seq.computed + 1)..(end + 1).min(seq.prompt_len);
            if seq.prompt_logprobs && !scored.is_empty() {
                prompt_logprobs.push(pb::PromptLogprobs {
                    id: scheduled.id,
                    start: scored.start as u32,
                    logprobs: scored.map(|position| -(position as f32)).collect(),
                });
            }
            seq.computed = end;
            if seq.computed == seq.tokens.len() {
                let token = next_token(*seq.tokens.last().expect("tokens are never empty"));
                seq.tokens.push(token);
                generations.push(pb::Generation {
                    id: scheduled.id,
                    token_id: token,
                    logprob: -1.0,
                    top_tokens: (0..seq.top_n_tokens)
                        .map(|rank| pb::TokenLogprob {
                            token_id: next_token(token + rank),
                            logprob: -1.0 - rank as f32,
                        })
                        .collect(),
                });
            }
        }
        // A block a request is still writing is its own: no other live request holds it. Only
        // full, computed blocks are shared (through the prefix cache).
        let mut shared = HashSet::new();
        let mut writers: HashMap<u32, u64> = HashMap::new();
        for (id, seq) in &self.sequences {
            let full = seq.computed / self.block_size;
            for (i, block) in seq.blocks.iter().enumerate() {
                if i < full {
                    shared.insert(*block);
                } else if let Some(other) = writers.insert(*block, *id) {
                    panic!("block {block} is written by requests {id} and {other}");
                }
            }
        }
        for (block, id) in &writers {
            assert!(
                !shared.contains(block),
                "block {block} of request {id} is also another's computed block"
            );
        }
        pb::StepResponse {
            generations,
            prompt_logprobs,
            forward_ns: took.as_nanos() as u64,
            total_ns: took.as_nanos() as u64,
        }
    }
}

/// The fake behind the `Shard` trait, for the scheduler task.
pub struct FakeShard {
    pub state: Mutex<FakeShardState>,
    /// Set by a test: the next step fails as if the shards died, and they come back restarted,
    /// with no request and no block content.
    pub crash_next_step: AtomicBool,
    /// Restarted, and not yet warmed up again by `recover`.
    cold: AtomicBool,
    /// Held by a test to keep `recover` waiting, as a warmup would.
    pub recovery_gate: tokio::sync::Mutex<()>,
}

impl FakeShard {
    pub fn new(block_size: usize, num_blocks: u32) -> Self {
        Self {
            state: Mutex::new(FakeShardState::new(block_size, num_blocks)),
            crash_next_step: AtomicBool::new(false),
            cold: AtomicBool::new(false),
            recovery_gate: tokio::sync::Mutex::new(()),
        }
    }
}

impl FakeShard {
    fn run(&self, request: pb::StepRequest) -> Result<pb::StepResponse, ClientError> {
        let mut state = self.state.lock().unwrap();
        if self.crash_next_step.swap(false, Ordering::SeqCst) {
            let (steps, cost) = (std::mem::take(&mut state.steps), state.cost);
            *state = FakeShardState::new(state.block_size, state.num_blocks);
            state.steps = steps;
            state.cost = cost;
            self.cold.store(true, Ordering::SeqCst);
            // Any error: the scheduler does not tell them apart.
            return Err(ClientError::NoShards);
        }
        if self.cold.load(Ordering::SeqCst) {
            // A restarted shard refuses steps until it is warmed up again, as a real one does.
            return Err(ClientError::NoShards);
        }
        Ok(state.step(request))
    }
}

impl Shard for FakeShard {
    fn send_step(
        &self,
        request: pb::StepRequest,
        _trace: &TraceHeaders,
    ) -> impl Future<Output = Result<pb::StepResponse, ClientError>> + Send + 'static {
        // Run when sent, which keeps the order steps are sent in, as a real shard's stream does.
        let answer = self.run(request);
        async move {
            // A real step takes time; yielding lets requests arrive between steps.
            tokio::task::yield_now().await;
            answer
        }
    }

    async fn is_ready(&self) -> bool {
        !self.cold.load(Ordering::SeqCst)
    }

    async fn recover(&self) -> Result<Recovery, ShardsLost> {
        drop(self.recovery_gate.lock().await);
        self.state.lock().unwrap().sequences.clear();
        Ok(if self.cold.swap(false, Ordering::SeqCst) {
            Recovery::Restarted
        } else {
            Recovery::Kept
        })
    }
}
