//! HAProxy instances: registered, listed, removed, and a sync forced.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use checkplane_runtime::db::Sql;
use checkplane_runtime::http::{ApiError, ApiJson, ApiQuery};
use checkplane_wire::events::{
    Event, EventBody, HaproxyInstanceRegistered, HaproxyInstanceRemoved,
};
use checkplane_wire::haproxy::{NewInstance, RegisterInstance, Transport};
use checkplane_wire::ErrorCode;
use serde::Serialize;

use super::nodes::reachable;
use super::valid_id;
use crate::auth::{Admin, Viewer};
use crate::edge::Written;
use crate::paging::{check_window, Page, PageQuery};
use crate::state::AppState;

/// An instance as operators read it.
#[derive(Debug, Serialize)]
pub(super) struct InstanceView {
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

pub(super) const INSTANCE_COLUMNS: &str = "instance_id, name, transport, address, node,
    cp_rfc3339(created_at) AS created_at, created_by, last_poll,
    cp_rfc3339(last_poll_at) AS last_poll_at,
    COALESCE((SELECT b.state FROM haproxy_breakers b WHERE b.instance_id = haproxy_instances.instance_id), 'closed')
        AS breaker";

pub(super) fn instance(r: &tokio_postgres::Row) -> InstanceView {
    InstanceView {
        id: r.get("instance_id"),
        name: r.get("name"),
        transport: r.get("transport"),
        address: r.get("address"),
        node: r.get("node"),
        created_at: r.get("created_at"),
        created_by: r.get("created_by"),
        last_poll: r.get("last_poll"),
        last_poll_at: r.get("last_poll_at"),
        breaker: r.get("breaker"),
    }
}

pub(super) async fn register(
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
    if transport == Transport::Direct {
        app.config
            .haproxy_allowed
            .permits(&address)
            .map_err(|why| ApiError::validation(why.to_string()))?;
    }
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
            format!(
                "name: instance {} has it",
                row.get::<_, String>("instance_id")
            ),
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

pub(super) async fn list(
    State(app): State<AppState>,
    _viewer: Viewer,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<InstanceView>>, ApiError> {
    check_window(q.limit, q.offset)?;
    let client = app.stores.pg.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {INSTANCE_COLUMNS}, count(*) OVER () AS total FROM haproxy_instances
                 WHERE removed_at IS NULL ORDER BY name LIMIT $1 OFFSET $2"
            ),
            &[&q.limit, &q.offset],
        )
        .await?;
    let total = rows.first().map_or(0, |r| r.get("total"));
    Ok(Json(Page::new(
        rows.iter().map(instance).collect(),
        total,
        q.limit,
        q.offset,
    )))
}

pub(super) async fn live_instance(
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

pub(super) async fn one(
    State(app): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Json<InstanceView>, ApiError> {
    let client = app.stores.pg.get().await?;
    Ok(Json(instance(&live_instance(&**client, &id).await?)))
}

pub(super) async fn remove(
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
pub(super) async fn force_sync(
    State(app): State<AppState>,
    _operator: crate::auth::Operator,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let client = app.stores.pg.get().await?;
    let row = live_instance(&**client, &id).await?;
    reachable(&app, &**client, row.get("transport"), row.get("node")).await?;
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
