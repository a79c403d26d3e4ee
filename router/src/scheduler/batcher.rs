//! The scheduler task: the continuous-batching loop. Requests that arrive while a step runs
//! join the batch at the next step; finished and cancelled requests leave it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::entry::{Entry, Submission};
use super::metrics::{record_occupancy, record_shard_timing, record_step, StepStats};
use super::step_builder::SchedulerState;
use super::{SchedulerConfig, SchedulerError, SchedulerHandle, Shard, ShardFinish, TokenEvent};
use crate::pb;

/// When a request wakes an idle scheduler, it keeps collecting arrivals until none has come for
/// BURST_GAP, and for at most BURST_WINDOW, before building a step.
const BURST_GAP: Duration = Duration::from_millis(2);
const BURST_WINDOW: Duration = Duration::from_millis(10);

/// Starts the scheduler task and returns the handle to submit requests with.
pub fn spawn_scheduler<S: Shard>(shard: Arc<S>, config: SchedulerConfig) -> SchedulerHandle {
    let (submissions, inbox) = mpsc::unbounded_channel();
    tokio::spawn(run(shard, SchedulerState::new(config), inbox));
    SchedulerHandle { submissions }
}

async fn run<S: Shard>(
    shard: Arc<S>,
    mut state: SchedulerState,
    mut inbox: mpsc::UnboundedReceiver<Submission>,
) {
    let mut next_id: u64 = 0;
    let mut admit = |state: &mut SchedulerState, submission: Submission| {
        state.waiting.push_back(Entry::new(next_id, submission));
        next_id += 1;
    };
    loop {
        // Sleep until a request arrives when idle; otherwise take whatever has queued up.
        if !state.has_work() {
            record_occupancy(&state);
            match inbox.recv().await {
                Some(submission) => admit(&mut state, submission),
                None => return,
            }
            // Requests sent together reach the router a little apart (each is parsed and
            // tokenized first); waiting briefly lets a burst share one prefill step instead of
            // the late ones waiting a whole step for the next.
            let deadline = Instant::now() + BURST_WINDOW;
            loop {
                let wait = BURST_GAP.min(deadline.saturating_duration_since(Instant::now()));
                match tokio::time::timeout(wait, inbox.recv()).await {
                    Ok(Some(submission)) => admit(&mut state, submission),
                    // Closed or quiet: go on with what has arrived.
                    Ok(None) | Err(_) => break,
                }
            }
        }
        while let Ok(submission) = inbox.try_recv() {
            admit(&mut state, submission);
        }

        state.reap_cancelled();
        let mut stats = StepStats::default();
        let Some(step) = state.build_step(&mut stats) else {
            // Nothing can run until a request arrives (the queue head waits for blocks only
            // while others run, and then there is a step).
            match inbox.recv().await {
                Some(submission) => admit(&mut state, submission),
                None => return,
            }
            continue;
        };
        let tokens: usize = step.scheduled.iter().map(|s| s.num_tokens as usize).sum();
        let decodes = step.scheduled.len() - stats.prefill_chunks as usize;
        let started = Instant::now();
        match shard.step(step).await {
            Ok(response) => {
                record_shard_timing(response.forward_ns, response.total_ns);
                // Before delivering: finished requests leave the batch there.
                state.register_computed_blocks();
                deliver(&mut state, response);
            }
            Err(e) => fail_running(&*shard, &mut state, e.to_string()).await,
        }
        record_step(&state, &stats, tokens, decodes, started.elapsed());
    }
}

/// Hands every generated token to its request and retires the requests that finished.
fn deliver(state: &mut SchedulerState, response: pb::StepResponse) {
    for generation in response.generations {
        let Some(index) = state.running.iter().position(|e| e.id == generation.id) else {
            tracing::warn!(
                id = generation.id,
                "shard returned a token for an unknown request"
            );
            continue;
        };
        let entry = &mut state.running[index];
        entry.tokens.push(generation.token_id);
        let finish = match pb::FinishReason::try_from(generation.finish_reason) {
            Ok(pb::FinishReason::EosToken) => Some(ShardFinish::EosToken),
            Ok(pb::FinishReason::Length) => Some(ShardFinish::Length),
            _ => None,
        };
        let event = TokenEvent {
            id: generation.token_id,
            logprob: generation.logprob,
            finish,
            cached_prompt_tokens: entry.cached_prompt_tokens.unwrap_or(0),
        };
        // A failed send means the client left; the request is reaped before the next step.
        let _ = entry.events.send(Ok(event));
        if finish.is_some() {
            // Keep the running order (the youngest is last): preemption relies on it.
            let mut entry = state.running.remove(index);
            // The shard forgets a request it stopped by itself.
            entry.on_shard = false;
            state.retire(entry);
        }
    }
}

/// A failed step leaves the shards' state unknown: fail the running requests, reset the shards
/// and keep serving the queue.
async fn fail_running<S: Shard>(shard: &S, state: &mut SchedulerState, message: String) {
    tracing::error!(error = %message, "step failed");
    for mut entry in std::mem::take(&mut state.running) {
        let _ = entry
            .events
            .send(Err(SchedulerError::Generation(message.clone())));
        entry.on_shard = false;
        state.retire(entry);
    }
    state.to_free.clear();
    if let Err(e) = shard.clear_cache().await {
        tracing::error!(error = %e, "clearing the shards' cache failed");
    }
}
