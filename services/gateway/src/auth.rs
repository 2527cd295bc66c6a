//! Who is calling: extractors that handlers take as arguments, so no handler parses headers.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use checkplane_runtime::http::ApiError;
use checkplane_wire::agents::{limits, AgentId};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::state::AppState;

/// SHA-256 of a secret, hex: what is stored instead of the secret.
pub fn hash_secret(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
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
        let row = client
            .query_opt(
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

/// An operator holding the admin key (`X-API-Key` equal to `GATEWAY_ADMIN_KEY`).
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(given) = header(parts, "x-api-key") else {
            return Err(ApiError::unauthorized("X-API-Key is required"));
        };
        match &state.config.admin_key {
            Some(expected) if same(expected.expose().as_bytes(), given.as_bytes()) => Ok(Self),
            _ => Err(ApiError::unauthorized("unknown API key")),
        }
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
