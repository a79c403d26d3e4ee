use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use sluice_client::ShardAddress;

use crate::process::StderrTail;

#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("model `{model_id}` not found: {looked}")]
    ModelNotFound { model_id: String, looked: String },

    /// `sluice-server download-weights` failed and said why in one line.
    #[error("cannot download `{model_id}` from the Hugging Face Hub: {reason}")]
    Download { model_id: String, reason: String },

    #[error(
        "cannot tell where the model caches are: HOME is not set (set HF_HOME and SLUICE_CACHE)"
    )]
    NoHome,

    #[error("{} is a directory without a config.json, so it is not a model directory", .0.display())]
    NotAModelDirectory(PathBuf),

    #[error("cannot find `{name}` next to the launcher or on PATH (looked in: {})", display_paths(.searched))]
    BinaryNotFound {
        name: String,
        searched: Vec<PathBuf>,
    },

    #[error("cannot start `{name}`: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{name} exited with {status}{stderr}")]
    ChildExited {
        name: String,
        status: ExitStatus,
        stderr: StderrTail,
    },

    /// A shard died after the last restart --max-shard-restarts allows.
    #[error(
        "giving up after {restarts} shard restarts (--max-shard-restarts {restarts}): {death}"
    )]
    ShardRestartsExhausted {
        death: Box<LauncherError>,
        restarts: u32,
    },

    #[error("{name} did not answer health checks within {}s{stderr}", .timeout.as_secs())]
    ShardStartupTimeout {
        name: String,
        timeout: Duration,
        stderr: StderrTail,
    },

    #[error(
        "the shard at {address} did not answer health checks within {}s; is its node's \
         launcher running?",
        .timeout.as_secs()
    )]
    RemoteShardTimeout {
        address: ShardAddress,
        timeout: Duration,
    },

    #[error("`sluice-server default-model-gguf` gave no usable path: {0}")]
    DefaultModelGguf(String),

    /// Found before anything starts, so that it does not wait for a model load.
    #[error("{0}")]
    Preflight(String),

    /// Flags that contradict each other, or ask for what cannot be done.
    #[error("{0}")]
    InvalidFlags(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl LauncherError {
    /// Wraps an I/O error with what the launcher was doing when it happened.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| LauncherError::Io { context, source }
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths
        .iter()
        .map(|path| path.display().to_string())
        .collect();
    shown.join(", ")
}
