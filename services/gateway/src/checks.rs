//! The checks API: create a check (select agents, record it with its slots, fan its tasks
//! out), read it with its results.

use std::collections::HashSet;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use checkplane_core::doorbell::Bell;
use checkplane_core::fanout;
use checkplane_core::leases::CloseReason;
use checkplane_core::outbox::PUBLISH_TIMEOUT;
use checkplane_core::selection::{self, candidate, choose, Candidate};
use checkplane_runtime::clock::now_ms;
use checkplane_runtime::db::Sql;
use checkplane_runtime::http::{ApiError, ApiJson, ApiQuery, BodyLimit};
use checkplane_wire::checks::task_id;
use checkplane_wire::checks::{
    CheckAccepted, CheckError, CreateCheckRequest, LocationRequest, NewCheck, Selection,
};
use checkplane_wire::events::{CheckCancelled, CheckCreated, CheckSlot, Event, EventBody};
use checkplane_wire::ErrorCode;
use serde::Serialize;
use uuid::Uuid;

use crate::auth::{Operator, Viewer};
use crate::edge::Written;
use crate::paging::{check_millis, check_window, Page};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/checks",
            post(create).get(list).layer(BodyLimit(64 * 1024)),
        )
        .route("/v1/checks/{id}", get(read))
        .route("/v1/checks/{id}/cancel", post(cancel))
        .route("/v1/checks/{id}/live", get(live))
}

fn refused(error: CheckError) -> ApiError {
    match error {
        CheckError::Invalid(message) => ApiError::validation(message),
        forbidden @ CheckError::Forbidden { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::TargetForbidden,
            forbidden.to_string(),
        ),
    }
}

/// The agents for each slot, with the `locations` entry each is for. On the pooled
/// transaction (`Sql`), so the selection is parsed once per connection, not per check.
async fn select(
    tx: &impl Sql,
    kind: &str,
    selection: &Selection,
) -> Result<Vec<(Candidate, Option<u32>)>, ApiError> {
    let mut taken = HashSet::new();
    let mut networks = HashSet::new();
    match selection {
        Selection::Anywhere(limit) => {
            let anywhere = LocationRequest::default();
            let chosen = choose(
                tx,
                kind,
                &anywhere,
                *limit as usize,
                &mut taken,
                &mut networks,
            );
            Ok(chosen.await?.into_iter().map(|c| (c, None)).collect())
        }
        Selection::Locations(entries) => {
            let mut out = Vec::new();
            for (i, entry) in entries.iter().enumerate() {
                let want = entry.limit as usize;
                let chosen = choose(tx, kind, entry, want, &mut taken, &mut networks).await?;
                out.extend(chosen.into_iter().map(|c| (c, Some(i as u32))));
            }
            Ok(out)
        }
        Selection::Reuse(previous) => {
            let exists = tx
                .query_opt("SELECT 1 FROM checks WHERE check_id = $1", &[previous])
                .await?;
            if exists.is_none() {
                return Err(ApiError::validation("reuse: no such check"));
            }
            let rows = tx
                .query(
                    "SELECT a.agent_id, a.country, a.city, a.asn, a.network
                     FROM check_slots s JOIN agents a USING (agent_id)
                     WHERE s.check_id = $1 AND a.status = 'online' AND a.revoked_at IS NULL AND a.capabilities ? $2
                     ORDER BY s.slot",
                    &[previous, &kind],
                )
                .await?;
            Ok(rows
                .iter()
                .map(candidate)
                .filter(|c| taken.insert(c.agent_id.clone()))
                .map(|c| (c, None))
                .collect())
        }
    }
}

