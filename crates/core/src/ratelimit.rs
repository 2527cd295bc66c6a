//! Rate limits per endpoint and caller: counted in Redis by one Lua call (GCRA on Redis's own
//! clock, `scripts/rate_gcra.lua`), so every gateway replica shares them; while Redis cannot be
//! reached, counted in this process instead (same algorithm, this process's clock), which the
//! gauge `checkplane_rate_limiter_fallback` says.
//!
//! A rate is written `<count>/<period>[:<burst>]`: `6/1m:3` is six a minute on average (one
//! every 10 s), three at once; without a burst, the count is also the burst (`600/1m`).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::aio::ConnectionLike;
use tokio::time::Instant;

use crate::keys::Keys;

/// KEYS: the rate key. ARGV: emission interval (ms), burst, count (1) or only look (0).
/// Returns {allowed, remaining, retry after ms, reset ms}.
const GCRA: &str = include_str!("../scripts/rate_gcra.lua");

/// Callers remembered by the in-memory fallback before the expired ones are dropped.
const LOCAL_CALLERS: usize = 100_000;

/// The longest a call waits for Redis before counting in memory: a hung Redis must not hold
/// every limited request for the connection's own timeout.
pub const REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);

/// After Redis failed, how long calls count in memory before Redis is tried again.
pub const REDIS_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a caller may call, on average, and how many calls at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// One call per interval on average.
    pub interval: Duration,
    /// Calls allowed at once (at least 1).
    pub burst: u32,
}

/// A rate that does not read as `<count>/<period>[:<burst>]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected <count>/<period>[:<burst>] such as 6/1m:3, got {0:?}")]
pub struct BadRate(pub String);

impl Rate {
    /// `count` calls per `period`, `burst` at once.
    pub fn new(count: u32, period: Duration, burst: u32) -> Option<Self> {
        if count == 0 || burst == 0 || period.is_zero() {
            return None;
        }
        let interval = period / count;
        (interval >= Duration::from_millis(1)).then_some(Self { interval, burst })
    }

    /// Read `<count>/<period>[:<burst>]`; the period is a duration (`1s`, `1m`, `10m`, `1h`).
    pub fn parse(text: &str) -> Result<Self, BadRate> {
        let bad = || BadRate(text.to_owned());
        let (count, rest) = text.trim().split_once('/').ok_or_else(bad)?;
        let (period, burst) = match rest.split_once(':') {
            Some((period, burst)) => (period, Some(burst)),
            None => (rest, None),
        };
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let period = parse_period(period.trim()).ok_or_else(bad)?;
        let burst = match burst {
            Some(b) => b.trim().parse().map_err(|_| bad())?,
            None => count,
        };
        Self::new(count, period, burst).ok_or_else(bad)
    }

    fn interval_ms(&self) -> u64 {
        u64::try_from(self.interval.as_millis())
            .unwrap_or(u64::MAX / 4)
            .max(1)
    }
}

fn parse_period(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "ms" => return Some(Duration::from_millis(n)),
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

/// The answer for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The burst (`RateLimit-Limit`).
    pub limit: u32,
    /// Calls left at once after this one (`RateLimit-Remaining`).
    pub remaining: u32,
    /// When a refused call may come again (`Retry-After`); zero when allowed.
    pub retry_after: Duration,
    /// Until the whole burst is available again (`RateLimit-Reset`).
    pub reset: Duration,
    /// Counted in Redis (shared by every replica); false: by the in-memory fallback.
    pub shared: bool,
}

impl Decision {
    /// A decision from the script's answer (or the fallback's, in the same units).
    fn of(
        rate: &Rate,
        allowed: bool,
        remaining: u64,
        retry_ms: u64,
        reset_ms: u64,
        shared: bool,
    ) -> Self {
        Self {
            allowed,
            limit: rate.burst,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            retry_after: Duration::from_millis(retry_ms),
            reset: Duration::from_millis(reset_ms),
            shared,
        }
    }
}

/// The in-memory fallback's state.
#[derive(Default)]
struct Local {
    tats: HashMap<String, i64>,
    /// When the full map may be swept again (ms since the limiter's origin).
    next_sweep: i64,
}

/// The limiter of one installation.
pub struct Limiter {
    keys: Keys,
    script: redis::Script,
    origin: Instant,
    /// The fallback's theoretical arrival times (ms since `origin`) by rate key.
    local: Mutex<Local>,
    /// Until when Redis is not asked (it failed or hung just now).
    redis_down_until: Mutex<Option<Instant>>,
    /// When a call last counted in memory.
    fell_back_at: Mutex<Option<Instant>>,
}

impl Limiter {
    pub fn new(keys: Keys) -> Self {
        Self {
            keys,
            script: redis::Script::new(GCRA),
            origin: Instant::now(),
            local: Mutex::new(Local::default()),
            redis_down_until: Mutex::new(None),
            fell_back_at: Mutex::new(None),
        }
    }

