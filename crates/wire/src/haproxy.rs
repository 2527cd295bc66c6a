//! HAProxy instances, backends and servers: their ids (derived, so every replica and every
//! poll agrees) and the bodies of the instance API.

use serde::{Deserialize, Serialize};

/// Namespace of the derived ids (a fixed random UUID).
const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5f0c_2b7e_9a41_4d3c_8e6f_1a2b_3c4d_5e6f);

fn derived(prefix: &str, parts: &[&str]) -> String {
    // A unit separator cannot appear in a name (they are checked), so parts never run together.
    let id = uuid::Uuid::new_v5(&NAMESPACE, parts.join("\u{1f}").as_bytes());
    format!("{prefix}{}", &id.simple().to_string()[..20])
}

/// The id of `backend` of `instance`.
pub fn backend_id(instance: &str, backend: &str) -> String {
    derived("hpb-", &[instance, backend])
}

/// The id of `server` of `backend` of `instance`.
pub fn server_id(instance: &str, backend: &str, server: &str) -> String {
    derived("hps-", &[instance, backend, server])
}

/// The id of the event a poll makes about a server.
pub fn poll_event_id(instance: &str, poll: i64, backend: &str, server: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &NAMESPACE,
        [instance, &poll.to_string(), backend, server]
            .join("\u{1f}")
            .as_bytes(),
    )
}

/// A proxy or server name as HAProxy allows them (and as the Runtime API can carry them).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// What every command starts with, so that HAProxy's errors read `[3]: message`.
pub const SEVERITY_PREFIX: &str = "set severity-output number; ";

/// The task kind that carries Runtime API commands to the agent on an HAProxy host.
pub const RELAY_KIND: &str = "haproxy";

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
    /// `ready`, `drain` or `maint`.
    pub state: String,
    #[serde(default)]
    pub stat: bool,
}

impl Settle {
    /// Names as [`valid_name`] allows them and a state HAProxy can be set to.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_name(&self.backend) || !valid_name(&self.server) {
            return Err("backend, server: not valid proxy or server names".into());
        }
        if !["ready", "drain", "maint"].contains(&self.state.as_str()) {
            return Err("state: expected ready, drain or maint".into());
        }
        Ok(())
    }
    fn read(&self) -> String {
        format!("{SEVERITY_PREFIX}show servers state {}", self.backend)
    }
    fn set(&self) -> String {
        format!(
            "{SEVERITY_PREFIX}set server {}/{} state {}",
            self.backend, self.server, self.state
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
    use crate::haproxy_replies::{parse_servers_state, reply_body, ServerState};
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
    if state.admin_state.name() == settle.state {
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
    let Ok(body) = crate::haproxy_replies::reply_body(&raw) else {
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
            ["ready", "drain", "maint"].contains(state)
                && target
                    .split_once('/')
                    .is_some_and(|(b, s)| valid_name(b) && valid_name(s))
        }
        _ => false,
    }
}

/// `POST /v1/haproxy/instances`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterInstance {
    pub name: String,
    /// `direct` (default) or `agent`.
    #[serde(default)]
    pub transport: Option<String>,
    /// `host:port` or an absolute unix socket path (direct). With transport `agent` the
    /// node's agent uses the socket it is configured with (`AGENT_HAPROXY_SOCKET`); an
    /// address given then only records that path.
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub node: Option<String>,
}

impl RegisterInstance {
    /// Check every field; the error names it.
    pub fn validate(&self) -> Result<(String, String, String, Option<String>), String> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err("name: 1-128 characters, no control characters".into());
        }
        let transport = self.transport.as_deref().unwrap_or("direct");
        if !["direct", "agent"].contains(&transport) {
            return Err("transport: expected direct or agent".into());
        }
        let address = self.address.trim();
        let path_like = address.starts_with('/') && address.len() <= 100 && !address.contains('\0');
        let host_port = address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && host.len() <= 255 && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        match transport {
            "agent" if !(address.is_empty() || path_like) => {
                return Err(
                    "address: empty, or the unix socket path on the node (absolute, at most 100 characters)"
                        .into(),
                )
            }
            "direct" if !(path_like || host_port) => {
                return Err("address: host:port or an absolute unix socket path".into())
            }
            _ => {}
        }
        if transport == "agent" && self.node.is_none() {
            return Err(
                "node: required with transport agent (the agent on the HAProxy host)".into(),
            );
        }
        if let Some(node) = &self.node {
            if node.is_empty() || node.len() > 64 {
                return Err("node: 1-64 characters".into());
            }
        }
        Ok((
            name.to_owned(),
            transport.to_owned(),
            address.to_owned(),
            self.node.clone(),
        ))
    }
}

