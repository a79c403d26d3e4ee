//! Starting a model shard (`sluice-server serve`) and waiting until it answers Health.

use std::path::PathBuf;
use std::time::Duration;

use sluice_client::{ShardAddress, ShardClient};
use tokio::process::Command;
use tokio::time::{timeout, Instant};

use crate::args::{Args, Dtype, KvCacheDtype, Quantize};
use crate::error::LauncherError;
use crate::process::ManagedChild;
use crate::topology::{ShardListen, Topology};
use crate::trace_export::TraceExport;

const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// One health check must not hang the startup loop on a stuck connection.
const HEALTH_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Everything needed to start one shard.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub binary: PathBuf,
    pub model_dir: PathBuf,
    /// The GGUF file whose quantized projections the shard serves (`--quantize gguf`).
    pub gguf_file: Option<PathBuf>,
    /// The method the checkpoint must be quantized with (awq, gptq, fp8) or the shard quantizes
    /// it with at load (fp8, bitsandbytes').
    pub quantize: Option<Quantize>,
    pub rank: usize,
    pub world_size: usize,
    pub listen: ShardListen,
    /// Where the ranks meet to form their process group.
    pub master_addr: String,
    pub master_port: u16,
    pub dtype: Option<Dtype>,
    pub kv_cache_memory: Option<String>,
    pub kv_cache_dtype: Option<KvCacheDtype>,
    /// PyTorch's operators instead of the compiled CPU kernels.
    pub disable_custom_kernels: bool,
    pub trace_export: Option<TraceExport>,
    pub startup_timeout: Duration,
}

impl ShardConfig {
    pub fn new(
        args: &Args,
        topology: &Topology,
        binary: PathBuf,
        model_dir: PathBuf,
        gguf_file: Option<PathBuf>,
        rank: usize,
    ) -> Self {
        Self {
            binary,
            model_dir,
            gguf_file,
            quantize: args.quantize.filter(|q| q.is_applied_by_shard()),
            rank,
            world_size: topology.world_size(),
            listen: topology.listen(rank),
            master_addr: args.master_addr.clone(),
            master_port: args.master_port,
            dtype: args.dtype,
            kv_cache_memory: args.kv_cache_memory.clone(),
            kv_cache_dtype: args.kv_cache_dtype,
            disable_custom_kernels: args.disable_custom_kernels,
            trace_export: TraceExport::for_shards(args),
            startup_timeout: Duration::from_secs(args.shard_startup_timeout_s),
        }
    }

    /// The name the shard goes by in logs and errors.
    pub fn name(&self) -> String {
        format!("shard-{}", self.rank)
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("serve")
            .arg(&self.model_dir)
            .args(self.listen.serve_flags())
            // Read back and logged in the launcher's own format (`child_log`).
            .args(["--log-format", "json"]);
        if let Some(dtype) = self.dtype {
            command.arg("--dtype").arg(dtype.to_string());
        }
        if let Some(gguf_file) = &self.gguf_file {
            command.arg("--gguf-file").arg(gguf_file);
        }
        if let Some(method) = self.quantize {
            command.arg("--quantize").arg(method.to_string());
        }
        if let Some(memory) = &self.kv_cache_memory {
            command.arg("--kv-cache-memory").arg(memory);
        }
        if let Some(dtype) = self.kv_cache_dtype {
            command.arg("--kv-cache-dtype").arg(dtype.to_string());
        }
        if self.disable_custom_kernels {
            command.arg("--kernels").arg("reference");
        }
        if let Some(trace_export) = &self.trace_export {
            command.args(trace_export.flags());
        }
        command
            .env("RANK", self.rank.to_string())
            .env("WORLD_SIZE", self.world_size.to_string())
            .env("MASTER_ADDR", &self.master_addr)
            .env("MASTER_PORT", self.master_port.to_string());
        command
    }
}

/// Starts the shard, clearing a socket file a previous run may have left behind.
pub fn spawn(config: &ShardConfig) -> Result<ManagedChild, LauncherError> {
    if let ShardListen::Unix(path) = &config.listen {
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!("removed stale socket {}", path.display()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(LauncherError::Io {
                    context: format!("cannot remove stale socket {}", path.display()),
                    source: err,
                })
            }
        }
    }
    ManagedChild::spawn(&config.name(), config.command())
}

