//! The agent registry: register, heartbeat, and the operator's list of agents.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine;
use checkplane_runtime::clock::now_ms;
use checkplane_runtime::http::{ApiError, ApiJson, ApiQuery, BodyLimit};
use checkplane_wire::agents::{
    AgentId, HeartbeatRequest, HeartbeatResponse, MetricsReport, RegisterRequest, RegisterResponse,
};
use checkplane_wire::events::{
    AgentReenrollApproved, AgentRegistered, AgentRevoked, Event, EventBody,
};
use serde::{Deserialize, Serialize};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::auth::{hash_secret, Admin, AgentIdentity, Enrollment, Viewer};
use crate::credentials::same;
use crate::edge::Written;
use crate::paging::{check_window, Page};
use crate::state::AppState;

/// Largest registration body.
const REGISTER_BODY_LIMIT: usize = 64 * 1024;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/agents/register",
            post(register).layer(BodyLimit(REGISTER_BODY_LIMIT)),
        )
        .route(
            "/v1/agents/heartbeat",
            post(heartbeat).layer(BodyLimit(4 * 1024)),
        )
        .route(
            "/v1/agents/metrics",
            post(report_metrics).layer(BodyLimit(METRICS_BODY_LIMIT)),
        )
        .route("/v1/agents", get(list))
        .route("/v1/agents/{agent_id}/concurrency", get(concurrency))
        .route("/v1/agents/{agent_id}/reenroll", post(reenroll))
        .route("/v1/agents/{agent_id}", delete(revoke))
}

/// Largest metrics report (600 snapshots and 128 metrics fit well inside).
const METRICS_BODY_LIMIT: usize = 256 * 1024;

/// `POST /v1/agents/metrics`: kept as it arrives (telemetry, not events): one
/// `agent_metrics` row, and the controller's snapshots in `concurrency_windows` (a snapshot
/// sent twice, after a lost answer, is kept once).
async fn report_metrics(
    State(app): State<AppState>,
    agent: AgentIdentity,
    ApiJson(report): ApiJson<MetricsReport>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    report
        .validate(now_ms())
        .map_err(|e| ApiError::validation(e.to_string()))?;
    let agent_id = agent.agent_id.as_str();
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    if !report.metrics.is_empty() {
        let metrics = serde_json::to_value(&report.metrics).unwrap_or_default();
        tx.execute(
            "INSERT INTO agent_metrics (agent_id, recorded_at, metrics) VALUES ($1, now(), $2)
             ON CONFLICT DO NOTHING",
            &[&agent_id, &metrics],
        )
        .await?;
    }
    if !report.concurrency.is_empty() {
        let at: Vec<i64> = report.concurrency.iter().map(|s| s.at_ms).collect();
        let window: Vec<i32> = report.concurrency.iter().map(|s| s.window as i32).collect();
        let max: Vec<i32> = report.concurrency.iter().map(|s| s.max as i32).collect();
        let inflight: Vec<i32> = report
            .concurrency
            .iter()
            .map(|s| s.inflight as i32)
            .collect();
        let queued: Vec<i32> = report.concurrency.iter().map(|s| s.queued as i32).collect();
        let pressure: Vec<bool> = report.concurrency.iter().map(|s| s.backpressure).collect();
        let reason: Vec<Option<String>> = report
            .concurrency
            .iter()
            .map(|s| s.reason.clone())
            .collect();
        tx.execute(
            "INSERT INTO concurrency_windows
                 (agent_id, recorded_at, window_size, max_window, inflight, queued, backpressure, reason)
             SELECT $1, cp_at_ms(at), w, m, i, q, b, r
             FROM unnest($2::bigint[], $3::int[], $4::int[], $5::int[], $6::int[], $7::bool[], $8::text[])
                  AS u(at, w, m, i, q, b, r)
             ON CONFLICT DO NOTHING",
            &[&agent_id, &at, &window, &max, &inflight, &queued, &pressure, &reason],
        )
        .await?;
    }
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"accepted": report.concurrency.len()})),
    ))
}

/// Filters and page of `GET /v1/agents/{id}/concurrency`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowQuery {
    /// ms since the epoch
    from: Option<i64>,
    to: Option<i64>,
    #[serde(default = "crate::paging::default_limit")]
    limit: i64,
    #[serde(default)]
    offset: i64,
}

/// One snapshot as operators read it.
#[derive(Debug, Serialize)]
struct WindowView {
    recorded_at: String,
    window: i32,
    max: i32,
    inflight: i32,
    queued: i32,
    backpressure: bool,
    reason: Option<String>,
}

