//! The HAProxy API: instances (register, list, remove; admin to change, viewer to read),
//! what haproxy-sync's polls found — backends, servers (observed state beside the operators'
//! desired state) and each server's state history — operators' actions on servers, and the
//! servers marked as HAProxy nodes.

mod actions;
mod instances;
mod nodes;
mod servers;

use axum::routing::get;
use axum::Router;

use crate::state::AppState;
use actions::{action, batch, request_action};
use instances::{force_sync, list, one, register, remove};
use nodes::{mark_node, node};
use servers::{backends, history, servers};

pub use actions::MAX_ACTION_WAITERS;

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

/// An id of `prefix` and 20 hex digits.
fn valid_id(prefix: &str, id: &str) -> bool {
    id.len() == prefix.len() + 20
        && id.starts_with(prefix)
        && id[prefix.len()..].bytes().all(|b| b.is_ascii_hexdigit())
}
