//! Command-line flags. Names and environment variables follow TGI's launcher, so a TGI
//! deployment keeps working when it switches to Sluice.

use std::fmt;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// The model served when `--model-id` is not given. It also works offline: see `model.rs`.
pub const DEFAULT_MODEL_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

#[derive(Debug, Clone, Parser)]
#[command(
    name = "sluice-launcher",
    version,
    about = "Start Sluice: model shards and the HTTP router"
)]
pub struct Args {
    /// A Hugging Face Hub model id (served from the Hugging Face cache, downloaded into it
    /// first unless HF_HUB_OFFLINE is set; HF_TOKEN for gated and private models), a local
    /// model directory with a config.json, or a local .gguf file.
    #[arg(long, env, default_value = DEFAULT_MODEL_ID)]
    pub model_id: String,

    /// The model revision on the Hub (a branch, tag or commit hash) [default: main].
    #[arg(long, env)]
    pub revision: Option<String>,

    /// The HTTP port the router listens on.
    #[arg(long, short, env, default_value_t = 3000)]
    pub port: u16,

    /// The address the router binds to.
    #[arg(long, env, default_value = "0.0.0.0")]
    pub hostname: String,

    /// The longest prompt accepted, in tokens [default: one less than --max-total-tokens].
    #[arg(long, env)]
    pub max_input_tokens: Option<usize>,

    /// The longest prompt plus generation, in tokens [default: the model's context length
    /// (max_position_embeddings), capped at what the KV cache holds].
    #[arg(long, env)]
    pub max_total_tokens: Option<usize>,

    /// Requests in flight beyond this are refused with 429.
    #[arg(long, env, default_value_t = 128)]
    pub max_concurrent_requests: usize,

    #[command(flatten)]
    pub request_limits: RequestLimits,

    /// The token budget of one scheduling step: decodes plus prompt chunks; longer prompts
    /// are prefilled over several steps [default: 562].
    #[arg(long, env)]
    pub max_batch_prefill_tokens: Option<usize>,

    /// The most requests in one step.
    #[arg(long, env)]
    pub max_batch_size: Option<usize>,

    /// While requests decode, cut prompt chunks so that a step is expected to take at most this
    /// many milliseconds, estimated from recent step times: about the longest a streaming
    /// request then waits between tokens while prompts are prefilled [default: off, chunks are
    /// limited by --max-batch-prefill-tokens alone].
    #[arg(long, env)]
    pub max_decode_stall_ms: Option<u64>,

    /// Caps the KV cache at this many tokens [default: what the shard's warmup sizes]. More
    /// than fits is an error at startup.
    #[arg(long, env)]
    pub max_batch_total_tokens: Option<u32>,

    /// Reuse the KV cache of shared prompt prefixes across requests.
    #[arg(long, env, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_caching: bool,

    /// Build and send each step while the one before it runs, so the shards do not wait for the
    /// router between steps. A request that arrives during a step then joins the one after next.
    #[arg(long, env, default_value_t = true, action = clap::ArgAction::Set)]
    pub overlap_steps: bool,

    /// Accepted for TGI compatibility, without effect: with chunked prefill every step admits
    /// waiting requests within the token budget, so there is no separate prefill batch to delay.
    #[arg(long, env)]
    pub max_waiting_tokens: Option<usize>,

    /// Accepted for TGI compatibility, without effect (see --max-waiting-tokens).
    #[arg(long, env)]
    pub waiting_served_ratio: Option<f32>,

    /// The dtype the shard loads the weights in [default: chosen by the shard].
    #[arg(long, env, value_enum)]
    pub dtype: Option<Dtype>,

    /// The memory given to the KV cache on CPU, e.g. "4GB" [default: chosen by the shard].
    #[arg(long, env)]
    pub kv_cache_memory: Option<String>,

    /// Store keys and values as 8-bit floats (divided by the checkpoint's KV scales where it has
    /// them): twice the tokens in the same memory and half the bytes a decode step reads, at some
    /// accuracy [default: the model's dtype].
    #[arg(long, env, value_enum)]
    pub kv_cache_dtype: Option<KvCacheDtype>,

    /// How many shards (processes, one per GPU on GPUs) this machine splits the model across
    /// with tensor parallelism [default: 1, or with --sharded true the number of
    /// CUDA_VISIBLE_DEVICES].
    #[arg(long, env)]
    pub num_shard: Option<usize>,

