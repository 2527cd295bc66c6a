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

mod checks;
mod haproxy;
pub mod snapshots;

use checkplane_runtime::db::Sql;
use checkplane_wire::events::{
    AgentPresence, AgentRegistered, DecodeError, Event, EventBody, KeyCreated, KeyRevoked,
};
use checkplane_wire::leases::LeaseToken;
use checks::{SlotChange, SlotUpdate};

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("database")]
    Db(#[from] tokio_postgres::Error),
    #[error("serialising the payload")]
    Json(#[from] serde_json::Error),
    #[error("a snapshot of {0:?}, which is no long-lived projection table")]
    Snapshot(String),
}

impl ApplyError {
    /// Whether the event itself is at fault (bad data, a violated constraint) rather than the
    /// database being unavailable or the schema missing: only then does a failure count
    /// towards parking the event.
    pub fn is_poison(&self) -> bool {
        match self {
            Self::Json(_) | Self::Snapshot(_) => true,
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
pub(crate) const AT: &str = "('epoch'::timestamptz + $1::bigint * interval '1 millisecond')";

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
        EventBody::AgentRegistered(e) => apply_registered(client, event, e).await,
        EventBody::AgentCameBack(e) => apply_presence(client, event, e, "online").await,
        EventBody::AgentWentOffline(e) => apply_presence(client, event, e, "offline").await,
        EventBody::LeaseGranted(_)
        | EventBody::LeaseReported(_)
        | EventBody::LeaseClosed(_)
        | EventBody::LeaseExpired(_)
        | EventBody::TaskDeadLettered(_) => match task_change(event) {
            Some(change) => apply_tasks(client, &[change]).await,
            None => Ok(()),
        },
        EventBody::LeaseExtended(e) => apply_extended(client, event, e).await,
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
        EventBody::KeyCreated(e) => apply_key_created(client, event, e).await,
        EventBody::KeyRevoked(e) => apply_key_revoked(client, event, e).await,
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

/// The check slot a lease event moves, if its task belongs to a check (task id
/// `<check>:<slot>:<attempt>`; a test's or a benchmark's task has none).
fn slot_change(event: &Event) -> Option<SlotUpdate<'_>> {
    let ended = |outcome, result| SlotChange::Ended { outcome, result };
    let (task, change) = match &event.body {
        EventBody::LeaseGranted(e) => (e.task.as_deref()?, SlotChange::Leased),
        EventBody::LeaseReported(e) => (e.task.as_deref()?, ended(&e.outcome, Some(&e.result))),
        EventBody::LeaseClosed(e) if e.reason == "offline" => (
            e.task.as_deref()?,
            SlotChange::Interrupted { outcome: "offline" },
        ),
        EventBody::LeaseClosed(e) => (e.task.as_deref()?, ended(&e.reason, None)),
        EventBody::LeaseExpired(e) => (
            e.task.as_deref()?,
            SlotChange::Interrupted {
                outcome: "lease_expired",
            },
        ),
        // The slot waits for an admin (requeue or drop, `GET /v1/dead-letters`) until its
        // check's deadline, which ends it `dead_lettered`; it is never retried by itself.
        EventBody::TaskDeadLettered(e) if e.waits => (
            e.task.as_deref()?,
            SlotChange::Interrupted {
                outcome: "dead_lettered",
            },
        ),
        EventBody::TaskDeadLettered(e) => (e.task.as_deref()?, ended("dead_lettered", None)),
        _ => return None,
    };
    Some(SlotUpdate {
        at_ms: event.occurred_at,
        slot: checkplane_wire::checks::parse_task_id(task)?,
        change,
    })
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

async fn apply_key_created(
    client: &impl Sql,
    event: &Event,
    e: &KeyCreated,
) -> Result<(), ApplyError> {
    client
        .execute(
            &format!(
                "INSERT INTO api_keys (key_id, name, role, key_hash, created_at, created_by)
                 VALUES ($2, $3, $4, $5, {AT}, $6)
                 ON CONFLICT (key_id) DO NOTHING"
            ),
            &[
                &event.occurred_at,
                &e.key_id,
                &e.name,
                &e.role,
                &e.key_hash,
                &event.actor,
            ],
        )
        .await?;
    Ok(())
}

async fn apply_key_revoked(
    client: &impl Sql,
    event: &Event,
    e: &KeyRevoked,
) -> Result<(), ApplyError> {
    // The first revocation counts; a key never comes back.
    client
        .execute(
            &format!(
                "UPDATE api_keys SET revoked_at = {AT}, revoked_by = $3
                 WHERE key_id = $2 AND revoked_at IS NULL"
            ),
            &[&event.occurred_at, &e.key_id, &event.actor],
        )
        .await?;
    Ok(())
}

/// What a lease event says of its task row.
struct TaskChange<'a> {
    event: &'a Event,
    /// (agent, kind, entry)
    key: (&'a str, &'a str, &'a str),
    status: &'a str,
    outcome: Option<&'a str>,
    epoch: Option<i64>,
    deadline: Option<i64>,
    result: Option<&'a serde_json::Value>,
}

/// The task row change of a lease event (granted, reported, closed, expired, dead-lettered).
fn task_change(event: &Event) -> Option<TaskChange<'_>> {
    let change = |key, status, outcome, epoch, deadline, result| TaskChange {
        event,
        key,
        status,
        outcome,
        epoch,
        deadline,
        result,
    };
    Some(match &event.body {
        EventBody::LeaseGranted(e) => change(
            (e.agent_id.as_str(), e.kind.as_str(), e.entry.as_str()),
            "leased",
            None,
            Some(e.epoch),
            Some(e.deadline),
            None,
        ),
        EventBody::LeaseReported(e) => change(
            (&e.agent_id, &e.kind, &e.entry),
            "reported",
            Some(e.outcome.as_str()),
            Some(e.epoch),
            None,
            Some(&e.result),
        ),
        EventBody::LeaseClosed(e) => change(
            (&e.agent_id, &e.kind, &e.entry),
            "closed",
            Some(e.reason.as_str()),
            None,
            None,
            None,
        ),
        EventBody::LeaseExpired(e) => change(
            (&e.agent_id, &e.kind, &e.entry),
            "expired",
            Some("lease_expired"),
            Some(e.epoch),
            None,
            None,
        ),
        EventBody::TaskDeadLettered(e) => change(
            (&e.agent_id, &e.kind, &e.entry),
            "dead_lettered",
            Some("dead_lettered"),
            Some(e.deliveries),
            None,
            None,
        ),
        _ => return None,
    })
}

/// Task rows, in one statement whatever the number of changes (each lease event itself is in
/// `events`, which the `lease_history` view reads). Rows are merged per task first (a batch
/// may hold a task's grant and its report) with the same rules as against the stored row:
/// status, outcome and time follow the newest version; what only grows (epoch, deadline,
/// deliveries) or is set once (first grant; the result, of the earliest report when Redis
/// lost one and the task ran twice) merges order-free. Tasks are written in key order, so
/// replicas lock rows in one order.
async fn apply_tasks(client: &impl Sql, changes: &[TaskChange<'_>]) -> Result<(), ApplyError> {
    if changes.is_empty() {
        return Ok(());
    }
    let agents: Vec<&str> = changes.iter().map(|c| c.key.0).collect();
    let kinds: Vec<&str> = changes.iter().map(|c| c.key.1).collect();
    let entries: Vec<&str> = changes.iter().map(|c| c.key.2).collect();
    let statuses: Vec<&str> = changes.iter().map(|c| c.status).collect();
    let outcomes: Vec<Option<&str>> = changes.iter().map(|c| c.outcome).collect();
    let epochs: Vec<Option<i64>> = changes.iter().map(|c| c.epoch).collect();
    let deadlines: Vec<Option<i64>> = changes.iter().map(|c| c.deadline).collect();
    let results: Vec<Option<&serde_json::Value>> = changes.iter().map(|c| c.result).collect();
    let granted: Vec<bool> = changes.iter().map(|c| c.status == "leased").collect();
    let versions: Vec<i64> = changes.iter().map(|c| c.event.version).collect();
    let ms: Vec<i64> = changes.iter().map(|c| c.event.occurred_at).collect();
    let ts = |v: &str| format!("'epoch'::timestamptz + {v} * interval '1 millisecond'");
    let newer = "tasks.version < EXCLUDED.version";
    let upsert_sql = format!(
                "INSERT INTO tasks (agent_id, kind, entry, status, outcome, epoch, deliveries,
                                    lease_deadline, result, result_version, first_granted_at,
                                    updated_at, version)
                 SELECT a, k, e, (array_agg(st ORDER BY v DESC))[1],
                        (array_agg(oc ORDER BY v DESC))[1],
                        COALESCE(max(ep), 0), COALESCE(max(ep), 0), {deadline},
                        (array_agg(res ORDER BY v) FILTER (WHERE res IS NOT NULL))[1],
                        min(v) FILTER (WHERE res IS NOT NULL), {first_granted},
                        {updated}, max(v)
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $6::bigint[], $7::bigint[], $8::jsonb[], $9::boolean[], $10::bigint[],
                             $11::bigint[]) AS u(a, k, e, st, oc, ep, dl, res, granted, v, ms)
                 GROUP BY a, k, e ORDER BY a, k, e
                 ON CONFLICT (agent_id, kind, entry) DO UPDATE SET
                    status = CASE WHEN {newer} THEN EXCLUDED.status ELSE tasks.status END,
                    outcome = CASE WHEN {newer} THEN EXCLUDED.outcome ELSE tasks.outcome END,
                    epoch = GREATEST(tasks.epoch, EXCLUDED.epoch),
                    lease_deadline = GREATEST(tasks.lease_deadline, EXCLUDED.lease_deadline),
                    result = CASE WHEN EXCLUDED.result_version IS NOT NULL
                                       AND (tasks.result_version IS NULL
                                            OR EXCLUDED.result_version < tasks.result_version)
                                  THEN EXCLUDED.result ELSE tasks.result END,
                    result_version = CASE WHEN EXCLUDED.result_version IS NOT NULL
                                       AND (tasks.result_version IS NULL
                                            OR EXCLUDED.result_version < tasks.result_version)
                                  THEN EXCLUDED.result_version ELSE tasks.result_version END,
                    deliveries = GREATEST(tasks.deliveries, EXCLUDED.deliveries),
                    first_granted_at = LEAST(tasks.first_granted_at, EXCLUDED.first_granted_at),
                    updated_at = CASE WHEN {newer} THEN EXCLUDED.updated_at ELSE tasks.updated_at END,
                    version = GREATEST(tasks.version, EXCLUDED.version)",
                deadline = ts("max(dl)"),
                first_granted = ts("min(ms) FILTER (WHERE granted)"),
                updated = ts("(array_agg(ms ORDER BY v DESC))[1]"),
            );
    let upsert_params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
        &agents, &kinds, &entries, &statuses, &outcomes, &epochs, &deadlines, &results, &granted,
        &versions, &ms,
    ];
    client.execute(&upsert_sql, &upsert_params).await?;
    Ok(())
}

async fn apply_extended(
    client: &impl Sql,
    event: &Event,
    e: &checkplane_wire::events::LeaseExtended,
) -> Result<(), ApplyError> {
    // A later deadline wins whatever the order. The task row may not be there yet (the
    // extension was applied before its grant): a row at version 0 holds the deadline until the
    // grant, newer by any version, fills in the rest.
    for token in e.tokens.iter().filter_map(|t| LeaseToken::parse(t).ok()) {
        let epoch = i64::try_from(token.epoch).unwrap_or(i64::MAX);
        client
            .execute(
                &format!(
                    "INSERT INTO tasks (agent_id, kind, entry, status, epoch, deliveries,
                                        lease_deadline, updated_at, version)
                     VALUES ($2, $3, $4, 'leased', $5, $5,
                             'epoch'::timestamptz + $6::bigint * interval '1 millisecond', {AT}, 0)
                     ON CONFLICT (agent_id, kind, entry) DO UPDATE SET
                        lease_deadline = GREATEST(tasks.lease_deadline, EXCLUDED.lease_deadline),
                        epoch = GREATEST(tasks.epoch, EXCLUDED.epoch),
                        deliveries = GREATEST(tasks.deliveries, EXCLUDED.deliveries)"
                ),
                &[
                    &event.occurred_at,
                    &token.agent.as_str(),
                    &token.kind,
                    &token.entry,
                    &epoch,
                    &e.deadline,
                ],
            )
            .await?;
    }
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

async fn apply_registered(
    client: &impl Sql,
    event: &Event,
    e: &AgentRegistered,
) -> Result<(), ApplyError> {
    let labels = serde_json::to_value(&e.labels)?;
    let capabilities = serde_json::to_value(&e.capabilities)?;
    let asn = e.location.asn.map(i64::from);
    // Each identity column takes the new value only when this event's version is newer.
    let newer = "agents.identity_version < EXCLUDED.identity_version";
    let sql = format!(
        "INSERT INTO agents (agent_id, hostname, token_hash, labels, capabilities, country, city, asn,
                             network, location_source, address, agent_version, registered_at,
                             updated_at, identity_version)
         VALUES ($2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, {AT}, {AT}, $14)
         ON CONFLICT (agent_id) DO UPDATE SET
            hostname = CASE WHEN {newer} THEN EXCLUDED.hostname ELSE agents.hostname END,
            token_hash = CASE WHEN {newer} THEN EXCLUDED.token_hash ELSE agents.token_hash END,
            labels = CASE WHEN {newer} THEN EXCLUDED.labels ELSE agents.labels END,
            capabilities = CASE WHEN {newer} THEN EXCLUDED.capabilities ELSE agents.capabilities END,
            country = CASE WHEN {newer} THEN EXCLUDED.country ELSE agents.country END,
            city = CASE WHEN {newer} THEN EXCLUDED.city ELSE agents.city END,
            asn = CASE WHEN {newer} THEN EXCLUDED.asn ELSE agents.asn END,
            network = CASE WHEN {newer} THEN EXCLUDED.network ELSE agents.network END,
            location_source = CASE WHEN {newer} THEN EXCLUDED.location_source ELSE agents.location_source END,
            address = CASE WHEN {newer} THEN EXCLUDED.address ELSE agents.address END,
            agent_version = CASE WHEN {newer} THEN EXCLUDED.agent_version ELSE agents.agent_version END,
            updated_at = CASE WHEN {newer} THEN EXCLUDED.updated_at ELSE agents.updated_at END,
            registered_at = LEAST(agents.registered_at, EXCLUDED.registered_at),
            identity_version = GREATEST(agents.identity_version, EXCLUDED.identity_version)"
    );
    client
        .execute(
            &sql,
            &[
                &event.occurred_at,
                &e.agent_id,
                &e.hostname,
                &e.token_hash,
                &labels,
                &capabilities,
                &e.location.country,
                &e.location.city,
                &asn,
                &e.location.network,
                &e.location_source,
                &e.address,
                &e.agent_version,
                &event.version,
            ],
        )
        .await?;
    Ok(())
}

