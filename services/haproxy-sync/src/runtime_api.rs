//! A client of HAProxy's Runtime API, as HAProxy wants it used (HAPROXY-NOTES.md): one
//! command per connection, `\n`-terminated, prefixed with `set severity-output number;` so
//! that errors read `[3]: message`; connect and read timeouts; commands to one instance one at
//! a time. Behind [`Transport`], so the same client runs over a direct socket (TCP or unix)
//! or, later, through the node's agent.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use checkplane_haproxy::relay::Settle;
use checkplane_wire::haproxy::ServerState as Wanted;

pub use checkplane_haproxy::socket::Endpoint;
use checkplane_haproxy::socket::{self as haproxy_socket, Limits};

use crate::replies::{self, Info, Malformed, ServerState, StatRow};

/// Largest reply read (a `show stat` of thousands of servers fits).
const MAX_REPLY: usize = 16 * 1024 * 1024;

/// What went wrong with a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No connection, a reset, a timeout: worth retrying, and counted by the breaker.
    #[error("{0}")]
    Unreachable(String),
    /// HAProxy's own answer (`No such server.`, `Permission denied`, ...): final.
    #[error("HAProxy: {0}")]
    Refused(String),
    /// The way to the instance is known to be closed (its node's agent is offline): final,
    /// and not the instance's fault, so not counted by the breaker.
    #[error("ERR_INSTANCE_UNAVAILABLE: {0}")]
    Unavailable(String),
    /// A reply of the wrong shape.
    #[error(transparent)]
    Malformed(#[from] Malformed),
}

impl ApiError {
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Unreachable(_))
    }
}

/// What a [`Transport`] brings back, in time.
pub type Reply<'a, T> = Pin<Box<dyn Future<Output = Result<T, ApiError>> + Send + 'a>>;

/// Carries one command to an instance and brings back its raw reply.
pub trait Transport: Send + Sync {
    fn send<'a>(&'a self, command: &'a str) -> Reply<'a, String>;

    /// Run `settle` ([`checkplane_haproxy::relay::settle`]) with no command sent at or after
    /// `not_after` (the lease margin: a set must reach HAProxy while the instance is ours):
    /// the raw replies. A transport with a cost per trip (the agent's) runs it in one.
    fn settle<'a>(
        &'a self,
        settle: &'a Settle,
        not_after: Instant,
    ) -> Reply<'a, Vec<Option<String>>> {
        Box::pin(settle_by_commands(self, settle, not_after))
    }
}

/// `settle` as one [`Transport::send`] per command, none at or after `not_after`.
pub async fn settle_by_commands<T: Transport + ?Sized>(
    transport: &T,
    settle: &Settle,
    not_after: Instant,
) -> Result<Vec<Option<String>>, ApiError> {
    checkplane_haproxy::relay::settle(settle, |line| async move {
        if Instant::now() >= not_after {
            return Err(ApiError::Unreachable(
                "the lease margin ran out before the command was sent".to_owned(),
            ));
        }
        transport.send(&line).await
    })
    .await
}

/// The direct transport: a socket of the instance's own, if `allowed` lets it be reached.
pub struct Direct {
    pub endpoint: Endpoint,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// `HAPROXY_ALLOWED_ADDRESSES`, checked before every connection (a socket path resolved,
    /// symlinks and all: a link in an allowed directory to a socket elsewhere is refused).
    pub allowed: std::sync::Arc<checkplane_wire::haproxy::AllowedAddresses>,
}

impl Direct {
    /// The endpoint to connect to, if it is allowed now: a socket path resolved (what is
    /// judged is what is connected to: a link swapped afterwards changes nothing). A refusal
    /// is final and not the instance's fault.
    async fn admitted(&self) -> Result<Endpoint, ApiError> {
        let (target, endpoint) = match &self.endpoint {
            Endpoint::Tcp(address) => (address.clone(), self.endpoint.clone()),
            // A path that does not resolve (no socket yet) is judged as written; connecting
            // to it fails anyway.
            Endpoint::Unix(path) => {
                let resolved = tokio::fs::canonicalize(path)
                    .await
                    .unwrap_or_else(|_| path.clone());
                (resolved.display().to_string(), Endpoint::Unix(resolved))
            }
        };
        self.allowed
            .permits(&target)
            .map_err(|why| ApiError::Unavailable(why.reason))?;
        Ok(endpoint)
    }
}

impl Transport for Direct {
    fn send<'a>(&'a self, command: &'a str) -> Reply<'a, String> {
        Box::pin(async move {
            let limits = Limits {
                connect_timeout: self.connect_timeout,
                read_timeout: self.read_timeout,
                max_reply: MAX_REPLY,
            };
            let endpoint = self.admitted().await?;
            haproxy_socket::exchange(&endpoint, command, limits)
                .await
                .map_err(|e| ApiError::Unreachable(e.0))
        })
    }
}

/// The Runtime API of one instance.
pub struct Client {
    transport: Box<dyn Transport>,
    /// One command at a time per instance.
    turn: tokio::sync::Mutex<()>,
}

/// `server` among a backend's servers, or HAProxy's own words for its absence.
fn find_server(servers: Vec<ServerState>, server: &str) -> Result<ServerState, ApiError> {
    servers
        .into_iter()
        .find(|s| s.server == server)
        .ok_or_else(|| ApiError::Refused("No such server.".to_owned()))
}

