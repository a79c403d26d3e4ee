//! Property tests of the real scheduler state and step builder, driven step by step against the
//! fake shard: random arrivals, prompt lengths, max_new_tokens, end-of-sequence handling,
//! cancellations, budgets and pool sizes. Every step must respect the token budget, the batch
//! size and the pool; no block may be leaked or owned twice; a request preempted in a step is
//! not re-admitted in it; and every request that is not cancelled must end with exactly the
//! tokens it would have generated alone, whether steps overlap or not.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use sluice_client::pb;
use tokio::sync::mpsc;

use super::entry::Submission;
use super::fake_shard::{next_token, FakeShardState};
use super::metrics::StepStats;
use super::state::{scheduled_tokens, SchedulerState};
use super::tests::sampling;
use super::{SchedulerConfig, SchedulerError, TokenEvent};
use crate::request::{FinishReason, GenerationRequest, StoppingParameters};
use crate::tokenizer::test_support::byte_tokenizer;

/// The model's end-of-sequence token here; prompts are drawn from 0..4, so it comes up often.
const EOS: u32 = 5;
/// Prompt plus output never exceeds this, and the pool always holds at least one such sequence
/// (the router refuses to start otherwise).
const MAX_SEQUENCE: usize = 24;
/// Far more steps than any of these workloads needs: reaching it means the scheduler stalled.
const MAX_STEPS: usize = 5_000;

#[derive(Debug, Clone)]
struct Arrival {
    /// The step before which the request arrives.
    at_step: usize,
    prompt: Vec<u32>,
    max_new_tokens: u32,
    ignore_eos: bool,
    /// The client goes away this many steps after the arrival.
    cancel_after: Option<usize>,
}

fn arrival() -> impl Strategy<Value = Arrival> {
    (
        0..40usize,
        prop::collection::vec(0..4u32, 1..16),
        1..=8u32,
        any::<bool>(),
        prop::option::weighted(0.2, 0..12usize),
    )
        .prop_map(
            |(at_step, prompt, max_new_tokens, ignore_eos, cancel_after)| Arrival {
                at_step,
                prompt,
                max_new_tokens,
                ignore_eos,
                cancel_after,
            },
        )
}

/// What the request generates alone: the fake's tokens until its length or end of sequence.
fn expected_tokens(arrival: &Arrival) -> (Vec<u32>, FinishReason) {
    let mut last = *arrival.prompt.last().expect("prompts are never empty");
    let mut tokens = Vec::new();
    while tokens.len() < arrival.max_new_tokens as usize {
        last = next_token(last);
        tokens.push(last);
        if !arrival.ignore_eos && last == EOS {
            return (tokens, FinishReason::EosToken);
        }
    }
    (tokens, FinishReason::Length)
}

struct Client {
    events: Option<mpsc::UnboundedReceiver<Result<TokenEvent, SchedulerError>>>,
    received: Vec<TokenEvent>,
    cancelled: bool,
}

impl Client {
    fn finished(&self) -> bool {
        self.received.last().is_some_and(|e| e.end.is_some())
    }
}

/// Blocks held by the running requests are exactly those the pool counts as held, and a block
/// past a request's registered prefix is its alone.
fn check_blocks(state: &SchedulerState) {
    let mut held = HashSet::new();
    let mut private = HashMap::new();
    for entry in &state.running {
        let unique: HashSet<u32> = entry.blocks.iter().copied().collect();
        assert_eq!(
            unique.len(),
            entry.blocks.len(),
            "a block twice in one table"
        );
        held.extend(unique);
        for block in &entry.blocks[entry.registered_blocks..] {
            assert!(
                private.insert(*block, entry.id).is_none(),
                "block {block} is private to two requests"
            );
        }
        assert!(entry.blocks.len() * state.kv.block_size() >= entry.num_computed);
    }
    for entry in &state.running {
        for block in &entry.blocks[..entry.registered_blocks] {
            if let Some(owner) = private.get(block) {
                panic!(
                    "block {block} is shared by {} but private to {owner}",
                    entry.id
                );
            }
        }
    }
    assert_eq!(
        held.len(),
        state.kv.num_used(),
        "held blocks leaked or lost"
    );
    assert!(state.waiting.iter().all(|e| e.blocks.is_empty()));
}

