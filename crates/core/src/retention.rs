//! Keeping `events` partitioned by day and within its retention: partitions are made a week
//! ahead, and whole days older than the retention are dropped; what the default partition
//! holds beyond the retention is deleted. Long-lived rows outlive their events: every one is
//! snapshotted into `events` in the transaction that removes events (see
//! [`crate::projection::snapshots`]), so `rebuild` still reproduces them.

use std::time::Duration;

use crate::projection::snapshots;

/// What one maintenance round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Maintenance {
    pub created: u32,
    pub dropped: u32,
    pub deleted: u64,
    /// Long-lived rows snapshotted before events were removed.
    pub snapshots: u64,
}

/// Serialises partition changes (the lock `cp_ensure_event_partition` takes).
const PARTITIONS_LOCK: i64 = 7_105_033_523_614_889;

/// Make upcoming partitions; then, when events are past the retention, snapshot the
/// long-lived rows, drop the expired partitions and delete the default partition's expired
/// rows, all in one transaction (replicas take turns on an advisory lock).
pub async fn maintain_events(
    client: &mut tokio_postgres::Client,
    retention: Duration,
) -> Result<Maintenance, tokio_postgres::Error> {
    let mut done = Maintenance::default();
    let created: i64 = client
        .query_one(
            "SELECT count(*) FILTER (WHERE made) AS n FROM (
                SELECT cp_ensure_event_partition((current_date + d)::date) AS made
                FROM generate_series(-1, 7) AS d) t",
            &[],
        )
        .await?
        .get("n");
    done.created = u32::try_from(created).unwrap_or(0);

    let days = i32::try_from(retention.as_secs() / 86_400).unwrap_or(i32::MAX);
    let millis = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITIONS_LOCK])
        .await?;
    // Read under the lock: a replica that went first has dropped them already.
    let expired = tx
        .query(
            "SELECT c.relname, c.oid FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent
             WHERE p.relname = 'events' AND c.relname ~ '^events_p[0-9]{8}$'
               AND to_date(substr(c.relname, 9), 'YYYYMMDD') < current_date - $1::int",
            &[&days],
        )
        .await?;
    let (names, oids): (Vec<String>, Vec<u32>) = expired
        .iter()
        .map(|r| (r.get::<_, String>("relname"), r.get::<_, u32>("oid")))
        .unzip();
    let cutoff: std::time::SystemTime = tx
        .query_one(
            "SELECT now() - $1::bigint * interval '1 millisecond' AS cutoff",
            &[&millis],
        )
        .await?
        .get("cutoff");
    let old_defaults = tx
        .query_opt(
            "SELECT 1 FROM events_default WHERE occurred_at < $1 LIMIT 1",
            &[&cutoff],
        )
        .await?;
    if names.is_empty() && old_defaults.is_none() {
        return Ok(done);
    }
    done.snapshots = snapshots::write(&tx, &oids, cutoff).await?;
    // One statement, not batches: it must commit with the snapshots that count what it
    // removes. The default partition only holds events of days without a partition of their
    // own (partitions are made a day back and a week ahead), so it is small.
    done.deleted = tx
        .execute(
            "DELETE FROM events_default WHERE occurred_at < $1",
            &[&cutoff],
        )
        .await?;
    // Last, so that the lock a drop takes on `events` is held only for the commit.
    for name in &names {
        tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
            .await?;
        done.dropped += 1;
    }
    tx.commit().await?;
    tracing::info!(partitions = ?names, deleted = done.deleted, snapshots = done.snapshots, "expired events removed; long-lived rows snapshotted");
    Ok(done)
}

/// What one round of results and metrics retention deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// Finished checks, with their slots and results.
    pub checks: u64,
    /// Agent metrics rows.
    pub metrics: u64,
    /// Concurrency controller snapshots.
    pub windows: u64,
    /// HAProxy servers' state history rows.
    pub history: u64,
}

/// How long each kind of row is kept.
#[derive(Debug, Clone, Copy)]
pub struct Ages {
    pub results: Duration,
    pub metrics: Duration,
    pub history: Duration,
}

/// Rows deleted per statement by [`trim_results`]: each statement is its own short
/// transaction, so projector writes never wait long behind it.
pub const TRIM_BATCH: i64 = 1_000;

/// Delete checks that finished more than `results` ago (their slots go with them) and agent
/// metrics older than `metrics`, `batch` rows per statement until none is left.
pub async fn trim_results(
    client: &tokio_postgres::Client,
    ages: Ages,
    batch: i64,
) -> Result<Trimmed, tokio_postgres::Error> {
    let mut done = Trimmed::default();
    let results_ms = i64::try_from(ages.results.as_millis()).unwrap_or(i64::MAX);
    let metrics_ms = i64::try_from(ages.metrics.as_millis()).unwrap_or(i64::MAX);
    let history_ms = i64::try_from(ages.history.as_millis()).unwrap_or(i64::MAX);
    let statements = [
        (
            // A check and its slots in one statement (no foreign key to cascade): the
            // count is the checks'.
            "WITH gone AS (
                DELETE FROM checks WHERE check_id IN (
                    SELECT check_id FROM checks
                    WHERE status = 'finished'
                      AND finished_at < now() - $1::bigint * interval '1 millisecond'
                    ORDER BY finished_at LIMIT $2)
                RETURNING check_id),
             slots AS (
                DELETE FROM check_slots WHERE check_id IN (SELECT check_id FROM gone))
             SELECT check_id FROM gone",
            results_ms,
            &mut done.checks,
        ),
        (
            "DELETE FROM agent_metrics WHERE ctid IN (
                SELECT ctid FROM agent_metrics
                WHERE recorded_at < now() - $1::bigint * interval '1 millisecond'
                LIMIT $2)",
            metrics_ms,
            &mut done.metrics,
        ),
        (
            "DELETE FROM concurrency_windows WHERE ctid IN (
                SELECT ctid FROM concurrency_windows
                WHERE recorded_at < now() - $1::bigint * interval '1 millisecond'
                LIMIT $2)",
            metrics_ms,
            &mut done.windows,
        ),
        (
            "DELETE FROM haproxy_server_status_history WHERE event_id IN (
                SELECT event_id FROM haproxy_server_status_history
                WHERE occurred_at < now() - $1::bigint * interval '1 millisecond'
                LIMIT $2)",
            history_ms,
            &mut done.history,
        ),
    ];
    for (sql, age_ms, deleted) in statements {
        loop {
            let n = client.execute(sql, &[&age_ms, &batch]).await?;
            *deleted += n;
            if n < batch as u64 {
                break;
            }
            if *deleted % (batch as u64 * 100) == 0 {
                tracing::info!(deleted = *deleted, "retention: still deleting");
            }
        }
    }
    Ok(done)
}
