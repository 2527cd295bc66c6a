//! Applications and application groups: created by admins, read by viewers. An HAProxy
//! server belongs to an application by IP:port when the application has a port (one of its
//! addresses and that port), else by its name `{hostname}_{app_name}_{instance}`; the link
//! comes from what identifies the server, never its backend, so it survives a backend
//! rename (view `haproxy_server_applications`). A group is what a batch action can name.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use checkplane_runtime::http::{ApiError, ApiJson, ApiQuery};
use checkplane_wire::events::{ApplicationCreated, ApplicationGroupCreated, Event, EventBody};
use checkplane_wire::haproxy::{CreateApplication, CreateGroup, NewApplication, NewGroup};
use checkplane_wire::ErrorCode;
use serde::Serialize;

use crate::auth::{Admin, Viewer};
use crate::edge::Written;
use crate::paging::PageQuery;
use crate::paging::{check_window, Page};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/applications",
            get(list_applications).post(create_application),
        )
        .route("/v1/applications/{id}/servers", get(application_servers))
        .route(
            "/v1/application-groups",
            get(list_groups).post(create_group),
        )
}

fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::now_v7().simple().to_string()[12..32]
    )
}

fn valid_id(prefix: &str, id: &str) -> bool {
    id.len() == prefix.len() + 20
        && id.starts_with(prefix)
        && id[prefix.len()..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, Serialize)]
struct ApplicationView {
    id: String,
    name: String,
    port: Option<i32>,
    addresses: Vec<String>,
    /// `address` (IP:port) or `name` (the name template).
    linked_by: &'static str,
    /// Live servers linked to it now.
    servers: i64,
    created_at: String,
    created_by: String,
}

const APPLICATION_COLUMNS: &str = "a.application_id, a.name, a.port, a.addresses,
    (SELECT count(*) FROM haproxy_server_applications l JOIN haproxy_servers s USING (server_id)
     WHERE l.application_id = a.application_id AND s.removed_at IS NULL) AS servers,
    cp_rfc3339(a.created_at) AS created_at, a.created_by";

fn application(r: &tokio_postgres::Row) -> ApplicationView {
    let port: Option<i32> = r.get("port");
    ApplicationView {
        id: r.get("application_id"),
        name: r.get("name"),
        port,
        addresses: r.get("addresses"),
        linked_by: if port.is_some() { "address" } else { "name" },
        servers: r.get("servers"),
        created_at: r.get("created_at"),
        created_by: r.get("created_by"),
    }
}

fn name_taken(what: &str, id: String) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        ErrorCode::Conflict,
        format!("name: {what} {id} has it"),
    )
}

async fn create_application(
    State(app): State<AppState>,
    admin: Admin,
    ApiJson(request): ApiJson<CreateApplication>,
) -> Result<(StatusCode, Json<ApplicationView>), ApiError> {
    let NewApplication {
        name,
        port,
        addresses,
    } = request
        .parse()
        .map_err(|e| ApiError::validation(e.to_string()))?;
    let id = new_id("app-");
    let stream = app.keys.events("haproxy");
    let event = Event::new(
        format!("application:{id}"),
        1,
        admin.caller.actor(),
        EventBody::ApplicationCreated(ApplicationCreated {
            application_id: id.clone(),
            name: name.clone(),
            port,
            addresses,
        }),
    );
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('application_names'))",
        &[],
    )
    .await?;
    if let Some(row) = tx
        .query_opt(
            "SELECT application_id FROM applications WHERE name = $1",
            &[&name],
        )
        .await?
    {
        return Err(name_taken("application", row.get("application_id")));
    }
    let mut written = Written::new();
    written.append(&tx, &stream, &event).await?;
    let row = tx
        .query_one(
            &format!(
                "SELECT {APPLICATION_COLUMNS} FROM applications a WHERE a.application_id = $1"
            ),
            &[&id],
        )
        .await?;
    tx.commit().await?;
    drop(client);
    written.publish(&app);
    tracing::info!(application_id = %id, %name, "application created");
    Ok((StatusCode::CREATED, Json(application(&row))))
}

async fn list_applications(
    State(app): State<AppState>,
    _viewer: Viewer,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<ApplicationView>>, ApiError> {
    check_window(q.limit, q.offset)?;
    let client = app.stores.pg.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {APPLICATION_COLUMNS}, count(*) OVER () AS total FROM applications a
                 ORDER BY a.name LIMIT $1 OFFSET $2"
            ),
            &[&q.limit, &q.offset],
        )
        .await?;
    let total = rows.first().map_or(0, |r| r.get("total"));
    Ok(Json(Page::new(
        rows.iter().map(application).collect(),
        total,
        q.limit,
        q.offset,
    )))
}

#[derive(Debug, Serialize)]
struct LinkedServer {
    id: String,
    instance_id: String,
    backend: String,
    name: String,
    address: Option<String>,
    port: Option<i32>,
    admin_state: Option<String>,
    matched_by: String,
}

