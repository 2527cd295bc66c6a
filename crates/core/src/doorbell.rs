//! Doorbells for waiting claims, and for live readers of checks.
//!
//! One dedicated Redis pub/sub connection per gateway subscribes to every shard's `wake`
//! channel and fans wake-ups out in process: a message names an agent, and every claim of that
//! agent waiting in this process is woken to run its script again. A waiting claim holds no
//! Redis connection at all. A waiter listens ([`Bell::listen`]) *before* its claim script
//! runs, so a task enqueued between the script and the wait still wakes it. The same
//! connection has a pattern subscription to every check's `live` channel: the projector
//! publishes a check's id after a commit that moved its slots, and that check's live readers
//! look again at once. When the subscription drops and comes back, everyone is woken, since
//! messages sent meanwhile are lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::keys::Keys;
use crate::subscription::Heard;

/// A waiter's bell and everyone's bell (rung when the subscription came back).
#[derive(Clone)]
pub struct Bell {
    own: Arc<Notify>,
    everyone: Arc<Notify>,
}

impl Bell {
    /// Listen from now on: the future completes at the next ring of either bell after this
    /// call, even one before it is first polled. So a waiter listens *before* it looks
    /// (runs its claim script, reads the check), and work arriving in between still wakes it.
    pub fn listen(&self) -> impl std::future::Future<Output = ()> + Send + '_ {
        let mut own = Box::pin(self.own.notified());
        let mut all = Box::pin(self.everyone.notified());
        own.as_mut().enable();
        all.as_mut().enable();
        async move {
            tokio::select! {
                _ = own => {}
                _ = all => {}
            }
        }
    }
}

/// Bells by name, each shared by whoever waits on it in this process, and everyone's bell.
#[derive(Clone, Default)]
struct Bells {
    bells: Arc<Mutex<HashMap<String, Weak<Notify>>>>,
    everyone: Arc<Notify>,
}

impl Bells {
    fn bell(&self, name: &str) -> Bell {
        let mut bells = self.bells.lock().unwrap_or_else(|p| p.into_inner());
        let bell = match bells.get(name).and_then(Weak::upgrade) {
            Some(bell) => bell,
            None => {
                let bell = Arc::new(Notify::new());
                bells.insert(name.to_owned(), Arc::downgrade(&bell));
                bell
            }
        };
        if bells.len() > 1024 && bells.len().is_power_of_two() {
            bells.retain(|_, w| w.strong_count() > 0);
        }
        Bell {
            own: bell,
            everyone: self.everyone.clone(),
        }
    }

    fn ring(&self, name: &str) {
        let bells = self.bells.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bell) = bells.get(name).and_then(Weak::upgrade) {
            bell.notify_waiters();
        }
    }
}

/// The in-process side: agents' waiting claims, and live readers of checks.
#[derive(Clone, Default)]
pub struct Doorbell {
    agents: Bells,
    checks: Bells,
}

impl Doorbell {
    /// The bell of `agent`, shared by all its waiters in this process, and everyone's bell.
    pub fn bell(&self, agent: &str) -> Bell {
        self.agents.bell(agent)
    }

    /// Wake every waiter of `agent`.
    pub fn ring(&self, agent: &str) {
        self.agents.ring(agent);
    }

    /// The bell of `check`'s live readers (rung when a projector committed a change of its
    /// slots), and the bell rung for all of them when the subscription came back.
    pub fn check_bell(&self, check: &uuid::Uuid) -> Bell {
        self.checks.bell(&check.to_string())
    }

    /// Wake every waiter, of agents and of checks.
    pub fn ring_all(&self) {
        self.agents.everyone.notify_waiters();
        self.checks.everyone.notify_waiters();
    }

    /// Keep a subscription to every shard's wake channel and to every check's live channel
    /// (a pattern) until `shutdown`, reconnecting with a backoff; wakes everyone after each
    /// (re)subscription.
    pub async fn subscribe(self, client: redis::Client, keys: Keys, shutdown: CancellationToken) {
        let channels: Vec<String> = (0..keys.shards()).map(|n| keys.wake(n)).collect();
        let patterns = [keys.live_pattern()];
        crate::subscription::follow(
            client,
            &channels,
            &patterns,
            "doorbell",
            shutdown,
            |heard| match heard {
                Heard::Subscribed | Heard::Lost => self.ring_all(),
                Heard::Message {
                    from_pattern: true,
                    payload,
                } => self.checks.ring(&payload),
                Heard::Message { payload, .. } => self.agents.ring(&payload),
            },
        )
        .await;
    }
}
