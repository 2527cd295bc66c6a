//! Keeping `events` partitioned by day and within its retention: partitions are made a week
//! ahead, and whole days older than the retention are dropped; what the default partition
//! holds beyond the retention is deleted in bounded batches.

use std::time::Duration;

/// What one maintenance round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Maintenance {
    pub created: u32,
    pub dropped: u32,
    pub deleted: u64,
}

/// Rows deleted per statement from the default partition.
const BATCH: i64 = 10_000;

/// Make upcoming partitions, drop expired ones, trim the default partition.
pub async fn maintain_events(
    client: &tokio_postgres::Client,
    retention: Duration,
) -> Result<Maintenance, tokio_postgres::Error> {
    let mut done = Maintenance::default();
    let created: i64 = client
        .query_one(
            "SELECT count(*) FILTER (WHERE made) FROM (
                SELECT cp_ensure_event_partition((current_date + d)::date) AS made
                FROM generate_series(-1, 7) AS d) t",
            &[],
        )
        .await?
        .get(0);
    done.created = u32::try_from(created).unwrap_or(0);

    let days = i32::try_from(retention.as_secs() / 86_400).unwrap_or(i32::MAX);
    let expired = client
        .query(
            "SELECT c.relname FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent
             WHERE p.relname = 'events' AND c.relname ~ '^events_p[0-9]{8}$'
               AND to_date(substr(c.relname, 9), 'YYYYMMDD') < current_date - $1::int",
            &[&days],
        )
        .await?;
    for row in expired {
        let name: String = row.get(0);
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
            .await?;
        tracing::info!(partition = %name, "dropped expired events partition");
        done.dropped += 1;
    }

    let millis = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        let n = client
            .execute(
                "DELETE FROM events_default WHERE ctid IN (
                    SELECT ctid FROM events_default
                    WHERE occurred_at < now() - $1::bigint * interval '1 millisecond'
                    LIMIT $2)",
                &[&millis, &BATCH],
            )
            .await?;
        done.deleted += n;
        if n < BATCH as u64 {
            break;
        }
    }
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
