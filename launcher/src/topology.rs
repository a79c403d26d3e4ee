//! Which ranks of a tensor-parallel group this launcher starts, and where each rank listens.
//!
//! One machine (the default): ranks 0..N-1, on unix sockets, and the router. Several machines
//! (`--nnodes M`): each runs a launcher with its `--node-rank`; node i starts the ranks
//! i*N..(i+1)*N-1. The first node also runs the router, which dials its own ranks' sockets and
//! the other nodes' ranks over TCP at `http://{worker address}:{--shard-port + local rank}`.

use std::ops::Range;
use std::path::PathBuf;

use sluice_client::ShardAddress;

use crate::args::Args;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub shards_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    /// Nodes 1..M-1's addresses, as the first node's router reaches them.
    pub worker_addresses: Vec<String>,
    /// A worker's rank with local index i listens on this port + i.
    pub shard_port: u16,
    /// The address workers' ranks bind.
    pub bind_host: String,
    /// The first node's ranks listen on `{prefix}-{rank}`.
    pub uds_prefix: String,
}

/// Where one rank listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardListen {
    Unix(PathBuf),
    /// `host:port` to bind.
    Tcp {
        bind: String,
        port: u16,
    },
}

impl ShardListen {
    /// The `sluice-server serve` flags that make the shard listen here.
    pub fn serve_flags(&self) -> [String; 2] {
        match self {
            Self::Unix(path) => ["--uds-path".to_owned(), path.display().to_string()],
            Self::Tcp { bind, port } => ["--listen".to_owned(), format!("{bind}:{port}")],
        }
    }

    /// Where this launcher checks the shard's health (on this machine).
    pub fn local_address(&self) -> ShardAddress {
        match self {
            Self::Unix(path) => ShardAddress::Unix(path.clone()),
            Self::Tcp { bind, port } => {
                // A wildcard bind answers on the loopback address.
                let host = match bind.as_str() {
                    "0.0.0.0" | "::" | "[::]" => "127.0.0.1",
                    host => host,
                };
                ShardAddress::Tcp(format!("http://{host}:{port}"))
            }
        }
    }
}

impl Topology {
    pub fn from_args(args: &Args) -> Result<Self, String> {
        let topology = Self {
            shards_per_node: args.shards_per_node()?,
            nnodes: args.nnodes,
            node_rank: args.node_rank,
            worker_addresses: args.worker_addresses.clone(),
            shard_port: args.shard_port,
            bind_host: args.hostname.clone(),
            uds_prefix: args.shard_uds_path.clone(),
        };
        topology.check()?;
        Ok(topology)
    }

    fn check(&self) -> Result<(), String> {
        if self.nnodes == 0 {
            return Err("--nnodes must be at least 1".to_owned());
        }
        if self.node_rank >= self.nnodes {
            return Err(format!(
                "--node-rank {} is not a node of --nnodes {}",
                self.node_rank, self.nnodes
            ));
        }
        if self.is_first_node() && self.worker_addresses.len() != self.nnodes - 1 {
            return Err(format!(
                "--worker-addresses names {} nodes; with --nnodes {} the first node needs the \
                 addresses of the other {}",
                self.worker_addresses.len(),
                self.nnodes,
                self.nnodes - 1
            ));
        }
        if usize::from(self.shard_port) + self.shards_per_node > usize::from(u16::MAX) + 1 {
            return Err(format!(
                "--shard-port {} leaves no room for {} shards",
                self.shard_port, self.shards_per_node
            ));
        }
        Ok(())
    }

    pub fn world_size(&self) -> usize {
        self.shards_per_node * self.nnodes
    }

    /// The first node runs the router; the others only shards.
    pub fn is_first_node(&self) -> bool {
        self.node_rank == 0
    }

    /// The global ranks this launcher starts.
    pub fn local_ranks(&self) -> Range<usize> {
        let first = self.node_rank * self.shards_per_node;
        first..first + self.shards_per_node
    }

    pub fn listen(&self, rank: usize) -> ShardListen {
        if self.is_first_node() {
            ShardListen::Unix(PathBuf::from(format!("{}-{rank}", self.uds_prefix)))
        } else {
            ShardListen::Tcp {
                bind: self.bind_host.clone(),
                port: self.worker_port(rank),
            }
        }
    }

