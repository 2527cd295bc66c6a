//! Fan-out: a check's tasks added to its agents' task streams, each once (by task id), and
//! their doorbells rung. Run by the gateway right after the check's transaction commits (the
//! first `max_parallel` slots), by the scheduler for released slots and retries, and by the
//! outbox sweep for an event whose writer died before it was done.

use checkplane_wire::checks::{task_id, TaskSpec};
use checkplane_wire::events::{CheckCreated, CheckSlotRetried, CheckSlotsReleased, EventBody};

use crate::leases::{Leases, NewTask};

fn serialised(spec: &TaskSpec) -> redis::RedisResult<String> {
    serde_json::to_string(spec).map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::Client,
            "serialising a task spec",
            e.to_string(),
        ))
    })
}

/// Add one attempt's task to `agent`'s stream, once.
async fn enqueue(
    conn: &(impl redis::aio::ConnectionLike + Clone + Send),
    leases: &Leases,
    agent: &str,
    spec: &TaskSpec,
) -> redis::RedisResult<()> {
    let body = serialised(spec)?;
    leases
        .enqueue_task(
            &mut conn.clone(),
            agent,
            &spec.kind,
            &task_id(spec.check_id, spec.slot, spec.attempt),
            &body,
        )
        .await
        .map(|_| ())
}

/// Each (agent, spec)'s task added once: one enqueue script per shard, pipelined. The
/// script's answers, in order (an entry id, or `closed`).
async fn enqueue_specs<A: AsRef<str>>(
    conn: &(impl redis::aio::ConnectionLike + Clone + Send),
    leases: &Leases,
    specs: &[(A, TaskSpec)],
) -> redis::RedisResult<Vec<String>> {
    let mut tasks = Vec::with_capacity(specs.len());
    for (agent, spec) in specs {
        let id = task_id(spec.check_id, spec.slot, spec.attempt);
        tasks.push((agent.as_ref(), spec.kind.as_str(), id, serialised(spec)?));
    }
    let tasks: Vec<NewTask<'_>> = tasks
        .iter()
        .map(|(agent, kind, task, spec)| NewTask {
            agent,
            kind,
            task,
            spec,
        })
        .collect();
    leases.enqueue_tasks(conn, &tasks).await
}

/// First attempts of `slots` (slot, agent): one enqueue script per shard, pipelined.
async fn enqueue_first<'a>(
    conn: &(impl redis::aio::ConnectionLike + Clone + Send),
    leases: &Leases,
    spec: impl Fn(u32) -> TaskSpec,
    slots: impl Iterator<Item = (u32, &'a str)>,
) -> redis::RedisResult<()> {
    let specs: Vec<(&str, TaskSpec)> = slots.map(|(slot, agent)| (agent, spec(slot))).collect();
    enqueue_specs(conn, leases, &specs).await.map(|_| ())
}

/// Add the first attempt of every slot sent at creation (the first `max_parallel`).
pub async fn enqueue_check(
    conn: &(impl redis::aio::ConnectionLike + Clone + Send),
    leases: &Leases,
    check: &CheckCreated,
) -> redis::RedisResult<()> {
    let spec = |slot| TaskSpec {
        check_id: check.check_id,
        slot,
        attempt: 1,
        kind: check.kind.clone(),
        target: check.target.clone(),
        options: check.options.clone(),
        deadline_ms: check.deadline,
    };
    let slots = check
        .first_wave()
        .iter()
        .map(|s| (s.slot, s.agent_id.as_str()));
    enqueue_first(conn, leases, spec, slots).await
}

/// Add the first attempt of every released slot.
pub async fn enqueue_released(
    conn: &(impl redis::aio::ConnectionLike + Clone + Send),
    leases: &Leases,
    released: &CheckSlotsReleased,
) -> redis::RedisResult<()> {
    let spec = |slot| TaskSpec {
        check_id: released.check_id,
        slot,
        attempt: 1,
        kind: released.kind.clone(),
        target: released.target.clone(),
        options: released.options.clone(),
        deadline_ms: released.deadline,
    };
    let slots = released.slots.iter().map(|(s, a)| (*s, a.as_str()));
    enqueue_first(conn, leases, spec, slots).await
}

