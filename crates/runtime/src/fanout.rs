//! Fan-out: a new check's tasks added to its agents' task streams, each once (by task id), and
//! their doorbells rung. Run by the gateway right after the check's transaction commits, and
//! by the scheduler's outbox sweep for a check whose gateway died before it was done.

use checkplane_wire::checks::{task_id, TaskSpec};
use checkplane_wire::events::{CheckCreated, CheckSlotRetried, EventBody};

use crate::leases::Leases;

/// Add every slot's first attempt; concurrent calls on a multiplexed connection pipeline.
pub async fn enqueue_check(
    conn: &(impl redis::aio::ConnectionLike + Clone + Send),
    leases: &Leases,
    check: &CheckCreated,
) -> redis::RedisResult<()> {
    let adds = check.slots.iter().map(|slot| {
        let mut conn = conn.clone();
        let spec = TaskSpec {
            check_id: check.check_id,
            slot: slot.slot,
            attempt: 1,
            kind: check.kind.clone(),
            target: check.target.clone(),
            options: check.options.clone(),
            deadline_ms: check.deadline,
        };
        async move {
            let spec = serde_json::to_string(&spec).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "serialising a task spec",
                    e.to_string(),
                ))
            })?;
            leases
                .enqueue_task(
                    &mut conn,
                    &slot.agent_id,
                    &check.kind,
                    &task_id(check.check_id, slot.slot, 1),
                    &spec,
                )
                .await
        }
    });
    for added in futures::future::join_all(adds).await {
        added?;
    }
    Ok(())
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
    let spec = serde_json::to_string(&spec).map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::Client,
            "serialising a task spec",
            e.to_string(),
        ))
    })?;
    leases
        .enqueue_task(
            &mut conn.clone(),
            &retry.agent_id,
            &retry.kind,
            &task_id(retry.check_id, retry.slot, retry.attempt),
            &spec,
        )
        .await
        .map(|_| ())
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
        _ => Ok(()),
    }
}
