//! HAProxy instances, backends and servers: their ids (derived, so every replica and every
//! poll agrees) and the bodies of the instance API.

use serde::{Deserialize, Serialize};

use crate::error::Invalid;

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

/// The task kind that carries Runtime API commands to the agent on an HAProxy host.
pub const RELAY_KIND: &str = crate::kinds::Kind::Haproxy.as_str();

/// A server state an action asks for (`set server <b>/<s> state <it>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    Ready,
    Drain,
    Maint,
}

impl ServerState {
    pub const ALL: [ServerState; 3] = [ServerState::Ready, ServerState::Drain, ServerState::Maint];

    /// Its name in the API and in HAProxy's command.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Drain => "drain",
            Self::Maint => "maint",
        }
    }
}

impl std::str::FromStr for ServerState {
    type Err = ();

    fn from_str(name: &str) -> Result<Self, ()> {
        Self::ALL.into_iter().find(|s| s.as_str() == name).ok_or(())
    }
}

/// How haproxy-sync reaches an instance's Runtime API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Its socket, from haproxy-sync's host.
    Direct,
    /// Through the agent on the HAProxy node, as leased tasks.
    Agent,
}

impl Transport {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Agent => "agent",
        }
    }

    /// A stored or asked-for name; anything but `agent` is [`Transport::Direct`]'s business
    /// to refuse where it is read ([`RegisterInstance::parse`]).
    pub fn is_agent(name: &str) -> bool {
        name == Self::Agent.as_str()
    }
}

impl std::str::FromStr for Transport {
    type Err = ();

    fn from_str(name: &str) -> Result<Self, ()> {
        [Self::Direct, Self::Agent]
            .into_iter()
            .find(|t| t.as_str() == name)
            .ok_or(())
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

/// A [`RegisterInstance`] that passed [`RegisterInstance::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInstance {
    /// Trimmed, 1-128 characters.
    pub name: String,
    pub transport: Transport,
    /// `host:port` or a socket path (direct); empty or the socket path on the node (agent).
    pub address: String,
    /// The agent on the HAProxy host (required with [`Transport::Agent`]).
    pub node: Option<String>,
}

impl RegisterInstance {
    /// Check every field; the error names it.
    pub fn parse(&self) -> Result<NewInstance, Invalid> {
        let name = self.name.trim();
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(Invalid::new(
                "name",
                "1-128 characters, no control characters",
            ));
        }
        let transport = self
            .transport
            .as_deref()
            .unwrap_or(Transport::Direct.as_str())
            .parse::<Transport>()
            .map_err(|()| Invalid::new("transport", "expected direct or agent"))?;
        let address = self.address.trim();
        let path_like = socket_path(address).is_some();
        let ip_port = address
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.port() > 0);
        match transport {
            Transport::Agent if !(address.is_empty() || path_like) => {
                return Err(Invalid::new(
                    "address",
                    "empty, or the unix socket path on the node (absolute, at most 100 characters)",
                ))
            }
            Transport::Direct if !(path_like || ip_port) => {
                return Err(Invalid::new(
                    "address",
                    "IP:port ([v6]:port) or an absolute unix socket path (at most 100 \
                     characters, no . or .. in it)",
                ))
            }
            _ => {}
        }
        if transport == Transport::Agent && self.node.is_none() {
            return Err(Invalid::new(
                "node",
                "required with transport agent (the agent on the HAProxy host)",
            ));
        }
        if let Some(node) = &self.node {
            if node.is_empty() || node.len() > 64 {
                return Err(Invalid::new("node", "1-64 characters"));
            }
        }
        Ok(NewInstance {
            name: name.to_owned(),
            transport,
            address: address.to_owned(),
            node: self.node.clone(),
        })
    }
}

/// `address` as a unix socket path: absolute, at most 100 bytes (a socket address holds 108),
/// every component a plain name (no `.`, `..` or empty one: what it names is what it says).
pub fn socket_path(address: &str) -> Option<&std::path::Path> {
    use std::path::{Component, Path};
    let path = Path::new(address);
    let plain = address.starts_with('/')
        && !address.ends_with('/')
        && !address.contains("//")
        && path
            .components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)));
    let named = address.len() > 1 && address.len() <= 100 && !address.contains('\0');
    // `Path::components` drops `.` silently: look for it by hand.
    let dotted = address.split('/').any(|part| part == "." || part == "..");
    (plain && named && !dotted).then_some(path)
}

/// Where haproxy-sync may connect directly (`HAPROXY_ALLOWED_ADDRESSES`: CIDRs and socket
/// directories, comma-separated; by default loopback and `/run/haproxy`): an operator's
/// instance address outside them is refused, so an admin key cannot make haproxy-sync talk to
/// any socket on its host or network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedAddresses {
    nets: Vec<ipnet::IpNet>,
    /// `IP:port` entries: that one socket.
    sockets: Vec<std::net::SocketAddr>,
    dirs: Vec<std::path::PathBuf>,
}

