//! The `sluice-router` command line.

use std::ffi::OsString;
use std::path::PathBuf;

use sluice_client::ShardAddress;
use tokio::process::Command;

use crate::args::{Args, RequestLimits};
use crate::trace_export::TraceExport;

pub const NAME: &str = "router";

/// Everything needed to start the router.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub binary: PathBuf,
    pub port: u16,
    pub hostname: String,
    /// The id users asked for, reported by /info.
    pub model_id: String,
    /// The resolved model directory, where the tokenizer files are.
    pub tokenizer_dir: PathBuf,
    /// Every rank's address, rank 0 first.
    pub shard_addresses: Vec<ShardAddress>,
    /// Unset limits are left to the router, which knows the KV cache's size after warmup.
    pub max_input_tokens: Option<usize>,
    pub max_total_tokens: Option<usize>,
    pub max_batch_prefill_tokens: Option<usize>,
    pub max_concurrent_requests: usize,
    pub request_limits: RequestLimits,
    pub max_batch_size: Option<usize>,
    pub max_decode_stall_ms: Option<u64>,
    pub max_batch_total_tokens: Option<u32>,
    pub prefix_caching: bool,
    pub overlap_steps: bool,
    pub api_key: Option<String>,
    pub payload_limit: usize,
    pub cors_allow_origin: Vec<String>,
    pub graceful_termination_timeout: u64,
    pub trace_export: Option<TraceExport>,
}

