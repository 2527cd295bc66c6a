//! What every check shares: its [`Outcome`], timings in milliseconds, name resolution and
//! the target-safety rule applied to the addresses actually reached.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use checkplane_wire::kinds::Kind;
pub use checkplane_wire::leases::api::Outcome as Ended;

/// What a check reports: how it ended and its typed result.
pub struct Outcome {
    pub outcome: Ended,
    pub result: Value,
}

impl Outcome {
    /// A failed check with an error code and message, and whatever timings it got.
    pub fn failed(code: &str, message: impl Into<String>, timings: Value) -> Self {
        Self {
            outcome: Ended::Failed,
            result: json!({"error": {"code": code, "message": message.into()}, "timings": timings}),
        }
    }
}

/// Hold a result to its kind's schema (`checkplane_wire::results`), as the gateway will: one
/// that does not fit is a bug of this agent, reported `failed` with `ERR_INTERNAL` naming the
/// field rather than refused by the gateway (its slot would then wait for its deadline).
pub fn fitted(kind: Kind, outcome: Ended, result: Value) -> (Ended, Value) {
    match checkplane_wire::results::check(kind, outcome, &result) {
        Ok(()) => (outcome, result),
        Err(why) => {
            tracing::error!(%kind, %why, "a result that does not fit its kind: reported failed");
            metrics::counter!("checkplane_agent_results_misfit_total", "kind" => kind.as_str())
                .increment(1);
            let message = format!("the agent's result does not fit its kind: {why}");
            (
                Ended::Failed,
                json!({"error": {"code": "ERR_INTERNAL", "message": message}}),
            )
        }
    }
}

/// A duration in milliseconds, to the microsecond.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Resolve `host:port`: the addresses, and how long it took.
pub async fn resolve(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(Vec<SocketAddr>, Duration), Outcome> {
    let started = Instant::now();
    let looked = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await;
    let elapsed = started.elapsed();
    match looked {
        Err(_) => Err(Outcome::failed(
            "ERR_TIMEOUT",
            "name resolution timed out",
            json!({"dns": ms(elapsed)}),
        )),
        Ok(Err(e)) => Err(Outcome::failed(
            "ERR_DNS",
            format!("cannot resolve {host}: {e}"),
            json!({"dns": ms(elapsed)}),
        )),
        Ok(Ok(addrs)) => Ok((addrs.collect(), elapsed)),
    }
}

/// The first address that may be checked, or why none may.
pub fn allowed(addrs: &[SocketAddr], allow_private: bool) -> Result<SocketAddr, Outcome> {
    let mut refused = None;
    for addr in addrs {
        match checkplane_wire::targets::forbidden_ip(addr.ip()) {
            Some(why) if !allow_private => refused = Some((addr, why)),
            _ => return Ok(*addr),
        }
    }
    Err(match refused {
        Some((addr, why)) => Outcome::failed(
            "ERR_TARGET_FORBIDDEN",
            format!("{} is {why}", addr.ip()),
            json!({}),
        ),
        None => Outcome::failed("ERR_DNS", "no address", json!({})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_that_does_not_fit_is_reported_failed_naming_the_field() {
        let (ended, result) = fitted(Kind::Tcp, Ended::Finished, json!({"connected": true}));
        assert_eq!(ended, Ended::Failed);
        assert_eq!(result["error"]["code"], "ERR_INTERNAL");
        let message = result["error"]["message"].as_str().unwrap();
        assert!(
            message.ends_with("result.address: a finished tcp result needs it"),
            "{message}"
        );
        // What fits goes as it is.
        let fine = json!({"connected": true, "address": "192.0.2.1", "port": 80});
        assert_eq!(
            fitted(Kind::Tcp, Ended::Finished, fine.clone()),
            (Ended::Finished, fine)
        );
        // The failure it makes fits too.
        checkplane_wire::results::check(Kind::Tcp, ended, &result).unwrap();
    }
}