async fn create(
    State(app): State<AppState>,
    operator: Operator,
    ApiJson(request): ApiJson<CreateCheckRequest>,
) -> Result<Response, ApiError> {
    let NewCheck { spec, selection } = request
        .parse(app.config.allow_private_targets)
        .map_err(refused)?;
    let check_id = Uuid::now_v7();
    let now = now_ms();
    let stream = app.keys.events("checks");

    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    let chosen = select(&tx, &spec.kind, &selection).await?;
    if chosen.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::NoAgents,
            format!(
                "no online agent with the {} capability matches the selection",
                spec.kind
            ),
        ));
    }
    let agent_ids: Vec<&str> = chosen.iter().map(|(c, _)| c.agent_id.as_str()).collect();
    selection::record_selected(&tx, &agent_ids).await?;
    let created = CheckCreated {
        check_id,
        kind: spec.kind.clone(),
        target: spec.target.clone(),
        options: spec.options.clone(),
        selection: serde_json::to_value(&selection).unwrap_or_default(),
        deadline: now + spec.timeout_ms,
        slots: chosen
            .into_iter()
            .enumerate()
            .map(|(slot, (c, constraint))| CheckSlot {
                slot: slot as u32,
                agent_id: c.agent_id,
                location: c.location,
                constraint,
            })
            .collect(),
        max_parallel: Some(spec.max_parallel.unwrap_or(app.config.default_max_parallel)),
    };
    let agents_count = created.slots.len() as u32;
    let event = Event::new(
        format!("check:{check_id}"),
        1,
        operator.caller.actor(),
        EventBody::CheckCreated(Box::new(created.clone())),
    );
    let mut written = Written::new();
    written.append(&tx, &stream, &event).await?;
    tx.commit().await?;
    drop(client);
    tracing::info!(%check_id, kind = %spec.kind, agents = agents_count, "check created");

    let fanned = tokio::time::timeout(
        PUBLISH_TIMEOUT,
        fanout::enqueue_check(&app.stores.redis_shared, &app.leases, &created),
    )
    .await;
    match fanned {
        // The tasks are with the agents: the answer need not wait for the event's publication
        // (the outbox row stays until it is done, and the sweep finishes it after a crash).
        Ok(Ok(())) => written.publish(&app),
        Ok(Err(error)) => {
            tracing::warn!(%check_id, %error, "fan-out left to the outbox sweep");
        }
        Err(_) => tracing::warn!(%check_id, "fan-out timed out; left to the outbox sweep"),
    }

    let mut response = (
        StatusCode::ACCEPTED,
        Json(CheckAccepted {
            id: check_id,
            agents_count,
        }),
    )
        .into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/checks/{check_id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

#[derive(Debug, Serialize)]
struct SlotView {
    slot: i32,
    attempt: i32,
    agent_id: Option<String>,
    location: serde_json::Value,
    status: String,
    outcome: Option<String>,
    result: Option<serde_json::Value>,
    seq: Option<i64>,
    started_at: Option<String>,
    done_at: Option<String>,
}

#[derive(Debug, Serialize)]
struct CheckView {
    id: Uuid,
    kind: String,
    target: String,
    options: serde_json::Value,
    selection: serde_json::Value,
    status: String,
    agents_count: i32,
    done_count: i32,
    max_parallel: Option<i32>,
    seq: i64,
    created_at: String,
    created_by: String,
    deadline: String,
    finished_at: Option<String>,
    results: Vec<SlotView>,
}

/// The longest `Prefer: wait` a read of a check honours.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `Prefer: wait=<seconds>` (RFC 7240), capped at [`MAX_WAIT`]; other preferences are
/// ignored, as the RFC says.
fn preferred_wait(headers: &HeaderMap) -> Option<std::time::Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix("wait="))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .map(|n| std::time::Duration::from_secs(n).min(MAX_WAIT))
        .next()
}

async fn check_row(
    client: &deadpool_postgres::Client,
    id: &Uuid,
) -> Result<tokio_postgres::Row, ApiError> {
    Sql::query_opt(
        client,
        "SELECT kind, target, options, selection, status, slots, slots_done, seq, revision,
                cp_rfc3339(created_at) AS created_at, created_by,
                cp_rfc3339(deadline) AS deadline,
                cp_rfc3339(finished_at) AS finished_at, max_parallel
         FROM checks WHERE check_id = $1",
        &[id],
    )
    .await?
    .ok_or_else(|| ApiError::not_found("no such check"))
}