/// A raw reply as HAProxy meant it: its text, or its error (`[3]: No such server.`) as
/// [`ApiError::Refused`].
fn interpret(raw: &str) -> Result<String, ApiError> {
    replies::reply_body(raw).map_err(|refused| ApiError::Refused(refused.0))
}

/// A backend or server name safe to put in a command (no spaces, separators or newlines).
fn safe_name(name: &str) -> Result<&str, ApiError> {
    if checkplane_wire::haproxy::valid_name(name) {
        Ok(name)
    } else {
        Err(ApiError::Refused(format!(
            "{name:?} is not a valid proxy or server name"
        )))
    }
}

impl Client {
    pub fn new(transport: Box<dyn Transport>) -> Self {
        Self {
            transport,
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// Send `command` and return its reply, with HAProxy's errors as [`ApiError::Refused`].
    pub async fn command(&self, command: &str) -> Result<String, ApiError> {
        let _turn = self.turn.lock().await;
        let raw = self
            .transport
            .send(&format!(
                "{}{command}",
                checkplane_haproxy::relay::SEVERITY_PREFIX
            ))
            .await?;
        interpret(&raw)
    }

    pub async fn show_info(&self) -> Result<Info, ApiError> {
        Ok(replies::parse_info(&self.command("show info").await?)?)
    }

    pub async fn show_servers_state(
        &self,
        backend: Option<&str>,
    ) -> Result<Vec<ServerState>, ApiError> {
        let command = match backend {
            Some(b) => format!("show servers state {}", safe_name(b)?),
            None => "show servers state".to_owned(),
        };
        Ok(replies::parse_servers_state(
            &self.command(&command).await?,
        )?)
    }

    pub async fn show_stat(&self) -> Result<Vec<StatRow>, ApiError> {
        Ok(replies::parse_stat(&self.command("show stat").await?)?)
    }

    /// `show stat <backend> 4 <server id>`: the stats row of one server (type 4: servers).
    pub async fn show_stat_server(
        &self,
        backend: &str,
        server_id: u32,
    ) -> Result<Option<StatRow>, ApiError> {
        let command = format!("show stat {} 4 {server_id}", safe_name(backend)?);
        Ok(replies::parse_stat(&self.command(&command).await?)?
            .into_iter()
            .next())
    }

    /// `set server <backend>/<server> state <target>`: an empty reply is success.
    pub async fn set_state(
        &self,
        backend: &str,
        server: &str,
        target: Wanted,
    ) -> Result<(), ApiError> {
        let command = format!(
            "set server {}/{} state {}",
            safe_name(backend)?,
            safe_name(server)?,
            target.as_str()
        );
        let reply = self.command(&command).await?;
        if reply.trim().is_empty() {
            Ok(())
        } else {
            Err(ApiError::Refused(reply.trim().to_owned()))
        }
    }

    /// The state of one server, read back.
    pub async fn server(&self, backend: &str, server: &str) -> Result<ServerState, ApiError> {
        find_server(
            replies::parse_servers_state(
                &self
                    .command(&format!("show servers state {}", safe_name(backend)?))
                    .await?,
            )?,
            server,
        )
    }

    /// In one turn, an action's exchange ([`Settle`]): read the server's state, set it to
    /// `target` unless it is already there, read it back, and (with `stat`) read its stats
    /// row; no command is sent at or after `not_after`. A refused `set` stops there.
    pub async fn settle(
        &self,
        backend: &str,
        server: &str,
        target: Wanted,
        stat: bool,
        not_after: Instant,
    ) -> Result<Settled, ApiError> {
        let settle = Settle {
            backend: safe_name(backend)?.to_owned(),
            server: safe_name(server)?.to_owned(),
            state: target,
            stat,
        };
        let raws = {
            let _turn = self.turn.lock().await;
            self.transport.settle(&settle, not_after).await?
        };
        let mut raws = raws.into_iter();
        let missing = || ApiError::Unreachable("a reply is missing".to_owned());
        let before = raws.next().flatten().ok_or_else(missing)?;
        let before = find_server(replies::parse_servers_state(&interpret(&before)?)?, server)?;
        let already = match raws.next().ok_or_else(missing)? {
            None => true,
            Some(set) => {
                let reply = interpret(&set)?;
                if !reply.trim().is_empty() {
                    return Err(ApiError::Refused(reply.trim().to_owned()));
                }
                false
            }
        };
        let after = raws.next().flatten().ok_or_else(missing)?;
        let after = find_server(replies::parse_servers_state(&interpret(&after)?)?, server)?;
        let stat = match stat {
            true => {
                let row = raws.next().flatten().ok_or_else(missing)?;
                replies::parse_stat(&interpret(&row)?)?.into_iter().next()
            }
            false => None,
        };
        Ok(Settled {
            before,
            already,
            after,
            stat,
        })
    }
}

/// What an action's exchange found and left.
#[derive(Debug, Clone)]
pub struct Settled {
    pub before: ServerState,
    /// The server was in the target state already: nothing was set.
    pub already: bool,
    pub after: ServerState,
    /// Its stats row, by the id the read-back shows, when asked for.
    pub stat: Option<StatRow>,
}
