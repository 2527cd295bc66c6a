//! Servers (the hosts agents run on) marked as HAProxy nodes, and whether a node's agent
//! is there to relay commands.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use checkplane_runtime::db::Sql;
use checkplane_runtime::http::{ApiError, ApiJson};
use checkplane_wire::events::{Event, EventBody};
use checkplane_wire::haproxy::Transport;
use checkplane_wire::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::auth::{Admin, Viewer};
use crate::edge::Written;
use crate::state::AppState;

/// A server (the host an agent runs on, by agent id) as an HAProxy node.
#[derive(Debug, Serialize)]
pub(super) struct NodeView {
    id: String,
    hostname: Option<String>,
    /// Marked as an HAProxy node: instances with transport `agent` may name it.
    haproxy_node: bool,
    /// Its agent's presence (`online`, `offline`, `registered`).
    agent_status: String,
    /// Whether its agent declares the relay (kind `haproxy`, `AGENT_HAPROXY_SOCKET` set).
    relays: bool,
}

pub(super) async fn node_view(
    client: &impl tokio_postgres::GenericClient,
    id: &str,
) -> Result<NodeView, ApiError> {
    if checkplane_wire::agents::AgentId::parse(id).is_err() {
        return Err(ApiError::not_found("no such server"));
    }
    let row = client
        .query_opt(
            "SELECT a.hostname, COALESCE(n.enabled, false) AS enabled, a.status,
                    a.capabilities ? 'haproxy' AS relays
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
        hostname: row.get("hostname"),
        haproxy_node: row.get("enabled"),
        agent_status: row.get("status"),
        relays: row.get("relays"),
    })
}

pub(super) async fn node(
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
pub(super) struct MarkNode {
    /// `true` marks the server as an HAProxy node, `false` unmarks it.
    enabled: bool,
}

/// `PUT /v1/servers/{id}/haproxy` (admin): mark (or unmark) a server as an HAProxy node.
pub(super) async fn mark_node(
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
                    row.get::<_, String>("instance_id")
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
        .map(|r| r.get("version"));
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
pub(super) async fn agent_online(app: &AppState, agent: &str) -> Result<bool, ApiError> {
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
pub(super) async fn reachable(
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
            "SELECT capabilities ? 'haproxy' AS relays FROM agents WHERE agent_id = $1",
            &[&node],
        )
        .await?
        .is_some_and(|r| r.get::<_, bool>("relays"));
    if !relays {
        return unavailable(
            "which does not relay to HAProxy (its AGENT_HAPROXY_SOCKET is not set)".to_owned(),
        );
    }
    Ok(())
}