fn run(
    arrivals: &[Arrival],
    block_size: u32,
    num_blocks: u32,
    max_batch_tokens: u32,
    max_batch_size: usize,
    prefix_caching: bool,
    overlap_steps: bool,
) {
    let config = SchedulerConfig {
        max_batch_tokens,
        max_batch_size,
        num_blocks,
        block_size,
        prefix_caching,
        overlap_steps,
        max_decode_stall: None,
        eos_token_ids: vec![EOS],
    };
    let mut state = SchedulerState::new(config, Arc::new(byte_tokenizer()));
    let mut shard = FakeShardState::new(block_size as usize, num_blocks);
    let mut order: Vec<usize> = (0..arrivals.len()).collect();
    order.sort_by_key(|&i| arrivals[i].at_step);
    // Scheduler ids are given in arrival order.
    let mut clients: Vec<Client> = Vec::new();
    let mut next_arrival = 0;

    let mut in_flight: Option<(Vec<(u64, u32)>, pb::StepResponse)> = None;
    for step_number in 0..MAX_STEPS {
        while next_arrival < order.len() && arrivals[order[next_arrival]].at_step <= step_number {
            let arrival = &arrivals[order[next_arrival]];
            let (events, receiver) = mpsc::unbounded_channel();
            state.enqueue(Submission {
                request: GenerationRequest {
                    input_ids: arrival.prompt.clone(),
                    sampling: sampling(),
                    stopping: StoppingParameters {
                        max_new_tokens: arrival.max_new_tokens,
                        ignore_eos: arrival.ignore_eos,
                        stop_sequences: Vec::new(),
                    },
                    logprobs: Default::default(),
                    sequences: 1,
                },
                events: vec![events],
                queued: Instant::now(),
                span: tracing::Span::none(),
            });
            clients.push(Client {
                events: Some(receiver),
                received: Vec::new(),
                cancelled: false,
            });
            next_arrival += 1;
        }
        let mut cancelled_now = 0;
        for (id, client) in clients.iter_mut().enumerate() {
            let arrival = &arrivals[order[id]];
            let due = arrival
                .cancel_after
                .is_some_and(|after| arrival.at_step + after <= step_number);
            if due && !client.cancelled {
                client.cancelled = true;
                client.events = None;
                if !client.finished() {
                    cancelled_now += 1;
                }
            }
        }
        assert_eq!(
            state.reap_cancelled(),
            cancelled_now,
            "each cancelled request is reaped once"
        );

        let mut stats = StepStats::default();
        // The shard runs a step when it is sent; the router handles its answer at once, or,
        // with overlapped steps, after it has built and sent the next one.
        let sent = state.build_step(&mut stats).map(|step| {
            let tokens: u32 = step.scheduled.iter().map(|s| s.num_tokens).sum();
            assert!(tokens <= max_batch_tokens, "over the token budget");
            assert!(
                step.scheduled.len() <= max_batch_size,
                "over the batch size"
            );
            assert!(state.running.len() <= max_batch_size);
            let freed: HashSet<u64> = step.free_ids.iter().copied().collect();
            for new in &step.new_requests {
                assert!(
                    !freed.contains(&new.id),
                    "request {} preempted and re-admitted in one step",
                    new.id
                );
            }
            check_blocks(&state);
            let scheduled = scheduled_tokens(&step);
            (scheduled, shard.step(step))
        });
        if sent.is_none() && in_flight.is_none() {
            assert!(
                state.waiting.is_empty() && state.running.is_empty(),
                "requests wait but no step can be built"
            );
        }
        if let Some((scheduled, response)) = in_flight.take() {
            state.finish_step(&scheduled, response);
            check_blocks(&state);
        }
        in_flight = sent;
        if !overlap_steps {
            if let Some((scheduled, response)) = in_flight.take() {
                state.finish_step(&scheduled, response);
                check_blocks(&state);
            }
        }
        for client in &mut clients {
            if let Some(events) = client.events.as_mut() {
                while let Ok(event) = events.try_recv() {
                    client.received.push(event.expect("no step fails"));
                }
            }
        }
        if next_arrival == order.len() && !state.has_work() && in_flight.is_none() {
            assert_eq!(state.kv.num_used(), 0, "blocks leaked");
            assert!(shard.sequences.is_empty(), "the shard still holds requests");
            for (id, client) in clients.iter().enumerate() {
                if client.cancelled {
                    continue;
                }
                let (tokens, reason) = expected_tokens(&arrivals[order[id]]);
                let received: Vec<u32> = client.received.iter().map(|e| e.token.id).collect();
                assert_eq!(received, tokens, "request {id}'s tokens");
                let end = client.received.last().and_then(|e| e.end.as_ref());
                assert_eq!(end.map(|e| e.finish_reason), Some(reason));
                assert_eq!(end.map(|e| e.generated_tokens), Some(tokens.len() as u32));
            }
            return;
        }
    }
    panic!("not done after {MAX_STEPS} steps");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_step_fits_and_every_request_finishes_with_its_tokens(
        arrivals in prop::collection::vec(arrival(), 1..14),
        block_size in prop::sample::select(vec![1u32, 2, 4]),
        extra_blocks in 0..24u32,
        max_batch_tokens in 1..40u32,
        max_batch_size in 1..8usize,
        prefix_caching in any::<bool>(),
        overlap_steps in any::<bool>(),
    ) {
        let num_blocks = (MAX_SEQUENCE as u32).div_ceil(block_size) + extra_blocks;
        run(
            &arrivals,
            block_size,
            num_blocks,
            max_batch_tokens,
            max_batch_size,
            prefix_caching,
            overlap_steps,
        );
    }
}

