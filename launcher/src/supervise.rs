//! The launcher's life: prepare the model, start the shards (one per tensor-parallel rank),
//! then the router, and stop them in order on SIGINT/SIGTERM or when the router dies. Shards
//! that die are restarted (`--max-shard-restarts`) while the router waits for them.

use std::time::Duration;

use futures::future::{select_all, try_join_all, FutureExt};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::args::{Args, Quantize};
use crate::binaries::Binaries;
use crate::error::LauncherError;
use crate::model::{self, HubAccess, ModelCaches, ModelRequest};
use crate::preflight;
use crate::process::ManagedChild;
use crate::router::{self, RouterConfig};
use crate::shard::{self, ShardConfig};
use crate::topology::Topology;
use crate::unbuilt;

/// The router gets this long beyond --graceful-termination-timeout to stop what is left.
const ROUTER_GRACE_MARGIN: Duration = Duration::from_secs(10);
const SHARD_GRACE: Duration = Duration::from_secs(10);

/// Runs until a shutdown signal (Ok) or until a child fails (Err).
pub async fn run(args: Args) -> Result<(), LauncherError> {
    let mut signals = ShutdownSignals::install()?;
    let topology = Topology::from_args(&args).map_err(LauncherError::InvalidFlags)?;
    if let Some(refusal) = unbuilt::refusal(&args) {
        return Err(LauncherError::InvalidFlags(refusal));
    }
    if topology.is_first_node() {
        preflight::check_port(&args.hostname, args.port)?;
        preflight::check_socket_prefix(&args.shard_uds_path)?;
    }
    let binaries = Binaries::find()?;

    let caches = ModelCaches::from_env(args.huggingface_hub_cache.as_deref())?;
    let request = ModelRequest {
        model_id: &args.model_id,
        revision: args.revision.as_deref(),
    };
    if args.trust_remote_code {
        tracing::warn!(
            "--trust-remote-code has no effect: Sluice serves supported architectures with its \
             own code and never runs code from a model repository"
        );
    }
    // Dropping the resolution on a signal kills a running download or conversion
    // (kill_on_drop).
    let model = tokio::select! {
        resolved = model::resolve(&request, &caches, HubAccess::from_env(), &binaries.server) => resolved?,
        signal = signals.recv() => {
            tracing::info!("received {signal} while preparing the model, exiting");
            return Ok(());
        }
    };
    let gguf_file = match (args.quantize, model.gguf) {
        (Some(Quantize::Gguf), None) => {
            return Err(LauncherError::InvalidFlags(format!(
                "--quantize gguf serves a GGUF file's quantized weights, but {} is not a .gguf \
                 file (nor the default model)",
                args.model_id
            )))
        }
        (Some(Quantize::Gguf), Some(origin)) => Some(origin.path(&binaries.server).await?),
        _ => None,
    };
    let model_dir = model.dir;
    if args.max_waiting_tokens.is_some() || args.waiting_served_ratio.is_some() {
        tracing::warn!(
            "--max-waiting-tokens and --waiting-served-ratio have no effect: with chunked \
             prefill every step admits waiting requests within --max-batch-prefill-tokens"
        );
    }

    let shard_configs: Vec<ShardConfig> = topology
        .local_ranks()
        .map(|rank| {
            ShardConfig::new(
                &args,
                &topology,
                binaries.server.clone(),
                model_dir.clone(),
                gguf_file.clone(),
                rank,
            )
        })
        .collect();
    let mut shards = Vec::with_capacity(shard_configs.len());
    for config in &shard_configs {
        match shard::spawn(config) {
            Ok(child) => shards.push(child),
            Err(err) => {
                stop_in_order(&mut with_grace(&mut shards, SHARD_GRACE), &mut signals).await;
                return Err(err);
            }
        }
    }
    let started = tokio::select! {
        ready = async {
            try_join_all(shards.iter_mut().zip(&shard_configs).map(|(child, config)| {
                shard::wait_until_healthy(child, config)
            }))
            .await?;
            // The first node's router needs the other nodes' ranks too.
            let startup_timeout = Duration::from_secs(args.shard_startup_timeout_s);
            try_join_all(
                topology
                    .remote_addresses()
                    .into_iter()
                    .map(|address| shard::wait_for_remote(address, startup_timeout)),
            )
            .await
        } => ready.map(|_| ()),
        signal = signals.recv() => {
            tracing::info!("received {signal} while the shards were starting, shutting down");
            stop_in_order(&mut with_grace(&mut shards, SHARD_GRACE), &mut signals).await;
            return Ok(());
        }
    };
    if let Err(err) = started {
        stop_in_order(&mut with_grace(&mut shards, SHARD_GRACE), &mut signals).await;
        return Err(err);
    }
    if !topology.is_first_node() {
        tracing::info!(
            "node {} of {} serves ranks {:?}; the first node's router calls them",
            topology.node_rank,
            topology.nnodes,
            topology.local_ranks()
        );
        // The other nodes' ranks cannot join a process group formed again without them.
        return supervise_running(None, &mut shards, &shard_configs, 0, &mut signals).await;
    }

    let router_config = RouterConfig::new(
        &args,
        binaries.router,
        model_dir,
        topology.router_addresses(),
    );
    let mut router = match ManagedChild::spawn(router::NAME, router_config.command()) {
        Ok(router) => router,
        Err(err) => {
            stop_in_order(&mut with_grace(&mut shards, SHARD_GRACE), &mut signals).await;
            return Err(err);
        }
    };

    let router_grace = Duration::from_secs(args.graceful_termination_timeout) + ROUTER_GRACE_MARGIN;
    let max_restarts = if topology.nnodes == 1 {
        args.max_shard_restarts
    } else {
        0
    };
    supervise_running(
        Some((&mut router, router_grace)),
        &mut shards,
        &shard_configs,
        max_restarts,
        &mut signals,
    )
    .await
}