fn not_modified(etag: &str) -> Response {
    let mut response = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(value) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

/// `GET /v1/checks/{id}` (role `viewer`). With `If-None-Match` and `Prefer: wait=N`, an
/// unchanged check that is not finished (a finished one no longer changes) is answered when
/// it changes (woken by the projector's announcement on the check's live channel, or at the
/// live poll) or after N seconds (at most 30) with a 304. The wait holds no PostgreSQL
/// connection, and waits past `GATEWAY_MAX_LIVE_STREAMS` (live streams and waiting reads
/// together) are answered at once.
async fn read(
    State(app): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("no such check"))?;
    let unchanged = |etag: &str| {
        headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    };
    let etag_of = |row: &tokio_postgres::Row| format!("\"{}\"", row.get::<_, i64>("revision"));
    let mut client = app.stores.pg.get().await?;
    // Both statements kept prepared on the connection: clients poll this.
    let mut row = check_row(&client, &id).await?;
    let mut etag = etag_of(&row);
    // `Preference-Applied` when the read did wait (RFC 7240 §3).
    let mut applied: Option<std::time::Duration> = None;
    if unchanged(&etag) {
        // A finished check does not change any more: nothing to wait for.
        let finished = row.get::<_, String>("status") == "finished";
        let waiting = preferred_wait(&headers)
            .filter(|w| !w.is_zero() && !finished)
            .and_then(|w| Some((w, LivePlace::wait(&app, &viewer.caller.key_id)?)));
        let Some((wait, _permit)) = waiting else {
            return Ok(not_modified(&etag));
        };
        drop(client);
        applied = Some(wait);
        let waited = |response: Response| Ok(preference_applied(response, wait));
        let deadline = tokio::time::Instant::now() + wait;
        let bell = app.doorbell.check_bell(&id);
        loop {
            // Listen before looking, as a live stream does.
            let rung = bell.listen();
            client = app.stores.pg.get().await?;
            row = check_row(&client, &id).await?;
            etag = etag_of(&row);
            if !unchanged(&etag) {
                break;
            }
            drop(client);
            tokio::select! {
                _ = rung => {}
                _ = tokio::time::sleep(app.config.live_poll) => {}
                _ = tokio::time::sleep_until(deadline) => return waited(not_modified(&etag)),
                _ = app.shutdown.cancelled() => return waited(not_modified(&etag)),
            }
        }
    }
    let slots = Sql::query(
        &client,
        "SELECT slot, attempt, agent_id, country, city, asn, network, status, outcome,
                        result, seq, cp_rfc3339(started_at) AS started_at,
                        cp_rfc3339(done_at) AS done_at
                 FROM check_slots WHERE check_id = $1 ORDER BY slot",
        &[&id],
    )
    .await?;
    let view = CheckView {
        id,
        kind: row.get("kind"),
        target: row.get("target"),
        // Request headers are secrets to readers: names only.
        options: checkplane_wire::checks::redacted_options(&row.get("options")),
        selection: row.get("selection"),
        status: row.get("status"),
        agents_count: row.get("slots"),
        done_count: row.get("slots_done"),
        max_parallel: row.get("max_parallel"),
        seq: row.get("seq"),
        created_at: row.get("created_at"),
        created_by: row.get("created_by"),
        deadline: row.get("deadline"),
        finished_at: row.get("finished_at"),
        results: slots
            .iter()
            .map(|r| SlotView {
                slot: r.get("slot"),
                attempt: r.get("attempt"),
                agent_id: r.get("agent_id"),
                location: serde_json::json!({
                    "country": r.get::<_, Option<String>>("country"),
                    "city": r.get::<_, Option<String>>("city"),
                    "asn": r.get::<_, Option<i64>>("asn"),
                    "network": r.get::<_, Option<String>>("network"),
                }),
                status: r.get("status"),
                outcome: r.get("outcome"),
                result: r.get("result"),
                seq: r.get("seq"),
                started_at: r.get("started_at"),
                done_at: r.get("done_at"),
            })
            .collect(),
    };
    let mut response = Json(view).into_response();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    Ok(match applied {
        Some(wait) => preference_applied(response, wait),
        None => response,
    })
}

