//! The global concurrency controller: how many checks run at once across kinds.
//!
//! Checks pass a [`Gate`] whose window moves between 1 and `AGENT_MAX_INFLIGHT`: every
//! [`TICK`] the [`Controller`] looks at what the last tick saw and
//! - **shrinks** the window to 70 % when the host looks overloaded: the runtime woke the
//!   controller late (`lag`, over [`LAG_LIMIT`]), a check waited in the dispatcher queue longer
//!   than [`QUEUE_LIMIT`] (`queueing`), or most checks that ended timed out (`timeouts`: at
//!   least [`TIMEOUT_MIN`] of them and over half);
//! - **grows** it by one otherwise, back up to the maximum.
//!
//! Its state is on the metrics (`checkplane_agent_concurrency_window`,
//! `…_concurrency_backpressure`, `…_dispatcher_queue_fill`) and kept as snapshots, one per
//! change, sent with the agent's metrics (`POST /v1/agents/metrics`).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use checkplane_wire::agents::WindowSnapshot;
use tokio::sync::Notify;

/// How often the controller decides.
pub const TICK: Duration = Duration::from_secs(1);
/// Runtime lateness that counts as overload.
pub const LAG_LIMIT: Duration = Duration::from_millis(200);
/// Queue wait that counts as overload.
pub const QUEUE_LIMIT: Duration = Duration::from_secs(1);
/// Fewest timed-out checks in a tick that can count as overload.
pub const TIMEOUT_MIN: u32 = 8;
/// Most snapshots kept between two reports (the oldest go first).
const MAX_SNAPSHOTS: usize = 600;

#[derive(Debug)]
struct State {
    window: u32,
    running: u32,
    queued: u32,
    /// What the current tick saw.
    longest_wait: Duration,
    ended: u32,
    timed_out: u32,
    backpressure: bool,
    reason: Option<&'static str>,
    snapshots: VecDeque<WindowSnapshot>,
}

/// Where checks wait for a place in the window.
#[derive(Debug)]
pub struct Gate {
    max: u32,
    /// Workers across pools: what the dispatcher queue could hold at most.
    capacity: u32,
    state: Mutex<State>,
    changed: Notify,
}

/// A place in the window, given back on drop.
pub struct Place<'a> {
    gate: &'a Gate,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.gate.lock().running -= 1;
        self.gate.changed.notify_waiters();
    }
}

/// What one tick saw, for [`decide`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    pub lag: Duration,
    pub longest_wait: Duration,
    pub ended: u32,
    pub timed_out: u32,
}

/// The next window, and why it shrank (if it did).
pub fn decide(window: u32, max: u32, seen: Seen) -> (u32, Option<&'static str>) {
    let reason = if seen.lag > LAG_LIMIT {
        Some("lag")
    } else if seen.longest_wait > QUEUE_LIMIT {
        Some("queueing")
    } else if seen.timed_out >= TIMEOUT_MIN && seen.timed_out * 2 > seen.ended {
        Some("timeouts")
    } else {
        None
    };
    match reason {
        Some(_) => ((window * 7 / 10).max(1), reason),
        None => ((window + 1).min(max), None),
    }
}

