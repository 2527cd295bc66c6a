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

/// Operator keys verified recently (same TTL as agent tokens, `GATEWAY_AUTH_CACHE_TTL`): a key
/// revoked on this gateway is forgotten at once, on another replica within the TTL.
pub struct KeyCache {
    ttl: std::time::Duration,
    entries:
        std::sync::Mutex<std::collections::HashMap<String, (String, Caller, std::time::Instant)>>,
}

/// Most operator keys remembered; past it the cache starts over.
const KEY_CACHE_MAX: usize = 10_000;

impl KeyCache {
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            entries: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<String, (String, Caller, std::time::Instant)>,
    > {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn verified(&self, key_id: &str, hash: &str) -> Option<Caller> {
        if self.ttl.is_zero() {
            return None;
        }
        self.lock().get(key_id).and_then(|(h, caller, at)| {
            (at.elapsed() < self.ttl && same(h.as_bytes(), hash.as_bytes())).then(|| caller.clone())
        })
    }

    pub(crate) fn remember(&self, caller: Caller, hash: String) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= KEY_CACHE_MAX {
            entries.clear();
        }
        entries.insert(
            caller.key_id.clone(),
            (hash, caller, std::time::Instant::now()),
        );
    }

    /// Forget a key (revoked here).
    pub fn forget(&self, key_id: &str) {
        self.lock().remove(key_id);
    }
}

/// Tokens verified against PostgreSQL recently, so the lease hot path does not query it on
/// every call. Only successes are kept, for `GATEWAY_AUTH_CACHE_TTL`; a registration on this
/// gateway forgets the agent at once, and one on another replica is seen within the TTL (an
/// old token of a rotated agent may pass that long there). A TTL of zero turns it off.
pub struct AuthCache {
    ttl: std::time::Duration,
    entries: std::sync::Mutex<std::collections::HashMap<AgentId, (String, std::time::Instant)>>,
}

/// Most agents remembered; past it, expired entries are dropped, then everything.
const AUTH_CACHE_MAX: usize = 200_000;

impl AuthCache {
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            entries: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<AgentId, (String, std::time::Instant)>>
    {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `agent` presented this token hash and it was verified within the TTL.
    pub fn verified(&self, agent: &AgentId, hash: &str) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        self.lock()
            .get(agent)
            .is_some_and(|(h, at)| at.elapsed() < self.ttl && same(h.as_bytes(), hash.as_bytes()))
    }

    /// Remember a verified token hash.
    pub fn remember(&self, agent: &AgentId, hash: String) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= AUTH_CACHE_MAX {
            let ttl = self.ttl;
            entries.retain(|_, (_, at)| at.elapsed() < ttl);
            if entries.len() >= AUTH_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(agent.clone(), (hash, std::time::Instant::now()));
    }

    /// Forget an agent (its token was rotated here).
    pub fn forget(&self, agent: &str) {
        if let Ok(agent) = AgentId::parse(agent) {
            self.lock().remove(&agent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::hash_secret;

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
