//! Configuration from environment variables, validated once at start.
//!
//! A service snapshots the environment into an [`Env`], reads every variable it knows through the
//! typed getters below, and calls [`Env::finish`]. The first mistake stops start-up with a
//! [`ConfigError`] that names the variable; an unknown variable under one of the project's own
//! prefixes (`AGENT_`, `GATEWAY_`, `SCHEDULER_`, `HAPROXY_SYNC_`, `CHECKPLANE_`) is a mistake too,
//! because a typo there would otherwise be silently ignored. Loading has no side effects.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::vars;

/// The project's own variable prefixes: unknown names under them are refused.
pub const PROJECT_PREFIXES: &[&str] = &[
    "AGENT_",
    "GATEWAY_",
    "SCHEDULER_",
    "HAPROXY_SYNC_",
    "CHECKPLANE_",
];

/// A configuration mistake, naming the variable at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct ConfigError {
    /// The variable at fault.
    pub var: String,
    /// What is wrong with it (never its value when it is a secret).
    pub reason: String,
}

impl ConfigError {
    pub fn new(var: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            var: var.into(),
            reason: reason.into(),
        }
    }
}

/// A secret value: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A snapshot of the environment and the names read from it so far.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
    read: BTreeSet<String>,
}

impl Env {
    /// Snapshot of the process environment. Variables that are not valid UTF-8 are kept as
    /// lossy strings so that a getter can name them.
    pub fn from_process() -> Self {
        Self::from_pairs(std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        }))
    }

    /// An environment made of the given pairs (tests, and services started in-process).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            read: BTreeSet::new(),
        }
    }

    /// The names read so far.
    pub fn read_names(&self) -> impl Iterator<Item = &str> {
        self.read.iter().map(String::as_str)
    }

    fn raw(&mut self, name: &str) -> Option<String> {
        self.read.insert(name.to_owned());
        self.vars
            .get(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// An optional string.
    pub fn opt_string(&mut self, name: &str) -> Option<String> {
        self.raw(name)
    }

    /// `HAPROXY_ALLOWED_ADDRESSES`: where haproxy-sync may connect directly (the gateway
    /// refuses other instance addresses, haproxy-sync every connection outside them).
    pub fn haproxy_allowed_addresses(
        &mut self,
    ) -> Result<checkplane_wire::haproxy::AllowedAddresses, ConfigError> {
        const NAME: &str = "HAPROXY_ALLOWED_ADDRESSES";
        match self.opt_string(NAME) {
            None => Ok(Default::default()),
            Some(text) => checkplane_wire::haproxy::AllowedAddresses::parse(&text)
                .map_err(|why| ConfigError::new(NAME, why.reason)),
        }
    }

    /// A string with a default.
    pub fn string(&mut self, name: &str, default: &str) -> String {
        self.raw(name).unwrap_or_else(|| default.to_owned())
    }

    /// A required string.
    pub fn required_string(&mut self, name: &str) -> Result<String, ConfigError> {
        self.raw(name)
            .ok_or_else(|| ConfigError::new(name, "is required but not set"))
    }

    /// A value parsed with `FromStr`, with a default; `what` describes the expected form.
    pub fn parsed<T: FromStr>(
        &mut self,
        name: &str,
        default: T,
        what: &str,
    ) -> Result<T, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ConfigError::new(name, format!("expected {what}, got {v:?}"))),
        }
    }

    /// An unsigned integer within `min..=max`.
    pub fn u64_in(
        &mut self,
        name: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let v: u64 = self.parsed(name, default, "a whole number")?;
        if !(min..=max).contains(&v) {
            return Err(ConfigError::new(
                name,
                format!("must be between {min} and {max}, got {v}"),
            ));
        }
        Ok(v)
    }

    /// A boolean: `1/true/yes/on` or `0/false/no/off`.
    pub fn bool(&mut self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::new(
                    name,
                    format!("expected true/false (or 1/0), got {v:?}"),
                )),
            },
        }
    }

    /// A duration written `500ms`, `30s`, `1m` or `1h`, within `min..=max`.
    pub fn duration(
        &mut self,
        name: &str,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        let value = match self.raw(name) {
            None => default,
            Some(v) => parse_duration(&v).map_err(|bad| ConfigError::new(name, bad.to_string()))?,
        };
        if value < min || value > max {
            return Err(ConfigError::new(
                name,
                format!(
                    "must be between {} and {}",
                    format_duration(min),
                    format_duration(max)
                ),
            ));
        }
        Ok(value)
    }

    /// A socket address such as `127.0.0.1:8080` or `[::1]:8080`.
    pub fn socket_addr(&mut self, name: &str, default: &str) -> Result<SocketAddr, ConfigError> {
        let v = self.string(name, default);
        v.parse().map_err(|_| {
            ConfigError::new(
                name,
                format!("expected an address like 127.0.0.1:8080, got {v:?}"),
            )
        })
    }

    /// A secret from `NAME`, or from the file named by `NAME_FILE` (one trailing newline is
    /// dropped). Setting both is a mistake. The value never appears in an error.
    pub fn secret(&mut self, name: &str) -> Result<Option<Secret>, ConfigError> {
        let secret = self.secret_as_given(name)?;
        // The sample files' placeholders (`.env.example`, the example vault) never run.
        if secret
            .as_ref()
            .is_some_and(|s| s.0.trim().to_ascii_lowercase().starts_with("change-me"))
        {
            return Err(ConfigError::new(
                name,
                "is still the sample's placeholder (change-me…): set a secret of your own",
            ));
        }
        Ok(secret)
    }

    fn secret_as_given(&mut self, name: &str) -> Result<Option<Secret>, ConfigError> {
        let file_var = format!("{name}_FILE");
        let direct = self.raw(name);
        let file = self.raw(&file_var);
        match (direct, file) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                name,
                format!("set either {name} or {file_var}, not both"),
            )),
            (Some(v), None) => Ok(Some(Secret(v))),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(PathBuf::from(&path)).map_err(|e| {
                    ConfigError::new(&file_var, format!("cannot read {path:?}: {e}"))
                })?;
                let value = text.strip_suffix('\n').unwrap_or(&text);
                let value = value.strip_suffix('\r').unwrap_or(value);
                if value.is_empty() {
                    return Err(ConfigError::new(&file_var, format!("{path:?} is empty")));
                }
                Ok(Some(Secret(value.to_owned())))
            }
            (None, None) => Ok(None),
        }
    }

    /// Refuse unknown variables under the project's prefixes. Known means: read by this service,
    /// or documented for another service in [`vars::ALL`] (so one env file may serve several).
    pub fn finish(self) -> Result<(), ConfigError> {
        for name in self.vars.keys() {
            if !PROJECT_PREFIXES.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            if self.read.contains(name) || vars::is_known(name) {
                continue;
            }
            let hint = vars::closest(name)
                .map(|c| format!(" (did you mean {c}?)"))
                .unwrap_or_default();
            return Err(ConfigError::new(name, format!("unknown variable{hint}")));
        }
        Ok(())
    }
}

