//! What an agent reports for each kind: the result's schema, enforced by the gateway on every
//! report (a result that does not match is refused, naming its field) and kept by agents (their
//! tests hold every result they make to it).
//!
//! A `finished` result carries its kind's measurement (the fields [`check`] requires for it);
//! a `failed` one carries `error{code, message}` and whatever the kind got before it failed
//! (its timings, the address it reached, ...). Either way no field outside the kind's schema is
//! taken, and every list is bounded.

use serde::Deserialize;
use serde_json::Value;

use crate::error::Invalid;
use crate::kinds::Kind;
use crate::leases::api::Outcome;

/// Most DNS answers in one result.
pub const MAX_ANSWERS: usize = 1000;
/// Most response headers an http result keeps (the agent keeps 100).
pub const MAX_HEADERS: usize = 100;
/// Most hops of a trace (the agent stops after 30).
pub const MAX_HOPS: usize = 64;
/// Most replies of a ping (a ping sends at most 16 packets).
pub const MAX_REPLIES: usize = 16;
/// Most Runtime API replies of one relayed task.
pub const MAX_RELAY_REPLIES: usize = 64;

/// Why it failed: a code (`ERR_…`) and a message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    pub code: String,
    pub message: String,
}

/// Milliseconds of each step; which steps depend on the kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Steps {
    pub dns: Option<f64>,
    pub tcp: Option<f64>,
    pub connect: Option<f64>,
    pub tls: Option<f64>,
    pub first_byte: Option<f64>,
    pub download: Option<f64>,
    pub total: Option<f64>,
}

/// A `dns` result.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub record: Option<String>,
    pub protocol: Option<String>,
    pub resolver: Option<String>,
    pub rcode: Option<String>,
    pub answers: Option<Vec<DnsAnswer>>,
    /// How many records the answer had, when there were more than [`MAX_ANSWERS`] (the
    /// first of them are in `answers`).
    pub answers_total: Option<u64>,
    pub timings: Option<Steps>,
    pub error: Option<Failure>,
}

/// One record of a DNS answer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsAnswer {
    pub name: String,
    #[serde(rename = "type")]
    pub record: String,
    pub ttl: u32,
    pub class: String,
    pub value: String,
}

/// An `http` result.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    pub status: Option<u16>,
    pub http_version: Option<String>,
    pub headers: Option<std::collections::BTreeMap<String, String>>,
    pub body: Option<String>,
    pub body_bytes: Option<u64>,
    pub truncated: Option<bool>,
    pub address: Option<String>,
    pub port: Option<u16>,
    pub tls: Option<Tls>,
    pub timings: Option<Steps>,
    pub error: Option<Failure>,
}

/// The TLS session and the leaf certificate of an https check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub protocol: Option<String>,
    pub cipher: Option<String>,
    pub alpn: Option<String>,
    pub authorized: bool,
    pub authorization_error: Option<String>,
    pub fingerprint_sha256: Option<String>,
    pub subject: Option<String>,
    pub issuer: Option<String>,
    pub serial: Option<String>,
    pub valid_from: Option<String>,
    pub valid_to: Option<String>,
    pub alt_names: Option<Vec<String>>,
}

/// A `tcp` result.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tcp {
    pub connected: Option<bool>,
    pub address: Option<String>,
    pub port: Option<u16>,
    pub timings: Option<Steps>,
    pub error: Option<Failure>,
}

/// A `ping` result: `timings` are the replies when it finished, the steps when it failed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    pub address: Option<String>,
    pub socket: Option<String>,
    pub timings: Option<PingTimings>,
    pub stats: Option<PingStats>,
    pub dns: Option<f64>,
    pub total: Option<f64>,
    pub send_error: Option<String>,
    pub error: Option<Failure>,
}

/// A ping's replies, or a failed ping's steps.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PingTimings {
    Replies(Vec<PingReply>),
    Steps(Steps),
}