/// Most addresses one application lists.
pub const MAX_APPLICATION_ADDRESSES: usize = 256;
/// Most applications in one group.
pub const MAX_GROUP_APPLICATIONS: usize = 256;

/// An application or group name: 1-63 of `a-z 0-9 -`, starting with a letter or digit. No
/// `_`, so that a server name `{hostname}_{app_name}_{instance}` splits one way only.
pub fn valid_application_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `POST /v1/applications`: an application, linked to the HAProxy servers at one of its
/// `addresses` and its `port` when it has a port, else to the servers named
/// `{hostname}_{name}_{instance}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApplication {
    pub name: String,
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub addresses: Vec<String>,
}

impl CreateApplication {
    /// Check every field (the error names it): the name, the port and the addresses (IPs,
    /// in their canonical form), which come together.
    pub fn validate(&self) -> Result<(String, Option<u16>, Vec<String>), String> {
        if !valid_application_name(&self.name) {
            return Err("name: 1-63 of a-z 0-9 - (no _), not starting with -".into());
        }
        let port = match self.port {
            None => None,
            Some(p) => Some(
                u16::try_from(p)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or("port: 1-65535")?,
            ),
        };
        if self.addresses.len() > MAX_APPLICATION_ADDRESSES {
            return Err(format!("addresses: at most {MAX_APPLICATION_ADDRESSES}"));
        }
        let mut addresses = Vec::with_capacity(self.addresses.len());
        for (i, a) in self.addresses.iter().enumerate() {
            let ip: std::net::IpAddr = a
                .parse()
                .map_err(|_| format!("addresses[{i}]: not an IP address"))?;
            let ip = ip.to_canonical().to_string();
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
        match (port, addresses.is_empty()) {
            (Some(_), true) => {
                return Err(
                    "addresses: required with a port (servers are linked by IP:port)".into(),
                )
            }
            (None, false) => {
                return Err("port: required with addresses (servers are linked by IP:port)".into())
            }
            _ => {}
        }
        Ok((self.name.clone(), port, addresses))
    }
}

/// `POST /v1/application-groups`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    pub name: String,
    /// Application ids.
    pub applications: Vec<String>,
}

impl CreateGroup {
    pub fn validate(&self) -> Result<(String, Vec<String>), String> {
        if !valid_application_name(&self.name) {
            return Err("name: 1-63 of a-z 0-9 - (no _), not starting with -".into());
        }
        if self.applications.is_empty() || self.applications.len() > MAX_GROUP_APPLICATIONS {
            return Err(format!(
                "applications: 1-{MAX_GROUP_APPLICATIONS} application ids"
            ));
        }
        let mut ids: Vec<String> = Vec::with_capacity(self.applications.len());
        for (i, id) in self.applications.iter().enumerate() {
            if !(id.len() == 24
                && id.starts_with("app-")
                && id[4..].bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(format!("applications[{i}]: not an application id"));
            }
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        Ok((self.name.clone(), ids))
    }
}

/// `POST /v1/haproxy/servers/{id}/action`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: String,
    pub idempotency_key: String,
    /// For drain: wait up to this long (ms, at most 300000) for sessions to reach 0.
    #[serde(default)]
    pub drain_wait_ms: u64,
}

/// Longest drain wait.
pub const MAX_DRAIN_WAIT_MS: u64 = 300_000;

