//! Operators' actions on servers (drain, maint, ready), one or a batch, idempotent by key,
//! and reading an action (waiting for its end when asked).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use checkplane_runtime::db::{Params, Sql};
use checkplane_runtime::http::{ApiError, ApiJson, ApiQuery};
use checkplane_wire::events::{Event, EventBody};
use checkplane_wire::haproxy::NewAction;
use serde::{Deserialize, Serialize};

use super::nodes::reachable;
use super::valid_id;
use crate::auth::Viewer;
use crate::edge::Written;
use crate::state::AppState;

/// An action as operators read it.
#[derive(Debug, Serialize)]
pub(super) struct ActionView {
    id: String,
    idempotency_key: String,
    server_id: String,
    instance_id: String,
    backend: String,
    server: String,
    action: String,
    drain_wait_ms: i64,
    status: String,
    attempts: i32,
    detail: Option<serde_json::Value>,
    error: Option<String>,
    requested_by: String,
    requested_at: String,
    updated_at: String,
}

pub(super) const ACTION_COLUMNS: &str =
    "action_id, idempotency_key, server_id, instance_id, backend, server, action,
    drain_wait_ms, status, attempts, detail, error, requested_by,
    cp_rfc3339(requested_at) AS requested_at,
    cp_rfc3339(updated_at) AS updated_at";

pub(super) fn action_view(r: &tokio_postgres::Row) -> ActionView {
    ActionView {
        id: r.get("action_id"),
        idempotency_key: r.get("idempotency_key"),
        server_id: r.get("server_id"),
        instance_id: r.get("instance_id"),
        backend: r.get("backend"),
        server: r.get("server"),
        action: r.get("action"),
        drain_wait_ms: r.get("drain_wait_ms"),
        status: r.get("status"),
        attempts: r.get("attempts"),
        detail: r.get("detail"),
        error: r.get("error"),
        requested_by: r.get("requested_by"),
        requested_at: r.get("requested_at"),
        updated_at: r.get("updated_at"),
    }
}

