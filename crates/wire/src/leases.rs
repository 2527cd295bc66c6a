//! Lease tokens: `<agent>.<kind>.<entry-id>.<epoch>`, where the epoch is Redis's delivery count
//! of the entry, so no agent clock matters.

use crate::agents::{limits, AgentId, Invalid, KINDS};

/// A parsed lease token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseToken {
    pub agent: AgentId,
    pub kind: &'static str,
    /// The task's stream entry id, `<ms>-<seq>`.
    pub entry: String,
    /// The delivery this lease belongs to.
    pub epoch: u64,
}

impl LeaseToken {
    /// Parse a token; anything malformed, truncated or oversized is refused.
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let bad = || Invalid {
            field: "token".to_owned(),
            reason: "not a lease token".to_owned(),
        };
        if s.len() > limits::TOKEN + 64 {
            return Err(bad());
        }
        let mut parts = s.split('.');
        let (Some(agent), Some(kind), Some(entry), Some(epoch), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let agent = AgentId::parse(agent).map_err(|_| bad())?;
        let kind = KINDS.iter().find(|k| **k == kind).ok_or_else(bad)?;
        let (ms, seq) = entry.split_once('-').ok_or_else(bad)?;
        if ms.is_empty()
            || seq.is_empty()
            || ms.len() > 20
            || seq.len() > 20
            || !ms.bytes().all(|b| b.is_ascii_digit())
            || !seq.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let epoch: u64 = epoch.parse().map_err(|_| bad())?;
        if epoch == 0 || epoch.to_string() != epoch_text(s) {
            return Err(bad());
        }
        Ok(Self {
            agent,
            kind,
            entry: entry.to_owned(),
            epoch,
        })
    }
}

fn epoch_text(s: &str) -> &str {
    s.rsplit('.').next().unwrap_or_default()
}

impl std::fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            self.agent, self.kind, self.entry, self.epoch
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let t = LeaseToken::parse("agt-1.dns.1763791234567-0.2").unwrap();
        assert_eq!(
            (t.agent.as_str(), t.kind, t.entry.as_str(), t.epoch),
            ("agt-1", "dns", "1763791234567-0", 2)
        );
        assert_eq!(t.to_string(), "agt-1.dns.1763791234567-0.2");
    }

    #[test]
    fn forged_and_truncated_tokens_are_refused() {
        for bad in [
            "",
            "a",
            "a.dns",
            "a.dns.1-0",
            "a.dns.1-0.",
            "a.dns.1-0.0",
            "a.dns.1-0.01",
            "a.smtp.1-0.1",
            "a.dns.1.1",
            "a.dns.-0.1",
            "a.dns.1-x.1",
            "a.dns.1-0.1.extra",
            "a b.dns.1-0.1",
            "a.dns.1-0.-1",
            "a.dns.1-0.99999999999999999999999",
        ] {
            assert!(LeaseToken::parse(bad).is_err(), "{bad:?}");
        }
        assert!(LeaseToken::parse(&format!("a.dns.1-0.{}", "1".repeat(300))).is_err());
    }
}
