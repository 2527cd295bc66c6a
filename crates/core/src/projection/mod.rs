//! `apply(event)`: the one place events become rows, used by the edge write path (inside the
//! command's own transaction), by the projector (for events made in Redis), and by `rebuild`.
//!
//! Rules that make apply order irrelevant, so replicas may apply concurrently and in any order:
//! - an event is applied at most once: it is inserted into `events` first, and an `event_id`
//!   already there means it was applied already ([`record`] answers `false`);
//! - a current-state column is only overwritten by an event with a higher per-aggregate version
//!   than the one that set it (`*_version` columns);
//! - history tables insert every event, keyed by `event_id`;
//! - values that merge (first registration time) use an order-free merge (`LEAST`).
//!
//! One file per kind of row: `agents` (registrations and presence), `tasks` (lease events),
//! `keys`, `checks`, `haproxy`, `snapshots`; `rebuild` replays `events` into all of them.
//! Each table has one apply path: a single event is the batch of one.

mod agents;
mod checks;
mod haproxy;
mod keys;
mod rebuild;
pub mod snapshots;
mod tasks;

use checkplane_runtime::db::Sql;
use checkplane_wire::events::{AgentPresence, Event, EventBody};

use checks::{SlotChange, SlotUpdate};
pub use rebuild::{canonical_dump, canonical_dump_of, rebuild, rebuild_command, RebuildReport};
use tasks::{apply_tasks, slot_change, task_change};

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("database")]
    Db(#[from] tokio_postgres::Error),
    #[error("serialising the payload")]
    Json(#[from] serde_json::Error),
    #[error("a snapshot of {0:?}, which is no long-lived projection table")]
    Snapshot(String),
    #[error("decoding the event")]
    Decode(#[from] checkplane_wire::events::DecodeError),
}

impl ApplyError {
    /// Whether the event itself is at fault (bad data, a violated constraint) rather than the
    /// database being unavailable or the schema missing: only then does a failure count
    /// towards parking the event.
    pub fn is_poison(&self) -> bool {
        match self {
            Self::Json(_) | Self::Snapshot(_) | Self::Decode(_) => true,
            Self::Db(e) => e
                .code()
                .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")),
        }
    }
}

/// The projection tables `apply` writes: what `rebuild` truncates and replays.
pub const PROJECTION_TABLES: &[&str] = &[
    "checks",
    "check_slots",
    "agents",
    "agent_status_history",
    "tasks",
    "api_keys",
    "audit_log",
    "haproxy_instances",
    "haproxy_backends",
    "haproxy_servers",
    "haproxy_server_status_history",
    "haproxy_actions",
    "haproxy_nodes",
    "applications",
    "application_groups",
    "application_group_members",
];

/// Columns that count in apply order rather than event order (the live results cursor and
/// the ETag revision): `rebuild` recomputes them in event order, so they are left out when
/// comparing a rebuild with what it replaced.
pub const DELIVERY_CURSORS: &[(&str, &str)] = &[
    ("checks", "seq"),
    ("checks", "revision"),
    ("check_slots", "seq"),
];

/// Timestamps from event milliseconds, with exact integer arithmetic.
pub(crate) const AT: &str = "cp_at_ms($1::bigint)";

/// Insert the event into `events`; `false` when its `event_id` is there already.
pub async fn record(client: &impl Sql, event: &Event) -> Result<bool, ApplyError> {
    let payload = serde_json::to_value(&event.body)?;
    let payload = payload.get("payload").cloned().unwrap_or_default();
    let inserted = client
        .execute(
            &format!(
                "INSERT INTO events (event_id, occurred_at, type, aggregate_id, version, actor, schema, payload)
                 VALUES ($2, {AT}, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT DO NOTHING"
            ),
            &[
                &event.occurred_at,
                &event.event_id,
                &event.body.type_name(),
                &event.aggregate_id,
                &event.version,
                &event.actor,
                &i32::try_from(event.schema).unwrap_or(i32::MAX),
                &payload,
            ],
        )
        .await?;
    Ok(inserted == 1)
}

/// Apply one event to the projection tables.
pub async fn apply(client: &impl Sql, event: &Event) -> Result<(), ApplyError> {
    match &event.body {
        EventBody::AgentRegistered(e) => agents::apply_registered(client, event, e).await,
        EventBody::AgentReenrollApproved(e) => {
            agents::apply_reenroll_approved(client, event, e).await
        }
        EventBody::AgentRevoked(e) => agents::apply_revoked(client, event, e).await,
        EventBody::AgentCameBack(e) => agents::apply_presence(client, event, e, "online").await,
        EventBody::AgentWentOffline(e) => agents::apply_presence(client, event, e, "offline").await,
        EventBody::LeaseGranted(_)
        | EventBody::LeaseReported(_)
        | EventBody::LeaseClosed(_)
        | EventBody::LeaseExpired(_)
        | EventBody::TaskDeadLettered(_) => match task_change(event) {
            Some(change) => apply_tasks(client, &[change]).await,
            None => Ok(()),
        },
        EventBody::LeaseExtended(e) => tasks::apply_extended(client, event, e).await,
        EventBody::CheckCreated(e) => checks::apply_created(client, event, e).await,
        EventBody::CheckCancelled(e) => checks::apply_cancelled(client, event, e).await,
        EventBody::CheckSlotRetried(e) => checks::apply_retried(client, event, e).await,
        EventBody::CheckSlotsClosed(e) | EventBody::CheckSlotsInterrupted(e) => {
            let ended = matches!(event.body, EventBody::CheckSlotsClosed(_));
            let changes: Vec<SlotUpdate<'_>> = e
                .slots
                .iter()
                .map(|&(slot, attempt)| SlotUpdate {
                    at_ms: event.occurred_at,
                    slot: (e.check_id, slot, attempt),
                    change: if ended {
                        SlotChange::Ended {
                            outcome: &e.outcome,
                            result: None,
                        }
                    } else {
                        SlotChange::Interrupted {
                            outcome: &e.outcome,
                        }
                    },
                })
                .collect();
            checks::apply_slots(client, &changes).await
        }
        EventBody::CheckSlotsReleased(e) => checks::apply_released(client, e).await,
        EventBody::KeyCreated(e) => keys::apply_key_created(client, event, e).await,
        EventBody::KeyRevoked(e) => keys::apply_key_revoked(client, event, e).await,
        EventBody::HaproxyInstanceRegistered(e) => {
            haproxy::apply_registered(client, event, e).await
        }
        EventBody::HaproxyInstanceRemoved(e) => haproxy::apply_removed(client, event, e).await,
        EventBody::HaproxyServerObserved(e) => haproxy::apply_observed(client, event, e).await,
        EventBody::HaproxyServerMissing(e) => haproxy::apply_missing(client, event, e).await,
        EventBody::HaproxyActionRequested(e) => {
            haproxy::apply_action_requested(client, event, e).await
        }
        EventBody::HaproxyActionUpdated(e) => haproxy::apply_action_updated(client, event, e).await,
        EventBody::HaproxyNodeMarked(e) => haproxy::apply_node_marked(client, event, e).await,
        EventBody::ApplicationCreated(e) => haproxy::apply_application(client, event, e).await,
        EventBody::ApplicationGroupCreated(e) => haproxy::apply_group(client, event, e).await,
        EventBody::ProjectionSnapshot(e) => snapshots::apply(client, e).await,
        // Only in the audit log (below); what they did is in their other events.
        EventBody::DeadLetterRequeued(_)
        | EventBody::DeadLetterDropped(_)
        | EventBody::ProjectionFailureDropped(_) => Ok(()),
    }?;
    if let Some(change) = slot_change(event) {
        checks::apply_slots(client, &[change]).await?;
    }
    if event.body.is_operator_action() {
        audit(client, event).await?;
    }
    Ok(())
}

/// The audit record of an operator action: who, when, what, on what, and the payload
/// without anything secret.
async fn audit(client: &impl Sql, event: &Event) -> Result<(), ApplyError> {
    let mut details = serde_json::to_value(&event.body)?
        .get("payload")
        .cloned()
        .unwrap_or_default();
    if let Some(map) = details.as_object_mut() {
        map.remove("key_hash");
    }
    // A check's request headers are secrets to readers of the audit log too.
    checkplane_wire::checks::redact_headers(&mut details);
    client
        .execute(
            &format!(
                "INSERT INTO audit_log (event_id, occurred_at, actor, action, object, details)
                 VALUES ($2, {AT}, $3, $4, $5, $6)
                 ON CONFLICT (event_id) DO NOTHING"
            ),
            &[
                &event.occurred_at,
                &event.event_id,
                &event.actor,
                &event.body.type_name(),
                &event.aggregate_id,
                &details,
            ],
        )
        .await?;
    Ok(())
}

/// Record and apply; `false` (and nothing applied) when the event was known already.
pub async fn record_and_apply(client: &impl Sql, event: &Event) -> Result<bool, ApplyError> {
    if !record(client, event).await? {
        return Ok(false);
    }
    apply(client, event).await?;
    Ok(true)
}

/// What a batch apply did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Events new to `events`, now applied.
    pub applied: u64,
    /// Events already known (or repeated within the batch), skipped.
    pub skipped: u64,
    /// The checks whose slots the batch moved or whose own events it held, in id order:
    /// their live readers may look.
    pub checks: Vec<uuid::Uuid>,
}

/// Record and apply a batch with a few set-based statements: the projector's fast path. Its
/// effect equals [`record_and_apply`] of each event in turn; on an error the caller rolls the
/// transaction back and applies event by event to find the culprit.
pub async fn record_and_apply_batch(
    client: &impl Sql,
    events: &[Event],
) -> Result<Applied, ApplyError> {
    let new = record_batch(client, events).await?;
    apply_recorded(client, events, new).await
}

/// Insert a batch into `events` with one statement: the ids that were new.
pub async fn record_batch(
    client: &impl Sql,
    events: &[Event],
) -> Result<std::collections::HashSet<uuid::Uuid>, ApplyError> {
    let mut ids = Vec::with_capacity(events.len());
    let mut ms = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut aggregates = Vec::with_capacity(events.len());
    let mut versions = Vec::with_capacity(events.len());
    let mut actors = Vec::with_capacity(events.len());
    let mut schemas = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    for event in events {
        let body = serde_json::to_value(&event.body)?;
        ids.push(event.event_id);
        ms.push(event.occurred_at);
        types.push(event.body.type_name());
        aggregates.push(event.aggregate_id.as_str());
        versions.push(event.version);
        actors.push(event.actor.as_str());
        schemas.push(i32::try_from(event.schema).unwrap_or(i32::MAX));
        payloads.push(body.get("payload").cloned().unwrap_or_default());
    }
    let rows = client
        .query(
            "INSERT INTO events (event_id, occurred_at, type, aggregate_id, version, actor, schema, payload)
                 SELECT id, cp_at_ms(ms), t, agg, v, actor, sch, payload
                 FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[],
                             $7::int[], $8::jsonb[]) AS u(id, ms, t, agg, v, actor, sch, payload)
                 ON CONFLICT DO NOTHING
                 RETURNING event_id",
            &[&ids, &ms, &types, &aggregates, &versions, &actors, &schemas, &payloads],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get("event_id")).collect())
}