/// `GET /v1/agents/{id}/concurrency`: the controller's snapshots, oldest first, to chart.
async fn concurrency(
    State(app): State<AppState>,
    _viewer: Viewer,
    axum::extract::Path(agent_id): axum::extract::Path<String>,
    ApiQuery(q): ApiQuery<WindowQuery>,
) -> Result<Json<Page<WindowView>>, ApiError> {
    let agent_id = checkplane_wire::agents::AgentId::parse(&agent_id)
        .map_err(|e| ApiError::validation(e.to_string()))?;
    check_window(q.limit, q.offset)?;
    crate::paging::check_millis("from", q.from)?;
    crate::paging::check_millis("to", q.to)?;
    let client = app.stores.pg.get().await?;
    let known = client
        .query_opt(
            "SELECT 1 FROM agents WHERE agent_id = $1",
            &[&agent_id.as_str()],
        )
        .await?;
    if known.is_none() {
        return Err(ApiError::not_found("no such agent"));
    }
    let sql = "SELECT cp_rfc3339(recorded_at) AS recorded_at, window_size, max_window,
                inflight, queued, backpressure, reason, count(*) OVER () AS total
         FROM concurrency_windows
         WHERE agent_id = $1
           AND ($2::bigint IS NULL OR recorded_at >= cp_at_ms($2))
           AND ($3::bigint IS NULL OR recorded_at < cp_at_ms($3))
         ORDER BY concurrency_windows.recorded_at LIMIT $4 OFFSET $5"
        .to_string();
    let rows = client
        .query(
            &sql,
            &[&agent_id.as_str(), &q.from, &q.to, &q.limit, &q.offset],
        )
        .await?;
    let total = rows.first().map_or(0, |r| r.get("total"));
    let items = rows
        .iter()
        .map(|r| WindowView {
            recorded_at: r.get("recorded_at"),
            window: r.get("window_size"),
            max: r.get("max_window"),
            inflight: r.get("inflight"),
            queued: r.get("queued"),
            backpressure: r.get("backpressure"),
            reason: r.get("reason"),
        })
        .collect();
    Ok(Json(Page::new(items, total, q.limit, q.offset)))
}

/// A fresh secret token: 32 random bytes, URL-safe base64, with a recognisable prefix.
fn new_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        tracing::error!(error = %e, "no randomness");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            checkplane_wire::ErrorCode::Internal,
            "internal error",
        )
    })?;
    Ok(format!(
        "cpa_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

async fn register(
    State(app): State<AppState>,
    enrollment: Enrollment,
    ApiJson(request): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    let registration = request
        .parse()
        .map_err(|e| ApiError::validation(e.to_string()))?;
    let address = enrollment.address;
    let (location, location_source) = match registration.location {
        Some(location) => (location, "declared"),
        None => match app.config.geoip.as_ref().and_then(|g| g.locate(address?)) {
            Some(location) => (location, "geoip"),
            None => (Default::default(), "none"),
        },
    };
    let token = new_token()?;

    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    // Serialise registrations of one host, so a new host is created once.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&registration.hostname],
    )
    .await?;
    let known = tx
        .query_opt(
            "SELECT agent_id, identity_version, token_hash, previous_token_hash,
                    coalesce(reenroll_until > now(), false) AS approved
             FROM agents WHERE hostname = $1",
            &[&registration.hostname],
        )
        .await?;
    let (agent_id, version, rotated, replaced) = match known {
        Some(row) => {
            let agent_id: String = row.get("agent_id");
            // A known host: only its agent (by its current token) or an admin's approval
            // may register it again; the enrollment token alone would hand its identity to
            // anyone who holds that shared secret.
            // The current token, or the one the last registration rotated away: an agent
            // whose re-registration committed but whose answer was lost still holds that one.
            let proven = ["token_hash", "previous_token_hash"].iter().any(|column| {
                matches!(
                    (row.get::<_, Option<String>>(*column), &enrollment.presented),
                    (Some(stored), Some(given)) if same(stored.as_bytes(), given.as_bytes())
                )
            });
            if !proven && !row.get::<_, bool>("approved") {
                drop(tx);
                let refused = ApiError::new(
                    StatusCode::CONFLICT,
                    checkplane_wire::ErrorCode::Conflict,
                    format!(
                        "{} is registered to agent {agent_id}: registering it again needs that \
                         agent's current token (X-Agent-Token) or an admin's approval \
                         (POST /v1/agents/{agent_id}/reenroll)",
                        registration.hostname
                    ),
                );
                return Err(enrollment.refuse(&app, refused).await);
            }
            (
                agent_id,
                row.get::<_, i64>("identity_version") + 1,
                true,
                row.get::<_, Option<String>>("token_hash"),
            )
        }
        None => (format!("agt-{}", Uuid::now_v7().simple()), 1, false, None),
    };
    // Counted only for a registration that would go through: refused takeovers count against
    // their address (above), never against the host, which they would lock out.
    enrollment.register(&app, &registration.hostname).await?;
    let event = Event::new(
        format!("agent:{agent_id}"),
        version,
        format!("agent:{agent_id}"),
        EventBody::AgentRegistered(Box::new(AgentRegistered {
            agent_id: agent_id.clone(),
            hostname: registration.hostname,
            token_hash: hash_secret(&token),
            labels: registration.labels,
            capabilities: registration.capabilities,
            location,
            location_source: location_source.to_owned(),
            address: address.map(|a| a.to_string()),
            agent_version: registration.agent_version,
            replaced_token_hash: replaced,
        })),
    );
    let stream = app.keys.events("agents");
    let mut written = Written::new();
    written.append(&tx, &stream, &event).await?;
    tx.commit().await?;
    drop(client);
    if rotated {
        crate::revocations::announce(&app, crate::revocations::Forget::Agent(&agent_id)).await;
        // A revoked agent's host registered again (approved): its heartbeats count again.
        // Should Redis fail here, the agent's next heartbeat is refused, it registers again
        // with this token, and this runs again.
        let (presence, id) = (&app.presence, agent_id.as_str());
        if let Err(e) = app
            .stores
            .on_shared(move |mut conn| async move { presence.reinstate(&mut conn, id).await })
            .await
        {
            tracing::warn!(%agent_id, error = %e, "could not reinstate the agent's presence");
        }
    }
    written.publish_now(&app).await;

    tracing::info!(%agent_id, rotated, "agent registered");
    let status = if rotated {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(RegisterResponse {
            agent_id,
            token,
            rotated,
            heartbeat_interval_ms: u64::try_from(app.config.heartbeat_interval.as_millis())
                .unwrap_or(u64::MAX),
        }),
    ))
}

