//! Checks and their slots: `check.created` makes them; the lease events of a check's tasks
//! (task id `<check>:<slot>:<attempt>`) move each slot along. Only the slot's current attempt
//! counts, and a slot ends once, so a late or repeated event changes nothing.
//!
//! A slot's end bumps the check's `seq` under the check row's lock, inside the same
//! transaction: results become visible in `seq` order even when projector replicas commit
//! concurrently, which is what lets a live reader resume after the last `seq` it saw.

use checkplane_runtime::db::Sql;
use checkplane_wire::events::{
    CheckCancelled, CheckCreated, CheckSlotRetried, CheckSlotsReleased, Event,
};
use uuid::Uuid;

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
    client: &impl Sql,
    event: &Event,
    e: &CheckCreated,
) -> Result<(), ApplyError> {
    let inserted = client
        .execute(
            &format!(
                "INSERT INTO checks (check_id, kind, target, options, selection, status, slots,
                                     created_at, created_by, deadline, max_parallel)
                 VALUES ($2, $3, $4, $5, $6, 'queued', $7, {AT}, $8,
                         cp_at_ms($9::bigint), $10)
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

/// One lease event's (or scheduler event's) change of one slot attempt.
pub(crate) struct SlotUpdate<'a> {
    /// When it happened (ms since the epoch).
    pub at_ms: i64,
    /// (check, slot, attempt)
    pub slot: (Uuid, u32, u32),
    pub change: SlotChange<'a>,
}

const LOCK: &str = "SELECT 1 FROM checks WHERE check_id = ANY($1) ORDER BY check_id FOR UPDATE";
const GRANT: &str = "UPDATE check_slots s
     SET status = CASE WHEN s.status IN ('pending', 'waiting') THEN 'leased'
                       ELSE s.status END,
         started_at = LEAST(s.started_at,
                            cp_at_ms(u.ms))
     FROM (SELECT DISTINCT ON (c, sl, at) c, sl, at, ms
           FROM unnest($1::uuid[], $2::int[], $3::int[], $4::bigint[]) AS i(c, sl, at, ms)
           ORDER BY c, sl, at, ms) u
     WHERE s.check_id = u.c AND s.slot = u.sl AND s.attempt = u.at
       AND s.check_id = ANY($5)";
const INTERRUPT: &str = "UPDATE check_slots s SET status = 'retrying', outcome = u.oc,
            done_at = cp_at_ms(u.ms)
     FROM (SELECT DISTINCT ON (c, sl, at) c, sl, at, ms, oc
           FROM unnest($1::uuid[], $2::int[], $3::int[], $4::bigint[], $5::text[])
                WITH ORDINALITY AS i(c, sl, at, ms, oc, ord)
           ORDER BY c, sl, at, ord) u
     WHERE s.check_id = u.c AND s.slot = u.sl AND s.attempt = u.at
       AND s.status IN ('pending', 'waiting', 'leased') AND s.check_id = ANY($6)";
/// Each ending slot gets its check's next seq, in the order given.
const END: &str = "UPDATE check_slots s SET status = 'done', outcome = u.oc, result = u.res,
            done_at = cp_at_ms(u.ms),
            seq = u.base + u.rank
     FROM (SELECT d.*, k.seq AS base,
                  row_number() OVER (PARTITION BY d.c ORDER BY d.ord) AS rank
           FROM (SELECT DISTINCT ON (i.c, i.sl) i.*
                 FROM unnest($1::uuid[], $2::int[], $3::int[], $4::bigint[], $5::text[],
                             $6::jsonb[]) WITH ORDINALITY AS i(c, sl, at, ms, oc, res, ord)
                 JOIN check_slots o ON o.check_id = i.c AND o.slot = i.sl
                                   AND o.attempt = i.at AND o.status <> 'done'
                                   AND o.check_id = ANY($7)
                 ORDER BY i.c, i.sl, i.ord) d
           JOIN checks k ON k.check_id = d.c AND k.check_id = ANY($7)) u
     WHERE s.check_id = u.c AND s.slot = u.sl AND s.check_id = ANY($7)";
const COUNT: &str = "UPDATE checks c SET seq = GREATEST(c.seq, t.seq), slots_done = t.done,
            revision = c.revision + 1,
            status = CASE WHEN t.done >= c.slots THEN 'finished'
                          WHEN t.started > 0 THEN 'in_progress'
                          ELSE c.status END,
            finished_at = CASE WHEN t.done >= c.slots THEN t.last_end
                               ELSE c.finished_at END
     FROM (SELECT check_id, COALESCE(max(seq), 0) AS seq,
                  count(*) FILTER (WHERE status = 'done') AS done,
                  count(*) FILTER (WHERE status NOT IN ('pending', 'waiting')) AS started,
                  max(done_at) FILTER (WHERE status = 'done') AS last_end
           FROM check_slots WHERE check_id = ANY($1) GROUP BY check_id) t
     WHERE c.check_id = t.check_id AND c.check_id = ANY($1)";

/// Move slots along: at most five statements whatever the number of changes and checks, sent
/// as one pipeline (no statement's parameters depend on another's answer, and PostgreSQL runs
/// them in the order sent), so a batch waits for one round trip rather than five. A kind of
/// change the batch has none of (most batches interrupt nothing) costs no statement: each
/// planned afresh for its arrays, they were a third of a batch's planning time.
///
/// The changed checks' rows are locked first, in check id order, and held to commit: so
/// replicas never deadlock on them, and the `seq` numbers one transaction hands out (its
/// ends, in the order given) become visible only after every smaller one. Then grants,
/// interruptions and ends (only the slot's current attempt counts, and a slot ends once: the
/// first end given wins; a grant applied after its end still records the earliest start, so
/// `started_at` does not depend on the order), and last the checks' counters, derived from
/// their slots.
pub(super) async fn apply_slots(
    client: &impl Sql,
    changes: &[SlotUpdate<'_>],
) -> Result<(), ApplyError> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut checks: Vec<Uuid> = changes.iter().map(|c| c.slot.0).collect();
    checks.sort_unstable();
    checks.dedup();

    let columns = |keep: &dyn Fn(&SlotChange<'_>) -> bool| {
        let picked: Vec<&SlotUpdate<'_>> = changes.iter().filter(|c| keep(&c.change)).collect();
        let ids: Vec<Uuid> = picked.iter().map(|c| c.slot.0).collect();
        let slots: Vec<i32> = picked.iter().map(|c| c.slot.1 as i32).collect();
        let attempts: Vec<i32> = picked.iter().map(|c| c.slot.2 as i32).collect();
        let ms: Vec<i64> = picked.iter().map(|c| c.at_ms).collect();
        (ids, slots, attempts, ms)
    };
    let leased = columns(&|c| matches!(c, SlotChange::Leased));
    let interrupted = columns(&|c| matches!(c, SlotChange::Interrupted { .. }));
    let interrupted_outcomes: Vec<&str> = changes
        .iter()
        .filter_map(|c| match c.change {
            SlotChange::Interrupted { outcome } => Some(outcome),
            _ => None,
        })
        .collect();
    let ended = columns(&|c| matches!(c, SlotChange::Ended { .. }));
    let (ended_outcomes, ended_results): (Vec<&str>, Vec<Option<&serde_json::Value>>) = changes
        .iter()
        .filter_map(|c| match c.change {
            SlotChange::Ended { outcome, result } => Some((outcome, result)),
            _ => None,
        })
        .unzip();

    type Params<'p> = Vec<&'p (dyn tokio_postgres::types::ToSql + Sync)>;
    let lock_params: Params<'_> = vec![&checks];
    // Each statement also says which checks it is about (`check_id = ANY(checks)`), so the
    // planner reads those checks and their slots by index whatever it believes of the
    // tables' sizes: left to the join alone, a table it thinks small (fresh, never analyzed)
    // is read whole for every batch.
    let grant_params: Params<'_> = vec![&leased.0, &leased.1, &leased.2, &leased.3, &checks];
    let interrupt_params: Params<'_> = vec![
        &interrupted.0,
        &interrupted.1,
        &interrupted.2,
        &interrupted.3,
        &interrupted_outcomes,
        &checks,
    ];
    let end_params: Params<'_> = vec![
        &ended.0,
        &ended.1,
        &ended.2,
        &ended.3,
        &ended_outcomes,
        &ended_results,
        &checks,
    ];
    // Executions run in the order sent only when every statement is prepared already (see
    // `Sql::prepare`): one skipped so far would be sent a round trip late, after the counters.
    futures::future::try_join_all(
        [LOCK, GRANT, INTERRUPT, END, COUNT].map(|sql| client.prepare(sql)),
    )
    .await?;
    let lock = client.execute(LOCK, &lock_params);
    let grant = unless_none(leased.0.len(), client.execute(GRANT, &grant_params));
    let interrupt = unless_none(
        interrupted.0.len(),
        client.execute(INTERRUPT, &interrupt_params),
    );
    let end = unless_none(ended.0.len(), client.execute(END, &end_params));
    // The counters follow from the slots, so they need no answer from the statements
    // before; `finished_at` is the latest slot end, whatever order the ends came in. The
    // revision (the ETag) moves for every check the batch touched.
    let count = client.execute(COUNT, &lock_params);
    let (locked, granted, interrupted, ended, counted) =
        futures::join!(lock, grant, interrupt, end, count);
    for done in [locked, granted, interrupted, ended, counted] {
        done?;
    }
    Ok(())
}

/// `statement`, unless it would change no rows (`rows` is the length of its input arrays): an
/// unpolled statement future sends nothing.
async fn unless_none(
    rows: usize,
    statement: impl std::future::Future<Output = Result<u64, tokio_postgres::Error>>,
) -> Result<u64, tokio_postgres::Error> {
    if rows == 0 {
        Ok(0)
    } else {
        statement.await
    }
}

pub(super) async fn apply_retried(
    client: &impl Sql,
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
    client: &impl Sql,
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
    client: &impl Sql,
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
