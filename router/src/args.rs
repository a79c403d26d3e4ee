//! The `sluice-router` command line: serve with the flags the launcher sets (TGI's names are
//! kept), or run one of the subcommands.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use sluice_client::ShardAddress;

/// What one invocation does.
#[derive(Debug, Clone)]
pub enum Invocation {
    /// Boxed: the flags are far larger than a subcommand.
    Serve(Box<RouterArgs>),
    Run(Subcommands),
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Subcommands {
    /// Print the HTTP API's OpenAPI document (JSON) and exit.
    PrintSchema,
}

impl Invocation {
    /// Flags alone serve; a subcommand runs instead, and needs none of the serving flags.
    pub fn try_parse_from<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let command = Subcommands::augment_subcommands(RouterArgs::command())
            .subcommand_negates_reqs(true)
            .args_conflicts_with_subcommands(true);
        let matches = command.try_get_matches_from(argv)?;
        // The serving flags' required values are absent under a subcommand, so only one side
        // is read from the matches.
        if matches.subcommand().is_some() {
            Subcommands::from_arg_matches(&matches).map(Self::Run)
        } else {
            RouterArgs::from_arg_matches(&matches).map(|args| Self::Serve(Box::new(args)))
        }
    }

    pub fn parse() -> Self {
        Self::try_parse_from(std::env::args_os()).unwrap_or_else(|error| error.exit())
    }
}

#[derive(Parser, Debug, Clone)]
#[command(name = "sluice-router", version, about = "Sluice's HTTP router")]
pub struct RouterArgs {
    /// An address or a host name to listen on.
    #[arg(long, env, default_value = "0.0.0.0")]
    pub hostname: String,
    #[arg(long, env, default_value_t = 3000)]
    pub port: u16,
    /// Reported by /info.
    #[arg(long, env, default_value = "unknown")]
    pub model_id: String,
    /// A model directory holding tokenizer.json, or the file itself. The chat template is read
    /// from tokenizer_config.json or chat_template.jinja next to it.
    #[arg(long, env)]
    pub tokenizer_name: PathBuf,
    /// Where each rank listens, rank 0 first: a unix socket path, or `http://host:port` for a
    /// rank on another machine. Repeat the flag once per rank.
    #[arg(long, env, required = true)]
    pub shard_address: Vec<ShardAddress>,
    /// The longest prompt [default: one less than --max-total-tokens].
    #[arg(long, env)]
    pub max_input_tokens: Option<usize>,
    /// The longest prompt plus generation [default: the model's context length, capped at
    /// what the KV cache holds after warmup].
    #[arg(long, env)]
    pub max_total_tokens: Option<usize>,
    /// Requests in flight beyond this get 429 at once.
    #[arg(long, env, default_value_t = 128)]
    pub max_concurrent_requests: usize,
    /// Token budget of one step: decodes plus prompt chunks.
    #[arg(long, env, default_value_t = crate::limits::DEFAULT_MAX_BATCH_PREFILL_TOKENS)]
    pub max_batch_prefill_tokens: u32,
    /// While requests decode, cut prompt chunks so that a step is expected to take at most this
    /// many milliseconds (estimated from recent step times): about the longest a streaming
    /// request then waits between two tokens while prompts are prefilled. 0: off, chunks are
    /// limited by --max-batch-prefill-tokens alone.
    #[arg(long, env, default_value_t = 0)]
    pub max_decode_stall_ms: u64,
    /// Most requests one step may hold.
    #[arg(long, env)]
    pub max_batch_size: Option<usize>,
    /// Caps the KV cache at this many tokens (it is otherwise sized by the shards' warmup);
    /// more than fits is an error at startup.
    #[arg(long, env)]
    pub max_batch_total_tokens: Option<u32>,
    /// Reuse the KV blocks of cached prompt prefixes across requests.
    #[arg(long, env, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefix_caching: bool,
    /// Build and send each step while the one before it runs, so the shards do not wait for the
    /// router between steps. A request that arrives during a step then joins the one after next.
    #[arg(long, env, default_value_t = true, action = clap::ArgAction::Set)]
    pub overlap_steps: bool,
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
    #[arg(long, env, default_value_t = false)]
    pub json_output: bool,
    /// An OTLP/gRPC collector to export traces to, e.g. `http://collector:4317`.
    #[arg(long, env)]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the router's spans.
    #[arg(long, env, default_value = "text-generation-inference.router")]
    pub otlp_service_name: String,
    /// Requests to every route but /health, /info, /metrics and the API documentation must
    /// carry `Authorization: Bearer <key>`; others get 401.
    #[arg(long, env, hide_env_values = true)]
    pub api_key: Option<String>,
    /// The largest request body accepted, in bytes; a larger one gets 413.
    #[arg(long, env, default_value_t = 2_000_000)]
    pub payload_limit: usize,
    /// On SIGTERM, new requests get 503 while those in flight get this many seconds to finish.
    #[arg(long, env, default_value_t = 90)]
    pub graceful_termination_timeout: u64,
    /// An origin browsers may call the API from (CORS); repeat the flag, or separate origins
    /// with commas, for several. Unset: no CORS headers.
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_serve_and_print_schema_needs_none_of_them() {
        let serve = Invocation::try_parse_from([
            "sluice-router",
            "--tokenizer-name",
            "/models/m",
            "--shard-address",
            "/tmp/s-0",
            "--port",
            "8080",
        ])
        .unwrap();
        match serve {
            Invocation::Serve(args) => assert_eq!(args.port, 8080),
            other => panic!("expected to serve, got {other:?}"),
        }
        let print = Invocation::try_parse_from(["sluice-router", "print-schema"]).unwrap();
        assert!(matches!(print, Invocation::Run(Subcommands::PrintSchema)));
    }

    #[test]
    fn serving_still_requires_its_flags_and_they_do_not_mix_with_a_subcommand() {
        assert!(Invocation::try_parse_from(["sluice-router"]).is_err());
        assert!(
            Invocation::try_parse_from(["sluice-router", "--port", "8080", "print-schema"])
                .is_err()
        );
    }
}
