//! What the scheduler reports on `/metrics`: TGI's metric names where TGI has one, `sluice_*`
//! for what only Sluice does (preemption, prefix cache, chunked prefill, cancellations, shard
//! restarts). It
//! reads plain counts, so it depends on no other part of the scheduler.

use std::time::Duration;

/// Counts gathered while one step is built.
#[derive(Debug, Default)]
pub(super) struct StepStats {
    pub prefill_chunks: u64,
    /// Prompt tokens computed (not served from the prefix cache), recomputations included.
    pub prefill_tokens: u64,
    pub preemptions: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
}

impl StepStats {
    /// TGI's `method` label: a step that computes any prompt tokens is a prefill.
    pub fn method(&self) -> &'static str {
        if self.prefill_chunks > 0 {
            "prefill"
        } else {
            "decode"
        }
    }
}

/// The queue, the batch and the KV pool at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Occupancy {
    pub waiting: usize,
    pub running: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_cached: usize,
    pub kv_blocks_total: usize,
    pub block_size: usize,
}

/// One step's counts and time; `succeeded`: the shards answered it.
pub(super) fn record_step(
    stats: &StepStats,
    tokens: usize,
    decodes: usize,
    duration: Duration,
    succeeded: bool,
    occupancy: Occupancy,
) {
    let method = stats.method();
    let sequences = stats.prefill_chunks as usize + decodes;
    metrics::counter!("tgi_batch_inference_count", "method" => method).increment(1);
    if succeeded {
        metrics::counter!("tgi_batch_inference_success", "method" => method).increment(1);
    }
    metrics::histogram!("tgi_batch_inference_duration", "method" => method)
        .record(duration.as_secs_f64());
    metrics::histogram!("tgi_batch_next_size").record(sequences as f64);
    metrics::counter!("sluice_steps_total").increment(1);
    metrics::counter!("sluice_prefill_chunks_total").increment(stats.prefill_chunks);
    metrics::counter!("sluice_prefill_tokens_total").increment(stats.prefill_tokens);
    metrics::counter!("sluice_decode_tokens_total").increment(decodes as u64);
    metrics::counter!("sluice_preemptions_total").increment(stats.preemptions);
    metrics::counter!("sluice_prompt_tokens_total").increment(stats.prompt_tokens);
    metrics::counter!("sluice_prefix_cache_hit_tokens_total").increment(stats.cached_prompt_tokens);
    metrics::histogram!("sluice_step_tokens").record(tokens as f64);
    record_occupancy(occupancy);
}

pub(super) fn record_occupancy(occupancy: Occupancy) {
    metrics::gauge!("tgi_queue_size").set(occupancy.waiting as f64);
    metrics::gauge!("tgi_batch_current_size").set(occupancy.running as f64);
    // The tokens the batch holds in the KV cache.
    metrics::gauge!("tgi_batch_current_max_tokens")
        .set((occupancy.kv_blocks_used * occupancy.block_size) as f64);
    metrics::gauge!("sluice_kv_blocks_used").set(occupancy.kv_blocks_used as f64);
    metrics::gauge!("sluice_kv_blocks_cached").set(occupancy.kv_blocks_cached as f64);
    metrics::gauge!("sluice_kv_blocks_total").set(occupancy.kv_blocks_total as f64);
}

/// Requests dropped because their client went away (not those that ended by themselves).
pub(super) fn record_cancelled(requests: usize) {
    metrics::counter!("sluice_requests_cancelled_total").increment(requests as u64);
}

/// Times the router found the shards restarted and warmed them up again.
pub(super) fn record_shard_restarts(restarts: u64) {
    metrics::counter!("sluice_shard_restarts_total").increment(restarts);
}

/// The shard's own account of a step: the model forward, and the whole step on the shard.
pub(super) fn record_shard_timing(method: &'static str, forward_ns: u64, total_ns: u64) {
    metrics::histogram!("tgi_batch_forward_duration", "method" => method)
        .record(forward_ns as f64 / 1e9);
    metrics::histogram!("sluice_shard_forward_duration").record(forward_ns as f64 / 1e9);
    metrics::histogram!("sluice_shard_step_duration").record(total_ns as f64 / 1e9);
}
