//! The HAProxy API: instances (register, list, remove; admin to change, viewer to read) and
//! what haproxy-sync's polls found — backends, servers (observed state beside the operators'
//! desired state) and each server's state history.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use checkplane_runtime::db::{Params, Sql};
use checkplane_runtime::http::{ApiError, ApiJson, ApiQuery};
use checkplane_wire::events::{
    Event, EventBody, HaproxyInstanceRegistered, HaproxyInstanceRemoved,
};
use checkplane_wire::haproxy::{NewInstance, RegisterInstance, Transport};
use checkplane_wire::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::auth::{Admin, Viewer};
use crate::edge::Written;
use crate::paging::{check_window, Page, PageQuery, RFC3339};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/haproxy/instances", get(list).post(register))
        .route("/v1/haproxy/instances/{id}", get(one).delete(remove))
        .route("/v1/haproxy/instances/{id}/backends", get(backends))
        .route(
            "/v1/haproxy/instances/{id}/sync",
            axum::routing::post(force_sync),
        )
        .route("/v1/haproxy/backends/{id}/servers", get(servers))
        .route("/v1/haproxy/servers/{id}/history", get(history))
        .route(
            "/v1/haproxy/servers/{id}/action",
            axum::routing::post(request_action),
        )
        .route("/v1/haproxy/actions/{id}", get(action))
        .route("/v1/haproxy/batch/action", axum::routing::post(batch))
        .route("/v1/servers/{id}/haproxy", get(node).put(mark_node))
}

/// A server (the host an agent runs on, by agent id) as an HAProxy node.
#[derive(Debug, Serialize)]
struct NodeView {
    id: String,
    hostname: Option<String>,
    /// Marked as an HAProxy node: instances with transport `agent` may name it.
    haproxy_node: bool,
    /// Its agent's presence (`online`, `offline`, `registered`).
    agent_status: String,
    /// Whether its agent declares the relay (kind `haproxy`, `AGENT_HAPROXY_SOCKET` set).
    relays: bool,
}

async fn node_view(
    client: &impl tokio_postgres::GenericClient,
    id: &str,
) -> Result<NodeView, ApiError> {
    if checkplane_wire::agents::AgentId::parse(id).is_err() {
        return Err(ApiError::not_found("no such server"));
    }
    let row = client
        .query_opt(
            "SELECT a.hostname, COALESCE(n.enabled, false), a.status, a.capabilities ? 'haproxy'
             FROM agents a LEFT JOIN haproxy_nodes n ON n.server_id = a.agent_id
             WHERE a.agent_id = $1",
            &[&id],
        )
        .await?
        .ok_or_else(|| {
            ApiError::not_found("no such server (servers are the hosts agents run on, by agent id)")
        })?;
    Ok(NodeView {
        id: id.to_owned(),
        hostname: row.get(0),
        haproxy_node: row.get(1),
        agent_status: row.get(2),
        relays: row.get(3),
    })
}

async fn node(
    State(app): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let client = app.stores.pg.get().await?;
    Ok(Json(node_view(&**client, &id).await?))
}

/// `PUT /v1/servers/{id}/haproxy`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkNode {
    /// `true` marks the server as an HAProxy node, `false` unmarks it.
    enabled: bool,
}

