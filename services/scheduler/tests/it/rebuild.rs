//! `rebuild` reproduces every projection table, column for column.

use std::time::Duration;

use checkplane_runtime::keys::Keys;
use checkplane_runtime::leases::{CloseReason, LeaseSettings, Leases, TaskRef};
use checkplane_runtime::projection::canonical_dump;
use checkplane_testkit::events::{presence, xadd};
use checkplane_testkit::process::run_to_end;
use checkplane_testkit::{eventually, TestDb, TestRedis};
use checkplane_wire::leases::LeaseToken;

use crate::{count, heartbeat, register, start_gateway, start_scheduler};

#[tokio::test(flavor = "multi_thread")]
async fn rebuild_reproduces_every_projection_table() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let admin = "admin-key-0123456789abcdef";
    let gw = start_gateway(&db, &redis, &[("GATEWAY_ADMIN_KEY", admin)]).await;
    let sched = start_scheduler(&db, &redis, &[]).await;
    let mut ids = Vec::new();
    for host in ["r1", "r2", "r3"] {
        let (id, token) = register(&gw, host).await;
        heartbeat(&gw, &id, &token).await;
        ids.push(id);
    }
    register(&gw, "r1").await; // a rotation: identity version 2
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
            &serde_json::json!({"answers": []}),
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
        (history == 4 && events == 15).then_some(())
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
                    observed: ObservedServer {
                        address: "127.0.0.1".into(),
                        port: Some(18101),
                        weight: 1,
                        op_state: "running".into(),
                        admin_state: state.into(),
                        admin_bits: if state == "drain" { 8 } else { 0 },
                        status: None,
                        check_status: None,
                        scur: Some(0),
                    },
                    cause: "sync".into(),
                })),
            })
            .collect();
        checkplane_runtime::projection::record_and_apply_independent(&pg, &events)
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
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();

    let before = canonical_dump(&db.client().await).await.unwrap();
    assert!(
        before.iter().all(|(_, rows)| !rows.is_empty()),
        "{before:?}"
    );
    let env = vec![("DATABASE_URL".to_owned(), db.url.clone())];
    let out = tokio::task::block_in_place(|| {
        run_to_end(crate::bin(), &["rebuild"], &env, Duration::from_secs(60))
    });
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = canonical_dump(&db.client().await).await.unwrap();
    assert_eq!(before, after);

    // The comparison can fail: a table that lost a row does not compare equal.
    db.client().await.batch_execute("DELETE FROM agent_status_history WHERE ctid IN (SELECT ctid FROM agent_status_history LIMIT 1)").await.unwrap();
    assert_ne!(before, canonical_dump(&db.client().await).await.unwrap());
}
