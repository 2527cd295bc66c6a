//! The per-instance circuit breaker: closed → open after [`THRESHOLD`] consecutive failures
//! to reach HAProxy → after the cooldown one trial (half open) → closed on its success, open
//! again on its failure. HAProxy's own errors (`No such server.`) are answers, not failures.
//! Time is passed in, so tests control the clock.

use std::time::{Duration, Instant};

/// Consecutive failures that open the breaker.
pub const THRESHOLD: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    pub state: State,
    pub failures: u32,
    pub opened_at: Option<Instant>,
    cooldown: Duration,
    trial_running: bool,
}

impl Breaker {
    pub fn new(cooldown: Duration) -> Self {
        Self {
            state: State::Closed,
            failures: 0,
            opened_at: None,
            cooldown,
            trial_running: false,
        }
    }

    /// May a command go to HAProxy now? Open: no, until the cooldown is over, then one trial.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open => {
                let over = self.opened_at.is_none_or(|at| now >= at + self.cooldown);
                if over {
                    self.state = State::HalfOpen;
                    self.trial_running = true;
                }
                over
            }
            State::HalfOpen => {
                if self.trial_running {
                    false
                } else {
                    self.trial_running = true;
                    true
                }
            }
        }
    }

    pub fn success(&mut self) {
        self.state = State::Closed;
        self.failures = 0;
        self.opened_at = None;
        self.trial_running = false;
    }

    pub fn failure(&mut self, now: Instant) {
        self.failures += 1;
        self.trial_running = false;
        if self.state == State::HalfOpen || self.failures >= THRESHOLD {
            if self.state != State::Open {
                tracing::warn!(failures = self.failures, "circuit breaker opened");
            }
            self.state = State::Open;
            self.opened_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_three_failures_fails_fast_then_one_trial_decides() {
        let t0 = Instant::now();
        let minute = Duration::from_secs(60);
        let mut b = Breaker::new(minute);
        for _ in 0..2 {
            assert!(b.allow(t0));
            b.failure(t0);
        }
        assert_eq!(b.state, State::Closed);
        assert!(b.allow(t0));
        b.failure(t0);
        assert_eq!(b.state, State::Open);
        // Open: nothing goes through until the minute is over.
        assert!(!b.allow(t0 + Duration::from_secs(59)));
        // Then one trial, and only one.
        assert!(b.allow(t0 + minute));
        assert_eq!(b.state, State::HalfOpen);
        assert!(!b.allow(t0 + minute));
        // It fails: open again for another minute.
        b.failure(t0 + minute);
        assert_eq!(b.state, State::Open);
        assert!(!b.allow(t0 + minute + Duration::from_secs(30)));
        // The next trial succeeds: closed.
        assert!(b.allow(t0 + minute * 2));
        b.success();
        assert_eq!((b.state, b.failures), (State::Closed, 0));
        assert!(b.allow(t0 + minute * 2));
    }

    #[test]
    fn a_success_resets_the_count() {
        let t = Instant::now();
        let mut b = Breaker::new(Duration::from_secs(1));
        b.failure(t);
        b.failure(t);
        b.success();
        b.failure(t);
        b.failure(t);
        assert_eq!(b.state, State::Closed);
    }
}