/// Record `events` (one statement) and apply the new ones side by side: for events that
/// touch rows of their own (one poll's servers), pipelined on the connection.
/// The servers a poll saw are applied set-based (a handful of statements for the whole
/// poll, the same effect as applying each event on its own).
pub async fn record_and_apply_independent(
    client: &impl Sql,
    events: &[Event],
) -> Result<(), ApplyError> {
    let new = record_batch(client, events).await?;
    let fresh = || events.iter().filter(|e| new.contains(&e.event_id));
    let observed: Vec<(&Event, &checkplane_wire::events::HaproxyServerObserved)> = fresh()
        .filter_map(|e| match &e.body {
            EventBody::HaproxyServerObserved(o) => Some((e, &**o)),
            _ => None,
        })
        .collect();
    haproxy::apply_observed_batch(client, &observed).await?;
    futures::future::try_join_all(
        fresh()
            .filter(|e| !matches!(e.body, EventBody::HaproxyServerObserved(_)))
            .map(|e| apply(client, e)),
    )
    .await?;
    Ok(())
}

/// The check an event is about, when its aggregate is one (`check:<id>`).
pub fn check_of(event: &Event) -> Option<uuid::Uuid> {
    event
        .aggregate_id
        .strip_prefix("check:")
        .and_then(|id| uuid::Uuid::parse_str(id).ok())
}

