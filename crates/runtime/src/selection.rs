//! Choosing agents for a check's slots: online agents with the capability that match a
//! location entry, one per network (ASN, else network name) before a second from the same,
//! least recently chosen first so that repeated checks rotate among equals. Used by the
//! gateway for new checks and by the scheduler for retries.

use std::collections::HashSet;

use crate::db::Sql;
use checkplane_wire::checks::LocationRequest;
use checkplane_wire::events::Location;

/// Candidates read per query: room to spread over networks.
const CANDIDATES_MAX: i64 = 5000;

/// An online agent that can run the check.
pub struct Candidate {
    pub agent_id: String,
    pub location: Location,
}

impl Candidate {
    /// What "distinct networks" compares: the ASN, else the network name, else the agent.
    pub fn network_key(&self) -> String {
        match (&self.location.asn, &self.location.network) {
            (Some(asn), _) => format!("as{asn}"),
            (None, Some(network)) => format!("net:{}", network.to_lowercase()),
            (None, None) => format!("agent:{}", self.agent_id),
        }
    }
}

pub fn candidate(row: &tokio_postgres::Row) -> Candidate {
    Candidate {
        agent_id: row.get(0),
        location: Location {
            country: row.get(1),
            city: row.get(2),
            asn: row
                .get::<_, Option<i64>>(3)
                .and_then(|a| u32::try_from(a).ok()),
            network: row.get(4),
        },
    }
}

/// Online agents with the capability matching `filter`, least recently chosen first.
pub async fn candidates(
    tx: &impl Sql,
    kind: &str,
    filter: &LocationRequest,
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
    let rows = tx
        .query(
            "SELECT a.agent_id, a.country, a.city, a.asn, a.network
             FROM agents a LEFT JOIN agent_selection s USING (agent_id)
             WHERE a.status = 'online' AND a.capabilities ? $1
               AND ($2::text IS NULL OR a.country = $2)
               AND ($3::text IS NULL OR lower(a.city) = lower($3))
               AND ($4::bigint IS NULL OR a.asn = $4)
               AND ($5::text IS NULL OR lower(a.network) = lower($5))
               AND a.labels @> $6::jsonb
               AND a.labels ?& $7::text[]
             ORDER BY s.last_selected_at NULLS FIRST, a.agent_id
             LIMIT $8",
            &[
                &kind,
                &filter.country,
                &filter.city,
                &filter.asn.map(i64::from),
                &filter.network,
                &serde_json::Value::Object(with_value),
                &keys_only,
                &CANDIDATES_MAX,
            ],
        )
        .await?;
    Ok(rows.iter().map(candidate).collect())
}

/// Up to `want` of `pool` (in rotation order), not already `taken`: first one per network not
/// yet used, then the rest.
pub fn spread(
    pool: Vec<Candidate>,
    want: usize,
    taken: &mut HashSet<String>,
    networks: &mut HashSet<String>,
) -> Vec<Candidate> {
    let mut chosen = Vec::new();
    let mut later = Vec::new();
    for c in pool {
        if chosen.len() >= want {
            break;
        }
        if taken.contains(&c.agent_id) {
            continue;
        }
        if networks.insert(c.network_key()) {
            taken.insert(c.agent_id.clone());
            chosen.push(c);
        } else {
            later.push(c);
        }
    }
    for c in later {
        if chosen.len() >= want {
            break;
        }
        if taken.insert(c.agent_id.clone()) {
            chosen.push(c);
        }
    }
    chosen
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
