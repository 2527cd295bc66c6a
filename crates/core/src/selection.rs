//! Choosing agents for a check's slots: online agents with the capability that match a
//! location entry, one per network (ASN, else network name) before a second from the same,
//! least recently chosen first so that repeated checks rotate among equals. Used by the
//! gateway for new checks and by the scheduler for retries.

use std::collections::HashSet;

use checkplane_runtime::db::Sql;
use checkplane_wire::checks::LocationRequest;
use checkplane_wire::events::Location;

/// An online agent that can run the check.
pub struct Candidate {
    pub agent_id: String,
    pub location: Location,
}

/// A row with `agent_id, country, city, asn, network`.
pub fn candidate(row: &tokio_postgres::Row) -> Candidate {
    Candidate {
        agent_id: row.get("agent_id"),
        location: Location {
            country: row.get("country"),
            city: row.get("city"),
            asn: row
                .get::<_, Option<i64>>("asn")
                .and_then(|a| u32::try_from(a).ok()),
            network: row.get("network"),
        },
    }
}

/// Up to `want` online agents with the capability matching `filter`, none of them `taken`:
/// first the least recently chosen agent of each network not in `networks` (what "distinct
/// networks" compares: the ASN, else the network name, else the agent itself), in rotation
/// order, then the others in rotation order. PostgreSQL ranks every matching agent and
/// answers only the chosen. The chosen and their networks are added to `taken` and
/// `networks`, so the next location entry continues from there.
pub async fn choose(
    tx: &impl Sql,
    kind: &str,
    filter: &LocationRequest,
    want: usize,
    taken: &mut HashSet<String>,
    networks: &mut HashSet<String>,
) -> Result<Vec<Candidate>, tokio_postgres::Error> {
    let mut with_value = serde_json::Map::new();
    let mut keys_only: Vec<String> = Vec::new();
    for tag in &filter.tags {
        match tag.split_once(':') {
            Some((k, v)) => {
                with_value.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
            }
            None => keys_only.push(tag.clone()),
        }
    }
    let excluded: Vec<&str> = taken.iter().map(String::as_str).collect();
    let used: Vec<&str> = networks.iter().map(String::as_str).collect();
    let rows = tx
        .query(
            "SELECT agent_id, country, city, asn, network, net FROM (
                SELECT a.agent_id, a.country, a.city, a.asn, a.network, s.last_selected_at, n.net,
                       row_number() OVER (PARTITION BY n.net
                                          ORDER BY s.last_selected_at NULLS FIRST, a.agent_id) AS nth
                FROM agents a LEFT JOIN agent_selection s USING (agent_id)
                CROSS JOIN LATERAL (SELECT CASE WHEN a.asn IS NOT NULL THEN 'as' || a.asn
                                                WHEN a.network IS NOT NULL THEN 'net:' || lower(a.network)
                                                ELSE 'agent:' || a.agent_id END AS net) n
                WHERE a.status = 'online' AND a.revoked_at IS NULL AND a.capabilities ? $1
                  AND ($2::text IS NULL OR a.country = $2)
                  AND ($3::text IS NULL OR lower(a.city) = lower($3))
                  AND ($4::bigint IS NULL OR a.asn = $4)
                  AND ($5::text IS NULL OR lower(a.network) = lower($5))
                  AND a.labels @> $6::jsonb
                  AND a.labels ?& $7::text[]
                  AND a.agent_id <> ALL($8::text[])
             ) c
             ORDER BY (nth = 1 AND net <> ALL($9::text[])) DESC,
                      last_selected_at NULLS FIRST, agent_id
             LIMIT $10",
            &[
                &kind,
                &filter.country,
                &filter.city,
                &filter.asn.map(i64::from),
                &filter.network,
                &serde_json::Value::Object(with_value),
                &keys_only,
                &excluded,
                &used,
                &i64::try_from(want).unwrap_or(i64::MAX),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            taken.insert(row.get("agent_id"));
            networks.insert(row.get("net"));
            candidate(row)
        })
        .collect())
}

/// Note the chosen agents as chosen now (operational state for rotation).
pub async fn record_selected(
    client: &impl Sql,
    agents: &[&str],
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO agent_selection (agent_id, last_selected_at, selections)
             SELECT a, clock_timestamp(), 1 FROM unnest($1::text[]) AS a
             ON CONFLICT (agent_id) DO UPDATE
             SET last_selected_at = EXCLUDED.last_selected_at,
                 selections = agent_selection.selections + 1",
            &[&agents],
        )
        .await?;
    Ok(())
}