    /// Every rank's address as the first node's router dials it, rank 0 first (`check` made
    /// sure the first node knows every worker's address).
    pub fn router_addresses(&self) -> Vec<ShardAddress> {
        let first_node = (0..self.shards_per_node).map(|rank| self.listen(rank).local_address());
        let workers = self
            .worker_addresses
            .iter()
            .enumerate()
            .flat_map(|(index, host)| {
                let node = index + 1;
                (node * self.shards_per_node..(node + 1) * self.shards_per_node).map(move |rank| {
                    ShardAddress::Tcp(format!("http://{host}:{}", self.worker_port(rank)))
                })
            });
        first_node.chain(workers).collect()
    }

    /// The other nodes' ranks, which the first node waits for before it starts the router
    /// (none on the other nodes, which start no router).
    pub fn remote_addresses(&self) -> Vec<ShardAddress> {
        if !self.is_first_node() {
            return Vec::new();
        }
        self.router_addresses().split_off(self.shards_per_node)
    }

    fn worker_port(&self, rank: usize) -> u16 {
        // `check` made sure every local index fits.
        let local = u16::try_from(rank % self.shards_per_node).unwrap_or(u16::MAX);
        self.shard_port.saturating_add(local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn topology(flags: &[&str]) -> Result<Topology, String> {
        let argv = std::iter::once("sluice-launcher").chain(flags.iter().copied());
        Topology::from_args(&Args::try_parse_from(argv).expect("valid flags"))
    }

    #[test]
    fn one_machine_serves_every_rank_on_unix_sockets() {
        let one = topology(&["--num-shard", "3", "--shard-uds-path", "/tmp/s"]).expect("valid");
        assert_eq!(one.local_ranks(), 0..3);
        assert_eq!(
            one.router_addresses(),
            ["/tmp/s-0", "/tmp/s-1", "/tmp/s-2"].map(|path| ShardAddress::Unix(path.into()))
        );
        assert!(one.remote_addresses().is_empty());
    }

    #[test]
    fn the_first_node_dials_the_workers_ranks_over_tcp() {
        let first = topology(&[
            "--num-shard",
            "2",
            "--nnodes",
            "3",
            "--worker-addresses",
            "10.0.0.2,10.0.0.3",
            "--shard-port",
            "29600",
            "--shard-uds-path",
            "/tmp/s",
        ])
        .expect("valid");
        assert_eq!(first.world_size(), 6);
        assert_eq!(first.local_ranks(), 0..2);
        let tcp = |uri: &str| ShardAddress::Tcp(uri.to_owned());
        assert_eq!(
            first.router_addresses(),
            [
                ShardAddress::Unix("/tmp/s-0".into()),
                ShardAddress::Unix("/tmp/s-1".into()),
                tcp("http://10.0.0.2:29600"),
                tcp("http://10.0.0.2:29601"),
                tcp("http://10.0.0.3:29600"),
                tcp("http://10.0.0.3:29601"),
            ]
        );
        assert_eq!(first.remote_addresses().len(), 4);
    }

    #[test]
    fn a_worker_starts_its_ranks_on_tcp() {
        let worker = topology(&[
            "--num-shard",
            "2",
            "--nnodes",
            "3",
            "--node-rank",
            "2",
            "--shard-port",
            "29600",
            "--hostname",
            "0.0.0.0",
        ])
        .expect("valid");
        assert_eq!(worker.local_ranks(), 4..6);
        assert_eq!(
            worker.listen(5),
            ShardListen::Tcp {
                bind: "0.0.0.0".to_owned(),
                port: 29601
            }
        );
        assert_eq!(
            worker.listen(5).serve_flags(),
            ["--listen", "0.0.0.0:29601"]
        );
        assert!(worker.remote_addresses().is_empty());
    }

    #[test]
    fn inconsistent_nodes_are_refused() {
        for flags in [
            &["--nnodes", "0"][..],
            &["--nnodes", "2", "--node-rank", "2"],
            &["--nnodes", "2"],
            &["--nnodes", "2", "--worker-addresses", "a,b"],
        ] {
            assert!(topology(flags).is_err(), "{flags:?}");
        }
    }
}
