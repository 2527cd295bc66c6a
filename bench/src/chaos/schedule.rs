//! The fault schedule, fixed by the seed: what is hit when. The seed fixes this schedule,
//! not every interleaving (the processes' own timing still varies from run to run).

use std::time::Duration;

/// SplitMix64: small, seedable, good enough to pick faults and delays.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() as u64) as usize]
    }
}

/// One fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL a process (a service or a simulated agent), start it again after `down`.
    Kill { target: String, down: Duration },
    /// SIGSTOP a process for `paused`, then SIGCONT. `past_reclaim`: a scheduler paused past
    /// the projector's reclaim idle (30 s), so the other replica takes its pending batch and
    /// the paused one applies the same batch when it resumes.
    Pause {
        target: String,
        paused: Duration,
        past_reclaim: bool,
    },
    /// SIGKILL Redis, start it again after `down`.
    RedisKill { down: Duration },
    /// Redis shut down cleanly (`SHUTDOWN`), started again after `down`.
    RedisRestart { down: Duration },
    /// PostgreSQL stopped (`immediate`), started again after `down`.
    PgRestart { down: Duration },
    /// Reload an HAProxy through its master CLI, saving its state file first or not.
    Reload { instance: String, keep_state: bool },
    /// Lose a scheduler's next `XACK` with its Redis connection (between the projector's
    /// commit and its acknowledgement): the batch is delivered again.
    AckCut { target: String },
}

impl Fault {
    /// The class the run counts it under (and may be asked to inject).
    pub fn class(&self) -> &'static str {
        match self {
            Self::Kill { .. } => "kill",
            Self::Pause {
                past_reclaim: false,
                ..
            } => "pause",
            Self::Pause {
                past_reclaim: true, ..
            } => "pause-past-reclaim",
            Self::RedisKill { .. } => "redis-kill",
            Self::RedisRestart { .. } => "redis-restart",
            Self::PgRestart { .. } => "pg-restart",
            Self::Reload {
                keep_state: true, ..
            } => "reload-with-state",
            Self::Reload {
                keep_state: false, ..
            } => "reload-without-state",
            Self::AckCut { .. } => "ack-cut",
        }
    }
}

/// Every fault class a full run injects.
pub const CLASSES: &[&str] = &[
    "kill",
    "pause",
    "pause-past-reclaim",
    "redis-kill",
    "redis-restart",
    "pg-restart",
    "reload-with-state",
    "reload-without-state",
    "ack-cut",
];

/// What the faults can hit.
pub struct Cast<'a> {
    /// Everything that can be killed.
    pub processes: &'a [String],
    /// Services that can be paused.
    pub pausable: &'a [String],
    /// Schedulers (paused past the projector's reclaim).
    pub schedulers: &'a [String],
    /// HAProxy instances.
    pub instances: &'a [String],
}

