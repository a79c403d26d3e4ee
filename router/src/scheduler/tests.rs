//! The batching loop against a fake shard that keeps per-request state like a real one.

use std::sync::Arc;
use std::time::Duration;

use sluice_client::pb;

use super::fake_shard::{FakeShard, FakeStepCost};
use super::*;
use crate::request::{FinishReason, ReportedLogprobs, SamplingParameters, StoppingParameters};
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
        logprobs: Default::default(),
        sequences: 1,
    }
}

/// Submits a request for one sequence.
fn submit(scheduler: &SchedulerHandle, request: GenerationRequest) -> EventReceiver {
    let mut receivers = scheduler.submit(request).unwrap();
    assert_eq!(receivers.len(), 1);
    receivers.remove(0)
}

/// The fake's end-of-sequence token in these tests.
const EOS: u32 = 200;

fn start(max_batch_tokens: u32, num_blocks: u32) -> (Arc<FakeShard>, SchedulerHandle) {
    start_with(max_batch_tokens, num_blocks, true)
}

fn start_with(
    max_batch_tokens: u32,
    num_blocks: u32,
    overlap_steps: bool,
) -> (Arc<FakeShard>, SchedulerHandle) {
    start_config(SchedulerConfig {
        overlap_steps,
        ..config(max_batch_tokens, num_blocks)
    })
}

fn config(max_batch_tokens: u32, num_blocks: u32) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_tokens,
        max_batch_size: 64,
        num_blocks,
        block_size: BLOCK as u32,
        prefix_caching: true,
        overlap_steps: true,
        max_decode_stall: None,
        eos_token_ids: vec![EOS],
    }
}

fn start_config(config: SchedulerConfig) -> (Arc<FakeShard>, SchedulerHandle) {
    let shard = Arc::new(FakeShard::new(BLOCK, config.num_blocks));
    let (handle, _task) = spawn_scheduler(shard.clone(), Arc::new(byte_tokenizer()), config);
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
    let tokens = collect(submit(&scheduler, request(vec![10, 11, 12], 4))).await;
    assert_eq!(ids(&tokens), vec![13, 14, 15, 16]);
    assert_eq!(finish_reason(&tokens), Some(FinishReason::Length));
    assert!(tokens[..3].iter().all(|t| t.end.is_none()));
}

#[tokio::test]
async fn the_router_stops_at_end_of_sequence_and_frees_the_request_on_the_shard() {
    for overlap_steps in [false, true] {
        let (shard, scheduler) = start_with(64, 8, overlap_steps);
        let tokens = collect(submit(&scheduler, request(vec![196], 10))).await;
        assert_eq!(ids(&tokens), vec![197, 198, 199, EOS]);
        assert_eq!(finish_reason(&tokens), Some(FinishReason::EosToken));

        let mut ignoring = request(vec![196], 6);
        ignoring.stopping.ignore_eos = true;
        let tokens = collect(submit(&scheduler, ignoring)).await;
        assert_eq!(ids(&tokens), vec![197, 198, 199, EOS, 201, 202]);
        assert_eq!(finish_reason(&tokens), Some(FinishReason::Length));

        // Both were freed on the shard, in the order they ended.
        let _ = collect(submit(&scheduler, request(vec![1], 1))).await;
        let steps = steps(&shard);
        let freed: Vec<u64> = steps.iter().flat_map(|s| s.free_ids.clone()).collect();
        assert!(freed.starts_with(&[0, 1]));
        // The prompt and three decodes; overlapped, the step sent while the end-of-sequence
        // token was sampled runs a fourth, whose token is dropped.
        let runs_of_first = steps
            .iter()
            .filter(|s| s.scheduled.iter().any(|r| r.id == 0))
            .count();
        assert_eq!(runs_of_first, if overlap_steps { 5 } else { 4 });
        // Ended by length, the second never runs past its last token.
        let runs_of_second = steps
            .iter()
            .filter(|s| s.scheduled.iter().any(|r| r.id == 1))
            .count();
        assert_eq!(runs_of_second, 6);
    }
}

#[tokio::test]
async fn a_stop_sequence_ends_the_request_and_cuts_the_text() {
    let (shard, scheduler) = start(64, 8);
    let mut stopped = request(vec![63], 20);
    // The byte tokenizer's ids 64, 65, 66 are `a`, `b`, `c`.
    stopped.stopping.stop_sequences = vec!["bc".into()];
    let tokens = collect(submit(&scheduler, stopped)).await;
    assert_eq!(ids(&tokens), vec![64, 65, 66]);
    let end = tokens.last().unwrap().end.clone().unwrap();
    assert_eq!(end.finish_reason, FinishReason::StopSequence);
    assert_eq!(end.generated_text, "abc");
    assert_eq!(end.generated_tokens, 3);
    let _ = collect(submit(&scheduler, request(vec![1], 1))).await;
    assert!(steps(&shard).iter().any(|s| s.free_ids == vec![0]));
}

