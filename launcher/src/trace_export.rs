//! Where the router and the shards export their spans (`--otlp-endpoint`).

use crate::args::Args;

/// An OTLP/gRPC collector, and the service name one process's spans go under there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceExport {
    pub endpoint: String,
    pub service_name: String,
}

impl TraceExport {
    /// The router's; None without --otlp-endpoint.
    pub fn for_router(args: &Args) -> Option<Self> {
        args.otlp_endpoint.as_ref().map(|endpoint| Self {
            endpoint: endpoint.clone(),
            service_name: args.otlp_service_name.clone(),
        })
    }

    /// The shards': TGI's pair of names is `text-generation-inference.router` and
    /// `text-generation-inference.server`.
    pub fn for_shards(args: &Args) -> Option<Self> {
        Self::for_router(args).map(|router| {
            let stem = router
                .service_name
                .strip_suffix(".router")
                .unwrap_or(&router.service_name);
            Self {
                service_name: format!("{stem}.server"),
                endpoint: router.endpoint,
            }
        })
    }

    /// The same flags for `sluice-router` and `sluice-server serve`.
    pub fn flags(&self) -> [&str; 4] {
        [
            "--otlp-endpoint",
            &self.endpoint,
            "--otlp-service-name",
            &self.service_name,
        ]
    }
}