/// A known agent's identity, read under its host's registration lock.
struct Identity {
    agent_id: String,
    hostname: String,
    version: i64,
    revoked: bool,
}

/// Find the agent an admin route names (404 for an id that is not one, or unknown), take the
/// registrations' lock of its host (identity versions of one host are taken one at a time) and
/// read its identity under it.
async fn lock_identity(
    tx: &tokio_postgres::Transaction<'_>,
    agent_id: &str,
) -> Result<Identity, ApiError> {
    let agent_id = AgentId::parse(agent_id)
        .map_err(|_| ApiError::not_found("no such agent"))?
        .as_str()
        .to_owned();
    let Some(row) = tx
        .query_opt(
            "SELECT hostname FROM agents WHERE agent_id = $1 AND hostname IS NOT NULL",
            &[&agent_id],
        )
        .await?
    else {
        return Err(ApiError::not_found("no such agent"));
    };
    let hostname: String = row.get("hostname");
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&hostname])
        .await?;
    let row = tx
        .query_one(
            "SELECT identity_version, revoked_at IS NOT NULL AS revoked
             FROM agents WHERE agent_id = $1",
            &[&agent_id],
        )
        .await?;
    Ok(Identity {
        agent_id,
        hostname,
        version: row.get("identity_version"),
        revoked: row.get("revoked"),
    })
}

/// How long an admin's approval of a host's re-enrollment lasts.
const REENROLL_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug, Serialize)]
struct ReenrollApproval {
    agent_id: String,
    hostname: String,
    /// Until when one registration of the host with the enrollment token alone is taken.
    until_ms: i64,
}

/// `POST /v1/agents/{agent_id}/reenroll` (admin): the agent's host may register once with
/// the enrollment token alone within the next hour (its agent lost its token: a wiped state
/// file, a rebuilt host). The registration keeps the agent id and rotates the token.
async fn reenroll(
    State(app): State<AppState>,
    admin: Admin,
    Path(agent_id): Path<String>,
) -> Result<Json<ReenrollApproval>, ApiError> {
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    let Identity {
        agent_id,
        hostname,
        version,
        ..
    } = lock_identity(&tx, &agent_id).await?;
    let until_ms = now_ms() + i64::try_from(REENROLL_WINDOW.as_millis()).unwrap_or(i64::MAX);
    let event = Event::new(
        format!("agent:{agent_id}"),
        version + 1,
        admin.caller.actor(),
        EventBody::AgentReenrollApproved(AgentReenrollApproved {
            agent_id: agent_id.clone(),
            hostname: hostname.clone(),
            until_ms,
        }),
    );
    let mut written = Written::new();
    written
        .append(&tx, &app.keys.events("agents"), &event)
        .await?;
    tx.commit().await?;
    drop(client);
    written.publish_now(&app).await;
    tracing::info!(%agent_id, actor = %admin.caller.actor(), "re-enrollment approved");
    Ok(Json(ReenrollApproval {
        agent_id,
        hostname,
        until_ms,
    }))
}

