//! Agent API bodies and the newtypes their fields are parsed into at the boundary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::events::Location;
use crate::kinds::Kind;

/// Limits on what an agent may declare.
pub mod limits {
    pub const HOSTNAME: usize = 253;
    pub const LABELS: usize = 32;
    pub const LABEL_KEY: usize = 63;
    pub const LABEL_VALUE: usize = 255;
    pub const CAPACITY: u32 = 1024;
    pub const CITY: usize = 128;
    pub const NETWORK: usize = 128;
    pub const AGENT_VERSION: usize = 64;
    pub const AGENT_ID: usize = 64;
    pub const TOKEN: usize = 128;
}

pub use crate::error::Invalid;

/// An agent id: 1-64 of `A-Z a-z 0-9 _ -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct AgentId(String);

impl AgentId {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if s.is_empty()
            || s.len() > limits::AGENT_ID
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(Invalid::new("agent_id", "expected 1-64 of A-Z a-z 0-9 _ -"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for AgentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One snapshot of an agent's concurrency controller.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSnapshot {
    /// When it was taken (ms since the epoch).
    pub at_ms: i64,
    /// Checks the controller lets run at once now.
    pub window: u32,
    /// The most it may grow to (`AGENT_MAX_INFLIGHT`).
    pub max: u32,
    pub inflight: u32,
    pub queued: u32,
    pub backpressure: bool,
    /// Why the window shrank (`timeouts`, `queueing`, `lag`), when it did.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /v1/agents/metrics`: the agent's counters and gauges (names to numbers), and the
/// controller's snapshots since the last report.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsReport {
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default)]
    pub concurrency: Vec<WindowSnapshot>,
}

/// Bounds of a metrics report.
pub mod metrics_limits {
    pub const METRICS: usize = 128;
    pub const NAME: usize = 128;
    pub const SNAPSHOTS: usize = 600;
    pub const REASON: usize = 32;
    pub const WINDOW: u32 = 4096;
    /// How far in the past or future (ms) a snapshot may be dated.
    pub const PAST_MS: i64 = 24 * 3600 * 1000;
    pub const FUTURE_MS: i64 = 5 * 60 * 1000;
}

impl MetricsReport {
    /// Check every field against [`metrics_limits`], `now_ms` being the server's clock.
    pub fn validate(&self, now_ms: i64) -> Result<(), Invalid> {
        use metrics_limits as l;
        if self.metrics.len() > l::METRICS {
            return Err(Invalid::new("metrics", format!("at most {}", l::METRICS)));
        }
        for (name, value) in &self.metrics {
            let good = !name.is_empty()
                && name.len() <= l::NAME
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            let shown: String = name.chars().take(32).collect();
            if !good {
                return Err(Invalid::new(
                    format!("metrics.{shown}"),
                    "names are 1-128 of A-Z a-z 0-9 . _ -",
                ));
            }
            if !value.is_finite() {
                return Err(Invalid::new(
                    format!("metrics.{shown}"),
                    "not a finite number",
                ));
            }
        }
        if self.concurrency.len() > l::SNAPSHOTS {
            return Err(Invalid::new(
                "concurrency",
                format!("at most {}", l::SNAPSHOTS),
            ));
        }
        for (i, s) in self.concurrency.iter().enumerate() {
            let field = |f: &str| format!("concurrency[{i}].{f}");
            if !(now_ms - l::PAST_MS..=now_ms + l::FUTURE_MS).contains(&s.at_ms) {
                return Err(Invalid::new(field("at_ms"), "within the last day"));
            }
            if s.max == 0 || s.max > l::WINDOW || s.window > s.max {
                return Err(Invalid::new(field("window"), "1 <= window <= max <= 4096"));
            }
            if s.inflight > l::WINDOW * 2 || s.queued > l::WINDOW * 2 {
                return Err(Invalid::new(field("inflight"), "at most 8192"));
            }
            if let Some(reason) = &s.reason {
                if reason.is_empty()
                    || reason.len() > l::REASON
                    || !reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                {
                    return Err(Invalid::new(field("reason"), "1-32 of a-z _"));
                }
            }
        }
        Ok(())
    }
}