fn preference_applied(mut response: Response, wait: std::time::Duration) -> Response {
    if let Ok(value) = HeaderValue::from_str(&format!("wait={}", wait.as_secs())) {
        response.headers_mut().insert("preference-applied", value);
    }
    response
}

/// `POST /v1/checks/{id}/cancel`: record the cancellation (audited), then close the open
/// slots so later reports are fenced; the scheduler ends whatever is left as `cancelled`.
/// A finished check is answered as it is; cancelling twice records nothing more.
async fn cancel(
    State(app): State<AppState>,
    operator: Operator,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found("no such check");
    let id = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let stream = app.keys.events("checks");
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT status, kind, cancelled_at IS NOT NULL AS cancelled FROM checks
             WHERE check_id = $1 FOR UPDATE",
            &[&id],
        )
        .await?
        .ok_or_else(not_found)?;
    let (status, kind, cancelled): (String, String, bool) =
        (row.get("status"), row.get("kind"), row.get("cancelled"));
    if status == "finished" {
        return Ok((
            StatusCode::OK,
            Json(serde_json::json!({"id": id, "status": status})),
        )
            .into_response());
    }
    let event = (!cancelled).then(|| {
        Event::new(
            format!("check:{id}"),
            now_ms(),
            operator.caller.actor(),
            EventBody::CheckCancelled(CheckCancelled { check_id: id }),
        )
    });
    let mut written = Written::new();
    if let Some(event) = &event {
        written.append(&tx, &stream, event).await?;
    }
    let open = tx
        .query(
            "SELECT slot, attempt, agent_id FROM check_slots
             WHERE check_id = $1 AND status IN ('pending', 'leased') AND agent_id IS NOT NULL",
            &[&id],
        )
        .await?;
    tx.commit().await?;
    drop(client);
    if let Some(event) = &event {
        tracing::info!(check_id = %id, actor = %event.actor, "check cancelled");
    }
    written.publish_now(&app).await;
    let closes = open.iter().map(|slot| {
        let (n, attempt, agent): (i32, i32, String) =
            (slot.get("slot"), slot.get("attempt"), slot.get("agent_id"));
        let (leases, kind) = (&app.leases, &kind);
        let mut conn = app.stores.redis_shared.clone();
        async move {
            let task = task_id(id, n as u32, attempt as u32);
            leases
                .close_task(
                    &mut conn,
                    &agent,
                    kind,
                    &task,
                    CloseReason::Cancelled,
                    now_ms(),
                )
                .await
        }
    });
    let closed = tokio::time::timeout(PUBLISH_TIMEOUT, futures::future::join_all(closes)).await;
    if closed.is_err() {
        tracing::warn!(check_id = %id, "closing the slots timed out; the scheduler finishes it");
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"id": id, "status": "cancelling"})),
    )
        .into_response())
}

/// Filters and page of `GET /v1/checks`; `since`/`until` in ms since the epoch (creation).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    kind: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
    #[serde(default = "crate::paging::default_limit")]
    limit: i64,
    #[serde(default)]
    offset: i64,
}

#[derive(Debug, Serialize)]
struct CheckSummary {
    id: Uuid,
    kind: String,
    target: String,
    status: String,
    agents_count: i32,
    done_count: i32,
    created_at: String,
    created_by: String,
    finished_at: Option<String>,
}