    /// Whether to split the model across shards; false with --num-shard above 1 is an error.
    #[arg(long, env)]
    pub sharded: Option<bool>,

    /// How many machines the model is split across: each runs a launcher with its
    /// --node-rank and --num-shard shards; the first also runs the router.
    #[arg(long, env, default_value_t = 1)]
    pub nnodes: usize,

    /// This machine's place among --nnodes (0: the first, which runs the router).
    #[arg(long, env, default_value_t = 0)]
    pub node_rank: usize,

    /// On the first node: the other nodes' addresses, in --node-rank order, where its router
    /// reaches their shards.
    #[arg(long, env, value_delimiter = ',')]
    pub worker_addresses: Vec<String>,

    /// On the other nodes: shard i listens for the router on TCP port --shard-port + i, bound to
    /// --hostname. The router's calls are not authenticated: a private network only.
    #[arg(long, env, default_value_t = 29600)]
    pub shard_port: u16,

    /// The address of rank 0, where the shards meet to form their process group.
    #[arg(long, env, default_value = "localhost")]
    pub master_addr: String,

    /// The port of rank 0's rendezvous.
    #[arg(long, env, default_value_t = 29500)]
    pub master_port: u16,

    /// The prefix of the shards' unix socket paths; shard N listens on `{path}-N`.
    #[arg(long, env, default_value = "/tmp/sluice-server")]
    pub shard_uds_path: String,

    /// How long a shard may take to load the model and answer its first health check.
    #[arg(long, env, default_value_t = 600)]
    pub shard_startup_timeout_s: u64,

    /// How many times a shard that dies is restarted (all ranks of this machine together)
    /// before the launcher gives up and exits; 0 stops everything at the first death. The
    /// router fails the requests of the step that was lost and holds the queue meanwhile.
    #[arg(long, env, default_value_t = 3)]
    pub max_shard_restarts: u32,

    /// The Hugging Face hub cache models are looked up in and downloaded into [default:
    /// HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub].
    #[arg(long, env = "HUGGINGFACE_HUB_CACHE")]
    pub huggingface_hub_cache: Option<PathBuf>,

    /// Accepted for TGI compatibility, without effect: Sluice serves supported architectures
    /// with its own code and never runs code from a model repository.
    #[arg(long, env)]
    pub trust_remote_code: bool,

    /// Log as JSON lines (the launcher and the router).
    #[arg(long, env)]
    pub json_output: bool,

    /// Requests to every route but /health, /info, /metrics and the API documentation must
    /// carry `Authorization: Bearer <key>`; others get 401.
    #[arg(long, env, hide_env_values = true)]
    pub api_key: Option<String>,

    /// The largest request body the router accepts, in bytes; a larger one gets 413.
    #[arg(long, env, default_value_t = 2_000_000)]
    pub payload_limit: usize,

    /// An origin browsers may call the API from (CORS); repeat the flag, or separate origins
    /// with commas, for several [default: none, no CORS headers].
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,

    /// On SIGTERM the router refuses new requests (503) and gives those in flight this many
    /// seconds to finish before it stops them.
    #[arg(long, env, default_value_t = 90)]
    pub graceful_termination_timeout: u64,

    /// Serve with PyTorch's operators instead of Sluice's compiled CPU kernels.
    #[arg(long, env)]
    pub disable_custom_kernels: bool,

    /// An OTLP/gRPC collector (e.g. `http://collector:4317`) the router and the shards export
    /// their traces to [default: none, no export].
    #[arg(long, env)]
    pub otlp_endpoint: Option<String>,

    /// The `service.name` of the router's spans; the shards' is the same with `.server` in
    /// place of a `.router` suffix.
    #[arg(long, env, default_value = "text-generation-inference.router")]
    pub otlp_service_name: String,

    /// Quantization: `awq`, `gptq` and `fp8` serve a checkpoint quantized with that method (one
    /// whose config.json names it is served quantized without the flag too); `fp8`,
    /// `bitsandbytes`, `bitsandbytes-nf4` and `bitsandbytes-fp4` quantize an unquantized
    /// checkpoint at load; `gguf` serves a GGUF model's Q4_0, Q4_1, Q8_0, Q4_K and Q6_K
    /// projections as they are stored; `eetq`, `exl2` and `marlin` are not built yet and are
    /// refused [default: the checkpoint's weights in --dtype, or as it is quantized].
    #[arg(long, env, value_enum)]
    pub quantize: Option<Quantize>,

