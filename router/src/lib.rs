//! sluice-router: the HTTP front of Sluice. It owns text and time: tokenization, validation,
//! admission, the queue, the batching loop, KV block accounting, detokenization, the decision
//! when each request stops, and streaming. The shards behind it own tensors only and speak
//! token ids over gRPC (the `sluice-client` crate).

pub mod args;
mod drain;
pub mod generation;
pub mod http;
pub mod kv;
pub mod limits;
pub mod request;
pub mod scheduler;
mod server;
pub mod shard;
pub mod telemetry;
pub mod tokenizer;
pub mod validation;

use std::io::Write;

use args::{Invocation, RouterArgs, Subcommands};

pub fn main() -> anyhow::Result<()> {
    match Invocation::parse() {
        Invocation::Serve(args) => serve(*args),
        Invocation::Run(Subcommands::PrintSchema) => {
            let document = http::openapi::document_json()?;
            // Not println!, which panics when the reader has gone (`| head`).
            writeln!(std::io::stdout().lock(), "{document}")?;
            Ok(())
        }
    }
}

fn serve(args: RouterArgs) -> anyhow::Result<()> {
    init_tracing(args.json_output);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(server::run(args))
}

fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
