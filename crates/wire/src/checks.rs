//! Checks as operators ask for them (`POST /v1/checks`), validated into what agents run.
//!
//! Every field is checked and bounded here, and an error names the field
//! (`options.port: …`). Targets are judged by [`crate::targets`]; an installation that checks
//! its own network turns that off with `allow_private`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::kinds::Kind;
use crate::targets::{self, Forbidden};

/// Most location entries in one check.
pub const MAX_LOCATIONS: usize = 16;
/// Most agents one check may run on.
pub const MAX_AGENTS: u32 = 1000;
/// Most tags in one location entry.
pub const MAX_TAGS: usize = 16;
/// Longest URL.
pub const MAX_URL: usize = 2048;
/// Most request headers of an HTTP check.
pub const MAX_HEADERS: usize = 16;

/// What stands for a request header's value wherever a check is read back.
pub const REDACTED: &str = "[redacted]";

/// Hide the request headers' values of every check's options inside `value` (a check's
/// `options`, a `check.created` payload, ...): every `headers` object of an `options` object
/// keeps its names, its values become [`REDACTED`]. An HTTP check's headers are secrets to
/// readers (an `Authorization`, a token): they live only in the task spec agents get, in
/// `events` and in backups.
pub fn redact_headers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Object(options)) = map.get_mut("options") {
                if let Some(serde_json::Value::Object(headers)) = options.get_mut("headers") {
                    for v in headers.values_mut() {
                        *v = serde_json::Value::String(REDACTED.to_owned());
                    }
                }
            }
            map.values_mut().for_each(redact_headers);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_headers),
        _ => {}
    }
}

/// [`redact_headers`] of a check's `options` object itself.
pub fn redacted_options(options: &serde_json::Value) -> serde_json::Value {
    let mut wrapped = serde_json::json!({ "options": options });
    redact_headers(&mut wrapped);
    wrapped["options"].take()
}

/// How long a check of `kind` may take before its open slots end as `timeout` (ms).
pub fn deadline_ms(kind: &str) -> i64 {
    match kind {
        "dns" | "tcp" => 15_000,
        "trace" => 90_000,
        _ => 30_000,
    }
}

/// A task's id: `<check>:<slot>:<attempt>`.
pub fn task_id(check: uuid::Uuid, slot: u32, attempt: u32) -> String {
    format!("{check}:{slot}:{attempt}")
}

/// The parts of a task id.
pub fn parse_task_id(task: &str) -> Option<(uuid::Uuid, u32, u32)> {
    let mut parts = task.split(':');
    let check = uuid::Uuid::parse_str(parts.next()?).ok()?;
    let slot = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((check, slot, attempt))
}

/// What an agent receives as a lease's `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub check_id: uuid::Uuid,
    pub slot: u32,
    pub attempt: u32,
    pub kind: String,
    pub target: String,
    pub options: serde_json::Value,
    /// When the check stops waiting for this result (ms since the epoch).
    pub deadline_ms: i64,
}

/// `POST /v1/checks` answers 202 with this (and `Location: /v1/checks/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckAccepted {
    pub id: uuid::Uuid,
    pub agents_count: u32,
}

/// The body of `POST /v1/checks`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCheckRequest {
    pub kind: String,
    pub target: String,
    #[serde(default)]
    pub options: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub locations: Vec<LocationRequest>,
    /// Agents in all, when no `locations` are given.
    #[serde(default)]
    pub limit: Option<u32>,
    /// Run on the agents of this earlier check.
    #[serde(default)]
    pub reuse: Option<String>,
    /// How long the check may take (1000 ms up to five minutes); the kind's default
    /// otherwise. Slots still open then end as `timeout`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// How many of the check's slots may run at once (1-1000); the installation's
    /// `DEFAULT_MAX_PARALLEL` otherwise. The others wait until earlier ones end.
    #[serde(default)]
    pub max_parallel: Option<u32>,
}

/// Longest `timeout_ms`.
pub const MAX_TIMEOUT_MS: u64 = 300_000;

/// One entry of `locations`: agents matching every given field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocationRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asn: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Agent labels, `key:value` or `key` (any value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default = "one")]
    pub limit: u32,
}

fn one() -> u32 {
    1
}

/// Why a check request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckError {
    /// A field is malformed or out of bounds (the message names it).
    Invalid(String),
    /// The target is an address or name that may not be checked.
    Forbidden { field: String, why: Forbidden },
}

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(message) => f.write_str(message),
            Self::Forbidden { field, why } => {
                write!(
                    f,
                    "{field}: {why} may not be checked from this installation"
                )
            }
        }
    }
}

fn invalid(message: impl Into<String>) -> CheckError {
    CheckError::Invalid(message.into())
}

/// A validated check: what goes into each task's spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    pub kind: String,
    /// How long the check may take (ms).
    pub timeout_ms: i64,
    /// The host, URL or name, normalised (host names lower case, no trailing dot).
    pub target: String,
    /// The kind's options with every default filled in.
    pub options: serde_json::Value,
    /// Slots that may run at once, when the request said (else the installation's default).
    pub max_parallel: Option<u32>,
}