impl RouterConfig {
    pub fn new(
        args: &Args,
        binary: PathBuf,
        tokenizer_dir: PathBuf,
        shard_addresses: Vec<ShardAddress>,
    ) -> Self {
        Self {
            binary,
            port: args.port,
            hostname: args.hostname.clone(),
            model_id: args.model_id.clone(),
            tokenizer_dir,
            shard_addresses,
            max_input_tokens: args.max_input_tokens,
            max_total_tokens: args.max_total_tokens,
            max_batch_prefill_tokens: args.max_batch_prefill_tokens,
            max_concurrent_requests: args.max_concurrent_requests,
            request_limits: args.request_limits.clone(),
            max_batch_size: args.max_batch_size,
            max_decode_stall_ms: args.max_decode_stall_ms,
            max_batch_total_tokens: args.max_batch_total_tokens,
            prefix_caching: args.prefix_caching,
            overlap_steps: args.overlap_steps,
            api_key: args.api_key.clone(),
            payload_limit: args.payload_limit,
            cors_allow_origin: args.cors_allow_origin.clone(),
            graceful_termination_timeout: args.graceful_termination_timeout,
            trace_export: TraceExport::for_router(args),
        }
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--hostname")
            .arg(&self.hostname)
            .arg("--model-id")
            .arg(&self.model_id)
            .arg("--tokenizer-name")
            .arg(&self.tokenizer_dir)
            .args(self.shard_addresses.iter().flat_map(|address| {
                let flag_value = match address {
                    ShardAddress::Unix(path) => path.as_os_str().to_owned(),
                    ShardAddress::Tcp(uri) => uri.into(),
                };
                [OsString::from("--shard-address"), flag_value]
            }))
            .arg("--max-concurrent-requests")
            .arg(self.max_concurrent_requests.to_string())
            .arg("--prefix-caching")
            .arg(self.prefix_caching.to_string())
            .arg("--overlap-steps")
            .arg(self.overlap_steps.to_string())
            .args(self.request_limits.to_flags())
            .arg("--payload-limit")
            .arg(self.payload_limit.to_string())
            .arg("--graceful-termination-timeout")
            .arg(self.graceful_termination_timeout.to_string())
            // Read back and logged in the launcher's own format (`child_log`).
            .arg("--json-output");
        let token_limits = [
            ("--max-input-tokens", self.max_input_tokens),
            ("--max-total-tokens", self.max_total_tokens),
            ("--max-batch-prefill-tokens", self.max_batch_prefill_tokens),
        ];
        for (flag, value) in token_limits {
            if let Some(value) = value {
                command.arg(flag).arg(value.to_string());
            }
        }
        if let Some(tokens) = self.max_batch_total_tokens {
            command
                .arg("--max-batch-total-tokens")
                .arg(tokens.to_string());
        }
        if let Some(max_batch_size) = self.max_batch_size {
            command
                .arg("--max-batch-size")
                .arg(max_batch_size.to_string());
        }
        if let Some(stall) = self.max_decode_stall_ms {
            command.arg("--max-decode-stall-ms").arg(stall.to_string());
        }
        for origin in &self.cors_allow_origin {
            command.arg("--cors-allow-origin").arg(origin);
        }
        if let Some(trace_export) = &self.trace_export {
            command.args(trace_export.flags());
        }
        // In the environment, where other users cannot read it (unlike the command line).
        match &self.api_key {
            Some(key) => command.env("API_KEY", key),
            None => command.env_remove("API_KEY"),
        };
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn argv(flags: &[&str]) -> Vec<String> {
        let launcher_argv = std::iter::once("sluice-launcher").chain(flags.iter().copied());
        let args = Args::try_parse_from(launcher_argv).expect("valid flags");
        let config = RouterConfig::new(
            &args,
            PathBuf::from("/venv/bin/sluice-router"),
            PathBuf::from("/models/m"),
            vec![
                ShardAddress::Unix("/tmp/sluice-server-0".into()),
                ShardAddress::Tcp("http://10.0.0.2:29600".into()),
            ],
        );
        let command = config.command();
        let std_command = command.as_std();
        std::iter::once(std_command.get_program())
            .chain(std_command.get_args())
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn router_command_with_defaults_and_two_ranks() {
        assert_eq!(
            argv(&[
                "--model-id",
                "org/model",
                "--hostname",
                "0.0.0.0",
                "--port",
                "3000"
            ]),
            [
                "/venv/bin/sluice-router",
                "--port",
                "3000",
                "--hostname",
                "0.0.0.0",
                "--model-id",
                "org/model",
                "--tokenizer-name",
                "/models/m",
                "--shard-address",
                "/tmp/sluice-server-0",
                "--shard-address",
                "http://10.0.0.2:29600",
                "--max-concurrent-requests",
                "128",
                "--prefix-caching",
                "true",
                "--overlap-steps",
                "true",
                "--max-stop-sequences",
                "4",
                "--max-top-n-tokens",
                "5",
                "--max-best-of",
                "2",
                "--max-client-batch-size",
                "4",
                "--payload-limit",
                "2000000",
                "--graceful-termination-timeout",
                "90",
                "--json-output",
            ]
        );
    }

    #[test]
    fn the_api_key_goes_through_the_environment() {
        let command = |flags: &[&str]| {
            let args = Args::try_parse_from(
                std::iter::once("sluice-launcher").chain(flags.iter().copied()),
            )
            .expect("valid flags");
            RouterConfig::new(
                &args,
                "r".into(),
                "m".into(),
                vec![ShardAddress::Unix("s".into())],
            )
            .command()
        };
        let with_key = command(&["--api-key", "s3cret"]);
        let std_command = with_key.as_std();
        assert!(std_command.get_args().all(|arg| arg != "s3cret"));
        let env: Vec<_> = std_command.get_envs().collect();
        let os = std::ffi::OsStr::new;
        assert_eq!(env, [(os("API_KEY"), Some(os("s3cret")))]);
        // Without a key, none reaches the router from the launcher's own environment.
        let without = command(&[]);
        let env: Vec<_> = without.as_std().get_envs().collect();
        assert_eq!(env, [(os("API_KEY"), None)]);
    }

    #[test]
    fn router_command_with_optional_flags() {
        let argv = argv(&[
            "--max-input-tokens",
            "4000",
            "--max-total-tokens",
            "5000",
            "--max-batch-prefill-tokens",
            "8192",
            "--max-batch-size",
            "32",
            "--max-decode-stall-ms",
            "250",
            "--max-batch-total-tokens",
            "4096",
            "--prefix-caching",
            "false",
            "--overlap-steps",
            "false",
            "--payload-limit",
            "1000",
            "--cors-allow-origin",
            "https://a.example",
            "--cors-allow-origin",
            "https://b.example",
            "--max-best-of",
            "4",
        ]);
        assert_eq!(
            argv[argv.len() - 33..],
            [
                "--prefix-caching",
                "false",
                "--overlap-steps",
                "false",
                "--max-stop-sequences",
                "4",
                "--max-top-n-tokens",
                "5",
                "--max-best-of",
                "4",
                "--max-client-batch-size",
                "4",
                "--payload-limit",
                "1000",
                "--graceful-termination-timeout",
                "90",
                "--json-output",
                "--max-input-tokens",
                "4000",
                "--max-total-tokens",
                "5000",
                "--max-batch-prefill-tokens",
                "8192",
                "--max-batch-total-tokens",
                "4096",
                "--max-batch-size",
                "32",
                "--max-decode-stall-ms",
                "250",
                "--cors-allow-origin",
                "https://a.example",
                "--cors-allow-origin",
                "https://b.example",
            ]
        );
    }
}
