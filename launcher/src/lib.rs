//! `sluice-launcher`: resolves the model, starts the shards and the router, supervises them
//! and stops them in order. See `supervise.rs` for the life cycle and `topology.rs` for which
//! ranks a launcher starts.

mod args;
mod binaries;
mod child_log;
mod error;
mod model;
mod preflight;
mod process;
mod router;
mod shard;
mod supervise;
mod topology;
mod trace_export;
mod unbuilt;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::args::Args;

pub fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.json_output);

    // Single-threaded on purpose: children die with the thread that spawned them
    // (PR_SET_PDEATHSIG), and the main thread lives exactly as long as the launcher.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(supervise::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// Human-readable logs by default, JSON lines with --json-output; info level unless
/// `RUST_LOG` says otherwise.
fn init_tracing(json_output: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json_output {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::stdout().is_terminal()).init();
    }
}
