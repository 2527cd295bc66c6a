//! The edge write path: a command appends its event and applies it in its own PostgreSQL
//! transaction, with an `outbox` row; after commit the event is published to its stream and
//! the row deleted. If the process dies in between, or Redis does not answer, the row stays
//! and the scheduler's [`sweep`] publishes it. Publishing twice is harmless: consumers skip
//! an `event_id` they have seen. So a client reads its own write at once, and its answer
//! never depends on Redis keeping its last second.

use std::time::Duration;

use checkplane_runtime::db::Sql;
use checkplane_runtime::Stores;
use checkplane_wire::events::Event;
use tokio_util::task::TaskTracker;

use crate::projection::{self, ApplyError};

/// How long a command waits for its effects and publish after commit before leaving them to
/// the outbox sweep.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// A command's events: appended in its transaction (recorded, applied, with their outbox
/// rows), published after its commit. The one way every service writes events:
///
/// ```text
/// let mut written = Written::new();
/// written.append(&tx, &stream, &event).await?;   // as many as the command makes
/// tx.commit().await?;
/// written.publish(&stores, &tracker);            // or .publish_now(&stores).await
/// ```
///
/// Whatever publishing misses (a Redis outage, a crash right after the commit), the outbox
/// [`sweep`] publishes: an event is never lost with the process.
#[derive(Debug, Default)]
#[must_use = "what is appended is published after the commit"]
pub struct Written {
    /// `(stream, event)`, in the order appended.
    events: Vec<(String, Event)>,
}

impl Written {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record and apply `event` in `tx`, with its outbox row for `stream`.
    pub async fn append(
        &mut self,
        tx: &impl Sql,
        stream: &str,
        event: &Event,
    ) -> Result<(), ApplyError> {
        append(tx, event, stream).await?;
        self.events.push((stream.to_owned(), event.clone()));
        Ok(())
    }

    /// [`Written::append`] of events that each touch rows of their own (one poll's servers):
    /// one `events` insert, the applies pipelined, one `outbox` insert.
    pub async fn append_independent(
        &mut self,
        tx: &impl Sql,
        stream: &str,
        events: Vec<Event>,
    ) -> Result<(), ApplyError> {
        append_all(tx, &events, stream).await?;
        self.events
            .extend(events.into_iter().map(|e| (stream.to_owned(), e)));
        Ok(())
    }

    /// The events appended, in order.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.events.iter().map(|(_, e)| e)
    }

    /// Leave the events `keep` refuses to the outbox sweep (their effects in Redis did not
    /// happen yet: the sweep makes them before it publishes).
    pub fn retain(&mut self, mut keep: impl FnMut(&Event) -> bool) {
        self.events.retain(|(_, e)| keep(e));
    }

    /// After the commit: publish in the background, on the service's `tracker` (shutdown
    /// waits for it).
    pub fn publish(self, stores: &Stores, tracker: &TaskTracker) {
        if self.events.is_empty() {
            return;
        }
        let stores = stores.clone();
        tracker.spawn(async move { self.publish_now(&stores).await });
    }

    /// After the commit: publish, and return when done (each stream's run of events bounded
    /// by [`PUBLISH_TIMEOUT`]).
    pub async fn publish_now(self, stores: &Stores) {
        let (pg, redis) = (&stores.pg, &stores.redis);
        let mut run: Vec<Event> = Vec::new();
        let mut stream = String::new();
        for (to, event) in self.events {
            if to != stream && !run.is_empty() {
                publish_all(pg, redis, &stream, &run, PUBLISH_TIMEOUT).await;
                run.clear();
            }
            stream = to;
            run.push(event);
        }
        publish_all(pg, redis, &stream, &run, PUBLISH_TIMEOUT).await;
    }
}

/// Inside the command's transaction: record, apply, and remember to publish.
async fn append(tx: &impl Sql, event: &Event, stream: &str) -> Result<(), ApplyError> {
    projection::record_and_apply(tx, event).await?;
    tx.execute(
        "INSERT INTO outbox (event_id, stream, event) VALUES ($1, $2, $3)",
        &[&event.event_id, &stream, &serde_json::to_value(event)?],
    )
    .await?;
    Ok(())
}

/// [`append`] for many events that touch rows of their own each (one poll's servers): one
/// `events` insert, the applies pipelined, one `outbox` insert.
async fn append_all(tx: &impl Sql, events: &[Event], stream: &str) -> Result<(), ApplyError> {
    if events.is_empty() {
        return Ok(());
    }
    projection::record_and_apply_independent(tx, events).await?;
    let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
    let bodies = events
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()?;
    tx.execute(
        "INSERT INTO outbox (event_id, stream, event)
         SELECT id, $2, e FROM unnest($1::uuid[], $3::jsonb[]) AS u(id, e)",
        &[&ids, &stream, &bodies],
    )
    .await?;
    Ok(())
}

