//! What was set aside, for admins: dead letters (tasks past `MAX_DELIVERIES`) to list,
//! requeue or drop, and events parked by the projector to list or drop (`scheduler
//! replay-failures` replays them). Every requeue and drop is an event, so it is audited.
//!
//! A check's dead-lettered task has left its slot waiting (`retrying`, outcome
//! `dead_lettered`) until the check's deadline. Requeued, the slot gets its next attempt on
//! the same agent (`check.slot_retried`, fanned out like the scheduler's retries, the outbox
//! sweep adding it should this gateway fail to); dropped, the slot ends `dead_lettered` at
//! once. Either way the slot keeps exactly one outcome. Once the check has ended, only a drop
//! is left. A relayed HAProxy command is never run again (its action has failed or been
//! retried by haproxy-sync meanwhile): drop only. An anonymous task (tests, benchmarks) goes
//! back to its agent's stream.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use checkplane_core::dead_letters::{DeadLetter, Parked};
use checkplane_core::outbox::PUBLISH_TIMEOUT;
use checkplane_core::{failures, fanout};
use checkplane_runtime::clock::now_ms;
use checkplane_runtime::http::{ApiError, ApiQuery};
use checkplane_wire::checks::parse_task_id;
use checkplane_wire::error::ErrorCode;
use checkplane_wire::events::{
    CheckSlotRetried, CheckSlotsClosed, DeadLetterHandled, Event, EventBody, Location,
    ProjectionFailureDropped,
};
use serde::{Deserialize, Serialize};

use crate::auth::Admin;
use crate::edge::Written;
use crate::paging::{check_window, Page, PageQuery};
use crate::state::AppState;

/// Most dead letters one "all" request handles; `has_more` says when more are left.
const ALL_AT_ONCE: usize = 500;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/dead-letters", get(list).delete(drop_all))
        .route("/v1/dead-letters/requeue", post(requeue_all))
        .route("/v1/dead-letters/{id}", delete(drop_one))
        .route("/v1/dead-letters/{id}/requeue", post(requeue_one))
        .route("/v1/projection-failures", get(list_failures))
        .route("/v1/projection-failures/{id}", delete(drop_failure))
}

fn conflict(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, message)
}

