//! Checks and their slots: `check.created` makes them; the lease events of a check's tasks
//! (task id `<check>:<slot>:<attempt>`) move each slot along. Only the slot's current attempt
//! counts, and a slot ends once, so a late or repeated event changes nothing.
//!
//! A slot's end bumps the check's `seq` under the check row's lock, inside the same
//! transaction: results become visible in `seq` order even when projector replicas commit
//! concurrently, which is what lets a live reader resume after the last `seq` it saw.

use checkplane_wire::checks::parse_task_id;
use checkplane_wire::events::{
    CheckCancelled, CheckCreated, CheckSlotRetried, CheckSlotsReleased, Event,
};
use tokio_postgres::GenericClient;

use super::{ApplyError, AT};

/// What a lease event says of its slot.
pub(super) enum SlotChange<'a> {
    /// The task was leased: the slot (and the check) are under way.
    Leased,
    /// The attempt was interrupted (its agent went away): the slot waits for a retry, which
    /// the scheduler's lifecycle decides.
    Interrupted { outcome: &'a str },
    /// The attempt ended.
    Ended {
        outcome: &'a str,
        result: Option<&'a serde_json::Value>,
    },
}

pub(super) async fn apply_created(
    client: &impl GenericClient,
    event: &Event,
    e: &CheckCreated,
) -> Result<(), ApplyError> {
    let inserted = client
        .execute(
            &format!(
                "INSERT INTO checks (check_id, kind, target, options, selection, status, slots,
                                     created_at, created_by, deadline, max_parallel)
                 VALUES ($2, $3, $4, $5, $6, 'queued', $7, {AT}, $8,
                         'epoch'::timestamptz + $9::bigint * interval '1 millisecond', $10)
                 ON CONFLICT (check_id) DO NOTHING"
            ),
            &[
                &event.occurred_at,
                &e.check_id,
                &e.kind,
                &e.target,
                &e.options,
                &e.selection,
                &i32::try_from(e.slots.len()).unwrap_or(i32::MAX),
                &event.actor,
                &e.deadline,
                &e.max_parallel.map(|n| i32::try_from(n).unwrap_or(i32::MAX)),
            ],
        )
        .await?;
    if inserted == 0 {
        return Ok(());
    }
    let slots: Vec<i32> = e.slots.iter().map(|s| s.slot as i32).collect();
    let sent = e.first_wave().len();
    let statuses: Vec<&str> = (0..e.slots.len())
        .map(|i| if i < sent { "pending" } else { "waiting" })
        .collect();
    let agents: Vec<&str> = e.slots.iter().map(|s| s.agent_id.as_str()).collect();
    let constraints: Vec<Option<i32>> = e
        .slots
        .iter()
        .map(|s| s.constraint.map(|c| c as i32))
        .collect();
    let countries: Vec<Option<&str>> = e
        .slots
        .iter()
        .map(|s| s.location.country.as_deref())
        .collect();
    let cities: Vec<Option<&str>> = e.slots.iter().map(|s| s.location.city.as_deref()).collect();
    let asns: Vec<Option<i64>> = e
        .slots
        .iter()
        .map(|s| s.location.asn.map(i64::from))
        .collect();
    let networks: Vec<Option<&str>> = e
        .slots
        .iter()
        .map(|s| s.location.network.as_deref())
        .collect();
    client
        .execute(
            "INSERT INTO check_slots (check_id, slot, attempt, agent_id, constraint_index, status,
                                      country, city, asn, network)
             SELECT $1, s, 1, a, c, st, co, ci, asn, n
             FROM unnest($2::int[], $3::text[], $4::int[], $5::text[], $6::text[], $7::bigint[],
                         $8::text[], $9::text[]) AS u(s, a, c, co, ci, asn, n, st)
             ON CONFLICT DO NOTHING",
            &[
                &e.check_id,
                &slots,
                &agents,
                &constraints,
                &countries,
                &cities,
                &asns,
                &networks,
                &statuses,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn apply_slot(
    client: &impl GenericClient,
    event: &Event,
    task: &str,
    change: SlotChange<'_>,
) -> Result<(), ApplyError> {
    // A task of no check (a test's, a benchmark's) has nothing more to update.
    let Some((check, slot, attempt)) = parse_task_id(task) else {
        return Ok(());
    };
    let (slot, attempt) = (slot as i32, attempt as i32);
    match change {
        SlotChange::Leased => {
            client
                .execute(
                    &format!(
                        "WITH s AS (
                            UPDATE check_slots SET status = 'leased',
                                   started_at = COALESCE(started_at, {AT})
                            WHERE check_id = $2 AND slot = $3 AND attempt = $4
                              AND status IN ('pending', 'waiting')
                            RETURNING 1)
                         UPDATE checks SET revision = revision + 1,
                                status = CASE WHEN status = 'queued' THEN 'in_progress' ELSE status END
                         WHERE check_id = $2 AND EXISTS (SELECT 1 FROM s)"
                    ),
                    &[&event.occurred_at, &check, &slot, &attempt],
                )
                .await?;
        }
        SlotChange::Interrupted { outcome } => {
            client
                .execute(
                    &format!(
                        "WITH s AS (
                            UPDATE check_slots SET status = 'retrying', outcome = $5, done_at = {AT}
                            WHERE check_id = $2 AND slot = $3 AND attempt = $4
                              AND status IN ('pending', 'waiting', 'leased')
                            RETURNING 1)
                         UPDATE checks SET revision = revision + 1
                         WHERE check_id = $2 AND EXISTS (SELECT 1 FROM s)"
                    ),
                    &[&event.occurred_at, &check, &slot, &attempt, &outcome],
                )
                .await?;
        }
        SlotChange::Ended { outcome, result } => {
            let ended = client
                .execute(
                    &format!(
                        "UPDATE check_slots SET status = 'done', outcome = $5, result = $6::jsonb,
                                done_at = {AT}
                         WHERE check_id = $2 AND slot = $3 AND attempt = $4 AND status <> 'done'"
                    ),
                    &[
                        &event.occurred_at,
                        &check,
                        &slot,
                        &attempt,
                        &outcome,
                        &result,
                    ],
                )
                .await?;
            if ended == 0 {
                return Ok(());
            }
            // Under the check row's lock until commit: the next result gets the next seq only
            // after this one is visible.
            let row = client
                .query_one(
                    "UPDATE checks SET seq = seq + 1, slots_done = slots_done + 1,
                            revision = revision + 1,
                            status = CASE WHEN slots_done + 1 >= slots THEN 'finished'
                                          ELSE 'in_progress' END
                     WHERE check_id = $1
                     RETURNING seq, status = 'finished'",
                    &[&check],
                )
                .await?;
            let (seq, finished): (i64, bool) = (row.get(0), row.get(1));
            client
                .execute(
                    "UPDATE check_slots SET seq = $3 WHERE check_id = $1 AND slot = $2",
                    &[&check, &slot, &seq],
                )
                .await?;
            if finished {
                // The latest end, whatever order the ends were applied in.
                client
                    .execute(
                        "UPDATE checks SET finished_at =
                            (SELECT max(done_at) FROM check_slots WHERE check_id = $1)
                         WHERE check_id = $1",
                        &[&check],
                    )
                    .await?;
            }
        }
    }
    Ok(())
}

