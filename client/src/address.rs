//! Where a shard listens: a unix socket on this machine, or a TCP address (`http://host:port`)
//! for a rank on another machine.

use std::convert::Infallible;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardAddress {
    Unix(PathBuf),
    /// An `http://host:port` URI.
    Tcp(String),
}

impl FromStr for ShardAddress {
    type Err = Infallible;

    /// `http://host:port` is a TCP address; anything else is a socket path.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(if text.starts_with("http://") {
            Self::Tcp(text.to_owned())
        } else {
            Self::Unix(PathBuf::from(text))
        })
    }
}

impl fmt::Display for ShardAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
            Self::Tcp(uri) => f.write_str(uri),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_uri_is_tcp_and_anything_else_a_socket_path() {
        assert_eq!(
            "http://10.0.0.2:29600".parse(),
            Ok(ShardAddress::Tcp("http://10.0.0.2:29600".to_owned()))
        );
        assert_eq!(
            "/tmp/sluice-server-0".parse(),
            Ok(ShardAddress::Unix("/tmp/sluice-server-0".into()))
        );
        assert_eq!(
            ShardAddress::Unix("/tmp/s-0".into()).to_string(),
            "unix:///tmp/s-0"
        );
    }
}