fn small_state(num_blocks: u32, block_size: u32, max_batch_tokens: u32) -> SchedulerState {
    let config = SchedulerConfig {
        max_batch_tokens,
        max_batch_size: 4,
        num_blocks,
        block_size,
        prefix_caching: false,
        overlap_steps: true,
        max_decode_stall: None,
        eos_token_ids: vec![],
    };
    SchedulerState::new(config, Arc::new(byte_tokenizer()))
}

fn submit(
    state: &mut SchedulerState,
    prompt: Vec<u32>,
    max_new_tokens: u32,
) -> mpsc::UnboundedReceiver<Result<TokenEvent, SchedulerError>> {
    let (events, receiver) = mpsc::unbounded_channel();
    state.enqueue(Submission {
        request: GenerationRequest {
            input_ids: prompt,
            sampling: sampling(),
            stopping: StoppingParameters {
                max_new_tokens,
                ignore_eos: true,
                stop_sequences: Vec::new(),
            },
            logprobs: Default::default(),
            sequences: 1,
        },
        events: vec![events],
        queued: Instant::now(),
        span: tracing::Span::none(),
    });
    receiver
}

/// Builds and runs one step; returns its (id, tokens) chunks and its preemptions.
fn run_step(state: &mut SchedulerState, shard: &mut FakeShardState) -> (Vec<(u64, u32)>, u64) {
    let mut stats = StepStats::default();
    let step = state.build_step(&mut stats).expect("a step");
    let scheduled = scheduled_tokens(&step);
    let chunks = scheduled.clone();
    let response = shard.step(step);
    state.finish_step(&scheduled, response);
    (chunks, stats.preemptions)
}

#[test]
fn a_prompt_chunk_runs_shorter_instead_of_preempting_itself() {
    // Four blocks of 4 tokens, 9 tokens a step. Step 1: the first prompt (5 tokens, 2 blocks)
    // and 4 tokens of the second (1 block).
    let mut state = small_state(4, 4, 9);
    let mut shard = FakeShardState::new(4, 4);
    let _first = submit(&mut state, vec![1; 5], 2);
    let mut second = submit(&mut state, vec![3; 12], 2);
    assert_eq!(run_step(&mut state, &mut shard), (vec![(0, 5), (1, 4)], 0));
    // Step 2: the first decodes; the second wants its last 8 tokens (2 blocks) but one block is
    // free and it is the youngest: it runs 4 tokens on that block rather than preempt itself.
    assert_eq!(run_step(&mut state, &mut shard), (vec![(0, 1), (1, 4)], 0));
    // The first is done and freed; the second finishes its prompt and decodes.
    assert_eq!(run_step(&mut state, &mut shard), (vec![(1, 4)], 0));
    assert_eq!(run_step(&mut state, &mut shard), (vec![(1, 1)], 0));
    let mut tokens = Vec::new();
    while let Ok(event) = second.try_recv() {
        tokens.push(event.unwrap().token.id);
    }
    assert_eq!(tokens, vec![4, 5]);
}

#[test]
fn a_request_preempted_in_a_step_is_not_readmitted_in_it() {
    // Two blocks of 2 tokens; two one-token prompts, one block each.
    let mut state = small_state(2, 2, 64);
    let mut shard = FakeShardState::new(2, 2);
    let _older = submit(&mut state, vec![1], 3);
    let _younger = submit(&mut state, vec![7], 3);
    assert_eq!(run_step(&mut state, &mut shard), (vec![(0, 1), (1, 1)], 0));
    assert_eq!(run_step(&mut state, &mut shard), (vec![(0, 1), (1, 1)], 0));
    // Both now need a second block: the younger is preempted for the older, and the step
    // admits nobody, although the block it gave back would hold its first chunk again.
    let mut stats = StepStats::default();
    let step = state.build_step(&mut stats).unwrap();
    assert_eq!(stats.preemptions, 1);
    assert_eq!(step.free_ids, vec![1]);
    assert!(step.new_requests.is_empty());
    assert_eq!(state.waiting.len(), 1);
    shard.step(step);
}