/// The schedule of a run of `length`: `(offset from the start, fault)`, in time order.
///
/// - a process SIGKILLed every 3-6 s, down 0.3-2 s;
/// - one pause per 2.5 minutes (at least one) of `pause` (longer than the lease TTL), and
///   as often a scheduler paused for `reclaim_pause` (longer than the projector's reclaim
///   idle);
/// - Redis SIGKILLed once a minute (at least once), shut down cleanly once per 2 minutes
///   (at least once); PostgreSQL restarted once per 2 minutes (at least once);
/// - an HAProxy reload every 20 s, alternating with and without the state file;
/// - a scheduler's acknowledgement lost every 5 s (at least twice).
pub fn plan(
    seed: u64,
    length: Duration,
    cast: &Cast<'_>,
    pause: Duration,
    reclaim_pause: Duration,
) -> Vec<(Duration, Fault)> {
    let mut rng = Rng::new(seed);
    let total = length.as_millis() as u64;
    let mut plan = Vec::new();
    // Nothing in the first 3 s (the load is starting) nor the last 3 s.
    let (start, end) = (3_000, total.saturating_sub(3_000).max(3_001));
    let mut at = start;
    loop {
        at += rng.range(3_000, 6_000);
        if at >= end {
            break;
        }
        let target = rng.pick(cast.processes).clone();
        let down = Duration::from_millis(rng.range(300, 2_000));
        plan.push((Duration::from_millis(at), Fault::Kill { target, down }));
    }
    // `n` moments between the start and `until`, one in each of `n` equal slices.
    let spread_until = |rng: &mut Rng, n: u64, until: u64| -> Vec<u64> {
        let slice = (until - start) / n.max(1);
        (0..n)
            .map(|i| start + i * slice + rng.range(0, slice.max(1)))
            .collect()
    };
    let spread = |rng: &mut Rng, n: u64| spread_until(rng, n, end);
    let minutes = (total / 60_000).max(1);
    for at in spread(&mut rng, (total / 150_000).max(1)) {
        let target = rng.pick(cast.pausable).clone();
        plan.push((
            Duration::from_millis(at),
            Fault::Pause {
                target,
                paused: pause,
                past_reclaim: false,
            },
        ));
    }
    // It must end before the faults do, so that the verdict sees what it did.
    let long_end = end
        .saturating_sub(reclaim_pause.as_millis() as u64)
        .max(start + 1);
    for at in spread_until(&mut rng, (total / 150_000).max(1), long_end) {
        let target = rng.pick(cast.schedulers).clone();
        plan.push((
            Duration::from_millis(at),
            Fault::Pause {
                target,
                paused: reclaim_pause,
                past_reclaim: true,
            },
        ));
    }
    for at in spread(&mut rng, minutes) {
        let down = Duration::from_millis(rng.range(500, 2_000));
        plan.push((Duration::from_millis(at), Fault::RedisKill { down }));
    }
    for at in spread(&mut rng, (minutes / 2).max(1)) {
        let down = Duration::from_millis(rng.range(500, 2_000));
        plan.push((Duration::from_millis(at), Fault::RedisRestart { down }));
    }
    for at in spread(&mut rng, (minutes / 2).max(1)) {
        let down = Duration::from_millis(rng.range(500, 3_000));
        plan.push((Duration::from_millis(at), Fault::PgRestart { down }));
    }
    let reloads = (total / 20_000).max(2);
    for (i, at) in spread(&mut rng, reloads).into_iter().enumerate() {
        let instance = rng.pick(cast.instances).clone();
        plan.push((
            Duration::from_millis(at),
            Fault::Reload {
                instance,
                keep_state: i % 2 == 0,
            },
        ));
    }
    for at in spread(&mut rng, (total / 5_000).max(2)) {
        let target = rng.pick(cast.schedulers).clone();
        plan.push((Duration::from_millis(at), Fault::AckCut { target }));
    }
    plan.sort_by_key(|(at, _)| *at);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_seed_fixes_the_schedule_and_every_class_is_in_it() {
        let procs = names(&["gateway-1", "scheduler-1", "sim-0"]);
        let make = |seed| {
            plan(
                seed,
                Duration::from_secs(60),
                &Cast {
                    processes: &procs,
                    pausable: &procs[..2],
                    schedulers: &procs[1..2],
                    instances: &names(&["lb-a", "lb-b"]),
                },
                Duration::from_secs(6),
                Duration::from_secs(35),
            )
        };
        assert_eq!(make(7), make(7));
        assert_ne!(make(7), make(8));
        let one = make(7);
        for class in CLASSES {
            assert!(
                one.iter().any(|(_, f)| f.class() == *class),
                "{class}: {one:?}"
            );
        }
        assert!(one.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(one.iter().all(|(at, _)| *at < Duration::from_secs(60)));
        // The long pause ends inside the run.
        assert!(one.iter().all(|(at, f)| match f {
            Fault::Pause { paused, .. } => *at + *paused < Duration::from_secs(60),
            _ => true,
        }));
    }
}
