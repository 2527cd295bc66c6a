//! The lease scripts against a real Redis, and the same scripts on a 3-node cluster.

use std::time::Duration;

use checkplane_core::keys::Keys;
use checkplane_core::leases::{
    CloseReason, Fenced, LeaseRefusal, LeaseSettings, Leases, NewTask, TaskClosed, TaskRef,
};
use checkplane_testkit::servers::RedisCluster;
use checkplane_testkit::{eventually, TestRedis};
use checkplane_wire::leases::LeaseToken;
use redis::aio::ConnectionLike;

fn settings(ttl_ms: i64, max_deliveries: u32) -> LeaseSettings {
    LeaseSettings::new(ttl_ms, max_deliveries)
}

fn rid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn now() -> i64 {
    checkplane_runtime::clock::now_ms()
}

async fn pending(conn: &mut impl ConnectionLike, stream: &str) -> usize {
    let reply: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg("agents")
        .query_async(conn)
        .await
        .unwrap();
    reply.count()
}

async fn lease_cycle(conn: &mut impl ConnectionLike, keys: Keys) {
    let leases = Leases::new(keys.clone(), settings(30_000, 5));
    for i in 0..3 {
        leases
            .enqueue(conn, "agent-a", "dns", &format!("{{\"n\":{i}}}"))
            .await
            .unwrap();
    }
    leases.enqueue(conn, "agent-a", "http", "{}").await.unwrap();

    let request = rid();
    let granted = leases
        .claim(conn, "agent-a", &request, &[("dns", 2), ("http", 4)], now())
        .await
        .unwrap();
    assert_eq!(
        granted.len(),
        3,
        "capacity per kind: 2 dns + the 1 http there is"
    );
    assert_eq!(
        granted[0].fields,
        [("spec".to_owned(), "{\"n\":0}".to_owned())]
    );
    let again = leases
        .claim(conn, "agent-a", &request, &[("dns", 2), ("http", 4)], now())
        .await
        .unwrap();
    assert_eq!(again, granted, "a repeated request_id gets the same leases");
    let more = leases
        .claim(conn, "agent-a", &rid(), &[("dns", 5)], now())
        .await
        .unwrap();
    assert_eq!(more.len(), 1, "the third dns task, once");

    let token = LeaseToken::parse(&granted[0].token).unwrap();
    assert_eq!(token.epoch, 1);
    let extended = leases
        .extend(conn, "agent-a", std::slice::from_ref(&token), now())
        .await
        .unwrap();
    assert!(matches!(extended[0], Fenced::Ok(d) if d > now()));

    let mut forged = token.clone();
    forged.epoch = 2;
    let result = serde_json::json!({"answers": []});
    assert_eq!(
        leases
            .report(conn, &forged, "finished", &result, now())
            .await
            .unwrap(),
        Fenced::Refused(LeaseRefusal::Lost)
    );
    assert_eq!(
        leases
            .report(conn, &token, "finished", &result, now())
            .await
            .unwrap(),
        Fenced::Ok(())
    );
    assert_eq!(
        leases
            .report(conn, &token, "finished", &result, now())
            .await
            .unwrap(),
        Fenced::Ok(()),
        "a repeated report gets the same answer"
    );
    let mut unknown = token.clone();
    unknown.entry = "1-1".into();
    assert_eq!(
        leases
            .report(conn, &unknown, "finished", &result, now())
            .await
            .unwrap(),
        Fenced::Refused(LeaseRefusal::Unknown)
    );

    // Closing an open lease fences its report; closing twice is a no-op.
    let other = LeaseToken::parse(&granted[1].token).unwrap();
    let task = TaskRef {
        task: "",
        agent: "agent-a",
        kind: "dns",
        entry: &other.entry,
    };
    assert!(leases
        .close(conn, &task, CloseReason::Timeout, now())
        .await
        .unwrap());
    assert!(!leases
        .close(conn, &task, CloseReason::Timeout, now())
        .await
        .unwrap());
    assert_eq!(
        leases
            .report(conn, &other, "finished", &result, now())
            .await
            .unwrap(),
        Fenced::Refused(LeaseRefusal::Closed)
    );
    assert_eq!(
        leases
            .extend(conn, "agent-a", &[other], now())
            .await
            .unwrap(),
        [Fenced::Refused(LeaseRefusal::Closed)]
    );

    let n = keys.shard_of("agent-a");
    // Recovery: agent-a never heartbeat, so once its leases are past their deadline they are
    // taken (the http lease and the third dns lease).
    let recovered = leases.recover(conn, n, now() + 60_000, 100).await.unwrap();
    assert_eq!(recovered.expired, 2, "{recovered:?}");
    let third = LeaseToken::parse(&more[0].token).unwrap();
    assert_eq!(
        leases
            .report(conn, &third, "finished", &result, now())
            .await
            .unwrap(),
        Fenced::Refused(LeaseRefusal::Lost)
    );
    let live: i64 = redis::cmd("ZCARD")
        .arg(keys.leases(n))
        .query_async(conn)
        .await
        .unwrap();
    assert_eq!(live, 0, "no lease is live after recovery");
    let events: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys.lease_events(n))
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    let types: Vec<String> = events
        .iter()
        .map(|(_, f)| {
            serde_json::from_str::<serde_json::Value>(&f[0].1).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        types,
        [
            "lease.granted",
            "lease.granted",
            "lease.granted",
            "lease.granted",
            "lease.extended",
            "lease.reported",
            "lease.closed",
            "lease.expired",
            "lease.expired"
        ]
    );
    // Every task has ended (reported, closed, expired): nothing of them stays in Redis but
    // their events and tombstones; the version hash keeps only the agent's extend counter.
    for kind in ["dns", "http"] {
        let len: i64 = redis::cmd("XLEN")
            .arg(keys.tasks("agent-a", kind))
            .query_async(conn)
            .await
            .unwrap();
        assert_eq!(len, 0, "{kind} entries of ended tasks are deleted");
    }
    let versions: Vec<String> = redis::cmd("HKEYS")
        .arg(keys.lease_versions(n))
        .query_async(conn)
        .await
        .unwrap();
    assert_eq!(versions, ["extend:agent-a"]);
}

