//! Checks that fail at once what would otherwise fail only after the model has loaded, which
//! can take minutes: the router's port already taken, the shards' socket directory not
//! writable.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::Path;

use crate::error::LauncherError;

/// The router binds `hostname:port` once the shards are ready; whether it could now.
pub fn check_port(hostname: &str, port: u16) -> Result<(), LauncherError> {
    match TcpListener::bind((hostname, port)) {
        // Dropped at once: the router binds it for real later.
        Ok(_) => Ok(()),
        Err(err) => Err(LauncherError::Preflight(match err.kind() {
            ErrorKind::AddrInUse => format!(
                "port {port} on {hostname} is already in use (another server?); choose another \
                 with --port"
            ),
            _ => format!("cannot listen on {hostname}:{port}: {err}"),
        })),
    }
}

/// The shards create their sockets as `{prefix}-{rank}`; whether files can be made there.
pub fn check_socket_prefix(prefix: &str) -> Result<(), LauncherError> {
    let probe = format!("{prefix}-probe-{}", std::process::id());
    let refused = |err: std::io::Error| {
        let dir = Path::new(prefix).parent().unwrap_or(Path::new("."));
        LauncherError::Preflight(format!(
            "the shards cannot create their sockets in {} (--shard-uds-path {prefix}): {err}",
            dir.display()
        ))
    };
    std::fs::File::create(&probe).map_err(refused)?;
    std::fs::remove_file(&probe).map_err(refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_named() {
        let taken = TcpListener::bind(("127.0.0.1", 0)).expect("a free port");
        let port = taken.local_addr().expect("bound").port();
        let message = check_port("127.0.0.1", port)
            .expect_err("in use")
            .to_string();
        assert!(message.contains(&format!("port {port}")), "{message}");
        assert!(message.contains("already in use"), "{message}");
        drop(taken);
        assert!(check_port("127.0.0.1", port).is_ok());
    }

    #[test]
    fn an_unwritable_socket_directory_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let prefix = dir.path().join("shard");
        assert!(check_socket_prefix(&prefix.to_string_lossy()).is_ok());
        let missing = dir.path().join("no-such-dir").join("shard");
        let message = check_socket_prefix(&missing.to_string_lossy())
            .expect_err("no directory")
            .to_string();
        assert!(message.contains("no-such-dir"), "{message}");
    }
}
