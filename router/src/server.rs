//! Startup: connect to the shards, learn the model, warm up and size the KV cache, start the
//! scheduler, then serve HTTP until SIGINT/SIGTERM (in-flight requests drain first, see
//! `drain.rs`), or until the scheduler finds restarted shards it cannot use.

use std::sync::Arc;

use anyhow::{bail, Context};
use sluice_client::{pb, ShardedClient};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use crate::args::RouterArgs;
use crate::drain::{Drain, Draining};
use crate::http::{self, types::Info, AppState};
use crate::limits::RequestedLimits;
use crate::scheduler::{spawn_scheduler, SchedulerConfig};
use crate::shard::Shards;
use crate::telemetry;
use crate::tokenizer::chat_template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::validation::{ValidationConfig, Validator};

pub async fn run(args: RouterArgs) -> anyhow::Result<()> {
    if args.api_key.as_deref() == Some("") {
        bail!("--api-key is empty: give a key, or leave it unset to serve without one");
    }
    let tokenizer = Arc::new(Tokenizer::from_path(&args.tokenizer_name)?);
    // Before connecting to the shards: a template that does not compile stops the router here.
    let chat_template = ChatTemplate::from_model_dir(&args.tokenizer_name)?.map(Arc::new);
    if chat_template.is_none() {
        tracing::warn!("the model has no chat template: /v1/chat/completions will answer 422");
    }
    let shards = ShardedClient::connect(&args.shard_address).await?;
    let model = shards
        .info()
        .await
        .context("asking the shard for model info")?;
    let requested_limits = RequestedLimits {
        max_input_tokens: args.max_input_tokens,
        max_total_tokens: args.max_total_tokens,
    };
    let context = model.max_position_embeddings as usize;
    let longest_sequence = requested_limits.sequence_to_size_for(context)?;

    let max_batch_size = args.max_batch_size.unwrap_or(args.max_concurrent_requests);
    let warmup_request = pb::WarmupRequest {
        max_prefill_tokens: args.max_batch_prefill_tokens,
        max_batch_size: max_batch_size as u32,
        max_total_tokens: longest_sequence as u32,
        num_blocks: 0,
    };
    let warmup = shards
        .warmup(warmup_request)
        .await
        .context("warming up the shards")?;
    let num_blocks = match args.max_batch_total_tokens {
        Some(cap) if cap > warmup.num_blocks * warmup.block_size => bail!(
            "--max-batch-total-tokens ({cap}) does not fit in the KV cache, which holds {} tokens",
            warmup.num_blocks * warmup.block_size
        ),
        Some(cap) => cap / warmup.block_size,
        None => warmup.num_blocks,
    };
    let max_batch_total_tokens = num_blocks * warmup.block_size;
    let limits = requested_limits.resolve(context, max_batch_total_tokens as usize)?;
    tracing::info!(
        model_type = %model.model_type,
        num_blocks,
        block_size = warmup.block_size,
        max_batch_total_tokens,
        max_input_tokens = limits.max_input_tokens,
        max_total_tokens = limits.max_total_tokens,
        max_batch_prefill_tokens = args.max_batch_prefill_tokens,
        max_decode_stall_ms = args.max_decode_stall_ms,
        dtype = %model.dtype,
        device = %model.device,
        eos_token_ids = ?model.eos_token_ids,
        "shards ready"
    );

    // Before the scheduler starts, which registers its metrics.
    let metrics = telemetry::prometheus_builder(limits.max_input_tokens, limits.max_total_tokens)?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let (scheduler, scheduler_task) = spawn_scheduler(
        Arc::new(Shards::new(
            shards.clone(),
            warmup_request,
            num_blocks,
            warmup.block_size,
        )),
        tokenizer.clone(),
        SchedulerConfig {
            max_batch_tokens: args.max_batch_prefill_tokens,
            max_batch_size,
            num_blocks,
            block_size: warmup.block_size,
            prefix_caching: args.prefix_caching,
            overlap_steps: args.overlap_steps,
            max_decode_stall: (args.max_decode_stall_ms > 0)
                .then(|| Duration::from_millis(args.max_decode_stall_ms)),
            eos_token_ids: model.eos_token_ids.clone(),
        },
    );
    let validator = Validator::new(
        tokenizer.clone(),
        ValidationConfig {
            max_input_tokens: limits.max_input_tokens,
            max_total_tokens: limits.max_total_tokens,
            max_stop_sequences: args.max_stop_sequences,
            max_top_n_tokens: args.max_top_n_tokens,
            max_best_of: args.max_best_of,
            vocab_size: model.vocab_size,
        },
    );
    let info = Info {
        model_id: args.model_id.clone(),
        model_dtype: model.dtype.clone(),
        model_device_type: model.device.clone(),
        max_concurrent_requests: args.max_concurrent_requests,
        max_best_of: args.max_best_of as usize,
        max_stop_sequences: args.max_stop_sequences,
        max_input_tokens: limits.max_input_tokens,
        max_total_tokens: limits.max_total_tokens,
        validation_workers: tokio::runtime::Handle::current().metrics().num_workers(),
        max_client_batch_size: args.max_client_batch_size,
        max_batch_total_tokens,
        max_batch_size: args.max_batch_size,
        block_size: warmup.block_size,
        num_kv_blocks: num_blocks,
        prefix_caching: args.prefix_caching,
        version: env!("CARGO_PKG_VERSION"),
        router: "sluice-router",
    };
    let edges = http::Edges {
        api_key: args.api_key.as_deref().map(http::auth::ApiKey::new),
        payload_limit: args.payload_limit,
        cors: http::cors::cors_layer(&args.cors_allow_origin)
            .context("--cors-allow-origin: not a valid origin")?,
    };
    let draining = Draining::default();
    let admission = Arc::new(Semaphore::new(args.max_concurrent_requests));
    let state = AppState {
        metrics,
        validator: Arc::new(validator),
        tokenizer,
        scheduler,
        admission: admission.clone(),
        draining: draining.clone(),
        request_ids: Arc::default(),
        shards,
        info: Arc::new(info),
        chat_template,
        started_at: http::openai::unix_seconds(),
    };

    let app = http::router(state, edges)?;
    let address = format!("{}:{}", args.hostname, args.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("binding {address}"))?;
    tracing::info!(address = %listener.local_addr()?, "router ready");
    let overdue = Arc::new(Notify::new());
    let drain = Drain {
        draining,
        admission,
        max_concurrent_requests: args.max_concurrent_requests,
        timeout: Duration::from_secs(args.graceful_termination_timeout),
        overdue: overdue.clone(),
    };
    tokio::select! {
        served = axum::serve(listener, app).with_graceful_shutdown(drain.on_signal()) => served?,
        () = overdue.notified() => {}
        ended = scheduler_task => match ended {
            Ok(Err(lost)) => return Err(lost).context("the shards cannot serve any more"),
            Ok(Ok(())) => bail!("the scheduler stopped"),
            Err(panicked) => bail!("the scheduler failed: {panicked}"),
        },
    }
    tracing::info!("router stopped");
    Ok(())
}