/// `PUT /v1/servers/{id}/haproxy` (admin): mark (or unmark) a server as an HAProxy node.
async fn mark_node(
    State(app): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<MarkNode>,
) -> Result<Json<NodeView>, ApiError> {
    let stream = app.keys.events("haproxy");
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('haproxy_node:' || $1))",
        &[&id],
    )
    .await?;
    let view = node_view(&*tx, &id).await?;
    if !request.enabled {
        let used = tx
            .query_opt(
                "SELECT instance_id FROM haproxy_instances WHERE node = $1 AND transport = 'agent'
                 AND removed_at IS NULL LIMIT 1",
                &[&id],
            )
            .await?;
        if let Some(row) = used {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::Conflict,
                format!(
                    "instance {} is reached through this node; remove it first",
                    row.get::<_, String>(0)
                ),
            ));
        }
    }
    let last: Option<i64> = tx
        .query_opt(
            "SELECT version FROM haproxy_nodes WHERE server_id = $1",
            &[&id],
        )
        .await?
        .map(|r| r.get(0));
    let version = checkplane_runtime::clock::now_ms().max(last.unwrap_or(0) + 1);
    let event = Event::new(
        format!("haproxy-node:{id}"),
        version,
        admin.caller.actor(),
        EventBody::HaproxyNodeMarked(checkplane_wire::events::HaproxyNodeMarked {
            server_id: id.clone(),
            hostname: view.hostname.clone().unwrap_or_default(),
            enabled: request.enabled,
        }),
    );
    let mut written = Written::new();
    written.append(&tx, &stream, &event).await?;
    let view = node_view(&*tx, &id).await?;
    tx.commit().await?;
    drop(client);
    written.publish(&app);
    tracing::info!(server_id = %id, enabled = request.enabled, "HAProxy node marked");
    Ok(Json(view))
}

/// Whether `agent` is online now (its presence in Redis, as heartbeats keep it).
async fn agent_online(app: &AppState, agent: &str) -> Result<bool, ApiError> {
    let mut conn = app.stores.redis_shared.clone();
    let presence: Option<String> = redis::cmd("HGET")
        .arg(app.keys.presence(app.keys.shard_of(agent)))
        .arg(agent)
        .query_async(&mut conn)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    Ok(presence.is_some_and(|p| p.starts_with("online:")))
}

/// Refuse commands to an instance reached through its node's agent while that agent is
/// offline.
async fn reachable(
    app: &AppState,
    client: &impl tokio_postgres::GenericClient,
    transport: &str,
    node: Option<&str>,
) -> Result<(), ApiError> {
    let (true, Some(node)) = (Transport::is_agent(transport), node) else {
        return Ok(());
    };
    let unavailable = |why: String| {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::InstanceUnavailable,
            format!("the instance is reached through the agent of node {node}, {why}"),
        ))
    };
    if !agent_online(app, node).await? {
        return unavailable("which is offline".to_owned());
    }
    let relays = client
        .query_opt(
            "SELECT capabilities ? 'haproxy' FROM agents WHERE agent_id = $1",
            &[&node],
        )
        .await?
        .is_some_and(|r| r.get::<_, bool>(0));
    if !relays {
        return unavailable(
            "which does not relay to HAProxy (its AGENT_HAPROXY_SOCKET is not set)".to_owned(),
        );
    }
    Ok(())
}

