//! The scheduler task: the continuous-batching loop. Requests that arrive while a step runs
//! join the batch at the next step; finished and cancelled requests leave it.
//!
//! When a step fails, its requests fail and the shards are asked to forget everything. Shards
//! that do not answer are waited for (a launcher restarts shards that die) while queued
//! requests are held; restarted shards are warmed up again and the queue goes on. An idle
//! scheduler checks the shards now and then, so that shards restarted between requests are
//! warmed up before the next request needs them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::entry::Submission;
use super::metrics::{
    record_cancelled, record_occupancy, record_shard_restarts, record_shard_timing, record_step,
    StepStats,
};
use super::state::SchedulerState;
use super::{SchedulerConfig, SchedulerHandle};
use crate::shard::{Recovery, Shard, ShardsLost};
use crate::tokenizer::Tokenizer;
use crate::trace;

/// When a request wakes an idle scheduler, it keeps collecting arrivals until none has come for
/// BURST_GAP, and for at most BURST_WINDOW, before building a step.
const BURST_GAP: Duration = Duration::from_millis(2);
const BURST_WINDOW: Duration = Duration::from_millis(10);
/// How often an idle scheduler checks that the shards are still ready.
const IDLE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Starts the scheduler task and returns the handle to submit requests with, and the task,
/// which ends only with the error that stopped it (the shards came back unusable) or when every
/// handle is dropped. The tokenizer turns the generated tokens into text, which stop sequences
/// are found in.
pub fn spawn_scheduler<S: Shard>(
    shard: Arc<S>,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
) -> (SchedulerHandle, JoinHandle<Result<(), ShardsLost>>) {
    let (submissions, inbox) = mpsc::unbounded_channel();
    // Present on /metrics from the start, not only after the first event.
    record_cancelled(0);
    record_shard_restarts(0);
    let mut state = SchedulerState::new(config, tokenizer);
    let task = tokio::spawn(async move {
        let result = run(shard, &mut state, inbox).await;
        if let Err(lost) = &result {
            tracing::error!("{lost}");
            state.fail_all(&lost.to_string());
        }
        result
    });
    (SchedulerHandle { submissions }, task)
}

async fn run<S: Shard>(
    shard: Arc<S>,
    state: &mut SchedulerState,
    mut inbox: mpsc::UnboundedReceiver<Submission>,
) -> Result<(), ShardsLost> {
    loop {
        // Sleep until a request arrives when idle; otherwise take whatever has queued up.
        if !state.has_work() {
            record_occupancy(state.occupancy());
            match wait_for_submission(&*shard, state, &mut inbox).await? {
                Some(submission) => state.enqueue(submission),
                None => return Ok(()),
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
                None => return Ok(()),
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
        let result = shard.step(step, &trace).await;
        let elapsed = started.elapsed();
        let succeeded = result.is_ok();
        match result {
            Ok(response) => {
                record_shard_timing(stats.method(), response.forward_ns, response.total_ns);
                // Before delivering: finished requests leave the batch there.
                state.register_computed_blocks();
                state.record_prompt_logprobs(response.prompt_logprobs);
                state.deliver(response.generations);
            }
            Err(e) => {
                let message = e.to_string();
                tracing::error!(error = %message, "step failed");
                state.fail_running(&message);
                recover(&*shard, state).await?;
            }
        }
        record_step(
            &stats,
            tokens,
            decodes,
            elapsed,
            succeeded,
            state.occupancy(),
        );
        drop(step_spans);
    }
}

/// The next submission (None: every handle is gone), checking the shards while none comes.
async fn wait_for_submission<S: Shard>(
    shard: &S,
    state: &mut SchedulerState,
    inbox: &mut mpsc::UnboundedReceiver<Submission>,
) -> Result<Option<Submission>, ShardsLost> {
    loop {
        tokio::select! {
            submission = inbox.recv() => return Ok(submission),
            () = tokio::time::sleep(IDLE_CHECK_INTERVAL) => {
                if !shard.is_ready().await {
                    recover(shard, state).await?;
                }
            }
        }
    }
}

/// Brings the shards back after a failure, with nothing running; queued requests wait.
async fn recover<S: Shard>(shard: &S, state: &mut SchedulerState) -> Result<(), ShardsLost> {
    match shard.recover().await? {
        Recovery::Kept => {}
        Recovery::Restarted => {
            state.forget_cached_blocks();
            record_shard_restarts(1);
            tracing::info!("the shards are back after a restart");
        }
    }
    Ok(())
}
