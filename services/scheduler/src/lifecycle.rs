//! The life of a check after its creation, one pass at a time (any number of replicas):
//!
//! - **deadline and cancel**: every open slot of a check past its deadline (or cancelled) is
//!   closed with the close script, so a later report is fenced; what the close script ends is
//!   projected from its `lease.closed`. Whatever is still open `CLOSE_GRACE` later (a task
//!   never sent, a close whose event is still on its way) is ended in PostgreSQL by
//!   `check.slots_closed` as `timeout` / `cancelled`. A slot whose entry had ended before the
//!   close (reported, expired, dead-lettered, closed by an earlier pass) is not: the event that
//!   ended it is on its shard's lease stream, and the slot waits until the projector group has
//!   projected that stream up to where it stood when the close found the entry gone (the close
//!   script answers that point; see [`Projected`]: a dead replica's pending batch counts as not
//!   projected). Its check stays out of the passes meanwhile, so due checks behind it are not
//!   held up. Only a slot still open then, whose event Redis lost, is ended here, and that is
//!   logged and counted (`checkplane_lifecycle_reports_missing_total`). So a report
//!   acknowledged to an agent is never overwritten by a `timeout`, however far the projector
//!   lags;
//! - **retries**: a slot whose attempt was interrupted (`lease_expired`, `offline`) waits
//!   `RETRY_BACKOFF` (its end time is in the row, so the wait survives a restart), then gets a
//!   new attempt on another matching agent (`check.slot_retried`, fanned out like a new check)
//!   until `MAX_RETRIES`; with no retry left it ends with the interruption, with no agent
//!   `no_agent`;
//! - **dead letters**: a slot whose task went to the dead-letter stream waits for an admin
//!   (`POST /v1/dead-letters/{id}/requeue` gives it its next attempt on the same agent, a
//!   drop ends it); it is never retried by itself, and its deadline ends it `dead_lettered`;
//! - **offline agents**: a slot sent to an agent that went offline before claiming it is
//!   closed in Redis with reason `offline` (a task never sent is marked so it never will be)
//!   and waits for its retry like the others;
//! - **parallelism**: slots past a check's `max_parallel` start `waiting`; as earlier ones end
//!   (or wait in the dead letters, which do not count as running),
//!   `check.slots_released` lets the next ones run (in the check row's lock, so two replicas
//!   never release the same slots) and they are sent like a new check's.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use checkplane_core::fanout;
use checkplane_core::keys::Keys;
use checkplane_core::leases::{CloseReason, Leases, TaskClosed};
use checkplane_core::outbox::{Written, PUBLISH_TIMEOUT};
use checkplane_core::projector::{projected, Projected};
use checkplane_core::selection::{choose, record_selected};
use checkplane_runtime::clock::now_ms;
use checkplane_runtime::Stores;
use checkplane_wire::checks::{task_id, LocationRequest, Selection};
use checkplane_wire::events::{
    CheckSlotRetried, CheckSlotsClosed, CheckSlotsReleased, Event, EventBody,
};
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
    Apply(#[from] checkplane_core::projection::ApplyError),
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
    /// Sent slots taken back from agents that went offline before claiming them.
    pub offline: u32,
    /// Waiting slots let run.
    pub released: u32,
    /// Slots past their deadline whose ending event the projector has yet to pass.
    pub awaiting: u32,
}

#[derive(Clone)]
pub struct Lifecycle {
    pub stores: Stores,
    pub leases: Leases,
    pub keys: Keys,
    pub max_retries: u32,
    pub retry_backoff: Duration,
    /// Slots whose entry had ended before their close, by task id: they wait until the
    /// projector has passed the point their shard's lease stream was at when the close found
    /// them so. Kept across passes, so a lagging projector is caught up with rather than
    /// chased.
    pub awaiting: Arc<Mutex<HashMap<String, Awaiting>>>,
}

/// A slot waiting for the projector to pass its ending event.
#[derive(Debug, Clone)]
pub struct Awaiting {
    check: Uuid,
    shard: u32,
    /// The lease stream's newest entry id when the close found the entry ended (the close
    /// script reads it atomically): the ending event is at or below it.
    mark: String,
}

/// How far the projector group has projected each shard's lease stream, read once per pass
/// and shard (a mark newer than the reading is simply not covered yet).
#[derive(Default)]
struct Watermarks(HashMap<u32, Projected>);

