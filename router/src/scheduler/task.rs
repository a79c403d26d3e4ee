//! The scheduler task: the continuous-batching loop. Requests that arrive while a step runs
//! join the batch at the next step; finished and cancelled requests leave it.
//!
//! Steps overlap (`SchedulerConfig::overlap_steps`): step N + 1 is built and sent while step N
//! runs, and N's answer is handled while N + 1 runs, so the shards do not wait for the router
//! between steps. N + 1 is built without N's tokens: a request that N samples for is decoded
//! in N + 1 all the same (the shards hold the token; `Entry::awaiting` counts it), unless N
//! ends it by length. A request that N ends otherwise (end of sequence, stop sequence) runs
//! once more in N + 1 for nothing, and its token is dropped. A request that arrives while N
//! runs joins N + 2.
//!
//! When a step fails, its requests fail and the shards are asked to forget everything. Shards
//! that do not answer are waited for (a launcher restarts shards that die) while queued
//! requests are held; restarted shards are warmed up again and the queue goes on. An idle
//! scheduler checks the shards now and then, so that shards restarted between requests are
//! warmed up before the next request needs them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use sluice_client::{pb, ClientError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Span;

use super::entry::Submission;
use super::metrics::{
    record_cancelled, record_occupancy, record_shard_restarts, record_shard_timing, record_step,
    StepStats,
};
use super::state::{scheduled_tokens, SchedulerState};
use super::{Activity, SchedulerConfig, SchedulerHandle};
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
    let activity = Activity::new();
    let seen = activity.clone();
    let task = tokio::spawn(async move {
        let result = run(shard, &mut state, inbox, &activity).await;
        if let Err(lost) = &result {
            tracing::error!("{lost}");
            state.fail_all(&lost.to_string());
        }
        result
    });
    (
        SchedulerHandle {
            submissions,
            activity: seen,
        },
        task,
    )
}

/// A step sent to the shards whose answer the scheduler has not handled yet.
struct SentStep {
    answer: BoxFuture<'static, Result<pb::StepResponse, ClientError>>,
    /// (request id, tokens) of each request it runs.
    scheduled: Vec<(u64, u32)>,
    stats: StepStats,
    sent: Instant,
    /// Open until the answer is handled.
    spans: Vec<Span>,
}

async fn run<S: Shard>(
    shard: Arc<S>,
    state: &mut SchedulerState,
    mut inbox: mpsc::UnboundedReceiver<Submission>,
    activity: &Activity,
) -> Result<(), ShardsLost> {
    let mut in_flight: Option<SentStep> = None;
    // When the last answer came: a step sent before it started running only then.
    let mut last_answer = Instant::now();
    loop {
        // Sleep until a request arrives when idle; otherwise take whatever has queued up.
        if in_flight.is_none() && !state.has_work() {
            record_occupancy(state.occupancy());
            activity.idle();
            match wait_for_submission(&*shard, state, &mut inbox, activity).await? {
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

        // Overlapped, the next step goes out while the one in flight runs: the shards start it
        // as soon as they answer, instead of waiting for the router to handle the answer and
        // build it.
        let next = if in_flight.is_none() || state.config.overlap_steps {
            send_next(&*shard, state)
        } else {
            None
        };
        let Some(sent) = in_flight.take() else {
            match next {
                Some(next) => {
                    activity.progressed();
                    in_flight = Some(next);
                }
                // Nothing can run until a request arrives (the queue head waits for blocks
                // only while others run, and then there is a step).
                None => {
                    activity.idle();
                    match inbox.recv().await {
                        Some(submission) => state.enqueue(submission),
                        None => return Ok(()),
                    }
                }
            }
            continue;
        };
        let started = sent.sent.max(last_answer);
        let result = sent.answer.await;
        last_answer = Instant::now();
        let succeeded = result.is_ok();
        let decodes = sent.scheduled.len() - sent.stats.prefill_chunks as usize;
        match result {
            Ok(response) => {
                activity.progressed();
                record_shard_timing(sent.stats.method(), response.forward_ns, response.total_ns);
                state.step_times.observe(
                    decodes,
                    sent.stats.prefill_tokens as usize,
                    Duration::from_nanos(response.total_ns),
                );
                state.finish_step(&sent.scheduled, response);
                in_flight = next;
            }
            Err(e) => {
                // Before the failed requests hear of it: /health answers 503 from now on.
                activity.set_recovering(true);
                let message = e.to_string();
                tracing::error!(error = %message, "step failed");
                // The step sent after it ran on shards in an unknown state, if at all: its
                // answer is waited for and dropped, and its requests fail too.
                if let Some(next) = next {
                    let _ = next.answer.await;
                }
                state.fail_running(&message);
                recover(&*shard, state, activity).await?;
            }
        }
        let tokens = sent.scheduled.iter().map(|&(_, n)| n as usize).sum();
        record_step(
            &sent.stats,
            tokens,
            decodes,
            last_answer - started,
            succeeded,
            state.occupancy(),
        );
        drop(sent.spans);
    }
}

/// Builds the next step and sends it; `None` if there is nothing to send.
fn send_next<S: Shard>(shard: &S, state: &mut SchedulerState) -> Option<SentStep> {
    let mut stats = StepStats::default();
    let step = state.build_step(&mut stats)?;
    let scheduled = scheduled_tokens(&step);
    // The shards' spans of the step join the trace of its first request.
    let spans = state.step_spans(&step);
    let trace = spans.first().map(trace::headers_for).unwrap_or_default();
    Some(SentStep {
        answer: Box::pin(shard.send_step(step, &trace)),
        scheduled,
        stats,
        sent: Instant::now(),
        spans,
    })
}

/// The next submission (None: every handle is gone), checking the shards while none comes.
async fn wait_for_submission<S: Shard>(
    shard: &S,
    state: &mut SchedulerState,
    inbox: &mut mpsc::UnboundedReceiver<Submission>,
    activity: &Activity,
) -> Result<Option<Submission>, ShardsLost> {
    loop {
        tokio::select! {
            submission = inbox.recv() => return Ok(submission),
            () = tokio::time::sleep(IDLE_CHECK_INTERVAL) => {
                if !shard.is_ready().await {
                    recover(shard, state, activity).await?;
                }
            }
        }
    }
}

/// Brings the shards back after a failure, with nothing running; queued requests wait.
async fn recover<S: Shard>(
    shard: &S,
    state: &mut SchedulerState,
    activity: &Activity,
) -> Result<(), ShardsLost> {
    activity.set_recovering(true);
    let recovered = shard.recover().await;
    activity.set_recovering(false);
    match recovered? {
        Recovery::Kept => {}
        Recovery::Restarted => {
            state.forget_cached_blocks();
            record_shard_restarts(1);
            tracing::info!("the shards are back after a restart");
        }
    }
    Ok(())
}