/// An action as operators read it.
#[derive(Debug, Serialize)]
struct ActionView {
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

const ACTION_COLUMNS: &str =
    "action_id, idempotency_key, server_id, instance_id, backend, server, action,
    drain_wait_ms, status, attempts, detail, error, requested_by,
    to_char(requested_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";

fn action_view(r: &tokio_postgres::Row) -> ActionView {
    ActionView {
        id: r.get(0),
        idempotency_key: r.get(1),
        server_id: r.get(2),
        instance_id: r.get(3),
        backend: r.get(4),
        server: r.get(5),
        action: r.get(6),
        drain_wait_ms: r.get(7),
        status: r.get(8),
        attempts: r.get(9),
        detail: r.get(10),
        error: r.get(11),
        requested_by: r.get(12),
        requested_at: r.get(13),
        updated_at: r.get(14),
    }
}

/// `POST /v1/haproxy/servers/{id}/action`: 202 with the action. The same idempotency key
/// answers with the first action (and never runs twice); with another body it is 422.
async fn request_action(
    State(app): State<AppState>,
    operator: crate::auth::Operator,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<checkplane_wire::haproxy::ActionRequest>,
) -> Result<(StatusCode, Json<ActionView>), ApiError> {
    request.validate().map_err(ApiError::validation)?;
    let view = request_one(
        &app,
        &operator.caller.actor(),
        &id,
        &request.action,
        &request.idempotency_key,
        request.drain_wait_ms,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Record one action (or find the one its key made).
async fn request_one(
    app: &AppState,
    actor: &str,
    id: &str,
    action: &str,
    key: &str,
    drain_wait_ms: u64,
) -> Result<ActionView, ApiError> {
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
    let lock_sql = "SELECT pg_advisory_xact_lock(hashtext('haproxy_action:' || $1))";
    let existing_sql =
        format!("SELECT {ACTION_COLUMNS} FROM haproxy_actions WHERE idempotency_key = $1");
    let server_sql = "SELECT s.instance_id, s.backend, s.name, i.transport, i.node
                      FROM haproxy_servers s JOIN haproxy_instances i USING (instance_id)
                      WHERE s.server_id = $1 AND s.removed_at IS NULL AND i.removed_at IS NULL";
    futures::try_join!(
        tx.prepare(lock_sql),
        tx.prepare(&existing_sql),
        tx.prepare(server_sql)
    )?;
    let (by_key, by_server): (&Params<'_>, &Params<'_>) = (&[&key], &[&id]);
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
    reachable(app, &*tx, server.get(3), server.get(4)).await?;
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
                instance_id: server.get(0),
                backend: server.get(1),
                server: server.get(2),
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
const MAX_BATCH: usize = 500;

/// `POST /v1/haproxy/batch/action`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
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
async fn batch(
    State(app): State<AppState>,
    operator: crate::auth::Operator,
    ApiJson(request): ApiJson<BatchRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let one = checkplane_wire::haproxy::ActionRequest {
        action: request.action.clone(),
        idempotency_key: request.idempotency_key.clone(),
        drain_wait_ms: request.drain_wait_ms,
    };
    one.validate().map_err(ApiError::validation)?;
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
        let key = format!("{}:{server}", request.idempotency_key);
        match request_one(
            &app,
            &actor,
            server,
            &request.action,
            &key,
            request.drain_wait_ms,
        )
        .await
        {
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
const MAX_ACTION_WAIT_MS: u64 = 30_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionQuery {
    /// Wait up to this long (ms) for the action to end (`success` or `failed`) before
    /// answering, instead of polling.
    #[serde(default)]
    wait_ms: u64,
}

/// `GET /v1/haproxy/actions/{id}[?wait_ms=N]`: the action; with `wait_ms`, once it has ended
/// or the wait is over, whichever comes first.
async fn action(
    State(app): State<AppState>,
    _viewer: Viewer,
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
    let waiter = (q.wait_ms > 0)
        .then(|| app.action_waiters.clone().try_acquire_owned().ok())
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

/// An instance as operators read it.
#[derive(Debug, Serialize)]
struct InstanceView {
    id: String,
    name: String,
    transport: String,
    address: String,
    node: Option<String>,
    created_at: String,
    created_by: String,
    last_poll: i64,
    last_poll_at: Option<String>,
    /// The circuit breaker as the owning haproxy-sync left it: closed, open, half_open.
    breaker: String,
}

const INSTANCE_COLUMNS: &str = "instance_id, name, transport, address, node,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), created_by, last_poll,
    to_char(last_poll_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
    COALESCE((SELECT b.state FROM haproxy_breakers b WHERE b.instance_id = haproxy_instances.instance_id), 'closed')";

fn instance(r: &tokio_postgres::Row) -> InstanceView {
    InstanceView {
        id: r.get(0),
        name: r.get(1),
        transport: r.get(2),
        address: r.get(3),
        node: r.get(4),
        created_at: r.get(5),
        created_by: r.get(6),
        last_poll: r.get(7),
        last_poll_at: r.get(8),
        breaker: r.get(9),
    }
}

fn valid_id(prefix: &str, id: &str) -> bool {
    id.len() == prefix.len() + 20
        && id.starts_with(prefix)
        && id[prefix.len()..].bytes().all(|b| b.is_ascii_hexdigit())
}

async fn register(
    State(app): State<AppState>,
    admin: Admin,
    ApiJson(request): ApiJson<RegisterInstance>,
) -> Result<(StatusCode, Json<InstanceView>), ApiError> {
    let NewInstance {
        name,
        transport,
        address,
        node,
    } = request
        .parse()
        .map_err(|e| ApiError::validation(e.to_string()))?;
    let instance_id = format!("hpi-{}", &uuid::Uuid::now_v7().simple().to_string()[12..32]);
    // The node an instance with transport `agent` is reached through.
    let through_agent = node.clone().filter(|_| transport == Transport::Agent);
    let stream = app.keys.events("haproxy");
    let event = Event::new(
        format!("haproxy:{instance_id}"),
        1,
        admin.caller.actor(),
        EventBody::HaproxyInstanceRegistered(HaproxyInstanceRegistered {
            instance_id: instance_id.clone(),
            name: name.clone(),
            transport: transport.as_str().to_owned(),
            address,
            node,
        }),
    );
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    // One live instance per name (the unique index says so too; this says it nicely).
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('haproxy_instance_names'))",
        &[],
    )
    .await?;
    let taken = tx
        .query_opt(
            "SELECT instance_id FROM haproxy_instances WHERE name = $1 AND removed_at IS NULL",
            &[&name],
        )
        .await?;
    if let Some(row) = taken {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::Conflict,
            format!("name: instance {} has it", row.get::<_, String>(0)),
        ));
    }
    if let Some(node) = through_agent.as_deref() {
        let marked = checkplane_wire::agents::AgentId::parse(node).is_ok()
            && tx
                .query_opt(
                    "SELECT 1 FROM haproxy_nodes WHERE server_id = $1 AND enabled",
                    &[&node],
                )
                .await?
                .is_some();
        if !marked {
            return Err(ApiError::validation(format!(
                "node: server {node:?} is not marked as an HAProxy node (PUT /v1/servers/{{id}}/haproxy)"
            )));
        }
    }
    let mut written = Written::new();
    written.append(&tx, &stream, &event).await?;
    let row = tx
        .query_one(
            &format!("SELECT {INSTANCE_COLUMNS} FROM haproxy_instances WHERE instance_id = $1"),
            &[&instance_id],
        )
        .await?;
    tx.commit().await?;
    drop(client);
    written.publish(&app);
    tracing::info!(%instance_id, %name, "HAProxy instance registered");
    Ok((StatusCode::CREATED, Json(instance(&row))))
}

async fn list(
    State(app): State<AppState>,
    _viewer: Viewer,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<InstanceView>>, ApiError> {
    check_window(q.limit, q.offset)?;
    let client = app.stores.pg.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {INSTANCE_COLUMNS}, count(*) OVER () FROM haproxy_instances
                 WHERE removed_at IS NULL ORDER BY name LIMIT $1 OFFSET $2"
            ),
            &[&q.limit, &q.offset],
        )
        .await?;
    let total = rows.first().map_or(0, |r| r.get(10));
    Ok(Json(Page::new(
        rows.iter().map(instance).collect(),
        total,
        q.limit,
        q.offset,
    )))
}

async fn live_instance(
    client: &impl tokio_postgres::GenericClient,
    id: &str,
) -> Result<tokio_postgres::Row, ApiError> {
    if !valid_id("hpi-", id) {
        return Err(ApiError::not_found("no such instance"));
    }
    client
        .query_opt(
            &format!("SELECT {INSTANCE_COLUMNS} FROM haproxy_instances WHERE instance_id = $1 AND removed_at IS NULL"),
            &[&id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("no such instance"))
}

async fn one(
    State(app): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    let client = app.stores.pg.get().await?;
    Ok(Json(instance(&live_instance(&**client, &id).await?)))
}

async fn remove(
    State(app): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let stream = app.keys.events("haproxy");
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    live_instance(&*tx, &id).await?;
    let event = Event::new(
        format!("haproxy:{id}"),
        2,
        admin.caller.actor(),
        EventBody::HaproxyInstanceRemoved(HaproxyInstanceRemoved {
            instance_id: id.clone(),
        }),
    );
    let mut written = Written::new();
    written.append(&tx, &stream, &event).await?;
    tx.commit().await?;
    drop(client);
    written.publish(&app);
    tracing::info!(instance_id = %id, "HAProxy instance removed");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/haproxy/instances/{id}/sync`: the owner polls it at its next round (about a
/// second), whatever the interval says.
async fn force_sync(
    State(app): State<AppState>,
    _operator: crate::auth::Operator,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let client = app.stores.pg.get().await?;
    let row = live_instance(&**client, &id).await?;
    reachable(&app, &**client, row.get(2), row.get(4)).await?;
    drop(client);
    let mut conn = app.stores.redis_shared.clone();
    let _: () = redis::cmd("SET")
        .arg(app.keys.haproxy_sync_request(&id))
        .arg(checkplane_runtime::clock::now_ms())
        .arg("EX")
        .arg(300)
        .query_async(&mut conn)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"sync_requested": true})),
    ))
}

#[derive(Debug, Serialize)]
struct BackendView {
    id: String,
    name: String,
    servers: i64,
    first_seen: String,
}

async fn backends(
    State(app): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<BackendView>>, ApiError> {
    check_window(q.limit, q.offset)?;
    let client = app.stores.pg.get().await?;
    live_instance(&**client, &id).await?;
    let rows = client
        .query(
            &format!(
                "SELECT b.backend_id, b.name,
                        (SELECT count(*) FROM haproxy_servers s WHERE s.backend_id = b.backend_id AND s.removed_at IS NULL),
                        to_char(b.first_seen AT TIME ZONE 'UTC', {RFC3339}), count(*) OVER ()
                 FROM haproxy_backends b WHERE b.instance_id = $1 ORDER BY b.name LIMIT $2 OFFSET $3"
            ),
            &[&id, &q.limit, &q.offset],
        )
        .await?;
    let total = rows.first().map_or(0, |r| r.get(4));
    let items = rows
        .iter()
        .map(|r| BackendView {
            id: r.get(0),
            name: r.get(1),
            servers: r.get(2),
            first_seen: r.get(3),
        })
        .collect();
    Ok(Json(Page::new(items, total, q.limit, q.offset)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServersQuery {
    #[serde(default = "crate::paging::default_limit")]
    limit: i64,
    #[serde(default)]
    offset: i64,
    /// Also the servers two polls no longer saw.
    #[serde(default)]
    include_removed: bool,
}

#[derive(Debug, Serialize)]
struct ServerView {
    id: String,
    backend: String,
    name: String,
    observed: serde_json::Value,
    desired: serde_json::Value,
    removed_at: Option<String>,
    /// The applications it belongs to (by IP:port or by name).
    applications: serde_json::Value,
    /// Observed off its desired state for longer than one poll.
    drift: bool,
}

async fn servers(
    State(app): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ServersQuery>,
) -> Result<Json<Page<ServerView>>, ApiError> {
    check_window(q.limit, q.offset)?;
    if !valid_id("hpb-", &id) {
        return Err(ApiError::not_found("no such backend"));
    }
    let client = app.stores.pg.get().await?;
    let known = client
        .query_opt(
            "SELECT 1 FROM haproxy_backends WHERE backend_id = $1",
            &[&id],
        )
        .await?;
    if known.is_none() {
        return Err(ApiError::not_found("no such backend"));
    }
    let rows = client
        .query(
            &format!(
                "SELECT server_id, backend, name, address, port, weight, op_state, admin_state, admin_bits,
                        status, check_status, scur, observed_poll,
                        to_char(observed_at AT TIME ZONE 'UTC', {RFC3339}),
                        desired_state, desired_by, to_char(desired_at AT TIME ZONE 'UTC', {RFC3339}),
                        to_char(removed_at AT TIME ZONE 'UTC', {RFC3339}), count(*) OVER (),
                        (SELECT json_agg(json_build_object('id', l.application_id, 'name', l.application,
                                                           'matched_by', l.matched_by) ORDER BY l.application)
                         FROM haproxy_server_applications l WHERE l.server_id = s.server_id),
                        s.desired_state IS NOT NULL AND s.removed_at IS NULL
                          AND s.admin_state IS DISTINCT FROM s.desired_state
                          AND EXISTS (SELECT 1 FROM haproxy_drift d
                                      WHERE d.server_id = s.server_id AND d.last_poll > d.since_poll)
                 FROM haproxy_servers s WHERE backend_id = $1 AND ($4 OR removed_at IS NULL)
                 ORDER BY name LIMIT $2 OFFSET $3"
            ),
            &[&id, &q.limit, &q.offset, &q.include_removed],
        )
        .await?;
    let total = rows.first().map_or(0, |r| r.get(18));
    let items = rows
        .iter()
        .map(|r| ServerView {
            id: r.get(0),
            backend: r.get(1),
            name: r.get(2),
            observed: serde_json::json!({
                "address": r.get::<_, Option<String>>(3), "port": r.get::<_, Option<i32>>(4),
                "weight": r.get::<_, Option<i32>>(5), "op_state": r.get::<_, Option<String>>(6),
                "admin_state": r.get::<_, Option<String>>(7), "admin_bits": r.get::<_, Option<i32>>(8),
                "status": r.get::<_, Option<String>>(9), "check_status": r.get::<_, Option<String>>(10),
                "scur": r.get::<_, Option<i64>>(11), "poll": r.get::<_, i64>(12),
                "at": r.get::<_, Option<String>>(13),
            }),
            desired: serde_json::json!({
                "state": r.get::<_, Option<String>>(14), "by": r.get::<_, Option<String>>(15),
                "at": r.get::<_, Option<String>>(16),
            }),
            removed_at: r.get(17),
            applications: r
                .get::<_, Option<serde_json::Value>>(19)
                .unwrap_or_else(|| serde_json::json!([])),
            drift: r.get(20),
        })
        .collect();
    Ok(Json(Page::new(items, total, q.limit, q.offset)))
}

#[derive(Debug, Serialize)]
struct HistoryView {
    at: String,
    previous_state: Option<String>,
    new_state: String,
    previous_status: Option<String>,
    new_status: Option<String>,
    changed_by: String,
    poll: i64,
    /// For a failed action (`changed_by` is its id): the state it asked for, and HAProxy's
    /// refusal; the state did not change.
    #[serde(skip_serializing_if = "Option::is_none")]
    failed_action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn history(
    State(app): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<HistoryView>>, ApiError> {
    check_window(q.limit, q.offset)?;
    if !valid_id("hps-", &id) {
        return Err(ApiError::not_found("no such server"));
    }
    let client = app.stores.pg.get().await?;
    let known = client
        .query_opt("SELECT 1 FROM haproxy_servers WHERE server_id = $1", &[&id])
        .await?;
    if known.is_none() {
        return Err(ApiError::not_found("no such server"));
    }
    let rows = client
        .query(
            &format!(
                "SELECT to_char(occurred_at AT TIME ZONE 'UTC', {RFC3339}), previous_state, new_state,
                        previous_status, new_status, changed_by, poll, count(*) OVER (), action, error
                 FROM haproxy_server_status_history WHERE server_id = $1
                 ORDER BY occurred_at, poll LIMIT $2 OFFSET $3"
            ),
            &[&id, &q.limit, &q.offset],
        )
        .await?;
    let total = rows.first().map_or(0, |r| r.get(7));
    let items = rows
        .iter()
        .map(|r| HistoryView {
            at: r.get(0),
            previous_state: r.get(1),
            new_state: r.get(2),
            previous_status: r.get(3),
            new_status: r.get(4),
            changed_by: r.get(5),
            poll: r.get(6),
            failed_action: r.get(8),
            error: r.get(9),
        })
        .collect();
    Ok(Json(Page::new(items, total, q.limit, q.offset)))
}