async fn apply_presence(
    client: &impl Sql,
    event: &Event,
    e: &AgentPresence,
    status: &str,
) -> Result<(), ApplyError> {
    // Status takes the newest version; `status_changes` counts every transition (how often an
    // agent flaps), which is why each event must be applied exactly once.
    let newer = "agents.status_version < EXCLUDED.status_version";
    client
        .execute(
            &format!(
                "INSERT INTO agents (agent_id, status, status_changed_at, status_version, status_changes)
                 VALUES ($2, $3, {AT}, $4, 1)
                 ON CONFLICT (agent_id) DO UPDATE SET
                    status = CASE WHEN {newer} THEN EXCLUDED.status ELSE agents.status END,
                    status_changed_at = CASE WHEN {newer} THEN EXCLUDED.status_changed_at
                                             ELSE agents.status_changed_at END,
                    status_version = GREATEST(agents.status_version, EXCLUDED.status_version),
                    status_changes = agents.status_changes + 1"
            ),
            &[&event.occurred_at, &e.agent_id, &status, &event.version],
        )
        .await?;
    client
        .execute(
            &format!(
                "INSERT INTO agent_status_history (event_id, agent_id, status, version, reason, occurred_at)
                 VALUES ($2, $3, $4, $5, $6, {AT})
                 ON CONFLICT (event_id) DO NOTHING"
            ),
            &[
                &event.occurred_at,
                &event.event_id,
                &e.agent_id,
                &status,
                &event.version,
                &e.reason,
            ],
        )
        .await?;
    Ok(())
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
                 SELECT id, 'epoch'::timestamptz + ms * interval '1 millisecond', t, agg, v, actor, sch, payload
                 FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[],
                             $7::int[], $8::jsonb[]) AS u(id, ms, t, agg, v, actor, sch, payload)
                 ON CONFLICT DO NOTHING
                 RETURNING event_id",
            &[&ids, &ms, &types, &aggregates, &versions, &actors, &schemas, &payloads],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
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
        apply_presence_batch(client, &presence).await?;
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