#[tokio::test]
async fn a_request_arriving_mid_generation_joins_the_running_batch() {
    let (shard, scheduler) = start(64, 8);
    let mut first = submit(&scheduler, request(vec![1, 2, 3], 30));
    for _ in 0..3 {
        first.recv().await.unwrap().unwrap();
    }
    let second = submit(&scheduler, request(vec![100, 101], 5));
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
    let mut decoding = submit(&scheduler, request(vec![1], 40));
    decoding.recv().await.unwrap().unwrap();
    let long_prompt: Vec<u32> = (0..20).collect();
    let long = collect(submit(&scheduler, request(long_prompt, 2))).await;
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
async fn a_decode_stall_target_cuts_prompt_chunks_to_what_fits_beside_the_decodes() {
    // Steps take 2 ms, and 1 ms more per prompt token: a 100 ms target leaves room for 98
    // prompt tokens beside the decodes, far below the 512-token budget.
    let cost = FakeStepCost {
        base: Duration::from_millis(2),
        per_prompt_token: Duration::from_millis(1),
    };
    for target in [None, Some(Duration::from_millis(100))] {
        let (shard, scheduler) = start_config(SchedulerConfig {
            max_decode_stall: target,
            ..config(512, 128)
        });
        shard.state.lock().unwrap().cost = cost;
        let mut decoding = submit(&scheduler, request(vec![1], 150));
        decoding.recv().await.unwrap().unwrap();
        let long_prompt: Vec<u32> = (0..600).map(|i| i % 190).collect();
        let long = collect(submit(&scheduler, request(long_prompt, 2))).await;
        assert_eq!(ids(&long), vec![30, 31]);
        assert_eq!(collect(decoding).await.len(), 149);

        // The long prompt's chunks, each in a step with the other request's decode.
        let mut chunks = Vec::new();
        for step in steps(&shard) {
            let with_decode = step.scheduled.iter().any(|r| r.id == 0);
            if let Some(chunk) = step.scheduled.iter().find(|r| r.id == 1) {
                if chunks.iter().sum::<u32>() < 600 {
                    assert!(with_decode, "a chunk ran without the decode");
                    chunks.push(chunk.num_tokens);
                }
            }
        }
        match target {
            None => assert_eq!(chunks, vec![511, 89]),
            Some(_) => {
                // The estimate starts high (the first prompt's step counted its fixed cost as
                // the prompt's) and settles at 1 ms a token.
                assert!(chunks.iter().all(|&n| n <= 98), "{chunks:?}");
                assert!(chunks.iter().any(|&n| n > 64), "{chunks:?}");
            }
        }
    }
}

#[tokio::test]
async fn a_dropped_request_is_freed_at_the_next_step() {
    let (shard, scheduler) = start(64, 4);
    let mut cancelled = submit(&scheduler, request(vec![1, 2], 50));
    cancelled.recv().await.unwrap().unwrap();
    drop(cancelled);
    let next = collect(submit(&scheduler, request(vec![7], 50))).await;
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
        solo.push(ids(&collect(submit(
            &scheduler,
            request(prompt.clone(), 35),
        ))
        .await));
    }

    let (shard, scheduler) = start(64, 4);
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| submit(&scheduler, request(p.clone(), 35)))
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
    let first = collect(submit(&scheduler, request(first_prompt, 3))).await;
    assert_eq!(first.last().unwrap().end.as_ref().unwrap().cached_tokens, 0);

    let mut second_prompt = system.clone();
    second_prompt.extend([4, 5]);
    let second = collect(submit(&scheduler, request(second_prompt, 3))).await;
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

#[tokio::test]
async fn sibling_sequences_share_the_prompt_computed_once() {
    let (shard, scheduler) = start(256, 32);
    let prompt: Vec<u32> = (100..140).collect();
    let mut sampled = request(prompt.clone(), 3);
    sampled.sampling.do_sample = true;
    sampled.sampling.seed = 7;
    sampled.sequences = 4;
    let receivers = scheduler.submit(sampled).unwrap();
    assert_eq!(receivers.len(), 4);
    for events in receivers {
        let tokens = collect(events).await;
        assert_eq!(ids(&tokens), vec![140, 141, 142]);
    }

    let steps = steps(&shard);
    let new_requests: Vec<&pb::NewRequest> = steps.iter().flat_map(|s| &s.new_requests).collect();
    assert_eq!(new_requests.len(), 4);
    // The first computes the prompt; its siblings start from its two full blocks, each with
    // its own seed.
    assert_eq!(new_requests[0].cached_tokens, 0);
    for (index, sibling) in new_requests.iter().enumerate().skip(1) {
        assert_eq!(sibling.cached_tokens, 32);
        let seed = sibling.sampling.as_ref().unwrap().seed;
        assert_eq!(seed, 7 + index as u64);
    }
    let prompt_tokens_computed: u32 = steps
        .iter()
        .flat_map(|s| &s.scheduled)
        .filter(|s| s.num_tokens > 1)
        .map(|s| s.num_tokens)
        .sum();
    assert_eq!(prompt_tokens_computed, 40 + 3 * 8);
}