/// The stream entry field that says an event was applied in PostgreSQL before it was
/// published: every outbox row is committed in the transaction that applied its event, so
/// an event published from the outbox (by its command or by the sweep) is in `events`
/// already, and a projector acknowledges it without a transaction of its own.
pub const APPLIED_FIELD: &str = "applied";

fn xadd_cmd(stream: &str, event_json: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream)
        .arg("*")
        .arg("event")
        .arg(event_json)
        .arg(APPLIED_FIELD)
        .arg("1");
    cmd
}

async fn xadd(
    conn: &mut impl redis::aio::ConnectionLike,
    stream: &str,
    event_json: &str,
) -> redis::RedisResult<String> {
    xadd_cmd(stream, event_json).query_async(conn).await
}

/// After commit: publish and drop the outbox row, within `timeout`. A failure is logged and
/// left to the sweep; the command has succeeded either way.
pub async fn publish(
    pg: &deadpool_postgres::Pool,
    redis: &deadpool_redis::Pool,
    stream: &str,
    event: &Event,
    timeout: Duration,
) {
    let attempt = tokio::time::timeout(timeout, async {
        let json = serde_json::to_string(event)?;
        let mut conn = redis.get().await?;
        xadd(&mut conn, stream, &json).await?;
        let client = pg.get().await?;
        client
            .execute("DELETE FROM outbox WHERE event_id = $1", &[&event.event_id])
            .await?;
        Ok::<_, OutboxError>(())
    })
    .await
    .unwrap_or(Err(OutboxError::TimedOut));
    if let Err(error) = attempt {
        metrics::counter!("checkplane_outbox_publish_deferred_total").increment(1);
        tracing::warn!(event_id = %event.event_id, error = %checkplane_runtime::error_chain(&error), "event left to the outbox sweep");
    }
}

/// [`publish`] for many events of one stream: one pipelined XADD each, one DELETE of their
/// outbox rows.
pub async fn publish_all(
    pg: &deadpool_postgres::Pool,
    redis: &deadpool_redis::Pool,
    stream: &str,
    events: &[Event],
    timeout: Duration,
) {
    if events.is_empty() {
        return;
    }
    let attempt = tokio::time::timeout(timeout, async {
        let mut pipe = redis::pipe();
        for event in events {
            let json = serde_json::to_string(event)?;
            pipe.add_command(xadd_cmd(stream, &json)).ignore();
        }
        let mut conn = redis.get().await?;
        let _: () = pipe.query_async(&mut conn).await?;
        let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
        let client = pg.get().await?;
        client
            .execute("DELETE FROM outbox WHERE event_id = ANY($1)", &[&ids])
            .await?;
        Ok::<_, OutboxError>(())
    })
    .await
    .unwrap_or(Err(OutboxError::TimedOut));
    if let Err(error) = attempt {
        metrics::counter!("checkplane_outbox_publish_deferred_total")
            .increment(events.len() as u64);
        tracing::warn!(events = events.len(), error = %checkplane_runtime::error_chain(&error), "events left to the outbox sweep");
    }
}

/// Why publishing or a sweep failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("PostgreSQL")]
    Pg(#[from] tokio_postgres::Error),
    #[error("PostgreSQL pool")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("Redis pool")]
    RedisPool(#[from] deadpool_redis::PoolError),
    #[error("Redis")]
    Redis(#[from] redis::RedisError),
    #[error("encoding the event")]
    Json(#[from] serde_json::Error),
    #[error("timed out")]
    TimedOut,
}

/// Publish outbox rows older than `min_age` (first the event's Redis effects: a check's tasks) (younger ones are still being published by their
/// gateway), at most `limit`; returns how many. Replicas skip each other's rows.
pub async fn sweep(
    pg: &deadpool_postgres::Pool,
    redis: &deadpool_redis::Pool,
    leases: &crate::leases::Leases,
    min_age: Duration,
    limit: i64,
) -> Result<usize, OutboxError> {
    let mut client = pg.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT event_id, stream, event::text FROM outbox
             WHERE created_at < now() - $1::bigint * interval '1 millisecond'
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            &[
                &i64::try_from(min_age.as_millis()).unwrap_or(i64::MAX),
                &limit,
            ],
        )
        .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut conn = redis.get().await?;
    let mut ids = Vec::with_capacity(rows.len());
    for row in &rows {
        let stream: String = row.get("stream");
        let event: String = row.get("event");
        // A check's tasks first (each added once, whatever its gateway managed), then the
        // event that announces it.
        if let Ok(parsed) = Event::decode_str(&event) {
            crate::fanout::effects(&*conn, leases, &parsed.body).await?;
        }
        xadd(&mut conn, &stream, &event).await?;
        ids.push(row.get::<_, uuid::Uuid>("event_id"));
    }
    tx.execute("DELETE FROM outbox WHERE event_id = ANY($1)", &[&ids])
        .await?;
    tx.commit().await?;
    tracing::info!(published = ids.len(), "outbox sweep published events");
    Ok(ids.len())
}