/// Each kind's options as a task's spec carries them, every default filled in by
/// [`CreateCheckRequest::validate`]: the validator builds them, and an agent decodes them
/// (an option it does not know fails the task rather than being ignored).
pub mod options {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    /// `dns`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Dns {
        /// The record type (`A`, `AAAA`, ...).
        #[serde(rename = "type")]
        pub record: String,
        /// `udp` or `tcp`.
        pub protocol: String,
        /// `ip:port`; none: the agent host's resolver.
        pub resolver: Option<String>,
    }

    /// `http`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Http {
        pub method: String,
        /// `http1.1` or `h2`.
        pub protocol: String,
        /// Lower-case names.
        pub headers: BTreeMap<String, String>,
        /// Send the headers over TLS even when the server's certificate failed verification.
        /// Written only when true, so agents that do not know it still read every other spec.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub insecure: bool,
    }

    /// `tcp`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tcp {
        pub port: u16,
    }

    /// `ping`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Ping {
        /// 1-16.
        pub packets: u16,
    }

    /// `trace`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Trace {
        /// `icmp`, `udp` or `tcp`.
        pub protocol: String,
        /// For `udp` and `tcp` (their defaults filled in).
        pub port: Option<u16>,
    }
}

/// An integer option checked against its range (1-65535 at most) as the field it is.
fn narrow(value: u64) -> Result<u16, CheckError> {
    u16::try_from(value).map_err(|_| invalid("options: out of range"))
}

/// The options' JSON as a spec carries it.
fn options_value(options: impl Serialize) -> Result<serde_json::Value, CheckError> {
    serde_json::to_value(options).map_err(|e| invalid(format!("options: {e}")))
}

/// A check to create: what every task runs, and on which agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCheck {
    pub spec: CheckSpec,
    pub selection: Selection,
}

/// A validated selection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Per entry, up to `limit` matching agents.
    Locations(Vec<LocationRequest>),
    /// Up to this many agents anywhere.
    Anywhere(u32),
    /// The agents of an earlier check.
    Reuse(uuid::Uuid),
}

/// The options object as typed getters that name the field in every error.
struct Options<'a> {
    map: &'a serde_json::Map<String, serde_json::Value>,
    known: &'static [&'static str],
}

impl<'a> Options<'a> {
    fn new(
        map: &'a serde_json::Map<String, serde_json::Value>,
        known: &'static [&'static str],
    ) -> Result<Self, CheckError> {
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            let shown: String = unknown.chars().take(32).collect();
            return Err(invalid(format!(
                "options.{shown}: unknown option (known: {})",
                known.join(", ")
            )));
        }
        Ok(Self { map, known })
    }

    fn string(&self, name: &str, max: usize) -> Result<Option<&'a str>, CheckError> {
        debug_assert!(self.known.contains(&name));
        match self.map.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) if s.len() <= max => Ok(Some(s.as_str())),
            Some(serde_json::Value::String(_)) => {
                Err(invalid(format!("options.{name}: at most {max} characters")))
            }
            Some(_) => Err(invalid(format!("options.{name}: expected a string"))),
        }
    }

    fn one_of(
        &self,
        name: &str,
        allowed: &[&'static str],
        default: &'static str,
    ) -> Result<&'static str, CheckError> {
        match self.string(name, 32)? {
            None => Ok(default),
            Some(given) => allowed
                .iter()
                .find(|a| a.eq_ignore_ascii_case(given))
                .copied()
                .ok_or_else(|| {
                    invalid(format!(
                        "options.{name}: expected one of {}",
                        allowed.join(", ")
                    ))
                }),
        }
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, CheckError> {
        debug_assert!(self.known.contains(&name));
        match self.map.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(invalid(format!("options.{name}: expected true or false"))),
        }
    }

    fn integer(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, CheckError> {
        match self.map.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(invalid(format!(
                    "options.{name}: expected an integer {min}-{max}"
                ))),
            },
        }
    }
}

/// A host to connect to: an address in any notation, or a DNS name. Returns it normalised.
fn host(field: &str, given: &str, allow_private: bool) -> Result<String, CheckError> {
    if given.is_empty() || given.len() > 255 {
        return Err(invalid(format!("{field}: 1-255 characters")));
    }
    let normalised = match targets::parse_ip_any(given) {
        Some(ip) => ip.to_string(),
        None if targets::valid_hostname(given) => given.trim_end_matches('.').to_ascii_lowercase(),
        None => return Err(invalid(format!("{field}: not an IP address or host name"))),
    };
    if !allow_private {
        if let Some(why) = targets::forbidden_host(given) {
            return Err(CheckError::Forbidden {
                field: field.to_owned(),
                why,
            });
        }
    }
    Ok(normalised)
}

const DNS_TYPES: [&str; 10] = [
    "A", "AAAA", "CNAME", "MX", "NS", "TXT", "SOA", "PTR", "SRV", "CAA",
];

