//! The life of a check after its creation, one pass at a time (any number of replicas):
//!
//! - **deadline and cancel**: every open slot of a check past its deadline (or cancelled) is
//!   closed with the close script, so a later report is fenced; what the close script ends is
//!   projected from its `lease.closed`. Whatever is still open `CLOSE_GRACE` later (a task
//!   never sent, a report whose event is still on its way and was lost) is ended in PostgreSQL
//!   by `check.slots_closed` as `timeout` / `cancelled`;
//! - **retries**: a slot whose attempt was interrupted (`lease_expired`, `offline`) waits
//!   `RETRY_BACKOFF` (its end time is in the row, so the wait survives a restart), then gets a
//!   new attempt on another matching agent (`check.slot_retried`, fanned out like a new check)
//!   until `MAX_RETRIES`; with no retry left it ends with the interruption, with no agent
//!   `no_agent`.

use std::collections::HashSet;
use std::time::Duration;

use checkplane_runtime::clock::now_ms;
use checkplane_runtime::keys::Keys;
use checkplane_runtime::leases::{CloseReason, Leases};
use checkplane_runtime::outbox::PUBLISH_TIMEOUT;
use checkplane_runtime::selection::{candidates, record_selected, spread};
use checkplane_runtime::{fanout, outbox};
use checkplane_wire::checks::{task_id, LocationRequest, Selection};
use checkplane_wire::events::{CheckSlotRetried, CheckSlotsClosed, Event, EventBody};
use uuid::Uuid;

/// How long after closing in Redis the scheduler ends what is still open in PostgreSQL.
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);
/// Most checks (deadlines) and slots (retries) handled per pass.
const BATCH: i64 = 100;

