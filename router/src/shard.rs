//! The shard-client edge: the `Shard` trait the scheduler runs its steps through, implemented by
//! `ShardedClient` (a fake in tests), and the conversion of domain parameters into the wire's.
//! Protobuf appears in the router only here and in the steps the scheduler builds.

use std::future::Future;

use sluice_client::{pb, ClientError, ShardedClient, TraceHeaders};

use crate::request::SamplingParameters;

/// What the scheduler needs from the shards.
pub trait Shard: Send + Sync + 'static {
    fn step(
        &self,
        request: pb::StepRequest,
        trace: &TraceHeaders,
    ) -> impl Future<Output = Result<pb::StepResponse, ClientError>> + Send;
    fn clear_cache(&self) -> impl Future<Output = Result<(), ClientError>> + Send;
}

impl Shard for ShardedClient {
    async fn step(
        &self,
        request: pb::StepRequest,
        trace: &TraceHeaders,
    ) -> Result<pb::StepResponse, ClientError> {
        ShardedClient::step(self, request, trace).await
    }

    async fn clear_cache(&self) -> Result<(), ClientError> {
        ShardedClient::clear_cache(self).await
    }
}

impl From<&SamplingParameters> for pb::SamplingParameters {
    fn from(sampling: &SamplingParameters) -> Self {
        Self {
            temperature: sampling.temperature,
            top_k: sampling.top_k,
            top_p: sampling.top_p,
            do_sample: sampling.do_sample,
            seed: sampling.seed,
            repetition_penalty: sampling.repetition_penalty,
            typical_p: sampling.typical_p,
            min_p: sampling.min_p,
            frequency_penalty: sampling.frequency_penalty,
            presence_penalty: sampling.presence_penalty,
        }
    }
}
