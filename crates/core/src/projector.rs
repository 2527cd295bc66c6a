//! The projector: consumes event streams with a consumer group and applies them to PostgreSQL.
//!
//! Protocol, per batch:
//! 1. read up to `batch` entries (`XREADGROUP ... >` blocking, our own pending entries after a
//!    restart or a failure, or entries a dead consumer left pending, taken with `XAUTOCLAIM`
//!    once they are idle for `claim_idle`);
//! 2. in one PostgreSQL transaction, sorted by (aggregate, version) so that replicas touch rows
//!    in one order and cannot deadlock: insert the batch into `events` (an id already there
//!    means applied: skip it) and apply the new ones with a few set-based statements; if that
//!    fails because of an event's content, roll back and go event by event, each under a
//!    savepoint, to set the culprit apart;
//! 3. commit, then `XACK`. A crash before the ack leaves the entries pending: they are read
//!    again, found in `events`, and skipped. Every event is applied exactly once.
//!
//! Entries published from the outbox carry `applied` ([`crate::outbox::APPLIED_FIELD`]): their
//! event was applied in the very transaction that wrote the outbox row, so they are known
//! without asking PostgreSQL and only acknowledged (a check's own events still wake its live
//! readers). A batch of nothing else costs no transaction.
//!
//! An entry that fails to decode or apply because of its own content (bad JSON, a data or
//! constraint error) is retried; after `max_attempts` failures it is
//! parked in `projection_failures`, acknowledged and counted
//! (`checkplane_projector_parked_total`), so a poison event never stalls a stream. A failure of
//! the transaction itself (PostgreSQL down) retries the whole batch after a backoff and does not
//! count against the entries.
//!
//! Housekeeping every `housekeeping_every`: trim each stream with `MINID` below what every
//! group has acknowledged (a group whose oldest pending entry is older than `stall_after` no
//! longer holds trimming back; `checkplane_stream_group_stalled` says so), and delete
//! consumers that have nothing pending and were idle for `idle_consumer_after`.
//!
//! The blocking read uses a dedicated Redis connection, never a pooled one.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use checkplane_wire::events::Event;
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamInfoGroupsReply,
    StreamPendingReply, StreamReadReply,
};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use crate::projection;

/// How a projector runs.
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Streams to consume.
    pub streams: Vec<String>,
    /// Consumer group.
    pub group: String,
    /// This replica's stable consumer name.
    pub consumer: String,
    /// Entries per batch.
    pub batch: usize,
    /// How long a read blocks waiting for new entries.
    pub block: Duration,
    /// Entries pending this long with another consumer are taken over.
    pub claim_idle: Duration,
    /// Failures before an entry is parked.
    pub max_attempts: u32,
    /// How often streams are trimmed and idle consumers removed.
    pub housekeeping_every: Duration,
    /// A consumer idle this long with nothing pending is deleted.
    pub idle_consumer_after: Duration,
    /// A group whose oldest pending entry is this old stops holding back trimming.
    pub stall_after: Duration,
    /// When set, a batch's commit is announced on the live channel of every check whose slots
    /// it moved (with the acknowledgements), so live readers need not wait for their poll.
    pub live: Option<crate::keys::Keys>,
}

impl ProjectorConfig {
    /// Defaults for `streams`, `group` and `consumer`.
    pub fn new(streams: Vec<String>, group: &str, consumer: &str) -> Self {
        Self {
            streams,
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            batch: 500,
            block: Duration::from_millis(500),
            claim_idle: Duration::from_secs(30),
            max_attempts: 5,
            housekeeping_every: Duration::from_secs(10),
            idle_consumer_after: Duration::from_secs(3600),
            stall_after: Duration::from_secs(6 * 3600),
            live: None,
        }
    }
}

