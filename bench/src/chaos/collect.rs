//! What the stores hold at the end of a run, read into the verifier's records; the rebuild
//! of a copy of the database by each binary that can rebuild, compared with it; and what the
//! services' logs say was delivered again.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::verify::{CheckRow, LeaseEvent, LeaseStep, Pending, Records, SlotRow, TableDiff};

/// Every key of type stream matching `pattern`.
pub async fn streams(
    conn: &mut MultiplexedConnection,
    pattern: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut found = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("stream")
            .query_async(conn)
            .await?;
        found.extend(keys);
        if next == 0 {
            return Ok(found);
        }
        cursor = next;
    }
}

/// One consumer group of a stream, as `XINFO GROUPS` tells it.
#[derive(Debug)]
pub struct Group {
    pub name: String,
    pub pending: i64,
    pub last_delivered: String,
}

pub async fn groups(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> redis::RedisResult<Vec<Group>> {
    let raw: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await?;
    Ok(raw
        .into_iter()
        .map(|g| {
            let int = |k: &str| match g.get(k) {
                Some(redis::Value::Int(n)) => Some(*n),
                _ => None,
            };
            let text = |k: &str| match g.get(k) {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(redis::Value::SimpleString(s)) => s.clone(),
                _ => String::new(),
            };
            Group {
                name: text("name"),
                pending: int("pending").unwrap_or(0),
                last_delivered: text("last-delivered-id"),
            }
        })
        .collect())
}

/// How far `group` is behind on `stream`: entries not delivered to it yet (up to 10,000
/// counted) plus entries delivered and not acknowledged. (`XINFO`'s own `lag` is unknown
/// once entries have been deleted from the stream, as ended tasks' are.)
pub async fn lag(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &Group,
) -> redis::RedisResult<i64> {
    let after = format!("({}", group.last_delivered);
    let undelivered: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(stream)
        .arg(&after)
        .arg("+")
        .arg("COUNT")
        .arg(10_000)
        .query_async(conn)
        .await?;
    Ok(undelivered.len() as i64 + group.pending)
}

/// Entries pending in any group of any stream of the installation.
pub async fn pending(
    conn: &mut MultiplexedConnection,
    prefix: &str,
) -> redis::RedisResult<Vec<Pending>> {
    let mut out = Vec::new();
    for stream in streams(conn, &format!("{prefix}:*")).await? {
        for group in groups(conn, &stream).await? {
            if group.pending > 0 {
                out.push(Pending {
                    stream: stream.clone(),
                    group: group.name,
                    count: group.pending,
                });
            }
        }
    }
    Ok(out)
}

/// Fill `records` with what PostgreSQL holds.
pub async fn from_postgres(
    pg: &tokio_postgres::Client,
    records: &mut Records,
) -> Result<(), tokio_postgres::Error> {
    for r in pg
        .query(
            "SELECT check_id::text, status, slots::bigint, seq, (extract(epoch FROM deadline) * 1000)::bigint FROM checks",
            &[],
        )
        .await?
    {
        records.checks.push(CheckRow {
            id: r.get(0),
            status: r.get(1),
            slots: r.get(2),
            seq: r.get(3),
            deadline_ms: r.get(4),
        });
    }
    for r in pg
        .query(
            // What a slot keeps of a report is its `result` (beside the observations).
            "SELECT check_id::text, slot, attempt, status, outcome, result->'result', seq,
                    (extract(epoch FROM done_at) * 1000)::bigint
             FROM check_slots",
            &[],
        )
        .await?
    {
        records.slots.push(SlotRow {
            check: r.get(0),
            slot: r.get(1),
            attempt: r.get(2),
            status: r.get(3),
            outcome: r.get(4),
            result: r.get(5),
            seq: r.get(6),
            done_ms: r.get(7),
        });
    }
    for r in pg
        .query(
            "SELECT aggregate_id, type, (payload->>'epoch')::bigint, version, event_id::text
             FROM events WHERE type IN ('lease.granted', 'lease.reported')",
            &[],
        )
        .await?
    {
        let kind: String = r.get(1);
        records.lease_events.push(LeaseEvent {
            entry: r.get(0),
            step: if kind == "lease.granted" {
                LeaseStep::Granted
            } else {
                LeaseStep::Reported
            },
            epoch: r.get::<_, Option<i64>>(2).unwrap_or(0),
            version: r.get(3),
            event_id: r.get(4),
        });
    }
    // Each action the driver asked for: how it ended, and when.
    let rows = pg
        .query(
            "SELECT idempotency_key, status, (extract(epoch FROM updated_at) * 1000)::bigint
             FROM haproxy_actions",
            &[],
        )
        .await?;
    let ended: std::collections::HashMap<String, (String, i64)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    for action in &mut records.actions {
        match ended.get(&action.key) {
            // (One the driver took for refused may have been made: its answer was lost.)
            Some((status, at)) => {
                action.status = status.clone();
                action.ended_ms = *at;
            }
            None if action.status == "refused" => {}
            None => action.status = "missing".into(),
        }
    }
    for r in pg
        .query(
            "SELECT id, COALESCE(event_type, '?'), error, stream, entry_id FROM projection_failures ORDER BY id",
            &[],
        )
        .await?
    {
        records.parked.push(format!(
            "{} {} ({} {}): {}",
            r.get::<_, i64>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(3),
            r.get::<_, String>(4),
            r.get::<_, String>(2)
        ));
    }
    records.outbox = pg
        .query_one("SELECT count(*) FROM outbox", &[])
        .await?
        .get(0);
    for r in pg
        .query(
            "SELECT i.name || '/' || s.backend || '/' || s.name, s.desired_state
             FROM haproxy_servers s JOIN haproxy_instances i USING (instance_id)",
            &[],
        )
        .await?
    {
        records.desired.insert(r.get(0), r.get(1));
    }
    Ok(())
}

/// How many entries a service's projector was delivered again and found applied already,
/// from its log (text format: `redelivered=N` on the projector's line).
pub fn redelivered(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("delivered again"))
        .filter_map(|l| {
            let (_, rest) = l.split_once("redelivered=")?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// How a copy is rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebuild {
    /// From the events as they are: every projection table must come back.
    AsIs,
    /// After every event passed the events retention: the copy's events are moved 60 days
    /// back and the retention (30 days) is run on it, which snapshots the long-lived rows and
    /// deletes the events; the long-lived tables must come back from the snapshots alone.
    EveryEventExpired,
}

/// Rebuild a copy of `live_db` with `<bin> rebuild` and compare each projection table (the
/// long-lived ones after [`Rebuild::EveryEventExpired`]) with the live one.
pub async fn rebuild_and_compare(
    admin_url: &str,
    live_db: &str,
    by: &str,
    bin: &Path,
    how: Rebuild,
    diffs: &mut Vec<TableDiff>,
) -> Result<(), String> {
    let (admin, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let scratch = format!(
        "{live_db}_rebuilt_{}{}",
        by.replace('-', "_"),
        if how == Rebuild::AsIs { "" } else { "_expired" }
    );
    for statement in [
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{live_db}' AND pid <> pg_backend_pid()"),
        format!("DROP DATABASE IF EXISTS {scratch}"),
    ] {
        admin
            .batch_execute(&statement)
            .await
            .map_err(|e| format!("{statement}: {}", checkplane_runtime::error_chain(&e)))?;
    }
    // Terminated backends go away asynchronously: retry the copy a little.
    let mut tries = 0;
    while let Err(e) = admin
        .batch_execute(&format!("CREATE DATABASE {scratch} TEMPLATE {live_db}"))
        .await
    {
        tries += 1;
        if tries > 50 {
            return Err(format!(
                "copying {live_db}: {}",
                checkplane_runtime::error_chain(&e)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
    let scratch_url = format!("{base}/{scratch}");
    let pg_error = |e: tokio_postgres::Error| checkplane_runtime::error_chain(&e);
    if how == Rebuild::EveryEventExpired {
        let (mut client, connection) = tokio_postgres::connect(&scratch_url, tokio_postgres::NoTls)
            .await
            .map_err(pg_error)?;
        tokio::spawn(connection);
        // Into the default partition (none is made that far back), where the retention
        // deletes what is older than it.
        client
            .batch_execute("UPDATE events SET occurred_at = occurred_at - interval '60 days'")
            .await
            .map_err(pg_error)?;
        let done = checkplane_core::retention::maintain_events(
            &mut client,
            Duration::from_secs(30 * 86_400),
        )
        .await
        .map_err(pg_error)?;
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM events WHERE type <> 'projection.snapshot'",
                &[],
            )
            .await
            .map_err(pg_error)?
            .get(0);
        if done.deleted == 0 || left != 0 {
            return Err(format!(
                "the retention on the copy left {left} events ({done:?})"
            ));
        }
    }
    let out = tokio::process::Command::new(bin)
        .arg("rebuild")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", &scratch_url)
        .env("LOG_LEVEL", "warn")
        .output()
        .await
        .map_err(|e| format!("{by} rebuild: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{by} rebuild exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let dump = |url: String| async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let tables: Vec<&str> = match how {
            Rebuild::AsIs => checkplane_core::projection::PROJECTION_TABLES.to_vec(),
            Rebuild::EveryEventExpired => {
                checkplane_core::projection::snapshots::long_lived_tables().collect()
            }
        };
        checkplane_core::projection::canonical_dump_of(&client, &tables)
            .await
            .map_err(|e| checkplane_runtime::error_chain(&e))
    };
    let live = dump(format!("{base}/{live_db}")).await?;
    let rebuilt = dump(scratch_url).await?;
    for ((table, live_rows), (_, rebuilt_rows)) in live.into_iter().zip(rebuilt) {
        let l: BTreeSet<String> = live_rows.into_iter().collect();
        let r: BTreeSet<String> = rebuilt_rows.into_iter().collect();
        if l != r {
            diffs.push(TableDiff {
                by: match how {
                    Rebuild::AsIs => format!("`{by} rebuild`"),
                    Rebuild::EveryEventExpired => {
                        format!("`{by} rebuild` after every event expired")
                    }
                },
                table,
                only_live: l.difference(&r).cloned().collect(),
                only_rebuilt: r.difference(&l).cloned().collect(),
            });
        }
    }
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {scratch} WITH (FORCE)"))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redeliveries_are_summed_from_the_projector_lines() {
        let log = "2026-12-04T18:00:00Z  INFO checkplane_core::projector: events delivered \
                   again were applied already; acknowledged without applying redelivered=3\n\
                   2026-12-04T18:00:01Z  INFO checkplane_core::projector: took over entries\n\
                   x INFO checkplane_core::projector: events delivered again were applied \
                   already; acknowledged without applying redelivered=12\n";
        assert_eq!(redelivered(log), 15);
        assert_eq!(redelivered("nothing here\n"), 0);
    }
}
