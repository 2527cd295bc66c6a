//! Who is calling: extractors that handlers take as arguments, so no handler parses headers.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use checkplane_runtime::db::Sql;
use checkplane_runtime::http::ApiError;
use checkplane_wire::agents::{limits as sizes, protocol, AgentId};
use checkplane_wire::error::ErrorCode;
use checkplane_wire::operators::{self, Role};

use std::net::IpAddr;

use crate::credentials::same;
pub use crate::credentials::{hash_secret, Caller};
use crate::limits::{self, Limit, RateSlot};
use crate::state::AppState;

fn header<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Refuse an agent call whose protocol version (`X-Agent-Protocol`) this gateway does not
/// serve: before its credentials are looked at, with the versions each side speaks.
fn speaks_our_protocol(parts: &Parts) -> Result<(), ApiError> {
    let given = parts
        .headers
        .get(protocol::HEADER)
        .map(|v| v.to_str().unwrap_or("?"));
    match protocol::parse(given) {
        Ok(_) => Ok(()),
        Err(refused @ protocol::Refused::Malformed) => {
            Err(ApiError::validation(refused.to_string()))
        }
        Err(refused) => Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            ErrorCode::UnsupportedProtocol,
            refused.to_string(),
        )),
    }
}

/// A caller holding the enrollment token (`X-Enrollment-Token`); a wrong token counts as a
/// failed authentication of its address.
pub struct Enrollment {
    /// The client's address ([`limits::client_address`]).
    pub address: Option<IpAddr>,
    /// The hash of the `X-Agent-Token` it presented: a known host's proof that it is the
    /// agent registered under that name.
    pub presented: Option<String>,
    slot: Option<RateSlot>,
}

impl Enrollment {
    /// Count a registration of `hostname` (`GATEWAY_RATE_REGISTER`): 429 past it.
    pub async fn register(&self, state: &AppState, hostname: &str) -> Result<(), ApiError> {
        limits::check(state, self.slot.as_ref(), Limit::Register, hostname).await
    }

    /// `error`, counted as a failed authentication of the caller's address (it claimed a
    /// known host without that agent's token).
    pub async fn refuse(&self, state: &AppState, error: ApiError) -> ApiError {
        let caller = limits::failure_caller(self.address);
        limits::count(state, self.slot.as_ref(), Limit::AuthFailures, &caller).await;
        error
    }
}

impl FromRequestParts<AppState> for Enrollment {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        speaks_our_protocol(parts)?;
        let Some(expected) = &state.config.enrollment_token else {
            return Err(ApiError::forbidden(
                "registration is disabled: the gateway has no enrollment token",
            ));
        };
        let Some(given) = header(parts, "x-enrollment-token") else {
            return Err(ApiError::unauthorized("X-Enrollment-Token is required"));
        };
        let failures = Failures::look(parts, state).await?;
        if !same(expected.expose().as_bytes(), given.as_bytes()) {
            return Err(failures
                .fail(ApiError::unauthorized("wrong enrollment token"))
                .await);
        }
        let presented = header(parts, "x-agent-token")
            .filter(|t| t.len() <= sizes::TOKEN)
            .map(hash_secret);
        Ok(Self {
            address: failures.address,
            presented,
            slot: failures.slot,
        })
    }
}

/// Failed authentications of one client address (`GATEWAY_RATE_AUTH_FAILURES`): looked at
/// before PostgreSQL is asked, counted when the credentials were wrong. Verified credentials
/// never count, and those in the auth caches never get here.
struct Failures<'a> {
    state: &'a AppState,
    address: Option<IpAddr>,
    slot: Option<RateSlot>,
}

impl<'a> Failures<'a> {
    /// The caller when the address is unknown (no socket: only in-process callers).
    fn caller(&self) -> String {
        limits::failure_caller(self.address)
    }