/// Why a projector step failed (the step is retried).
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("Redis")]
    Redis(#[from] redis::RedisError),
    #[error("PostgreSQL")]
    Pg(#[from] tokio_postgres::Error),
    #[error("PostgreSQL pool")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("applying an event")]
    Apply(#[source] projection::ApplyError),
}

/// One entry read from a stream.
#[derive(Debug, Clone)]
struct Entry {
    stream: String,
    id: String,
    raw: Option<String>,
    /// Published from the outbox, so applied in PostgreSQL already
    /// ([`crate::outbox::APPLIED_FIELD`]).
    applied: bool,
}

impl Entry {
    fn from_stream_id(stream: &str, s: &StreamId) -> Self {
        let raw = s
            .map
            .get("event")
            .and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
        Self {
            stream: stream.to_owned(),
            id: s.id.clone(),
            raw,
            applied: s.map.contains_key(crate::outbox::APPLIED_FIELD),
        }
    }
}

/// An entry that failed: the entry, its event's id and type when it decoded, and the error.
type Failure = (Entry, Option<(uuid::Uuid, &'static str)>, String);

/// What a batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    pub applied: u64,
    pub skipped: u64,
    pub failed: u64,
    pub parked: u64,
}

/// A projector over one Redis and one PostgreSQL.
pub struct Projector {
    config: ProjectorConfig,
    pg: deadpool_postgres::Pool,
    redis: redis::Client,
    attempts: HashMap<(String, String), u32>,
}

impl Projector {
    pub fn new(config: ProjectorConfig, pg: deadpool_postgres::Pool, redis: redis::Client) -> Self {
        Self {
            config,
            pg,
            redis,
            attempts: HashMap::new(),
        }
    }

    async fn connect(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(self.config.block + Duration::from_secs(5)));
        self.redis
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Create the groups (at the start of each stream) where missing.
    pub async fn ensure_groups(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        for stream in &self.config.streams {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(&self.config.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(conn)
                .await;
            match created {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Run until `shutdown`; stops between batches.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        let mut own_pending = true;
        let mut last_claim = Instant::now();
        let mut last_housekeeping = Instant::now();
        while !shutdown.is_cancelled() {
            let step = async {
                if conn.is_none() {
                    let mut c = self.connect().await?;
                    self.ensure_groups(&mut c).await?;
                    conn = Some(c);
                    own_pending = true;
                }
                let Some(c) = conn.as_mut() else {
                    return Ok(BatchOutcome::default());
                };
                let entries = if own_pending {
                    let entries = self.read(c, "0").await?;
                    own_pending = !entries.is_empty();
                    entries
                } else if last_claim.elapsed() >= self.config.claim_idle / 2 {
                    last_claim = Instant::now();
                    self.autoclaim(c).await?
                } else {
                    self.read(c, ">").await?
                };
                let outcome = self.process(c, entries).await?;
                if outcome.failed > 0 {
                    own_pending = true;
                }
                if last_housekeeping.elapsed() >= self.config.housekeeping_every {
                    last_housekeeping = Instant::now();
                    self.housekeeping(c).await?;
                }
                Ok::<_, ProjectorError>(outcome)
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => break,
                result = step => result,
            };
            match result {
                Ok(outcome) => {
                    backoff = Duration::from_millis(100);
                    if outcome.failed > 0 {
                        // Give a transient cause a moment before the retry.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %checkplane_runtime::error_chain(&error), retry_in = ?backoff, "projector step failed");
                    metrics::counter!("checkplane_projector_errors_total").increment(1);
                    if matches!(error, ProjectorError::Redis(_)) {
                        conn = None;
                    }
                    own_pending = true;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::debug!(consumer = %self.config.consumer, "projector stopped");
    }

    async fn read(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        from: &str,
    ) -> redis::RedisResult<Vec<Entry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.config.consumer)
            .arg("COUNT")
            .arg(self.config.batch);
        if from == ">" {
            cmd.arg("BLOCK")
                .arg(u64::try_from(self.config.block.as_millis()).unwrap_or(u64::MAX));
        }
        cmd.arg("STREAMS").arg(&self.config.streams);
        for _ in &self.config.streams {
            cmd.arg(from);
        }
        let reply: Option<StreamReadReply> = cmd.query_async(conn).await?;
        Ok(reply
            .map(|r| {
                r.keys
                    .iter()
                    .flat_map(|k| k.ids.iter().map(|s| Entry::from_stream_id(&k.key, s)))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn autoclaim(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<Vec<Entry>> {
        let mut entries = Vec::new();
        for stream in &self.config.streams {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(&self.config.group)
                .arg(&self.config.consumer)
                .arg(u64::try_from(self.config.claim_idle.as_millis()).unwrap_or(u64::MAX))
                .arg("0-0")
                .arg("COUNT")
                .arg(self.config.batch)
                .query_async(conn)
                .await?;
            if !reply.claimed.is_empty() {
                tracing::info!(
                    stream,
                    claimed = reply.claimed.len(),
                    "took over entries of an idle consumer"
                );
            }
            entries.extend(
                reply
                    .claimed
                    .iter()
                    .map(|s| Entry::from_stream_id(stream, s)),
            );
        }
        Ok(entries)
    }

    /// Apply a batch and acknowledge it; park entries that failed too often.
    async fn process(
        &mut self,
        conn: &mut redis::aio::MultiplexedConnection,
        entries: Vec<Entry>,
    ) -> Result<BatchOutcome, ProjectorError> {
        let mut outcome = BatchOutcome::default();
        if entries.is_empty() {
            return Ok(outcome);
        }
        let started = Instant::now();
        let mut decoded: Vec<(Entry, Event)> = Vec::with_capacity(entries.len());
        let mut failures: Vec<Failure> = Vec::new();
        for entry in entries {
            match entry.raw.as_deref().map(Event::decode_str) {
                Some(Ok(event)) => decoded.push((entry, event)),
                Some(Err(e)) => failures.push((entry, None, e.to_string())),
                None => failures.push((entry, None, "entry has no `event` field".to_owned())),
            }
        }
        decoded.sort_by(|(_, a), (_, b)| {
            (&a.aggregate_id, a.version, a.event_id).cmp(&(&b.aggregate_id, b.version, b.event_id))
        });

        let mut done: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut moved_checks = Vec::new();
        // Events published from the outbox were applied in the transaction that wrote their
        // outbox row: acknowledged without one of ours. A check's own (made at the edge) is
        // still announced to its live readers: its commit is a moment for them to look.
        let (edge, decoded): (Vec<_>, Vec<_>) =
            decoded.into_iter().partition(|(entry, _)| entry.applied);
        let edge_count = edge.len() as u64;
        for (entry, event) in &edge {
            outcome.skipped += 1;
            moved_checks.extend(projection::check_of(event));
            done.entry(entry.stream.clone())
                .or_default()
                .push(entry.id.clone());
        }
        // Fast path: the whole batch in a few set-based statements.
        let events: Vec<Event> = decoded.iter().map(|(_, e)| e.clone()).collect();
        let fast = if events.is_empty() {
            Some(projection::Applied::default())
        } else {
            let mut client = self.pg.get().await?;
            let tx = client.transaction().await?;
            match projection::record_and_apply_batch(&tx, &events).await {
                Ok(applied) => {
                    tx.commit().await?;
                    Some(applied)
                }
                Err(error) if error.is_poison() => None,
                Err(error) => return Err(ProjectorError::Apply(error)),
            }
        };
        if let Some(applied) = fast {
            outcome.applied += applied.applied;
            outcome.skipped += applied.skipped;
            moved_checks.extend(applied.checks);
            moved_checks.sort_unstable();
            moved_checks.dedup();
            for (entry, _) in &decoded {
                done.entry(entry.stream.clone())
                    .or_default()
                    .push(entry.id.clone());
            }
        } else {
            // Slow path: event by event under savepoints, to set the culprit apart.
            self.apply_one_by_one(&decoded, &mut outcome, &mut done, &mut failures)
                .await?;
        }
        // Every stream's acknowledgement, and the live announcements, in one round trip.
        if !done.is_empty() {
            let mut acks = redis::pipe();
            for (stream, ids) in &done {
                acks.xack(stream, &self.config.group, ids).ignore();
            }
            if let Some(keys) = &self.config.live {
                for check in &moved_checks {
                    acks.publish(keys.live(check), check.to_string()).ignore();
                }
            }
            let () = acks.query_async(conn).await?;
        }
        for (stream, ids) in &done {
            for id in ids {
                self.attempts.remove(&(stream.clone(), id.clone()));
            }
            metrics::counter!("checkplane_projector_events_total", "stream" => stream.clone())
                .increment(ids.len() as u64);
        }

        for (entry, event, error) in failures {
            let key = (entry.stream.clone(), entry.id.clone());
            let attempts = self.attempts.entry(key.clone()).or_insert(0);
            *attempts += 1;
            let attempts = *attempts;
            if attempts < self.config.max_attempts {
                outcome.failed += 1;
                tracing::warn!(stream = %entry.stream, entry = %entry.id, attempts, %error, "event failed to apply; will retry");
                continue;
            }
            self.park(&entry, event, attempts, &error).await?;
            let _: i64 = conn
                .xack(&entry.stream, &self.config.group, &[&entry.id])
                .await?;
            self.attempts.remove(&key);
            outcome.parked += 1;
            metrics::counter!("checkplane_projector_parked_total", "stream" => entry.stream.clone())
                .increment(1);
            tracing::error!(stream = %entry.stream, entry = %entry.id, attempts, %error, "event parked in projection_failures");
        }
        // Entries delivered again (an acknowledgement lost with its connection, a crash
        // between commit and `XACK`, a batch taken over) whose events were applied already.
        let known = outcome.skipped.saturating_sub(edge_count);
        if known > 0 {
            metrics::counter!("checkplane_projector_redelivered_total").increment(known);
            tracing::info!(
                redelivered = known,
                "events delivered again were applied already; acknowledged without applying"
            );
        }
        metrics::histogram!("checkplane_projector_batch_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(outcome)
    }

    async fn apply_one_by_one(
        &self,
        decoded: &[(Entry, Event)],
        outcome: &mut BatchOutcome,
        done: &mut BTreeMap<String, Vec<String>>,
        failures: &mut Vec<Failure>,
    ) -> Result<(), ProjectorError> {
        let mut client = self.pg.get().await?;
        let tx = client.transaction().await?;
        for (entry, event) in decoded {
            tx.batch_execute("SAVEPOINT event").await?;
            match projection::record_and_apply(&tx, event).await {
                Ok(applied) => {
                    tx.batch_execute("RELEASE SAVEPOINT event").await?;
                    if applied {
                        outcome.applied += 1;
                    } else {
                        outcome.skipped += 1;
                    }
                    done.entry(entry.stream.clone())
                        .or_default()
                        .push(entry.id.clone());
                }
                Err(error) => {
                    // A broken connection fails here too, and so fails the batch.
                    tx.batch_execute("ROLLBACK TO SAVEPOINT event").await?;
                    if !error.is_poison() {
                        // Missing schema, permissions, resources: not the event's fault.
                        return Err(ProjectorError::Apply(error));
                    }
                    failures.push((
                        entry.clone(),
                        Some((event.event_id, event.body.type_name())),
                        checkplane_runtime::error_chain(&error),
                    ));
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn park(
        &self,
        entry: &Entry,
        event: Option<(uuid::Uuid, &'static str)>,
        attempts: u32,
        error: &str,
    ) -> Result<(), ProjectorError> {
        let client = self.pg.get().await?;
        client
            .execute(
                "INSERT INTO projection_failures (stream, entry_id, consumer_group, event_id,
                     event_type, attempts, error, entry)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (stream, consumer_group, entry_id)
                 DO UPDATE SET attempts = EXCLUDED.attempts, error = EXCLUDED.error, parked_at = now()",
                &[
                    &entry.stream,
                    &entry.id,
                    &self.config.group,
                    &event.map(|(id, _)| id),
                    &event.map(|(_, t)| t),
                    &i32::try_from(attempts).unwrap_or(i32::MAX),
                    &error,
                    &entry.raw.clone().unwrap_or_default(),
                ],
            )
            .await?;
        Ok(())
    }

    /// Trim below what every group acknowledged; delete idle consumers.
    async fn housekeeping(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        let now_ms = checkplane_runtime::clock::now_ms();
        let stall_ms = i64::try_from(self.config.stall_after.as_millis()).unwrap_or(i64::MAX);
        for stream in &self.config.streams {
            let groups: StreamInfoGroupsReply = conn.xinfo_groups(stream).await?;
            let mut floor: Option<(i64, i64)> = None;
            for group in &groups.groups {
                let pending: StreamPendingReply = conn.xpending(stream, &group.name).await?;
                let group_floor = match &pending {
                    StreamPendingReply::Data(data) => parse_id(&data.start_id),
                    _ => parse_id(&group.last_delivered_id),
                };
                let Some(group_floor) = group_floor else {
                    continue;
                };
                let stalled = matches!(pending, StreamPendingReply::Data(_))
                    && now_ms - group_floor.0 > stall_ms;
                metrics::gauge!("checkplane_stream_group_stalled", "stream" => stream.clone(), "group" => group.name.clone())
                    .set(if stalled { 1.0 } else { 0.0 });
                if stalled {
                    tracing::error!(stream, group = %group.name, "consumer group stopped acknowledging; trimming past it");
                    continue;
                }
                floor = Some(floor.map_or(group_floor, |f| f.min(group_floor)));
            }
            if let Some((ms, seq)) = floor {
                let _: i64 = redis::cmd("XTRIM")
                    .arg(stream)
                    .arg("MINID")
                    .arg(format!("{ms}-{seq}"))
                    .query_async(conn)
                    .await?;
            }

            let consumers: StreamInfoConsumersReply =
                conn.xinfo_consumers(stream, &self.config.group).await?;
            let idle_ms = self.config.idle_consumer_after.as_millis();
            for consumer in consumers.consumers {
                if consumer.name != self.config.consumer
                    && consumer.pending == 0
                    && consumer.idle as u128 > idle_ms
                {
                    let _: i64 = redis::cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(stream)
                        .arg(&self.config.group)
                        .arg(&consumer.name)
                        .query_async(conn)
                        .await?;
                    tracing::info!(stream, consumer = %consumer.name, "deleted idle consumer");
                }
            }
        }
        Ok(())
    }
}

/// How far a consumer group has projected a stream: every entry at or below a mark it
/// [`covers`](Projected::covers) was delivered to the group and acknowledged, none is still
/// pending in a consumer's PEL (a dead replica's batch waiting for `XAUTOCLAIM` included). The
/// group's last-delivered id alone does not say it: an entry read by a replica that died
/// before its commit is delivered, not projected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projected {
    /// The stream is gone: nothing is left to project.
    All,
    /// The group does not exist (yet): nothing is projected.
    Nothing,
    /// Delivered through `delivered`; `oldest_pending` is the oldest entry still pending;
    /// `newest` the stream's last id (a mark above it names entries Redis lost: what exists
    /// of them is all there is to wait for).
    Through {
        delivered: (i64, i64),
        oldest_pending: Option<(i64, i64)>,
        newest: (i64, i64),
    },
}

impl Projected {
    /// Whether every entry at or below `mark` (an entry id) is projected.
    pub fn covers(&self, mark: &str) -> bool {
        let Some(mark) = parse_id(mark) else {
            return false;
        };
        match *self {
            _ if mark == (0, 0) => true,
            Self::All => true,
            Self::Nothing => false,
            Self::Through {
                delivered,
                oldest_pending,
                newest,
            } => {
                let mark = mark.min(newest);
                delivered >= mark && oldest_pending.is_none_or(|oldest| oldest > mark)
            }
        }
    }
}

/// How far `group` has projected `stream`, read now (three commands; the newest id first, so
/// that nothing the group reads meanwhile is newer than it).
pub async fn projected(
    conn: &mut (impl redis::aio::ConnectionLike + Send + Sync),
    stream: &str,
    group: &str,
) -> redis::RedisResult<Projected> {
    let info: redis::streams::StreamInfoStreamReply = match conn.xinfo_stream(stream).await {
        Ok(info) => info,
        Err(e) if e.to_string().contains("no such key") => return Ok(Projected::All),
        Err(e) => return Err(e),
    };
    let newest = parse_id(&info.last_generated_id).unwrap_or((i64::MAX, i64::MAX));
    let groups: StreamInfoGroupsReply = match conn.xinfo_groups(stream).await {
        Ok(groups) => groups,
        Err(e) if e.to_string().contains("no such key") => return Ok(Projected::All),
        Err(e) => return Err(e),
    };
    let Some(info) = groups.groups.iter().find(|g| g.name == group) else {
        return Ok(Projected::Nothing);
    };
    let Some(delivered) = parse_id(&info.last_delivered_id) else {
        return Ok(Projected::Nothing);
    };
    let oldest_pending = if info.pending == 0 {
        None
    } else {
        match conn.xpending(stream, group).await? {
            StreamPendingReply::Data(data) => parse_id(&data.start_id),
            _ => None,
        }
    };
    Ok(Projected::Through {
        delivered,
        oldest_pending,
        newest,
    })
}

/// `<ms>-<seq>` as numbers.
fn parse_id(id: &str) -> Option<(i64, i64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::Projected;

    #[test]
    fn a_mark_is_covered_once_delivered_and_nothing_at_or_below_it_is_pending() {
        let through = |delivered, oldest_pending, newest| Projected::Through {
            delivered,
            oldest_pending,
            newest,
        };
        let done = through((100, 0), None, (100, 0));
        assert!(done.covers("100-0") && done.covers("99-5") && done.covers("0-0"));
        assert!(!done.covers("not an id"));
        // Delivered, but a dead replica's batch holds entry 50: not projected through 60.
        let held = through((100, 0), Some((50, 0)), (100, 0));
        assert!(held.covers("49-9") && !held.covers("50-0") && !held.covers("60-0"));
        // Not delivered that far yet.
        assert!(!through((40, 0), None, (100, 0)).covers("60-0"));
        // Redis lost the tail (its newest id is below the mark): what exists is all there
        // is to wait for.
        assert!(through((80, 0), None, (80, 0)).covers("90-0"));
        assert!(!through((70, 0), None, (80, 0)).covers("90-0"));
        assert!(Projected::All.covers("90-0") && !Projected::Nothing.covers("90-0"));
    }
}