fn dns(
    target: &str,
    options: &serde_json::Map<String, serde_json::Value>,
    allow_private: bool,
) -> Result<CheckSpec, CheckError> {
    let o = Options::new(options, &["type", "resolver", "protocol"])?;
    let record = o.one_of("type", &DNS_TYPES, "A")?;
    let protocol = o.one_of("protocol", &["udp", "tcp"], "udp")?;
    let resolver = match o.string("resolver", 64)? {
        None => None,
        Some(r) => {
            // `192.0.2.53`, `192.0.2.53:5353`, `2001:db8::53` or `[2001:db8::53]:5353`.
            let (ip, port) = match r.parse::<std::net::SocketAddr>() {
                Ok(addr) if addr.port() != 0 => (addr.ip(), addr.port()),
                Ok(_) => return Err(invalid("options.resolver: port 1-65535")),
                Err(_) => (
                    targets::parse_ip_any(r).ok_or_else(|| {
                        invalid("options.resolver: expected an IP address, optionally with :port")
                    })?,
                    53,
                ),
            };
            if !allow_private {
                if let Some(why) = targets::forbidden_ip(ip) {
                    return Err(CheckError::Forbidden {
                        field: "options.resolver".into(),
                        why,
                    });
                }
            }
            Some(std::net::SocketAddr::new(ip, port).to_string())
        }
    };
    // The name asked about is data sent to the resolver, not a place to connect to: any valid
    // name is fine. A PTR check may name the address itself.
    let name = if record == "PTR" {
        match targets::parse_ip_any(target) {
            Some(ip) => reverse_name(ip),
            None => dns_name(target)?,
        }
    } else {
        dns_name(target)?
    };
    // Asked of the agent host's own resolver, a local name (`db.internal`) or the reverse
    // name of a private address asks about the agent's network, as a target there would:
    // refused alike. A resolver given (an address checked above) answers for itself.
    if resolver.is_none() && !allow_private {
        let why = match reverse(&name) {
            Reverse::Address(ip) => targets::forbidden_ip(ip),
            // Which addresses a zone or a service name under it stands for is not one
            // answer: a resolver the check names is asked instead.
            Reverse::Other => {
                return Err(invalid(
                    "target: a reverse name that is not one whole address (a zone, a DNS-SD \
                     or RFC 2317 name) is asked only of a resolver the check names \
                     (options.resolver)",
                ))
            }
            Reverse::No => targets::forbidden_host(&name),
        };
        if let Some(why) = why {
            return Err(CheckError::Forbidden {
                field: "target".into(),
                why,
            });
        }
    }
    Ok(CheckSpec {
        kind: "dns".into(),
        timeout_ms: 0,
        max_parallel: None,
        target: name,
        options: options_value(options::Dns {
            record: record.to_owned(),
            protocol: protocol.to_owned(),
            resolver,
        })?,
    })
}

fn dns_name(target: &str) -> Result<String, CheckError> {
    if target.len() > 254 || !targets::valid_hostname(target) {
        return Err(invalid("target: not a DNS name"));
    }
    Ok(target.trim_end_matches('.').to_ascii_lowercase())
}

/// What a name under the reverse trees is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reverse {
    /// Not under `in-addr.arpa` or `ip6.arpa`.
    No,
    /// The reverse name of one whole address (`4.4.8.8.in-addr.arpa`, 32 nibbles under
    /// `ip6.arpa`).
    Address(std::net::IpAddr),
    /// Anything else under them: a zone (`10.in-addr.arpa`), a DNS-SD or RFC 2317 name.
    Other,
}

fn reverse(name: &str) -> Reverse {
    let under = |zone: &str| {
        (name == zone)
            .then_some("")
            .or_else(|| name.strip_suffix(&format!(".{zone}")))
    };
    if let Some(rest) = under("in-addr.arpa") {
        let labels: Vec<&str> = rest.split('.').rev().collect();
        let octets: Option<Vec<u8>> = labels
            .iter()
            .map(|l| l.parse::<u8>().ok().filter(|_| !l.starts_with('+')))
            .collect();
        return match octets.and_then(|o| <[u8; 4]>::try_from(o).ok()) {
            Some(octets) => Reverse::Address(std::net::Ipv4Addr::from(octets).into()),
            None => Reverse::Other,
        };
    }
    if let Some(rest) = under("ip6.arpa") {
        let nibbles: Option<Vec<u8>> = rest
            .split('.')
            .rev()
            .map(|n| {
                let mut chars = n.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) => c.to_digit(16).and_then(|d| u8::try_from(d).ok()),
                    _ => None,
                }
            })
            .collect();
        return match nibbles.filter(|n| n.len() == 32) {
            Some(nibbles) => {
                let mut octets = [0u8; 16];
                for (i, pair) in nibbles.chunks(2).enumerate() {
                    octets[i] = (pair[0] << 4) | pair[1];
                }
                Reverse::Address(std::net::Ipv6Addr::from(octets).into())
            }
            None => Reverse::Other,
        };
    }
    Reverse::No
}

