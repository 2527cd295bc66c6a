//! What the gateway knows of credentials without a request in hand: how secrets are stored
//! (hashed), an operator caller, and the caches of recently verified agent tokens and
//! operator keys. The extractors that check a request are [`crate::auth`]; handlers' state
//! holds the caches, so this module depends on neither.

use checkplane_wire::agents::AgentId;
use checkplane_wire::operators::Role;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// SHA-256 of a secret, hex: what is stored instead of the secret.
pub fn hash_secret(secret: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(secret.as_bytes());
    let mut out = String::with_capacity(2 * digest.len());
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// Equal, in time independent of where they differ.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    bool::from(a.ct_eq(b))
}

/// An operator, identified by `X-API-Key`: a key made with `gateway keys create` or
/// `POST /v1/keys`, or the bootstrap key `GATEWAY_ADMIN_KEY` (role admin, actor
/// `key:bootstrap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's id (`bootstrap` for `GATEWAY_ADMIN_KEY`).
    pub key_id: String,
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// The `actor` of the events this caller causes.
    pub fn actor(&self) -> String {
        format!("key:{}", self.key_id)
    }
}

/// A cache's count of invalidations: read before a lookup in PostgreSQL, checked when the
/// answer is remembered, so a request that looked before a revocation arrived cannot put the
/// revoked credential back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

/// Entries and the generation, under one lock (the check and the insert are one step).
struct Entries<K, V> {
    map: std::collections::HashMap<K, V>,
    generation: u64,
}

impl<K, V> Default for Entries<K, V> {
    fn default() -> Self {
        Self {
            map: std::collections::HashMap::new(),
            generation: 0,
        }
    }
}

/// Operator keys verified recently (same TTL as agent tokens, `GATEWAY_AUTH_CACHE_TTL`): a key
/// revoked on any gateway is forgotten on every one at once (`crate::revocations`), or
/// within the TTL should that message be lost.
pub struct KeyCache {
    ttl: std::time::Duration,
    entries: std::sync::Mutex<Entries<String, (String, Caller, std::time::Instant)>>,
}

/// Most operator keys remembered; past it the cache starts over.
const KEY_CACHE_MAX: usize = 10_000;

impl KeyCache {
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            entries: std::sync::Mutex::new(Entries::default()),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Entries<String, (String, Caller, std::time::Instant)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn verified(&self, key_id: &str, hash: &str) -> Option<Caller> {
        if self.ttl.is_zero() {
            return None;
        }
        self.lock().map.get(key_id).and_then(|(h, caller, at)| {
            (at.elapsed() < self.ttl && same(h.as_bytes(), hash.as_bytes())).then(|| caller.clone())
        })
    }

    /// The generation to pass to [`KeyCache::remember`], read before the lookup.
    pub fn generation(&self) -> Generation {
        Generation(self.lock().generation)
    }

    /// Remember a verified key, unless an invalidation came since `seen`.
    pub(crate) fn remember(&self, caller: Caller, hash: String, seen: Generation) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.lock();
        if entries.generation != seen.0 {
            return;
        }
        if entries.map.len() >= KEY_CACHE_MAX {
            entries.map.clear();
        }
        entries.map.insert(
            caller.key_id.clone(),
            (hash, caller, std::time::Instant::now()),
        );
    }

    /// Forget a key (revoked).
    pub fn forget(&self, key_id: &str) {
        let mut entries = self.lock();
        entries.generation += 1;
        entries.map.remove(key_id);
    }

    /// Forget every key (invalidations may have been missed).
    pub fn flush(&self) {
        let mut entries = self.lock();
        entries.generation += 1;
        entries.map.clear();
    }
}

/// Tokens verified against PostgreSQL recently, so the lease hot path does not query it on
/// every call. Only successes are kept, for `GATEWAY_AUTH_CACHE_TTL`; a token rotated on any
/// gateway is forgotten on every one at once (`crate::revocations`), or within the TTL should
/// that message be lost. A TTL of zero turns it off.
pub struct AuthCache {
    ttl: std::time::Duration,
    entries: std::sync::Mutex<Entries<AgentId, (String, std::time::Instant)>>,
}

/// Most agents remembered; past it, expired entries are dropped, then everything.
const AUTH_CACHE_MAX: usize = 200_000;

impl AuthCache {
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            entries: std::sync::Mutex::new(Entries::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries<AgentId, (String, std::time::Instant)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `agent` presented this token hash and it was verified within the TTL.
    pub fn verified(&self, agent: &AgentId, hash: &str) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        self.lock()
            .map
            .get(agent)
            .is_some_and(|(h, at)| at.elapsed() < self.ttl && same(h.as_bytes(), hash.as_bytes()))
    }

    /// The generation to pass to [`AuthCache::remember`], read before the lookup.
    pub fn generation(&self) -> Generation {
        Generation(self.lock().generation)
    }

    /// Remember a verified token hash, unless an invalidation came since `seen`.
    pub fn remember(&self, agent: &AgentId, hash: String, seen: Generation) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.lock();
        if entries.generation != seen.0 {
            return;
        }
        if entries.map.len() >= AUTH_CACHE_MAX {
            let ttl = self.ttl;
            entries.map.retain(|_, (_, at)| at.elapsed() < ttl);
            if entries.map.len() >= AUTH_CACHE_MAX {
                entries.map.clear();
            }
        }
        entries
            .map
            .insert(agent.clone(), (hash, std::time::Instant::now()));
    }

    /// Forget an agent (its token was rotated).
    pub fn forget(&self, agent: &str) {
        let mut entries = self.lock();
        entries.generation += 1;
        if let Ok(agent) = AgentId::parse(agent) {
            entries.map.remove(&agent);
        }
    }

    /// Forget every agent (invalidations may have been missed).
    pub fn flush(&self) {
        let mut entries = self.lock();
        entries.generation += 1;
        entries.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_that_began_before_an_invalidation_is_not_remembered() {
        let cache = AuthCache::new(std::time::Duration::from_secs(60));
        let agent = AgentId::parse("agt-0123456789abcdef0123456789abcdef").unwrap();
        let seen = cache.generation();
        // The token is rotated elsewhere while this request asks PostgreSQL.
        cache.forget(agent.as_str());
        cache.remember(&agent, "old".into(), seen);
        assert!(!cache.verified(&agent, "old"));
        // A lookup that began after it is remembered.
        cache.remember(&agent, "new".into(), cache.generation());
        assert!(cache.verified(&agent, "new"));
        cache.flush();
        assert!(!cache.verified(&agent, "new"));

        let keys = KeyCache::new(std::time::Duration::from_secs(60));
        let caller = Caller {
            key_id: "0123456789ab".into(),
            name: "ops".into(),
            role: checkplane_wire::operators::Role::Operator,
        };
        let seen = keys.generation();
        keys.forget("0123456789ab");
        keys.remember(caller.clone(), "h".into(), seen);
        assert!(keys.verified("0123456789ab", "h").is_none());
        keys.remember(caller, "h".into(), keys.generation());
        assert!(keys.verified("0123456789ab", "h").is_some());
    }

    #[test]
    fn secrets_hash_to_lowercase_hex_sha256() {
        // FIPS 180-2's test vector: stored hashes from before must still match.
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hash_secret("abc").len(), 64);
    }
}