impl Gate {
    pub fn new(max: u32, capacity: u32) -> Self {
        let gate = Self {
            max,
            capacity: capacity.max(1),
            state: Mutex::new(State {
                window: max,
                running: 0,
                queued: 0,
                longest_wait: Duration::ZERO,
                ended: 0,
                timed_out: 0,
                backpressure: false,
                reason: None,
                snapshots: VecDeque::new(),
            }),
            changed: Notify::new(),
        };
        gate.publish(&gate.lock());
        gate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for a place in the window.
    pub async fn enter(&self) -> Place<'_> {
        let started = Instant::now();
        self.lock().queued += 1;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut s = self.lock();
                if s.running < s.window {
                    s.queued -= 1;
                    s.running += 1;
                    s.longest_wait = s.longest_wait.max(started.elapsed());
                    return Place { gate: self };
                }
            }
            changed.await;
        }
    }

    /// Places free in the window (neither running nor promised to a queued check).
    pub fn free(&self) -> u32 {
        let s = self.lock();
        s.window.saturating_sub(s.running + s.queued)
    }

    /// A check ended; `timed_out` when it ended `ERR_TIMEOUT`.
    pub fn ended(&self, timed_out: bool) {
        let mut s = self.lock();
        s.ended += 1;
        s.timed_out += u32::from(timed_out);
    }

    /// Decide for the tick that just ended (the runtime woke us `lag` late).
    pub fn tick(&self, lag: Duration, now_ms: i64) {
        let mut s = self.lock();
        let seen = Seen {
            lag,
            longest_wait: s.longest_wait,
            ended: s.ended,
            timed_out: s.timed_out,
        };
        let (window, reason) = decide(s.window, self.max, seen);
        let changed = window != s.window || reason.is_some() != s.backpressure;
        if let Some(why) = reason {
            if !s.backpressure || window != s.window {
                tracing::warn!(window, reason = why, "concurrency window shrank");
            }
        }
        s.window = window;
        s.backpressure = reason.is_some();
        s.reason = reason;
        s.longest_wait = Duration::ZERO;
        s.ended = 0;
        s.timed_out = 0;
        if changed {
            let snapshot = self.snapshot(&s, now_ms);
            if s.snapshots.len() >= MAX_SNAPSHOTS {
                s.snapshots.pop_front();
            }
            s.snapshots.push_back(snapshot);
        }
        self.publish(&s);
        drop(s);
        self.changed.notify_waiters();
    }

    fn snapshot(&self, s: &State, now_ms: i64) -> WindowSnapshot {
        WindowSnapshot {
            at_ms: now_ms,
            window: s.window,
            max: self.max,
            inflight: s.running,
            queued: s.queued,
            backpressure: s.backpressure,
            reason: s.reason.map(str::to_owned),
        }
    }

    fn publish(&self, s: &State) {
        metrics::gauge!("checkplane_agent_concurrency_window").set(f64::from(s.window));
        metrics::gauge!("checkplane_agent_concurrency_backpressure")
            .set(f64::from(u8::from(s.backpressure)));
        metrics::gauge!("checkplane_agent_dispatcher_queue_fill")
            .set(f64::from(s.queued) / f64::from(self.capacity));
        metrics::gauge!("checkplane_agent_checks_inflight").set(f64::from(s.running));
    }

    /// The snapshots since the last call, plus the state now (so every report has one).
    pub fn take_snapshots(&self, now_ms: i64) -> Vec<WindowSnapshot> {
        let mut s = self.lock();
        let mut taken: Vec<WindowSnapshot> = s.snapshots.drain(..).collect();
        if taken.last().is_none_or(|last| last.at_ms != now_ms) {
            taken.push(self.snapshot(&s, now_ms));
        }
        taken
    }

    /// Put back snapshots a report could not deliver (oldest first, bounded).
    pub fn restore(&self, mut snapshots: Vec<WindowSnapshot>) {
        let mut s = self.lock();
        snapshots.extend(s.snapshots.drain(..));
        let skip = snapshots.len().saturating_sub(MAX_SNAPSHOTS);
        s.snapshots = snapshots.into_iter().skip(skip).collect();
    }

    /// The dotted names of the issue, for the metrics report.
    pub fn gauges(&self) -> [(&'static str, f64); 4] {
        let s = self.lock();
        [
            ("concurrency.window", f64::from(s.window)),
            (
                "concurrency.backpressure",
                f64::from(u8::from(s.backpressure)),
            ),
            (
                "dispatcher.queue.fill",
                f64::from(s.queued) / f64::from(self.capacity),
            ),
            ("checks.inflight", f64::from(s.running)),
        ]
    }
}

/// Tick the gate every [`TICK`] until `stop`, measuring how late the runtime wakes us.
pub async fn run(gate: &Gate, stop: &tokio_util::sync::CancellationToken) {
    loop {
        let asleep = Instant::now();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let lag = asleep.elapsed().saturating_sub(TICK);
        gate.tick(lag, checkplane_runtime::clock::now_ms());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_shrinks_multiplicatively_and_calm_grows_by_one() {
        let calm = Seen::default();
        assert_eq!(decide(64, 64, calm), (64, None));
        assert_eq!(decide(10, 64, calm), (11, None));
        let lag = Seen {
            lag: Duration::from_millis(500),
            ..calm
        };
        assert_eq!(decide(64, 64, lag), (44, Some("lag")));
        assert_eq!(decide(1, 64, lag), (1, Some("lag")));
        let queue = Seen {
            longest_wait: Duration::from_secs(2),
            ..calm
        };
        assert_eq!(decide(10, 64, queue), (7, Some("queueing")));
        // Timeouts count when there are enough of them and they are most of what ended.
        let timeouts = |timed_out, ended| Seen {
            timed_out,
            ended,
            ..calm
        };
        assert_eq!(decide(20, 64, timeouts(9, 10)), (14, Some("timeouts")));
        assert_eq!(decide(20, 64, timeouts(5, 5)), (21, None));
        assert_eq!(decide(20, 64, timeouts(9, 30)), (21, None));
    }

    #[tokio::test]
    async fn the_gate_holds_checks_past_the_window_and_snapshots_each_change() {
        let gate = Gate::new(2, 10);
        let a = gate.enter().await;
        let b = gate.enter().await;
        assert_eq!(gate.free(), 0);
        // A third waits until one leaves.
        let third = tokio::time::timeout(Duration::from_millis(50), gate.enter()).await;
        assert!(third.is_err());
        drop(a);
        let c = tokio::time::timeout(Duration::from_millis(500), gate.enter())
            .await
            .expect("a place once one left");
        drop((b, c));
        for _ in 0..8 {
            gate.ended(true);
        }
        gate.tick(Duration::ZERO, 1_000);
        let snaps = gate.take_snapshots(2_000);
        assert_eq!(snaps[0].window, 1);
        assert!(snaps[0].backpressure);
        assert_eq!(snaps[0].reason.as_deref(), Some("timeouts"));
        assert_eq!(snaps.last().unwrap().at_ms, 2_000);
        gate.tick(Duration::ZERO, 3_000);
        let snaps = gate.take_snapshots(3_000);
        assert_eq!(snaps.len(), 1, "{snaps:?}");
        assert_eq!((snaps[0].window, snaps[0].backpressure), (2, false));
    }
}