/// Why a lifecycle pass failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("PostgreSQL")]
    Pg(#[from] tokio_postgres::Error),
    #[error("PostgreSQL pool")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("Redis")]
    Redis(#[from] redis::RedisError),
    #[error("applying an event")]
    Apply(#[from] checkplane_runtime::projection::ApplyError),
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Slots closed in Redis (deadline or cancel).
    pub closed: u32,
    /// Slots ended in PostgreSQL.
    pub ended: u32,
    /// New attempts.
    pub retried: u32,
}

#[derive(Clone)]
pub struct Lifecycle {
    pub pg: deadpool_postgres::Pool,
    pub redis_pool: deadpool_redis::Pool,
    pub redis: redis::aio::ConnectionManager,
    pub leases: Leases,
    pub keys: Keys,
    pub max_retries: u32,
    pub retry_backoff: Duration,
}

fn system_event(check: Uuid, body: EventBody) -> Event {
    outbox::new_event(
        format!("check:{check}"),
        now_ms(),
        "system:scheduler".to_owned(),
        body,
    )
}

impl Lifecycle {
    pub async fn pass(&self) -> Result<Pass, LifecycleError> {
        let mut pass = Pass::default();
        self.deadlines(&mut pass).await?;
        self.retries(&mut pass).await?;
        Ok(pass)
    }

    /// Record `event` (applied, with an outbox row) in its own transaction, then publish it.
    async fn record(&self, event: &Event) -> Result<(), LifecycleError> {
        let stream = self.keys.events("checks");
        let mut client = self.pg.get().await?;
        let tx = client.transaction().await?;
        outbox::append(&*tx, event, &stream).await?;
        tx.commit().await?;
        drop(client);
        outbox::publish(&self.pg, &self.redis_pool, &stream, event, PUBLISH_TIMEOUT).await;
        Ok(())
    }

    async fn deadlines(&self, pass: &mut Pass) -> Result<(), LifecycleError> {
        let grace_ms = CLOSE_GRACE.as_millis() as i64;
        // The due checks with their open slots, in one query.
        let rows = {
            let client = self.pg.get().await?;
            client
                .query(
                    "WITH due AS (
                        SELECT check_id, kind, cancelled_at IS NOT NULL AS cancelled,
                               COALESCE(LEAST(cancelled_at, deadline), deadline)
                                 < now() - $1::bigint * interval '1 millisecond' AS overdue
                        FROM checks
                        WHERE status <> 'finished'
                          AND (deadline <= now() OR cancelled_at IS NOT NULL)
                        ORDER BY deadline LIMIT $2)
                     SELECT d.check_id, d.kind, d.cancelled, d.overdue,
                            s.slot, s.attempt, s.agent_id, s.status
                     FROM due d JOIN check_slots s USING (check_id)
                     WHERE s.status <> 'done'
                     ORDER BY d.check_id, s.slot",
                    &[&grace_ms, &BATCH],
                )
                .await?
        };
        for slots in rows.chunk_by(|a, b| a.get::<_, Uuid>(0) == b.get::<_, Uuid>(0)) {
            let (check, kind, cancelled, overdue): (Uuid, String, bool, bool) = (
                slots[0].get(0),
                slots[0].get(1),
                slots[0].get(2),
                slots[0].get(3),
            );
            let (reason, outcome) = if cancelled {
                (CloseReason::Cancelled, "cancelled")
            } else {
                (CloseReason::Timeout, "timeout")
            };
            let mut still_open = Vec::new();
            for slot in slots {
                let (n, attempt, agent, status): (i32, i32, Option<String>, String) =
                    (slot.get(4), slot.get(5), slot.get(6), slot.get(7));
                let (n, attempt) = (n as u32, attempt as u32);
                if let (Some(agent), true) = (&agent, status != "retrying") {
                    let task = task_id(check, n, attempt);
                    let closed = self
                        .leases
                        .close_task(
                            &mut self.redis.clone(),
                            agent,
                            &kind,
                            &task,
                            reason,
                            now_ms(),
                        )
                        .await?;
                    if closed {
                        pass.closed += 1;
                    }
                }
                still_open.push((n, attempt));
            }
            if overdue {
                pass.ended += still_open.len() as u32;
                let event = system_event(
                    check,
                    EventBody::CheckSlotsClosed(CheckSlotsClosed {
                        check_id: check,
                        outcome: outcome.to_owned(),
                        slots: still_open,
                    }),
                );
                self.record(&event).await?;
            }
        }
        Ok(())
    }

    async fn retries(&self, pass: &mut Pass) -> Result<(), LifecycleError> {
        let backoff_ms = self.retry_backoff.as_millis() as i64;
        let mut client = self.pg.get().await?;
        let tx = client.transaction().await?;
        let due = tx
            .query(
                "SELECT s.check_id, s.slot, s.attempt, s.outcome, s.constraint_index,
                        c.kind, c.target, c.options, c.selection,
                        (extract(epoch FROM c.deadline) * 1000)::bigint
                 FROM check_slots s JOIN checks c USING (check_id)
                 WHERE s.status = 'retrying'
                   AND s.done_at <= now() - $1::bigint * interval '1 millisecond'
                   AND c.status <> 'finished' AND c.cancelled_at IS NULL AND c.deadline > now()
                 ORDER BY s.done_at LIMIT $2
                 FOR UPDATE OF s SKIP LOCKED",
                &[&backoff_ms, &BATCH],
            )
            .await?;
        let stream = self.keys.events("checks");
        let mut events = Vec::new();
        for row in &due {
            let check: Uuid = row.get(0);
            let (slot, attempt) = (row.get::<_, i32>(1) as u32, row.get::<_, i32>(2) as u32);
            let interrupted: Option<String> = row.get(3);
            let constraint: Option<i32> = row.get(4);
            let kind: String = row.get(5);
            let close = |outcome: &str| {
                system_event(
                    check,
                    EventBody::CheckSlotsClosed(CheckSlotsClosed {
                        check_id: check,
                        outcome: outcome.to_owned(),
                        slots: vec![(slot, attempt)],
                    }),
                )
            };
            if attempt > self.max_retries {
                events.push(close(interrupted.as_deref().unwrap_or("lease_expired")));
                continue;
            }
            // The same constraint as the first attempt, on an agent the check is not using.
            let filter = match (serde_json::from_value::<Selection>(row.get(8)), constraint) {
                (Ok(Selection::Locations(entries)), Some(i)) => {
                    entries.get(i as usize).cloned().unwrap_or_default()
                }
                _ => LocationRequest::default(),
            };
            let used: Vec<String> = tx
                .query(
                    "SELECT DISTINCT agent_id FROM check_slots
                     WHERE check_id = $1 AND agent_id IS NOT NULL",
                    &[&check],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut taken: HashSet<String> = used.into_iter().collect();
            let pool = candidates(&*tx, &kind, &filter).await?;
            let Some(agent) = spread(pool, 1, &mut taken, &mut HashSet::new()).pop() else {
                events.push(close("no_agent"));
                continue;
            };
            record_selected(&*tx, &[agent.agent_id.as_str()]).await?;
            events.push(system_event(
                check,
                EventBody::CheckSlotRetried(CheckSlotRetried {
                    check_id: check,
                    kind,
                    target: row.get(6),
                    options: row.get(7),
                    deadline: row.get(9),
                    slot,
                    attempt: attempt + 1,
                    agent_id: agent.agent_id,
                    location: agent.location,
                }),
            ));
        }
        for event in &events {
            outbox::append(&*tx, event, &stream).await?;
        }
        tx.commit().await?;
        drop(client);
        for event in &events {
            match &event.body {
                EventBody::CheckSlotRetried(retry) => {
                    pass.retried += 1;
                    let added = tokio::time::timeout(
                        PUBLISH_TIMEOUT,
                        fanout::enqueue_retry(&self.redis, &self.leases, retry),
                    )
                    .await;
                    if !matches!(added, Ok(Ok(()))) {
                        // The outbox sweep adds it.
                        continue;
                    }
                }
                _ => pass.ended += 1,
            }
            outbox::publish(&self.pg, &self.redis_pool, &stream, event, PUBLISH_TIMEOUT).await;
        }
        Ok(())
    }
}
