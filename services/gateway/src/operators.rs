//! Operator API keys (made, listed, revoked; by admins over the API or with `gateway keys` on
//! the command line) and the audit log of operator actions.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use base64::Engine;
use checkplane_runtime::http::{ApiError, ApiJson, ApiQuery, BodyLimit};
use checkplane_wire::events::{Event, EventBody, KeyCreated, KeyRevoked};
use checkplane_wire::operators::{
    valid_key_id, AuditEntry, CreateKeyRequest, CreatedKey, KeyView, NewKey, Role,
};
use serde::Deserialize;
use tokio_postgres::types::ToSql;

use crate::auth::{hash_secret, Admin};
use crate::edge::Written;
use crate::paging::{check_millis, check_window, Page};
use crate::state::AppState;

/// Most keys listed by `GET /v1/keys` (keys are few; this bounds the answer).
const LIST_MAX: i64 = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/keys",
            get(list_keys).post(create).layer(BodyLimit(4 * 1024)),
        )
        .route("/v1/keys/{key_id}", delete(revoke))
        .route("/v1/audit", get(audit))
}

/// Why a key command failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no randomness: {0}")]
    Random(getrandom::Error),
    #[error("database")]
    Db(#[from] tokio_postgres::Error),
    #[error("applying the event")]
    Apply(#[from] checkplane_core::projection::ApplyError),
    #[error("no such key")]
    NotFound,
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::NotFound => ApiError::not_found("no such key"),
            KeyError::Db(e) => e.into(),
            other => ApiError::internal(&other),
        }
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(KeyError::Random)?;
    Ok(bytes)
}

fn admin_event(aggregate_id: String, actor: &str, body: EventBody) -> Event {
    Event::new(aggregate_id, 1, actor.to_owned(), body)
}

/// Make a key: `key.created` recorded, applied and put in the outbox in one transaction. The
/// caller publishes the event after this returns (or leaves it to the scheduler's sweep).
pub async fn create_key(
    client: &mut tokio_postgres::Client,
    stream: &str,
    name: &str,
    role: Role,
    actor: &str,
) -> Result<(CreatedKey, Written), KeyError> {
    let tx = client.transaction().await?;
    let key_id = loop {
        let id: String = random_bytes::<6>()?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let taken = tx
            .query_opt("SELECT 1 FROM api_keys WHERE key_id = $1", &[&id])
            .await?;
        if taken.is_none() {
            break id;
        }
    };
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>()?);
    let key = format!("cpk_{key_id}_{secret}");
    let event = admin_event(
        format!("key:{key_id}"),
        actor,
        EventBody::KeyCreated(KeyCreated {
            key_id: key_id.clone(),
            name: name.to_owned(),
            role: role.as_str().to_owned(),
            key_hash: hash_secret(&key),
        }),
    );
    let mut written = Written::new();
    written.record(&tx, stream, &event).await?;
    tx.commit().await?;
    tracing::info!(%key_id, name, %role, actor, "API key created");
    Ok((
        CreatedKey {
            key_id,
            name: name.to_owned(),
            role,
            key,
        },
        written,
    ))
}

/// Revoke a key; `None` when it was revoked already (nothing recorded then).
pub async fn revoke_key(
    client: &mut tokio_postgres::Client,
    stream: &str,
    key_id: &str,
    actor: &str,
) -> Result<Option<Written>, KeyError> {
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT revoked_at IS NOT NULL AS revoked FROM api_keys WHERE key_id = $1 FOR UPDATE",
            &[&key_id],
        )
        .await?
        .ok_or(KeyError::NotFound)?;
    if row.get::<_, bool>("revoked") {
        return Ok(None);
    }
    let event = admin_event(
        format!("key:{key_id}"),
        actor,
        EventBody::KeyRevoked(KeyRevoked {
            key_id: key_id.to_owned(),
        }),
    );
    let mut written = Written::new();
    written.record(&tx, stream, &event).await?;
    tx.commit().await?;
    tracing::info!(%key_id, actor, "API key revoked");
    Ok(Some(written))
}

/// Every key, newest first (never the keys themselves).
pub async fn list(client: &tokio_postgres::Client) -> Result<Vec<KeyView>, KeyError> {
    let rows = client
        .query(
            &"SELECT key_id, name, role,
                        cp_rfc3339(created_at) AS created_at, created_by,
                        cp_rfc3339(revoked_at) AS revoked_at, revoked_by
                 FROM api_keys ORDER BY api_keys.created_at DESC, key_id LIMIT $1"
                .to_string(),
            &[&LIST_MAX],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| KeyView {
            key_id: r.get("key_id"),
            name: r.get("name"),
            role: Role::parse(r.get::<_, &str>("role")).unwrap_or(Role::Viewer),
            created_at: r.get("created_at"),
            created_by: r.get("created_by"),
            revoked_at: r.get("revoked_at"),
            revoked_by: r.get("revoked_by"),
        })
        .collect())
}