async fn list(
    State(app): State<AppState>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<DeadLetter>>, ApiError> {
    check_window(q.limit, q.offset)?;
    let parked = Parked::new(app.keys.clone());
    let mut conn = app.stores.redis_shared.clone();
    let (items, total) = parked
        .list(&mut conn, q.limit as usize, q.offset as usize)
        .await?;
    Ok(Json(Page::new(
        items,
        i64::try_from(total).unwrap_or(i64::MAX),
        q.limit,
        q.offset,
    )))
}

async fn find(app: &AppState, id: &str) -> Result<DeadLetter, ApiError> {
    let parked = Parked::new(app.keys.clone());
    parked
        .get(&mut app.stores.redis_shared.clone(), id)
        .await?
        .ok_or_else(|| ApiError::not_found("no such dead letter"))
}

fn handled(letter: &DeadLetter, attempt: Option<u32>) -> DeadLetterHandled {
    DeadLetterHandled {
        dead_letter_id: letter.id.clone(),
        agent_id: letter.agent_id.clone(),
        kind: letter.kind.clone(),
        task: letter.task.clone(),
        attempt,
    }
}

fn admin_event(letter: &DeadLetter, actor: &str, body: EventBody) -> Event {
    Event::new(
        format!("dead-letter:{}", letter.id),
        1,
        actor.to_owned(),
        body,
    )
}

#[derive(Debug, Serialize)]
struct Requeued {
    id: String,
    /// The attempt a check's slot runs now.
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
}

/// Requeue one dead letter: its check slot's next attempt, or an anonymous task back on its
/// stream. Errors: 404 gone, 409 when it cannot run again.
async fn requeue(app: &AppState, actor: &str, letter: &DeadLetter) -> Result<Requeued, ApiError> {
    let parked = hold(app, letter).await?;
    let done = requeue_held(app, actor, letter).await;
    release(app, &parked, letter).await;
    done
}

/// Take the right to act on `letter` (two requests never act on one letter at once: the
/// second is 409, or 404 once the first has removed it).
async fn hold(app: &AppState, letter: &DeadLetter) -> Result<Parked, ApiError> {
    let parked = Parked::new(app.keys.clone());
    let mut conn = app.stores.redis_shared.clone();
    if !parked.claim(&mut conn, letter).await? {
        return Err(conflict("another request is handling this dead letter"));
    }
    if parked.get(&mut conn, &letter.id).await?.is_none() {
        release(app, &parked, letter).await;
        return Err(ApiError::not_found("no such dead letter"));
    }
    Ok(parked)
}

async fn release(app: &AppState, parked: &Parked, letter: &DeadLetter) {
    if let Err(error) = parked
        .release(&mut app.stores.redis_shared.clone(), letter)
        .await
    {
        // It expires by itself.
        tracing::warn!(id = %letter.id, %error, "releasing a dead letter's claim");
    }
}

async fn requeue_held(
    app: &AppState,
    actor: &str,
    letter: &DeadLetter,
) -> Result<Requeued, ApiError> {
    if letter.kind == checkplane_wire::haproxy::RELAY_KIND {
        return Err(conflict(
            "a relayed HAProxy command is not run again (its action failed or was retried by haproxy-sync); drop it",
        ));
    }
    let parked = Parked::new(app.keys.clone());
    let admin_stream = app.keys.events("admin");
    let Some((check, slot, attempt)) = letter.task.as_deref().and_then(parse_task_id) else {
        // Anonymous: audited in a transaction committed once the task is back.
        let mut client = app.stores.pg.get().await?;
        let tx = client.transaction().await?;
        let audit = admin_event(
            letter,
            actor,
            EventBody::DeadLetterRequeued(handled(letter, None)),
        );
        let mut written = Written::new();
        written.append(&tx, &admin_stream, &audit).await?;
        if !parked
            .requeue_anonymous(&mut app.stores.redis_shared.clone(), letter)
            .await?
        {
            return Err(ApiError::not_found("no such dead letter"));
        }
        tx.commit().await?;
        drop(client);
        written.publish_now(app).await;
        return Ok(Requeued {
            id: letter.id.clone(),
            attempt: None,
        });
    };
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT c.kind, c.target, c.options, cp_ms(c.deadline) AS deadline_ms,
                    c.status <> 'finished' AND c.cancelled_at IS NULL AND c.deadline > now()
                        AS check_open,
                    s.status = 'retrying' AND s.outcome = 'dead_lettered' AS slot_waits,
                    s.agent_id, s.country, s.city, s.asn, s.network
             FROM checks c JOIN check_slots s USING (check_id)
             WHERE c.check_id = $1 AND s.slot = $2 AND s.attempt = $3
             FOR UPDATE OF c, s",
            &[&check, &(slot as i32), &(attempt as i32)],
        )
        .await?
        .ok_or_else(|| conflict("its check slot has moved on or its check is gone: drop it"))?;
    if !row.get::<_, bool>("check_open") {
        return Err(conflict(
            "its check has ended (deadline, cancel or results retention): drop it",
        ));
    }
    if !row.get::<_, bool>("slot_waits") {
        return Err(conflict(
            "its slot is not waiting for it (requeued already, or its dead-lettering not projected yet: try again in a moment)",
        ));
    }
    let retry = CheckSlotRetried {
        check_id: check,
        kind: row.get("kind"),
        target: row.get("target"),
        options: row.get("options"),
        deadline: row.get("deadline_ms"),
        slot,
        attempt: attempt + 1,
        agent_id: row
            .get::<_, Option<String>>("agent_id")
            .unwrap_or_else(|| letter.agent_id.clone()),
        location: Location {
            country: row.get("country"),
            city: row.get("city"),
            asn: row
                .get::<_, Option<i64>>("asn")
                .and_then(|a| u32::try_from(a).ok()),
            network: row.get("network"),
        },
    };
    let retried = Event::new(
        format!("check:{check}"),
        now_ms(),
        actor.to_owned(),
        EventBody::CheckSlotRetried(retry.clone()),
    );
    let audit = admin_event(
        letter,
        actor,
        EventBody::DeadLetterRequeued(handled(letter, Some(attempt + 1))),
    );
    let checks_stream = app.keys.events("checks");
    let (mut retried_written, mut audited) = (Written::new(), Written::new());
    retried_written
        .append(&tx, &checks_stream, &retried)
        .await?;
    audited.append(&tx, &admin_stream, &audit).await?;
    tx.commit().await?;
    drop(client);
    // The new attempt's task, then the dead letter out of the way. Should this gateway fail
    // to add the task, the outbox sweep does (its row stays until the task is there).
    let added = tokio::time::timeout(
        PUBLISH_TIMEOUT,
        fanout::enqueue_retry(&app.stores.redis_shared, &app.leases, &retry),
    )
    .await;
    if matches!(added, Ok(Ok(()))) {
        retried_written.publish_now(app).await;
    }
    // Done whatever happens now: a letter left behind is refused next time (its slot has
    // moved on) and can be dropped.
    if let Err(error) = parked
        .remove(&mut app.stores.redis_shared.clone(), letter)
        .await
    {
        tracing::warn!(id = %letter.id, %error, "requeued, but the dead letter was not removed");
    }
    audited.publish_now(app).await;
    Ok(Requeued {
        id: letter.id.clone(),
        attempt: Some(attempt + 1),
    })
}