    /// TGI's flags for features Sluice has not built: accepted when they ask for the default,
    /// refused at startup otherwise (see `unbuilt.rs` and docs/launcher.md).
    #[command(flatten)]
    pub unbuilt: UnbuiltFeatures,
}

/// TGI flags whose features Sluice does not have yet. Each is accepted at its default (what
/// Sluice does anyway) and refused otherwise, never silently ignored.
#[derive(clap::Args, Debug, Clone, Default, PartialEq)]
pub struct UnbuiltFeatures {
    /// Tokens to speculate per step [not built: 0].
    #[arg(long, env)]
    pub speculate: Option<usize>,

    /// Batch sizes to capture CUDA graphs for [not built: "0", none].
    #[arg(long, env, value_delimiter = ',')]
    pub cuda_graphs: Vec<usize>,

    /// Share of GPU memory to use [not built: 1.0].
    #[arg(long, env)]
    pub cuda_memory_fraction: Option<f32>,

    /// LoRA adapters to load [not built: none].
    #[arg(long, env)]
    pub lora_adapters: Option<String>,

    /// Rope scaling forced on the model [not built: the model's config.json].
    #[arg(long, env)]
    pub rope_scaling: Option<String>,

    /// Rope scaling factor [not built: the model's config.json].
    #[arg(long, env)]
    pub rope_factor: Option<f32>,

    /// Watermarking gamma [not built: none].
    #[arg(long, env)]
    pub watermark_gamma: Option<f32>,

    /// Watermarking delta [not built: none].
    #[arg(long, env)]
    pub watermark_delta: Option<f32>,

    /// Another directory for converted weights [not built: the Hugging Face cache].
    #[arg(long, env)]
    pub weights_cache_override: Option<String>,

    /// A tokenizer_config.json to read the chat template from [not built: the model's].
    #[arg(long, env)]
    pub tokenizer_config_path: Option<String>,

    /// Tokenizer workers in the router [not built: 2].
    #[arg(long, env)]
    pub validation_workers: Option<usize>,

    /// Port of a separate metrics server [not built: /metrics is served on --port].
    #[arg(long, env)]
    pub prometheus_port: Option<u16>,

    /// Disables grammar-constrained generation [grammars are not built: generation is never
    /// constrained, so true and false both hold].
    #[arg(long, env)]
    pub disable_grammar_support: bool,
}

impl Args {
    /// How many shards this machine starts, from --num-shard and --sharded as TGI reads them.
    pub fn shards_per_node(&self) -> Result<usize, String> {
        match (self.sharded, self.num_shard) {
            (_, Some(0)) => Err("--num-shard must be at least 1".to_owned()),
            (Some(false), Some(count)) if count > 1 => Err(format!(
                "--sharded false contradicts --num-shard {count}; drop one of them"
            )),
            (Some(true), Some(1)) => Err(
                "--sharded true needs more than one shard; --num-shard is 1".to_owned(),
            ),
            (_, Some(count)) => Ok(count),
            (Some(true), None) => visible_gpus()
                .filter(|&count| count > 1)
                .ok_or_else(|| {
                    "--sharded true without --num-shard needs CUDA_VISIBLE_DEVICES to name                      several GPUs; set --num-shard"
                        .to_owned()
                }),
            (_, None) => Ok(1),
        }
    }
}

/// The GPUs CUDA_VISIBLE_DEVICES names, if it is set.
fn visible_gpus() -> Option<usize> {
    let devices = std::env::var("CUDA_VISIBLE_DEVICES").ok()?;
    Some(devices.split(',').filter(|d| !d.trim().is_empty()).count())
}

/// TGI's quantization methods, and `gguf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Quantize {
    Awq,
    Eetq,
    Exl2,
    Gptq,
    Marlin,
    Bitsandbytes,
    BitsandbytesNf4,
    BitsandbytesFp4,
    Fp8,
    Gguf,
}

impl Quantize {
    pub fn is_built(self) -> bool {
        self == Quantize::Gguf || self.is_applied_by_shard()
    }

