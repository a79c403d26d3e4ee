//! The scheduler: one task (an actor) that owns the queue, the running batch and the KV blocks
//! with the prefix cache, fed by a channel. Each loop turn it builds one step (the running
//! requests first, then admissions from the queue under the token budget, preempting when
//! blocks run out), runs it on the shards, hands every request its new token, and ends the
//! requests that are done (see `generation::StopCriteria`): the shards forget them through the
//! next step's `free_ids`. With overlapped steps, the next step is built and sent before the
//! answer to the one in flight is handled (`task`).
//!
//! A request for several sequences (`best_of`, `n`) becomes one entry per sequence. The first is
//! queued; its siblings wait as forks until it has computed its prompt, then start from the
//! prompt's blocks in the prefix cache, so the prompt is computed once.
//!
//! - `task`: the loop.
//! - `state`: the queue, the running batch, the KV blocks, and what a step's answer does to them.
//! - `step_builder`: building one step.
//! - `entry`: one request's state.
//! - `step_times`: how long steps take, for keeping prompt chunks within
//!   `SchedulerConfig::max_decode_stall`.
//! - `metrics`: what the scheduler reports on `/metrics`.

mod entry;
mod metrics;
mod state;
mod step_builder;
mod step_times;
mod task;

pub use task::spawn_scheduler;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::request::{GenerationEnd, GenerationRequest, Token};

/// Budgets one step is built under, and the model facts the scheduler stops requests by.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens processed in one step: one per decode plus prompt chunks.
    pub max_batch_tokens: u32,
    /// Requests in one step.
    pub max_batch_size: usize,
    pub num_blocks: u32,
    pub block_size: u32,
    pub prefix_caching: bool,
    /// Build and send each step while the one before it runs (see `task`).
    pub overlap_steps: bool,
    /// While requests decode, the longest a step should take: prompt chunks are cut to what
    /// recent steps say fits (see `step_times`). None: only `max_batch_tokens` limits them.
    pub max_decode_stall: Option<Duration>,
    /// The model's end-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
}

/// One generated token, as the scheduler hands it to the request's task.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub token: Token,
    /// The most likely tokens at this position, most likely first (`top_n_tokens` of them).
    pub top_tokens: Vec<Token>,
    /// Set on the request's last token.
    pub end: Option<GenerationEnd>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SchedulerError {
    #[error("request failed during generation: {0}")]
    Generation(String),
    #[error("the scheduler is shut down")]
    Closed,
}

pub type EventReceiver = mpsc::UnboundedReceiver<Result<TokenEvent, SchedulerError>>;

/// A cheap, cloneable way to submit requests to the scheduler task.
#[derive(Clone)]
pub struct SchedulerHandle {
    submissions: mpsc::UnboundedSender<entry::Submission>,
    activity: Activity,
}

impl SchedulerHandle {
    /// Queues a request: one receiver per sequence it asked for. Dropping a receiver cancels
    /// its sequence: the scheduler frees it at its next step.
    pub fn submit(&self, request: GenerationRequest) -> Result<Vec<EventReceiver>, SchedulerError> {
        let (senders, receivers) = (0..request.sequences.max(1))
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        self.submissions
            .send(entry::Submission {
                request,
                events: senders,
                queued: Instant::now(),
                span: tracing::Span::current(),
            })
            .map_err(|_| SchedulerError::Closed)?;
        Ok(receivers)
    }

    /// What the scheduler last saw of the shards. Shards answer no call while a step or a
    /// warmup runs, so this is what tells their health while they work.
    pub fn shards_seen(&self) -> ShardsSeen {
        self.activity.seen()
    }
}

/// What the scheduler last saw of the shards, as `/health` reads it (`SchedulerHandle::shards_seen`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ShardsSeen {
    /// Being waited for, or warmed up again, after a failure.
    Recovering,
    /// Running steps: the last step was answered (or sent to idle shards) this long ago.
    Working { since_progress: Duration },
    /// No step in flight.
    Idle,
}

/// Kept by the scheduler task, read by the handles.
#[derive(Clone)]
struct Activity(Arc<ActivityState>);

struct ActivityState {
    origin: Instant,
    recovering: AtomicBool,
    working: AtomicBool,
    /// The last step answered, or sent to idle shards, in ms since `origin`.
    progress_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self(Arc::new(ActivityState {
            origin: Instant::now(),
            recovering: AtomicBool::new(false),
            working: AtomicBool::new(false),
            progress_ms: AtomicU64::new(0),
        }))
    }

    fn seen(&self) -> ShardsSeen {
        if self.0.recovering.load(Ordering::Relaxed) {
            ShardsSeen::Recovering
        } else if self.0.working.load(Ordering::Relaxed) {
            let progress = Duration::from_millis(self.0.progress_ms.load(Ordering::Relaxed));
            ShardsSeen::Working {
                since_progress: self.0.origin.elapsed().saturating_sub(progress),
            }
        } else {
            ShardsSeen::Idle
        }
    }

    fn set_recovering(&self, recovering: bool) {
        self.0.recovering.store(recovering, Ordering::Relaxed);
    }

    /// A step was sent to idle shards, or one was answered.
    fn progressed(&self) {
        let now = self.0.origin.elapsed().as_millis();
        self.0
            .progress_ms
            .store(u64::try_from(now).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.0.working.store(true, Ordering::Relaxed);
    }

    fn idle(&self) {
        self.0.working.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod fake_shard;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
