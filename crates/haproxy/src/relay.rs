//! What checkplane sends to HAProxy's Runtime API, and how a command travels to a node's
//! agent: the severity prefix every command carries, the relayed task specs, the one exchange
//! of an action ([`settle`]) and the allow-list a relaying agent checks ([`relayable`]).

use checkplane_wire::error::Invalid;
use checkplane_wire::haproxy::{valid_name, ServerState};
use serde::{Deserialize, Serialize};

/// What every command starts with, so that HAProxy's errors read `[3]: message`.
pub const SEVERITY_PREFIX: &str = "set severity-output number; ";

/// The task kind that carries Runtime API commands to the agent on an HAProxy host.
pub use checkplane_wire::haproxy::RELAY_KIND;

/// A command a node's agent relays to its HAProxy (the spec of a `haproxy` task).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayedCommand {
    pub instance_id: String,
    /// The whole line, [`SEVERITY_PREFIX`] included.
    pub command: String,
    /// Commands to send after `command`, in order, each on a connection of its own (at most
    /// [`MAX_RELAYED_THEN`]): a set and its read-back travel as one task. The reply then
    /// lists every command's reply (`replies`), or fails at the first that could not be sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub then: Vec<String>,
    /// When the asker stops waiting (ms since the epoch): later, the agent does not send it.
    pub deadline_ms: i64,
}

/// The most commands a relayed task carries after its first.
pub const MAX_RELAYED_THEN: usize = 3;

/// An action's whole exchange with one server, run where the socket is (by the node's agent,
/// in one trip): read the server's state; unless it is already `state`, set it; read it back;
/// with `stat`, read its stats row (by the id the read-back shows). See [`settle`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settle {
    pub backend: String,
    pub server: String,
    pub state: ServerState,
    #[serde(default)]
    pub stat: bool,
}

impl Settle {
    /// Names as [`valid_name`] allows them and a state HAProxy can be set to.
    pub fn validate(&self) -> Result<(), Invalid> {
        if !valid_name(&self.backend) || !valid_name(&self.server) {
            return Err(Invalid::new(
                "backend, server",
                "not valid proxy or server names",
            ));
        }
        Ok(())
    }
    fn read(&self) -> String {
        format!("{SEVERITY_PREFIX}show servers state {}", self.backend)
    }
    fn set(&self) -> String {
        format!(
            "{SEVERITY_PREFIX}set server {}/{} state {}",
            self.backend,
            self.server,
            self.state.as_str()
        )
    }
    fn stat_row(&self, server_id: u32) -> String {
        format!("{SEVERITY_PREFIX}show stat {} 4 {server_id}", self.backend)
    }
}

/// The spec of a `haproxy` task that carries a [`Settle`] (an agent from before settles
/// refuses it as `ERR_BAD_SPEC`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayedSettle {
    pub instance_id: String,
    pub settle: Settle,
    /// When the asker stops waiting (ms since the epoch): no command is sent later.
    pub deadline_ms: i64,
}

/// Run `settle`, each raw line through `send` (one connection each): the raw replies, in
/// order — before, the set's (`None` when the server was already there), after, the stats
/// row's (only with `stat`); the state replies cut to the server's line. It stops early, with fewer replies, where going on makes no sense:
/// the server is not in the first reply (or it is HAProxy's error), the set was refused, the
/// read-back lacks the server. The asker reads the replies (`already` is the set's `None`);
/// this only decides what to send next, with the same parsers.
pub async fn settle<F, Fut, E>(settle: &Settle, mut send: F) -> Result<Vec<Option<String>>, E>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<String, E>>,
{
    use crate::replies::{parse_servers_state, reply_body, ServerState};
    let find = |raw: &str| -> Option<ServerState> {
        let body = reply_body(raw).ok()?;
        parse_servers_state(&body)
            .ok()?
            .into_iter()
            .find(|s| s.server == settle.server)
    };
    let mut replies = Vec::with_capacity(4);
    let before = send(settle.read()).await?;
    let state = find(&before);
    replies.push(Some(cut_to_server(before, &settle.server)));
    let Some(state) = state else {
        return Ok(replies);
    };
    if state.admin_state.state() == settle.state {
        replies.push(None);
    } else {
        let set = send(settle.set()).await?;
        let refused = reply_body(&set).map_or(true, |body| !body.trim().is_empty());
        replies.push(Some(set));
        if refused {
            return Ok(replies);
        }
    }
    let after = send(settle.read()).await?;
    let server_id = find(&after).map(|s| s.server_id);
    replies.push(Some(cut_to_server(after, &settle.server)));
    if let (true, Some(id)) = (settle.stat, server_id) {
        replies.push(Some(send(settle.stat_row(id)).await?));
    }
    Ok(replies)
}

