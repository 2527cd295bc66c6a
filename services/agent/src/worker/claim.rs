//! The claim loop: asks, per kind, for as many tasks as its pool has free slots (long
//! polling when every kind got a share of the concurrency window).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use checkplane_wire::leases::api::{ClaimRequest, ClaimResponse};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::control::{sleep_or_stop, Backoff, CallError};
use super::dispatch::start;
use super::Shared;

/// One claim (a long poll of up to `wait_ms`) for `capacities`, with a fresh request id
/// (`<prefix><random>-<round>`); `None` when `stop` fired first. The caller has waited for
/// its turn (`Control::claims`) before it counted what is free.
pub(super) async fn claim(
    shared: &Shared,
    capacities: BTreeMap<String, u32>,
    wait_ms: u64,
    prefix: &str,
    round: u64,
    stop: &CancellationToken,
) -> Option<Result<ClaimResponse, CallError>> {
    let request_id = format!(
        "{prefix}{}-{round}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let body = ClaimRequest {
        capacities,
        request_id,
        wait_ms,
        agent_id: None,
    };
    let claim =
        shared
            .control
            .post::<ClaimResponse>("v1/agents/claim", &body, Duration::from_secs(30));
    tokio::select! {
        _ = stop.cancelled() => None,
        c = claim => Some(c),
    }
}

pub(super) async fn claim_loop(
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut round: u64 = 0;
    while !stop.is_cancelled() {
        round += 1;
        if capacities(shared, round).0.is_empty() {
            // Full: until a check ends, or the window grows.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = shared.freed.notified() => continue,
                _ = tokio::time::sleep(crate::concurrency::TICK) => continue,
            }
        }
        // The turn first, then what is free: workers freed while waiting go along.
        if !shared.control.claims.turn_or_stop(stop).await {
            return;
        }
        let (capacities, complete) = capacities(shared, round);
        if capacities.is_empty() {
            continue;
        }
        let wait_ms = if complete { 20_000 } else { 1_000 };
        let Some(claimed) = claim(shared, owned(capacities), wait_ms, "", round, stop).await else {
            return;
        };
        match claimed {
            Ok(answer) => {
                backoff.reset();
                if !answer.leases.is_empty() {
                    tracing::info!(leases = answer.leases.len(), "dispatcher received batch");
                    metrics::counter!("checkplane_agent_leases_total")
                        .increment(answer.leases.len() as u64);
                }
                for lease in answer.leases {
                    start(shared, tasks, lease);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "claim failed");
                if !sleep_or_stop(backoff.after(&error), stop).await {
                    return;
                }
            }
        }
    }
}

/// A claim's capacities as the request carries them.
fn owned(capacities: BTreeMap<&'static str, u32>) -> BTreeMap<String, u32> {
    capacities
        .into_iter()
        .map(|(kind, n)| (kind.to_owned(), n))
        .collect()
}

/// How many tasks of each kind to ask for (see [`share`]).
pub(super) fn capacities(shared: &Shared, round: u64) -> (BTreeMap<&'static str, u32>, bool) {
    let free: Vec<(&'static str, u32)> = shared
        .pools
        .iter()
        .map(|(kind, pool)| (*kind, pool.available_permits() as u32))
        .collect();
    share(&free, shared.gate.free(), round)
}

/// Share `left` (what the concurrency window has free) among the kinds by what each pool
/// has `free`, one at a time from a different kind each `round`, so every kind gets its
/// part. Also says whether every kind with a free worker got at least one: when not (the
/// window is short), the claim must not long-poll, or the kinds left out would wait a
/// whole poll for their turn.
pub(super) fn share(
    free: &[(&'static str, u32)],
    mut left: u32,
    round: u64,
) -> (BTreeMap<&'static str, u32>, bool) {
    let n = free.len();
    let mut asked = vec![0u32; n];
    let first = if n == 0 {
        0
    } else {
        (round % n as u64) as usize
    };
    while left > 0 {
        let mut gave = false;
        for i in 0..n {
            let k = (first + i) % n;
            if left > 0 && asked[k] < free[k].1 {
                asked[k] += 1;
                left -= 1;
                gave = true;
            }
        }
        if !gave {
            break;
        }
    }
    let complete = free.iter().zip(&asked).all(|((_, f), a)| *f == 0 || *a > 0);
    let asked = free
        .iter()
        .zip(asked)
        .filter(|(_, a)| *a > 0)
        .map(|((kind, _), a)| (*kind, a))
        .collect();
    (asked, complete)
}

#[cfg(test)]
mod tests {
    use super::share;

    const FREE: [(&str, u32); 5] = [
        ("dns", 32),
        ("http", 16),
        ("tcp", 16),
        ("ping", 7),
        ("trace", 4),
    ];

    #[test]
    fn the_window_is_shared_out_evenly_and_never_exceeded() {
        for left in [0, 1, 3, 5, 10, 63, 75, 500] {
            for round in 0..5 {
                let (asked, complete) = share(&FREE, left, round);
                let total: u32 = asked.values().sum();
                assert_eq!(total, left.min(75), "left {left}: {asked:?}");
                for (kind, free) in FREE {
                    assert!(asked.get(kind).copied().unwrap_or(0) <= free);
                }
                // With at least one place per kind, every kind gets one.
                assert_eq!(complete, left >= 5, "left {left}: {asked:?}");
                assert_eq!(asked.len() as u32, left.min(5), "left {left}: {asked:?}");
            }
        }
        // 63 = 4 trace + 7 ping + 52 among three, none above its pool.
        let (asked, _) = share(&FREE, 63, 0);
        assert_eq!((asked["trace"], asked["ping"]), (4, 7));
        assert_eq!((asked["http"], asked["tcp"]), (16, 16));
        assert_eq!(asked["dns"], 20);
        // A short window goes round the kinds, one round after another.
        let turns: std::collections::BTreeSet<&str> = (0..5)
            .flat_map(|round| share(&FREE, 1, round).0.into_keys())
            .collect();
        assert_eq!(turns.len(), 5);
    }

    #[test]
    fn a_full_pool_is_not_asked_for() {
        let (asked, complete) = share(&[("dns", 0), ("tcp", 2)], 10, 0);
        assert_eq!(asked.into_iter().collect::<Vec<_>>(), [("tcp", 2)]);
        assert!(complete);
        assert!(share(&[("dns", 0)], 10, 0).0.is_empty());
    }
}