async fn apply_presence_batch(
    client: &impl Sql,
    events: &[(&Event, &AgentPresence, &str)],
) -> Result<(), ApplyError> {
    let ids: Vec<uuid::Uuid> = events.iter().map(|(e, _, _)| e.event_id).collect();
    let agents: Vec<&str> = events.iter().map(|(_, p, _)| p.agent_id.as_str()).collect();
    let statuses: Vec<&str> = events.iter().map(|(_, _, s)| *s).collect();
    let versions: Vec<i64> = events.iter().map(|(e, _, _)| e.version).collect();
    let reasons: Vec<&str> = events.iter().map(|(_, p, _)| p.reason.as_str()).collect();
    let ms: Vec<i64> = events.iter().map(|(e, _, _)| e.occurred_at).collect();
    client
        .execute(
            "INSERT INTO agent_status_history (event_id, agent_id, status, version, reason, occurred_at)
             SELECT id, agent, status, v, reason, 'epoch'::timestamptz + ms * interval '1 millisecond'
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[])
               AS u(id, agent, status, v, reason, ms)
             ON CONFLICT (event_id) DO NOTHING",
            &[&ids, &agents, &statuses, &versions, &reasons, &ms],
        )
        .await?;
    // One row per agent, in agent order (replicas lock rows in one order): the newest status
    // of the batch against the stored one, and every transition counted.
    let newer = "agents.status_version < EXCLUDED.status_version";
    client
        .execute(
            &format!(
                "INSERT INTO agents (agent_id, status, status_changed_at, status_version, status_changes)
                 SELECT agent, (array_agg(status ORDER BY v DESC))[1],
                        'epoch'::timestamptz + (array_agg(ms ORDER BY v DESC))[1] * interval '1 millisecond',
                        max(v), count(*)
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS u(agent, status, v, ms)
                 GROUP BY agent ORDER BY agent
                 ON CONFLICT (agent_id) DO UPDATE SET
                    status = CASE WHEN {newer} THEN EXCLUDED.status ELSE agents.status END,
                    status_changed_at = CASE WHEN {newer} THEN EXCLUDED.status_changed_at
                                             ELSE agents.status_changed_at END,
                    status_version = GREATEST(agents.status_version, EXCLUDED.status_version),
                    status_changes = agents.status_changes + EXCLUDED.status_changes"
            ),
            &[&agents, &statuses, &versions, &ms],
        )
        .await?;
    Ok(())
}