/// `POST /v1/haproxy/servers/{id}/action`: 202 with the action. The same idempotency key of
/// the same caller (API key) answers with the first action (and never runs twice); with
/// another body it is 422. Another caller's same key is another action.
pub(super) async fn request_action(
    State(app): State<AppState>,
    operator: crate::auth::Operator,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<checkplane_wire::haproxy::ActionRequest>,
) -> Result<(StatusCode, Json<ActionView>), ApiError> {
    let action = request
        .parse()
        .map_err(|e| ApiError::validation(e.to_string()))?;
    let view = request_one(&app, &operator.caller.actor(), &id, &action).await?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Record one action (or find the one its key made).
pub(super) async fn request_one(
    app: &AppState,
    actor: &str,
    id: &str,
    request: &NewAction,
) -> Result<ActionView, ApiError> {
    let (action, key, drain_wait_ms) = (
        request.state.as_str(),
        request.idempotency_key.as_str(),
        request.drain_wait_ms,
    );
    if !valid_id("hps-", id) {
        return Err(ApiError::not_found("no such server"));
    }
    let stream = app.keys.events("haproxy");
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    // One request per key at a time: the second waits here, then finds the first. The three
    // statements go as one pipeline: PostgreSQL runs them in order, so both reads see what was
    // committed before the lock was granted. All three are prepared first: one still to be
    // prepared on this connection would send its execution a round trip late, and the reads
    // could run before the lock.
    let lock_sql =
        "SELECT pg_advisory_xact_lock(hashtext('haproxy_action:' || $1 || chr(31) || $2))";
    let existing_sql = format!(
        "SELECT {ACTION_COLUMNS} FROM haproxy_actions WHERE requested_by = $1 AND idempotency_key = $2"
    );
    let server_sql = "SELECT s.instance_id, s.backend, s.name, i.transport, i.node
                      FROM haproxy_servers s JOIN haproxy_instances i USING (instance_id)
                      WHERE s.server_id = $1 AND s.removed_at IS NULL AND i.removed_at IS NULL";
    futures::try_join!(
        tx.prepare(lock_sql),
        tx.prepare(&existing_sql),
        tx.prepare(server_sql)
    )?;
    let (by_key, by_server): (&Params<'_>, &Params<'_>) = (&[&actor, &key], &[&id]);
    let (locked, existing, server) = futures::join!(
        tx.execute(lock_sql, by_key),
        tx.query_opt(&existing_sql, by_key),
        tx.query_opt(server_sql, by_server)
    );
    locked?;
    if let Some(row) = existing? {
        let first = action_view(&row);
        let same = first.server_id == id
            && first.action == action
            && first.drain_wait_ms == i64::try_from(drain_wait_ms).unwrap_or(-1);
        if !same {
            return Err(ApiError::validation(
                "idempotency_key: already used for another request",
            ));
        }
        return Ok(first);
    }
    let server = server?.ok_or_else(|| ApiError::not_found("no such server"))?;
    reachable(app, &*tx, server.get("transport"), server.get("node")).await?;
    let action_id = format!("hpa-{}", &uuid::Uuid::now_v7().simple().to_string()[12..32]);
    let event = Event::new(
        format!("haproxy-action:{action_id}"),
        1,
        actor.to_owned(),
        EventBody::HaproxyActionRequested(Box::new(
            checkplane_wire::events::HaproxyActionRequested {
                action_id: action_id.clone(),
                idempotency_key: key.to_owned(),
                server_id: id.to_owned(),
                instance_id: server.get("instance_id"),
                backend: server.get("backend"),
                server: server.get("name"),
                action: action.to_owned(),
                drain_wait_ms,
            },
        )),
    );
    let mut written = Written::new();
    written.append(&tx, &stream, &event).await?;
    let row = tx
        .query_one(
            &format!("SELECT {ACTION_COLUMNS} FROM haproxy_actions WHERE action_id = $1"),
            &[&action_id],
        )
        .await?;
    tx.commit().await?;
    drop(client);
    written.publish(app);
    tracing::info!(%action_id, server_id = %id, action, "HAProxy action requested");
    Ok(action_view(&row))
}

/// Most servers in one batch.
pub(super) const MAX_BATCH: usize = 500;

/// `POST /v1/haproxy/batch/action`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchRequest {
    action: String,
    idempotency_key: String,
    /// The servers, or (instead) an application group whose servers to act on.
    #[serde(default)]
    servers: Option<Vec<String>>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    drain_wait_ms: u64,
}

/// `POST /v1/haproxy/batch/action`: one action per server (key `<key>:<server>`, so the
/// batch sent again makes nothing new); the answer lists each server's action or error. They
/// run at most `HAPROXY_ACTION_PARALLELISM` at once per instance.
pub(super) async fn batch(
    State(app): State<AppState>,
    operator: crate::auth::Operator,
    ApiJson(request): ApiJson<BatchRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let one = checkplane_wire::haproxy::ActionRequest {
        action: request.action.clone(),
        idempotency_key: request.idempotency_key.clone(),
        drain_wait_ms: request.drain_wait_ms,
    };
    let action = one
        .parse()
        .map_err(|e| ApiError::validation(e.to_string()))?;
    let servers = match (request.servers, request.group) {
        (Some(servers), None) => {
            if servers.is_empty() || servers.len() > MAX_BATCH {
                return Err(ApiError::validation(format!(
                    "servers: 1-{MAX_BATCH} server ids"
                )));
            }
            let unique: std::collections::BTreeSet<&str> =
                servers.iter().map(String::as_str).collect();
            if unique.len() != servers.len() {
                return Err(ApiError::validation("servers: each server once"));
            }
            servers
        }
        (None, Some(group)) => {
            let client = app.stores.pg.get().await?;
            let servers = crate::applications::group_servers(&**client, &group, MAX_BATCH)
                .await
                .map_err(|e| {
                    if e.status == StatusCode::NOT_FOUND {
                        ApiError::validation(format!("group: no application group {group}"))
                    } else {
                        e
                    }
                })?;
            if servers.is_empty() {
                return Err(ApiError::validation(
                    "group: its applications have no servers now",
                ));
            }
            servers
        }
        _ => {
            return Err(ApiError::validation(
                "servers or group: exactly one of them",
            ))
        }
    };
    let actor = operator.caller.actor();
    let mut out = Vec::with_capacity(servers.len());
    for server in &servers {
        let one = NewAction {
            idempotency_key: format!("{}:{server}", action.idempotency_key),
            ..action.clone()
        };
        match request_one(&app, &actor, server, &one).await {
            Ok(view) => out.push(serde_json::json!({"server_id": server, "action": view})),
            Err(error) if error.status.is_client_error() => out.push(serde_json::json!({
                "server_id": server,
                "error": {"code": error.code.as_str(), "message": error.message},
            })),
            Err(error) => return Err(error),
        }
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"items": out})),
    ))
}

