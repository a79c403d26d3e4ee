//! What the scheduler reports on `/metrics`: TGI's metric names where TGI has one, `sluice_*`
//! for what only Sluice does (preemption, prefix cache, chunked prefill).

use std::time::Duration;

use super::step_builder::SchedulerState;

/// Counts gathered while one step is built.
#[derive(Debug, Default)]
pub(super) struct StepStats {
    pub prefill_chunks: u64,
    pub preemptions: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
}

pub(super) fn record_step(
    state: &SchedulerState,
    stats: &StepStats,
    tokens: usize,
    decodes: usize,
    duration: Duration,
) {
    metrics::counter!("sluice_steps_total").increment(1);
    metrics::counter!("sluice_prefill_chunks_total").increment(stats.prefill_chunks);
    metrics::counter!("sluice_decode_tokens_total").increment(decodes as u64);
    metrics::counter!("sluice_preemptions_total").increment(stats.preemptions);
    metrics::counter!("sluice_prompt_tokens_total").increment(stats.prompt_tokens);
    metrics::counter!("sluice_prefix_cache_hit_tokens_total").increment(stats.cached_prompt_tokens);
    metrics::histogram!("sluice_step_tokens").record(tokens as f64);
    metrics::histogram!("tgi_batch_inference_duration").record(duration.as_secs_f64());
    record_occupancy(state);
}

/// Gauges of the queue, the batch and the KV pool.
pub(super) fn record_occupancy(state: &SchedulerState) {
    metrics::gauge!("tgi_queue_size").set(state.waiting.len() as f64);
    metrics::gauge!("tgi_batch_current_size").set(state.running.len() as f64);
    metrics::gauge!("sluice_kv_blocks_used").set(state.kv.num_used() as f64);
    metrics::gauge!("sluice_kv_blocks_cached").set(state.kv.num_cached() as f64);
    metrics::gauge!("sluice_kv_blocks_total").set(state.kv.num_blocks() as f64);
}

/// The shard's own account of a step: the model forward, and the whole step on the shard.
pub(super) fn record_shard_timing(forward_ns: u64, total_ns: u64) {
    metrics::histogram!("sluice_shard_forward_duration").record(forward_ns as f64 / 1e9);
    metrics::histogram!("sluice_shard_step_duration").record(total_ns as f64 / 1e9);
}
