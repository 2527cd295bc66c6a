//! The kinds of task an agent runs, listed once: the five check kinds and the HAProxy relay.
//! Every list of kinds (what an agent may declare, what a check may be, what the agent's
//! dispatch runs) is derived from [`Kind`].

use serde::{Deserialize, Serialize};

/// A kind of task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dns,
    Http,
    Tcp,
    Ping,
    Trace,
    /// Runtime API commands relayed by the agent on an HAProxy node (not a check).
    Haproxy,
}

impl Kind {
    /// Every kind, in this order.
    pub const ALL: [Kind; 6] = [
        Kind::Dns,
        Kind::Http,
        Kind::Tcp,
        Kind::Ping,
        Kind::Trace,
        Kind::Haproxy,
    ];

    /// The kinds a check may have.
    pub const CHECKS: [Kind; 5] = [Kind::Dns, Kind::Http, Kind::Tcp, Kind::Ping, Kind::Trace];

    /// Its name on the wire and in stream keys.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Dns => "dns",
            Self::Http => "http",
            Self::Tcp => "tcp",
            Self::Ping => "ping",
            Self::Trace => "trace",
            Self::Haproxy => "haproxy",
        }
    }

    /// Whether a check may have it.
    pub fn is_check(self) -> bool {
        self != Self::Haproxy
    }

    /// `kinds` by name, for messages: `dns, http, tcp`.
    pub fn names(kinds: &[Kind]) -> String {
        kinds
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::str::FromStr for Kind {
    type Err = ();

    fn from_str(name: &str) -> Result<Self, ()> {
        Self::ALL.into_iter().find(|k| k.as_str() == name).ok_or(())
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_name_that_parses_and_serialises_back() {
        let mut names = std::collections::BTreeSet::new();
        for kind in Kind::ALL {
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::Value::String(kind.as_str().to_owned())
            );
            assert!(names.insert(kind.as_str()));
            assert_eq!(kind.is_check(), Kind::CHECKS.contains(&kind));
        }
        assert_eq!(Kind::CHECKS.len() + 1, Kind::ALL.len());
        assert_eq!("DNS".parse::<Kind>(), Err(()));
        assert_eq!(Kind::names(&Kind::CHECKS), "dns, http, tcp, ping, trace");
    }
}