/// Polls Health until the shard answers, it exits, or the startup timeout passes.
pub async fn wait_until_healthy(
    shard: &mut ManagedChild,
    config: &ShardConfig,
) -> Result<(), LauncherError> {
    let started = Instant::now();
    let mut next_progress_log = PROGRESS_LOG_INTERVAL;
    loop {
        if let Some(status) = shard.exit_status()? {
            return Err(shard.exit_error(status).await);
        }
        if is_healthy(&config.listen.local_address()).await {
            tracing::info!(
                "{} is ready after {}s",
                shard.name(),
                started.elapsed().as_secs()
            );
            return Ok(());
        }
        let waited = started.elapsed();
        if waited >= config.startup_timeout {
            return Err(LauncherError::ShardStartupTimeout {
                name: shard.name().to_owned(),
                timeout: config.startup_timeout,
                stderr: shard.stderr_tail().await,
            });
        }
        if waited >= next_progress_log {
            tracing::info!(
                "waiting for {} to load the model ({}s)",
                shard.name(),
                waited.as_secs()
            );
            next_progress_log += PROGRESS_LOG_INTERVAL;
        }
        tokio::time::sleep(HEALTH_POLL_INTERVAL).await;
    }
}

/// Polls Health of a rank another node's launcher started, until it answers or the startup
/// timeout passes.
pub async fn wait_for_remote(
    address: ShardAddress,
    startup_timeout: Duration,
) -> Result<(), LauncherError> {
    let started = Instant::now();
    let mut next_progress_log = PROGRESS_LOG_INTERVAL;
    while !is_healthy(&address).await {
        let waited = started.elapsed();
        if waited >= startup_timeout {
            return Err(LauncherError::RemoteShardTimeout {
                address,
                timeout: startup_timeout,
            });
        }
        if waited >= next_progress_log {
            tracing::info!("waiting for the shard at {address} ({}s)", waited.as_secs());
            next_progress_log += PROGRESS_LOG_INTERVAL;
        }
        tokio::time::sleep(HEALTH_POLL_INTERVAL).await;
    }
    tracing::info!("the shard at {address} is ready");
    Ok(())
}