/// One echo reply.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingReply {
    pub seq: u16,
    pub rtt: f64,
    pub ttl: Option<u8>,
}

/// What a ping counted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingStats {
    pub min: Option<f64>,
    pub avg: Option<f64>,
    pub max: Option<f64>,
    pub loss: f64,
    pub sent: u32,
    pub received: u32,
}

/// A `trace` result.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trace {
    pub address: Option<String>,
    pub protocol: Option<String>,
    pub port: Option<u16>,
    pub reached: Option<bool>,
    pub hops: Option<Vec<Hop>>,
    pub timings: Option<Steps>,
    pub error: Option<Failure>,
}

/// One hop of a trace.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hop {
    pub ttl: u8,
    pub address: Option<String>,
    pub rtts: Vec<Option<f64>>,
    pub other_addresses: Option<Vec<String>>,
}

/// A relayed Runtime API exchange (`haproxy`): the first reply and all of them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    pub reply: Option<String>,
    pub replies: Option<Vec<Option<String>>>,
    pub timings: Option<Steps>,
    pub error: Option<Failure>,
}

/// Hold `result` to `kind`'s schema for `outcome`: the first field that does not fit, named
/// from `result` (`result.answers[0].ttl`).
pub fn check(kind: Kind, outcome: Outcome, result: &Value) -> Result<(), Invalid> {
    if !result.is_object() {
        return Err(Invalid::new("result", "expected an object"));
    }
    let (error, required): (bool, Vec<(&str, bool)>) = match kind {
        Kind::Dns => {
            let r: Dns = parse(result)?;
            bounded("result.answers", r.answers.as_ref(), MAX_ANSWERS)?;
            (
                r.error.is_some(),
                vec![
                    ("rcode", r.rcode.is_some()),
                    ("answers", r.answers.is_some()),
                ],
            )
        }
        Kind::Http => {
            let r: Http = parse(result)?;
            bounded("result.headers", r.headers.as_ref(), MAX_HEADERS)?;
            (
                r.error.is_some(),
                vec![
                    ("status", r.status.is_some()),
                    ("http_version", r.http_version.is_some()),
                ],
            )
        }
        Kind::Tcp => {
            let r: Tcp = parse(result)?;
            (
                r.error.is_some(),
                vec![
                    ("connected", r.connected.is_some()),
                    ("address", r.address.is_some()),
                    ("port", r.port.is_some()),
                ],
            )
        }
        Kind::Ping => {
            let r: Ping = parse(result)?;
            let replies = match &r.timings {
                Some(PingTimings::Replies(replies)) => Some(replies),
                _ => None,
            };
            bounded("result.timings", replies, MAX_REPLIES)?;
            (
                r.error.is_some(),
                vec![
                    ("address", r.address.is_some()),
                    ("stats", r.stats.is_some()),
                    ("timings", replies.is_some()),
                ],
            )
        }
        Kind::Trace => {
            let r: Trace = parse(result)?;
            bounded("result.hops", r.hops.as_ref(), MAX_HOPS)?;
            (
                r.error.is_some(),
                vec![
                    ("address", r.address.is_some()),
                    ("reached", r.reached.is_some()),
                    ("hops", r.hops.is_some()),
                ],
            )
        }
        Kind::Haproxy => {
            let r: Relay = parse(result)?;
            bounded("result.replies", r.replies.as_ref(), MAX_RELAY_REPLIES)?;
            (r.error.is_some(), vec![("replies", r.replies.is_some())])
        }
    };
    match outcome {
        Outcome::Finished => {
            if error {
                return Err(Invalid::new(
                    "result.error",
                    "a finished result has no error (report it failed)",
                ));
            }
            if let Some((field, _)) = required.iter().find(|(_, present)| !present) {
                return Err(Invalid::new(
                    format!("result.{field}"),
                    format!("a finished {kind} result needs it"),
                ));
            }
        }
        Outcome::Failed if !error => {
            return Err(Invalid::new(
                "result.error",
                "a failed result needs error{code, message}",
            ));
        }
        Outcome::Failed => {}
    }
    Ok(())
}