#[tokio::test]
async fn claim_extend_report_close_and_fences() {
    let redis = TestRedis::new();
    let mut conn = redis.connection().await;
    lease_cycle(&mut conn, Keys::new(redis.prefix.clone(), 4)).await;
}

/// Redis's error counts by kind (`INFO errorstats`).
async fn error_counts(conn: &mut impl ConnectionLike) -> std::collections::BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| l.strip_prefix("errorstat_")?.split_once(":count="))
        .map(|(kind, n)| (kind.to_owned(), n.trim().parse().unwrap_or(0)))
        .collect()
}

/// The scripts ask with EXISTS rather than by letting a command fail: Redis counts every
/// failed command of a script in `INFO errorstats`, and an operator watching it would see one
/// error per task enqueued to an existing stream (`BUSYGROUP`) and per claim of an agent never
/// given work (`NOGROUP`). On a Redis of its own, so the counts are this test's.
#[tokio::test]
async fn the_scripts_leave_no_errors_in_redis_errorstats() {
    let server = checkplane_testkit::servers::RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Whatever connecting cost (the client's own handshake), before any script ran.
    let before = error_counts(&mut conn).await;
    let keys = Keys::new("cp", 4);
    let leases = Leases::new(keys.clone(), settings(30_000, 5));
    for _ in 0..2 {
        let granted = leases
            .claim(&mut conn, "idle", &rid(), &[("dns", 2)], now())
            .await
            .unwrap();
        assert!(granted.is_empty(), "an agent never given work gets none");
    }
    lease_cycle(&mut conn, keys.clone()).await;
    tasks_by_id(&mut conn, keys).await;
    let after = error_counts(&mut conn).await;
    // NOSCRIPT: each script's first EVALSHA, which the client answers by loading it.
    let new: Vec<(&String, u64)> = after
        .iter()
        .map(|(kind, n)| (kind, n - before.get(kind).copied().unwrap_or(0)))
        .filter(|(kind, n)| *n > 0 && kind.as_str() != "NOSCRIPT")
        .collect();
    assert!(new.is_empty(), "errors the scripts caused: {new:?}");
}

#[tokio::test]
async fn the_same_scripts_run_on_a_cluster() {
    let cluster = RedisCluster::start();
    let mut conn = cluster.connection().await;
    lease_cycle(&mut conn, Keys::new("cp", 4)).await;
}

#[tokio::test]
async fn lost_leases_come_back_with_a_new_epoch_and_the_old_one_is_fenced() {
    let redis = TestRedis::new();
    let mut conn = redis.connection().await;
    let keys = Keys::new(redis.prefix.clone(), 4);
    let leases = Leases::new(keys.clone(), settings(100, 5));
    leases
        .enqueue(&mut conn, "agent-b", "tcp", "{}")
        .await
        .unwrap();
    let first = leases
        .claim(&mut conn, "agent-b", &rid(), &[("tcp", 1)], now())
        .await
        .unwrap();
    let old = LeaseToken::parse(&first[0].token).unwrap();

    // Nobody took it yet: a late report of real work would still count. Here the agent
    // "restarts" instead and claims again once the lease TTL has passed.
    let second = eventually("the lease comes back", Duration::from_secs(5), || {
        let leases = leases.clone();
        let mut conn = conn.clone();
        async move {
            let g = leases
                .claim(&mut conn, "agent-b", &rid(), &[("tcp", 1)], now())
                .await
                .unwrap();
            (!g.is_empty()).then_some(g)
        }
    })
    .await;
    let new = LeaseToken::parse(&second[0].token).unwrap();
    assert_eq!((new.entry.as_str(), new.epoch), (old.entry.as_str(), 2));
    let result = serde_json::json!({});
    assert_eq!(
        leases
            .report(&mut conn, &old, "finished", &result, now())
            .await
            .unwrap(),
        Fenced::Refused(LeaseRefusal::Lost)
    );
    assert_eq!(
        leases
            .extend(&mut conn, "agent-b", &[old], now())
            .await
            .unwrap(),
        [Fenced::Refused(LeaseRefusal::Lost)]
    );
    assert_eq!(
        leases
            .report(&mut conn, &new, "finished", &result, now())
            .await
            .unwrap(),
        Fenced::Ok(())
    );
    assert_eq!(pending(&mut conn, &keys.tasks("agent-b", "tcp")).await, 0);
}

#[tokio::test]
async fn an_expired_lease_nobody_took_still_accepts_its_report() {
    let redis = TestRedis::new();
    let mut conn = redis.connection().await;
    let leases = Leases::new(Keys::new(redis.prefix.clone(), 4), settings(1, 5));
    leases
        .enqueue(&mut conn, "agent-c", "ping", "{}")
        .await
        .unwrap();
    let granted = leases
        .claim(&mut conn, "agent-c", &rid(), &[("ping", 1)], now())
        .await
        .unwrap();
    let token = LeaseToken::parse(&granted[0].token).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await; // well past the 1 ms TTL
    assert_eq!(
        leases
            .report(
                &mut conn,
                &token,
                "finished",
                &serde_json::json!({"rtt": 1}),
                now()
            )
            .await
            .unwrap(),
        Fenced::Ok(())
    );
}

#[tokio::test]
async fn entries_over_the_delivery_limit_go_to_the_dlq() {
    let redis = TestRedis::new();
    let mut conn = redis.connection().await;
    let keys = Keys::new(redis.prefix.clone(), 4);
    let leases = Leases::new(keys.clone(), settings(1, 2));
    leases
        .enqueue(&mut conn, "agent-d", "trace", "{\"host\":\"x\"}")
        .await
        .unwrap();
    let mut epochs = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(5)).await; // past the 1 ms TTL each time
        for g in leases
            .claim(&mut conn, "agent-d", &rid(), &[("trace", 1)], now())
            .await
            .unwrap()
        {
            epochs.push(LeaseToken::parse(&g.token).unwrap().epoch);
        }
    }
    assert_eq!(epochs, [1, 2], "the third delivery is over the limit");
    let n = keys.shard_of("agent-d");
    let dlq: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys.dlq(n))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1);
    let fields: std::collections::HashMap<_, _> = dlq[0].1.iter().cloned().collect();
    assert_eq!(fields["reason"], "max_deliveries");
    assert_eq!(fields["deliveries"], "3");
    assert_eq!(fields["spec"], "{\"host\":\"x\"}");
    assert_eq!(pending(&mut conn, &keys.tasks("agent-d", "trace")).await, 0);
}