#[derive(Debug, Serialize)]
struct Revocation {
    agent_id: String,
    hostname: String,
    /// RFC 3339.
    revoked_at: String,
    /// Leases ended by this call (their slots' next attempts go to other agents).
    leases_recovered: u32,
}

/// `DELETE /v1/agents/{agent_id}` (admin): revoke an agent. Its token (and the previous one)
/// is void at once on every gateway, no heartbeat or claim of it counts any more (one already
/// past authentication included), its leases end now and its unclaimed tasks are taken back;
/// its host registers again only after `POST /v1/agents/{id}/reenroll`. Repeating it is
/// harmless and ends leases a failed first call left.
async fn revoke(
    State(app): State<AppState>,
    admin: Admin,
    Path(agent_id): Path<String>,
) -> Result<Json<Revocation>, ApiError> {
    let actor = admin.caller.actor();
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    let Identity {
        agent_id,
        hostname,
        version,
        revoked,
    } = lock_identity(&tx, &agent_id).await?;
    let mut written = Written::new();
    if !revoked {
        let event = Event::new(
            format!("agent:{agent_id}"),
            version + 1,
            actor.clone(),
            EventBody::AgentRevoked(AgentRevoked {
                agent_id: agent_id.clone(),
                hostname: hostname.clone(),
            }),
        );
        written
            .append(&tx, &app.keys.events("agents"), &event)
            .await?;
    }
    let revoked_at: String = tx
        .query_one(
            "SELECT cp_rfc3339(revoked_at) AS revoked_at FROM agents WHERE agent_id = $1",
            &[&agent_id],
        )
        .await?
        .get("revoked_at");
    tx.commit().await?;
    drop(client);
    crate::revocations::announce(&app, crate::revocations::Forget::Agent(&agent_id)).await;
    written.publish_now(&app).await;
    // Presence first: from here on no claim of the agent is granted, so the leases found
    // next are all it has.
    let (presence, leases, id, by) = (&app.presence, &app.leases, agent_id.as_str(), &actor);
    let recovered = app
        .stores
        .on_shared(move |mut conn| async move {
            let now = now_ms();
            presence.revoke(&mut conn, id, now, by).await?;
            leases.recover_agent(&mut conn, id, now, by).await
        })
        .await
        .map_err(|e| {
            tracing::warn!(%agent_id, error = %e, "agent revoked, its leases not recovered yet");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                checkplane_wire::ErrorCode::Unavailable,
                "the agent is revoked (its token no longer works), but Redis did not answer to \
                 end its leases now: they end at their deadline; DELETE again to end them now",
            )
        })?;
    tracing::info!(%agent_id, actor = %actor, leases = recovered, "agent revoked");
    Ok(Json(Revocation {
        agent_id,
        hostname,
        revoked_at,
        leases_recovered: recovered,
    }))
}

async fn heartbeat(
    State(app): State<AppState>,
    agent: AgentIdentity,
    // Empty, and like every other body it refuses what it does not know.
    ApiJson(_beat): ApiJson<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let interval_ms = i64::try_from(app.config.heartbeat_interval.as_millis()).unwrap_or(i64::MAX);
    let now = now_ms();
    let (presence, agent_id) = (&app.presence, agent.agent_id.as_str());
    let beat = app
        .stores
        .on_shared(move |mut conn| async move {
            presence
                .heartbeat(&mut conn, agent_id, now, interval_ms)
                .await
        })
        .await?;
    if beat.revoked {
        return Err(ApiError::unauthorized("unknown agent or wrong token"));
    }
    if beat.came_online {
        tracing::info!(agent_id = %agent.agent_id, "agent online");
    }
    let client = app.stores.pg.get().await?;
    client
        .execute(
            "INSERT INTO agent_last_seen (agent_id, last_seen) VALUES ($1, now())
             ON CONFLICT (agent_id) DO UPDATE SET last_seen = now()",
            &[&agent.agent_id.as_str()],
        )
        .await?;
    Ok(Json(HeartbeatResponse {
        next_deadline_ms: u64::try_from(interval_ms).unwrap_or(0),
    }))
}

