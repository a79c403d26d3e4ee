//! The scheduler task: the continuous-batching loop. Requests that arrive while a step runs
//! join the batch at the next step; finished and cancelled requests leave it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::entry::Submission;
use super::metrics::{
    record_cancelled, record_occupancy, record_shard_timing, record_step, StepStats,
};
use super::state::SchedulerState;
use super::{SchedulerConfig, SchedulerHandle};
use crate::shard::Shard;
use crate::tokenizer::Tokenizer;
use crate::trace;

/// When a request wakes an idle scheduler, it keeps collecting arrivals until none has come for
/// BURST_GAP, and for at most BURST_WINDOW, before building a step.
const BURST_GAP: Duration = Duration::from_millis(2);
const BURST_WINDOW: Duration = Duration::from_millis(10);

/// Starts the scheduler task and returns the handle to submit requests with. The tokenizer
/// turns the generated tokens into text, which stop sequences are found in.
pub fn spawn_scheduler<S: Shard>(
    shard: Arc<S>,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
) -> SchedulerHandle {
    let (submissions, inbox) = mpsc::unbounded_channel();
    // Present on /metrics from the start, not only after the first cancellation.
    record_cancelled(0);
    tokio::spawn(run(shard, SchedulerState::new(config, tokenizer), inbox));
    SchedulerHandle { submissions }
}

async fn run<S: Shard>(
    shard: Arc<S>,
    mut state: SchedulerState,
    mut inbox: mpsc::UnboundedReceiver<Submission>,
) {
    loop {
        // Sleep until a request arrives when idle; otherwise take whatever has queued up.
        if !state.has_work() {
            record_occupancy(state.occupancy());
            match inbox.recv().await {
                Some(submission) => state.enqueue(submission),
                None => return,
            }
            // Requests sent together reach the router a little apart (each is parsed and
            // tokenized first); waiting briefly lets a burst share one prefill step instead of
            // the late ones waiting a whole step for the next.
            let deadline = Instant::now() + BURST_WINDOW;
            loop {
                let wait = BURST_GAP.min(deadline.saturating_duration_since(Instant::now()));
                match tokio::time::timeout(wait, inbox.recv()).await {
                    Ok(Some(submission)) => state.enqueue(submission),
                    // Closed or quiet: go on with what has arrived.
                    Ok(None) | Err(_) => break,
                }
            }
        }
        while let Ok(submission) = inbox.try_recv() {
            state.enqueue(submission);
        }

        record_cancelled(state.reap_cancelled());
        let mut stats = StepStats::default();
        let Some(step) = state.build_step(&mut stats) else {
            // Nothing can run until a request arrives (the queue head waits for blocks only
            // while others run, and then there is a step).
            match inbox.recv().await {
                Some(submission) => state.enqueue(submission),
                None => return,
            }
            continue;
        };
        let tokens: usize = step.scheduled.iter().map(|s| s.num_tokens as usize).sum();
        let decodes = step.scheduled.len() - stats.prefill_chunks as usize;
        // The shards' spans of the step join the trace of its first request.
        let step_spans = state.step_spans(&step);
        let trace = step_spans
            .first()
            .map(trace::headers_for)
            .unwrap_or_default();
        let started = Instant::now();
        let succeeded = match shard.step(step, &trace).await {
            Ok(response) => {
                record_shard_timing(stats.method(), response.forward_ns, response.total_ns);
                // Before delivering: finished requests leave the batch there.
                state.register_computed_blocks();
                state.record_prompt_logprobs(response.prompt_logprobs);
                state.deliver(response.generations);
                true
            }
            Err(e) => {
                let message = e.to_string();
                tracing::error!(error = %message, "step failed");
                state.fail_running(&message);
                if let Err(e) = shard.clear_cache().await {
                    tracing::error!(error = %e, "clearing the shards' cache failed");
                }
                false
            }
        };
        record_step(
            &stats,
            tokens,
            decodes,
            started.elapsed(),
            succeeded,
            state.occupancy(),
        );
        drop(step_spans);
    }
}