async fn application_servers(
    State(app): State<AppState>,
    _viewer: Viewer,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<LinkedServer>>, ApiError> {
    check_window(q.limit, q.offset)?;
    if !valid_id("app-", &id) {
        return Err(ApiError::not_found("no such application"));
    }
    let client = app.stores.pg.get().await?;
    if client
        .query_opt(
            "SELECT 1 FROM applications WHERE application_id = $1",
            &[&id],
        )
        .await?
        .is_none()
    {
        return Err(ApiError::not_found("no such application"));
    }
    let rows = client
        .query(
            "SELECT s.server_id, s.instance_id, s.backend, s.name, s.address, s.port, s.admin_state,
                    l.matched_by, count(*) OVER () AS total
             FROM haproxy_server_applications l JOIN haproxy_servers s USING (server_id)
             JOIN haproxy_instances i ON i.instance_id = s.instance_id
             WHERE l.application_id = $1 AND s.removed_at IS NULL AND i.removed_at IS NULL
             ORDER BY s.instance_id, s.backend, s.name LIMIT $2 OFFSET $3",
            &[&id, &q.limit, &q.offset],
        )
        .await?;
    let total = rows.first().map_or(0, |r| r.get("total"));
    let items = rows
        .iter()
        .map(|r| LinkedServer {
            id: r.get("server_id"),
            instance_id: r.get("instance_id"),
            backend: r.get("backend"),
            name: r.get("name"),
            address: r.get("address"),
            port: r.get("port"),
            admin_state: r.get("admin_state"),
            matched_by: r.get("matched_by"),
        })
        .collect();
    Ok(Json(Page::new(items, total, q.limit, q.offset)))
}

#[derive(Debug, Serialize)]
struct GroupView {
    id: String,
    name: String,
    applications: Vec<String>,
    created_at: String,
    created_by: String,
}

fn group_query(filter: &str) -> String {
    format!(
        "SELECT g.group_id, g.name,
                ARRAY(SELECT m.application_id FROM application_group_members m
                      WHERE m.group_id = g.group_id ORDER BY m.application_id) AS applications,
                cp_rfc3339(g.created_at) AS created_at, g.created_by, count(*) OVER () AS total
         FROM application_groups g {filter}"
    )
}

fn group(r: &tokio_postgres::Row) -> GroupView {
    GroupView {
        id: r.get("group_id"),
        name: r.get("name"),
        applications: r.get("applications"),
        created_at: r.get("created_at"),
        created_by: r.get("created_by"),
    }
}

async fn create_group(
    State(app): State<AppState>,
    admin: Admin,
    ApiJson(request): ApiJson<CreateGroup>,
) -> Result<(StatusCode, Json<GroupView>), ApiError> {
    let NewGroup { name, applications } = request
        .parse()
        .map_err(|e| ApiError::validation(e.to_string()))?;
    let id = new_id("apg-");
    let stream = app.keys.events("haproxy");
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('application_group_names'))",
        &[],
    )
    .await?;
    if let Some(row) = tx
        .query_opt(
            "SELECT group_id FROM application_groups WHERE name = $1",
            &[&name],
        )
        .await?
    {
        return Err(name_taken("group", row.get("group_id")));
    }
    let known: Vec<String> = tx
        .query(
            "SELECT application_id FROM applications WHERE application_id = ANY($1)",
            &[&applications],
        )
        .await?
        .iter()
        .map(|r| r.get("application_id"))
        .collect();
    if let Some((i, missing)) = applications
        .iter()
        .enumerate()
        .find(|(_, a)| !known.contains(a))
    {
        return Err(ApiError::validation(format!(
            "applications[{i}]: no application {missing}"
        )));
    }
    let event = Event::new(
        format!("application-group:{id}"),
        1,
        admin.caller.actor(),
        EventBody::ApplicationGroupCreated(ApplicationGroupCreated {
            group_id: id.clone(),
            name: name.clone(),
            applications,
        }),
    );
    let mut written = Written::new();
    written.append(&tx, &stream, &event).await?;
    let row = tx
        .query_one(&group_query("WHERE g.group_id = $1"), &[&id])
        .await?;
    tx.commit().await?;
    drop(client);
    written.publish(&app);
    tracing::info!(group_id = %id, %name, "application group created");
    Ok((StatusCode::CREATED, Json(group(&row))))
}

async fn list_groups(
    State(app): State<AppState>,
    _viewer: Viewer,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<GroupView>>, ApiError> {
    check_window(q.limit, q.offset)?;
    let client = app.stores.pg.get().await?;
    let rows = client
        .query(
            &group_query("ORDER BY g.name LIMIT $1 OFFSET $2"),
            &[&q.limit, &q.offset],
        )
        .await?;
    let total = rows.first().map_or(0, |r| r.get("total"));
    Ok(Json(Page::new(
        rows.iter().map(group).collect(),
        total,
        q.limit,
        q.offset,
    )))
}

/// The live servers of the applications of group `id`, at most `max`: their ids, or 404 for
/// an unknown group.
pub(crate) async fn group_servers(
    client: &impl tokio_postgres::GenericClient,
    id: &str,
    max: usize,
) -> Result<Vec<String>, ApiError> {
    if !valid_id("apg-", id) {
        return Err(ApiError::not_found("no such application group"));
    }
    if client
        .query_opt(
            "SELECT 1 FROM application_groups WHERE group_id = $1",
            &[&id],
        )
        .await?
        .is_none()
    {
        return Err(ApiError::not_found("no such application group"));
    }
    let limit = i64::try_from(max).unwrap_or(i64::MAX).saturating_add(1);
    let servers: Vec<String> = client
        .query(
            "SELECT DISTINCT s.server_id FROM application_group_members m
             JOIN haproxy_server_applications l ON l.application_id = m.application_id
             JOIN haproxy_servers s ON s.server_id = l.server_id
             JOIN haproxy_instances i ON i.instance_id = s.instance_id
             WHERE m.group_id = $1 AND s.removed_at IS NULL AND i.removed_at IS NULL
             ORDER BY s.server_id LIMIT $2",
            &[&id, &limit],
        )
        .await?
        .iter()
        .map(|r| r.get("server_id"))
        .collect();
    if servers.len() > max {
        return Err(ApiError::validation(format!(
            "group: more than {max} servers; batch a list of servers instead"
        )));
    }
    Ok(servers)
}