/// What ends a phase of the launcher's life early.
enum Interruption {
    /// A shutdown signal: stop everything, exit 0.
    Signal(&'static str),
    Failed(LauncherError),
}

/// Waits, with every child up, for a shutdown signal or for any child to die. A shard that dies
/// is restarted, with the others of this machine, up to `max_restarts` times; past that, or
/// when the router dies, everything stops with the cause. Only the first node has a router
/// (with the time it gets to drain).
async fn supervise_running(
    mut router: Option<(&mut ManagedChild, Duration)>,
    shards: &mut [ManagedChild],
    shard_configs: &[ShardConfig],
    max_restarts: u32,
    signals: &mut ShutdownSignals,
) -> Result<(), LauncherError> {
    let mut restarts = 0;
    let interruption = loop {
        let router_exit = async {
            match router.as_mut() {
                Some((router, _)) => {
                    let status = router.wait().await;
                    exit_error(router, status).await
                }
                None => std::future::pending().await,
            }
        };
        let shard_exits = select_all(shards.iter_mut().map(|shard| shard.wait().boxed()));
        let (index, status) = tokio::select! {
            signal = signals.recv() => break Interruption::Signal(signal),
            error = router_exit => break Interruption::Failed(error),
            (status, index, _) = shard_exits => (index, status),
        };
        let death = exit_error(&mut shards[index], status).await;
        if restarts == max_restarts {
            break Interruption::Failed(if max_restarts == 0 {
                death
            } else {
                LauncherError::ShardRestartsExhausted {
                    death: Box::new(death),
                    restarts,
                }
            });
        }
        restarts += 1;
        tracing::error!("{death}");
        tracing::warn!(
            "restarting the shards ({restarts} of {max_restarts} restarts); the router holds \
             queued requests meanwhile"
        );
        if let Err(interruption) = restart_shards(shards, shard_configs, signals).await {
            break interruption;
        }
    };
    let result = match interruption {
        Interruption::Signal(signal) => {
            tracing::info!("received {signal}, shutting down");
            Ok(())
        }
        Interruption::Failed(err) => {
            // The cause now, not only once everything has stopped: stopping can take minutes,
            // and a launcher killed meanwhile would never say why it was stopping.
            tracing::error!("stopping every child: {err}");
            Err(err)
        }
    };
    // The router first, so that it stops taking requests the shards cannot serve; stopping a
    // child that already exited does nothing. Without shards, what the router holds cannot
    // finish: it gets no time to drain.
    let mut children: Vec<_> = router
        .into_iter()
        .map(|(router, grace)| {
            let grace = if result.is_ok() { grace } else { SHARD_GRACE };
            (router, grace)
        })
        .collect();
    children.extend(with_grace(shards, SHARD_GRACE));
    stop_in_order(&mut children, signals).await;
    result
}

/// Stops every shard of this machine (the ranks of a tensor-parallel group cannot go on
/// without the one that died) and starts them again, until they answer Health.
async fn restart_shards(
    shards: &mut [ManagedChild],
    configs: &[ShardConfig],
    signals: &mut ShutdownSignals,
) -> Result<(), Interruption> {
    let restart = async {
        for shard in shards.iter_mut() {
            shard.stop(SHARD_GRACE).await;
        }
        for (shard, config) in shards.iter_mut().zip(configs) {
            *shard = shard::spawn(config)?;
        }
        try_join_all(
            shards
                .iter_mut()
                .zip(configs)
                .map(|(shard, config)| shard::wait_until_healthy(shard, config)),
        )
        .await
        .map(|_| ())
    };
    tokio::select! {
        restarted = restart => restarted.map_err(Interruption::Failed),
        signal = signals.recv() => Err(Interruption::Signal(signal)),
    }
}

fn with_grace(
    children: &mut [ManagedChild],
    grace: Duration,
) -> Vec<(&mut ManagedChild, Duration)> {
    children.iter_mut().map(|child| (child, grace)).collect()
}

/// A child that exits by itself is a failure, whatever its status.
async fn exit_error(
    child: &mut ManagedChild,
    status: Result<std::process::ExitStatus, LauncherError>,
) -> LauncherError {
    match status {
        Ok(status) => child.exit_error(status).await,
        Err(err) => err,
    }
}

/// Stops children one after the other, each within its grace period. A further signal
/// means the operator is done waiting: everything left is killed at once.
async fn stop_in_order(
    children: &mut [(&mut ManagedChild, Duration)],
    signals: &mut ShutdownSignals,
) {
    tokio::select! {
        () = async {
            for (child, grace) in children.iter_mut() {
                child.stop(*grace).await;
            }
        } => {}
        signal = signals.recv() => {
            tracing::warn!("received {signal} again, killing the remaining processes");
            for (child, _) in children.iter_mut() {
                child.kill().await;
            }
        }
    }
}

/// SIGINT and SIGTERM, either of which starts a graceful shutdown.
struct ShutdownSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl ShutdownSignals {
    fn install() -> Result<Self, LauncherError> {
        let install =
            |kind| signal(kind).map_err(LauncherError::io("cannot install signal handlers"));
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
        })
    }

    /// Waits for the next signal and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
