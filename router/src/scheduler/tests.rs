//! The batching loop against a fake shard that keeps per-request state like a real one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::*;
use crate::validation::ValidRequest;

/// Generates `last token + 1`, stops at max_new_tokens, and checks what it is sent.
#[derive(Default)]
struct FakeShard {
    state: Mutex<FakeState>,
}

#[derive(Default)]
struct FakeState {
    sequences: HashMap<u64, FakeSequence>,
    steps: Vec<pb::StepRequest>,
    /// What each KV block holds: the tokens written into its slots.
    block_contents: HashMap<u32, [Option<u32>; BLOCK]>,
}

const BLOCK: usize = 16;

struct FakeSequence {
    tokens: Vec<u32>,
    computed: usize,
    generated: u32,
    max_new_tokens: u32,
    blocks: Vec<u32>,
}

impl Shard for FakeShard {
    async fn step(&self, request: pb::StepRequest) -> Result<pb::StepResponse, ClientError> {
        // A real step takes time; yielding lets requests arrive between steps.
        tokio::task::yield_now().await;
        let mut state = self.state.lock().unwrap();
        state.steps.push(request.clone());
        for id in &request.free_ids {
            assert!(
                state.sequences.remove(id).is_some(),
                "freed unknown id {id}"
            );
        }
        for new in request.new_requests {
            let stopping = new.stopping.unwrap();
            state.sequences.insert(
                new.id,
                FakeSequence {
                    tokens: new.token_ids,
                    computed: new.cached_tokens as usize,
                    generated: new.generated_before,
                    max_new_tokens: stopping.max_new_tokens,
                    blocks: Vec::new(),
                },
            );
        }
        let mut generations = Vec::new();
        for scheduled in request.scheduled {
            let FakeState {
                sequences,
                block_contents,
                ..
            } = &mut *state;
            let seq = sequences
                .get_mut(&scheduled.id)
                .expect("scheduled unknown id");
            let fresh = seq.blocks.is_empty();
            seq.blocks.extend(scheduled.new_blocks);
            if fresh {
                // A cached prefix must hold exactly this request's leading tokens.
                for position in 0..seq.computed {
                    let block = seq.blocks[position / BLOCK];
                    let held = block_contents.get(&block).and_then(|b| b[position % BLOCK]);
                    assert_eq!(
                        held,
                        Some(seq.tokens[position]),
                        "cached block {block} is stale"
                    );
                }
            }
            let end = seq.computed + scheduled.num_tokens as usize;
            assert!(end <= seq.tokens.len(), "ran past the known tokens");
            assert!(seq.blocks.len() * BLOCK >= end, "not enough blocks");
            for position in seq.computed..end {
                let block = seq.blocks[position / BLOCK];
                block_contents.entry(block).or_insert([None; BLOCK])[position % BLOCK] =
                    Some(seq.tokens[position]);
            }
            seq.computed = end;
            if seq.computed == seq.tokens.len() {
                let token = (seq.tokens.last().unwrap() + 1) % 250;
                seq.tokens.push(token);
                seq.generated += 1;
                let done = seq.generated == seq.max_new_tokens;
                generations.push(pb::Generation {
                    id: scheduled.id,
                    token_id: token,
                    logprob: -1.0,
                    finish_reason: if done {
                        pb::FinishReason::Length as i32
                    } else {
                        pb::FinishReason::Unspecified as i32
                    },
                });
                if done {
                    state.sequences.remove(&scheduled.id);
                }
            }
        }
        // No block may belong to two live requests.
        let mut owned = HashSet::new();
        for seq in state.sequences.values() {
            for block in &seq.blocks {
                assert!(owned.insert(*block), "block {block} is owned twice");
            }
        }
        Ok(pb::StepResponse {
            generations,
            forward_ns: 0,
            total_ns: 0,
        })
    }

    async fn clear_cache(&self) -> Result<(), ClientError> {
        self.state.lock().unwrap().sequences.clear();
        Ok(())
    }
}

fn request(prompt: Vec<u32>, max_new_tokens: u32) -> ValidRequest {
    ValidRequest {
        input_ids: prompt,
        sampling: pb::SamplingParameters::default(),
        max_new_tokens,
        ignore_eos: false,
        stop_sequences: Vec::new(),
    }
}

fn start(max_batch_tokens: u32, num_blocks: u32) -> (Arc<FakeShard>, SchedulerHandle) {
    let shard = Arc::new(FakeShard::default());
    let handle = spawn_scheduler(
        shard.clone(),
        SchedulerConfig {
            max_batch_tokens,
            max_batch_size: 64,
            num_blocks,
            block_size: BLOCK as u32,
            prefix_caching: true,
        },
    );
    (shard, handle)
}

fn ids(events: &[TokenEvent]) -> Vec<u32> {
    events.iter().map(|e| e.id).collect()
}

async fn collect(mut events: EventReceiver) -> Vec<TokenEvent> {
    let mut tokens = Vec::new();
    while let Some(event) = events.recv().await {
        let event = event.unwrap();
        let done = event.finish.is_some();
        tokens.push(event);
        if done {
            break;
        }
    }
    tokens
}

#[tokio::test]
async fn a_request_runs_to_its_length() {
    let (_shard, scheduler) = start(64, 8);
    let tokens = collect(scheduler.submit(request(vec![10, 11, 12], 4)).unwrap()).await;
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, vec![13, 14, 15, 16]);
    assert_eq!(tokens[3].finish, Some(ShardFinish::Length));
}