/// Whether the shard at `address` answers Health: one attempt.
pub async fn is_healthy(address: &ShardAddress) -> bool {
    // Until the socket exists there is nothing to connect to.
    if matches!(address, ShardAddress::Unix(path) if !path.exists()) {
        return false;
    }
    let check = async {
        let client = ShardClient::connect(address).await?;
        client.health().await
    };
    match timeout(HEALTH_ATTEMPT_TIMEOUT, check).await {
        Ok(Ok(_)) => true,
        Ok(Err(err)) => {
            tracing::debug!("shard not healthy yet: {err}");
            false
        }
        Err(_) => {
            tracing::debug!("shard health check timed out");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config(flags: &[&str]) -> ShardConfig {
        let command_line = std::iter::once("sluice-launcher").chain(flags.iter().copied());
        let args = Args::try_parse_from(command_line).expect("valid flags");
        let topology = Topology::from_args(&args).expect("valid topology");
        let rank = topology.local_ranks().start;
        ShardConfig::new(
            &args,
            &topology,
            PathBuf::from("/venv/bin/sluice-server"),
            PathBuf::from("/models/m"),
            None,
            rank,
        )
    }

    fn argv(command: &Command) -> Vec<String> {
        let std_command = command.as_std();
        std::iter::once(std_command.get_program())
            .chain(std_command.get_args())
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    fn env(command: &Command, name: &str) -> Option<String> {
        command
            .as_std()
            .get_envs()
            .find(|(key, _)| *key == name)
            .and_then(|(_, value)| value)
            .map(|value| value.to_string_lossy().into_owned())
    }

    #[test]
    fn serve_command_with_defaults() {
        let command = config(&[]).command();
        assert_eq!(
            argv(&command),
            [
                "/venv/bin/sluice-server",
                "serve",
                "/models/m",
                "--uds-path",
                "/tmp/sluice-server-0",
                "--log-format",
                "json"
            ]
        );
        assert_eq!(env(&command, "RANK").as_deref(), Some("0"));
        assert_eq!(env(&command, "WORLD_SIZE").as_deref(), Some("1"));
    }

    #[test]
    fn a_worker_nodes_shard_listens_on_tcp_with_its_global_rank() {
        let command = config(&[
            "--num-shard",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--hostname",
            "10.0.0.2",
            "--master-addr",
            "10.0.0.1",
        ])
        .command();
        assert_eq!(argv(&command)[3..5], ["--listen", "10.0.0.2:29600"]);
        assert_eq!(env(&command, "RANK").as_deref(), Some("2"));
        assert_eq!(env(&command, "WORLD_SIZE").as_deref(), Some("4"));
        assert_eq!(env(&command, "MASTER_ADDR").as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn a_gguf_files_quantized_weights_are_passed_to_the_shard() {
        let mut config = config(&["--quantize", "gguf"]);
        config.gguf_file = Some(PathBuf::from("/models/m.Q4_1.gguf"));
        let argv = argv(&config.command());
        let flag = argv.iter().position(|arg| arg == "--gguf-file");
        assert_eq!(
            flag.map(|at| argv[at + 1].as_str()),
            Some("/models/m.Q4_1.gguf")
        );
    }

    #[test]
    fn a_checkpoint_method_is_passed_for_the_shard_to_check_and_gguf_is_not() {
        for method in ["awq", "gptq"] {
            let argv = argv(&config(&["--quantize", method]).command());
            let flag = argv.iter().position(|arg| arg == "--quantize");
            assert_eq!(flag.map(|at| argv[at + 1].as_str()), Some(method));
        }
        let argv = argv(&config(&["--quantize", "gguf"]).command());
        assert!(!argv.iter().any(|arg| arg == "--quantize"), "{argv:?}");
    }

    #[test]
    fn serve_command_passes_dtype_kv_cache_memory_and_kernels() {
        let command = config(&[
            "--shard-uds-path",
            "/run/sluice",
            "--dtype",
            "float16",
            "--kv-cache-memory",
            "4GB",
            "--kv-cache-dtype",
            "fp8_e5m2",
            "--disable-custom-kernels",
        ])
        .command();
        assert_eq!(
            argv(&command),
            [
                "/venv/bin/sluice-server",
                "serve",
                "/models/m",
                "--uds-path",
                "/run/sluice-0",
                "--log-format",
                "json",
                "--dtype",
                "float16",
                "--kv-cache-memory",
                "4GB",
                "--kv-cache-dtype",
                "fp8_e5m2",
                "--kernels",
                "reference"
            ]
        );
    }

    #[test]
    fn traces_go_to_the_collector_under_the_shards_service_name() {
        let traced = |flags: &[&str]| argv(&config(flags).command())[7..].to_vec();
        assert_eq!(
            traced(&["--otlp-endpoint", "http://collector:4317"]),
            [
                "--otlp-endpoint",
                "http://collector:4317",
                "--otlp-service-name",
                "text-generation-inference.server"
            ]
        );
        let named = traced(&[
            "--otlp-endpoint",
            "http://c:4317",
            "--otlp-service-name",
            "chat",
        ]);
        assert_eq!(named[3], "chat.server");
        assert!(traced(&["--otlp-service-name", "chat"]).is_empty());
    }

    #[tokio::test]
    async fn a_shard_that_dies_during_startup_reports_its_stderr() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config(&[]);
        config.listen = ShardListen::Unix(dir.path().join("shard-0"));
        let mut command = Command::new("sh");
        command.args(["-c", "echo 'CUDA out of memory' >&2; exit 1"]);
        let mut shard = ManagedChild::spawn("shard-0", command).expect("sh runs");
        let err = wait_until_healthy(&mut shard, &config)
            .await
            .expect_err("it died");
        let message = err.to_string();
        assert!(
            message.starts_with("shard-0 exited with exit status: 1"),
            "{message}"
        );
        assert!(message.contains("CUDA out of memory"), "{message}");
    }

    #[tokio::test]
    async fn a_shard_that_never_answers_times_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config(&[]);
        config.listen = ShardListen::Unix(dir.path().join("shard-0"));
        config.startup_timeout = Duration::from_millis(100);
        let mut command = Command::new("sh");
        command.args(["-c", "echo 'loading weights' >&2; sleep 30"]);
        let mut shard = ManagedChild::spawn("shard-0", command).expect("sh runs");
        let err = wait_until_healthy(&mut shard, &config)
            .await
            .expect_err("timed out");
        shard.kill().await;
        assert!(
            matches!(err, LauncherError::ShardStartupTimeout { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn stale_socket_is_removed_before_spawning() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config(&[]);
        config.listen = ShardListen::Unix(dir.path().join("shard-0"));
        config.binary = dir.path().join("no-such-binary");
        std::fs::write(dir.path().join("shard-0"), "").expect("stale file");
        let err = spawn(&config).err().expect("binary missing");
        assert!(matches!(err, LauncherError::Spawn { .. }), "{err}");
        assert!(!dir.path().join("shard-0").exists());
    }
}