impl Watermarks {
    async fn covers(
        &mut self,
        lifecycle: &Lifecycle,
        waiting: &Awaiting,
    ) -> Result<bool, LifecycleError> {
        let projected = match self.0.get(&waiting.shard) {
            Some(p) => *p,
            None => {
                let p = projected(
                    &mut lifecycle.stores.redis_shared.clone(),
                    &lifecycle.keys.lease_events(waiting.shard),
                    crate::PROJECTOR_GROUP,
                )
                .await?;
                self.0.insert(waiting.shard, p);
                p
            }
        };
        Ok(projected.covers(&waiting.mark))
    }
}

fn system_event(check: Uuid, body: EventBody) -> Event {
    Event::new(
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
        self.offline(&mut pass).await?;
        self.retries(&mut pass).await?;
        self.release(&mut pass).await?;
        Ok(pass)
    }

    /// Record `event` (applied, with an outbox row) in its own transaction, then publish it.
    async fn record(&self, event: &Event) -> Result<(), LifecycleError> {
        let stream = self.keys.events("checks");
        let mut client = self.stores.pg.get().await?;
        let tx = client.transaction().await?;
        let mut written = Written::new();
        written.append(&tx, &stream, event).await?;
        tx.commit().await?;
        drop(client);
        written.publish_now(&self.stores).await;
        Ok(())
    }

    async fn deadlines(&self, pass: &mut Pass) -> Result<(), LifecycleError> {
        let grace_ms = CLOSE_GRACE.as_millis() as i64;
        let mut watermarks = Watermarks::default();
        // Checks with a slot whose ending event the projector has not passed yet stay out of
        // this pass: the due checks behind them are not held up, and nothing is asked of
        // Redis for them until their marks are passed.
        let known: Vec<(String, Awaiting)> = self
            .awaiting()
            .iter()
            .map(|(t, a)| (t.clone(), a.clone()))
            .collect();
        let mut blocked = HashSet::new();
        for (_, waiting) in &known {
            if !watermarks.covers(self, waiting).await? {
                blocked.insert(waiting.check);
            }
        }
        let blocked_list: Vec<Uuid> = blocked.iter().copied().collect();
        // The due checks with their open slots, in one query.
        let rows = {
            let client = self.stores.pg.get().await?;
            client
                .query(
                    "WITH due AS (
                        SELECT check_id, kind, cancelled_at IS NOT NULL AS cancelled,
                               COALESCE(LEAST(cancelled_at, deadline), deadline)
                                 < now() - $1::bigint * interval '1 millisecond' AS overdue
                        FROM checks
                        WHERE status <> 'finished'
                          AND (deadline <= now() OR cancelled_at IS NOT NULL)
                          AND check_id <> ALL($3)
                        ORDER BY deadline LIMIT $2)
                     SELECT d.check_id, d.kind, d.cancelled, d.overdue,
                            s.slot, s.attempt, s.agent_id, s.status,
                            s.status = 'retrying' AND s.outcome = 'dead_lettered' AS dead_lettered
                     FROM due d JOIN check_slots s USING (check_id)
                     WHERE s.status <> 'done'
                     ORDER BY d.check_id, s.slot",
                    &[&grace_ms, &BATCH, &blocked_list],
                )
                .await?
        };
        let mut seen = HashSet::new();
        for slots in
            rows.chunk_by(|a, b| a.get::<_, Uuid>("check_id") == b.get::<_, Uuid>("check_id"))
        {
            let (check, kind, cancelled, overdue): (Uuid, String, bool, bool) = (
                slots[0].get("check_id"),
                slots[0].get("kind"),
                slots[0].get("cancelled"),
                slots[0].get("overdue"),
            );
            let (reason, outcome) = if cancelled {
                (CloseReason::Cancelled, "cancelled")
            } else {
                (CloseReason::Timeout, "timeout")
            };
            let mut still_open = Vec::new();
            // Slots whose task went to the dead-letter stream and that no admin requeued or
            // dropped: they end as such.
            let mut dead_lettered = Vec::new();
            // Slots whose entry ended before the close, and which the projector has passed:
            // still open in PostgreSQL only if their event was lost.
            let mut settled = Vec::new();
            for slot in slots {
                let (n, attempt, agent, status): (i32, i32, Option<String>, String) = (
                    slot.get("slot"),
                    slot.get("attempt"),
                    slot.get("agent_id"),
                    slot.get("status"),
                );
                let (n, attempt) = (n as u32, attempt as u32);
                if slot.get::<_, bool>("dead_lettered") && !cancelled {
                    dead_lettered.push((n, attempt));
                    continue;
                }
                if let (Some(agent), true) = (&agent, status != "retrying") {
                    let task = task_id(check, n, attempt);
                    let known = self.awaiting().get(&task).cloned();
                    let waiting = match known {
                        // Ended in Redis before; its mark is passed (else the check would
                        // be blocked).
                        Some(waiting) => waiting,
                        None => {
                            let closed = self
                                .leases
                                .close_task(
                                    &mut self.stores.redis_shared.clone(),
                                    agent,
                                    &kind,
                                    &task,
                                    reason,
                                    now_ms(),
                                )
                                .await?;
                            match closed {
                                TaskClosed::Closed => {
                                    pass.closed += 1;
                                    still_open.push((n, attempt));
                                    continue;
                                }
                                TaskClosed::Already | TaskClosed::Unsent => {
                                    still_open.push((n, attempt));
                                    continue;
                                }
                                TaskClosed::Ended { tip } => {
                                    let waiting = Awaiting {
                                        check,
                                        shard: self.keys.shard_of(agent),
                                        mark: tip,
                                    };
                                    self.awaiting().insert(task.clone(), waiting.clone());
                                    waiting
                                }
                            }
                        }
                    };
                    seen.insert(task);
                    if watermarks.covers(self, &waiting).await? {
                        settled.push((n, attempt));
                    } else {
                        pass.awaiting += 1;
                    }
                    continue;
                }
                still_open.push((n, attempt));
            }
            if !overdue {
                continue;
            }
            if !settled.is_empty() {
                // Projected through its event, yet still under way: Redis lost the event.
                // (One that became `retrying` meanwhile is left to the next pass, which ends it
                // by what it is now.)
                let mut lost = self.still_running(check, &settled).await?;
                // An ending event the projector parked (it failed to apply) is not lost: the
                // slot waits for an admin's replay or drop (the parked gauge says so).
                let parked = self.parked(check, &lost).await?;
                pass.awaiting += parked.len() as u32;
                lost.retain(|slot| !parked.contains(slot));
                if !lost.is_empty() {
                    metrics::counter!("checkplane_lifecycle_reports_missing_total")
                        .increment(lost.len() as u64);
                    tracing::warn!(%check, slots = ?lost, outcome, "slots whose entry had ended in Redis are still open after the projector passed their event: the event was lost; ending them");
                }
                still_open.extend(lost);
            }
            for (outcome, slots) in [(outcome, still_open), ("dead_lettered", dead_lettered)] {
                if slots.is_empty() {
                    continue;
                }
                pass.ended += slots.len() as u32;
                let event = system_event(
                    check,
                    EventBody::CheckSlotsClosed(CheckSlotsClosed {
                        check_id: check,
                        outcome: outcome.to_owned(),
                        slots,
                    }),
                );
                self.record(&event).await?;
            }
        }
        let mut awaiting = self.awaiting();
        // A slot neither seen in this pass nor of a blocked check has ended (or its check has):
        // forget its mark.
        awaiting.retain(|task, a| seen.contains(task) || blocked.contains(&a.check));
        pass.awaiting += known
            .iter()
            .filter(|(task, a)| blocked.contains(&a.check) && !seen.contains(task))
            .count() as u32;
        metrics::gauge!("checkplane_lifecycle_slots_awaiting_projection").set(pass.awaiting as f64);
        Ok(())
    }

    fn awaiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, Awaiting>> {
        self.awaiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Which of `slots` (slot, attempt) of `check` have an event parked in
    /// `projection_failures` (found by the task id it carries).
    async fn parked(
        &self,
        check: Uuid,
        slots: &[(u32, u32)],
    ) -> Result<HashSet<(u32, u32)>, LifecycleError> {
        if slots.is_empty() {
            return Ok(HashSet::new());
        }
        let tasks: Vec<String> = slots
            .iter()
            .map(|&(n, a)| format!("%\"task\":\"{}\"%", task_id(check, n, a)))
            .collect();
        let client = self.stores.pg.get().await?;
        let found = client
            .query(
                "SELECT i - 1 AS at FROM unnest($1::text[]) WITH ORDINALITY AS u(pattern, i)
                 WHERE EXISTS (SELECT 1 FROM projection_failures f WHERE f.entry LIKE u.pattern)",
                &[&tasks],
            )
            .await?;
        Ok(found
            .iter()
            .filter_map(|r| {
                slots
                    .get(usize::try_from(r.get::<_, i64>("at")).ok()?)
                    .copied()
            })
            .collect())
    }

    /// Which of `slots` (slot, attempt) of `check` are still under way in PostgreSQL.
    async fn still_running(
        &self,
        check: Uuid,
        slots: &[(u32, u32)],
    ) -> Result<Vec<(u32, u32)>, LifecycleError> {
        let (numbers, attempts): (Vec<i32>, Vec<i32>) =
            slots.iter().map(|&(n, a)| (n as i32, a as i32)).unzip();
        let client = self.stores.pg.get().await?;
        let rows = client
            .query(
                "SELECT s.slot, s.attempt FROM check_slots s
                 JOIN unnest($2::int[], $3::int[]) AS u(slot, attempt)
                   ON s.slot = u.slot AND s.attempt = u.attempt
                 WHERE s.check_id = $1 AND s.status IN ('pending', 'waiting', 'leased')",
                &[&check, &numbers, &attempts],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, i32>("slot") as u32,
                    r.get::<_, i32>("attempt") as u32,
                )
            })
            .collect())
    }

    /// Slots sent to an agent that went offline before it claimed them: closed in Redis (the
    /// `lease.closed` with reason `offline` leaves the slot `retrying`), or, when their task
    /// was never sent, marked so and interrupted in PostgreSQL. A task the agent did claim is
    /// left to lease recovery.
    async fn offline(&self, pass: &mut Pass) -> Result<(), LifecycleError> {
        let rows = {
            let client = self.stores.pg.get().await?;
            client
                .query(
                    "SELECT s.check_id, s.slot, s.attempt, s.agent_id, c.kind
                     FROM check_slots s
                     JOIN agents a ON a.agent_id = s.agent_id
                     JOIN checks c ON c.check_id = s.check_id
                     WHERE s.status = 'pending' AND a.status = 'offline'
                       AND c.status <> 'finished' AND c.cancelled_at IS NULL
                       AND c.deadline > now()
                     ORDER BY s.check_id, s.slot LIMIT $1",
                    &[&BATCH],
                )
                .await?
        };
        for row in &rows {
            let (check, slot, attempt, agent, kind): (Uuid, i32, i32, String, String) = (
                row.get("check_id"),
                row.get("slot"),
                row.get("attempt"),
                row.get("agent_id"),
                row.get("kind"),
            );
            let (slot, attempt) = (slot as u32, attempt as u32);
            let task = task_id(check, slot, attempt);
            let closed = self
                .leases
                .close_task(
                    &mut self.stores.redis_shared.clone(),
                    &agent,
                    &kind,
                    &task,
                    CloseReason::Offline,
                    now_ms(),
                )
                .await?;
            match closed {
                TaskClosed::Closed => pass.offline += 1,
                // Its `lease.closed` (or report) is on its way to the projector.
                TaskClosed::Already | TaskClosed::Ended { .. } => {}
                TaskClosed::Unsent => {
                    pass.offline += 1;
                    let event = system_event(
                        check,
                        EventBody::CheckSlotsInterrupted(CheckSlotsClosed {
                            check_id: check,
                            outcome: "offline".to_owned(),
                            slots: vec![(slot, attempt)],
                        }),
                    );
                    self.record(&event).await?;
                }
            }
        }
        Ok(())
    }

    /// Waiting slots of checks running fewer than `max_parallel` slots: released in the
    /// check row's lock (two replicas never release the same slots), then sent.
    async fn release(&self, pass: &mut Pass) -> Result<(), LifecycleError> {
        let mut client = self.stores.pg.get().await?;
        let tx = client.transaction().await?;
        let due = tx
            .query(
                "SELECT c.check_id, c.kind, c.target, c.options,
                        cp_ms(c.deadline) AS deadline_ms,
                        c.max_parallel - (SELECT count(*) FROM check_slots o
                                          WHERE o.check_id = c.check_id
                                            AND o.status IN ('pending', 'leased', 'retrying')
                                            AND o.outcome IS DISTINCT FROM 'dead_lettered')
                            AS free
                 FROM checks c
                 WHERE c.check_id IN (SELECT DISTINCT check_id FROM check_slots
                                      WHERE status = 'waiting')
                   AND c.status <> 'finished' AND c.cancelled_at IS NULL AND c.deadline > now()
                 ORDER BY c.created_at LIMIT $1
                 FOR UPDATE OF c SKIP LOCKED",
                &[&BATCH],
            )
            .await?;
        let stream = self.keys.events("checks");
        let mut written = Written::new();
        for row in &due {
            let (check, free): (Uuid, i64) = (
                row.get("check_id"),
                row.get::<_, Option<i64>>("free").unwrap_or(0),
            );
            if free <= 0 {
                continue;
            }
            let slots: Vec<(u32, String)> = tx
                .query(
                    "SELECT slot, agent_id FROM check_slots
                     WHERE check_id = $1 AND status = 'waiting' AND agent_id IS NOT NULL
                     ORDER BY slot LIMIT $2",
                    &[&check, &free],
                )
                .await?
                .iter()
                .map(|r| (r.get::<_, i32>("slot") as u32, r.get("agent_id")))
                .collect();
            let event = system_event(
                check,
                EventBody::CheckSlotsReleased(CheckSlotsReleased {
                    check_id: check,
                    kind: row.get("kind"),
                    target: row.get("target"),
                    options: row.get("options"),
                    deadline: row.get("deadline_ms"),
                    slots,
                }),
            );
            written.append(&tx, &stream, &event).await?;
        }
        tx.commit().await?;
        drop(client);
        // Each release's tasks first; an event whose tasks were not added is left to the
        // outbox sweep, which adds them before it publishes.
        let mut unsent = HashSet::new();
        for event in written.events() {
            let EventBody::CheckSlotsReleased(released) = &event.body else {
                continue;
            };
            pass.released += released.slots.len() as u32;
            let added = tokio::time::timeout(
                PUBLISH_TIMEOUT,
                fanout::enqueue_released(&self.stores.redis_shared, &self.leases, released),
            )
            .await;
            if !matches!(added, Ok(Ok(()))) {
                unsent.insert(event.event_id);
            }
        }
        written.retain(|e| !unsent.contains(&e.event_id));
        written.publish_now(&self.stores).await;
        Ok(())
    }

    /// Due retries, under their checks' row locks: every writer of a check's slots takes the
    /// check's row first (the projector in id order), so this never deadlocks with it, and
    /// two replicas never retry the same slot.
    async fn retries(&self, pass: &mut Pass) -> Result<(), LifecycleError> {
        let backoff_ms = self.retry_backoff.as_millis() as i64;
        let mut client = self.stores.pg.get().await?;
        let tx = client.transaction().await?;
        let due = tx
            .query(
                "SELECT s.check_id, s.slot, s.attempt, s.outcome, s.constraint_index,
                        c.kind, c.target, c.options, c.selection,
                        cp_ms(c.deadline) AS deadline_ms
                 FROM check_slots s JOIN checks c USING (check_id)
                 WHERE s.status = 'retrying' AND s.outcome IS DISTINCT FROM 'dead_lettered'
                   AND s.done_at <= now() - $1::bigint * interval '1 millisecond'
                   AND c.status <> 'finished' AND c.cancelled_at IS NULL AND c.deadline > now()
                 ORDER BY s.done_at LIMIT $2
                 FOR UPDATE OF c SKIP LOCKED",
                &[&backoff_ms, &BATCH],
            )
            .await?;
        let stream = self.keys.events("checks");
        let mut events = Vec::new();
        for row in &due {
            let check: Uuid = row.get("check_id");
            let (slot, attempt) = (
                row.get::<_, i32>("slot") as u32,
                row.get::<_, i32>("attempt") as u32,
            );
            let interrupted: Option<String> = row.get("outcome");
            let constraint: Option<i32> = row.get("constraint_index");
            let kind: String = row.get("kind");
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
            let filter = match (
                serde_json::from_value::<Selection>(row.get("selection")),
                constraint,
            ) {
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
                .map(|r| r.get("agent_id"))
                .collect();
            let mut taken: HashSet<String> = used.into_iter().collect();
            let chosen = choose(&tx, &kind, &filter, 1, &mut taken, &mut HashSet::new()).await?;
            let Some(agent) = chosen.into_iter().next() else {
                events.push(close("no_agent"));
                continue;
            };
            record_selected(&tx, &[agent.agent_id.as_str()]).await?;
            events.push(system_event(
                check,
                EventBody::CheckSlotRetried(CheckSlotRetried {
                    check_id: check,
                    kind,
                    target: row.get("target"),
                    options: row.get("options"),
                    deadline: row.get("deadline_ms"),
                    slot,
                    attempt: attempt + 1,
                    agent_id: agent.agent_id,
                    location: agent.location,
                }),
            ));
        }
        let mut written = Written::new();
        for event in &events {
            written.append(&tx, &stream, event).await?;
        }
        tx.commit().await?;
        drop(client);
        // A retry's task first; one not added is left to the outbox sweep (as above).
        let mut unsent = HashSet::new();
        for event in written.events() {
            match &event.body {
                EventBody::CheckSlotRetried(retry) => {
                    pass.retried += 1;
                    let added = tokio::time::timeout(
                        PUBLISH_TIMEOUT,
                        fanout::enqueue_retry(&self.stores.redis_shared, &self.leases, retry),
                    )
                    .await;
                    if !matches!(added, Ok(Ok(()))) {
                        unsent.insert(event.event_id);
                    }
                }
                _ => pass.ended += 1,
            }
        }
        written.retain(|e| !unsent.contains(&e.event_id));
        written.publish_now(&self.stores).await;
        Ok(())
    }
}
