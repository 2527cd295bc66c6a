//! A client of HAProxy's Runtime API, as HAProxy wants it used (HAPROXY-NOTES.md): one
//! command per connection, `\n`-terminated, prefixed with `set severity-output number;` so
//! that errors read `[3]: message`; connect and read timeouts; commands to one instance one at
//! a time. Behind [`Transport`], so the same client runs over a direct socket (TCP or unix)
//! or, later, through the node's agent.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use checkplane_runtime::haproxy_socket::Endpoint;
use checkplane_runtime::haproxy_socket::{self, Limits};

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

/// Carries one command to an instance and brings back its raw reply.
pub trait Transport: Send + Sync {
    fn send<'a>(
        &'a self,
        command: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, ApiError>> + Send + 'a>>;

    /// Several commands in order, each on a connection of its own: every raw reply, or the
    /// error of the first that could not be sent (nothing after it is sent). A transport
    /// with a cost per trip (the agent's) carries them in one.
    fn send_all<'a>(
        &'a self,
        commands: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Result<Vec<String>, ApiError>> + Send + 'a>> {
        Box::pin(async move {
            let mut replies = Vec::with_capacity(commands.len());
            for command in commands {
                replies.push(self.send(command).await?);
            }
            Ok(replies)
        })
    }
}

/// The direct transport: a socket of the instance's own.
pub struct Direct {
    pub endpoint: Endpoint,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl Transport for Direct {
    fn send<'a>(
        &'a self,
        command: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<String, ApiError>> + Send + 'a>> {
        Box::pin(async move {
            let limits = Limits {
                connect_timeout: self.connect_timeout,
                read_timeout: self.read_timeout,
                max_reply: MAX_REPLY,
            };
            haproxy_socket::exchange(&self.endpoint, command, limits)
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

/// A server state an operator can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Ready,
    Drain,
    Maint,
}

impl Target {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ready" => Some(Self::Ready),
            "drain" => Some(Self::Drain),
            "maint" => Some(Self::Maint),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Drain => "drain",
            Self::Maint => "maint",
        }
    }
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
    // The prefix's own (empty) reply comes first; a blank line ends the reply.
    let body = raw.strip_prefix('\n').unwrap_or(raw);
    let body = body.trim_end_matches('\n');
    if let Some(rest) = body.strip_prefix('[') {
        if let Some((level, message)) = rest.split_once("]: ") {
            if level.parse::<u8>().is_ok_and(|l| l <= 3) {
                return Err(ApiError::Refused(message.trim().to_owned()));
            }
        }
    }
    Ok(format!("{body}\n"))
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
                checkplane_wire::haproxy::SEVERITY_PREFIX
            ))
            .await?;
        interpret(&raw)
    }

    /// Send `commands` in order in one turn (each on its own connection; through the agent,
    /// as one task): each one's reply or HAProxy's error, or the error that stopped them.
    pub async fn commands(
        &self,
        commands: &[String],
    ) -> Result<Vec<Result<String, ApiError>>, ApiError> {
        let _turn = self.turn.lock().await;
        let lines: Vec<String> = commands
            .iter()
            .map(|c| format!("{}{c}", checkplane_wire::haproxy::SEVERITY_PREFIX))
            .collect();
        let raws = self.transport.send_all(&lines).await?;
        if raws.len() != lines.len() {
            return Err(ApiError::Unreachable(format!(
                "{} replies to {} commands",
                raws.len(),
                lines.len()
            )));
        }
        Ok(raws.iter().map(|raw| interpret(raw)).collect())
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
        target: Target,
    ) -> Result<(), ApiError> {
        let command = format!(
            "set server {}/{} state {}",
            safe_name(backend)?,
            safe_name(server)?,
            target.name()
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

    /// In one turn: `set` the server to `target` (when given), read its state back, and read
    /// its stats row (when `stat_id`, its numeric id, is given). A refused `set` stops there.
    pub async fn settle(
        &self,
        backend: &str,
        server: &str,
        target: Option<Target>,
        stat_id: Option<u32>,
    ) -> Result<(ServerState, Option<StatRow>), ApiError> {
        let (backend, name) = (safe_name(backend)?, safe_name(server)?);
        let mut commands = Vec::with_capacity(3);
        if let Some(target) = target {
            commands.push(format!(
                "set server {backend}/{name} state {}",
                target.name()
            ));
        }
        commands.push(format!("show servers state {backend}"));
        if let Some(id) = stat_id {
            commands.push(format!("show stat {backend} 4 {id}"));
        }
        let mut replies = self.commands(&commands).await?.into_iter();
        let mut next = || {
            replies
                .next()
                .unwrap_or_else(|| Err(ApiError::Unreachable("a reply is missing".to_owned())))
        };
        if target.is_some() {
            let reply = next()?;
            if !reply.trim().is_empty() {
                return Err(ApiError::Refused(reply.trim().to_owned()));
            }
        }
        let after = find_server(replies::parse_servers_state(&next()?)?, server)?;
        let stat = match stat_id {
            Some(_) => replies::parse_stat(&next()?)?.into_iter().next(),
            None => None,
        };
        Ok((after, stat))
    }
}
