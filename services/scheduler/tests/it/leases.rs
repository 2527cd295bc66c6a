//! Lease events made in Redis are projected into `tasks` and `lease_history`.

use std::time::Duration;

use checkplane_core::keys::Keys;
use checkplane_core::leases::{CloseReason, LeaseSettings, Leases, TaskRef};
use checkplane_testkit::{eventually, TestDb, TestRedis};
use serde_json::json;

use crate::{count, register, start_gateway, start_scheduler};

async fn post(
    gw: &checkplane_testkit::Running<checkplane_runtime::RunError>,
    path: &str,
    id: &str,
    token: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    checkplane_testkit::agent_post(&reqwest::Client::new(), &gw.url(path), id, token, &body)
        .await
        .1
}

#[tokio::test]
async fn lease_events_become_task_rows_and_history() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gw = start_gateway(&db, &redis, &[]).await;
    let sched = start_scheduler(&db, &redis, &[]).await;
    let (id, token) = register(&gw, "leaser").await;
    let leases = Leases::new(
        Keys::new(redis.prefix.clone(), 4),
        LeaseSettings::new(30_000, 5),
    );
    let mut conn = redis.connection().await;
    leases.enqueue(&mut conn, &id, "dns", "{}").await.unwrap();
    leases.enqueue(&mut conn, &id, "dns", "{}").await.unwrap();
    let claimed = post(
        &gw,
        "/v1/agents/claim",
        &id,
        &token,
        json!({"capacities": {"dns": 2}, "request_id": "c1"}),
    )
    .await;
    let tokens: Vec<String> = claimed["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["token"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tokens.len(), 2);
    post(
        &gw,
        "/v1/agents/extend",
        &id,
        &token,
        json!({"tokens": tokens}),
    )
    .await;
    let result = json!({"answers": [], "rcode": "NOERROR"});
    let reported = post(
        &gw,
        "/v1/agents/report",
        &id,
        &token,
        json!({"completed": [{"token": tokens[0], "result": result}]}),
    )
    .await;
    assert_eq!(reported["results"][0]["status"], "acknowledged");
    let second = checkplane_wire::leases::LeaseToken::parse(&tokens[1]).unwrap();
    let task = TaskRef {
        task: "",
        agent: &id,
        kind: "dns",
        entry: &second.entry,
    };
    assert!(leases
        .close(
            &mut conn,
            &task,
            CloseReason::Timeout,
            checkplane_runtime::clock::now_ms()
        )
        .await
        .unwrap());

    eventually(
        "lease events projected",
        Duration::from_secs(10),
        || async { (count(&db, "SELECT count(*) FROM lease_history").await == 5).then_some(()) },
    )
    .await;
    let client = db.client().await;
    let rows = client
        .query("SELECT entry, status, outcome, epoch, result FROM tasks WHERE agent_id = $1 ORDER BY entry", &[&id])
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, String>(1), "reported");
    assert_eq!(
        rows[0].get::<_, Option<String>>(2).as_deref(),
        Some("finished")
    );
    assert_eq!(rows[0].get::<_, i64>(3), 1);
    let stored: serde_json::Value = rows[0].get(4);
    assert_eq!(
        stored["result"], result,
        "the result arrives as sent, empty arrays included"
    );
    assert_eq!(rows[1].get::<_, String>(1), "closed");
    assert_eq!(
        rows[1].get::<_, Option<String>>(2).as_deref(),
        Some("timeout")
    );
    let types: Vec<String> = client
        .query(
            "SELECT type FROM lease_history ORDER BY occurred_at, type",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types.iter().filter(|t| *t == "lease.granted").count(), 2);
    for t in ["lease.extended", "lease.reported", "lease.closed"] {
        assert!(types.contains(&t.to_owned()), "{t} missing from {types:?}");
    }
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn task_rows_do_not_depend_on_event_order() {
    use checkplane_wire::events::{Event, EventBody, LeaseGranted, LeaseReported};
    let event = |version: i64, body: EventBody| Event {
        event_id: uuid::Uuid::now_v7(),
        aggregate_id: "task:a:dns:1-0".into(),
        version,
        occurred_at: 1_000 * version,
        actor: "agent:a".into(),
        schema: 1,
        body,
    };
    let granted = event(
        1,
        EventBody::LeaseGranted(LeaseGranted {
            task: None,
            agent_id: "a".into(),
            kind: "dns".into(),
            entry: "1-0".into(),
            epoch: 1,
            deadline: 31_000,
        }),
    );
    let reported = event(
        2,
        EventBody::LeaseReported(LeaseReported {
            task: None,
            agent_id: "a".into(),
            kind: "dns".into(),
            entry: "1-0".into(),
            epoch: 1,
            outcome: "finished".into(),
            result: json!({"ok": true}),
        }),
    );
    let mut dumps = Vec::new();
    for order in [[&granted, &reported], [&reported, &granted]] {
        let db = TestDb::new().await;
        let client = db.client().await;
        for e in order {
            assert!(checkplane_core::projection::record_and_apply(&client, e)
                .await
                .unwrap());
        }
        let row = client
            .query_one(
                "SELECT status, outcome, first_granted_at IS NOT NULL FROM tasks",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            (
                row.get::<_, String>(0),
                row.get::<_, Option<String>>(1),
                row.get::<_, bool>(2)
            ),
            ("reported".into(), Some("finished".into()), true)
        );
        dumps.push(
            checkplane_core::projection::canonical_dump(&client)
                .await
                .unwrap(),
        );
    }
    assert_eq!(dumps[0], dumps[1]);
}