/// `in-addr.arpa` / `ip6.arpa` name of an address.
fn reverse_name(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        }
        std::net::IpAddr::V6(v6) => {
            let hex: String = v6.octets().iter().map(|b| format!("{b:02x}")).collect();
            let mut nibbles: Vec<String> = hex.chars().rev().map(String::from).collect();
            nibbles.push("ip6.arpa".into());
            nibbles.join(".")
        }
    }
}

/// Headers a check may not set: they belong to the connection or would smuggle a request.
const FORBIDDEN_HEADERS: [&str; 9] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "trailer",
];

fn http(
    target: &str,
    options: &serde_json::Map<String, serde_json::Value>,
    allow_private: bool,
) -> Result<CheckSpec, CheckError> {
    let o = Options::new(options, &["method", "headers", "protocol", "insecure"])?;
    let method = o.one_of("method", &["GET", "HEAD", "OPTIONS"], "GET")?;
    let insecure = o.boolean("insecure")?.unwrap_or(false);
    let protocol = o.one_of("protocol", &["http1.1", "h2"], "http1.1")?;
    let mut headers = BTreeMap::new();
    match options.get("headers") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(given)) => {
            if given.len() > MAX_HEADERS {
                return Err(invalid(format!("options.headers: at most {MAX_HEADERS}")));
            }
            for (name, value) in given {
                let shown: String = name.chars().take(32).collect();
                let token = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !token {
                    return Err(invalid(format!(
                        "options.headers.{shown}: not a header name"
                    )));
                }
                if FORBIDDEN_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                    return Err(invalid(format!(
                        "options.headers.{shown}: may not be set by a check"
                    )));
                }
                let Some(value) = value.as_str() else {
                    return Err(invalid(format!(
                        "options.headers.{shown}: expected a string"
                    )));
                };
                if value.len() > 1024 || value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f)
                {
                    return Err(invalid(format!(
                        "options.headers.{shown}: at most 1024 characters, no control characters"
                    )));
                }
                headers.insert(name.to_ascii_lowercase(), value.to_owned());
            }
        }
        Some(_) => return Err(invalid("options.headers: expected an object")),
    }
    if target.len() > MAX_URL {
        return Err(invalid(format!("target: at most {MAX_URL} characters")));
    }
    // URL parsing drops tabs and line breaks and trims spaces: what would be fetched would
    // not be what was asked for.
    if target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(invalid(
            "target: no spaces or control characters (percent-encode them)",
        ));
    }
    // `http:///x` parses as `http://x/`: the host must be written where a host goes.
    let authority = target.split_once("://").map_or("", |(_, rest)| rest);
    if authority.is_empty() || authority.starts_with(['/', '?', '#']) {
        return Err(invalid("target: the URL has no host"));
    }
    let url = url::Url::parse(target).map_err(|e| invalid(format!("target: not a URL ({e})")))?;
    if url.port() == Some(0) {
        return Err(invalid("target: port 0 is not a port to connect to"));
    }
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("target: the scheme must be http or https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "target: credentials in the URL are not accepted; use options.headers",
        ));
    }
    let host_text = match url.host() {
        Some(url::Host::Domain(d)) => d.to_owned(),
        Some(url::Host::Ipv4(v4)) => v4.to_string(),
        Some(url::Host::Ipv6(v6)) => v6.to_string(),
        None => return Err(invalid("target: the URL has no host")),
    };
    host("target", &host_text, allow_private)?;
    let mut normalised = url.clone();
    normalised.set_fragment(None);
    Ok(CheckSpec {
        kind: "http".into(),
        timeout_ms: 0,
        max_parallel: None,
        target: normalised.to_string(),
        options: options_value(options::Http {
            method: method.to_owned(),
            protocol: protocol.to_owned(),
            headers,
            insecure,
        })?,
    })
}

fn tcp(
    target: &str,
    options: &serde_json::Map<String, serde_json::Value>,
    allow_private: bool,
) -> Result<CheckSpec, CheckError> {
    let o = Options::new(options, &["port"])?;
    let port = o
        .integer("port", 1, 65535)?
        .ok_or_else(|| invalid("options.port: required, 1-65535"))?;
    Ok(CheckSpec {
        kind: "tcp".into(),
        timeout_ms: 0,
        max_parallel: None,
        target: host("target", target, allow_private)?,
        options: options_value(options::Tcp {
            port: narrow(port)?,
        })?,
    })
}

fn ping(
    target: &str,
    options: &serde_json::Map<String, serde_json::Value>,
    allow_private: bool,
) -> Result<CheckSpec, CheckError> {
    let o = Options::new(options, &["packets"])?;
    let packets = o.integer("packets", 1, 16)?.unwrap_or(3);
    Ok(CheckSpec {
        kind: "ping".into(),
        timeout_ms: 0,
        max_parallel: None,
        target: host("target", target, allow_private)?,
        options: options_value(options::Ping {
            packets: narrow(packets)?,
        })?,
    })
}

