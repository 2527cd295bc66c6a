//! Events the projector parked in `projection_failures` (they failed to apply
//! `PROJECTOR_MAX_ATTEMPTS` times, so their stream went on without them): listed for admins,
//! and replayed after a fix through the same `record` + `apply` as everything else.
//!
//! A replay takes the rows it replays (in id order, a hundred per transaction) with
//! `FOR UPDATE SKIP LOCKED` (two replays never run one
//! event twice), applies each under a savepoint, deletes the row of each that applied (or that
//! `events` already holds: applied meanwhile), and leaves the others with their new error and
//! one more attempt. Nothing is applied twice: `events` is the judge, as for the projector.

use crate::projection::{record_and_apply, ApplyError};
use checkplane_wire::events::Event;

/// One parked event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParkedEvent {
    pub id: i64,
    pub stream: String,
    pub entry_id: String,
    pub consumer_group: String,
    pub event_id: Option<uuid::Uuid>,
    /// The event's type, as the projector decoded it (none when it could not).
    pub event_type: Option<String>,
    pub attempts: i32,
    pub error: String,
    pub parked_at: String,
    /// The stream entry's `event` field, as it was (at most 16 kB of it).
    pub entry: String,
}

/// The most of an entry [`list`] shows.
const ENTRY_SHOWN: i32 = 16 * 1024;

/// A page of the parked events, oldest first, and how many there are.
pub async fn list(
    client: &impl checkplane_runtime::db::Sql,
    limit: i64,
    offset: i64,
) -> Result<(Vec<ParkedEvent>, i64), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, stream, entry_id, consumer_group, event_id, event_type, attempts, error,
                    cp_rfc3339(parked_at) AS parked_at,
                    left(entry, $3) AS entry, count(*) OVER () AS total
             FROM projection_failures ORDER BY projection_failures.parked_at, id LIMIT $1 OFFSET $2",
            &[&limit, &offset, &ENTRY_SHOWN],
        )
        .await?;
    // Counted with the page, so the two agree; only a page past the end counts apart.
    let total = match rows.first() {
        Some(row) => row.get("total"),
        None if offset == 0 => 0,
        None => count(client).await?,
    };
    Ok((
        rows.iter()
            .map(|r| ParkedEvent {
                id: r.get("id"),
                stream: r.get("stream"),
                entry_id: r.get("entry_id"),
                consumer_group: r.get("consumer_group"),
                event_id: r.get("event_id"),
                event_type: r.get("event_type"),
                attempts: r.get("attempts"),
                error: r.get("error"),
                parked_at: r.get("parked_at"),
                entry: shown(r.get("entry")),
            })
            .collect(),
        total,
    ))
}

/// An entry as readers see it: a check's request headers redacted
/// ([`checkplane_wire::checks::redact_headers`]); one that does not read as JSON (cut at
/// [`ENTRY_SHOWN`], or the very reason it was parked) could hold them anywhere, so only its
/// size is shown (Redis's stream and the `projection_failures` row keep it whole).
fn shown(entry: String) -> String {
    match serde_json::from_str::<serde_json::Value>(&entry) {
        Ok(mut value) => {
            checkplane_wire::checks::redact_headers(&mut value);
            value.to_string()
        }
        Err(_) => format!(
            "[not shown: {} bytes that do not read as JSON; the row in projection_failures \
             holds them]",
            entry.len()
        ),
    }
}

/// How many events are parked.
pub async fn count(
    client: &impl checkplane_runtime::db::Sql,
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT count(*) AS n FROM projection_failures", &[])
        .await?
        .get("n"))
}

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Applied now (their rows deleted).
    pub applied: u64,
    /// Already in `events` (applied meanwhile): their rows deleted.
    pub known: u64,
    /// Failed again: kept, with the new error.
    pub failed: u64,
}

/// Events replayed per transaction: a replay holds the rows it touches only that long.
const REPLAY_BATCH: i64 = 100;

/// Replay the parked events (`only` one of them, by id), oldest first, [`REPLAY_BATCH`] per
/// transaction; each event is tried once.
pub async fn replay(
    client: &mut tokio_postgres::Client,
    only: Option<i64>,
) -> Result<Replayed, ApplyError> {
    let mut done = Replayed::default();
    let mut after = 0i64;
    // What is parked now: events parked while the replay runs wait for the next one.
    let until: i64 = client
        .query_one(
            "SELECT COALESCE(max(id), 0) AS until FROM projection_failures",
            &[],
        )
        .await?
        .get("until");
    loop {
        let (batch, last) = replay_batch(client, only, after, until).await?;
        done.applied += batch.applied;
        done.known += batch.known;
        done.failed += batch.failed;
        match last {
            Some(last) => after = last,
            None => return Ok(done),
        }
    }
}

/// One batch of [`replay`]: the parked events with ids above `after`; what it did, and the
/// last id it took (`None`: nothing was left).
async fn replay_batch(
    client: &mut tokio_postgres::Client,
    only: Option<i64>,
    after: i64,
    until: i64,
) -> Result<(Replayed, Option<i64>), ApplyError> {
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT id, entry FROM projection_failures
             WHERE ($1::bigint IS NULL OR id = $1) AND id > $2 AND id <= $4
             ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED",
            &[&only, &after, &REPLAY_BATCH, &until],
        )
        .await?;
    let last = rows.last().map(|r| r.get::<_, i64>("id"));
    let mut done = Replayed::default();
    for row in &rows {
        let (id, entry): (i64, String) = (row.get("id"), row.get("entry"));
        tx.batch_execute("SAVEPOINT replay").await?;
        // Through the upcaster, as the projector reads it: an event parked before an upgrade
        // replays in today's shape, and one of a newer schema stays parked.
        let outcome = match Event::decode_str(&entry) {
            Ok(event) => record_and_apply(&tx, &event).await,
            Err(error) => Err(ApplyError::Decode(error)),
        };
        match outcome {
            Ok(applied) => {
                tx.batch_execute("RELEASE SAVEPOINT replay").await?;
                tx.execute("DELETE FROM projection_failures WHERE id = $1", &[&id])
                    .await?;
                if applied {
                    done.applied += 1;
                } else {
                    done.known += 1;
                }
            }
            Err(error) if error.is_poison() => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT replay").await?;
                let message = checkplane_runtime::error_chain(&error);
                tracing::warn!(id, error = %message, "parked event failed again");
                tx.execute(
                    "UPDATE projection_failures SET attempts = attempts + 1, error = $2,
                         parked_at = now()
                     WHERE id = $1",
                    &[&id, &message],
                )
                .await?;
                done.failed += 1;
            }
            // The database, not the event: this batch changes nothing (earlier ones stay).
            Err(error) => return Err(error),
        }
    }
    tx.commit().await?;
    Ok((done, last))
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn a_parked_entry_shows_no_request_header_value() {
        let entry = r#"{"type":"check.created","payload":{"check_id":"c","options":{"headers":{"authorization":"Bearer s3cret"}}}}"#;
        let seen = shown(entry.to_owned());
        assert!(!seen.contains("s3cret"), "{seen}");
        assert!(seen.contains(r#""authorization":"[redacted]""#), "{seen}");
        // Cut short (or never JSON): only its size.
        let at = entry.find("}}}}").unwrap();
        assert!(entry[..at].contains("s3cret"));
        let cut = shown(entry[..at].to_owned());
        assert!(!cut.contains("s3cret"), "{cut}");
        assert!(cut.contains(&format!("{at} bytes")), "{cut}");
    }
}