async fn create(
    State(app): State<AppState>,
    admin: Admin,
    ApiJson(request): ApiJson<CreateKeyRequest>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let NewKey { name, role } = request
        .parse()
        .map_err(|e| ApiError::validation(e.to_string()))?;
    let stream = app.keys.events("admin");
    let mut client = app.stores.pg.get().await?;
    let (created, written) =
        create_key(&mut client, &stream, &name, role, &admin.caller.actor()).await?;
    drop(client);
    written.publish_now(&app).await;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn list_keys(
    State(app): State<AppState>,
    _admin: Admin,
) -> Result<Json<serde_json::Value>, ApiError> {
    let client = app.stores.pg.get().await?;
    let keys = list(&client).await?;
    Ok(Json(serde_json::json!({ "items": keys })))
}

async fn revoke(
    State(app): State<AppState>,
    admin: Admin,
    Path(key_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !valid_key_id(&key_id) {
        return Err(ApiError::not_found("no such key"));
    }
    let stream = app.keys.events("admin");
    let mut client = app.stores.pg.get().await?;
    let written = revoke_key(&mut client, &stream, &key_id, &admin.caller.actor()).await?;
    drop(client);
    crate::revocations::announce(&app, crate::revocations::Forget::Key(&key_id)).await;
    if let Some(written) = written {
        written.publish_now(&app).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Filters and page of `GET /v1/audit`; `since`/`until` are milliseconds since the epoch
/// (`since` inclusive, `until` exclusive).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    action: Option<String>,
    actor: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
    #[serde(default = "crate::paging::default_limit")]
    limit: i64,
    #[serde(default)]
    offset: i64,
}

fn printable(value: &str, max: usize) -> bool {
    !value.is_empty() && value.len() <= max && value.bytes().all(|b| b.is_ascii_graphic())
}

async fn audit(
    State(app): State<AppState>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<Page<AuditEntry>>, ApiError> {
    check_window(q.limit, q.offset)?;
    check_millis("since", q.since)?;
    check_millis("until", q.until)?;
    let mut clauses: Vec<String> = Vec::new();
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut bind = |clause: &str, value: Box<dyn ToSql + Sync + Send>| {
        params.push(value);
        clauses.push(clause.replace("{}", &format!("${}", params.len())));
    };
    if let Some(action) = q.action {
        if !printable(&action, 64) {
            return Err(ApiError::validation("action: 1-64 printable characters"));
        }
        bind("action = {}", Box::new(action));
    }
    if let Some(actor) = q.actor {
        if !printable(&actor, 128) {
            return Err(ApiError::validation("actor: 1-128 printable characters"));
        }
        bind("actor = {}", Box::new(actor));
    }
    let millis = "cp_at_ms({}::bigint)";
    if let Some(since) = q.since {
        bind(&format!("occurred_at >= {millis}"), Box::new(since));
    }
    if let Some(until) = q.until {
        bind(&format!("occurred_at < {millis}"), Box::new(until));
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let n_filters = params.len();
    params.push(Box::new(q.limit));
    params.push(Box::new(q.offset));
    let sql = format!(
        "SELECT event_id::text, cp_rfc3339(occurred_at) AS occurred_at, actor,
                action, object, details
         FROM audit_log {filter}
         ORDER BY audit_log.occurred_at DESC, event_id DESC
         LIMIT ${} OFFSET ${}",
        n_filters + 1,
        n_filters + 2
    );
    let client = app.stores.pg.get().await?;
    let refs: Vec<&(dyn ToSql + Sync)> =
        params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
    let rows = client.query(&sql, &refs).await?;
    let total: i64 = client
        .query_one(
            &format!("SELECT count(*) AS n FROM audit_log {filter}"),
            &refs[..n_filters],
        )
        .await?
        .get("n");
    let items: Vec<AuditEntry> = rows
        .iter()
        .map(|r| AuditEntry {
            event_id: r.get("event_id"),
            occurred_at: r.get("occurred_at"),
            actor: r.get("actor"),
            action: r.get("action"),
            object: r.get("object"),
            details: r.get("details"),
        })
        .collect();
    Ok(Json(Page::new(items, total, q.limit, q.offset)))
}
