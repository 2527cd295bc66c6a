//! `rebuild` reproduces every projection table, column for column.

use std::time::Duration;

use checkplane_core::keys::Keys;
use checkplane_core::leases::{CloseReason, LeaseSettings, Leases, TaskRef};
use checkplane_core::projection::canonical_dump;
use checkplane_testkit::events::{presence, xadd};
use checkplane_testkit::{eventually, TestDb, TestRedis};
use checkplane_wire::leases::LeaseToken;

use crate::{count, heartbeat, register, start_gateway, start_scheduler};

/// A database with a row in every projection table, made through the services (agents
/// registered, rotated, approved, revoked, checks, HAProxy, leases ...); the services stopped.
pub async fn every_table_filled() -> TestDb {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let admin = "admin-key-0123456789abcdef";
    let gw = start_gateway(&db, &redis, &[("GATEWAY_ADMIN_KEY", admin)]).await;
    let sched = start_scheduler(&db, &redis, &[]).await;
    let mut ids = Vec::new();
    let mut tokens = Vec::new();
    for host in ["r1", "r2", "r3"] {
        let (id, token) = register(&gw, host).await;
        heartbeat(&gw, &id, &token).await;
        ids.push(id);
        tokens.push(token);
    }
    // A rotation (identity version 2), proven by r1's token.
    checkplane_testkit::reregister_agent(
        &reqwest::Client::new(),
        &gw.url(""),
        crate::ENROLL,
        &serde_json::json!({"hostname": "r1", "capabilities": {"dns": 1}}),
        &tokens[0],
    )
    .await;
    // An admin's approval of r2's re-enrollment, not used yet.
    let approved = reqwest::Client::new()
        .post(gw.url(&format!("/v1/agents/{}/reenroll", ids[1])))
        .header("x-api-key", admin)
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status().as_u16(), 200);
    let pending: bool = db
        .client()
        .await
        .query_one(
            "SELECT reenroll_until > now() FROM agents WHERE agent_id = $1",
            &[&ids[1]],
        )
        .await
        .unwrap()
        .get(0);
    assert!(pending, "the approval is projected");
    let keys = Keys::new(redis.prefix.clone(), 4);
    let mut conn = redis.connection().await;
    let far = checkplane_runtime::clock::now_ms() + 60_000;
    xadd(
        &mut conn,
        &keys.presence_events(keys.shard_of(&ids[0])),
        &presence(&ids[0], far, false, far),
    )
    .await;
    // Lease activity: two tasks granted, one reported, one closed (5 lease events).
    let leases = Leases::new(keys.clone(), LeaseSettings::new(30_000, 5));
    let now = checkplane_runtime::clock::now_ms();
    leases
        .enqueue(&mut conn, &ids[1], "dns", "{}")
        .await
        .unwrap();
    leases
        .enqueue(&mut conn, &ids[1], "dns", "{}")
        .await
        .unwrap();
    let granted = leases
        .claim(&mut conn, &ids[1], "rb", &[("dns", 2)], now)
        .await
        .unwrap();
    let first = LeaseToken::parse(&granted[0].token).unwrap();
    let second = LeaseToken::parse(&granted[1].token).unwrap();
    leases
        .report(
            &mut conn,
            &first,
            "finished",
            &serde_json::json!({"rcode": "NOERROR", "answers": []}),
            now,
        )
        .await
        .unwrap();
    let task = TaskRef {
        task: "",
        agent: &ids[1],
        kind: "dns",
        entry: &second.entry,
    };
    leases
        .close(&mut conn, &task, CloseReason::Cancelled, now)
        .await
        .unwrap();
    // Operator keys: one made and revoked, one made (3 events, 3 audit records).
    let http = reqwest::Client::new();
    let mut made = Vec::new();
    for name in ["ops", "dash"] {
        let created: serde_json::Value = http
            .post(gw.url("/v1/keys"))
            .header("x-api-key", admin)
            .json(&serde_json::json!({"name": name, "role": "operator"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        made.push(created["key_id"].as_str().unwrap().to_owned());
    }
    let revoked = http
        .delete(gw.url(&format!("/v1/keys/{}", made[0])))
        .header("x-api-key", admin)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 204);
    eventually("everything projected", Duration::from_secs(10), || async {
        let history = count(&db, "SELECT count(*) FROM agent_status_history").await;
        let events = count(&db, "SELECT count(*) FROM events").await;
        // 15, and the approval of r2's re-enrollment.
        (history == 4 && events == 16).then_some(())
    })
    .await;
    // A check on one of the online agents (one more event, and an audit record).
    let created = http
        .post(gw.url("/v1/checks"))
        .header("x-api-key", admin)
        .json(&serde_json::json!({"kind": "dns", "target": "example.com", "limit": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 202);
    assert_eq!(count(&db, "SELECT count(*) FROM check_slots").await, 2);
    // An HAProxy instance, and a server a poll saw twice (a change: two history rows).
    let registered: serde_json::Value = http
        .post(gw.url("/v1/haproxy/instances"))
        .header("x-api-key", admin)
        .json(&serde_json::json!({"name": "lb-1", "address": "127.0.0.1:9999"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let instance = registered["id"].as_str().unwrap().to_owned();
    // An application and a group of it.
    let made: serde_json::Value = http
        .post(gw.url("/v1/applications"))
        .header("x-api-key", admin)
        .json(&serde_json::json!({"name": "shop", "port": 8080, "addresses": ["10.0.0.1"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let grouped = http
        .post(gw.url("/v1/application-groups"))
        .header("x-api-key", admin)
        .json(&serde_json::json!({"name": "front", "applications": [made["id"]]}))
        .send()
        .await
        .unwrap();
    assert_eq!(grouped.status().as_u16(), 201);
    // One agent's host marked as an HAProxy node, then unmarked (the newest wins).
    for enabled in [true, false] {
        let marked = http
            .put(gw.url(&format!("/v1/servers/{}/haproxy", ids[0])))
            .header("x-api-key", admin)
            .json(&serde_json::json!({"enabled": enabled}))
            .send()
            .await
            .unwrap();
        assert_eq!(marked.status().as_u16(), 200);
    }
    let pg = db.client().await;
    // Two polls of two servers each, recorded the way sync does (one poll's events applied
    // set-based): s1 changes between them, s2 does not. The rebuild replays them one by one,
    // so the comparison below also holds the set-based apply to the per-event one.
    for (poll, state) in [(1i64, "ready"), (2, "drain")] {
        use checkplane_wire::events::*;
        let events: Vec<Event> = [("s1", state), ("s2", "ready")]
            .into_iter()
            .map(|(server, state)| Event {
                event_id: checkplane_wire::haproxy::poll_event_id(&instance, poll, "be", server),
                aggregate_id: format!("haproxy-server:{server}"),
                version: poll,
                occurred_at: checkplane_runtime::clock::now_ms(),
                actor: "haproxy-sync".into(),
                schema: SCHEMA,
                body: EventBody::HaproxyServerObserved(Box::new(HaproxyServerObserved {
                    instance_id: instance.clone(),
                    poll,
                    backend: "be".into(),
                    server: server.into(),
                    observed: server_state(state, None),
                    cause: "sync".into(),
                })),
            })
            .collect();
        checkplane_core::projection::record_and_apply_independent(&pg, &events)
            .await
            .unwrap();
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM haproxy_server_status_history").await,
        3,
        "s1 twice (new, drained), s2 once (new)"
    );
    drop(pg);
    // An operator's drain of that server (an action, and the server's desired state).
    let server = checkplane_wire::haproxy::server_id(&instance, "be", "s1");
    let acted = http
        .post(gw.url(&format!("/v1/haproxy/servers/{server}/action")))
        .header("x-api-key", admin)
        .json(&serde_json::json!({"action": "drain", "idempotency_key": "rebuild-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(acted.status().as_u16(), 202);
    // r3 revoked: its tokens void (and online → offline, reason revoked).
    let revoked = reqwest::Client::new()
        .delete(gw.url(&format!("/v1/agents/{}", ids[2])))
        .header("x-api-key", admin)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 200);
    eventually("r3 offline", Duration::from_secs(10), || async {
        let history = count(&db, "SELECT count(*) FROM agent_status_history").await;
        (history == 5).then_some(())
    })
    .await;
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
    db
}

#[tokio::test(flavor = "multi_thread")]
async fn rebuild_reproduces_every_projection_table() {
    let db = every_table_filled().await;
    let before = canonical_dump(&db.client().await).await.unwrap();
    assert!(
        before.iter().all(|(_, rows)| !rows.is_empty()),
        "{before:?}"
    );
    crate::rebuild_binary(&db.url);
    let after = canonical_dump(&db.client().await).await.unwrap();
    assert_eq!(before, after);

    // The comparison can fail: a table that lost a row does not compare equal.
    db.client().await.batch_execute("DELETE FROM agent_status_history WHERE ctid IN (SELECT ctid FROM agent_status_history LIMIT 1)").await.unwrap();
    assert_ne!(before, canonical_dump(&db.client().await).await.unwrap());
}

/// What a poll sees of a server on 127.0.0.1:18101 in admin state `state`.
fn server_state(state: &str, status: Option<&str>) -> checkplane_wire::events::ObservedServer {
    checkplane_wire::events::ObservedServer {
        address: "127.0.0.1".into(),
        port: Some(18101),
        weight: 1,
        op_state: "running".into(),
        admin_state: state.into(),
        admin_bits: if state == "drain" { 8 } else { 0 },
        status: status.map(str::to_owned),
        check_status: None,
        scur: Some(0),
    }
}

/// An event of `body` on `aggregate` at `version`, `at_ms`.
fn event(
    aggregate: &str,
    version: i64,
    at_ms: i64,
    body: checkplane_wire::events::EventBody,
) -> checkplane_wire::events::Event {
    checkplane_wire::events::Event {
        event_id: uuid::Uuid::now_v7(),
        aggregate_id: aggregate.to_owned(),
        version,
        occurred_at: at_ms,
        actor: "key:bootstrap".to_owned(),
        schema: checkplane_wire::events::SCHEMA,
        body,
    }
}

/// An installation's long-lived state made by events at `at` (ms), with `tag` in its names.
/// `old`: the first generation (everything is new); otherwise changes of it.
fn installation(at: i64, old: bool) -> Vec<checkplane_wire::events::Event> {
    use checkplane_testkit::events::registered;
    use checkplane_wire::events::*;
    let instance = "hpi-00000000000000000000000000000001";
    let s1 = checkplane_wire::haproxy::server_id(instance, "be", "s1");
    let observed = |poll: i64, server: &str, state: &str, at: i64| {
        event(
            &format!("haproxy-server:{server}"),
            poll,
            at,
            EventBody::HaproxyServerObserved(Box::new(HaproxyServerObserved {
                instance_id: instance.into(),
                poll,
                backend: "be".into(),
                server: server.into(),
                observed: server_state(state, Some(if state == "drain" { "DRAIN" } else { "UP" })),
                cause: "sync".into(),
            })),
        )
    };
    let action = |id: &str, state: &str, at: i64| {
        vec![
            event(
                &format!("haproxy-action:{id}"),
                1,
                at,
                EventBody::HaproxyActionRequested(Box::new(HaproxyActionRequested {
                    action_id: id.into(),
                    idempotency_key: id.into(),
                    server_id: s1.clone(),
                    instance_id: instance.into(),
                    backend: "be".into(),
                    server: "s1".into(),
                    action: state.into(),
                    drain_wait_ms: 0,
                })),
            ),
            event(
                &format!("haproxy-action:{id}"),
                2,
                at + 1,
                EventBody::HaproxyActionUpdated(HaproxyActionUpdated {
                    action_id: id.into(),
                    status: "success".into(),
                    attempts: 1,
                    detail: serde_json::json!({}),
                    error: None,
                }),
            ),
        ]
    };
    let key = |id: &str, at: i64| {
        event(
            &format!("key:{id}"),
            1,
            at,
            EventBody::KeyCreated(KeyCreated {
                key_id: id.into(),
                name: format!("key-{id}"),
                role: "operator".into(),
                key_hash: format!("{:064}", 7),
            }),
        )
    };
    let revoke = |id: &str, at: i64| {
        event(
            &format!("key:{id}"),
            1,
            at,
            EventBody::KeyRevoked(KeyRevoked { key_id: id.into() }),
        )
    };
    if !old {
        // Later changes: a rotation, a transition, a revocation, a newer poll, an action.
        let mut later = vec![
            registered("agt-2", 2, at),
            checkplane_testkit::events::presence("agt-1", at + 2, true, at + 2),
            revoke("k1", at + 3),
            observed(5, "s1", "ready", at + 4),
        ];
        later.extend(action("act-2", "ready", at + 5));
        return later;
    }
    let mut all = vec![
        registered("agt-1", 1, at),
        registered("agt-2", 1, at),
        checkplane_testkit::events::presence("agt-1", at + 1, true, at + 1),
        checkplane_testkit::events::presence("agt-1", at + 2, false, at + 2),
        checkplane_testkit::events::presence("agt-2", at + 1, true, at + 1),
        key("k1", at),
        key("k2", at),
        revoke("k2", at + 1),
    ];
    for (id, name) in [
        (instance, "lb-1"),
        ("hpi-00000000000000000000000000000002", "lb-2"),
    ] {
        all.push(event(
            &format!("haproxy:{id}"),
            1,
            at,
            EventBody::HaproxyInstanceRegistered(HaproxyInstanceRegistered {
                instance_id: id.into(),
                name: name.into(),
                transport: "direct".into(),
                address: "127.0.0.1:9999".into(),
                node: None,
            }),
        ));
    }
    all.push(event(
        "haproxy:hpi-00000000000000000000000000000002",
        2,
        at + 1,
        EventBody::HaproxyInstanceRemoved(HaproxyInstanceRemoved {
            instance_id: "hpi-00000000000000000000000000000002".into(),
        }),
    ));
    all.push(observed(1, "s1", "ready", at + 1));
    all.push(observed(1, "s2", "ready", at + 1));
    all.push(observed(2, "s1", "drain", at + 2));
    for poll in [3, 4] {
        all.push(event(
            "haproxy-server:s2",
            poll,
            at + poll,
            EventBody::HaproxyServerMissing(HaproxyServerMissing {
                instance_id: instance.into(),
                poll,
                backend: "be".into(),
                server: "s2".into(),
            }),
        ));
    }
    all.extend(action("act-1", "drain", at + 5));
    all.push(event(
        "haproxy-node:agt-1",
        1,
        at,
        EventBody::HaproxyNodeMarked(HaproxyNodeMarked {
            server_id: "agt-1".into(),
            hostname: "agt-1.test".into(),
            enabled: true,
        }),
    ));
    all.push(event(
        "application:app-1",
        1,
        at,
        EventBody::ApplicationCreated(ApplicationCreated {
            application_id: "app-1".into(),
            name: "shop".into(),
            port: Some(18101),
            addresses: vec!["127.0.0.1".into()],
        }),
    ));
    all.push(event(
        "application-group:grp-1",
        1,
        at,
        EventBody::ApplicationGroupCreated(ApplicationGroupCreated {
            group_id: "grp-1".into(),
            name: "front".into(),
            applications: vec!["app-1".into()],
        }),
    ));
    all
}

/// Issue 20, part 3: an installation whose long-lived rows were made 40 days ago (and changed
/// 5 days ago) keeps every one of them through the events retention and a rebuild; twice,
/// the second time with the first snapshots themselves past the retention.
#[tokio::test]
async fn long_lived_rows_outlive_the_events_retention_through_rebuild() {
    use checkplane_core::projection::snapshots::long_lived_tables;
    use checkplane_core::projection::{canonical_dump_of, rebuild, record_and_apply};
    use checkplane_core::retention::maintain_events;
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let retention = Duration::from_secs(30 * 86_400);
    let day: i64 = 86_400_000;
    let now = checkplane_runtime::clock::now_ms();
    // The days the first generation lands in, as a long-running installation has them.
    client
        .batch_execute(
            "SELECT cp_ensure_event_partition((current_date - d)::date)
             FROM generate_series(39, 41) AS d",
        )
        .await
        .unwrap();
    for e in installation(now - 40 * day, true)
        .into_iter()
        .chain(installation(now - 5 * day, false))
    {
        assert!(record_and_apply(&client, &e).await.unwrap(), "{e:?}");
    }
    let tables: Vec<&str> = long_lived_tables().collect();
    let before = canonical_dump_of(&client, &tables).await.unwrap();
    assert!(
        before.iter().all(|(_, rows)| !rows.is_empty()),
        "{before:?}"
    );
    let desired = count(
        &db,
        "SELECT count(*) FROM haproxy_servers WHERE desired_state = 'ready'",
    )
    .await;
    assert_eq!(desired, 1, "the later action's state is desired");
    let rows: usize = before.iter().map(|(_, rows)| rows.len()).sum();

    for generation in 1..=2 {
        let done = maintain_events(&mut client, retention).await.unwrap();
        assert!(done.dropped >= 1, "generation {generation}: {done:?}");
        assert_eq!(
            done.snapshots, rows as u64,
            "one per long-lived row: {done:?}"
        );
        let recorded = count(
            &db,
            "SELECT count(*) FROM events WHERE type = 'projection.snapshot'",
        )
        .await;
        assert_eq!(recorded, rows as i64, "the earlier snapshots are replaced");
        let old = count(
            &db,
            "SELECT count(*) FROM events WHERE occurred_at < now() - interval '30 days'",
        )
        .await;
        assert_eq!(old, 0, "nothing past the retention is left");
        assert_eq!(
            canonical_dump_of(&client, &tables).await.unwrap(),
            before,
            "snapshots are only recorded"
        );
        if generation == 1 {
            // As after a migration that dropped a column: snapshots made before still apply.
            client
                .batch_execute(
                    "UPDATE events SET payload = jsonb_set(payload, '{row,dropped_column}', '1')
                     WHERE type = 'projection.snapshot'",
                )
                .await
                .unwrap();
        }
        let report = rebuild(&mut client).await.unwrap();
        assert_eq!(report.failed, 0, "{report:?}");
        assert_eq!(
            canonical_dump_of(&client, &tables).await.unwrap(),
            before,
            "generation {generation}: every long-lived row as it was"
        );
        // Nothing more to drop: a second run changes nothing.
        let again = maintain_events(&mut client, retention).await.unwrap();
        assert_eq!((again.dropped, again.deleted, again.snapshots), (0, 0, 0));
        // Forty days on: the snapshots and the later changes are past the retention too.
        client
            .batch_execute(
                "SELECT cp_ensure_event_partition((current_date - 40)::date);
                 UPDATE events SET occurred_at = occurred_at - interval '40 days'",
            )
            .await
            .unwrap();
    }
}

/// Events as the first release stored them (schema 1: bare `system` actors, a dead letter
/// without `waits`) replay through the upcaster into the projections today's events make.
#[tokio::test]
async fn events_stored_in_schema_1_replay_into_todays_projections() {
    use checkplane_core::projection::{rebuild, record_and_apply};
    use checkplane_wire::events::{Event, EventBody, TaskDeadLettered};
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let now = checkplane_runtime::clock::now_ms();
    let check = crate::projector::CHECK;
    let created = crate::projector::check_created(1);
    // After its check (a rebuild replays in time order).
    let dead_letter = Event::new(
        "task:agent-0:dns:1-0",
        1,
        "system:gateway",
        EventBody::TaskDeadLettered(TaskDeadLettered {
            agent_id: "agent-0".into(),
            kind: "dns".into(),
            entry: "1-0".into(),
            deliveries: 6,
            task: Some(format!("{check}:0:1")),
            // What schema 1 meant by leaving it out: the slot ended at once.
            waits: false,
        }),
    );
    let dead_letter = Event {
        occurred_at: created.occurred_at + 1,
        ..dead_letter
    };
    let events = installation(now, true)
        .into_iter()
        .chain([created, dead_letter]);
    for e in events {
        assert!(record_and_apply(&client, &e).await.unwrap(), "{e:?}");
    }
    let ended = count(
        &db,
        "SELECT count(*) FROM check_slots WHERE status = 'done' AND outcome = 'dead_lettered'",
    )
    .await;
    assert_eq!(
        ended, 1,
        "today's dead letter of waits = false ends its slot"
    );
    let live = canonical_dump(&client).await.unwrap();

    // Stored as release 1 wrote them.
    let old = client
        .execute(
            "UPDATE events SET schema = 1,
                 actor = CASE WHEN actor LIKE 'system:%' THEN substr(actor, 8) ELSE actor END,
                 payload = CASE WHEN type = 'task.dead_lettered' THEN payload - 'waits'
                                ELSE payload END
             WHERE type <> 'projection.snapshot'",
            &[],
        )
        .await
        .unwrap();
    assert!(old >= 3, "{old}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM events WHERE payload ? 'waits'").await,
        0
    );
    let report = rebuild(&mut client).await.unwrap();
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(canonical_dump(&client).await.unwrap(), live);

    // One written by a newer release is not guessed at: the rebuild says it failed.
    client
        .execute(
            "UPDATE events SET schema = $1 WHERE type = 'task.dead_lettered'",
            &[&(checkplane_wire::events::SCHEMA as i32 + 1)],
        )
        .await
        .unwrap();
    let report = rebuild(&mut client).await.unwrap();
    assert_eq!(report.failed, 1, "{report:?}");
}

/// A parked event is replayed in today's shape too: one parked before the upgrade (schema 1,
/// a dead letter without `waits`) applies; one of a newer schema stays parked, its error
/// saying why.
#[tokio::test]
async fn parked_events_replay_through_the_upcaster() {
    use checkplane_core::failures::replay;
    use checkplane_core::projection::record_and_apply;
    use checkplane_wire::events::{Event, EventBody, TaskDeadLettered, SCHEMA};
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let check = crate::projector::CHECK;
    let created = crate::projector::check_created(1);
    assert!(record_and_apply(&client, &created).await.unwrap());
    let letter = |slot: u32| {
        let event = Event::new(
            format!("task:agent-0:dns:{slot}-0"),
            1,
            "system:gateway",
            EventBody::TaskDeadLettered(TaskDeadLettered {
                agent_id: "agent-0".into(),
                kind: "dns".into(),
                entry: format!("{slot}-0"),
                deliveries: 6,
                task: Some(format!("{check}:{slot}:1")),
                waits: false,
            }),
        );
        let mut json = serde_json::to_value(Event {
            occurred_at: created.occurred_at + 1,
            ..event
        })
        .unwrap();
        json["payload"].as_object_mut().unwrap().remove("waits");
        json
    };
    let mut old = letter(0);
    old["schema"] = 1.into();
    let mut newer = letter(1);
    newer["schema"] = (SCHEMA + 1).into();
    for (entry_id, entry) in [("1-0", &old), ("2-0", &newer)] {
        client
            .execute(
                "INSERT INTO projection_failures (stream, entry_id, consumer_group, attempts,
                                                  error, entry)
                 VALUES ('s', $1, 'projector', 5, 'parked before the upgrade', $2)",
                &[&entry_id, &entry.to_string()],
            )
            .await
            .unwrap();
    }
    let done = replay(&mut client, None).await.unwrap();
    assert_eq!(
        (done.applied, done.known, done.failed),
        (1, 0, 1),
        "{done:?}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM check_slots WHERE slot = 0 AND outcome = 'dead_lettered'"
        )
        .await,
        1
    );
    let error: String = client
        .query_one("SELECT error FROM projection_failures", &[])
        .await
        .unwrap()
        .get("error");
    assert!(error.contains("newer release"), "{error}");
}