/// Drop one dead letter; a check slot still waiting for it ends `dead_lettered`.
async fn discard(app: &AppState, actor: &str, letter: &DeadLetter) -> Result<(), ApiError> {
    let parked = hold(app, letter).await?;
    let done = discard_held(app, actor, letter).await;
    release(app, &parked, letter).await;
    done
}

async fn discard_held(app: &AppState, actor: &str, letter: &DeadLetter) -> Result<(), ApiError> {
    let parked = Parked::new(app.keys.clone());
    let admin_stream = app.keys.events("admin");
    let checks_stream = app.keys.events("checks");
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    let mut written = Written::new();
    if let Some((check, slot, attempt)) = letter.task.as_deref().and_then(parse_task_id) {
        let waiting = tx
            .query_opt(
                "SELECT 1 FROM checks c JOIN check_slots s USING (check_id)
                 WHERE c.check_id = $1 AND s.slot = $2 AND s.attempt = $3
                   AND s.status = 'retrying' AND s.outcome = 'dead_lettered'
                 FOR UPDATE OF c, s",
                &[&check, &(slot as i32), &(attempt as i32)],
            )
            .await?;
        if waiting.is_some() {
            let closed = Event::new(
                format!("check:{check}"),
                now_ms(),
                actor.to_owned(),
                EventBody::CheckSlotsClosed(CheckSlotsClosed {
                    check_id: check,
                    outcome: "dead_lettered".to_owned(),
                    slots: vec![(slot, attempt)],
                }),
            );
            written.append(&tx, &checks_stream, &closed).await?;
        }
    }
    let audit = admin_event(
        letter,
        actor,
        EventBody::DeadLetterDropped(handled(letter, None)),
    );
    written.append(&tx, &admin_stream, &audit).await?;
    // Committed before Redis is asked, so no check row is locked across it (the claim keeps
    // other requests off this letter meanwhile).
    tx.commit().await?;
    drop(client);
    parked
        .remove(&mut app.stores.redis_shared.clone(), letter)
        .await?;
    written.publish_now(app).await;
    Ok(())
}

async fn requeue_one(
    State(app): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<Requeued>, ApiError> {
    let letter = find(&app, &id).await?;
    Ok(Json(requeue(&app, &admin.caller.actor(), &letter).await?))
}

async fn drop_one(
    State(app): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let letter = find(&app, &id).await?;
    discard(&app, &admin.caller.actor(), &letter).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize)]
struct Refused {
    id: String,
    code: &'static str,
    message: String,
}

/// `limit` of the bulk calls: how many dead letters one call handles (1-500).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkQuery {
    #[serde(default = "bulk_default")]
    limit: usize,
}

fn bulk_default() -> usize {
    ALL_AT_ONCE
}

