//! Who is calling: extractors that handlers take as arguments, so no handler parses headers.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use checkplane_runtime::db::Sql;
use checkplane_runtime::http::ApiError;
use checkplane_wire::agents::{limits, AgentId};
use checkplane_wire::operators::{self, Role};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::state::AppState;

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

fn header<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

fn same(a: &[u8], b: &[u8]) -> bool {
    bool::from(a.ct_eq(b))
}

/// A caller holding the enrollment token (`X-Enrollment-Token`).
pub struct Enrollment;

impl FromRequestParts<AppState> for Enrollment {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = &state.config.enrollment_token else {
            return Err(ApiError::forbidden(
                "registration is disabled: the gateway has no enrollment token",
            ));
        };
        match header(parts, "x-enrollment-token") {
            Some(given) if same(expected.expose().as_bytes(), given.as_bytes()) => Ok(Self),
            Some(_) => Err(ApiError::unauthorized("wrong enrollment token")),
            None => Err(ApiError::unauthorized("X-Enrollment-Token is required")),
        }
    }
}

/// An authenticated agent (`X-Agent-Id` + `X-Agent-Token`).
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub agent_id: AgentId,
}

impl FromRequestParts<AppState> for AgentIdentity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let (Some(id), Some(token)) = (header(parts, "x-agent-id"), header(parts, "x-agent-token"))
        else {
            return Err(ApiError::unauthorized(
                "X-Agent-Id and X-Agent-Token are required",
            ));
        };
        let denied = || ApiError::unauthorized("unknown agent or wrong token");
        let agent_id = AgentId::parse(id).map_err(|_| denied())?;
        if token.len() > limits::TOKEN {
            return Err(denied());
        }
        let presented = hash_secret(token);
        if state.auth_cache.verified(&agent_id, &presented) {
            return Ok(Self { agent_id });
        }
        let client = state.stores.pg.get().await?;
        // Through the statement cache: every agent comes here again once its entry expires.
        let row = Sql::query_opt(
            &client,
            "SELECT token_hash FROM agents WHERE agent_id = $1 AND token_hash IS NOT NULL",
            &[&agent_id.as_str()],
        )
        .await?;
        let stored: String = row.map(|r| r.get(0)).ok_or_else(denied)?;
        if !same(stored.as_bytes(), presented.as_bytes()) {
            return Err(denied());
        }
        state.auth_cache.remember(&agent_id, presented);
        Ok(Self { agent_id })
    }
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

/// The least role a route needs; routes declare it by the extractor they take
/// ([`Viewer`], [`Operator`], [`Admin`]).
pub trait Needs {
    const ROLE: Role;
}

/// Marker: viewer or above.
pub enum ViewerRole {}
/// Marker: operator or above.
pub enum OperatorRole {}
/// Marker: admin.
pub enum AdminRole {}

impl Needs for ViewerRole {
    const ROLE: Role = Role::Viewer;
}
impl Needs for OperatorRole {
    const ROLE: Role = Role::Operator;
}
impl Needs for AdminRole {
    const ROLE: Role = Role::Admin;
}

/// An operator whose key has at least `R::ROLE`: 401 without a valid key, 403 with a key of a
/// lower role.
pub struct Authorized<R: Needs> {
    pub caller: Caller,
    _role: std::marker::PhantomData<R>,
}

pub type Viewer = Authorized<ViewerRole>;
pub type Operator = Authorized<OperatorRole>;
pub type Admin = Authorized<AdminRole>;

impl<R: Needs> FromRequestParts<AppState> for Authorized<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(given) = header(parts, "x-api-key") else {
            return Err(ApiError::unauthorized("X-API-Key is required"));
        };
        let caller = identify(state, given).await?;
        if !caller.role.allows(R::ROLE) {
            return Err(ApiError::forbidden(format!(
                "this needs the {} role; the key has {}",
                R::ROLE,
                caller.role
            )));
        }
        Ok(Self {
            caller,
            _role: std::marker::PhantomData,
        })
    }
}

/// Who holds `key`: the bootstrap key, or a stored, unrevoked key whose hash matches.
async fn identify(state: &AppState, key: &str) -> Result<Caller, ApiError> {
    let unknown = || ApiError::unauthorized("unknown or revoked API key");
    if let Some(expected) = &state.config.admin_key {
        if same(expected.expose().as_bytes(), key.as_bytes()) {
            return Ok(Caller {
                key_id: "bootstrap".to_owned(),
                name: "bootstrap".to_owned(),
                role: Role::Admin,
            });
        }
    }
    if key.len() > operators::KEY_MAX {
        return Err(unknown());
    }
    let key_id = operators::key_id_of(key).ok_or_else(unknown)?;
    let presented = hash_secret(key);
    if let Some(caller) = state.key_cache.verified(key_id, &presented) {
        return Ok(caller);
    }
    let client = state.stores.pg.get().await?;
    let row = client
        .query_opt(
            "SELECT name, role, key_hash FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL",
            &[&key_id],
        )
        .await?
        .ok_or_else(unknown)?;
    let stored: String = row.get(2);
    if !same(stored.as_bytes(), presented.as_bytes()) {
        return Err(unknown());
    }
    let role = Role::parse(row.get::<_, &str>(1)).ok_or_else(unknown)?;
    let caller = Caller {
        key_id: key_id.to_owned(),
        name: row.get(0),
        role,
    };
    state.key_cache.remember(caller.clone(), presented);
    Ok(caller)
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

    fn verified(&self, key_id: &str, hash: &str) -> Option<Caller> {
        if self.ttl.is_zero() {
            return None;
        }
        self.lock().get(key_id).and_then(|(h, caller, at)| {
            (at.elapsed() < self.ttl && same(h.as_bytes(), hash.as_bytes())).then(|| caller.clone())
        })
    }

    fn remember(&self, caller: Caller, hash: String) {
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
