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
pub mod trace;
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let otlp = args
            .otlp_endpoint
            .clone()
            .map(|endpoint| trace::OtlpConfig {
                endpoint,
                service_name: args.otlp_service_name.clone(),
            });
        let span_export = trace::init(args.json_output, otlp.as_ref())?;
        let served = server::run(args).await;
        span_export.shutdown().await;
        served
    })
}
