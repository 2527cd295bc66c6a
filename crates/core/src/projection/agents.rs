//! Agents' rows: registrations (identity columns by `identity_version`) and presence
//! (status by `status_version`, every transition in `agent_status_history`).

use checkplane_runtime::db::Sql;
use checkplane_wire::events::{
    AgentPresence, AgentReenrollApproved, AgentRegistered, AgentRevoked, Event,
};

use super::{ApplyError, AT};

pub(super) async fn apply_registered(
    client: &impl Sql,
    event: &Event,
    e: &AgentRegistered,
) -> Result<(), ApplyError> {
    let labels = serde_json::to_value(&e.labels)?;
    let capabilities = serde_json::to_value(&e.capabilities)?;
    let asn = e.location.asn.map(i64::from);
    // Each identity column takes the new value only when this event's version is newer.
    let newer = "agents.identity_version < EXCLUDED.identity_version";
    let sql = format!(
        "INSERT INTO agents (agent_id, hostname, token_hash, labels, capabilities, country, city, asn,
                             network, location_source, address, agent_version, registered_at,
                             updated_at, identity_version, previous_token_hash)
         VALUES ($2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, {AT}, {AT}, $14, $15)
         ON CONFLICT (agent_id) DO UPDATE SET
            hostname = CASE WHEN {newer} THEN EXCLUDED.hostname ELSE agents.hostname END,
            token_hash = CASE WHEN {newer} THEN EXCLUDED.token_hash ELSE agents.token_hash END,
            previous_token_hash = CASE WHEN {newer} THEN EXCLUDED.previous_token_hash
                                       ELSE agents.previous_token_hash END,
            labels = CASE WHEN {newer} THEN EXCLUDED.labels ELSE agents.labels END,
            capabilities = CASE WHEN {newer} THEN EXCLUDED.capabilities ELSE agents.capabilities END,
            country = CASE WHEN {newer} THEN EXCLUDED.country ELSE agents.country END,
            city = CASE WHEN {newer} THEN EXCLUDED.city ELSE agents.city END,
            asn = CASE WHEN {newer} THEN EXCLUDED.asn ELSE agents.asn END,
            network = CASE WHEN {newer} THEN EXCLUDED.network ELSE agents.network END,
            location_source = CASE WHEN {newer} THEN EXCLUDED.location_source ELSE agents.location_source END,
            address = CASE WHEN {newer} THEN EXCLUDED.address ELSE agents.address END,
            agent_version = CASE WHEN {newer} THEN EXCLUDED.agent_version ELSE agents.agent_version END,
            updated_at = CASE WHEN {newer} THEN EXCLUDED.updated_at ELSE agents.updated_at END,
            registered_at = LEAST(agents.registered_at, EXCLUDED.registered_at),
            reenroll_until = CASE WHEN {newer} THEN NULL ELSE agents.reenroll_until END,
            revoked_at = CASE WHEN {newer} THEN NULL ELSE agents.revoked_at END,
            revoked_by = CASE WHEN {newer} THEN NULL ELSE agents.revoked_by END,
            identity_version = GREATEST(agents.identity_version, EXCLUDED.identity_version)"
    );
    client
        .execute(
            &sql,
            &[
                &event.occurred_at,
                &e.agent_id,
                &e.hostname,
                &e.token_hash,
                &labels,
                &capabilities,
                &e.location.country,
                &e.location.city,
                &asn,
                &e.location.network,
                &e.location_source,
                &e.address,
                &e.agent_version,
                &event.version,
                &e.replaced_token_hash,
            ],
        )
        .await?;
    Ok(())
}

/// An admin's approval of one registration by the enrollment token alone: a step of the
/// agent's identity (its version), undone by the next registration.
pub(super) async fn apply_reenroll_approved(
    client: &impl Sql,
    event: &Event,
    e: &AgentReenrollApproved,
) -> Result<(), ApplyError> {
    client
        .execute(
            "UPDATE agents SET reenroll_until = cp_at_ms($2), identity_version = $3
             WHERE agent_id = $1 AND identity_version < $3",
            &[&e.agent_id, &e.until_ms, &event.version],
        )
        .await?;
    Ok(())
}