/// The agent protocol's version: every agent call says it in [`protocol::HEADER`], so a
/// gateway knows the shapes an agent speaks and refuses, with a clear error, one it cannot
/// serve. A call without the header is version 1 (agents from before it).
pub mod protocol {
    /// The header an agent says its version in.
    pub const HEADER: &str = "x-agent-protocol";
    /// The version this release's agent speaks.
    pub const CURRENT: u32 = 1;
    /// The oldest version this release's gateway serves.
    pub const OLDEST: u32 = 1;

    /// Why a call's version is refused.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Refused {
        /// Not a version number.
        Malformed,
        /// A version this release does not serve.
        Unsupported(u64),
    }

    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Self::Malformed => write!(f, "X-Agent-Protocol: expected a version number"),
                Self::Unsupported(v) if *v > u64::from(CURRENT) => write!(
                    f,
                    "this agent speaks protocol {v}; this gateway speaks {OLDEST} to {CURRENT}: \
                     upgrade the gateway first"
                ),
                Self::Unsupported(v) => write!(
                    f,
                    "this agent speaks protocol {v}; this gateway speaks {OLDEST} to {CURRENT}: \
                     upgrade the agent"
                ),
            }
        }
    }

    /// The version a call speaks, from its header (absent: 1).
    pub fn parse(header: Option<&str>) -> Result<u32, Refused> {
        let version: u64 = match header {
            None => 1,
            Some(text) => text.trim().parse().map_err(|_| Refused::Malformed)?,
        };
        match u32::try_from(version) {
            Ok(v) if (OLDEST..=CURRENT).contains(&v) => Ok(v),
            _ => Err(Refused::Unsupported(version)),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn absent_is_one_and_only_served_versions_pass() {
            assert_eq!(parse(None), Ok(1));
            assert_eq!(parse(Some("1")), Ok(1));
            assert_eq!(parse(Some(&CURRENT.to_string())), Ok(CURRENT));
            assert_eq!(parse(Some("x")), Err(Refused::Malformed));
            assert_eq!(parse(Some("-1")), Err(Refused::Malformed));
            let newer = parse(Some(&(CURRENT + 1).to_string())).unwrap_err();
            assert!(newer.to_string().contains("upgrade the gateway"), "{newer}");
            assert_eq!(parse(Some("0")), Err(Refused::Unsupported(0)));
            assert_eq!(
                parse(Some("4294967296")),
                Err(Refused::Unsupported(4_294_967_296))
            );
        }
    }
}

/// `POST /v1/agents/heartbeat`: nothing to say but that the agent is there.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {}

/// `POST /v1/agents/register`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub hostname: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub capabilities: BTreeMap<String, u32>,
    #[serde(default)]
    pub location: Option<Location>,
    #[serde(default)]
    pub agent_version: Option<String>,
}

/// A registration whose every field was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub capabilities: BTreeMap<String, u32>,
    pub location: Option<Location>,
    pub agent_version: Option<String>,
}

fn printable(s: &str) -> bool {
    s.chars().all(|c| !c.is_control())
}

impl RegisterRequest {
    /// Check every field against the limits above.
    pub fn parse(self) -> Result<Registration, Invalid> {
        let hostname = self.hostname.trim().to_ascii_lowercase();
        if hostname.is_empty()
            || hostname.len() > limits::HOSTNAME
            || !hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        {
            return Err(Invalid::new(
                "hostname",
                "expected 1-253 of letters, digits, '.', '-', '_'",
            ));
        }
        if self.labels.len() > limits::LABELS {
            return Err(Invalid::new(
                "labels",
                format!("at most {} labels", limits::LABELS),
            ));
        }
        for (key, value) in &self.labels {
            if key.is_empty()
                || key.len() > limits::LABEL_KEY
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
            {
                return Err(Invalid::new(
                    format!("labels.{}", key.chars().take(64).collect::<String>()),
                    "a label key is 1-63 of letters, digits, '_', '-', '.', '/'",
                ));
            }
            if value.len() > limits::LABEL_VALUE || !printable(value) {
                return Err(Invalid::new(
                    format!("labels.{key}"),
                    "a label value is at most 255 printable characters",
                ));
            }
        }
        if self.capabilities.is_empty() {
            return Err(Invalid::new("capabilities", "declare at least one kind"));
        }
        for (kind, capacity) in &self.capabilities {
            if kind.parse::<Kind>().is_err() {
                return Err(Invalid::new(
                    format!("capabilities.{}", kind.chars().take(32).collect::<String>()),
                    format!("unknown kind; expected one of {}", Kind::names(&Kind::ALL)),
                ));
            }
            if *capacity == 0 || *capacity > limits::CAPACITY {
                return Err(Invalid::new(
                    format!("capabilities.{kind}"),
                    format!("capacity must be 1-{}", limits::CAPACITY),
                ));
            }
        }
        let location = self.location.map(validate_location).transpose()?;
        if let Some(v) = &self.agent_version {
            if v.is_empty() || v.len() > limits::AGENT_VERSION || !printable(v) {
                return Err(Invalid::new(
                    "agent_version",
                    "at most 64 printable characters",
                ));
            }
        }
        Ok(Registration {
            hostname,
            labels: self.labels,
            capabilities: self.capabilities,
            location,
            agent_version: self.agent_version,
        })
    }
}

