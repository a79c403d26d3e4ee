//! The scheduler task: the continuous-batching loop. Requests that arrive while a step runs
//! join the batch at the next step; finished and cancelled requests leave it.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::entry::{Entry, Submission};
use super::step_builder::SchedulerState;
use super::{SchedulerConfig, SchedulerError, SchedulerHandle, Shard, ShardFinish, TokenEvent};
use crate::pb;

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
    loop {
        // Sleep until a request arrives when idle; otherwise take whatever has queued up.
        if !state.has_work() {
            match inbox.recv().await {
                Some(submission) => {
                    state.waiting.push_back(Entry::new(next_id, submission));
                    next_id += 1;
                }
                None => return,
            }
        }
        while let Ok(submission) = inbox.try_recv() {
            state.waiting.push_back(Entry::new(next_id, submission));
            next_id += 1;
        }

        state.reap_cancelled();
        let Some(step) = state.build_step() else {
            // Waiting requests that cannot be admitted yet only wait for running ones to finish,
            // and nothing runs: wait for a new arrival instead of spinning.
            if let Some(submission) = inbox.recv().await {
                state.waiting.push_back(Entry::new(next_id, submission));
                next_id += 1;
            } else {
                return;
            }
            continue;
        };
        match shard.step(step).await {
            Ok(response) => deliver(&mut state, response),
            Err(e) => fail_running(&*shard, &mut state, e.to_string()).await,
        }
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
        entry.generated += 1;
        let finish = match pb::FinishReason::try_from(generation.finish_reason) {
            Ok(pb::FinishReason::EosToken) => Some(ShardFinish::EosToken),
            Ok(pb::FinishReason::Length) => Some(ShardFinish::Length),
            _ => None,
        };
        let event = TokenEvent {
            id: generation.token_id,
            logprob: generation.logprob,
            finish,
        };
        // A failed send means the client left; the request is reaped before the next step.
        let _ = entry.events.send(Ok(event));
        if finish.is_some() {
            let mut entry = state.running.swap_remove(index);
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
    for mut entry in state.running.drain(..).collect::<Vec<_>>() {
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