impl ActionRequest {
    pub fn validate(&self) -> Result<(), String> {
        if !["drain", "maint", "ready"].contains(&self.action.as_str()) {
            return Err("action: expected drain, maint or ready".into());
        }
        let key = &self.idempotency_key;
        if key.is_empty()
            || key.len() > 128
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err("idempotency_key: 1-128 of A-Z a-z 0-9 - _ . :".into());
        }
        if self.drain_wait_ms > MAX_DRAIN_WAIT_MS {
            return Err(format!("drain_wait_ms: at most {MAX_DRAIN_WAIT_MS}"));
        }
        if self.drain_wait_ms > 0 && self.action != "drain" {
            return Err("drain_wait_ms: only with action drain".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(
            server_id("hpi-1", "be", "s1"),
            server_id("hpi-1", "be", "s1")
        );
        assert_ne!(
            server_id("hpi-1", "be", "s1"),
            server_id("hpi-1", "bes", "1")
        );
        assert_ne!(backend_id("hpi-1", "be"), backend_id("hpi-2", "be"));
        assert!(server_id("a", "b", "c").starts_with("hps-"));
        assert_ne!(
            poll_event_id("i", 1, "b", "s"),
            poll_event_id("i", 2, "b", "s")
        );
    }

    /// Run a settle against a table of replies by line (the decisions only: the exchanges
    /// with a real HAProxy are the relay's and the executor's tests).
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
            state: "drain".into(),
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
            let body = crate::haproxy_replies::reply_body(reply.as_ref().unwrap()).unwrap();
            let servers = crate::haproxy_replies::parse_servers_state(&body).unwrap();
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
        assert!(Settle {
            state: "stopped".into(),
            ..drain(true)
        }
        .validate()
        .is_err());
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

    #[test]
    fn applications_are_validated_field_by_field() {
        let app = |name: &str, port: Option<u32>, addresses: &[&str]| CreateApplication {
            name: name.into(),
            port,
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
        };
        assert_eq!(
            app("shop", None, &[]).validate(),
            Ok(("shop".into(), None, vec![]))
        );
        assert_eq!(
            app(
                "shop-api",
                Some(8080),
                &["10.0.0.1", "::ffff:10.0.0.2", "10.0.0.1"]
            )
            .validate(),
            Ok((
                "shop-api".into(),
                Some(8080),
                vec!["10.0.0.1".into(), "10.0.0.2".into()]
            ))
        );
        for (bad, field) in [
            (app("Shop", None, &[]), "name"),
            (app("shop_api", None, &[]), "name"),
            (app("-shop", None, &[]), "name"),
            (app("", None, &[]), "name"),
            (app("shop", Some(0), &["10.0.0.1"]), "port"),
            (app("shop", Some(70000), &["10.0.0.1"]), "port"),
            (app("shop", Some(80), &[]), "addresses"),
            (app("shop", None, &["10.0.0.1"]), "port"),
            (app("shop", Some(80), &["10.0.0.1", "web1"]), "addresses[1]"),
        ] {
            let error = bad.validate().unwrap_err();
            assert!(error.starts_with(field), "{error}");
        }
        let group = |apps: &[&str]| CreateGroup {
            name: "front".into(),
            applications: apps.iter().map(|a| (*a).to_owned()).collect(),
        };
        assert!(group(&["app-0123456789abcdef0123"]).validate().is_ok());
        assert!(group(&[])
            .validate()
            .unwrap_err()
            .starts_with("applications"));
        assert!(group(&["app-x"])
            .validate()
            .unwrap_err()
            .starts_with("applications[0]"));
    }

    #[test]
    fn registration_is_validated_field_by_field() {
        let ok = |address: &str| RegisterInstance {
            name: "lb1".into(),
            transport: None,
            address: address.into(),
            node: None,
        };
        assert!(ok("127.0.0.1:9999").validate().is_ok());
        assert!(ok("/run/haproxy/admin.sock").validate().is_ok());
        assert!(ok("[::1]:9999").validate().is_ok());
        for bad in ["", "nohost", "host:0", "host:99999", "relative/path.sock"] {
            assert!(
                ok(bad).validate().unwrap_err().starts_with("address"),
                "{bad}"
            );
        }
        let agent = RegisterInstance {
            transport: Some("agent".into()),
            ..ok("/run/h.sock")
        };
        assert!(agent.validate().unwrap_err().starts_with("node"));
        let odd = RegisterInstance {
            transport: Some("ssh".into()),
            ..ok("/x")
        };
        assert!(odd.validate().unwrap_err().starts_with("transport"));
    }
}
