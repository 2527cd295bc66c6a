//! What the polls found: an instance's backends, a backend's servers, a server's history.

use axum::extract::{Path, State};
use axum::Json;
use checkplane_runtime::db::Sql;
use checkplane_runtime::http::{ApiError, ApiQuery};
use serde::{Deserialize, Serialize};

use super::instances::live_instance;
use super::valid_id;
use crate::auth::Viewer;
use crate::paging::{check_window, Page, PageQuery};
use crate::state::AppState;

#[derive(Debug, Serialize)]
pub(super) struct BackendView {
    id: String,
    name: String,
    servers: i64,
    first_seen: String,
}

pub(super) async fn backends(
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
            "SELECT b.backend_id, b.name,
                        (SELECT count(*) FROM haproxy_servers s WHERE s.backend_id = b.backend_id AND s.removed_at IS NULL) AS servers,
                        cp_rfc3339(b.first_seen) AS first_seen, count(*) OVER () AS total
                 FROM haproxy_backends b WHERE b.instance_id = $1 ORDER BY b.name LIMIT $2 OFFSET $3",
            &[&id, &q.limit, &q.offset],
        )
        .await?;
    let total = rows.first().map_or(0, |r| r.get("total"));
    let items = rows
        .iter()
        .map(|r| BackendView {
            id: r.get("backend_id"),
            name: r.get("name"),
            servers: r.get("servers"),
            first_seen: r.get("first_seen"),
        })
        .collect();
    Ok(Json(Page::new(items, total, q.limit, q.offset)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServersQuery {
    #[serde(default = "crate::paging::default_limit")]
    limit: i64,
    #[serde(default)]
    offset: i64,
    /// Also the servers two polls no longer saw.
    #[serde(default)]
    include_removed: bool,
}

#[derive(Debug, Serialize)]
pub(super) struct ServerView {
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

pub(super) async fn servers(
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
            "SELECT server_id, backend, name, address, port, weight, op_state, admin_state, admin_bits,
                        status, check_status, scur, observed_poll,
                        cp_rfc3339(observed_at) AS observed_at,
                        desired_state, desired_by, cp_rfc3339(desired_at) AS desired_at,
                        cp_rfc3339(removed_at) AS removed_at, count(*) OVER () AS total,
                        (SELECT json_agg(json_build_object('id', l.application_id, 'name', l.application,
                                                           'matched_by', l.matched_by) ORDER BY l.application)
                         FROM haproxy_server_applications l WHERE l.server_id = s.server_id)
                            AS applications,
                        s.desired_state IS NOT NULL AND s.removed_at IS NULL
                          AND s.admin_state IS DISTINCT FROM s.desired_state
                          AND EXISTS (SELECT 1 FROM haproxy_drift d
                                      WHERE d.server_id = s.server_id AND d.last_poll > d.since_poll)
                            AS drift
                 FROM haproxy_servers s WHERE backend_id = $1 AND ($4 OR removed_at IS NULL)
                 ORDER BY name LIMIT $2 OFFSET $3",
            &[&id, &q.limit, &q.offset, &q.include_removed],
        )
        .await?;
    let total = rows.first().map_or(0, |r| r.get("total"));
    let items = rows
        .iter()
        .map(|r| ServerView {
            id: r.get("server_id"),
            backend: r.get("backend"),
            name: r.get("name"),
            observed: serde_json::json!({
                "address": r.get::<_, Option<String>>("address"), "port": r.get::<_, Option<i32>>("port"),
                "weight": r.get::<_, Option<i32>>("weight"), "op_state": r.get::<_, Option<String>>("op_state"),
                "admin_state": r.get::<_, Option<String>>("admin_state"), "admin_bits": r.get::<_, Option<i32>>("admin_bits"),
                "status": r.get::<_, Option<String>>("status"), "check_status": r.get::<_, Option<String>>("check_status"),
                "scur": r.get::<_, Option<i64>>("scur"), "poll": r.get::<_, i64>("observed_poll"),
                "at": r.get::<_, Option<String>>("observed_at"),
            }),
            desired: serde_json::json!({
                "state": r.get::<_, Option<String>>("desired_state"), "by": r.get::<_, Option<String>>("desired_by"),
                "at": r.get::<_, Option<String>>("desired_at"),
            }),
            removed_at: r.get("removed_at"),
            applications: r
                .get::<_, Option<serde_json::Value>>("applications")
                .unwrap_or_else(|| serde_json::json!([])),
            drift: r.get("drift"),
        })
        .collect();
    Ok(Json(Page::new(items, total, q.limit, q.offset)))
}

#[derive(Debug, Serialize)]
pub(super) struct HistoryView {
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

pub(super) async fn history(
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
            "SELECT cp_rfc3339(occurred_at) AS occurred_at, previous_state, new_state,
                        previous_status, new_status, changed_by, poll, count(*) OVER () AS total, action, error
                 FROM haproxy_server_status_history WHERE server_id = $1
                 ORDER BY haproxy_server_status_history.occurred_at, poll LIMIT $2 OFFSET $3",
            &[&id, &q.limit, &q.offset],
        )
        .await?;
    let total = rows.first().map_or(0, |r| r.get("total"));
    let items = rows
        .iter()
        .map(|r| HistoryView {
            at: r.get("occurred_at"),
            previous_state: r.get("previous_state"),
            new_state: r.get("new_state"),
            previous_status: r.get("previous_status"),
            new_status: r.get("new_status"),
            changed_by: r.get("changed_by"),
            poll: r.get("poll"),
            failed_action: r.get("action"),
            error: r.get("error"),
        })
        .collect();
    Ok(Json(Page::new(items, total, q.limit, q.offset)))
}
