//! Task rows from lease events, and the check slots those events move.

use checkplane_runtime::db::Sql;
use checkplane_wire::events::{Event, EventBody};
use checkplane_wire::leases::LeaseToken;

use super::checks::{SlotChange, SlotUpdate};
use super::{ApplyError, AT};

/// The check slot a lease event moves, if its task belongs to a check (task id
/// `<check>:<slot>:<attempt>`; a test's or a benchmark's task has none).
pub(super) fn slot_change(event: &Event) -> Option<SlotUpdate<'_>> {
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

/// What a lease event says of its task row.
pub(super) struct TaskChange<'a> {
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
pub(super) fn task_change(event: &Event) -> Option<TaskChange<'_>> {
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
pub(super) async fn apply_tasks(
    client: &impl Sql,
    changes: &[TaskChange<'_>],
) -> Result<(), ApplyError> {
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
    let ts = |v: &str| format!("cp_at_ms({v})");
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

pub(super) async fn apply_extended(
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
                             cp_at_ms($6::bigint), {AT}, 0)
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
