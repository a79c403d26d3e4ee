//! Fan-out over all ranks: every rank runs the same step, rank 0 answers for all of them.

use std::future::Future;

use futures::future::try_join_all;

use crate::pb;
use crate::{ClientError, ShardAddress, ShardClient, TraceHeaders};

#[derive(Clone, Debug)]
pub struct ShardedClient {
    shards: Vec<ShardClient>,
}

impl ShardedClient {
    /// Connects to every rank, rank 0 first.
    pub async fn connect(addresses: &[ShardAddress]) -> Result<Self, ClientError> {
        if addresses.is_empty() {
            return Err(ClientError::NoShards);
        }
        let shards = try_join_all(addresses.iter().map(ShardClient::connect)).await?;
        Ok(Self { shards })
    }

    fn master(&self) -> &ShardClient {
        // `connect` refuses an empty list, so rank 0 always exists.
        &self.shards[0]
    }

    pub async fn info(&self) -> Result<pb::InfoResponse, ClientError> {
        self.master().info().await
    }

    /// Healthy when every rank is; warmed up when every rank is.
    pub async fn health(&self) -> Result<pb::HealthResponse, ClientError> {
        let answers = try_join_all(self.shards.iter().map(|s| s.health())).await?;
        Ok(pb::HealthResponse {
            warmed_up: answers.iter().all(|a| a.warmed_up),
        })
    }

    pub async fn warmup(
        &self,
        request: pb::WarmupRequest,
    ) -> Result<pb::WarmupResponse, ClientError> {
        let answers = try_join_all(self.shards.iter().map(|s| s.warmup(request))).await?;
        // Every rank sizes its cache the same way; the smallest pool bounds them all.
        answers
            .into_iter()
            .min_by_key(|a| a.num_blocks)
            .ok_or(ClientError::NoShards)
    }

    /// Queues the step on every rank now (see `ShardClient::send_step`); the future gives rank
    /// 0's answer once every rank has answered.
    pub fn send_step(
        &self,
        request: pb::StepRequest,
        trace: &TraceHeaders,
    ) -> impl Future<Output = Result<pb::StepResponse, ClientError>> + Send + 'static {
        let answers: Vec<_> = self
            .shards
            .iter()
            .map(|s| s.send_step(request.clone(), trace))
            .collect();
        async move {
            let mut answers = try_join_all(answers).await?;
            Ok(answers.swap_remove(0))
        }
    }

    pub async fn clear_cache(&self) -> Result<(), ClientError> {
        try_join_all(self.shards.iter().map(|s| s.clear_cache())).await?;
        Ok(())
    }
}
