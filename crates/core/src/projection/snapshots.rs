//! Long-lived projection rows beyond the events retention.
//!
//! `events` keeps `EVENTS_RETENTION` (30 days); `rebuild` replays what it keeps. Checks,
//! results and histories are meant to age out with it, but some rows live as long as the
//! installation: agents, API keys, HAProxy instances, backends, servers (with the operators'
//! desired states) and nodes, applications and their groups. Their events are dropped with
//! the partitions that hold them, yet rebuild must reproduce them.
//!
//! So before events leave, every long-lived row is written into `events` as one
//! `projection.snapshot` (the row as `to_jsonb` gives it, `occurred_at` now), in the same
//! transaction that drops the events, after the earlier snapshots are deleted: at most one
//! snapshot per row, always newer than what was dropped. Live, a snapshot is only recorded
//! (the row is it already); `rebuild` applies it with each table's merge, the same rules the
//! events follow (a version column decides, `LEAST` of first-seen times, the earliest
//! revocation), so kept events before and after it in replay order land as they did live. A
//! counter (an agent's `status_changes`) is written as what the dropped events counted:
//! the live count less the presence events that stay, which replay adds back.
//!
//! Time-bounded tables (checks and slots, tasks, histories, actions, the audit log) are not
//! snapshotted: rebuild reproduces their last `EVENTS_RETENTION`.

use checkplane_wire::events::ProjectionSnapshot;

use super::ApplyError;
use checkplane_runtime::db::Sql;

/// A long-lived projection table: how its snapshot is made and merged back.
struct LongLived {
    table: &'static str,
    /// Its primary key columns (the conflict target).
    key: &'static str,
    /// SQL naming one row (in `t`), for the snapshot's aggregate id.
    id: &'static str,
    /// The `SET` list merging a snapshot row (`EXCLUDED`) into an existing one; empty: the
    /// row never changes once made.
    merge: fn() -> String,
}

/// `column = CASE WHEN when THEN EXCLUDED.column ELSE table.column END` for each column.
fn taken_when(table: &str, when: &str, columns: &[&str]) -> Vec<String> {
    columns
        .iter()
        .map(|c| format!("{c} = CASE WHEN {when} THEN EXCLUDED.{c} ELSE {table}.{c} END"))
        .collect()
}

fn agents_merge() -> String {
    let identity = taken_when(
        "agents",
        "agents.identity_version < EXCLUDED.identity_version",
        &[
            "hostname",
            "token_hash",
            "previous_token_hash",
            "reenroll_until",
            "revoked_at",
            "revoked_by",
            "labels",
            "capabilities",
            "country",
            "city",
            "asn",
            "network",
            "location_source",
            "address",
            "agent_version",
            "updated_at",
        ],
    );
    let presence = taken_when(
        "agents",
        "agents.status_version < EXCLUDED.status_version",
        &["status", "status_changed_at"],
    );
    [
        identity,
        presence,
        vec![
            "registered_at = LEAST(agents.registered_at, EXCLUDED.registered_at)".into(),
            "identity_version = GREATEST(agents.identity_version, EXCLUDED.identity_version)"
                .into(),
            "status_version = GREATEST(agents.status_version, EXCLUDED.status_version)".into(),
            "status_changes = agents.status_changes + EXCLUDED.status_changes".into(),
        ],
    ]
    .concat()
    .join(", ")
}

fn keys_merge() -> String {
    taken_when(
        "api_keys",
        "api_keys.revoked_at IS NULL OR EXCLUDED.revoked_at < api_keys.revoked_at",
        &["revoked_at", "revoked_by"],
    )
    .join(", ")
}

fn instances_merge() -> String {
    [
        taken_when(
            "haproxy_instances",
            "haproxy_instances.removed_at IS NULL OR EXCLUDED.removed_at < haproxy_instances.removed_at",
            &["removed_at"],
        ),
        taken_when(
            "haproxy_instances",
            "haproxy_instances.last_poll < EXCLUDED.last_poll",
            &["last_poll_at"],
        ),
        vec!["last_poll = GREATEST(haproxy_instances.last_poll, EXCLUDED.last_poll)".into()],
    ]
    .concat()
    .join(", ")
}

fn backends_merge() -> String {
    "first_seen = LEAST(haproxy_backends.first_seen, EXCLUDED.first_seen)".into()
}

fn servers_merge() -> String {
    let t = "haproxy_servers";
    [
        taken_when(
            t,
            "haproxy_servers.observed_poll < EXCLUDED.observed_poll",
            &[
                "address",
                "port",
                "weight",
                "op_state",
                "admin_state",
                "admin_bits",
                "status",
                "check_status",
                "scur",
                "observed_at",
            ],
        ),
        // The misses and the soft delete go with the newest poll that spoke of the server.
        taken_when(
            t,
            "GREATEST(haproxy_servers.observed_poll, haproxy_servers.missed_poll)
               < GREATEST(EXCLUDED.observed_poll, EXCLUDED.missed_poll)",
            &["missed_polls", "missed_poll", "removed_at"],
        ),
        taken_when(
            t,
            "haproxy_servers.desired_at IS NULL OR haproxy_servers.desired_at <= EXCLUDED.desired_at",
            &["desired_state", "desired_by", "desired_at"],
        ),
        vec!["observed_poll = GREATEST(haproxy_servers.observed_poll, EXCLUDED.observed_poll)".into()],
    ]
    .concat()
    .join(", ")
}

fn nodes_merge() -> String {
    taken_when(
        "haproxy_nodes",
        "haproxy_nodes.version < EXCLUDED.version",
        &["hostname", "enabled", "version", "marked_by", "marked_at"],
    )
    .join(", ")
}