/// Requests waiting at once for actions to end; more are answered at once.
pub const MAX_ACTION_WAITERS: usize = 256;
/// The longest `wait_ms`.
pub(super) const MAX_ACTION_WAIT_MS: u64 = 30_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ActionQuery {
    /// Wait up to this long (ms) for the action to end (`success` or `failed`) before
    /// answering, instead of polling.
    #[serde(default)]
    wait_ms: u64,
}

/// `GET /v1/haproxy/actions/{id}[?wait_ms=N]`: the action; with `wait_ms`, once it has ended
/// or the wait is over, whichever comes first.
pub(super) async fn action(
    State(app): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ActionQuery>,
) -> Result<Json<ActionView>, ApiError> {
    if !valid_id("hpa-", &id) {
        return Err(ApiError::not_found("no such action"));
    }
    if q.wait_ms > MAX_ACTION_WAIT_MS {
        return Err(ApiError::validation(format!(
            "wait_ms: at most {MAX_ACTION_WAIT_MS}"
        )));
    }
    let read = || async {
        let client = app.stores.pg.get().await?;
        let row = client
            .query_opt(
                &format!("SELECT {ACTION_COLUMNS} FROM haproxy_actions WHERE action_id = $1"),
                &[&id],
            )
            .await?
            .ok_or_else(|| ApiError::not_found("no such action"))?;
        Ok::<_, ApiError>(action_view(&row))
    };
    let ended = |a: &ActionView| a.status == "success" || a.status == "failed";
    // Past the gateway's or the key's share of waiters, the lookup answers without waiting.
    let waiter = (q.wait_ms > 0)
        .then(|| {
            let place = app.key_waits.take(&viewer.caller.key_id)?;
            Some((place, app.action_waiters.clone().try_acquire_owned().ok()?))
        })
        .flatten();
    let Some(_waiter) = waiter else {
        return Ok(Json(read().await?));
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(q.wait_ms);
    let stream = app.keys.events("haproxy");
    let mut conn = app
        .stores
        .blocking_connection(Duration::from_millis(q.wait_ms))
        .await
        .map_err(|e| ApiError::internal(&e))?;
    // Where the stream is before the action is read: whatever ends it after that read is
    // appended after this id.
    let mut last: String = {
        let newest: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
            .arg(&stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(|e| ApiError::internal(&e))?;
        newest
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |(id, _)| id)
    };
    loop {
        let view = read().await?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if ended(&view) || left.is_zero() {
            return Ok(Json(view));
        }
        let block = u64::try_from(left.as_millis()).unwrap_or(1).max(1);
        let mut xread = redis::cmd("XREAD");
        xread
            .arg("BLOCK")
            .arg(block)
            .arg("STREAMS")
            .arg(&stream)
            .arg(&last);
        let reply: Option<redis::streams::StreamReadReply> = tokio::select! {
            _ = app.shutdown.cancelled() => return Ok(Json(view)),
            r = xread.query_async(&mut conn) => r.map_err(|e| ApiError::internal(&e))?,
        };
        match reply
            .iter()
            .flat_map(|r| r.keys.iter())
            .flat_map(|k| k.ids.iter())
            .next_back()
        {
            Some(newest) => last = newest.id.clone(),
            None => return Ok(Json(read().await?)),
        }
    }
}