fn trace(
    target: &str,
    options: &serde_json::Map<String, serde_json::Value>,
    allow_private: bool,
) -> Result<CheckSpec, CheckError> {
    let o = Options::new(options, &["protocol", "port"])?;
    let protocol = o.one_of("protocol", &["icmp", "udp", "tcp"], "icmp")?;
    let port = o.integer("port", 1, 65535)?;
    if protocol == "icmp" && port.is_some() {
        return Err(invalid("options.port: only for protocol udp or tcp"));
    }
    let port = match protocol {
        "udp" => Some(port.unwrap_or(33434)),
        "tcp" => Some(port.unwrap_or(80)),
        _ => None,
    };
    Ok(CheckSpec {
        kind: "trace".into(),
        timeout_ms: 0,
        max_parallel: None,
        target: host("target", target, allow_private)?,
        options: options_value(options::Trace {
            protocol: protocol.to_owned(),
            port: port.map(narrow).transpose()?,
        })?,
    })
}

fn two_letters(field: &str, value: &str) -> Result<String, CheckError> {
    if value.len() == 2 && value.bytes().all(|b| b.is_ascii_alphabetic()) {
        Ok(value.to_ascii_uppercase())
    } else {
        Err(invalid(format!(
            "{field}: expected a two-letter country code"
        )))
    }
}

fn bounded_text(field: &str, value: &str, max: usize) -> Result<String, CheckError> {
    if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{field}: 1-{max} characters, no control characters"
        )));
    }
    Ok(value.to_owned())
}

