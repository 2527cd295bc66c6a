//! Credentials forgotten on every gateway at once. A token rotated or an API key revoked on
//! one replica is announced on the installation's `auth` channel; every gateway, this one
//! too, drops it from its caches when the message arrives. While the subscription is down
//! messages are lost, so each (re)subscription flushes both caches; and a lookup that began
//! before an invalidation does not put its answer in the cache (the caches' generation).
//! Should Redis be unreachable when a credential changes, the other replicas fall back on
//! `GATEWAY_AUTH_CACHE_TTL`.

use std::sync::Arc;
use std::time::Duration;

use checkplane_core::subscription::{self, Heard};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use crate::credentials::{AuthCache, KeyCache};
use crate::state::AppState;

/// The longest a request waits for its announcement to be published.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_millis(500);

/// A credential no gateway may trust from its cache any more.
#[derive(Debug, Clone, Copy)]
pub enum Forget<'a> {
    /// An agent whose token was rotated.
    Agent(&'a str),
    /// A revoked API key (its key id).
    Key(&'a str),
}

impl Forget<'_> {
    fn message(&self) -> String {
        match self {
            Self::Agent(id) => format!("agent:{id}"),
            Self::Key(id) => format!("key:{id}"),
        }
    }
}

/// Forget `what` here at once, and tell every other gateway.
pub async fn announce(state: &AppState, what: Forget<'_>) {
    apply(&state.auth_cache, &state.key_cache, &what.message());
    let mut conn = state.stores.redis_shared.clone();
    let channel = state.keys.auth_invalidations();
    // Bounded: a hung Redis must not hold the request that changed the credential (its
    // answer, a new token, would be lost to a client that timed out).
    let sent = tokio::time::timeout(
        ANNOUNCE_TIMEOUT,
        conn.publish::<_, _, i64>(&channel, what.message()),
    )
    .await;
    match sent {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, ?what, "could not tell the other gateways; they trust their caches up to GATEWAY_AUTH_CACHE_TTL");
        }
        Err(_) => {
            tracing::warn!(?what, "Redis did not take the announcement in time; the other gateways trust their caches up to GATEWAY_AUTH_CACHE_TTL");
        }
    }
}

fn apply(auth: &AuthCache, keys: &KeyCache, message: &str) {
    match message.split_once(':') {
        Some(("agent", id)) => auth.forget(id),
        Some(("key", id)) => keys.forget(id),
        _ => tracing::debug!(message, "unknown invalidation"),
    }
}

/// Follow the `auth` channel until `shutdown`; both caches are flushed whenever the
/// subscription (re)starts or drops (what was announced meanwhile is lost).
pub async fn follow(
    client: redis::Client,
    channel: String,
    auth: Arc<AuthCache>,
    keys: Arc<KeyCache>,
    shutdown: CancellationToken,
) {
    let channels = [channel];
    subscription::follow(
        client,
        &channels,
        &[],
        "credential invalidations",
        shutdown,
        |heard| match heard {
            Heard::Subscribed | Heard::Lost => {
                auth.flush();
                keys.flush();
            }
            Heard::Message { payload, .. } => apply(&auth, &keys, &payload),
        },
    )
    .await;
}