fn parse<T: serde::de::DeserializeOwned>(result: &Value) -> Result<T, Invalid> {
    serde_path_to_error::deserialize(result).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "result".to_owned()
        } else {
            format!("result.{path}")
        };
        Invalid::new(field, e.into_inner().to_string())
    })
}

fn bounded<T: Len>(field: &str, items: Option<&T>, max: usize) -> Result<(), Invalid> {
    match items {
        Some(items) if items.len() > max => Err(Invalid::new(field, format!("at most {max}"))),
        _ => Ok(()),
    }
}

/// How many items a bounded field holds.
trait Len {
    fn len(&self) -> usize;
}

impl<T> Len for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

impl<K, V> Len for std::collections::BTreeMap<K, V> {
    fn len(&self) -> usize {
        std::collections::BTreeMap::len(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(kind: Kind, outcome: Outcome, result: Value) -> String {
        check(kind, outcome, &result).unwrap_err().to_string()
    }

    #[test]
    fn a_tcp_result_needs_its_address_and_port() {
        let ok = json!({"connected": true, "address": "192.0.2.1", "port": 443,
                        "timings": {"dns": 0.1, "connect": 1.2, "total": 1.4}});
        check(Kind::Tcp, Outcome::Finished, &ok).unwrap();
        assert_eq!(
            refused(Kind::Tcp, Outcome::Finished, json!({"connected": true})),
            "result.address: a finished tcp result needs it"
        );
    }

    #[test]
    fn the_refusal_names_the_field_that_does_not_fit() {
        let answers = json!({"rcode": "NOERROR", "answers": [
            {"name": "a.", "type": "A", "ttl": 60, "class": "IN", "value": "192.0.2.1"},
            {"name": "a.", "type": "A", "ttl": -1, "class": "IN", "value": "192.0.2.2"}]});
        let why = refused(Kind::Dns, Outcome::Finished, answers);
        assert!(why.starts_with("result.answers[1].ttl: "), "{why}");
        let why = refused(
            Kind::Http,
            Outcome::Finished,
            json!({"status": 200, "http_version": "HTTP/1.1", "secret": "x"}),
        );
        assert!(
            why.starts_with("result.secret: unknown field `secret`"),
            "{why}"
        );
        let why = refused(
            Kind::Http,
            Outcome::Finished,
            json!({"status": 200, "http_version": "HTTP/1.1", "timings": {"dns": "fast"}}),
        );
        assert!(why.starts_with("result.timings.dns: "), "{why}");
        assert_eq!(
            refused(Kind::Trace, Outcome::Finished, json!([])),
            "result: expected an object"
        );
    }

    #[test]
    fn a_failed_result_needs_its_error_and_a_finished_one_has_none() {
        let failed = json!({"error": {"code": "ERR_TIMEOUT", "message": "no answer"},
                            "timings": {"dns": 2.0}, "address": "192.0.2.1"});
        check(Kind::Tcp, Outcome::Failed, &failed).unwrap();
        check(Kind::Ping, Outcome::Failed, &failed).unwrap();
        assert_eq!(
            refused(Kind::Tcp, Outcome::Failed, json!({"address": "192.0.2.1"})),
            "result.error: a failed result needs error{code, message}"
        );
        assert!(refused(Kind::Tcp, Outcome::Finished, failed).starts_with("result.error:"));
    }

    #[test]
    fn lists_are_bounded() {
        let hops: Vec<Value> = (1..=65)
            .map(|ttl| json!({"ttl": ttl, "address": null, "rtts": [null, null, null]}))
            .collect();
        let why = refused(
            Kind::Trace,
            Outcome::Finished,
            json!({"address": "192.0.2.1", "reached": false, "hops": hops}),
        );
        assert_eq!(why, "result.hops: at most 64");
    }
}
