//! Graceful termination: on SIGTERM (or SIGINT) the router stops admitting requests (503) while
//! those in flight finish, up to `--graceful-termination-timeout`; then the HTTP server stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

/// How often the drain checks whether requests are still in flight.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Whether the router is draining; shared by the handlers (which refuse new requests) and the
/// shutdown sequence (which sets it).
#[derive(Clone, Debug, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn start(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What the drain watches: the admission semaphore's permits are all back when nothing is in
/// flight.
pub struct Drain {
    pub draining: Draining,
    pub admission: Arc<Semaphore>,
    pub max_concurrent_requests: usize,
    pub timeout: Duration,
    /// Notified when the timeout passes with requests still in flight: the server then stops
    /// without waiting for them.
    pub overdue: Arc<Notify>,
}

impl Drain {
    /// Resolves once a termination signal came and the requests in flight finished (or the
    /// timeout passed): the moment the HTTP server may shut down.
    pub async fn on_signal(self) {
        wait_for_signal().await;
        self.draining.start();
        let in_flight = self.max_concurrent_requests - self.admission.available_permits();
        tracing::info!(
            in_flight,
            timeout_s = self.timeout.as_secs(),
            "draining: refusing new requests while those in flight finish"
        );
        let idle = async {
            while self.admission.available_permits() < self.max_concurrent_requests {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        };
        if tokio::time::timeout(self.timeout, idle).await.is_err() {
            let left = self.max_concurrent_requests - self.admission.available_permits();
            tracing::warn!(
                left,
                "--graceful-termination-timeout passed, stopping the rest"
            );
            self.overdue.notify_one();
        } else {
            tracing::info!("drained");
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
