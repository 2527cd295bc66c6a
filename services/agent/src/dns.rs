//! The `dns` check: one question to one resolver, over UDP or TCP, with hickory-resolver and
//! no cache, so every check asks the resolver for real.
//!
//! The resolver is the check's (`options.resolver`, `ip` or `ip:port`), else the first name
//! server of the host's `/etc/resolv.conf`; the result names the one asked. An answer of any
//! response code is a measurement (`finished`, with its `rcode`); no answer at all is `failed`
//! (`ERR_TIMEOUT`, `ERR_CONNECT`, `ERR_DNS`).

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use checkplane_wire::results::MAX_ANSWERS;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Record, RecordType};
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{Name, ResolveErrorKind, TokioResolver};
use serde_json::{json, Value};

use checkplane_wire::checks::options;

use crate::check::{ms, Outcome};

/// What one dns check asks.
#[derive(Debug, Clone)]
pub struct Question<'a> {
    pub name: &'a str,
    pub record: &'a str,
    pub protocol: &'a str,
    /// `None`: the host's resolver.
    pub resolver: Option<&'a str>,
}

impl<'a> Question<'a> {
    /// Read a task's target and options (as the gateway validated them).
    pub fn from_spec(target: &'a str, options: &'a options::Dns) -> Self {
        Self {
            name: target,
            record: &options.record,
            protocol: &options.protocol,
            resolver: options.resolver.as_deref(),
        }
    }
}

/// Why the host's resolver cannot be asked.
#[derive(Debug, thiserror::Error)]
enum NoResolver {
    #[error("reading /etc/resolv.conf: {0}")]
    Unreadable(String),
    #[error("/etc/resolv.conf names no name server")]
    Empty,
}

/// The first name server of `/etc/resolv.conf`.
fn system_resolver() -> Result<SocketAddr, NoResolver> {
    let (config, _) = hickory_resolver::system_conf::read_system_conf()
        .map_err(|e| NoResolver::Unreadable(e.to_string()))?;
    config
        .name_servers()
        .first()
        .map(|ns| ns.socket_addr)
        .ok_or(NoResolver::Empty)
}

fn parse_resolver(given: &str) -> Option<SocketAddr> {
    given
        .parse::<SocketAddr>()
        .ok()
        .or_else(|| Some(SocketAddr::new(given.parse().ok()?, 53)))
}

/// The mnemonic of RFC 6895 (`NOERROR`, `NXDOMAIN`, ...), else `RCODE<n>`.
fn rcode_text(code: ResponseCode) -> String {
    let known = [
        "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
        "NXRRSET", "NOTAUTH", "NOTZONE",
    ];
    let n = u16::from(code);
    known
        .get(usize::from(n))
        .map(|s| (*s).to_owned())
        .unwrap_or_else(|| format!("RCODE{n}"))
}

fn answer(record: &Record) -> Value {
    json!({
        "name": record.name().to_ascii(),
        "type": record.record_type().to_string(),
        "ttl": record.ttl(),
        "class": record.dns_class().to_string(),
        "value": record.data().to_string(),
    })
}

/// Ask `question` within `timeout`.
pub async fn check(question: &Question<'_>, timeout: Duration, allow_private: bool) -> Outcome {
    let started = Instant::now();
    let Ok(record) = RecordType::from_str(question.record) else {
        return Outcome::failed(
            "ERR_BAD_SPEC",
            format!("unknown record type {}", question.record),
            json!({}),
        );
    };
    let protocol = match question.protocol {
        "tcp" => Protocol::Tcp,
        _ => Protocol::Udp,
    };
    let resolver = match question.resolver {
        Some(given) => {
            let Some(addr) = parse_resolver(given) else {
                return Outcome::failed(
                    "ERR_BAD_SPEC",
                    format!("resolver {given:?} is not an address"),
                    json!({}),
                );
            };
            // Checked here too: the gateway's rule may differ from this agent's.
            if let (Some(why), false) = (
                checkplane_wire::targets::forbidden_ip(addr.ip()),
                allow_private,
            ) {
                return Outcome::failed(
                    "ERR_TARGET_FORBIDDEN",
                    format!("resolver {} is {why}", addr.ip()),
                    json!({}),
                );
            }
            addr
        }
        // The host's own resolver is the agent's configuration, not the check's choice.
        None => match system_resolver() {
            Ok(addr) => addr,
            Err(none) => return Outcome::failed("ERR_DNS", none.to_string(), json!({})),
        },
    };
    let mut name = match Name::from_ascii(question.name) {
        Ok(name) => name,
        Err(e) => {
            return Outcome::failed(
                "ERR_BAD_SPEC",
                format!("{:?} is not a DNS name: {e}", question.name),
                json!({}),
            )
        }
    };
    name.set_fqdn(true);

    let mut config = ResolverConfig::new();
    config.add_name_server(NameServerConfig::new(resolver, protocol));
    let mut builder =
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
    let options = builder.options_mut();
    options.cache_size = 0;
    options.attempts = 1;
    options.timeout = timeout;
    options.use_hosts_file = ResolveHosts::Never;
    options.preserve_intermediates = true;
    options.try_tcp_on_error = false;
    options.num_concurrent_reqs = 1;
    let client = builder.build();

    let mut result = json!({
        "name": name.to_ascii(),
        "type": record.to_string(),
        "protocol": question.protocol,
        "resolver": resolver.to_string(),
    });
    let asked = tokio::time::timeout(timeout, client.lookup(name, record)).await;
    let timings = json!({"total": ms(started.elapsed())});
    let no_answer = format!(
        "no answer from {resolver} within {} ms",
        timeout.as_millis()
    );
    let (rcode, answers) = match asked {
        Err(_) => return merge(result, Outcome::failed("ERR_TIMEOUT", no_answer, timings)),
        Ok(Ok(lookup)) => {
            let records = lookup.records();
            // A result holds at most MAX_ANSWERS of them; how many there were is said.
            if records.len() > MAX_ANSWERS {
                result["answers_total"] = json!(records.len());
            }
            (
                ResponseCode::NoError,
                records
                    .iter()
                    .take(MAX_ANSWERS)
                    .map(answer)
                    .collect::<Vec<_>>(),
            )
        }
        Ok(Err(error)) => {
            let failed = |code: &str, message: String| {
                merge(
                    result.clone(),
                    Outcome::failed(code, message, timings.clone()),
                )
            };
            let ResolveErrorKind::Proto(proto) = error.kind() else {
                return failed("ERR_DNS", error.to_string());
            };
            match proto.kind() {
                // An answer without records: NXDOMAIN, NODATA, SERVFAIL, REFUSED, ...
                ProtoErrorKind::NoRecordsFound { response_code, .. } => {
                    (*response_code, Vec::new())
                }
                ProtoErrorKind::Timeout => return failed("ERR_TIMEOUT", no_answer),
                ProtoErrorKind::Io(io) => {
                    return failed("ERR_CONNECT", format!("asking {resolver}: {io}"))
                }
                _ => return failed("ERR_DNS", error.to_string()),
            }
        }
    };
    result["rcode"] = json!(rcode_text(rcode));
    result["answers"] = Value::Array(answers);
    result["timings"] = timings;
    Outcome {
        outcome: crate::check::Ended::Finished,
        result,
    }
}

/// The question's fields beside the error.
fn merge(base: Value, mut failed: Outcome) -> Outcome {
    if let (Value::Object(base), Value::Object(into)) = (base, &mut failed.result) {
        for (k, v) in base {
            into.entry(k).or_insert(v);
        }
    }
    failed
}