    /// How long ago a call last counted in memory (Redis failed or hung), if one ever did.
    pub fn fell_back_ago(&self) -> Option<Duration> {
        self.fell_back_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|at| at.elapsed())
    }

    /// Count one call of `caller` at `endpoint` against `rate`: in Redis through `conn`, or in
    /// this process when there is no connection or the call fails.
    pub async fn check(
        &self,
        conn: Option<&mut (impl ConnectionLike + Send)>,
        endpoint: &str,
        caller: &str,
        rate: &Rate,
    ) -> Decision {
        self.call(conn, endpoint, caller, rate, true).await
    }

    /// Whether one more call would be allowed, without counting it (for limits that count
    /// only failures: look first, count when it failed).
    pub async fn peek(
        &self,
        conn: Option<&mut (impl ConnectionLike + Send)>,
        endpoint: &str,
        caller: &str,
        rate: &Rate,
    ) -> Decision {
        self.call(conn, endpoint, caller, rate, false).await
    }

    async fn call(
        &self,
        conn: Option<&mut (impl ConnectionLike + Send)>,
        endpoint: &str,
        caller: &str,
        rate: &Rate,
        count: bool,
    ) -> Decision {
        let key = self.keys.rate(endpoint, caller);
        let conn = conn.filter(|_| !self.redis_resting());
        if let Some(conn) = conn {
            let mut invocation = self.script.key(&key);
            invocation
                .arg(rate.interval_ms())
                .arg(rate.burst)
                .arg(u8::from(count));
            let call = invocation.invoke_async::<(u8, u64, u64, u64)>(conn);
            match tokio::time::timeout(REDIS_TIMEOUT, call).await {
                Ok(Ok((allowed, remaining, retry_ms, reset_ms))) => {
                    metrics::gauge!("checkplane_rate_limiter_fallback").set(0.0);
                    return Decision::of(rate, allowed == 1, remaining, retry_ms, reset_ms, true);
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "rate limiter: Redis failed; counting in memory");
                }
                Err(_) => {
                    tracing::warn!(
                        timeout = ?REDIS_TIMEOUT,
                        "rate limiter: Redis did not answer; counting in memory"
                    );
                }
            }
            *self
                .redis_down_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + REDIS_RETRY);
        }
        metrics::gauge!("checkplane_rate_limiter_fallback").set(1.0);
        metrics::counter!("checkplane_rate_limiter_fallbacks_total").increment(1);
        *self
            .fell_back_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        self.check_locally(key, rate, count)
    }

    /// Whether Redis failed so recently that it is not asked yet.
    fn redis_resting(&self) -> bool {
        let mut until = self
            .redis_down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    /// The same algorithm as the script, on this process's clock (signed: the time a call is
    /// allowed from may lie before the clock's origin).
    fn check_locally(&self, key: String, rate: &Rate, count: bool) -> Decision {
        let now = i64::try_from(self.origin.elapsed().as_millis()).unwrap_or(i64::MAX / 4);
        let interval = i64::try_from(rate.interval_ms()).unwrap_or(i64::MAX / 4);
        let burst = i64::from(rate.burst);
        let mut guard = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        // Full: drop the callers done counting, at most once a second (a map full of callers
        // still counting would otherwise be swept on every call).
        if guard.tats.len() >= LOCAL_CALLERS && now >= guard.next_sweep {
            guard.tats.retain(|_, tat| *tat > now);
            guard.next_sweep = now.saturating_add(1000);
        }
        let local = &mut guard.tats;
        let tat = local.get(&key).copied().unwrap_or(now).max(now);
        let new_tat = tat.saturating_add(interval);
        let allow_at = new_tat.saturating_sub(interval.saturating_mul(burst));
        let ms = |v: i64| u64::try_from(v).unwrap_or(0);
        if now < allow_at {
            return Decision::of(rate, false, 0, ms(allow_at - now), ms(tat - now), false);
        }
        // Full of callers still counting: a new one is allowed uncounted rather than growing
        // the map without bound.
        if count && (local.len() < LOCAL_CALLERS || local.contains_key(&key)) {
            local.insert(key, new_tat);
        }
        let reset = if count { new_tat } else { tat } - now;
        Decision::of(
            rate,
            true,
            ms((now - allow_at) / interval),
            0,
            ms(reset),
            false,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_with_and_without_a_burst() {
        let six = Rate::parse("6/1m:3").expect("a rate");
        assert_eq!(six.interval, Duration::from_secs(10));
        assert_eq!(six.burst, 3);
        let plain = Rate::parse("600/1m").expect("a rate");
        assert_eq!(plain.interval, Duration::from_millis(100));
        assert_eq!(plain.burst, 600);
        assert_eq!(
            Rate::parse("1/10m").expect("a rate").interval,
            Duration::from_secs(600)
        );
        for bad in [
            "", "6", "6/", "0/1m", "6/1m:0", "6/1x", "x/1m", "6/0s", "6/1m:x", "5/4ms",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn limiter() -> Limiter {
        Limiter::new(Keys::new("t", 1))
    }

    #[tokio::test(start_paused = true)]
    async fn the_fallback_allows_the_burst_then_one_per_interval() {
        let limiter = limiter();
        let rate = Rate::parse("6/1m:3").expect("a rate");
        let none = || None::<&mut redis::aio::MultiplexedConnection>;
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let d = limiter.check(none(), "hb", "a", &rate).await;
            assert!(d.allowed && !d.shared);
            remaining.push(d.remaining);
        }
        assert_eq!(remaining, [2, 1, 0]);
        let refused = limiter.check(none(), "hb", "a", &rate).await;
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(10));
        assert_eq!(refused.reset, Duration::from_secs(30));
        // Another caller, or another endpoint, has its own budget.
        assert!(limiter.check(none(), "hb", "b", &rate).await.allowed);
        assert!(limiter.check(none(), "claim", "a", &rate).await.allowed);
        tokio::time::advance(Duration::from_secs(10)).await;
        let again = limiter.check(none(), "hb", "a", &rate).await;
        assert!(again.allowed);
        assert_eq!(again.remaining, 0);
        assert!(!limiter.check(none(), "hb", "a", &rate).await.allowed);
    }
}