fn unchanging() -> String {
    String::new()
}

const LONG_LIVED: &[LongLived] = &[
    LongLived {
        table: "agents",
        key: "agent_id",
        id: "t.agent_id",
        merge: agents_merge,
    },
    LongLived {
        table: "api_keys",
        key: "key_id",
        id: "t.key_id",
        merge: keys_merge,
    },
    LongLived {
        table: "haproxy_instances",
        key: "instance_id",
        id: "t.instance_id",
        merge: instances_merge,
    },
    LongLived {
        table: "haproxy_backends",
        key: "backend_id",
        id: "t.backend_id",
        merge: backends_merge,
    },
    LongLived {
        table: "haproxy_servers",
        key: "server_id",
        id: "t.server_id",
        merge: servers_merge,
    },
    LongLived {
        table: "haproxy_nodes",
        key: "server_id",
        id: "t.server_id",
        merge: nodes_merge,
    },
    LongLived {
        table: "applications",
        key: "application_id",
        id: "t.application_id",
        merge: unchanging,
    },
    LongLived {
        table: "application_groups",
        key: "group_id",
        id: "t.group_id",
        merge: unchanging,
    },
    LongLived {
        table: "application_group_members",
        key: "group_id, application_id",
        id: "t.group_id || '/' || t.application_id",
        merge: unchanging,
    },
];

/// The long-lived projection tables, whose rows outlive their events.
pub fn long_lived_tables() -> impl Iterator<Item = &'static str> {
    LONG_LIVED.iter().map(|l| l.table)
}

/// Merge a snapshot row into its table (rebuild).
pub(super) async fn apply(client: &impl Sql, e: &ProjectionSnapshot) -> Result<(), ApplyError> {
    let Some(spec) = LONG_LIVED.iter().find(|l| l.table == e.table) else {
        return Err(ApplyError::Snapshot(e.table.clone()));
    };
    let merge = (spec.merge)();
    let on_conflict = if merge.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        format!("DO UPDATE SET {merge}")
    };
    let table = spec.table;
    // Only the columns the snapshot has: a column a later migration added (with its default)
    // takes that default rather than a NULL, so older snapshots still apply.
    let Some(row) = e.row.as_object() else {
        return Err(ApplyError::Snapshot(format!("{table} (row is no object)")));
    };
    let identifier = |c: &String| {
        c.starts_with(|ch: char| ch.is_ascii_lowercase() || ch == '_')
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    if row.is_empty() || !row.keys().all(identifier) {
        return Err(ApplyError::Snapshot(format!("{table} (bad columns)")));
    }
    // And only those the table still has: a column a later migration dropped is left out.
    let existing: Vec<String> = client
        .query(
            "SELECT attname::text AS name FROM pg_attribute
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
            &[&table],
        )
        .await?
        .iter()
        .map(|r| r.get("name"))
        .collect();
    let columns = row
        .keys()
        .filter(|c| existing.contains(c))
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    client
        .execute(
            &format!(
                "INSERT INTO {table} ({columns})
                 SELECT {columns} FROM jsonb_populate_record(NULL::{table}, $1)
                 ON CONFLICT ({}) {on_conflict}",
                spec.key
            ),
            &[&e.row],
        )
        .await?;
    Ok(())
}

/// Events `retention` is about to remove: the partitions it drops (by oid) and the default
/// partition's rows older than the cutoff. `e` is the alias of `events` in the predicate.
pub(crate) const DOOMED: &str =
    "(e.tableoid = ANY($1::oid[]) OR (e.tableoid = 'events_default'::regclass AND e.occurred_at < $2))";

/// Replace every snapshot with one of each long-lived row as it stands, in `tx`, before the
/// events [`DOOMED`] describes (`doomed` partitions, default rows before `cutoff`) are
/// removed in the same transaction: the number of snapshots written.
pub(crate) async fn write(
    tx: &impl Sql,
    doomed: &[u32],
    cutoff: std::time::SystemTime,
) -> Result<u64, tokio_postgres::Error> {
    // By the partial index `events_snapshots`, as the count below by `events_presence`: no
    // scan of the whole table.
    tx.execute("DELETE FROM events WHERE type = 'projection.snapshot'", &[])
        .await?;
    let mut written = 0;
    for spec in LONG_LIVED {
        let table = spec.table;
        let insert = |row: &str| {
            format!(
                "INSERT INTO events (event_id, occurred_at, type, aggregate_id, version, actor,
                                     schema, payload)
                 SELECT gen_random_uuid(), now(), 'projection.snapshot',
                        'snapshot:{table}:' || {id}, 1, 'system:retention', {schema},
                        jsonb_build_object('table', '{table}', 'row', {row})
                 FROM {table} t",
                id = spec.id,
                schema = checkplane_wire::events::SCHEMA,
            )
        };
        written += if table == "agents" {
            // An agent's count of presence transitions: what the dropped events counted (the
            // live count less the transitions whose events stay, which replay adds back).
            let row = "to_jsonb(t) || jsonb_build_object('status_changes',
                 t.status_changes - COALESCE((SELECT n FROM kept k WHERE k.agent_id = t.agent_id), 0))";
            tx.execute(
                &format!(
                    "WITH kept AS (
                         SELECT e.payload->>'agent_id' AS agent_id, count(*) AS n FROM events e
                         WHERE e.type IN ('agent.online', 'agent.offline') AND NOT {DOOMED}
                         GROUP BY 1)
                     {}",
                    insert(row)
                ),
                &[&doomed, &cutoff],
            )
            .await?
        } else {
            tx.execute(&insert("to_jsonb(t)"), &[]).await?
        };
    }
    Ok(written)
}