#[tokio::test]
async fn prompt_logprobs_skip_the_prefix_cache_and_cover_every_chunk() {
    // A budget of 16 tokens splits the 40-token prompt into three chunks.
    let (shard, scheduler) = start(16, 32);
    let prompt: Vec<u32> = (100..140).collect();
    let _ = collect(submit(&scheduler, request(prompt.clone(), 1))).await;
    let mut scored = request(prompt.clone(), 2);
    scored.logprobs = ReportedLogprobs {
        top_n_tokens: 2,
        prompt: true,
    };
    let tokens = collect(submit(&scheduler, scored)).await;
    let end = tokens.last().unwrap().end.as_ref().unwrap();
    assert_eq!(end.cached_tokens, 0, "the cached prompt is computed again");
    let ids: Vec<u32> = end.prompt_tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, prompt);
    assert_eq!(end.prompt_tokens[0].logprob, None);
    for (position, token) in end.prompt_tokens.iter().enumerate().skip(1) {
        assert_eq!(token.logprob, Some(-(position as f32)));
    }
    let top: Vec<u32> = tokens[0].top_tokens.iter().map(|t| t.id).collect();
    assert_eq!(top, vec![141, 142]);
    let admitted = steps(&shard)
        .iter()
        .flat_map(|s| s.new_requests.clone())
        .find(|r| r.id == 1)
        .unwrap();
    assert!(admitted.prompt_logprobs && admitted.top_n_tokens == 2);
}

#[tokio::test]
async fn shards_that_restart_fail_the_running_requests_then_serve_from_a_cold_cache() {
    let (shard, scheduler) = start(64, 16);
    // Two full blocks of this prompt land in the prefix cache.
    let prompt: Vec<u32> = (1..=33).collect();
    let first = collect(submit(&scheduler, request(prompt.clone(), 2))).await;
    let cached = |tokens: &[TokenEvent]| {
        tokens
            .last()
            .and_then(|t| t.end.as_ref())
            .map(|e| e.cached_tokens)
    };
    assert_eq!(cached(&first), Some(0));
    let hit = collect(submit(&scheduler, request(prompt.clone(), 2))).await;
    assert_eq!(cached(&hit), Some(32));

    let mut running = submit(&scheduler, request(vec![5], 50));
    assert!(running.recv().await.unwrap().is_ok());
    shard
        .crash_next_step
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut failed = false;
    while let Some(event) = running.recv().await {
        if let Err(error) = event {
            assert!(matches!(error, SchedulerError::Generation(_)));
            failed = true;
        }
    }
    assert!(failed, "the request of the lost step fails");

    // The restarted shard holds none of the cached blocks: the same prompt is computed again
    // (the fake asserts that no stale block is reused) and gives the same tokens.
    let again = collect(submit(&scheduler, request(prompt, 2))).await;
    assert_eq!(ids(&again), ids(&first));
    assert_eq!(cached(&again), Some(0));
}

/// Polls the handle until it reports `expected`, by its variant.
async fn wait_until_seen(scheduler: &SchedulerHandle, expected: fn(&ShardsSeen) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !expected(&scheduler.shards_seen()) {
        assert!(
            Instant::now() < deadline,
            "never seen as expected: {:?}",
            scheduler.shards_seen()
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn the_handle_tells_what_the_scheduler_sees_of_the_shards() {
    let (shard, scheduler) = start(64, 16);
    assert_eq!(scheduler.shards_seen(), ShardsSeen::Idle);

    // Working while steps come back, idle once the request is done.
    let mut running = submit(&scheduler, request(vec![5], 100));
    assert!(running.recv().await.unwrap().is_ok());
    let ShardsSeen::Working { since_progress } = scheduler.shards_seen() else {
        panic!("not working: {:?}", scheduler.shards_seen());
    };
    assert!(since_progress < Duration::from_secs(5));
    while running.recv().await.is_some() {}
    wait_until_seen(&scheduler, |seen| *seen == ShardsSeen::Idle).await;

    // A failed step: recovering until the shards are back (the gate holds the recovery, as a
    // warmup would).
    let gate = shard.recovery_gate.lock().await;
    shard
        .crash_next_step
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut lost = submit(&scheduler, request(vec![5], 2));
    while let Some(Ok(_)) = lost.recv().await {}
    // Already when the request hears of the failure.
    assert_eq!(scheduler.shards_seen(), ShardsSeen::Recovering);
    drop(gate);
    let again = collect(submit(&scheduler, request(vec![5], 2))).await;
    assert_eq!(again.len(), 2);
    wait_until_seen(&scheduler, |seen| *seen == ShardsSeen::Idle).await;
}
