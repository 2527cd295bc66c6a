//! One exchange with an HAProxy Runtime API socket, as HAProxy wants it (HAPROXY-NOTES.md):
//! connect, write one `\n`-terminated line, read until HAProxy closes the connection. Used by
//! haproxy-sync's direct transport and by the agent that relays commands to its host's
//! HAProxy, so both talk to the socket the same way.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where a Runtime API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port`
    Tcp(String),
    Unix(PathBuf),
}

impl Endpoint {
    /// An absolute path is a unix socket, anything else `host:port`.
    pub fn parse(address: &str) -> Self {
        if address.starts_with('/') {
            Self::Unix(PathBuf::from(address))
        } else {
            Self::Tcp(address.to_owned())
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp {a}"),
            Self::Unix(p) => write!(f, "unix {}", p.display()),
        }
    }
}

/// The socket could not be reached, broke, stayed silent, or said too much: nothing HAProxy
/// itself answered, so worth retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// How one exchange is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connect_timeout: Duration,
    /// For writing the command and reading the whole reply.
    pub read_timeout: Duration,
    /// Largest reply accepted (bytes).
    pub max_reply: usize,
}

async fn talk<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    line: &str,
    limits: Limits,
) -> Result<String, Unreachable> {
    let io = |e: std::io::Error| Unreachable(format!("talking to HAProxy: {e}"));
    let exchange = async {
        stream
            .write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(io)?;
        // HAProxy closes the connection after the reply.
        let mut reply = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = stream.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                break;
            }
            if reply.len() + n > limits.max_reply {
                return Err(Unreachable(format!(
                    "a reply over {} bytes",
                    limits.max_reply
                )));
            }
            reply.extend_from_slice(&chunk[..n]);
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    };
    tokio::time::timeout(limits.read_timeout, exchange)
        .await
        .map_err(|_| {
            Unreachable(format!(
                "no reply within {} ms",
                limits.read_timeout.as_millis()
            ))
        })?
}

/// Send `line` (without its `\n`) to `endpoint` on a connection of its own and return the raw
/// reply.
pub async fn exchange(
    endpoint: &Endpoint,
    line: &str,
    limits: Limits,
) -> Result<String, Unreachable> {
    let connect_failed = |e: std::io::Error| Unreachable(format!("connecting to {endpoint}: {e}"));
    let timed_out = |_| {
        Unreachable(format!(
            "connecting to {endpoint}: no answer within {} ms",
            limits.connect_timeout.as_millis()
        ))
    };
    match endpoint {
        Endpoint::Tcp(addr) => {
            let stream = tokio::time::timeout(
                limits.connect_timeout,
                tokio::net::TcpStream::connect(addr.as_str()),
            )
            .await
            .map_err(timed_out)?
            .map_err(connect_failed)?;
            talk(stream, line, limits).await
        }
        Endpoint::Unix(path) => {
            let stream = tokio::time::timeout(
                limits.connect_timeout,
                tokio::net::UnixStream::connect(path),
            )
            .await
            .map_err(timed_out)?
            .map_err(connect_failed)?;
            talk(stream, line, limits).await
        }
    }
}
