//! Events for tests, shaped as the services make them.

use std::collections::BTreeMap;

use checkplane_wire::events::{AgentPresence, AgentRegistered, Event, EventBody, Location, SCHEMA};
use uuid::Uuid;

/// `agent.online` (or `agent.offline`) of `agent` at presence version `version`.
pub fn presence(agent: &str, version: i64, online: bool, at_ms: i64) -> Event {
    let payload = AgentPresence {
        agent_id: agent.to_owned(),
        reason: if online {
            "heartbeat"
        } else {
            "missed_heartbeat"
        }
        .to_owned(),
    };
    Event {
        event_id: Uuid::now_v7(),
        aggregate_id: format!("presence:{agent}"),
        version,
        occurred_at: at_ms,
        actor: "system:test".to_owned(),
        schema: SCHEMA,
        body: if online {
            EventBody::AgentCameBack(payload)
        } else {
            EventBody::AgentWentOffline(payload)
        },
    }
}

/// `agent.registered` of `agent` at identity version `version`.
pub fn registered(agent: &str, version: i64, at_ms: i64) -> Event {
    Event {
        event_id: Uuid::now_v7(),
        aggregate_id: format!("agent:{agent}"),
        version,
        occurred_at: at_ms,
        actor: format!("agent:{agent}"),
        schema: SCHEMA,
        body: EventBody::AgentRegistered(Box::new(AgentRegistered {
            agent_id: agent.to_owned(),
            hostname: format!("{agent}.test"),
            token_hash: format!("{version:064x}"),
            labels: BTreeMap::from([("v".to_owned(), version.to_string())]),
            capabilities: BTreeMap::from([("dns".to_owned(), u32::try_from(version).unwrap_or(1))]),
            location: Location {
                country: Some("DE".to_owned()),
                city: None,
                asn: Some(64500),
                network: Some(format!("net-{version}")),
            },
            location_source: "declared".to_owned(),
            address: Some("127.0.0.1".to_owned()),
            agent_version: Some(format!("0.{version}")),
            replaced_token_hash: (version > 1).then(|| format!("{:064x}", version - 1)),
        })),
    }
}

/// Append `event` to `stream` as the services do (one field, `event`).
pub async fn xadd(conn: &mut impl redis::aio::ConnectionLike, stream: &str, event: &Event) {
    let json = serde_json::to_string(event).expect("event JSON");
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("event")
        .arg(json)
        .query_async(conn)
        .await
        .expect("XADD");
}

/// Every entry of `stream`, oldest first: its id and its `event` field (as [`xadd`] and the
/// services write them).
pub async fn read(
    conn: &mut impl redis::aio::ConnectionLike,
    stream: &str,
) -> Vec<(String, String)> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|e| {
            (
                e.id.clone(),
                e.get("event").expect("an entry with an event field"),
            )
        })
        .collect()
}
