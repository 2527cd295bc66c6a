//! Rate limits at the gateway: which limit a request falls under, who its caller is, the
//! decision (counted by `checkplane_core::ratelimit`, shared by every replica through Redis),
//! and the `RateLimit-*` headers on the answer.
//!
//! The credentials' extractors decide (a caller is known only once verified): they put the
//! decision in the request's [`RateSlot`], and [`headers`], wrapped around every route, writes
//! it onto the answer, allowed or refused.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::request::Parts;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use checkplane_core::ratelimit::{Decision, Rate};
use checkplane_runtime::http::ApiError;

use crate::config::{Rates, TrustedProxies};
use crate::state::AppState;

/// What a limit counts calls of, and per whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Registrations per hostname.
    Register,
    /// Agent calls per agent.
    Heartbeat,
    Claim,
    Extend,
    Report,
    Metrics,
    /// The operator API per API key.
    Operator,
    /// Failed authentications per client address.
    AuthFailures,
}

impl Limit {
    /// The name in rate keys and in `checkplane_rate_limited_total{endpoint}`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Register => "register",
            Self::Heartbeat => "heartbeat",
            Self::Claim => "claim",
            Self::Extend => "extend",
            Self::Report => "report",
            Self::Metrics => "metrics",
            Self::Operator => "operator",
            Self::AuthFailures => "auth_failures",
        }
    }

    /// Who is counted (`checkplane_rate_limited_total{caller}`).
    pub fn caller_kind(self) -> &'static str {
        match self {
            Self::Register => "hostname",
            Self::Heartbeat | Self::Claim | Self::Extend | Self::Report | Self::Metrics => "agent",
            Self::Operator => "key",
            Self::AuthFailures => "address",
        }
    }

    /// The limit of an authenticated agent's call to `path` (a route's pattern).
    pub fn of_agent_route(path: &str) -> Option<Self> {
        Some(match path {
            "/v1/agents/heartbeat" => Self::Heartbeat,
            "/v1/agents/claim" => Self::Claim,
            "/v1/agents/extend" => Self::Extend,
            "/v1/agents/report" => Self::Report,
            "/v1/agents/metrics" => Self::Metrics,
            _ => return None,
        })
    }

    /// Its rate; `None` when it is off.
    pub fn rate(self, rates: &Rates) -> Option<&Rate> {
        match self {
            Self::Register => rates.register.as_ref(),
            Self::Heartbeat => rates.heartbeat.as_ref(),
            Self::Claim => rates.claim.as_ref(),
            Self::Extend => rates.extend.as_ref(),
            Self::Report => rates.report.as_ref(),
            Self::Metrics => rates.metrics.as_ref(),
            Self::Operator => rates.operator.as_ref(),
            Self::AuthFailures => rates.auth_failures.as_ref(),
        }
    }
}

/// Where a request's decision waits for [`headers`] to write it on the answer.
#[derive(Debug, Clone, Default)]
pub struct RateSlot(Arc<Mutex<Option<Decision>>>);

impl RateSlot {
    /// The slot of the request whose head is `parts` (none outside [`headers`]).
    pub fn of(parts: &Parts) -> Option<Self> {
        parts.extensions.get::<Self>().cloned()
    }

    pub fn put(&self, decision: Decision) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(decision);
    }

    fn take(&self) -> Option<Decision> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Middleware: give the request a [`RateSlot`]; write the decision left in it as
/// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (seconds, rounded up).
pub async fn headers(mut request: Request, next: Next) -> Response {
    let slot = RateSlot::default();
    request.extensions_mut().insert(slot.clone());
    let mut response = next.run(request).await;
    if let Some(decision) = slot.take() {
        let headers = response.headers_mut();
        let reset = decision.reset.as_millis().div_ceil(1000);
        for (name, value) in [
            ("ratelimit-limit", u128::from(decision.limit)),
            ("ratelimit-remaining", u128::from(decision.remaining)),
            ("ratelimit-reset", reset),
        ] {
            headers.insert(
                name,
                HeaderValue::from(value.min(u128::from(u64::MAX)) as u64),
            );
        }
    }
    response
}

/// Count one call of `caller` under `limit`: `Ok` when allowed (or the limit is off), else
/// 429 `ERR_RATE_LIMITED` with `Retry-After`. The decision goes into `slot` for the headers.
pub async fn check(
    state: &AppState,
    slot: Option<&RateSlot>,
    limit: Limit,
    caller: &str,
) -> Result<(), ApiError> {
    decide(state, slot, limit, caller, true).await
}

/// Whether one more call of `caller` under `limit` would be allowed, without counting it;
/// only a refusal goes into `slot`.
pub async fn peek(
    state: &AppState,
    slot: Option<&RateSlot>,
    limit: Limit,
    caller: &str,
) -> Result<(), ApiError> {
    decide(state, slot, limit, caller, false).await
}

/// Count one call of `caller` under `limit` for the calls after it, refused or not (a failed
/// authentication, answered 401 whatever the count says).
pub async fn count(state: &AppState, slot: Option<&RateSlot>, limit: Limit, caller: &str) {
    if let Some(decision) = decision(state, limit, caller, true).await {
        if let Some(slot) = slot {
            slot.put(decision);
        }
    }
}

