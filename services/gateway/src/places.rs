//! Bounds on the long waits one caller may hold at once: live streams, reads and action
//! lookups with a wait (per API key, `GATEWAY_MAX_WAITS_PER_KEY`), and long-poll claims (per
//! agent, `GATEWAY_MAX_CLAIMS_PER_AGENT`). The gateway-wide bounds (`GATEWAY_MAX_LIVE_STREAMS`,
//! the action waiters) stay beside these: one caller can no longer take all of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// How many places each caller holds, against one cap.
#[derive(Debug)]
pub struct Places {
    /// What a place is, for metrics (`stream`, `claim`).
    what: &'static str,
    max: usize,
    held: Mutex<HashMap<String, usize>>,
}

/// One caller's place, given back when dropped.
#[derive(Debug)]
#[must_use = "the place is given back when dropped"]
pub struct Place {
    places: Arc<Places>,
    caller: String,
}

impl Places {
    pub fn new(what: &'static str, max: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// The most places one caller may hold.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A place for `caller`, or `None` (counted) while it holds the most it may.
    pub fn take(self: &Arc<Self>, caller: &str) -> Option<Place> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(caller.to_owned()).or_default();
        if *count >= self.max {
            if *count == 0 {
                held.remove(caller);
            }
            metrics::counter!("checkplane_waits_refused_total", "kind" => self.what).increment(1);
            return None;
        }
        *count += 1;
        Some(Place {
            places: self.clone(),
            caller: caller.to_owned(),
        })
    }

    /// Places `caller` holds now.
    pub fn held(&self, caller: &str) -> usize {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(caller).copied().unwrap_or(0)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut held = self
            .places
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_its_own_cap_and_places_come_back() {
        let places = Places::new("stream", 2);
        let a1 = places.take("a").expect("room");
        let _a2 = places.take("a").expect("room");
        assert!(places.take("a").is_none());
        let _b1 = places.take("b").expect("another caller is not affected");
        drop(a1);
        assert_eq!(places.held("a"), 1);
        assert!(places.take("a").is_some());
    }

    #[test]
    fn a_caller_with_nothing_held_leaves_no_entry() {
        let places = Places::new("claim", 1);
        drop(places.take("a").expect("room"));
        assert_eq!(places.held("a"), 0);
        assert!(places
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty());
    }
}