/// `GET /v1/checks` (role `viewer`): newest first.
async fn list(
    State(app): State<AppState>,
    _viewer: Viewer,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Page<CheckSummary>>, ApiError> {
    check_window(q.limit, q.offset)?;
    if let Some(status) = &q.status {
        if !["queued", "in_progress", "finished"].contains(&status.as_str()) {
            return Err(ApiError::validation(
                "status: expected queued, in_progress or finished",
            ));
        }
    }
    if let Some(kind) = &q.kind {
        if !kind
            .parse::<checkplane_wire::kinds::Kind>()
            .is_ok_and(checkplane_wire::kinds::Kind::is_check)
        {
            return Err(ApiError::validation("kind: unknown kind"));
        }
    }
    check_millis("since", q.since)?;
    check_millis("until", q.until)?;
    let filter = "($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR kind = $2)
        AND ($3::bigint IS NULL OR created_at >= cp_at_ms($3))
        AND ($4::bigint IS NULL OR created_at < cp_at_ms($4))";
    let client = app.stores.pg.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT check_id, kind, target, status, slots, slots_done,
                        cp_rfc3339(created_at) AS created_at, created_by,
                        cp_rfc3339(finished_at) AS finished_at
                 FROM checks WHERE {filter}
                 ORDER BY checks.created_at DESC, check_id DESC LIMIT $5 OFFSET $6"
            ),
            &[&q.status, &q.kind, &q.since, &q.until, &q.limit, &q.offset],
        )
        .await?;
    let total: i64 = client
        .query_one(
            &format!("SELECT count(*) AS n FROM checks WHERE {filter}"),
            &[&q.status, &q.kind, &q.since, &q.until],
        )
        .await?
        .get("n");
    let items: Vec<CheckSummary> = rows
        .iter()
        .map(|r| CheckSummary {
            id: r.get("check_id"),
            kind: r.get("kind"),
            target: r.get("target"),
            status: r.get("status"),
            agents_count: r.get("slots"),
            done_count: r.get("slots_done"),
            created_at: r.get("created_at"),
            created_by: r.get("created_by"),
            finished_at: r.get("finished_at"),
        })
        .collect();
    Ok(Json(Page::new(items, total, q.limit, q.offset)))
}

/// The longest a live stream stays open (a check lasts five minutes at most).
const LIVE_MAX: std::time::Duration = std::time::Duration::from_secs(600);

struct LiveState {
    app: AppState,
    id: Uuid,
    /// The last `seq` sent (or given in `Last-Event-ID`).
    last: i64,
    pending: std::collections::VecDeque<axum::response::sse::Event>,
    done: bool,
    until: tokio::time::Instant,
    /// The check's bell (rung when a projector commit moved its slots) and everyone's.
    bell: Bell,
    /// This stream's place under `GATEWAY_MAX_LIVE_STREAMS`.
    _place: LivePlace,
}

/// A live stream's (or a waiting read's) place: its key's share, the gateway's permit, and
/// the open-streams gauge while it is held.
struct LivePlace {
    _key: crate::places::Place,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl LivePlace {
    /// A place for a live stream: 429 past the key's share or the gateway's bound.
    fn take(app: &AppState, key_id: &str) -> Result<Self, ApiError> {
        let key = app.key_waits.take(key_id).ok_or_else(|| {
            ApiError::rate_limited(
                format!(
                    "this key holds {} live streams and waiting reads, the most it may; retry later",
                    app.key_waits.max()
                ),
                5,
            )
        })?;
        let permit = app.live_streams.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("checkplane_live_streams_refused_total").increment(1);
            ApiError::rate_limited("too many live streams open on this gateway; retry later", 5)
        })?;
        metrics::gauge!("checkplane_live_streams").increment(1.0);
        Ok(Self {
            _key: key,
            _permit: permit,
        })
    }

    /// A place for a read's wait, or `None` (the read answers without waiting).
    fn wait(app: &AppState, key_id: &str) -> Option<Self> {
        let key = app.key_waits.take(key_id)?;
        let permit = app.live_streams.clone().try_acquire_owned().ok()?;
        metrics::gauge!("checkplane_live_streams").increment(1.0);
        Some(Self {
            _key: key,
            _permit: permit,
        })
    }
}

impl Drop for LivePlace {
    fn drop(&mut self) {
        metrics::gauge!("checkplane_live_streams").decrement(1.0);
    }
}

