//! What every handler can reach.

use std::sync::Arc;

use checkplane_core::doorbell::Doorbell;
use checkplane_core::keys::Keys;
use checkplane_core::leases::Leases;
use checkplane_core::presence::Presence;
use checkplane_runtime::Stores;

use crate::config::Config;

/// Shared by every handler; a clone is one reference count (axum clones it for every
/// extractor of every request, and the lease scripts' sources inside are kilobytes).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
    pub stores: Stores,
    pub keys: Keys,
    pub presence: Presence,
    pub leases: Leases,
    pub doorbell: Doorbell,
    pub config: Arc<Config>,
    pub auth_cache: Arc<crate::credentials::AuthCache>,
    pub key_cache: Arc<crate::credentials::KeyCache>,
    /// Fires at shutdown: waiting claims answer at once.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Bounds the requests waiting for an HAProxy action to end (each holds a Redis
    /// connection of its own while it waits).
    pub action_waiters: Arc<tokio::sync::Semaphore>,
    /// Bounds the live streams open at once (`GATEWAY_MAX_LIVE_STREAMS`).
    pub live_streams: Arc<tokio::sync::Semaphore>,
    /// Rate limits (`checkplane_core::ratelimit`).
    pub limiter: Arc<checkplane_core::ratelimit::Limiter>,
    /// Long waits per API key (`GATEWAY_MAX_WAITS_PER_KEY`).
    pub key_waits: Arc<crate::places::Places>,
    /// Long-poll claims per agent (`GATEWAY_MAX_CLAIMS_PER_AGENT`).
    pub agent_claims: Arc<crate::places::Places>,
    /// The service's tasks: what a request leaves running (a publication) is waited for at
    /// shutdown.
    pub tracker: tokio_util::task::TaskTracker,
}
