//! Lease tokens: `<agent>.<kind>.<entry-id>.<epoch>`, where the epoch is Redis's delivery count
//! of the entry, so no agent clock matters.

use crate::agents::{limits, AgentId, Invalid};
use crate::kinds::Kind;

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
        let kind = kind.parse::<Kind>().map_err(|()| bad())?.as_str();
        let (ms, seq) = entry.split_once('-').ok_or_else(bad)?;
        // As Redis writes stream ids: decimal u64s without leading zeros, so that no two
        // texts name one entry (Redis reads `01-0` as `1-0`).
        let canonical = |n: &str| n.parse::<u64>().is_ok_and(|v| v.to_string() == n);
        if !canonical(ms) || !canonical(seq) {
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
            "a.dns.01-0.1",
            "a.dns.1-00.1",
            "a.dns.+1-0.1",
            "a.dns.18446744073709551616-0.1",
        ] {
            assert!(LeaseToken::parse(bad).is_err(), "{bad:?}");
        }
        assert!(LeaseToken::parse(&format!("a.dns.1-0.{}", "1".repeat(300))).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn token() -> impl Strategy<Value = String> {
            (
                "agt-[a-z0-9]{1,32}",
                proptest::sample::select(Kind::ALL.to_vec()),
                0u64..u64::MAX,
                0u64..1_000,
                1u64..u64::MAX,
            )
                .prop_map(|(agent, kind, ms, seq, epoch)| {
                    format!("{agent}.{kind}.{ms}-{seq}.{epoch}")
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// A token as the gateway makes it parses to the same text.
            #[test]
            fn a_well_formed_token_round_trips(text in token()) {
                let parsed = LeaseToken::parse(&text).unwrap();
                prop_assert_eq!(parsed.to_string(), text);
            }

            /// Whatever a client sends: an answer, never a panic; and what parses is exactly
            /// what it prints, its entry id as Redis writes it (no two texts name one lease).
            #[test]
            fn any_text_is_refused_or_canonical(text in ".{0,200}") {
                if let Ok(parsed) = LeaseToken::parse(&text) {
                    prop_assert_eq!(parsed.to_string(), text);
                    let (ms, seq) = parsed.entry.split_once('-').unwrap();
                    prop_assert_eq!(ms.parse::<u64>().unwrap().to_string(), ms);
                    prop_assert_eq!(seq.parse::<u64>().unwrap().to_string(), seq);
                }
            }

            /// A good token with a byte changed, cut or added: refused, or canonical.
            #[test]
            fn a_damaged_token_is_refused_or_canonical(
                text in token(),
                at in any::<prop::sample::Index>(),
                byte in any::<u8>(),
                how in 0u8..3,
            ) {
                let mut bytes = text.into_bytes();
                let i = at.index(bytes.len());
                match how {
                    0 => bytes[i] = byte,
                    1 => bytes.truncate(i),
                    _ => bytes.insert(i, byte),
                }
                let damaged = String::from_utf8_lossy(&bytes).into_owned();
                if let Ok(parsed) = LeaseToken::parse(&damaged) {
                    prop_assert_eq!(&parsed.to_string(), &damaged);
                    let (ms, seq) = parsed.entry.split_once('-').unwrap();
                    prop_assert_eq!(ms.parse::<u64>().unwrap().to_string(), ms);
                    prop_assert_eq!(seq.parse::<u64>().unwrap().to_string(), seq);
                }
            }
        }
    }
}

/// Bodies of the lease endpoints.
pub mod api {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    /// Most tasks one claim may ask for, over all kinds.
    pub const MAX_CLAIM: u32 = 1024;
    /// Most tokens in one extend or report.
    pub const MAX_TOKENS: usize = 1000;

    /// `POST /v1/agents/claim`.
    #[derive(Debug, Clone, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct ClaimRequest {
        pub capacities: BTreeMap<String, u32>,
        pub request_id: String,
        #[serde(default)]
        pub wait_ms: u64,
        /// Accepted when it equals `X-Agent-Id`.
        #[serde(default)]
        pub agent_id: Option<String>,
    }

    /// One lease handed out.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Lease {
        pub token: String,
        pub kind: String,
        pub spec: serde_json::Value,
        pub lease_duration_ms: u64,
        /// Informational: agents go by `lease_duration_ms`.
        pub lease_until_ms: i64,
    }

    /// The answer to a claim.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ClaimResponse {
        pub leases: Vec<Lease>,
    }

    /// `POST /v1/agents/extend`.
    #[derive(Debug, Clone, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct ExtendRequest {
        pub tokens: Vec<String>,
    }

    /// Per token: the new deadline or why not.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct TokenOutcome {
        pub token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub new_deadline_ms: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub status: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub error: Option<String>,
        /// What was wrong, for a refusal that is not the fence's (a result that does not
        /// fit its kind names the field).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub message: Option<String>,
    }

    /// The answer to an extend or a report.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct TokenOutcomes {
        pub results: Vec<TokenOutcome>,
    }

    /// An observation: a value and its unit.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Observation {
        pub name: String,
        pub value: f64,
        pub unit: String,
    }

    /// How a task the agent ran ended.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum Outcome {
        /// It ran: its result says what it saw.
        Finished,
        /// It could not run (a bad spec, no free worker, a target refused, ...).
        Failed,
    }

    impl Outcome {
        pub const fn as_str(self) -> &'static str {
            match self {
                Self::Finished => "finished",
                Self::Failed => "failed",
            }
        }
    }

    /// A finished (or failed) task.
    #[derive(Debug, Clone, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct Completed {
        pub token: String,
        /// [`Outcome::Finished`] when absent.
        #[serde(default)]
        pub outcome: Option<Outcome>,
        #[serde(default)]
        pub observations: Vec<Observation>,
        #[serde(default)]
        pub result: serde_json::Value,
    }

    /// A task the agent gave up.
    #[derive(Debug, Clone, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct Cancelled {
        pub token: String,
        #[serde(default)]
        pub reason: Option<String>,
    }

    /// `POST /v1/agents/report`.
    #[derive(Debug, Clone, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub struct ReportRequest {
        #[serde(default)]
        pub completed: Vec<Completed>,
        #[serde(default)]
        pub cancelled: Vec<Cancelled>,
    }
}