/// The next results after `state.last`, and the final event once the check has finished and
/// every result was sent.
async fn live_step(state: &mut LiveState) -> Result<(), ApiError> {
    let client = state.app.stores.pg.get().await?;
    // Read the check's status first: a result committed after this read is picked up next
    // time, and `finished` is only announced when its last result has been read too.
    let check = client
        .query_one(
            "SELECT status = 'finished' AS finished, seq FROM checks WHERE check_id = $1",
            &[&state.id],
        )
        .await?;
    let (finished, seq): (bool, i64) = (check.get("finished"), check.get("seq"));
    let rows = client
        .query(
            "SELECT seq, slot, attempt, agent_id, country, city, asn, network, outcome,
                        result, cp_rfc3339(done_at) AS done_at
                 FROM check_slots WHERE check_id = $1 AND seq > $2 ORDER BY seq LIMIT 500",
            &[&state.id, &state.last],
        )
        .await?;
    for r in &rows {
        let seq: i64 = r.get("seq");
        let data = serde_json::json!({
            "seq": seq,
            "slot": r.get::<_, i32>("slot"),
            "attempt": r.get::<_, i32>("attempt"),
            "agent_id": r.get::<_, Option<String>>("agent_id"),
            "location": {
                "country": r.get::<_, Option<String>>("country"),
                "city": r.get::<_, Option<String>>("city"),
                "asn": r.get::<_, Option<i64>>("asn"),
                "network": r.get::<_, Option<String>>("network"),
            },
            "outcome": r.get::<_, Option<String>>("outcome"),
            "result": r.get::<_, Option<serde_json::Value>>("result"),
            "done_at": r.get::<_, Option<String>>("done_at"),
        });
        state.pending.push_back(
            axum::response::sse::Event::default()
                .id(seq.to_string())
                .event("result")
                .data(data.to_string()),
        );
        state.last = seq;
    }
    if finished && state.last >= seq {
        state.pending.push_back(
            axum::response::sse::Event::default()
                .event("finished")
                .data(serde_json::json!({"id": state.id, "seq": seq}).to_string()),
        );
        state.done = true;
    }
    Ok(())
}

/// `GET /v1/checks/{id}/live` (role `viewer`): Server-Sent Events, one `result` per slot as it
/// is projected (event id = the check's `seq`), then `finished`. A client reconnecting with
/// `Last-Event-ID` gets everything after it: `seq` is assigned under the check row's lock,
/// so results never become visible out of `seq` order.
async fn live(
    State(app): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found("no such check");
    let id = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let last = match headers.get("last-event-id") {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::validation("Last-Event-ID: expected a result's seq"))?,
    };
    let place = LivePlace::take(&app, &viewer.caller.key_id)?;
    {
        let client = app.stores.pg.get().await?;
        client
            .query_opt("SELECT 1 FROM checks WHERE check_id = $1", &[&id])
            .await?
            .ok_or_else(not_found)?;
    }
    let shutdown = app.shutdown.clone();
    let poll = app.config.live_poll;
    let bell = app.doorbell.check_bell(&id);
    let state = LiveState {
        app,
        id,
        last,
        pending: std::collections::VecDeque::new(),
        done: false,
        until: tokio::time::Instant::now() + LIVE_MAX,
        bell,
        _place: place,
    };
    let stream = futures::stream::unfold(state, move |mut state| {
        let shutdown = shutdown.clone();
        async move {
            loop {
                if let Some(event) = state.pending.pop_front() {
                    return Some((Ok::<_, std::convert::Infallible>(event), state));
                }
                if state.done || tokio::time::Instant::now() >= state.until {
                    return None;
                }
                // Listen before looking: an announcement of a commit after the read below
                // still wakes this stream.
                let bell = state.bell.clone();
                let rung = bell.listen();
                if let Err(error) = live_step(&mut state).await {
                    tracing::warn!(check_id = %state.id, ?error, "live stream ended on an error");
                    return None;
                }
                if state.pending.is_empty() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = rung => {}
                        _ = tokio::time::sleep(poll) => {}
                    }
                }
            }
        }
    });
    Ok(axum::response::sse::Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response())
}