pub(super) async fn apply_retried(
    client: &impl GenericClient,
    event: &Event,
    e: &CheckSlotRetried,
) -> Result<(), ApplyError> {
    let previous = e.attempt as i32 - 1;
    client
        .execute(
            "WITH s AS (
                UPDATE check_slots SET attempt = $3, agent_id = $4, status = 'pending',
                       outcome = NULL, result = NULL, started_at = NULL, done_at = NULL,
                       country = $5, city = $6, asn = $7, network = $8
                WHERE check_id = $1 AND slot = $2 AND attempt = $9 AND status = 'retrying'
                RETURNING 1)
             UPDATE checks SET revision = revision + 1
             WHERE check_id = $1 AND EXISTS (SELECT 1 FROM s)",
            &[
                &e.check_id,
                &(e.slot as i32),
                &(e.attempt as i32),
                &e.agent_id,
                &e.location.country,
                &e.location.city,
                &e.location.asn.map(i64::from),
                &e.location.network,
                &previous,
            ],
        )
        .await?;
    let _ = event;
    Ok(())
}

pub(super) async fn apply_cancelled(
    client: &impl GenericClient,
    event: &Event,
    e: &CheckCancelled,
) -> Result<(), ApplyError> {
    client
        .execute(
            &format!(
                "UPDATE checks SET cancelled_at = LEAST(COALESCE(cancelled_at, {AT}), {AT}),
                        revision = revision + 1
                 WHERE check_id = $2"
            ),
            &[&event.occurred_at, &e.check_id],
        )
        .await?;
    Ok(())
}

pub(super) async fn apply_released(
    client: &impl GenericClient,
    e: &CheckSlotsReleased,
) -> Result<(), ApplyError> {
    let slots: Vec<i32> = e.slots.iter().map(|(s, _)| *s as i32).collect();
    client
        .execute(
            "WITH s AS (
                UPDATE check_slots SET status = 'pending'
                WHERE check_id = $1 AND slot = ANY($2) AND attempt = 1 AND status = 'waiting'
                RETURNING 1)
             UPDATE checks SET revision = revision + 1
             WHERE check_id = $1 AND EXISTS (SELECT 1 FROM s)",
            &[&e.check_id, &slots],
        )
        .await?;
    Ok(())
}