#[tokio::test]
async fn a_request_arriving_mid_generation_joins_the_running_batch() {
    let (shard, scheduler) = start(64, 8);
    let mut first = scheduler.submit(request(vec![1, 2, 3], 30)).unwrap();
    for _ in 0..3 {
        first.recv().await.unwrap().unwrap();
    }
    let second = scheduler.submit(request(vec![100, 101], 5)).unwrap();
    let second_tokens = collect(second).await;
    assert_eq!(second_tokens.len(), 5);
    let first_tokens = collect(first).await;
    assert_eq!(first_tokens.len(), 27);

    let steps = shard.state.lock().unwrap().steps.clone();
    let joined = steps
        .iter()
        .position(|s| s.new_requests.iter().any(|r| r.id == 1))
        .expect("the second request was admitted");
    assert!(
        steps[joined].scheduled.iter().any(|s| s.id == 0),
        "it joined a step in which the first request decoded"
    );
    // Once the second request finished, the steps hold the first alone.
    assert!(steps.last().unwrap().scheduled.iter().all(|s| s.id == 0));
}

#[tokio::test]
async fn long_prompts_are_chunked_while_others_decode() {
    let (shard, scheduler) = start(8, 16);
    let mut decoding = scheduler.submit(request(vec![1], 40)).unwrap();
    decoding.recv().await.unwrap().unwrap();
    let long_prompt: Vec<u32> = (0..20).collect();
    let long = collect(scheduler.submit(request(long_prompt, 2)).unwrap()).await;
    assert_eq!(long.len(), 2);
    collect(decoding).await;

    let steps = shard.state.lock().unwrap().steps.clone();
    let chunks: Vec<u32> = steps
        .iter()
        .flat_map(|s| {
            s.scheduled
                .iter()
                .filter(|r| r.id == 1)
                .map(|r| r.num_tokens)
        })
        .collect();
    // 7 + 7 + 6 prompt tokens next to one decode each, then a decode of its own.
    assert_eq!(chunks[..3].iter().sum::<u32>(), 20);
    assert!(chunks[..3].iter().all(|n| *n <= 7));
    for step in &steps {
        let tokens: u32 = step.scheduled.iter().map(|s| s.num_tokens).sum();
        assert!(tokens <= 8, "step over budget");
    }
}

#[tokio::test]
async fn a_dropped_request_is_freed_at_the_next_step() {
    let (shard, scheduler) = start(64, 4);
    let mut cancelled = scheduler.submit(request(vec![1, 2], 50)).unwrap();
    cancelled.recv().await.unwrap().unwrap();
    drop(cancelled);
    let next = collect(scheduler.submit(request(vec![7], 50)).unwrap()).await;
    assert_eq!(next.len(), 50);
    let steps = shard.state.lock().unwrap().steps.clone();
    assert!(steps.iter().any(|s| s.free_ids == vec![0]));
}

#[tokio::test]
async fn preempted_requests_resume_without_losing_or_repeating_tokens() {
    // Four 16-token blocks; three requests that each grow to 40 tokens (three blocks).
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| vec![i * 50; 5]).collect();
    let mut solo = Vec::new();
    for prompt in &prompts {
        let (_, scheduler) = start(64, 4);
        solo.push(ids(&collect(
            scheduler.submit(request(prompt.clone(), 35)).unwrap(),
        )
        .await));
    }

    let (shard, scheduler) = start(64, 4);
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| scheduler.submit(request(p.clone(), 35)).unwrap())
        .collect();
    let mut together = Vec::new();
    for stream in streams {
        together.push(ids(&collect(stream).await));
    }
    assert_eq!(together, solo);

    let steps = shard.state.lock().unwrap().steps.clone();
    let resumed: Vec<&pb::NewRequest> = steps
        .iter()
        .flat_map(|s| &s.new_requests)
        .filter(|r| r.generated_before > 0)
        .collect();
    assert!(
        !resumed.is_empty(),
        "the pool is too small for all three: someone was preempted"
    );
    for new in resumed {
        assert_eq!(new.token_ids.len(), 5 + new.generated_before as usize);
    }
}

#[tokio::test]
async fn a_shared_prefix_is_served_from_the_cache() {
    let (shard, scheduler) = start(256, 32);
    let system: Vec<u32> = (100..140).collect();
    let mut first_prompt = system.clone();
    first_prompt.extend([1, 2, 3]);
    let first = collect(scheduler.submit(request(first_prompt, 3)).unwrap()).await;
    assert_eq!(first[0].cached_prompt_tokens, 0);

    let mut second_prompt = system.clone();
    second_prompt.extend([4, 5]);
    let second = collect(scheduler.submit(request(second_prompt, 3)).unwrap()).await;
    // 40 shared tokens: two whole 16-token blocks are reusable.
    assert_eq!(second[0].cached_prompt_tokens, 32);
    assert_eq!(ids(&second), vec![6, 7, 8]);

    let steps = shard.state.lock().unwrap().steps.clone();
    let admitted = steps
        .iter()
        .flat_map(|s| &s.new_requests)
        .find(|r| r.id == 1)
        .unwrap();
    assert_eq!(admitted.cached_tokens, 32);
    let first_chunk = steps
        .iter()
        .flat_map(|s| &s.scheduled)
        .find(|s| s.id == 1)
        .unwrap();
    assert_eq!(first_chunk.num_tokens, 10, "only the uncached tokens run");
}