/// Text that is not a duration [`parse_duration`] reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a duration like 500ms, 30s or 1m, got {0:?}")]
pub struct BadDuration(pub String);

/// Parse `500ms`, `30s`, `1m`, `2h`, `30d` into a duration. A bare number is refused: its unit would
/// be a guess.
pub fn parse_duration(text: &str) -> Result<Duration, BadDuration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad = || BadDuration(text.to_owned());
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => return Err(bad()),
    }
    .ok_or_else(bad)?;
    Ok(Duration::from_millis(millis))
}

/// Format a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 86_400_000 == 0 && ms > 0 {
        format!("{}d", ms / 86_400_000)
    } else if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1_000 == 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_samples_placeholder_secret_is_refused_naming_the_variable() {
        let dir = std::env::temp_dir().join(format!("cp-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "Change-Me-please\n").unwrap();
        for mut env in [
            Env::from_pairs([("GATEWAY_ADMIN_KEY", "change-me-admin-key")]),
            Env::from_pairs([("GATEWAY_ADMIN_KEY_FILE", file.display().to_string())]),
        ] {
            let refused = env.secret("GATEWAY_ADMIN_KEY").unwrap_err();
            assert_eq!(refused.var, "GATEWAY_ADMIN_KEY");
            assert!(refused.to_string().contains("placeholder"), "{refused}");
        }
        let mut fine = Env::from_pairs([("GATEWAY_ADMIN_KEY", "a-real-key-0123456789")]);
        assert!(fine.secret("GATEWAY_ADMIN_KEY").unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "-1s",
            "10x",
            "1 m",
            "99999999999999999999ms",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn format_round_trips() {
        for d in [500, 1_000, 30_000, 60_000, 3_600_000, 1_500] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }

    #[test]
    fn malformed_value_names_the_variable() {
        let mut env = Env::from_pairs([("SHUTDOWN_TIMEOUT", "10x")]);
        let err = env
            .duration(
                "SHUTDOWN_TIMEOUT",
                Duration::from_secs(10),
                Duration::ZERO,
                Duration::from_secs(600),
            )
            .unwrap_err();
        assert_eq!(err.var, "SHUTDOWN_TIMEOUT");
        assert!(err.to_string().starts_with("SHUTDOWN_TIMEOUT: "));
    }

    #[test]
    fn out_of_range_is_refused() {
        let mut env = Env::from_pairs([("STREAM_SHARDS", "0")]);
        let err = env.u64_in("STREAM_SHARDS", 4, 1, 1024).unwrap_err();
        assert_eq!(err.var, "STREAM_SHARDS");
    }

    #[test]
    fn unknown_prefixed_variable_is_refused_with_a_hint() {
        let mut env = Env::from_pairs([("AGENT_HEALTH_ADR", "x"), ("PATH", "/bin")]);
        let _ = env.opt_string("AGENT_HEALTH_ADDR");
        let err = env.finish().unwrap_err();
        assert_eq!(err.var, "AGENT_HEALTH_ADR");
        assert!(err.reason.contains("AGENT_HEALTH_ADDR"), "{err}");
    }

    #[test]
    fn variables_documented_for_other_services_are_accepted() {
        let env = Env::from_pairs([("AGENT_CONTROL_PLANE", "x"), ("UNRELATED_THING", "1")]);
        assert_eq!(env.finish(), Ok(()));
    }

    #[test]
    fn secret_comes_from_file_and_never_prints() {
        let dir = std::env::temp_dir().join(format!("cp-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let mut env = Env::from_pairs([("METRICS_API_KEY_FILE", path.to_string_lossy())]);
        let secret = env.secret("METRICS_API_KEY").unwrap().unwrap();
        assert_eq!(secret.expose(), "s3cret");
        assert!(!format!("{secret:?} {secret}").contains("s3cret"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secret_set_twice_is_refused_without_echoing_it() {
        let mut env = Env::from_pairs([
            ("METRICS_API_KEY", "s3cret"),
            ("METRICS_API_KEY_FILE", "/nonexistent"),
        ]);
        let err = env.secret("METRICS_API_KEY").unwrap_err();
        assert!(!err.to_string().contains("s3cret"));
    }

    #[test]
    fn booleans() {
        let mut env = Env::from_pairs([("A", "yes"), ("B", "0"), ("C", "maybe")]);
        assert_eq!(env.bool("A", false), Ok(true));
        assert_eq!(env.bool("B", true), Ok(false));
        assert_eq!(env.bool("D", true), Ok(true));
        assert_eq!(env.bool("C", true).unwrap_err().var, "C");
    }
}