/// An admin's revocation: a step of the agent's identity that voids its tokens (current and
/// previous) and any pending approval; the next registration (after a new approval) undoes it.
pub(super) async fn apply_revoked(
    client: &impl Sql,
    event: &Event,
    e: &AgentRevoked,
) -> Result<(), ApplyError> {
    client
        .execute(
            &format!(
                "UPDATE agents SET token_hash = NULL, previous_token_hash = NULL,
                        reenroll_until = NULL, revoked_at = {AT}, revoked_by = $4,
                        identity_version = $3
                 WHERE agent_id = $2 AND identity_version < $3"
            ),
            &[
                &event.occurred_at,
                &e.agent_id,
                &event.version,
                &event.actor,
            ],
        )
        .await?;
    Ok(())
}

/// One presence event: [`apply_presence_batch`] of one.
pub(super) async fn apply_presence(
    client: &impl Sql,
    event: &Event,
    e: &AgentPresence,
    status: &str,
) -> Result<(), ApplyError> {
    apply_presence_batch(client, &[(event, e, status)]).await
}

/// Presence events: each in `agent_status_history`, and per agent the newest status (by
/// version) against the stored one, every transition counted (how often an agent flaps,
/// which is why each event must be applied exactly once).
pub(super) async fn apply_presence_batch(
    client: &impl Sql,
    events: &[(&Event, &AgentPresence, &str)],
) -> Result<(), ApplyError> {
    let ids: Vec<uuid::Uuid> = events.iter().map(|(e, _, _)| e.event_id).collect();
    let agents: Vec<&str> = events.iter().map(|(_, p, _)| p.agent_id.as_str()).collect();
    let statuses: Vec<&str> = events.iter().map(|(_, _, s)| *s).collect();
    let versions: Vec<i64> = events.iter().map(|(e, _, _)| e.version).collect();
    let reasons: Vec<&str> = events.iter().map(|(_, p, _)| p.reason.as_str()).collect();
    let ms: Vec<i64> = events.iter().map(|(e, _, _)| e.occurred_at).collect();
    client
        .execute(
            "INSERT INTO agent_status_history (event_id, agent_id, status, version, reason, occurred_at)
             SELECT id, agent, status, v, reason, cp_at_ms(ms)
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[])
               AS u(id, agent, status, v, reason, ms)
             ON CONFLICT (event_id) DO NOTHING",
            &[&ids, &agents, &statuses, &versions, &reasons, &ms],
        )
        .await?;
    // One row per agent, in agent order (replicas lock rows in one order): the newest status
    // of the batch against the stored one, and every transition counted.
    let newer = "agents.status_version < EXCLUDED.status_version";
    client
        .execute(
            &format!(
                "INSERT INTO agents (agent_id, status, status_changed_at, status_version, status_changes)
                 SELECT agent, (array_agg(status ORDER BY v DESC))[1],
                        cp_at_ms((array_agg(ms ORDER BY v DESC))[1]),
                        max(v), count(*)
                 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS u(agent, status, v, ms)
                 GROUP BY agent ORDER BY agent
                 ON CONFLICT (agent_id) DO UPDATE SET
                    status = CASE WHEN {newer} THEN EXCLUDED.status ELSE agents.status END,
                    status_changed_at = CASE WHEN {newer} THEN EXCLUDED.status_changed_at
                                             ELSE agents.status_changed_at END,
                    status_version = GREATEST(agents.status_version, EXCLUDED.status_version),
                    status_changes = agents.status_changes + EXCLUDED.status_changes"
            ),
            &[&agents, &statuses, &versions, &ms],
        )
        .await?;
    Ok(())
}