/// Read an event back from its `events` row.
fn event_from_row(row: &tokio_postgres::Row) -> Result<Event, DecodeError> {
    let envelope = serde_json::json!({
        "event_id": row.get::<_, uuid::Uuid>("event_id"),
        "aggregate_id": row.get::<_, String>("aggregate_id"),
        "version": row.get::<_, i64>("version"),
        "occurred_at": row.get::<_, i64>("occurred_ms"),
        "actor": row.get::<_, String>("actor"),
        "schema": row.get::<_, i32>("schema"),
        "type": row.get::<_, String>("type"),
        "payload": row.get::<_, serde_json::Value>("payload"),
    });
    Event::decode(envelope)
}

/// What a rebuild did.
pub use checkplane_runtime::launch::Rebuilt as RebuildReport;

/// [`rebuild`] as the binaries' `rebuild` command runs it
/// ([`checkplane_runtime::Service::rebuild`]).
pub async fn rebuild_command(mut client: tokio_postgres::Client) -> Result<RebuildReport, String> {
    rebuild(&mut client)
        .await
        .map_err(|e| checkplane_runtime::error_chain(&e))
}

/// Truncate the projection tables and replay `events` into them, in one transaction: readers
/// see the old tables until the new ones are complete. Events that fail to apply are counted
/// and logged, and the rebuild goes on (they would be parked by the projector too).
pub async fn rebuild(client: &mut tokio_postgres::Client) -> Result<RebuildReport, ApplyError> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("TRUNCATE {}", PROJECTION_TABLES.join(", ")))
        .await?;
    let portal = tx
        .bind(
            "SELECT event_id, aggregate_id, version, actor, schema, type, payload,
                    (extract(epoch FROM occurred_at) * 1000)::bigint AS occurred_ms
             FROM events
             ORDER BY occurred_at,
                      -- within a millisecond, what the edge recorded (a check, its retries)
                      -- before the lease events of the tasks it made
                      (type LIKE 'lease.%' OR type = 'task.dead_lettered'),
                      event_id",
            &[],
        )
        .await?;
    let mut report = RebuildReport {
        events: 0,
        failed: 0,
    };
    loop {
        let rows = tx.query_portal(&portal, 1000).await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            report.events += 1;
            let event = match event_from_row(row) {
                Ok(event) => event,
                Err(error) => {
                    report.failed += 1;
                    tracing::warn!(%error, "rebuild: undecodable event skipped");
                    continue;
                }
            };
            tx.batch_execute("SAVEPOINT replay").await?;
            match apply(&tx, &event).await {
                Ok(()) => tx.batch_execute("RELEASE SAVEPOINT replay").await?,
                Err(error) => {
                    report.failed += 1;
                    tracing::warn!(event_id = %event.event_id, error = %checkplane_runtime::error_chain(&error), "rebuild: event failed to apply");
                    tx.batch_execute("ROLLBACK TO SAVEPOINT replay").await?;
                }
            }
        }
        if report.events % 100_000 < 1000 {
            tracing::info!(events = report.events, "rebuild progress");
        }
    }
    tx.commit().await?;
    Ok(report)
}

/// Every projection table as sorted JSON rows, all columns: two states are equal when their
/// dumps are.
pub async fn canonical_dump(client: &impl Sql) -> Result<Vec<(String, Vec<String>)>, ApplyError> {
    canonical_dump_of(client, PROJECTION_TABLES).await
}

/// [`canonical_dump`] of some of the projection tables.
pub async fn canonical_dump_of(
    client: &impl Sql,
    tables: &[&str],
) -> Result<Vec<(String, Vec<String>)>, ApplyError> {
    let mut dump = Vec::new();
    for table in tables {
        let cursors: String = DELIVERY_CURSORS
            .iter()
            .filter(|(t, _)| t == table)
            .map(|(_, column)| format!(" - '{column}'"))
            .collect();
        let rows = client
            .query(
                &format!("SELECT (to_jsonb(t){cursors})::text FROM {table} t ORDER BY 1"),
                &[],
            )
            .await?;
        dump.push((
            (*table).to_owned(),
            rows.iter().map(|r| r.get::<_, String>(0)).collect(),
        ));
    }
    Ok(dump)
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