impl CreateCheckRequest {
    /// The check to run and where, or what is wrong (the field named).
    pub fn parse(&self, allow_private: bool) -> Result<NewCheck, CheckError> {
        let unknown = || {
            invalid(format!(
                "kind: expected one of {}",
                Kind::names(&Kind::CHECKS)
            ))
        };
        let spec = match self.kind.parse::<Kind>().map_err(|()| unknown())? {
            Kind::Dns => dns(&self.target, &self.options, allow_private),
            Kind::Http => http(&self.target, &self.options, allow_private),
            Kind::Tcp => tcp(&self.target, &self.options, allow_private),
            Kind::Ping => ping(&self.target, &self.options, allow_private),
            Kind::Trace => trace(&self.target, &self.options, allow_private),
            Kind::Haproxy => Err(unknown()),
        }?;
        let mut spec = spec;
        spec.timeout_ms = match self.timeout_ms {
            None => deadline_ms(&spec.kind),
            Some(t) if (1000..=MAX_TIMEOUT_MS).contains(&t) => t as i64,
            Some(_) => {
                return Err(invalid(format!(
                    "timeout_ms: expected 1000-{MAX_TIMEOUT_MS}"
                )))
            }
        };
        spec.max_parallel = match self.max_parallel {
            None => None,
            Some(n) if (1..=MAX_AGENTS).contains(&n) => Some(n),
            Some(_) => return Err(invalid(format!("max_parallel: expected 1-{MAX_AGENTS}"))),
        };
        let given = [
            !self.locations.is_empty(),
            self.limit.is_some(),
            self.reuse.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(invalid("locations, limit, reuse: give exactly one of them"));
        }
        let selection = if let Some(reuse) = &self.reuse {
            let id =
                uuid::Uuid::parse_str(reuse).map_err(|_| invalid("reuse: expected a check id"))?;
            Selection::Reuse(id)
        } else if let Some(limit) = self.limit {
            if !(1..=MAX_AGENTS).contains(&limit) {
                return Err(invalid(format!("limit: expected 1-{MAX_AGENTS}")));
            }
            Selection::Anywhere(limit)
        } else {
            if self.locations.len() > MAX_LOCATIONS {
                return Err(invalid(format!(
                    "locations: at most {MAX_LOCATIONS} entries"
                )));
            }
            let mut total = 0u32;
            let mut out = Vec::with_capacity(self.locations.len());
            for (i, l) in self.locations.iter().enumerate() {
                let f = |name: &str| format!("locations[{i}].{name}");
                if !(1..=MAX_AGENTS).contains(&l.limit) {
                    return Err(invalid(format!("{}: expected 1-{MAX_AGENTS}", f("limit"))));
                }
                total = total.saturating_add(l.limit);
                if l.tags.len() > MAX_TAGS {
                    return Err(invalid(format!("{}: at most {MAX_TAGS}", f("tags"))));
                }
                let mut tags = Vec::with_capacity(l.tags.len());
                for (t, tag) in l.tags.iter().enumerate() {
                    let (key, value) = tag.split_once(':').unwrap_or((tag.as_str(), ""));
                    if key.is_empty() || key.len() > 63 || value.len() > 255 {
                        return Err(invalid(format!(
                            "locations[{i}].tags[{t}]: key (1-63) or key:value (value up to 255)"
                        )));
                    }
                    tags.push(tag.clone());
                }
                out.push(LocationRequest {
                    country: l
                        .country
                        .as_deref()
                        .map(|c| two_letters(&f("country"), c))
                        .transpose()?,
                    city: l
                        .city
                        .as_deref()
                        .map(|c| bounded_text(&f("city"), c, 128))
                        .transpose()?,
                    asn: l.asn,
                    network: l
                        .network
                        .as_deref()
                        .map(|n| bounded_text(&f("network"), n, 128))
                        .transpose()?,
                    tags,
                    limit: l.limit,
                });
            }
            if total > MAX_AGENTS {
                return Err(invalid(format!(
                    "locations: at most {MAX_AGENTS} agents in all"
                )));
            }
            Selection::Locations(out)
        };
        Ok(NewCheck { spec, selection })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(body: serde_json::Value) -> CreateCheckRequest {
        serde_json::from_value(body).unwrap()
    }

    fn refused(body: serde_json::Value) -> String {
        match request(body.clone()).parse(false) {
            Err(CheckError::Invalid(m)) => m,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn good_checks_get_their_defaults() {
        let NewCheck { spec, selection } =
            request(json!({"kind": "dns", "target": "Example.COM.", "limit": 3}))
                .parse(false)
                .unwrap();
        assert_eq!(spec.target, "example.com");
        assert_eq!(
            spec.options,
            json!({"type": "A", "protocol": "udp", "resolver": null})
        );
        assert_eq!(selection, Selection::Anywhere(3));

        let NewCheck { spec, .. } = request(
            json!({"kind": "dns", "target": "8.8.4.4", "options": {"type": "ptr"}, "limit": 1}),
        )
        .parse(false)
        .unwrap();
        assert_eq!(spec.target, "4.4.8.8.in-addr.arpa");

        for (given, kept) in [
            ("9.9.9.9", "9.9.9.9:53"),
            ("9.9.9.9:5353", "9.9.9.9:5353"),
            ("2620:fe::fe", "[2620:fe::fe]:53"),
            ("[2620:fe::fe]:853", "[2620:fe::fe]:853"),
        ] {
            let NewCheck { spec, .. } = request(json!({"kind": "dns", "target": "example.com",
                "options": {"resolver": given}, "limit": 1}))
            .parse(false)
            .unwrap();
            assert_eq!(spec.options["resolver"], kept, "{given}");
        }

        let NewCheck { spec, .. } = request(
            json!({"kind": "http", "target": "https://example.com/a?b=1#frag",
            "options": {"method": "head", "headers": {"Accept": "text/html"}}, "limit": 1}),
        )
        .parse(false)
        .unwrap();
        assert_eq!(spec.target, "https://example.com/a?b=1");
        assert_eq!(spec.options["method"], "HEAD");
        assert_eq!(spec.options["headers"]["accept"], "text/html");

        let NewCheck { spec, .. } = request(
            json!({"kind": "trace", "target": "example.net", "options": {"protocol": "udp"},
            "locations": [{"country": "nl", "limit": 2}, {"asn": 1136}]}),
        )
        .parse(false)
        .unwrap();
        assert_eq!(spec.options, json!({"protocol": "udp", "port": 33434}));
        let NewCheck { selection, .. } = request(json!({"kind": "ping", "target": "1.1.1.1",
            "locations": [{"country": "nl", "limit": 2}]}))
        .parse(false)
        .unwrap();
        assert!(
            matches!(selection, Selection::Locations(l) if l[0].country.as_deref() == Some("NL"))
        );
    }

    #[test]
    fn every_bad_option_is_named() {
        for (body, field) in [
            (
                json!({"kind": "smtp", "target": "x.com", "limit": 1}),
                "kind",
            ),
            (
                json!({"kind": "dns", "target": "x.com", "options": {"type": "AXFR"}, "limit": 1}),
                "options.type",
            ),
            (
                json!({"kind": "dns", "target": "x.com", "options": {"protocol": "quic"}, "limit": 1}),
                "options.protocol",
            ),
            (
                json!({"kind": "dns", "target": "x.com", "options": {"resolver": "dns.google"}, "limit": 1}),
                "options.resolver",
            ),
            (
                json!({"kind": "dns", "target": "x.com", "options": {"resolver": "9.9.9.9:0"}, "limit": 1}),
                "options.resolver",
            ),
            (
                json!({"kind": "dns", "target": "x.com", "options": {"resolver": "9.9.9.9:99999"}, "limit": 1}),
                "options.resolver",
            ),
            (
                json!({"kind": "dns", "target": "x.com", "options": {"retries": 3}, "limit": 1}),
                "options.retries",
            ),
            (
                json!({"kind": "dns", "target": "not a name", "limit": 1}),
                "target",
            ),
            (
                json!({"kind": "http", "target": "ftp://x.com/", "limit": 1}),
                "target",
            ),
            (
                json!({"kind": "http", "target": "https://u:p@x.com/", "limit": 1}),
                "target",
            ),
            (
                json!({"kind": "http", "target": "x.com", "limit": 1}),
                "target",
            ),
            (
                json!({"kind": "http", "target": "https://x.com/", "options": {"method": "POST"}, "limit": 1}),
                "options.method",
            ),
            (
                json!({"kind": "http", "target": "https://x.com/", "options": {"protocol": "h3"}, "limit": 1}),
                "options.protocol",
            ),
            (
                json!({"kind": "http", "target": "https://x.com/", "options": {"headers": {"Host": "y"}}, "limit": 1}),
                "options.headers.Host",
            ),
            (
                json!({"kind": "http", "target": "https://x.com/", "options": {"headers": {"X-A": "a\r\nb: c"}}, "limit": 1}),
                "options.headers.X-A",
            ),
            (
                json!({"kind": "http", "target": "https://x.com/", "options": {"headers": {"bad name": "v"}}, "limit": 1}),
                "options.headers.bad name",
            ),
            (
                json!({"kind": "http", "target": "https://x.com/", "options": {"headers": "a"}, "limit": 1}),
                "options.headers",
            ),
            (
                json!({"kind": "tcp", "target": "x.com", "limit": 1}),
                "options.port",
            ),
            (
                json!({"kind": "tcp", "target": "x.com", "options": {"port": 0}, "limit": 1}),
                "options.port",
            ),
            (
                json!({"kind": "tcp", "target": "x.com", "options": {"port": 70000}, "limit": 1}),
                "options.port",
            ),
            (
                json!({"kind": "tcp", "target": "x.com", "options": {"port": "80"}, "limit": 1}),
                "options.port",
            ),
            (
                json!({"kind": "ping", "target": "x.com", "options": {"packets": 17}, "limit": 1}),
                "options.packets",
            ),
            (
                json!({"kind": "ping", "target": "x.com", "options": {"packets": -1}, "limit": 1}),
                "options.packets",
            ),
            (json!({"kind": "ping", "target": "", "limit": 1}), "target"),
            (
                json!({"kind": "trace", "target": "x.com", "options": {"protocol": "sctp"}, "limit": 1}),
                "options.protocol",
            ),
            (
                json!({"kind": "trace", "target": "x.com", "options": {"port": 80}, "limit": 1}),
                "options.port",
            ),
            (
                json!({"kind": "ping", "target": "x.com"}),
                "locations, limit, reuse",
            ),
            (
                json!({"kind": "ping", "target": "x.com", "limit": 1, "reuse": "x"}),
                "locations, limit, reuse",
            ),
            (
                json!({"kind": "ping", "target": "x.com", "limit": 0}),
                "limit",
            ),
            (
                json!({"kind": "ping", "target": "x.com", "limit": 1001}),
                "limit",
            ),
            (
                json!({"kind": "ping", "target": "x.com", "reuse": "nope"}),
                "reuse",
            ),
            (
                json!({"kind": "ping", "target": "x.com", "locations": [{"country": "NLD"}]}),
                "locations[0].country",
            ),
            (
                json!({"kind": "ping", "target": "x.com", "locations": [{"limit": 0}]}),
                "locations[0].limit",
            ),
            (
                json!({"kind": "ping", "target": "x.com", "locations": [{"city": ""}]}),
                "locations[0].city",
            ),
            (
                json!({"kind": "ping", "target": "x.com", "locations": [{"limit": 600}, {"limit": 600}]}),
                "locations",
            ),
            (
                json!({"kind": "ping", "target": "x.com", "locations": [{"tags": [":v"]}]}),
                "locations[0].tags[0]",
            ),
        ] {
            let message = refused(body.clone());
            assert!(
                message.starts_with(&format!("{field}:")),
                "{body}: {message}"
            );
        }
        let many: Vec<serde_json::Value> = (0..17).map(|_| json!({})).collect();
        assert!(
            refused(json!({"kind": "ping", "target": "x.com", "locations": many}))
                .starts_with("locations:")
        );
    }

    #[test]
    fn http_targets_are_taken_as_written_or_refused() {
        for (target, says) in [
            ("http://example.com/a\r\nX: y", "control characters"),
            ("http://example.com/a b", "control characters"),
            ("http://example.com/\t", "control characters"),
            (" http://example.com/", "control characters"),
            ("http:///x", "no host"),
            ("https://?q", "no host"),
            ("http://example.com:0/", "port 0"),
        ] {
            let message = refused(json!({"kind": "http", "target": target, "limit": 1}));
            assert!(message.contains(says), "{target:?}: {message}");
            assert!(message.starts_with("target:"), "{target:?}: {message}");
        }
        let NewCheck { spec, .. } = request(
            json!({"kind": "http", "target": "http://example.com:8080/a%20b?x=1", "limit": 1}),
        )
        .parse(false)
        .unwrap();
        assert_eq!(spec.target, "http://example.com:8080/a%20b?x=1");
    }

    #[test]
    fn forbidden_targets_are_refused_unless_allowed() {
        for (body, field) in [
            (
                json!({"kind": "ping", "target": "127.0.0.1", "limit": 1}),
                "target",
            ),
            (
                json!({"kind": "tcp", "target": "0x7f.1", "options": {"port": 22}, "limit": 1}),
                "target",
            ),
            (
                json!({"kind": "http", "target": "http://0x7f000001:8080/", "limit": 1}),
                "target",
            ),
            (
                json!({"kind": "http", "target": "http://[::ffff:169.254.169.254]/latest", "limit": 1}),
                "target",
            ),
            (
                json!({"kind": "http", "target": "http://localhost/", "limit": 1}),
                "target",
            ),
            (
                json!({"kind": "trace", "target": "fe80::1%eth0", "limit": 1}),
                "target",
            ),
            (
                json!({"kind": "dns", "target": "x.com", "options": {"resolver": "10.0.0.53"}, "limit": 1}),
                "options.resolver",
            ),
        ] {
            match request(body.clone()).parse(false) {
                Err(CheckError::Forbidden { field: f, .. }) => assert_eq!(f, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
            assert!(
                request(body.clone()).parse(true).is_ok(),
                "{body} with private targets allowed"
            );
        }
    }

    #[test]
    fn http_headers_are_redacted_for_readers_and_insecure_is_written_only_when_true() {
        let parse = |options: serde_json::Value| {
            request(
                json!({"kind": "http", "target": "https://x.com/", "options": options,
                           "limit": 1}),
            )
            .parse(false)
        };
        let NewCheck { spec, .. } =
            parse(json!({"headers": {"Authorization": "Bearer s3"}})).unwrap();
        assert!(spec.options.get("insecure").is_none(), "{}", spec.options);
        assert_eq!(
            redacted_options(&spec.options)["headers"],
            json!({"authorization": REDACTED})
        );
        assert_eq!(
            spec.options["headers"]["authorization"], "Bearer s3",
            "the spec keeps it"
        );
        let NewCheck { spec, .. } =
            parse(json!({"insecure": true, "headers": {"a": "b"}})).unwrap();
        assert_eq!(spec.options["insecure"], true);
        let refused = parse(json!({"insecure": "yes"})).unwrap_err().to_string();
        assert!(refused.contains("options.insecure"), "{refused}");
        // Anywhere in an event's payload.
        let mut payload = json!({"check_id": "c", "options": {"headers": {"x": "s3"}},
                                 "slots": [{"options": {"headers": {"y": "s3"}}}]});
        redact_headers(&mut payload);
        assert!(!payload.to_string().contains("s3"), "{payload}");
    }

    #[test]
    fn the_host_resolver_is_not_asked_about_local_names_or_private_addresses() {
        let dns = |target: &str, options: serde_json::Value| {
            request(json!({"kind": "dns", "target": target, "options": options, "limit": 1}))
                .parse(false)
        };
        for (target, record) in [
            ("db.internal", "A"),
            ("printer.local", "AAAA"),
            ("localhost", "A"),
            ("10.0.0.1", "PTR"),
            ("1.0.0.10.in-addr.arpa", "PTR"),
            ("1.0.168.192.in-addr.arpa", "TXT"),
            ("::1", "PTR"),
        ] {
            let refused = dns(target, json!({"type": record})).unwrap_err();
            assert!(
                matches!(&refused, CheckError::Forbidden { field, .. } if field == "target"),
                "{target} {record}: {refused}"
            );
        }
        // Under the reverse trees but not one address: only of a named resolver.
        for target in [
            "10.in-addr.arpa",
            "in-addr.arpa",
            "c.f.ip6.arpa",
            "b._dns-sd._udp.0.1.168.192.in-addr.arpa",
            "1.0-25.0.0.10.in-addr.arpa",
            "x.16.172.in-addr.arpa",
            "1.1.0.0.10.in-addr.arpa",
        ] {
            let refused = dns(target, json!({"type": "PTR"})).unwrap_err().to_string();
            assert!(refused.contains("options.resolver"), "{target}: {refused}");
            assert!(dns(target, json!({"type": "PTR", "resolver": "9.9.9.9"})).is_ok());
        }
        // Public names and addresses, and any name asked of a resolver the check names.
        for (target, options) in [
            ("example.com", json!({"type": "A"})),
            ("8.8.4.4", json!({"type": "PTR"})),
            ("4.4.8.8.in-addr.arpa", json!({"type": "PTR"})),
            ("db.internal", json!({"type": "A", "resolver": "9.9.9.9"})),
            ("10.0.0.1", json!({"type": "PTR", "resolver": "9.9.9.9"})),
        ] {
            assert!(dns(target, options.clone()).is_ok(), "{target} {options}");
        }
        assert_eq!(
            reverse("1.0.0.10.in-addr.arpa"),
            Reverse::Address("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            reverse(&reverse_name("2001:db8::1".parse().unwrap())),
            Reverse::Address("2001:db8::1".parse().unwrap())
        );
        assert_eq!(reverse("fooin-addr.arpa"), Reverse::No);
    }
}