async fn apply_recorded(
    client: &impl Sql,
    events: &[Event],
    mut new: std::collections::HashSet<uuid::Uuid>,
) -> Result<Applied, ApplyError> {
    let mut applied = Applied::default();
    let mut presence: Vec<(&Event, &AgentPresence, &str)> = Vec::new();
    let mut tasks = Vec::new();
    let mut slots = Vec::new();
    for event in events {
        // A check's own events (made and applied at the edge, so usually known here) come
        // through after their commit: a good moment for its live readers to look.
        if let Some(check) = check_of(event) {
            applied.checks.push(check);
        }
        // `remove`: an id repeated within the batch is applied once.
        if !new.remove(&event.event_id) {
            applied.skipped += 1;
            continue;
        }
        applied.applied += 1;
        match &event.body {
            EventBody::AgentCameBack(p) => presence.push((event, p, "online")),
            EventBody::AgentWentOffline(p) => presence.push((event, p, "offline")),
            _ => match task_change(event) {
                Some(change) => {
                    tasks.push(change);
                    slots.extend(slot_change(event));
                }
                None => apply(client, event).await?,
            },
        }
    }
    if !presence.is_empty() {
        agents::apply_presence_batch(client, &presence).await?;
    }
    applied.checks.extend(slots.iter().map(|s| s.slot.0));
    applied.checks.sort_unstable();
    applied.checks.dedup();
    // Independent of each other: one pipeline.
    let (tasks_done, slots_done) = futures::join!(
        apply_tasks(client, &tasks),
        checks::apply_slots(client, &slots)
    );
    tasks_done?;
    slots_done?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use checkplane_wire::events::TaskDeadLettered;

    fn dead_lettered(waits: bool) -> Event {
        let check = uuid::Uuid::now_v7();
        Event::new(
            "task:a:dns:1-0",
            1,
            "system:gateway",
            EventBody::TaskDeadLettered(TaskDeadLettered {
                agent_id: "a".into(),
                kind: "dns".into(),
                entry: "1-0".into(),
                deliveries: 6,
                task: Some(format!("{check}:0:1")),
                waits,
            }),
        )
    }

    #[test]
    fn a_dead_letter_leaves_its_slot_waiting_but_one_made_before_that_ended_it() {
        let now = dead_lettered(true);
        let change = slot_change(&now).map(|u| u.change);
        assert!(
            matches!(
                change,
                Some(SlotChange::Interrupted {
                    outcome: "dead_lettered"
                })
            ),
            "waits for an admin"
        );
        // As recorded before (schema 1, no `waits`): replayed, it ends the slot as it did then.
        let mut before = serde_json::to_value(dead_lettered(false)).unwrap();
        before["payload"].as_object_mut().unwrap().remove("waits");
        before["schema"] = 1.into();
        let before = Event::decode(before).unwrap();
        let change = slot_change(&before).map(|u| u.change);
        assert!(
            matches!(
                change,
                Some(SlotChange::Ended {
                    outcome: "dead_lettered",
                    ..
                })
            ),
            "ended"
        );
    }
}