impl Default for AllowedAddresses {
    fn default() -> Self {
        Self::parse(Self::DEFAULT).unwrap_or(Self {
            nets: Vec::new(),
            sockets: Vec::new(),
            dirs: Vec::new(),
        })
    }
}

/// An IPv4-mapped network (`::ffff:10.0.0.0/104`) as the IPv4 network it is, as addresses are
/// compared in their canonical form.
fn canonical_net(net: ipnet::IpNet) -> ipnet::IpNet {
    match net {
        ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(ipnet::IpNet::from)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

impl AllowedAddresses {
    /// The default: loopback and Debian's HAProxy socket directory.
    pub const DEFAULT: &'static str = "127.0.0.0/8,::1/128,/run/haproxy";
    /// Most entries.
    const MAX: usize = 256;

    /// Entries separated by commas: an `IP:port` (`[v6]:port`), an address or CIDR (any of
    /// its ports), or an absolute directory (any socket under it).
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let invalid = |reason: String| Invalid::new("HAPROXY_ALLOWED_ADDRESSES", reason);
        let (mut nets, mut sockets, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if let Some(dir) = socket_path(entry) {
                dirs.push(dir.to_path_buf());
            } else if let Ok(socket) = entry.parse::<std::net::SocketAddr>() {
                sockets.push(std::net::SocketAddr::new(
                    socket.ip().to_canonical(),
                    socket.port(),
                ));
            } else if let Ok(net) = entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            {
                nets.push(canonical_net(net.trunc()));
            } else {
                return Err(invalid(format!(
                    "{entry:?} is neither IP:port, a CIDR such as 10.0.0.0/8 nor an absolute \
                     directory"
                )));
            }
        }
        if nets.len() + sockets.len() + dirs.len() > Self::MAX {
            return Err(invalid(format!("at most {} entries", Self::MAX)));
        }
        Ok(Self {
            nets,
            sockets,
            dirs,
        })
    }

    /// The same list with each directory as `resolve` gives it (haproxy-sync passes
    /// `canonicalize`, so `/var/run/haproxy` matches the sockets it resolves to `/run/...`);
    /// a directory `resolve` cannot read stays as written.
    pub fn with_dirs_resolved(
        mut self,
        resolve: impl Fn(&std::path::Path) -> Option<std::path::PathBuf>,
    ) -> Self {
        for dir in &mut self.dirs {
            if let Some(resolved) = resolve(dir) {
                *dir = resolved;
            }
        }
        self
    }

    /// Whether haproxy-sync may connect to `address` (a direct instance's `IP:port` or socket
    /// path; for a path, the caller passes it resolved, symlinks and all, where it can).
    /// The refusal's field is `address`.
    pub fn permits(&self, address: &str) -> Result<(), Invalid> {
        if let Ok(socket) = address.parse::<std::net::SocketAddr>() {
            let ip = socket.ip().to_canonical();
            if self.nets.iter().any(|net| net.contains(&ip))
                || self
                    .sockets
                    .contains(&std::net::SocketAddr::new(ip, socket.port()))
            {
                return Ok(());
            }
        } else if let Some(path) = socket_path(address) {
            if self
                .dirs
                .iter()
                .any(|dir| path.starts_with(dir) && path != dir.as_path())
            {
                return Ok(());
            }
        }
        Err(Invalid::new(
            "address",
            format!("{address} is outside HAPROXY_ALLOWED_ADDRESSES ({self})"),
        ))
    }
}

impl std::fmt::Display for AllowedAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nets = self.nets.iter().map(ToString::to_string);
        let sockets = self.sockets.iter().map(ToString::to_string);
        let dirs = self.dirs.iter().map(|d| d.display().to_string());
        let all: Vec<String> = nets.chain(sockets).chain(dirs).collect();
        if all.is_empty() {
            return f.write_str("nothing");
        }
        f.write_str(&all.join(", "))
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
    pub fn parse(&self) -> Result<NewApplication, Invalid> {
        if !valid_application_name(&self.name) {
            return Err(Invalid::new("name", APPLICATION_NAME_RULE));
        }
        let port = match self.port {
            None => None,
            Some(p) => Some(
                u16::try_from(p)
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| Invalid::new("port", "1-65535"))?,
            ),
        };
        if self.addresses.len() > MAX_APPLICATION_ADDRESSES {
            return Err(Invalid::new(
                "addresses",
                format!("at most {MAX_APPLICATION_ADDRESSES}"),
            ));
        }
        let mut addresses = Vec::with_capacity(self.addresses.len());
        for (i, a) in self.addresses.iter().enumerate() {
            let ip: std::net::IpAddr = a
                .parse()
                .map_err(|_| Invalid::new(format!("addresses[{i}]"), "not an IP address"))?;
            let ip = ip.to_canonical().to_string();
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
        match (port, addresses.is_empty()) {
            (Some(_), true) => {
                return Err(Invalid::new(
                    "addresses",
                    "required with a port (servers are linked by IP:port)",
                ))
            }
            (None, false) => {
                return Err(Invalid::new(
                    "port",
                    "required with addresses (servers are linked by IP:port)",
                ))
            }
            _ => {}
        }
        Ok(NewApplication {
            name: self.name.clone(),
            port,
            addresses,
        })
    }
}

