//! The batching loop against a fake shard that keeps per-request state like a real one.

use std::sync::Arc;

use sluice_client::pb;

use super::fake_shard::FakeShard;
use super::*;
use crate::request::{FinishReason, SamplingParameters, StoppingParameters};
use crate::tokenizer::test_support::byte_tokenizer;

const BLOCK: usize = 16;

pub(super) fn sampling() -> SamplingParameters {
    SamplingParameters {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        do_sample: false,
        seed: 0,
        repetition_penalty: 1.0,
        typical_p: 1.0,
        min_p: 0.0,
        frequency_penalty: 0.0,
        presence_penalty: 0.0,
    }
}

fn request(prompt: Vec<u32>, max_new_tokens: u32) -> GenerationRequest {
    GenerationRequest {
        input_ids: prompt,
        sampling: sampling(),
        stopping: StoppingParameters {
            max_new_tokens,
            ignore_eos: false,
            stop_sequences: Vec::new(),
        },
    }
}

/// The fake's end-of-sequence token in these tests.
const EOS: u32 = 200;

fn start(max_batch_tokens: u32, num_blocks: u32) -> (Arc<FakeShard>, SchedulerHandle) {
    let shard = Arc::new(FakeShard::new(BLOCK, num_blocks));
    let handle = spawn_scheduler(
        shard.clone(),
        Arc::new(byte_tokenizer()),
        SchedulerConfig {
            max_batch_tokens,
            max_batch_size: 64,
            num_blocks,
            block_size: BLOCK as u32,
            prefix_caching: true,
            eos_token_ids: vec![EOS],
        },
    );
    (shard, handle)
}

fn steps(shard: &FakeShard) -> Vec<pb::StepRequest> {
    shard.state.lock().unwrap().steps.clone()
}

fn ids(events: &[TokenEvent]) -> Vec<u32> {
    events.iter().map(|e| e.token.id).collect()
}

fn finish_reason(events: &[TokenEvent]) -> Option<FinishReason> {
    events.last()?.end.as_ref().map(|end| end.finish_reason)
}

async fn collect(mut events: EventReceiver) -> Vec<TokenEvent> {
    let mut tokens = Vec::new();
    while let Some(event) = events.recv().await {
        let event = event.unwrap();
        let done = event.end.is_some();
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
    assert_eq!(ids(&tokens), vec![13, 14, 15, 16]);
    assert_eq!(finish_reason(&tokens), Some(FinishReason::Length));
    assert!(tokens[..3].iter().all(|t| t.end.is_none()));
}

#[tokio::test]
async fn the_router_stops_at_end_of_sequence_and_frees_the_request_on_the_shard() {
    let (shard, scheduler) = start(64, 8);
    let tokens = collect(scheduler.submit(request(vec![196], 10)).unwrap()).await;
    assert_eq!(ids(&tokens), vec![197, 198, 199, EOS]);
    assert_eq!(finish_reason(&tokens), Some(FinishReason::EosToken));

    let mut ignoring = request(vec![196], 6);
    ignoring.stopping.ignore_eos = true;
    let tokens = collect(scheduler.submit(ignoring).unwrap()).await;
    assert_eq!(ids(&tokens), vec![197, 198, 199, EOS, 201, 202]);
    assert_eq!(finish_reason(&tokens), Some(FinishReason::Length));

    // Both were freed on the shard, in the order they ended.
    let _ = collect(scheduler.submit(request(vec![1], 1)).unwrap()).await;
    let steps = steps(&shard);
    let freed: Vec<u64> = steps.iter().flat_map(|s| s.free_ids.clone()).collect();
    assert!(freed.starts_with(&[0, 1]));
    // The prompt and three decodes: none after the end-of-sequence token.
    let runs_of_first = steps
        .iter()
        .filter(|s| s.scheduled.iter().any(|r| r.id == 0))
        .count();
    assert_eq!(runs_of_first, 4);
}

#[tokio::test]
async fn a_stop_sequence_ends_the_request_and_cuts_the_text() {
    let (shard, scheduler) = start(64, 8);
    let mut stopped = request(vec![63], 20);
    // The byte tokenizer's ids 64, 65, 66 are `a`, `b`, `c`.
    stopped.stopping.stop_sequences = vec!["bc".into()];
    let tokens = collect(scheduler.submit(stopped).unwrap()).await;
    assert_eq!(ids(&tokens), vec![64, 65, 66]);
    let end = tokens.last().unwrap().end.clone().unwrap();
    assert_eq!(end.finish_reason, FinishReason::StopSequence);
    assert_eq!(end.generated_text, "abc");
    assert_eq!(end.generated_tokens, 3);
    let _ = collect(scheduler.submit(request(vec![1], 1)).unwrap()).await;
    assert!(steps(&shard).iter().any(|s| s.free_ids == vec![0]));
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

    let steps = steps(&shard);
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

    let steps = steps(&shard);
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
    let steps = steps(&shard);
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

    let steps = steps(&shard);
    let resumed: Vec<&pb::NewRequest> = steps
        .iter()
        .flat_map(|s| &s.new_requests)
        .filter(|r| r.token_ids.len() > 5)
        .collect();
    assert!(
        !resumed.is_empty(),
        "the pool is too small for all three: someone was preempted"
    );
    for new in resumed {
        // The prompt, then what it generated before, to be recomputed.
        let generated = &new.token_ids[5..];
        let prompt_last = new.token_ids[4];
        assert_eq!(generated[0], fake_shard::next_token(prompt_last));
    }
}

#[tokio::test]
async fn a_shared_prefix_is_served_from_the_cache() {
    let (shard, scheduler) = start(256, 32);
    let system: Vec<u32> = (100..140).collect();
    let mut first_prompt = system.clone();
    first_prompt.extend([1, 2, 3]);
    let first = collect(scheduler.submit(request(first_prompt, 3)).unwrap()).await;
    assert_eq!(first.last().unwrap().end.as_ref().unwrap().cached_tokens, 0);

    let mut second_prompt = system.clone();
    second_prompt.extend([4, 5]);
    let second = collect(scheduler.submit(request(second_prompt, 3)).unwrap()).await;
    // 40 shared tokens: two whole 16-token blocks are reusable.
    assert_eq!(
        second.last().unwrap().end.as_ref().unwrap().cached_tokens,
        32
    );
    assert_eq!(ids(&second), vec![6, 7, 8]);

    let steps = steps(&shard);
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
