//! `rebuild`: the projection tables truncated and `events` replayed into them; and the
//! canonical dumps that compare two states.

use checkplane_runtime::db::Sql;
use checkplane_wire::events::{DecodeError, Event};

use super::{apply, ApplyError, DELIVERY_CURSORS, PROJECTION_TABLES};

/// Read an event back from its `events` row.
fn event_from_row(row: &tokio_postgres::Row) -> Result<Event, DecodeError> {
    let envelope = serde_json::json!({
        "event_id": row.get::<_, uuid::Uuid>("event_id"),
        "aggregate_id": row.get::<_, String>("aggregate_id"),
        "version": row.get::<_, i64>("version"),
        "occurred_at": row.get::<_, i64>("occurred_ms"),
        "actor": row.get::<_, String>("actor"),
        "schema": row.get::<_, i32>("schema"),
        "type": row.get::<_, String>("type"),
        "payload": row.get::<_, serde_json::Value>("payload"),
    });
    Event::decode(envelope)
}

/// What a rebuild did.
pub use checkplane_runtime::launch::Rebuilt as RebuildReport;

/// [`rebuild`] as the binaries' `rebuild` command runs it
/// ([`checkplane_runtime::Service::rebuild`]).
pub async fn rebuild_command(
    mut client: tokio_postgres::Client,
) -> Result<RebuildReport, checkplane_runtime::launch::RebuildError> {
    Ok(rebuild(&mut client).await?)
}

/// Truncate the projection tables and replay `events` into them, in one transaction: readers
/// see the old tables until the new ones are complete. Events that fail to apply are counted
/// and logged, and the rebuild goes on (they would be parked by the projector too).
pub async fn rebuild(client: &mut tokio_postgres::Client) -> Result<RebuildReport, ApplyError> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("TRUNCATE {}", PROJECTION_TABLES.join(", ")))
        .await?;
    let portal = tx
        .bind(
            "SELECT event_id, aggregate_id, version, actor, schema, type, payload,
                    cp_ms(occurred_at) AS occurred_ms
             FROM events
             ORDER BY occurred_at,
                      -- within a millisecond, what the edge recorded (a check, its retries)
                      -- before the lease events of the tasks it made
                      (type LIKE 'lease.%' OR type = 'task.dead_lettered'),
                      event_id",
            &[],
        )
        .await?;
    let mut report = RebuildReport {
        events: 0,
        failed: 0,
    };
    loop {
        let rows = tx.query_portal(&portal, 1000).await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            report.events += 1;
            let event = match event_from_row(row) {
                Ok(event) => event,
                Err(error) => {
                    report.failed += 1;
                    tracing::warn!(%error, "rebuild: undecodable event skipped");
                    continue;
                }
            };
            tx.batch_execute("SAVEPOINT replay").await?;
            match apply(&tx, &event).await {
                Ok(()) => tx.batch_execute("RELEASE SAVEPOINT replay").await?,
                Err(error) => {
                    report.failed += 1;
                    tracing::warn!(event_id = %event.event_id, error = %checkplane_runtime::error_chain(&error), "rebuild: event failed to apply");
                    tx.batch_execute("ROLLBACK TO SAVEPOINT replay").await?;
                }
            }
        }
        if report.events % 100_000 < 1000 {
            tracing::info!(events = report.events, "rebuild progress");
        }
    }
    tx.commit().await?;
    Ok(report)
}

/// Every projection table as sorted JSON rows, all columns: two states are equal when their
/// dumps are.
pub async fn canonical_dump(client: &impl Sql) -> Result<Vec<(String, Vec<String>)>, ApplyError> {
    canonical_dump_of(client, PROJECTION_TABLES).await
}

/// [`canonical_dump`] of some of the projection tables.
pub async fn canonical_dump_of(
    client: &impl Sql,
    tables: &[&str],
) -> Result<Vec<(String, Vec<String>)>, ApplyError> {
    let mut dump = Vec::new();
    for table in tables {
        let cursors: String = DELIVERY_CURSORS
            .iter()
            .filter(|(t, _)| t == table)
            .map(|(_, column)| format!(" - '{column}'"))
            .collect();
        let rows = client
            .query(
                &format!("SELECT (to_jsonb(t){cursors})::text AS dumped FROM {table} t ORDER BY 1"),
                &[],
            )
            .await?;
        dump.push((
            (*table).to_owned(),
            rows.iter().map(|r| r.get::<_, String>("dumped")).collect(),
        ));
    }
    Ok(dump)
}