/// An application to create, its every field checked (addresses canonical and unique).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApplication {
    pub name: String,
    pub port: Option<u16>,
    pub addresses: Vec<String>,
}

/// An application group to create: its name and its applications, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGroup {
    pub name: String,
    pub applications: Vec<String>,
}

/// What an application's (and a group's) name may be.
const APPLICATION_NAME_RULE: &str = "1-63 of a-z 0-9 - (no _), not starting with -";

/// `POST /v1/application-groups`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    pub name: String,
    /// Application ids.
    pub applications: Vec<String>,
}

impl CreateGroup {
    pub fn parse(&self) -> Result<NewGroup, Invalid> {
        if !valid_application_name(&self.name) {
            return Err(Invalid::new("name", APPLICATION_NAME_RULE));
        }
        if self.applications.is_empty() || self.applications.len() > MAX_GROUP_APPLICATIONS {
            return Err(Invalid::new(
                "applications",
                format!("1-{MAX_GROUP_APPLICATIONS} application ids"),
            ));
        }
        let mut ids: Vec<String> = Vec::with_capacity(self.applications.len());
        for (i, id) in self.applications.iter().enumerate() {
            if !(id.len() == 24
                && id.starts_with("app-")
                && id[4..].bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(Invalid::new(
                    format!("applications[{i}]"),
                    "not an application id",
                ));
            }
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        Ok(NewGroup {
            name: self.name.clone(),
            applications: ids,
        })
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

/// An action to request, its every field checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAction {
    pub state: ServerState,
    pub idempotency_key: String,
    pub drain_wait_ms: u64,
}

impl ActionRequest {
    pub fn parse(&self) -> Result<NewAction, Invalid> {
        let state = self
            .action
            .parse::<ServerState>()
            .map_err(|()| Invalid::new("action", "expected drain, maint or ready"))?;
        let key = &self.idempotency_key;
        if key.is_empty()
            || key.len() > 128
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err(Invalid::new(
                "idempotency_key",
                "1-128 of A-Z a-z 0-9 - _ . :",
            ));
        }
        if self.drain_wait_ms > MAX_DRAIN_WAIT_MS {
            return Err(Invalid::new(
                "drain_wait_ms",
                format!("at most {MAX_DRAIN_WAIT_MS}"),
            ));
        }
        if self.drain_wait_ms > 0 && state != ServerState::Drain {
            return Err(Invalid::new("drain_wait_ms", "only with action drain"));
        }
        Ok(NewAction {
            state,
            idempotency_key: key.clone(),
            drain_wait_ms: self.drain_wait_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_states_and_transports_have_one_name_each() {
        for state in ServerState::ALL {
            assert_eq!(state.as_str().parse::<ServerState>(), Ok(state));
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::Value::String(state.as_str().to_owned())
            );
        }
        assert_eq!("stopped".parse::<ServerState>(), Err(()));
        for transport in [Transport::Direct, Transport::Agent] {
            assert_eq!(transport.as_str().parse::<Transport>(), Ok(transport));
        }
        assert!(Transport::is_agent("agent") && !Transport::is_agent("direct"));
    }

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

    #[test]
    fn applications_are_validated_field_by_field() {
        let app = |name: &str, port: Option<u32>, addresses: &[&str]| CreateApplication {
            name: name.into(),
            port,
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
        };
        assert_eq!(
            app("shop", None, &[]).parse(),
            Ok(NewApplication {
                name: "shop".into(),
                port: None,
                addresses: vec![]
            })
        );
        assert_eq!(
            app(
                "shop-api",
                Some(8080),
                &["10.0.0.1", "::ffff:10.0.0.2", "10.0.0.1"]
            )
            .parse(),
            Ok(NewApplication {
                name: "shop-api".into(),
                port: Some(8080),
                addresses: vec!["10.0.0.1".into(), "10.0.0.2".into()]
            })
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
            let error = bad.parse().unwrap_err();
            assert_eq!(error.field, field, "{error}");
        }
        let group = |apps: &[&str]| CreateGroup {
            name: "front".into(),
            applications: apps.iter().map(|a| (*a).to_owned()).collect(),
        };
        assert!(group(&["app-0123456789abcdef0123"]).parse().is_ok());
        assert_eq!(group(&[]).parse().unwrap_err().field, "applications");
        assert_eq!(
            group(&["app-x"]).parse().unwrap_err().field,
            "applications[0]"
        );
    }

    #[test]
    fn registration_is_validated_field_by_field() {
        let ok = |address: &str| RegisterInstance {
            name: "lb1".into(),
            transport: None,
            address: address.into(),
            node: None,
        };
        assert_eq!(
            ok("127.0.0.1:9999").parse().unwrap(),
            NewInstance {
                name: "lb1".into(),
                transport: Transport::Direct,
                address: "127.0.0.1:9999".into(),
                node: None,
            }
        );
        assert!(ok("/run/haproxy/admin.sock").parse().is_ok());
        assert!(ok("[::1]:9999").parse().is_ok());
        for bad in [
            "",
            "nohost",
            "host:0",
            "host:99999",
            "relative/path.sock",
            // Found by hand: a URL parsed as host `http://127.0.0.1`, port 1.
            "http://127.0.0.1:1",
            "localhost:9999",
            "127.0.0.1:0",
            "/run/haproxy/../../etc/passwd",
            "/run/haproxy/./admin.sock",
            "/run//haproxy/admin.sock",
            "/run/haproxy/",
        ] {
            assert!(ok(bad).parse().unwrap_err().field == "address", "{bad}");
        }
        let agent = RegisterInstance {
            transport: Some("agent".into()),
            ..ok("/run/h.sock")
        };
        assert_eq!(agent.parse().unwrap_err().field, "node");
        let odd = RegisterInstance {
            transport: Some("ssh".into()),
            ..ok("/x")
        };
        assert_eq!(
            odd.parse().unwrap_err().to_string(),
            "transport: expected direct or agent"
        );
    }

    #[test]
    fn direct_addresses_are_allowed_by_network_and_socket_directory() {
        let default = AllowedAddresses::default();
        for fine in [
            "127.0.0.1:9999",
            "127.1.2.3:1",
            "[::1]:9999",
            "/run/haproxy/admin.sock",
        ] {
            assert!(default.permits(fine).is_ok(), "{fine}");
        }
        for refused in [
            "10.0.0.1:9999",
            "[::ffff:10.0.0.1]:9999",
            "/etc/passwd",
            "/run/haproxy",
            "/run/haproxy-other/admin.sock",
            "/run/haproxy/../x.sock",
        ] {
            let why = default.permits(refused).unwrap_err().to_string();
            assert!(why.contains("HAPROXY_ALLOWED_ADDRESSES"), "{why}");
        }
        // A v4-mapped loopback is loopback.
        assert!(default.permits("[::ffff:127.0.0.1]:9999").is_ok());
        let wider = AllowedAddresses::parse("10.0.0.0/8, /var/lib/haproxy ,192.0.2.7").unwrap();
        assert!(wider.permits("10.9.9.9:1").is_ok());
        assert!(wider.permits("192.0.2.7:1").is_ok());
        assert!(wider.permits("192.0.2.8:1").is_err());
        assert!(wider.permits("/var/lib/haproxy/stats").is_ok());
        assert!(
            wider.permits("127.0.0.1:1").is_err(),
            "the default is replaced"
        );
        assert!(AllowedAddresses::parse("sockets").is_err());
        // One socket: that port alone (a Redis on another loopback port stays out).
        let one = AllowedAddresses::parse("127.0.0.1:9999,[::1]:9999").unwrap();
        assert!(one.permits("127.0.0.1:9999").is_ok());
        assert!(one.permits("[::ffff:127.0.0.1]:9999").is_ok());
        assert!(one.permits("127.0.0.1:6379").is_err());
        assert!(one.permits("[::1]:9999").is_ok());
        // A mapped network is the IPv4 network it names.
        let mapped = AllowedAddresses::parse("::ffff:10.0.0.0/104").unwrap();
        assert!(mapped.permits("10.1.2.3:1").is_ok());
        assert!(mapped.permits("[::ffff:10.1.2.3]:1").is_ok());
        assert!(mapped.permits("11.0.0.1:1").is_err());
        assert!(AllowedAddresses::parse("/run/../etc").is_err());
        assert_eq!(
            AllowedAddresses::parse("")
                .unwrap()
                .permits("127.0.0.1:1")
                .unwrap_err()
                .to_string(),
            "address: 127.0.0.1:1 is outside HAPROXY_ALLOWED_ADDRESSES (nothing)"
        );
    }
}