/// A raw `show servers state` reply cut to its format line, its header and the lines of
/// `server` (a backend of a thousand servers replies ~200 kB; an action needs one line). Any
/// other reply (HAProxy's error, another shape) is kept whole.
fn cut_to_server(raw: String, server: &str) -> String {
    let Ok(body) = crate::replies::reply_body(&raw) else {
        return raw;
    };
    let mut lines = body.lines().filter(|l| !l.trim().is_empty());
    let (Some(format), Some(header)) = (lines.next(), lines.next()) else {
        return raw;
    };
    let Some(at) = header
        .strip_prefix('#')
        .and_then(|h| h.split_whitespace().position(|n| n == "srv_name"))
    else {
        return raw;
    };
    let mut cut = format!("\n{format}\n{header}\n");
    for line in lines.filter(|l| l.split_whitespace().nth(at) == Some(server)) {
        cut.push_str(line);
        cut.push('\n');
    }
    cut.push('\n');
    cut
}

/// Whether `line` is one of the commands checkplane sends, and nothing else: the relaying
/// agent refuses any other (a compromised control plane cannot `shutdown sessions` or read
/// `show env` through it). `[SEVERITY_PREFIX]` then `show info`, `show stat [<backend> 4
/// <server id>]`, `show servers state [<backend>]` or `set server <backend>/<server> state
/// ready|drain|maint`, names as [`valid_name`] allows.
pub fn relayable(line: &str) -> bool {
    let Some(command) = line.strip_prefix(SEVERITY_PREFIX) else {
        return false;
    };
    let words: Vec<&str> = command.split(' ').collect();
    match words.as_slice() {
        ["show", "info"] | ["show", "stat"] | ["show", "servers", "state"] => true,
        ["show", "servers", "state", backend] => valid_name(backend),
        // One server's stats row: proxy, type 4 (servers), server id.
        ["show", "stat", backend, "4", id] => {
            valid_name(backend)
                && !id.is_empty()
                && id.len() <= 10
                && id.bytes().all(|b| b.is_ascii_digit())
        }
        ["set", "server", target, "state", state] => {
            state.parse::<ServerState>().is_ok()
                && target
                    .split_once('/')
                    .is_some_and(|(b, s)| valid_name(b) && valid_name(s))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_settle(
        settle_: &Settle,
        admin: u32,
        set_reply: &str,
    ) -> (Vec<String>, Vec<Option<String>>) {
        use std::future::Future as _;
        let mut sent = Vec::new();
        let mut admin = admin;
        let state = |admin: u32| {
            format!("\n1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord\n3 be 7 s1 127.0.0.1 2 {admin} 1 1 2 6 3 4 6 0 0 0 - 18101 -\n3 be 8 s2 127.0.0.1 2 0 1 1 2 6 3 4 6 0 0 0 - 18102 -\n\n")
        };
        let future = settle(settle_, |line: String| {
            sent.push(line.strip_prefix(SEVERITY_PREFIX).unwrap_or("?").to_owned());
            let reply = if line.contains("set server") {
                if set_reply == "\n\n" {
                    admin = 8;
                }
                set_reply.to_owned()
            } else if line.contains("show stat") {
                "\n# pxname,svname,scur,\nbe,s1,0,\n\n".to_owned()
            } else {
                state(admin)
            };
            std::future::ready(Ok::<_, ()>(reply))
        });
        let mut future = Box::pin(future);
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        let std::task::Poll::Ready(Ok(replies)) = future.as_mut().poll(&mut context) else {
            panic!("a settle over ready replies is ready");
        };
        drop(future);
        (sent, replies)
    }

    #[test]
    fn a_settle_sets_only_what_is_not_there_and_reads_back() {
        let drain = |stat| Settle {
            backend: "be".into(),
            server: "s1".into(),
            state: ServerState::Drain,
            stat,
        };
        let (sent, replies) = run_settle(&drain(true), 0, "\n\n");
        assert_eq!(
            sent,
            [
                "show servers state be",
                "set server be/s1 state drain",
                "show servers state be",
                "show stat be 4 7"
            ]
        );
        assert_eq!(replies.len(), 4);
        assert!(replies[2]
            .as_ref()
            .unwrap()
            .contains(" 7 s1 127.0.0.1 2 8 "));
        // The state replies keep only the server's line (with the format and header lines).
        for reply in [&replies[0], &replies[2]] {
            let body = crate::replies::reply_body(reply.as_ref().unwrap()).unwrap();
            let servers = crate::replies::parse_servers_state(&body).unwrap();
            assert_eq!(servers.len(), 1, "{body}");
            assert_eq!(
                (servers[0].server.as_str(), servers[0].server_id),
                ("s1", 7)
            );
        }
        // Already drained: no set, its place empty.
        let (sent, replies) = run_settle(&drain(false), 8, "\n\n");
        assert_eq!(sent, ["show servers state be", "show servers state be"]);
        assert_eq!(replies[1], None);
        // A refused set stops there; so does a server the first read lacks.
        let (sent, replies) = run_settle(&drain(true), 0, "\n[3]: Permission denied\n\n");
        assert_eq!(sent.len(), 2);
        assert_eq!(replies.len(), 2);
        let other = Settle {
            server: "s9".into(),
            ..drain(true)
        };
        let (sent, replies) = run_settle(&other, 0, "\n\n");
        assert_eq!((sent.len(), replies.len()), (1, 1));
        assert!(other.validate().is_ok());
        // A state HAProxy cannot be set to does not make a settle at all.
        let mut stopped = serde_json::to_value(drain(true)).unwrap();
        stopped["state"] = "stopped".into();
        assert!(serde_json::from_value::<Settle>(stopped).is_err());
        assert!(Settle {
            backend: "be x".into(),
            ..drain(true)
        }
        .validate()
        .is_err());
    }

    #[test]
    fn only_the_commands_checkplane_sends_are_relayable() {
        for ok in [
            "show info",
            "show stat",
            "show servers state",
            "show servers state be_app",
            "set server be_app/s1 state drain",
            "set server be.x/s-1:2 state ready",
            "set server b/s state maint",
            "show stat be_app 4 12",
        ] {
            assert!(relayable(&format!("{SEVERITY_PREFIX}{ok}")), "{ok}");
        }
        for bad in [
            "show env",
            "shutdown sessions server be/s1",
            "show info; shutdown frontend fe",
            "set server be/s1 state stopped",
            "set server be/s1 addr 10.0.0.1",
            "set server be state drain",
            "show servers state a b",
            "show servers state a;b",
            "show stat\nshow env",
            "show  info",
            "show stat be_app 2 1",
            "show stat be_app 4 x",
            "",
        ] {
            assert!(!relayable(&format!("{SEVERITY_PREFIX}{bad}")), "{bad}");
        }
        assert!(!relayable("show info"), "without the prefix");
    }
}