async fn decide(
    state: &AppState,
    slot: Option<&RateSlot>,
    limit: Limit,
    caller: &str,
    count: bool,
) -> Result<(), ApiError> {
    let Some(decision) = decision(state, limit, caller, count).await else {
        return Ok(());
    };
    if !count && decision.allowed {
        return Ok(());
    }
    judge(slot, limit, decision)
}

/// The limiter's answer; `None` when the limit is off.
async fn decision(state: &AppState, limit: Limit, caller: &str, count: bool) -> Option<Decision> {
    let rate = limit.rate(&state.config.rates)?;
    let mut conn = state.stores.redis_shared.clone();
    let limiter = &state.limiter;
    Some(if count {
        limiter
            .check(Some(&mut conn), limit.name(), caller, rate)
            .await
    } else {
        limiter
            .peek(Some(&mut conn), limit.name(), caller, rate)
            .await
    })
}

fn judge(slot: Option<&RateSlot>, limit: Limit, decision: Decision) -> Result<(), ApiError> {
    if let Some(slot) = slot {
        slot.put(decision);
    }
    if decision.allowed {
        return Ok(());
    }
    metrics::counter!(
        "checkplane_rate_limited_total",
        "endpoint" => limit.name(),
        "caller" => limit.caller_kind()
    )
    .increment(1);
    let message = match limit {
        Limit::AuthFailures => {
            "too many failed authentications from this address; retry later".to_owned()
        }
        _ => format!(
            "rate limit of {} exceeded for this {}; retry later",
            limit.name(),
            limit.caller_kind()
        ),
    };
    let retry_after = decision.retry_after.as_millis().div_ceil(1000).max(1);
    Err(ApiError::rate_limited(
        message,
        u64::try_from(retry_after).unwrap_or(u64::MAX),
    ))
}

/// The client's address: the socket's peer, or, when the peer is a trusted proxy, the last
/// address in `X-Forwarded-For` that is not one (each proxy appends the address it was
/// called from, so the entries left of the last untrusted one may be forged). Entries are
/// read one by one (an address, or one with a port); at one that is not an address, or when
/// every entry is a trusted proxy, the last trusted hop is all that can be believed.
pub fn client_address(parts: &Parts, trusted: &TrustedProxies) -> Option<IpAddr> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()?
        .0
        .ip()
        .to_canonical();
    if !trusted.contains(peer) {
        return Some(peer);
    }
    let forwarded: Vec<&[u8]> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .collect();
    let mut client = peer;
    for entry in forwarded.iter().rev() {
        let Some(address) = forwarded_address(entry) else {
            break;
        };
        client = address.to_canonical();
        if !trusted.contains(client) {
            break;
        }
    }
    Some(client)
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `2001:db8::1`, `1.2.3.4:5678` or `[2001:db8::1]:80`.
fn forwarded_address(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    text.parse::<IpAddr>()
        .or_else(|_| text.parse::<std::net::SocketAddr>().map(|s| s.ip()))
        .ok()
}

/// Who is counted for failed authentications from `address`: the address, or for IPv6 its
/// /64 (one host commonly holds a whole /64, and would otherwise get a budget per address).
pub fn failure_caller(address: Option<IpAddr>) -> String {
    match address {
        Some(IpAddr::V6(v6)) => ipnet::Ipv6Net::new(v6, 64)
            .map_or(ipnet::Ipv6Net::from(v6), |n| n.trunc())
            .to_string(),
        Some(v4) => v4.to_string(),
        None => "unknown".to_owned(),
    }
}

/// The pattern of the route a request matched.
pub fn route(parts: &Parts) -> Option<&str> {
    parts
        .extensions
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_entries_read_with_and_without_ports() {
        let read = |s: &str| forwarded_address(s.as_bytes());
        assert_eq!(read(" 203.0.113.7 "), Some([203, 0, 113, 7].into()));
        assert_eq!(read("203.0.113.7:5678"), Some([203, 0, 113, 7].into()));
        assert_eq!(read("[2001:db8::1]:80"), "2001:db8::1".parse().ok());
        assert_eq!(read("2001:db8::1"), "2001:db8::1".parse().ok());
        for bad in ["", "unknown", "203.0.113", "_hidden"] {
            assert_eq!(read(bad), None, "{bad:?}");
        }
        assert_eq!(forwarded_address(b"\xff1.2.3.4"), None);
    }

    #[test]
    fn ipv6_failures_count_per_64() {
        let at = |s: &str| failure_caller(Some(s.parse().unwrap()));
        assert_eq!(at("2001:db8:1:2:aaaa::1"), at("2001:db8:1:2:bbbb::9"));
        assert_eq!(at("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_ne!(at("2001:db8:1:3::1"), at("2001:db8:1:2::1"));
        assert_eq!(at("198.51.100.4"), "198.51.100.4");
        assert_eq!(failure_caller(None), "unknown");
    }
}