fn validate_location(location: Location) -> Result<Location, Invalid> {
    let country = location.country.map(|c| c.to_ascii_uppercase());
    if let Some(c) = &country {
        if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Invalid::new(
                "location.country",
                "expected an ISO 3166-1 alpha-2 code such as DE",
            ));
        }
    }
    for (field, value, max) in [
        ("location.city", &location.city, limits::CITY),
        ("location.network", &location.network, limits::NETWORK),
    ] {
        if let Some(v) = value {
            if v.is_empty() || v.len() > max || !printable(v) {
                return Err(Invalid::new(field, format!("1-{max} printable characters")));
            }
        }
    }
    Ok(Location {
        country,
        ..location
    })
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub agent_id: String,
    /// The secret for `X-Agent-Token`; shown once.
    pub token: String,
    /// `true` when a known host registered again and its token was rotated.
    pub rotated: bool,
    /// How often to heartbeat.
    pub heartbeat_interval_ms: u64,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The next heartbeat is due within this many milliseconds.
    pub next_deadline_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RegisterRequest {
        RegisterRequest {
            hostname: "Probe-1.example".into(),
            labels: [("rack".to_owned(), "a1".to_owned())].into(),
            capabilities: [("dns".to_owned(), 4)].into(),
            location: Some(Location {
                country: Some("de".into()),
                ..Location::default()
            }),
            agent_version: None,
        }
    }

    #[test]
    fn a_good_registration_is_normalised() {
        let r = request().parse().unwrap();
        assert_eq!(r.hostname, "probe-1.example");
        assert_eq!(r.location.unwrap().country.as_deref(), Some("DE"));
    }

    #[test]
    fn every_bad_field_is_named() {
        type Mutation = Box<dyn Fn(&mut RegisterRequest)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|r| r.hostname = "bad host".into()), "hostname"),
            (Box::new(|r| r.hostname = "a".repeat(254)), "hostname"),
            (
                Box::new(|r| r.capabilities = BTreeMap::new()),
                "capabilities",
            ),
            (
                Box::new(|r| {
                    r.capabilities.insert("smtp".into(), 1);
                }),
                "capabilities.smtp",
            ),
            (
                Box::new(|r| {
                    r.capabilities.insert("http".into(), 0);
                }),
                "capabilities.http",
            ),
            (
                Box::new(|r| {
                    r.capabilities.insert("http".into(), 5000);
                }),
                "capabilities.http",
            ),
            (
                Box::new(|r| {
                    r.labels.insert("bad key".into(), "v".into());
                }),
                "labels.bad key",
            ),
            (
                Box::new(|r| {
                    r.labels.insert("k".into(), "x".repeat(256));
                }),
                "labels.k",
            ),
            (
                Box::new(|r| {
                    r.labels = (0..33).map(|i| (format!("k{i}"), String::new())).collect()
                }),
                "labels",
            ),
            (
                Box::new(|r| {
                    r.location = Some(Location {
                        country: Some("DEU".into()),
                        ..Location::default()
                    })
                }),
                "location.country",
            ),
            (
                Box::new(|r| r.agent_version = Some("\u{7}".into())),
                "agent_version",
            ),
        ];
        for (mutate, field) in cases {
            let mut r = request();
            mutate(&mut r);
            assert_eq!(r.parse().unwrap_err().field, field);
        }
    }

    #[test]
    fn agent_ids() {
        assert!(AgentId::parse("agt-0190abc_DEF").is_ok());
        for bad in ["", "a b", "a:b", "ü", &"a".repeat(65)] {
            assert!(AgentId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