/// Filters and page of `GET /v1/agents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    country: Option<String>,
    asn: Option<u32>,
    capability: Option<String>,
    /// `key:value`
    label: Option<String>,
    #[serde(default = "crate::paging::default_limit")]
    limit: i64,
    #[serde(default)]
    offset: i64,
}

#[derive(Debug, Serialize)]
struct AgentView {
    agent_id: String,
    hostname: Option<String>,
    status: String,
    labels: serde_json::Value,
    capabilities: serde_json::Value,
    location: serde_json::Value,
    location_source: Option<String>,
    address: Option<String>,
    agent_version: Option<String>,
    registered_at: Option<String>,
    status_changed_at: Option<String>,
    last_seen: Option<String>,
    /// Set when an admin revoked the agent (cleared by its next, approved, registration).
    revoked_at: Option<String>,
}

async fn list(
    State(app): State<AppState>,
    _viewer: Viewer,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Page<AgentView>>, ApiError> {
    check_window(q.limit, q.offset)?;
    let mut clauses: Vec<String> = Vec::new();
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut bind = |clause: &str, value: Box<dyn ToSql + Sync + Send>| {
        params.push(value);
        clauses.push(clause.replace("{}", &format!("${}", params.len())));
    };
    if let Some(status) = q.status {
        if !["registered", "online", "offline"].contains(&status.as_str()) {
            return Err(ApiError::validation(
                "status: expected registered, online or offline",
            ));
        }
        bind("status = {}", Box::new(status));
    }
    if let Some(country) = q.country {
        if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(ApiError::validation("country: expected a two-letter code"));
        }
        bind("country = {}", Box::new(country.to_ascii_uppercase()));
    }
    if let Some(asn) = q.asn {
        bind("asn = {}", Box::new(i64::from(asn)));
    }
    if let Some(kind) = q.capability {
        if kind.parse::<checkplane_wire::kinds::Kind>().is_err() {
            return Err(ApiError::validation("capability: unknown kind"));
        }
        bind("capabilities ? {}", Box::new(kind));
    }
    if let Some(label) = q.label {
        let Some((key, value)) = label.split_once(':') else {
            return Err(ApiError::validation("label: expected key:value"));
        };
        if key.len() > 63 || value.len() > 255 {
            return Err(ApiError::validation("label: too long"));
        }
        let mut one = serde_json::Map::new();
        one.insert(key.to_owned(), serde_json::Value::String(value.to_owned()));
        bind("labels @> {}", Box::new(serde_json::Value::Object(one)));
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    params.push(Box::new(q.limit));
    params.push(Box::new(q.offset));
    let sql = format!(
        "SELECT a.agent_id, hostname, status, labels, capabilities, country, city, asn, network,
                location_source, address, agent_version,
                cp_rfc3339(registered_at) AS registered_at,
                cp_rfc3339(status_changed_at) AS status_changed_at,
                cp_rfc3339(s.last_seen) AS last_seen,
                cp_rfc3339(a.revoked_at) AS revoked_at,
                count(*) OVER () AS total
         FROM agents a LEFT JOIN agent_last_seen s USING (agent_id)
         {filter}
         ORDER BY a.agent_id
         LIMIT ${} OFFSET ${}",
        params.len() - 1,
        params.len()
    );
    let client = app.stores.pg.get().await?;
    let refs: Vec<&(dyn ToSql + Sync)> =
        params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
    let rows = client.query(&sql, &refs).await?;
    let total = match rows.first() {
        Some(row) => row.get::<_, i64>("total"),
        None => {
            // Past the end: count separately so `total` is still right.
            let count_sql = format!("SELECT count(*) AS n FROM agents {filter}");
            let n = params.len() - 2;
            client.query_one(&count_sql, &refs[..n]).await?.get("n")
        }
    };
    let items: Vec<AgentView> = rows
        .iter()
        .map(|r| AgentView {
            agent_id: r.get("agent_id"),
            hostname: r.get("hostname"),
            status: r.get("status"),
            labels: r.get("labels"),
            capabilities: r.get("capabilities"),
            location: serde_json::json!({
                "country": r.get::<_, Option<String>>("country"),
                "city": r.get::<_, Option<String>>("city"),
                "asn": r.get::<_, Option<i64>>("asn"),
                "network": r.get::<_, Option<String>>("network"),
            }),
            location_source: r.get("location_source"),
            address: r.get("address"),
            agent_version: r.get("agent_version"),
            registered_at: r.get("registered_at"),
            status_changed_at: r.get("status_changed_at"),
            last_seen: r.get("last_seen"),
            revoked_at: r.get("revoked_at"),
        })
        .collect();
    Ok(Json(Page::new(items, total, q.limit, q.offset)))
}
