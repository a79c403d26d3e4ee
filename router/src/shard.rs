//! The shard-client edge: the `Shard` trait the scheduler runs its steps through, implemented by
//! `Shards` (a fake in tests), and the conversion of domain parameters into the wire's.
//! Protobuf appears in the router only here and in the steps the scheduler builds.

use std::future::Future;
use std::time::Duration;

use sluice_client::{pb, ClientError, ShardedClient, TraceHeaders};
use tokio::time::{timeout, Instant};

use crate::request::SamplingParameters;

/// How often the shards are asked whether they are back, and how long one answer may take.
const RECOVERY_POLL_INTERVAL: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// While the shards stay away, a line in the log this often.
const RECOVERY_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// What the scheduler needs from the shards.
pub trait Shard: Send + Sync + 'static {
    /// Queues a step now, behind the steps sent before it (the shards run them in that order),
    /// and returns its answer's future, so the next step can be sent before this one's answer.
    fn send_step(
        &self,
        request: pb::StepRequest,
        trace: &TraceHeaders,
    ) -> impl Future<Output = Result<pb::StepResponse, ClientError>> + Send + 'static;
    /// Whether the shards can run a step: they answer and are warmed up.
    fn is_ready(&self) -> impl Future<Output = bool> + Send;
    /// After a failed step, or with shards found not ready: waits until the shards answer
    /// again, has them forget every request, and warms up shards that restarted.
    fn recover(&self) -> impl Future<Output = Result<Recovery, ShardsLost>> + Send;
}

/// What the shards were found in by `Shard::recover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The same processes, which kept their KV cache: the failure was the step's own.
    Kept,
    /// Restarted processes, warmed up again to the same number of KV blocks: every request
    /// and cached block they held is gone.
    Restarted,
}

/// Shards that came back but cannot serve as before; the router cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ShardsLost {
    #[error("warming up the restarted shards failed: {0}")]
    Warmup(ClientError),
    #[error("the restarted shards hold {got} KV blocks of {block_size} tokens, not {expected}")]
    CacheChanged {
        got: u32,
        expected: u32,
        block_size: u32,
    },
}

/// The shards as the scheduler uses them: the client, and the warmup that restarted shards
/// get, fixed to the KV cache's size at startup so that block ids keep their meaning.
pub struct Shards {
    client: ShardedClient,
    rewarm: pb::WarmupRequest,
    block_size: u32,
}

impl Shards {
    /// `warmup` is the startup's request and `num_blocks` what the router settled on.
    pub fn new(
        client: ShardedClient,
        warmup: pb::WarmupRequest,
        num_blocks: u32,
        block_size: u32,
    ) -> Self {
        Self {
            client,
            rewarm: pb::WarmupRequest {
                num_blocks,
                ..warmup
            },
            block_size,
        }
    }

    async fn rewarm(&self) -> Result<(), ShardsLost> {
        let warmed = self
            .client
            .warmup(self.rewarm)
            .await
            .map_err(ShardsLost::Warmup)?;
        if warmed.num_blocks != self.rewarm.num_blocks || warmed.block_size != self.block_size {
            return Err(ShardsLost::CacheChanged {
                got: warmed.num_blocks,
                expected: self.rewarm.num_blocks,
                block_size: warmed.block_size,
            });
        }
        Ok(())
    }
}

impl Shard for Shards {
    fn send_step(
        &self,
        request: pb::StepRequest,
        trace: &TraceHeaders,
    ) -> impl Future<Output = Result<pb::StepResponse, ClientError>> + Send + 'static {
        self.client.send_step(request, trace)
    }

    async fn is_ready(&self) -> bool {
        matches!(
            timeout(PROBE_TIMEOUT, self.client.health()).await,
            Ok(Ok(health)) if health.warmed_up
        )
    }

    async fn recover(&self) -> Result<Recovery, ShardsLost> {
        let started = Instant::now();
        let mut next_log = started;
        loop {
            let why = match self.probe().await {
                Probe::Kept => return Ok(Recovery::Kept),
                Probe::Restarted => {
                    tracing::warn!(
                        waited_s = started.elapsed().as_secs(),
                        "the shards restarted: warming them up again"
                    );
                    self.rewarm().await?;
                    return Ok(Recovery::Restarted);
                }
                Probe::Away(why) => why,
            };
            if Instant::now() >= next_log {
                tracing::warn!(
                    waited_s = started.elapsed().as_secs(),
                    "waiting for the shards to come back, holding queued requests: {why}"
                );
                next_log += RECOVERY_LOG_INTERVAL;
            }
            tokio::time::sleep(RECOVERY_POLL_INTERVAL).await;
        }
    }
}

/// What one look at the shards during a recovery found.
enum Probe {
    Kept,
    /// Every rank answers, and at least one has not been warmed up.
    Restarted,
    /// Not every rank answers, for this reason.
    Away(String),
}

impl Shards {
    /// Forgetting every request is needed either way, and its answer tells shards that kept
    /// their state from restarted ones. A restarted rank may answer before the others are up:
    /// the warmup waits until Health shows every rank answering.
    async fn probe(&self) -> Probe {
        let no_answer = || Probe::Away(format!("no answer within {}s", PROBE_TIMEOUT.as_secs()));
        match timeout(PROBE_TIMEOUT, self.client.clear_cache()).await {
            Ok(Ok(())) => Probe::Kept,
            Ok(Err(err)) if err.is_not_warmed_up() => {
                match timeout(PROBE_TIMEOUT, self.client.health()).await {
                    Ok(Ok(_)) => Probe::Restarted,
                    Ok(Err(err)) => Probe::Away(err.to_string()),
                    Err(_) => no_answer(),
                }
            }
            Ok(Err(err)) => Probe::Away(err.to_string()),
            Err(_) => no_answer(),
        }
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