/// A retried slot's new attempt, added once.
pub async fn enqueue_retry(
    conn: &(impl redis::aio::ConnectionLike + Clone + Send),
    leases: &Leases,
    retry: &CheckSlotRetried,
) -> redis::RedisResult<()> {
    let spec = TaskSpec {
        check_id: retry.check_id,
        slot: retry.slot,
        attempt: retry.attempt,
        kind: retry.kind.clone(),
        target: retry.target.clone(),
        options: retry.options.clone(),
        deadline_ms: retry.deadline,
    };
    enqueue(conn, leases, &retry.agent_id, &spec).await
}

/// The Redis effects of an edge event, if it has any: what the outbox sweep runs before it
/// publishes the event.
pub async fn effects(
    conn: &(impl redis::aio::ConnectionLike + Clone + Send),
    leases: &Leases,
    body: &EventBody,
) -> redis::RedisResult<()> {
    match body {
        EventBody::CheckCreated(check) => enqueue_check(conn, leases, check).await,
        EventBody::CheckSlotRetried(retry) => enqueue_retry(conn, leases, retry).await,
        EventBody::CheckSlotsReleased(released) => enqueue_released(conn, leases, released).await,
        _ => Ok(()),
    }
}

/// What [`requeue_open_slots`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Requeued {
    /// Open slots found (pending or leased, on an agent, of a check still running): each
    /// one's task is in its agent's stream now, but the `closed` ones.
    pub slots: u64,
    /// Of those, tasks Redis refused as closed (their lease ended there already).
    pub closed: u64,
    /// Checks they belong to.
    pub checks: u64,
}

/// After Redis lost its data (restored empty or from an old snapshot): add again, to its
/// agent's task stream, the current attempt of every slot PostgreSQL has open (pending or
/// leased, of a check neither finished, cancelled nor past its deadline). A task Redis still
/// has is not added twice (the enqueue script knows it by its id), so running this when
/// nothing was lost changes nothing. A lease Redis lost ends with it: its agent's late report
/// is refused, the slot's task runs again and reports once. Slots waiting for their turn
/// (`max_parallel`) and slots waiting for a retry are the scheduler's as ever. `progress` is
/// called after every batch with the running totals.
pub async fn requeue_open_slots(
    pg: &impl checkplane_runtime::db::Sql,
    conn: &(impl redis::aio::ConnectionLike + Clone + Send),
    leases: &Leases,
    mut progress: impl FnMut(Requeued),
) -> Result<Requeued, RequeueError> {
    const BATCH: i64 = 500;
    let mut done = Requeued::default();
    let mut checks = std::collections::HashSet::new();
    let mut after: (uuid::Uuid, i32) = (uuid::Uuid::nil(), -1);
    loop {
        let rows = pg
            .query(
                "SELECT s.check_id, s.slot, s.attempt, s.agent_id, c.kind, c.target, c.options,
                        cp_ms(c.deadline) AS deadline_ms
                 FROM check_slots s JOIN checks c USING (check_id)
                 WHERE s.status IN ('pending', 'leased') AND s.agent_id IS NOT NULL
                   AND c.status <> 'finished' AND c.cancelled_at IS NULL AND c.deadline > now()
                   AND (s.check_id, s.slot) > ($1, $2)
                 ORDER BY s.check_id, s.slot LIMIT $3",
                &[&after.0, &after.1, &BATCH],
            )
            .await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = (last.get("check_id"), last.get("slot"));
        let mut specs = Vec::with_capacity(rows.len());
        for row in &rows {
            let spec = TaskSpec {
                check_id: row.get("check_id"),
                slot: u32::try_from(row.get::<_, i32>("slot")).unwrap_or(0),
                attempt: u32::try_from(row.get::<_, i32>("attempt")).unwrap_or(1),
                kind: row.get("kind"),
                target: row.get("target"),
                options: row.get("options"),
                deadline_ms: row.get("deadline_ms"),
            };
            checks.insert(spec.check_id);
            specs.push((row.get::<_, String>("agent_id"), spec));
        }
        let answers = enqueue_specs(conn, leases, &specs).await?;
        done.slots += rows.len() as u64;
        done.closed += answers.iter().filter(|a| *a == "closed").count() as u64;
        done.checks = checks.len() as u64;
        progress(done);
    }
    Ok(done)
}

/// Why a requeue stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequeueError {
    #[error("PostgreSQL")]
    Pg(#[from] tokio_postgres::Error),
    #[error("Redis")]
    Redis(#[from] redis::RedisError),
}
