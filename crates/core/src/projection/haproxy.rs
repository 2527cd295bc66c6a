//! HAProxy events into `haproxy_instances`, `haproxy_backends`, `haproxy_servers` and
//! `haproxy_server_status_history`. Order-free like every projection: a server's observed
//! state is only overwritten by a newer poll (`observed_poll`), and history records a change
//! only when the state a poll saw differs from the state the row holds, so the same change
//! seen by two polls (a takeover, a replayed event) is one history row.

use checkplane_runtime::db::Sql;
use checkplane_wire::events::{
    ApplicationCreated, ApplicationGroupCreated, Event, HaproxyActionRequested,
    HaproxyActionUpdated, HaproxyInstanceRegistered, HaproxyInstanceRemoved, HaproxyNodeMarked,
    HaproxyServerMissing, HaproxyServerObserved,
};
use checkplane_wire::haproxy::{backend_id, server_id};

use super::{ApplyError, AT};

pub(super) async fn apply_registered(
    client: &impl Sql,
    event: &Event,
    e: &HaproxyInstanceRegistered,
) -> Result<(), ApplyError> {
    client
        .execute(
            &format!(
                "INSERT INTO haproxy_instances (instance_id, name, transport, address, node, created_at, created_by)
                 VALUES ($2, $3, $4, $5, $6, {AT}, $7) ON CONFLICT (instance_id) DO NOTHING"
            ),
            &[
                &event.occurred_at,
                &e.instance_id,
                &e.name,
                &e.transport,
                &e.address,
                &e.node,
                &event.actor,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn apply_removed(
    client: &impl Sql,
    event: &Event,
    e: &HaproxyInstanceRemoved,
) -> Result<(), ApplyError> {
    client
        .execute(
            &format!(
                "UPDATE haproxy_instances SET removed_at = LEAST(COALESCE(removed_at, {AT}), {AT})
                 WHERE instance_id = $2"
            ),
            &[&event.occurred_at, &e.instance_id],
        )
        .await?;
    Ok(())
}

async fn note_poll(
    client: &impl Sql,
    event: &Event,
    instance: &str,
    poll: i64,
) -> Result<(), ApplyError> {
    client
        .execute(
            &format!(
                "UPDATE haproxy_instances SET last_poll = $3, last_poll_at = {AT}
                 WHERE instance_id = $2 AND last_poll < $3"
            ),
            &[&event.occurred_at, &instance, &poll],
        )
        .await?;
    Ok(())
}

/// One observation: [`apply_observed_batch`] of one.
pub(super) async fn apply_observed(
    client: &impl Sql,
    event: &Event,
    e: &HaproxyServerObserved,
) -> Result<(), ApplyError> {
    apply_observed_batch(client, &[(event, e)]).await
}

pub(super) async fn apply_missing(
    client: &impl Sql,
    event: &Event,
    e: &HaproxyServerMissing,
) -> Result<(), ApplyError> {
    let server = server_id(&e.instance_id, &e.backend, &e.server);
    note_poll(client, event, &e.instance_id, e.poll).await?;
    // Counted once per poll, only for polls after the one that last saw it; the second miss
    // in a row soft-deletes.
    client
        .execute(
            &format!(
                "UPDATE haproxy_servers SET
                     missed_polls = missed_polls + 1,
                     missed_poll = $3,
                     removed_at = CASE WHEN missed_polls + 1 >= 2 THEN COALESCE(removed_at, {AT}) ELSE removed_at END
                 WHERE server_id = $2 AND observed_poll < $3 AND missed_poll < $3"
            ),
            &[&event.occurred_at, &server, &e.poll],
        )
        .await?;
    Ok(())
}

pub(super) async fn apply_action_requested(
    client: &impl Sql,
    event: &Event,
    e: &HaproxyActionRequested,
) -> Result<(), ApplyError> {
    let wait = i64::try_from(e.drain_wait_ms).unwrap_or(i64::MAX);
    client
        .execute(
            &format!(
                "INSERT INTO haproxy_actions (action_id, idempotency_key, server_id, instance_id, backend,
                     server, action, drain_wait_ms, status, version, requested_by, requested_at, updated_at)
                 VALUES ($2, $3, $4, $5, $6, $7, $8, $9, 'pending', 1, $10, {AT}, {AT})
                 ON CONFLICT DO NOTHING"
            ),
            &[
                &event.occurred_at,
                &e.action_id,
                &e.idempotency_key,
                &e.server_id,
                &e.instance_id,
                &e.backend,
                &e.server,
                &e.action,
                &wait,
                &event.actor,
            ],
        )
        .await?;
    // The desired state waits for the action to succeed (see `apply_action_updated`).
    Ok(())
}

pub(super) async fn apply_action_updated(
    client: &impl Sql,
    event: &Event,
    e: &HaproxyActionUpdated,
) -> Result<(), ApplyError> {
    let attempts = i32::try_from(e.attempts).unwrap_or(i32::MAX);
    let updated = client
        .execute(
            &format!(
                "UPDATE haproxy_actions SET status = $3, version = $4, attempts = $5, detail = $6,
                     error = $7, updated_at = {AT}
                 WHERE action_id = $2 AND version < $4"
            ),
            &[
                &event.occurred_at,
                &e.action_id,
                &e.status,
                &event.version,
                &attempts,
                &e.detail,
                &e.error,
            ],
        )
        .await?;
    if updated == 0 {
        return Ok(());
    }
    match e.status.as_str() {
        // The operator's wish, kept apart from what HAProxy says: only what HAProxy took
        // becomes it (a refused `maint` must not be re-applied after a reload), the last
        // success winning, named after whoever asked.
        "success" => {
            client
                .execute(
                    &format!(
                        "UPDATE haproxy_servers s SET desired_state = a.action,
                             desired_by = a.requested_by, desired_at = {AT}
                         FROM haproxy_actions a
                         WHERE a.action_id = $2 AND s.server_id = a.server_id
                           AND (s.desired_at IS NULL OR s.desired_at <= {AT})"
                    ),
                    &[&event.occurred_at, &e.action_id],
                )
                .await?;
        }
        // The failure stays in the server's history beside its state changes: what was asked
        // and why HAProxy did not take it (the state, unchanged, as last observed).
        "failed" => {
            client
                .execute(
                    &format!(
                        "INSERT INTO haproxy_server_status_history (event_id, server_id, occurred_at,
                             previous_state, new_state, previous_status, new_status, changed_by,
                             poll, action, error)
                         SELECT $2, a.server_id, {AT}, s.admin_state, COALESCE(s.admin_state, ''),
                                s.status, s.status, a.action_id, COALESCE(s.observed_poll, 0),
                                a.action, $4
                         FROM haproxy_actions a
                         LEFT JOIN haproxy_servers s ON s.server_id = a.server_id
                         WHERE a.action_id = $3
                         ON CONFLICT (event_id) DO NOTHING"
                    ),
                    &[&event.occurred_at, &event.event_id, &e.action_id, &e.error],
                )
                .await?;
        }
        _ => {}
    }
    Ok(())
}

pub(super) async fn apply_node_marked(
    client: &impl Sql,
    event: &Event,
    e: &HaproxyNodeMarked,
) -> Result<(), ApplyError> {
    client
        .execute(
            &format!(
                "INSERT INTO haproxy_nodes (server_id, hostname, enabled, version, marked_by, marked_at)
                 VALUES ($2, $3, $4, $5, $6, {AT})
                 ON CONFLICT (server_id) DO UPDATE SET hostname = EXCLUDED.hostname,
                     enabled = EXCLUDED.enabled, version = EXCLUDED.version,
                     marked_by = EXCLUDED.marked_by, marked_at = EXCLUDED.marked_at
                 WHERE haproxy_nodes.version < EXCLUDED.version"
            ),
            &[
                &event.occurred_at,
                &e.server_id,
                &e.hostname,
                &e.enabled,
                &event.version,
                &event.actor,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn apply_application(
    client: &impl Sql,
    event: &Event,
    e: &ApplicationCreated,
) -> Result<(), ApplyError> {
    client
        .execute(
            &format!(
                "INSERT INTO applications (application_id, name, port, addresses, created_at, created_by)
                 VALUES ($2, $3, $4, $5, {AT}, $6) ON CONFLICT (application_id) DO NOTHING"
            ),
            &[
                &event.occurred_at,
                &e.application_id,
                &e.name,
                &e.port.map(i32::from),
                &e.addresses,
                &event.actor,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn apply_group(
    client: &impl Sql,
    event: &Event,
    e: &ApplicationGroupCreated,
) -> Result<(), ApplyError> {
    client
        .execute(
            &format!(
                "INSERT INTO application_groups (group_id, name, created_at, created_by)
                 VALUES ($2, $3, {AT}, $4) ON CONFLICT (group_id) DO NOTHING"
            ),
            &[&event.occurred_at, &e.group_id, &e.name, &event.actor],
        )
        .await?;
    client
        .execute(
            "INSERT INTO application_group_members (group_id, application_id)
             SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
            &[&e.group_id, &e.applications],
        )
        .await?;
    Ok(())
}

/// [`apply_observed`] for many events at once, each about another server (one poll's): the
/// newest poll of each instance noted, backends upserted, servers locked and compared, then
/// written and their changes put in history, one statement each.
/// One event of a batch: the event, its payload and its server's id.
type Observed<'a> = (&'a Event, &'a HaproxyServerObserved, String);

pub(crate) async fn apply_observed_batch(
    client: &impl Sql,
    events: &[(&Event, &HaproxyServerObserved)],
) -> Result<(), ApplyError> {
    // In rounds, each server once per round and in the order given: a second event about a
    // server goes in the next round, after the first.
    let mut rest: Vec<(&Event, &HaproxyServerObserved)> = events.to_vec();
    while !rest.is_empty() {
        let mut seen = std::collections::HashSet::new();
        let mut round = Vec::with_capacity(rest.len());
        let mut later = Vec::new();
        for (event, e) in rest {
            let server = server_id(&e.instance_id, &e.backend, &e.server);
            if seen.insert(server.clone()) {
                round.push((event, e, server));
            } else {
                later.push((event, e));
            }
        }
        apply_observed_round(client, &round).await?;
        rest = later;
    }
    Ok(())
}

/// One round of [`apply_observed_batch`]: each server at most once.
async fn apply_observed_round(client: &impl Sql, batch: &[Observed<'_>]) -> Result<(), ApplyError> {
    let mut newest: std::collections::BTreeMap<&str, (&Event, i64)> =
        std::collections::BTreeMap::new();
    for (event, e, _) in batch {
        let entry = newest
            .entry(e.instance_id.as_str())
            .or_insert((event, e.poll));
        if e.poll > entry.1 {
            *entry = (event, e.poll);
        }
    }
    for (instance, (event, poll)) in newest {
        note_poll(client, event, instance, poll).await?;
    }
    let mut backends: std::collections::BTreeMap<String, (&str, &str, i64)> =
        std::collections::BTreeMap::new();
    for (event, e, _) in batch {
        let id = backend_id(&e.instance_id, &e.backend);
        let entry = backends.entry(id).or_insert((
            e.instance_id.as_str(),
            e.backend.as_str(),
            event.occurred_at,
        ));
        entry.2 = entry.2.min(event.occurred_at);
    }
    let (b_ids, b_rest): (Vec<&String>, Vec<&(&str, &str, i64)>) = backends.iter().unzip();
    let b_instances: Vec<&str> = b_rest.iter().map(|b| b.0).collect();
    let b_names: Vec<&str> = b_rest.iter().map(|b| b.1).collect();
    let b_at: Vec<i64> = b_rest.iter().map(|b| b.2).collect();
    client
        .execute(
            "INSERT INTO haproxy_backends (backend_id, instance_id, name, first_seen)
             SELECT id, i, n, cp_at_ms(ms)
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS u(id, i, n, ms)
             ON CONFLICT (backend_id) DO UPDATE SET first_seen = LEAST(haproxy_backends.first_seen, EXCLUDED.first_seen)",
            &[&b_ids, &b_instances, &b_names, &b_at],
        )
        .await?;
    let servers: Vec<&str> = batch.iter().map(|(_, _, s)| s.as_str()).collect();
    let before: std::collections::HashMap<String, (i64, Option<String>, Option<String>)> = client
        .query(
            "SELECT server_id, observed_poll, admin_state, status FROM haproxy_servers
             WHERE server_id = ANY($1) ORDER BY server_id FOR UPDATE",
            &[&servers],
        )
        .await?
        .iter()
        .map(|r| {
            (
                r.get("server_id"),
                (
                    r.get("observed_poll"),
                    r.get("admin_state"),
                    r.get("status"),
                ),
            )
        })
        .collect();
    // Only what a newer poll has not spoken about yet.
    let apply: Vec<&Observed<'_>> = batch
        .iter()
        .filter(|(_, e, s)| before.get(s).is_none_or(|b| b.0 < e.poll))
        .collect();
    if apply.is_empty() {
        return Ok(());
    }
    let col = |f: &dyn Fn(&Observed<'_>) -> Option<String>| {
        apply.iter().map(|x| f(x)).collect::<Vec<Option<String>>>()
    };
    let ids = col(&|(_, _, s)| Some(s.clone()));
    let instances = col(&|(_, e, _)| Some(e.instance_id.clone()));
    let backend_ids = col(&|(_, e, _)| Some(backend_id(&e.instance_id, &e.backend)));
    let backend_names = col(&|(_, e, _)| Some(e.backend.clone()));
    let names = col(&|(_, e, _)| Some(e.server.clone()));
    let addresses = col(&|(_, e, _)| Some(e.observed.address.clone()));
    let op_states = col(&|(_, e, _)| Some(e.observed.op_state.clone()));
    let admin_states = col(&|(_, e, _)| Some(e.observed.admin_state.clone()));
    let statuses = col(&|(_, e, _)| e.observed.status.clone());
    let check_statuses = col(&|(_, e, _)| e.observed.check_status.clone());
    let ports: Vec<Option<i32>> = apply
        .iter()
        .map(|(_, e, _)| e.observed.port.map(i32::from))
        .collect();
    let weights: Vec<i32> = apply
        .iter()
        .map(|(_, e, _)| i32::try_from(e.observed.weight).unwrap_or(i32::MAX))
        .collect();
    let bits: Vec<i32> = apply
        .iter()
        .map(|(_, e, _)| i32::try_from(e.observed.admin_bits).unwrap_or(i32::MAX))
        .collect();
    let scurs: Vec<Option<i64>> = apply
        .iter()
        .map(|(_, e, _)| {
            e.observed
                .scur
                .map(|s| i64::try_from(s).unwrap_or(i64::MAX))
        })
        .collect();
    let polls: Vec<i64> = apply.iter().map(|(_, e, _)| e.poll).collect();
    let at: Vec<i64> = apply.iter().map(|(ev, _, _)| ev.occurred_at).collect();
    client
        .execute(
            "INSERT INTO haproxy_servers (server_id, instance_id, backend_id, backend, name, address, port,
                 weight, op_state, admin_state, admin_bits, status, check_status, scur, observed_poll, observed_at)
             SELECT id, i, b, bn, n, a, p, w, o, ad, bits, st, cs, sc, pl,
                    cp_at_ms(ms)
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                 $7::int[], $8::int[], $9::text[], $10::text[], $11::int[], $12::text[], $13::text[],
                 $14::bigint[], $15::bigint[], $16::bigint[])
                 AS u(id, i, b, bn, n, a, p, w, o, ad, bits, st, cs, sc, pl, ms)
             ON CONFLICT (server_id) DO UPDATE SET
                 address = EXCLUDED.address, port = EXCLUDED.port, weight = EXCLUDED.weight,
                 op_state = EXCLUDED.op_state, admin_state = EXCLUDED.admin_state,
                 admin_bits = EXCLUDED.admin_bits, status = EXCLUDED.status,
                 check_status = EXCLUDED.check_status, scur = EXCLUDED.scur,
                 observed_poll = EXCLUDED.observed_poll, observed_at = EXCLUDED.observed_at,
                 missed_polls = 0, removed_at = NULL",
            &[
                &ids,
                &instances,
                &backend_ids,
                &backend_names,
                &names,
                &addresses,
                &ports,
                &weights,
                &op_states,
                &admin_states,
                &bits,
                &statuses,
                &check_statuses,
                &scurs,
                &polls,
                &at,
            ],
        )
        .await?;
    // History: a row for each server new or changed in admin state or status.
    let changed: Vec<&&Observed<'_>> = apply
        .iter()
        .filter(|(_, e, s)| match before.get(s) {
            None => true,
            Some((_, state, status)) => {
                state.as_deref() != Some(e.observed.admin_state.as_str())
                    || *status != e.observed.status
            }
        })
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let h_ids: Vec<uuid::Uuid> = changed.iter().map(|(ev, _, _)| ev.event_id).collect();
    let h_servers: Vec<&str> = changed.iter().map(|(_, _, s)| s.as_str()).collect();
    let h_at: Vec<i64> = changed.iter().map(|(ev, _, _)| ev.occurred_at).collect();
    let h_prev_state: Vec<Option<String>> = changed
        .iter()
        .map(|(_, _, s)| before.get(s).and_then(|b| b.1.clone()))
        .collect();
    let h_state: Vec<&str> = changed
        .iter()
        .map(|(_, e, _)| e.observed.admin_state.as_str())
        .collect();
    let h_prev_status: Vec<Option<String>> = changed
        .iter()
        .map(|(_, _, s)| before.get(s).and_then(|b| b.2.clone()))
        .collect();
    let h_status: Vec<Option<String>> = changed
        .iter()
        .map(|(_, e, _)| e.observed.status.clone())
        .collect();
    let h_cause: Vec<&str> = changed.iter().map(|(_, e, _)| e.cause.as_str()).collect();
    let h_poll: Vec<i64> = changed.iter().map(|(_, e, _)| e.poll).collect();
    client
        .execute(
            "INSERT INTO haproxy_server_status_history (event_id, server_id, occurred_at,
                 previous_state, new_state, previous_status, new_status, changed_by, poll)
             SELECT id, s, cp_at_ms(ms), ps, ns, pst, nst, c, p
             FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::text[], $9::bigint[]) AS u(id, s, ms, ps, ns, pst, nst, c, p)
             ON CONFLICT (event_id) DO NOTHING",
            &[
                &h_ids,
                &h_servers,
                &h_at,
                &h_prev_state,
                &h_state,
                &h_prev_status,
                &h_status,
                &h_cause,
                &h_poll,
            ],
        )
        .await?;
    Ok(())
}
