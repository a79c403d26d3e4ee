//! sluice-client: the router-shard contract and the clients that speak it. `pb` holds the
//! messages generated from proto/generate.proto; `ShardClient` talks to one shard at its
//! `ShardAddress` (a unix socket, or TCP for a rank on another machine) and `ShardedClient`
//! sends the same call to every rank and returns rank 0's answer.
//! The router schedules through it and the launcher health-checks shards with it.

mod address;
pub mod pb;
mod shard;
mod sharded;

pub use address::ShardAddress;
pub use shard::ShardClient;
pub use sharded::ShardedClient;

/// W3C trace context (`traceparent`, `tracestate`) for a step's `trace_context`, so that the
/// shard's spans join the router's trace. Empty when nothing is traced.
pub type TraceHeaders = std::collections::HashMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to shard at {address}: {source}")]
    Connect {
        address: ShardAddress,
        source: tonic::transport::Error,
    },
    #[error("shard call failed ({:?}): {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("no shard to talk to")]
    NoShards,
    #[error("the shard ended its step stream without answering the step")]
    StepStreamEnded,
}

impl ClientError {
    /// The shard answered that it has not been warmed up: it restarted since the router's
    /// warmup.
    pub fn is_not_warmed_up(&self) -> bool {
        matches!(self, Self::Rpc(status) if status.code() == tonic::Code::FailedPrecondition)
    }
}