fn check_bulk(q: &BulkQuery) -> Result<(), ApiError> {
    if !(1..=ALL_AT_ONCE).contains(&q.limit) {
        return Err(ApiError::validation(format!(
            "limit: must be 1-{ALL_AT_ONCE}"
        )));
    }
    Ok(())
}

/// Most dead letters one "requeue all" looks at: refused ones are passed over, so that
/// requeueable ones behind them are reached.
const SCAN_AT_ONCE: usize = 2_000;

#[derive(Debug, Serialize)]
struct RequeuedAll {
    requeued: Vec<Requeued>,
    /// The ones that cannot run again, and why (they stay; drop them).
    refused: Vec<Refused>,
    /// More dead letters than one request handles were there: ask again.
    has_more: bool,
}

async fn requeue_all(
    State(app): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<BulkQuery>,
) -> Result<Json<RequeuedAll>, ApiError> {
    check_bulk(&q)?;
    let actor = admin.caller.actor();
    let parked = Parked::new(app.keys.clone());
    let (letters, total) = parked
        .list(&mut app.stores.redis_shared.clone(), SCAN_AT_ONCE, 0)
        .await?;
    let mut out = RequeuedAll {
        requeued: Vec::new(),
        refused: Vec::new(),
        has_more: false,
    };
    // Newest first; the refused stay where they are, so each call passes over them again (up
    // to the scan bound) to reach the requeueable ones.
    for (seen, letter) in letters.iter().enumerate() {
        if out.requeued.len() == q.limit {
            out.has_more = true;
            break;
        }
        out.has_more = total > (seen + 1) as u64;
        match requeue(&app, &actor, letter).await {
            Ok(done) => out.requeued.push(done),
            Err(error) if error.status.is_client_error() => out.refused.push(Refused {
                id: letter.id.clone(),
                code: error.code.as_str(),
                message: error.message.clone(),
            }),
            Err(error) => return Err(error),
        }
    }
    Ok(Json(out))
}

#[derive(Debug, Serialize)]
struct DroppedAll {
    dropped: u64,
    has_more: bool,
}

async fn drop_all(
    State(app): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<BulkQuery>,
) -> Result<Json<DroppedAll>, ApiError> {
    check_bulk(&q)?;
    let actor = admin.caller.actor();
    let parked = Parked::new(app.keys.clone());
    let (letters, total) = parked
        .list(&mut app.stores.redis_shared.clone(), q.limit, 0)
        .await?;
    let mut dropped = 0;
    for letter in &letters {
        match discard(&app, &actor, letter).await {
            Ok(()) => dropped += 1,
            // Handled by another request meanwhile.
            Err(error) if error.status.is_client_error() => {}
            Err(error) => return Err(error),
        }
    }
    Ok(Json(DroppedAll {
        dropped,
        has_more: total > letters.len() as u64,
    }))
}

async fn list_failures(
    State(app): State<AppState>,
    _admin: Admin,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<failures::ParkedEvent>>, ApiError> {
    check_window(q.limit, q.offset)?;
    let client = app.stores.pg.get().await?;
    let (items, total) = failures::list(&**client, q.limit, q.offset).await?;
    Ok(Json(Page::new(items, total, q.limit, q.offset)))
}

async fn drop_failure(
    State(app): State<AppState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let Some(id) = id.parse::<i64>().ok().filter(|id| *id > 0) else {
        return Err(ApiError::not_found("no such parked event"));
    };
    let stream = app.keys.events("admin");
    let mut client = app.stores.pg.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "DELETE FROM projection_failures WHERE id = $1
             RETURNING stream, entry_id, event_id, error",
            &[&id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("no such parked event"))?;
    let event = Event::new(
        format!("projection-failure:{id}"),
        1,
        admin.caller.actor(),
        EventBody::ProjectionFailureDropped(ProjectionFailureDropped {
            failure_id: id,
            stream: row.get("stream"),
            entry_id: row.get("entry_id"),
            event_id: row.get("event_id"),
            error: row.get("error"),
        }),
    );
    let mut written = Written::new();
    written.append(&tx, &stream, &event).await?;
    tx.commit().await?;
    drop(client);
    written.publish_now(&app).await;
    Ok(StatusCode::NO_CONTENT)
}
