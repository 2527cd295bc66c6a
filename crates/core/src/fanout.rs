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

/// First attempts of `slots` (slot, agent): one enqueue script per shard, pipelined.
async fn enqueue_first<'a>(
    conn: &(impl redis::aio::ConnectionLike + Clone + Send),
    leases: &Leases,
    spec: impl Fn(u32) -> TaskSpec,
    slots: impl Iterator<Item = (u32, &'a str)>,
) -> redis::RedisResult<()> {
    let mut tasks = Vec::new();
    for (slot, agent) in slots {
        let spec = spec(slot);
        let id = task_id(spec.check_id, spec.slot, spec.attempt);
        tasks.push((agent, spec.kind.clone(), id, serialised(&spec)?));
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
    leases.enqueue_tasks(conn, &tasks).await.map(|_| ())
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