    /// 429 for an address past its failures, before PostgreSQL is asked.
    async fn look(parts: &Parts, state: &'a AppState) -> Result<Failures<'a>, ApiError> {
        let failures = Self {
            state,
            address: limits::client_address(parts, &state.config.trusted_proxies),
            slot: RateSlot::of(parts),
        };
        limits::peek(
            state,
            failures.slot.as_ref(),
            Limit::AuthFailures,
            &failures.caller(),
        )
        .await?;
        Ok(failures)
    }

    /// Count a failure; its answer back.
    async fn fail(&self, error: ApiError) -> ApiError {
        // Refused or not, the answer is the failure's own; the count is for the next call.
        limits::count(
            self.state,
            self.slot.as_ref(),
            Limit::AuthFailures,
            &self.caller(),
        )
        .await;
        error
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
        speaks_our_protocol(parts)?;
        let (Some(id), Some(token)) = (header(parts, "x-agent-id"), header(parts, "x-agent-token"))
        else {
            return Err(ApiError::unauthorized(
                "X-Agent-Id and X-Agent-Token are required",
            ));
        };
        let denied = || ApiError::unauthorized("unknown agent or wrong token");
        let agent_id = AgentId::parse(id).map_err(|_| denied())?;
        if token.len() > sizes::TOKEN {
            return Err(denied());
        }
        let presented = hash_secret(token);
        if !state.auth_cache.verified(&agent_id, &presented) {
            verify(parts, state, &agent_id, presented).await?;
        }
        if let Some(limit) = limits::route(parts).and_then(Limit::of_agent_route) {
            limits::check(
                state,
                RateSlot::of(parts).as_ref(),
                limit,
                agent_id.as_str(),
            )
            .await?;
        }
        Ok(Self { agent_id })
    }
}

/// Check an agent's token against PostgreSQL (it was not in the cache), remembering it when
/// it matched.
async fn verify(
    parts: &Parts,
    state: &AppState,
    agent_id: &AgentId,
    presented: String,
) -> Result<(), ApiError> {
    let denied = || ApiError::unauthorized("unknown agent or wrong token");
    let failures = Failures::look(parts, state).await?;
    let seen = state.auth_cache.generation();
    metrics::counter!("checkplane_auth_lookups_total", "kind" => "agent").increment(1);
    let client = state.stores.pg.get().await?;
    // Through the statement cache: every agent comes here again once its entry expires.
    let row = Sql::query_opt(
        &client,
        "SELECT token_hash FROM agents WHERE agent_id = $1 AND token_hash IS NOT NULL",
        &[&agent_id.as_str()],
    )
    .await?;
    let Some(stored) = row.map(|r| r.get::<_, String>("token_hash")) else {
        return Err(failures.fail(denied()).await);
    };
    if !same(stored.as_bytes(), presented.as_bytes()) {
        return Err(failures.fail(denied()).await);
    }
    state.auth_cache.remember(agent_id, presented, seen);
    Ok(())
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
        let caller = identify(parts, state, given).await?;
        limits::check(
            state,
            RateSlot::of(parts).as_ref(),
            Limit::Operator,
            &caller.key_id,
        )
        .await?;
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
async fn identify(parts: &Parts, state: &AppState, key: &str) -> Result<Caller, ApiError> {
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
    let failures = Failures::look(parts, state).await?;
    let seen = state.key_cache.generation();
    metrics::counter!("checkplane_auth_lookups_total", "kind" => "key").increment(1);
    let client = state.stores.pg.get().await?;
    let Some(row) = client
        .query_opt(
            "SELECT name, role, key_hash FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL",
            &[&key_id],
        )
        .await?
    else {
        return Err(failures.fail(unknown()).await);
    };
    let stored: String = row.get("key_hash");
    if !same(stored.as_bytes(), presented.as_bytes()) {
        return Err(failures.fail(unknown()).await);
    }
    let role = Role::parse(row.get::<_, &str>("role")).ok_or_else(unknown)?;
    let caller = Caller {
        key_id: key_id.to_owned(),
        name: row.get("name"),
        role,
    };
    state.key_cache.remember(caller.clone(), presented, seen);
    Ok(caller)
}