    /// Whether the shard applies the method (`sluice-server serve --quantize`): it checks a
    /// pre-quantized checkpoint's method against it, or quantizes an unquantized one at load
    /// (fp8, bitsandbytes'). `gguf` is the launcher's: it names the GGUF file instead.
    pub fn is_applied_by_shard(self) -> bool {
        matches!(
            self,
            Quantize::Awq
                | Quantize::Gptq
                | Quantize::Fp8
                | Quantize::Bitsandbytes
                | Quantize::BitsandbytesNf4
                | Quantize::BitsandbytesFp4
        )
    }
}

impl fmt::Display for Quantize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = self.to_possible_value().ok_or(fmt::Error)?;
        f.write_str(value.get_name())
    }
}

/// TGI's names for the 8-bit KV caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvCacheDtype {
    #[value(name = "fp8_e4m3fn")]
    Fp8E4m3fn,
    #[value(name = "fp8_e5m2")]
    Fp8E5m2,
}

impl fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvCacheDtype::Fp8E4m3fn => "fp8_e4m3fn",
            KvCacheDtype::Fp8E5m2 => "fp8_e5m2",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    Float32,
    Bfloat16,
    Float16,
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::Float32 => "float32",
            Dtype::Bfloat16 => "bfloat16",
            Dtype::Float16 => "float16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Reads a flag's declared default and environment variable, so the test does not
    /// depend on the environment it runs in (HOSTNAME is often set).
    fn declared(flag: &str) -> (Option<String>, Option<String>) {
        let command = Args::command();
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(flag))
            .unwrap_or_else(|| panic!("no flag --{flag}"));
        let default = arg
            .get_default_values()
            .first()
            .map(|value| value.to_string_lossy().into_owned());
        let env = arg.get_env().map(|env| env.to_string_lossy().into_owned());
        (default, env)
    }

    #[test]
    fn flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_and_environment_variables_match_tgi() {
        let expected = [
            ("model-id", Some(DEFAULT_MODEL_ID), "MODEL_ID"),
            ("revision", None, "REVISION"),
            ("port", Some("3000"), "PORT"),
            ("hostname", Some("0.0.0.0"), "HOSTNAME"),
            ("max-input-tokens", None, "MAX_INPUT_TOKENS"),
            ("max-total-tokens", None, "MAX_TOTAL_TOKENS"),
            (
                "max-concurrent-requests",
                Some("128"),
                "MAX_CONCURRENT_REQUESTS",
            ),
            ("max-batch-prefill-tokens", None, "MAX_BATCH_PREFILL_TOKENS"),
            ("max-batch-size", None, "MAX_BATCH_SIZE"),
            ("max-decode-stall-ms", None, "MAX_DECODE_STALL_MS"),
            ("dtype", None, "DTYPE"),
            ("kv-cache-memory", None, "KV_CACHE_MEMORY"),
            ("kv-cache-dtype", None, "KV_CACHE_DTYPE"),
            (
                "shard-uds-path",
                Some("/tmp/sluice-server"),
                "SHARD_UDS_PATH",
            ),
            (
                "shard-startup-timeout-s",
                Some("600"),
                "SHARD_STARTUP_TIMEOUT_S",
            ),
            ("num-shard", None, "NUM_SHARD"),
            ("sharded", None, "SHARDED"),
            ("nnodes", Some("1"), "NNODES"),
            ("node-rank", Some("0"), "NODE_RANK"),
            ("worker-addresses", None, "WORKER_ADDRESSES"),
            ("shard-port", Some("29600"), "SHARD_PORT"),
            ("master-addr", Some("localhost"), "MASTER_ADDR"),
            ("master-port", Some("29500"), "MASTER_PORT"),
            ("huggingface-hub-cache", None, "HUGGINGFACE_HUB_CACHE"),
            ("trust-remote-code", None, "TRUST_REMOTE_CODE"),
            ("json-output", None, "JSON_OUTPUT"),
            ("api-key", None, "API_KEY"),
            ("payload-limit", Some("2000000"), "PAYLOAD_LIMIT"),
            ("cors-allow-origin", None, "CORS_ALLOW_ORIGIN"),
        ];
        for (flag, default, env) in expected {
            assert_eq!(
                declared(flag),
                (default.map(str::to_owned), Some(env.to_owned())),
                "--{flag}"
            );
        }
    }

    #[test]
    fn explicit_flags_are_parsed() {
        let args = Args::try_parse_from([
            "sluice-launcher",
            "--model-id",
            "/models/llama",
            "--port",
            "8080",
            "--dtype",
            "bfloat16",
            "--kv-cache-memory",
            "4GB",
            "--max-batch-size",
            "16",
            "--json-output",
        ])
        .expect("valid flags");
        assert_eq!(args.model_id, "/models/llama");
        assert_eq!(args.port, 8080);
        assert_eq!(args.dtype, Some(Dtype::Bfloat16));
        assert_eq!(
            args.dtype.map(|d| d.to_string()).as_deref(),
            Some("bfloat16")
        );
        assert_eq!(args.kv_cache_memory.as_deref(), Some("4GB"));
        assert_eq!(args.max_batch_size, Some(16));
        assert!(args.json_output);
    }

    #[test]
    fn shard_count_follows_num_shard_and_sharded() {
        let world_size = |flags: &[&str]| {
            let mut argv = vec!["sluice-launcher"];
            argv.extend_from_slice(flags);
            Args::try_parse_from(argv)
                .expect("valid flags")
                .shards_per_node()
        };
        assert_eq!(world_size(&[]), Ok(1));
        assert_eq!(world_size(&["--num-shard", "3"]), Ok(3));
        assert_eq!(
            world_size(&["--sharded", "true", "--num-shard", "2"]),
            Ok(2)
        );
        assert_eq!(world_size(&["--sharded", "false"]), Ok(1));
        for contradiction in [
            &["--sharded", "false", "--num-shard", "2"][..],
            &["--sharded", "true", "--num-shard", "1"],
            &["--num-shard", "0"],
        ] {
            assert!(world_size(contradiction).is_err(), "{contradiction:?}");
        }
    }

    /// docs/launcher.md has one row per flag, naming its environment variable, and no row for a
    /// flag that does not exist.
    #[test]
    fn the_flag_page_lists_every_flag() {
        let page = include_str!("../../docs/launcher.md");
        let rows: Vec<&str> = page
            .lines()
            .filter(|line| line.starts_with("| `--"))
            .collect();
        let command = Args::command();
        let flags: Vec<_> = command
            .get_arguments()
            .filter_map(|arg| Some((arg.get_long()?, arg.get_env())))
            .filter(|(long, _)| !matches!(*long, "help" | "version"))
            .collect();
        for (long, env) in &flags {
            let cell = format!("| `--{long}");
            let row = rows
                .iter()
                .find(|row| row.starts_with(&cell) && row[cell.len()..].starts_with(['`', ',']))
                .unwrap_or_else(|| panic!("docs/launcher.md has no row for --{long}"));
            if let Some(env) = env {
                let env = env.to_string_lossy();
                assert!(
                    row.contains(&format!("| `{env}` |")),
                    "--{long}: {env} not in {row}"
                );
            }
        }
        assert_eq!(
            rows.len(),
            flags.len(),
            "docs/launcher.md lists flags that do not exist"
        );
    }

    #[test]
    fn unknown_dtype_is_refused() {
        assert!(Args::try_parse_from(["sluice-launcher", "--dtype", "int3"]).is_err());
    }
}

/// What one request may ask for; the router refuses more with 422 (TGI's flags and defaults).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RequestLimits {
    #[arg(long, env, default_value_t = 4)]
    pub max_stop_sequences: usize,
    /// Alternatives per generated token (`top_n_tokens`, OpenAI's `top_logprobs`).
    #[arg(long, env, default_value_t = 5)]
    pub max_top_n_tokens: u32,
    /// Sequences per request (`best_of`, OpenAI's `n`).
    #[arg(long, env, default_value_t = 2)]
    pub max_best_of: u32,
    /// Prompts in one OpenAI completions request.
    #[arg(long, env, default_value_t = 4)]
    pub max_client_batch_size: usize,
}

impl RequestLimits {
    /// The router's flags for these limits.
    pub fn to_flags(&self) -> Vec<String> {
        [
            ("--max-stop-sequences", self.max_stop_sequences.to_string()),
            ("--max-top-n-tokens", self.max_top_n_tokens.to_string()),
            ("--max-best-of", self.max_best_of.to_string()),
            (
                "--max-client-batch-size",
                self.max_client_batch_size.to_string(),
            ),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect()
    }
}