/// The newest entry of `agent`'s shard's lease events: its id and event.
async fn newest(
    conn: &mut impl ConnectionLike,
    keys: &Keys,
    agent: &str,
) -> (String, serde_json::Value) {
    let events: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg(keys.lease_events(keys.shard_of(agent)))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await
        .unwrap();
    let (id, fields) = events.into_iter().next().unwrap();
    (id, serde_json::from_str(&fields[0].1).unwrap())
}

async fn last_event(conn: &mut impl ConnectionLike, keys: &Keys, agent: &str) -> serde_json::Value {
    newest(conn, keys, agent).await.1
}

/// The id of the newest entry of `agent`'s shard's lease events.
async fn last_entry_id(conn: &mut impl ConnectionLike, keys: &Keys, agent: &str) -> String {
    newest(conn, keys, agent).await.0
}

async fn xlen(conn: &mut impl ConnectionLike, stream: &str) -> i64 {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap()
}

async fn tasks_by_id(conn: &mut (impl ConnectionLike + Clone + Send), keys: Keys) {
    let leases = Leases::new(keys.clone(), settings(30_000, 5));
    let agent = "agent-t";
    let stream = keys.tasks(agent, "dns");
    // Fan-out repeated (the outbox sweep after a crash) adds the task once.
    let first = leases
        .enqueue_task(conn, agent, "dns", "c1:0:1", "{}")
        .await
        .unwrap();
    let again = leases
        .enqueue_task(conn, agent, "dns", "c1:0:1", "{}")
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(xlen(conn, &stream).await, 1);

    // The task id travels with the lease events.
    let granted = leases
        .claim(conn, agent, &rid(), &[("dns", 5)], now())
        .await
        .unwrap();
    assert_eq!(granted.len(), 1);
    assert_eq!(
        last_event(conn, &keys, agent).await["payload"]["task"],
        "c1:0:1"
    );
    let token = LeaseToken::parse(&granted[0].token).unwrap();
    let result = serde_json::json!({"answers": []});
    assert_eq!(
        leases
            .report(conn, &token, "finished", &result, now())
            .await
            .unwrap(),
        Fenced::Ok(())
    );
    let reported = last_event(conn, &keys, agent).await;
    assert_eq!(
        (
            reported["type"].as_str(),
            reported["payload"]["task"].as_str()
        ),
        (Some("lease.reported"), Some("c1:0:1"))
    );

    // Closed before it was sent: a late fan-out does not add it.
    assert_eq!(
        leases
            .close_task(conn, agent, "dns", "c1:1:1", CloseReason::Timeout, now())
            .await
            .unwrap(),
        TaskClosed::Unsent
    );
    assert_eq!(
        leases
            .close_task(conn, agent, "dns", "c1:1:1", CloseReason::Timeout, now())
            .await
            .unwrap(),
        TaskClosed::Already
    );
    assert_eq!(
        leases
            .enqueue_task(conn, agent, "dns", "c1:1:1", "{}")
            .await
            .unwrap(),
        "closed"
    );
    assert_eq!(xlen(conn, &stream).await, 0);

    // Closed while leased: the event names the task, and the report is fenced.
    leases
        .enqueue_task(conn, agent, "dns", "c1:2:1", "{}")
        .await
        .unwrap();
    let granted = leases
        .claim(conn, agent, &rid(), &[("dns", 5)], now())
        .await
        .unwrap();
    let token = LeaseToken::parse(&granted[0].token).unwrap();
    assert_eq!(
        leases
            .close_task(conn, agent, "dns", "c1:2:1", CloseReason::Cancelled, now())
            .await
            .unwrap(),
        TaskClosed::Closed
    );
    let closed = last_event(conn, &keys, agent).await;
    assert_eq!(
        (closed["type"].as_str(), closed["payload"]["task"].as_str()),
        (Some("lease.closed"), Some("c1:2:1"))
    );
    assert_eq!(
        leases
            .report(conn, &token, "finished", &result, now())
            .await
            .unwrap(),
        Fenced::Refused(LeaseRefusal::Closed)
    );
    let newest = last_entry_id(conn, &keys, agent).await;
    assert_eq!(
        leases
            .close_task(conn, agent, "dns", "c1:2:1", CloseReason::Cancelled, now())
            .await
            .unwrap(),
        TaskClosed::Ended { tip: newest },
        "closing twice: its `lease.closed` is on the stream, at the tip the close answers"
    );

    // Many at once (a check's fan-out): one script per shard, the answers in the order given,
    // a task sent before and one closed before it was sent answered as one at a time would.
    let agents: Vec<String> = (0..12).map(|i| format!("batch-{i}")).collect();
    let ids: Vec<String> = (0..12).map(|i| format!("c2:{i}:1")).collect();
    let specs: Vec<String> = (0..12).map(|i| format!(r#"{{"slot":{i}}}"#)).collect();
    let shards: std::collections::HashSet<u32> = agents.iter().map(|a| keys.shard_of(a)).collect();
    assert!(shards.len() > 1, "the batch spans shards");
    let mut tasks: Vec<NewTask<'_>> = (0..12)
        .map(|i| NewTask {
            agent: &agents[i],
            kind: "dns",
            task: &ids[i],
            spec: &specs[i],
        })
        .collect();
    let sent_before = NewTask {
        agent,
        kind: "dns",
        task: "c1:0:1",
        spec: "{}",
    };
    tasks.insert(5, sent_before);
    tasks.push(NewTask {
        task: "c1:1:1",
        ..sent_before
    });
    let answers = leases.enqueue_tasks(conn, &tasks).await.unwrap();
    assert_eq!(answers.len(), tasks.len());
    assert_eq!(answers[5], first, "sent before: its entry");
    assert_eq!(answers[13], "closed", "closed before it was sent");
    for task in tasks.iter().filter(|t| t.agent != agent) {
        let i = tasks.iter().position(|t| t.task == task.task).unwrap();
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(keys.tasks(task.agent, "dns"))
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await
            .unwrap();
        assert_eq!(entries.len(), 1, "{}", task.agent);
        assert_eq!(
            entries[0].0, answers[i],
            "{}'s answer is its entry",
            task.agent
        );
        let field = |name: &str| {
            entries[0]
                .1
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(field("task").as_deref(), Some(task.task));
        assert_eq!(field("spec").as_deref(), Some(task.spec));
    }
    let again = leases.enqueue_tasks(conn, &tasks).await.unwrap();
    assert_eq!(again, answers, "a repeated fan-out adds nothing");
    for a in &agents {
        assert_eq!(xlen(conn, &keys.tasks(a, "dns")).await, 1, "{a}");
    }
}

#[tokio::test]
async fn tasks_by_id_are_added_once_carried_in_events_and_closable() {
    let redis = TestRedis::new();
    let mut conn = redis.connection().await;
    tasks_by_id(&mut conn, Keys::new(redis.prefix.clone(), 4)).await;
}

#[tokio::test]
async fn tasks_by_id_on_a_cluster() {
    let cluster = RedisCluster::start();
    let mut conn = cluster.connection().await;
    tasks_by_id(&mut conn, Keys::new("cp", 4)).await;
}
