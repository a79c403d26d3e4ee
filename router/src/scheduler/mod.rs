//! The scheduler: one task (an actor) that owns the queue, the running batch and the KV blocks
//! with the prefix cache, fed by a channel. Each loop turn it builds one step (decodes first,
//! then prompt chunks under the token budget, preempting when blocks run out), runs it on the
//! shards, and sends every request its new token.

mod batcher;
mod entry;
mod metrics;
mod step_builder;

pub use batcher::spawn_scheduler;

use std::future::Future;

use tokio::sync::mpsc;

use crate::client::{ClientError, ShardedClient};
use crate::pb;
use crate::validation::ValidRequest;

/// What the scheduler needs from the shards; `ShardedClient` in production, a fake in tests.
pub trait Shard: Send + Sync + 'static {
    fn step(
        &self,
        request: pb::StepRequest,
    ) -> impl Future<Output = Result<pb::StepResponse, ClientError>> + Send;
    fn clear_cache(&self) -> impl Future<Output = Result<(), ClientError>> + Send;
}

impl Shard for ShardedClient {
    async fn step(&self, request: pb::StepRequest) -> Result<pb::StepResponse, ClientError> {
        ShardedClient::step(self, request).await
    }

    async fn clear_cache(&self) -> Result<(), ClientError> {
        ShardedClient::clear_cache(self).await
    }
}

/// Budgets one step is built under.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens processed in one step: one per decode plus prompt chunks.
    pub max_batch_tokens: u32,
    /// Requests in one step.
    pub max_batch_size: usize,
    pub num_blocks: u32,
    pub block_size: u32,
    pub prefix_caching: bool,
}

/// Why a shard stopped a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardFinish {
    EosToken,
    Length,
}

/// One generated token, as the scheduler hands it to the request's task.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    pub logprob: f32,
    pub finish: Option<ShardFinish>,
    /// Prompt tokens the request found in the prefix cache when it was admitted.
    pub cached_prompt_tokens: u32,
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
}

impl SchedulerHandle {
    /// Queues a request. Dropping the returned receiver cancels it: the scheduler frees it
    /// at its next step.
    pub fn submit(&self, request: ValidRequest) -> Result<EventReceiver, SchedulerError> {
        let (events, receiver) = mpsc::unbounded_channel();
        self.submissions
            .send(entry::Submission { request, events })
            .map_err(|_| SchedulerError::Closed)?;
        Ok(receiver)
    }
}

#[cfg(test)]
mod tests;