#[tokio::test]
async fn leases_of_a_silent_agent_expire_and_its_late_report_is_fenced() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gw = start_gateway(
        &db,
        &redis,
        &[("HEARTBEAT_INTERVAL", "200ms"), ("LEASE_TTL", "300ms")],
    )
    .await;
    let sched = start_scheduler(&db, &redis, &[]).await;
    let (id, token) = register(&gw, "silent").await;
    crate::heartbeat(&gw, &id, &token).await;
    let leases = Leases::new(
        Keys::new(redis.prefix.clone(), 4),
        LeaseSettings::new(300, 5),
    );
    let mut conn = redis.connection().await;
    leases.enqueue(&mut conn, &id, "tcp", "{}").await.unwrap();
    let claimed = post(
        &gw,
        "/v1/agents/claim",
        &id,
        &token,
        json!({"capacities": {"tcp": 1}, "request_id": "s1"}),
    )
    .await;
    let lease = claimed["leases"][0]["token"].as_str().unwrap().to_owned();
    // No more heartbeats, no extension: past both deadlines the scheduler takes the lease.
    eventually("the lease expired", Duration::from_secs(10), || async {
        let status = db
            .client()
            .await
            .query_opt(
                "SELECT status, outcome FROM tasks WHERE agent_id = $1",
                &[&id],
            )
            .await
            .unwrap();
        status
            .filter(|r| {
                r.get::<_, String>(0) == "expired"
                    && r.get::<_, Option<String>>(1).as_deref() == Some("lease_expired")
            })
            .map(|_| ())
    })
    .await;
    let late = post(
        &gw,
        "/v1/agents/report",
        &id,
        &token,
        json!({"completed": [{"token": lease, "result": {"connected": true, "address": "192.0.2.1", "port": 443}}]}),
    )
    .await;
    assert_eq!(late["results"][0]["error"], "ERR_LEASE_LOST");
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn an_agent_that_still_heartbeats_keeps_its_expired_lease() {
    let redis = TestRedis::new();
    let keys = Keys::new(redis.prefix.clone(), 4);
    let presence = checkplane_core::presence::Presence::new(keys.clone());
    let leases = Leases::new(keys.clone(), LeaseSettings::new(100, 5));
    let mut conn = redis.connection().await;
    let now = checkplane_runtime::clock::now_ms();
    presence
        .heartbeat(&mut conn, "busy", now, 10_000)
        .await
        .unwrap();
    leases
        .enqueue(&mut conn, "busy", "trace", "{}")
        .await
        .unwrap();
    let granted = leases
        .claim(&mut conn, "busy", "b1", &[("trace", 1)], now)
        .await
        .unwrap();
    let n = keys.shard_of("busy");
    let early = leases
        .recover(&mut conn, n, now + 1_000, 100)
        .await
        .unwrap();
    assert_eq!(
        (early.expired, early.alive),
        (0, 1),
        "the lease is due but its agent is alive"
    );
    let token = checkplane_wire::leases::LeaseToken::parse(&granted[0].token).unwrap();
    let late = leases
        .recover(&mut conn, n, now + 20_000, 100)
        .await
        .unwrap();
    assert_eq!(late.expired, 1, "{late:?}");
    let report = leases
        .report(&mut conn, &token, "finished", &json!({}), now + 20_001)
        .await
        .unwrap();
    assert_eq!(
        report,
        checkplane_core::leases::Fenced::Refused(checkplane_core::leases::LeaseRefusal::Lost)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_losing_its_last_writes_runs_a_task_again_but_keeps_one_result() {
    use checkplane_testkit::servers::RedisServer;
    let db = TestDb::new().await;
    let mut redis_server = RedisServer::start_with_fsync("everysec");
    let redis = TestRedis::new();
    let url = redis_server.url();
    let gw = start_gateway(&db, &redis, &[("REDIS_URL", &url), ("LEASE_TTL", "300ms")]).await;
    let sched = start_scheduler(&db, &redis, &[("REDIS_URL", &url)]).await;
    let (id, token) = register(&gw, "durable").await;
    crate::heartbeat(&gw, &id, &token).await;
    let leases = Leases::new(
        Keys::new(redis.prefix.clone(), 4),
        LeaseSettings::new(300, 5),
    );
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    leases.enqueue(&mut conn, &id, "dns", "{}").await.unwrap();
    let claimed = post(
        &gw,
        "/v1/agents/claim",
        &id,
        &token,
        json!({"capacities": {"dns": 1}, "request_id": "d1"}),
    )
    .await;
    let first = claimed["leases"][0]["token"].as_str().unwrap().to_owned();
    eventually("granted projected", Duration::from_secs(10), || async {
        (task_status(&db, &id).await == Some(("leased".into(), 1))).then_some(())
    })
    .await;
    let snapshot = redis_server.snapshot();

    let result = json!({"rcode": "NOERROR", "answers": [{"name": "x", "type": "A", "ttl": 1, "class": "IN", "value": "192.0.2.1"}]});
    let reported = post(
        &gw,
        "/v1/agents/report",
        &id,
        &token,
        json!({"completed": [{"token": first, "result": result}]}),
    )
    .await;
    assert_eq!(reported["results"][0]["status"], "acknowledged");
    eventually("report projected", Duration::from_secs(10), || async {
        (task_status(&db, &id).await.map(|s| s.0) == Some("reported".into())).then_some(())
    })
    .await;

    // Redis loses everything since the snapshot: the acknowledgement and the report event.
    redis_server.lose_writes_since(&snapshot);
    crate::heartbeat(&gw, &id, &token).await;
    // The task is pending again; once its lease has run out, it comes back at epoch 2.
    let again = eventually("the task comes back", Duration::from_secs(10), || async {
        let claimed = post(&gw, "/v1/agents/claim", &id, &token, json!({"capacities": {"dns": 1}, "request_id": uuid::Uuid::new_v4().simple().to_string()})).await;
        claimed["leases"].as_array().and_then(|l| l.first()).map(|l| l["token"].as_str().unwrap_or_default().to_owned())
    })
    .await;
    let second = checkplane_wire::leases::LeaseToken::parse(&again).unwrap();
    assert_eq!(second.epoch, 2, "at least once: the task runs again");
    let reported = post(
        &gw,
        "/v1/agents/report",
        &id,
        &token,
        json!({"completed": [{"token": again, "result": {"rcode": "NOERROR", "answers": []}}]}),
    )
    .await;
    assert_eq!(reported["results"][0]["status"], "acknowledged");
    eventually(
        "second report projected",
        Duration::from_secs(10),
        || async { (task_status(&db, &id).await == Some(("reported".into(), 2))).then_some(()) },
    )
    .await;

    // Exactly one result: the task row keeps the first; both runs are in the history.
    let rows = db
        .client()
        .await
        .query(
            "SELECT result, outcome FROM tasks WHERE agent_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let stored: serde_json::Value = rows[0].get(0);
    assert_eq!(stored["result"], result);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM lease_history WHERE type = 'lease.reported'"
        )
        .await,
        2
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM projection_failures").await,
        0
    );
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
}

async fn task_status(db: &TestDb, id: &str) -> Option<(String, i64)> {
    db.client()
        .await
        .query_opt(
            "SELECT status, epoch FROM tasks WHERE agent_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}
