//! Presence: heartbeats, offline marking, and the hold-back after a control-plane outage.

use std::time::Duration;

use checkplane_core::keys::Keys;
use checkplane_core::presence::Presence;
use checkplane_testkit::{eventually, TestDb, TestRedis};

use crate::{count, heartbeat, register, start_gateway, start_scheduler};

async fn status(db: &TestDb, id: &str) -> String {
    db.client()
        .await
        .query_one("SELECT status FROM agents WHERE agent_id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_flapping_agent_ends_online_with_three_history_entries() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gw = start_gateway(&db, &redis, &[("HEARTBEAT_INTERVAL", "200ms")]).await;
    let sched = start_scheduler(&db, &redis, &[("OFFLINE_GRACE", "300ms")]).await;
    let (id, token) = register(&gw, "flappy").await;
    assert_eq!(status(&db, &id).await, "registered");

    heartbeat(&gw, &id, &token).await;
    eventually("online", Duration::from_secs(5), || async {
        (status(&db, &id).await == "online").then_some(())
    })
    .await;
    // No more heartbeats: past the deadline and the grace, the sweep marks it offline.
    eventually("offline", Duration::from_secs(5), || async {
        (status(&db, &id).await == "offline").then_some(())
    })
    .await;
    heartbeat(&gw, &id, &token).await;
    eventually("online again", Duration::from_secs(5), || async {
        (status(&db, &id).await == "online").then_some(())
    })
    .await;

    let history: Vec<String> = db
        .client()
        .await
        .query(
            "SELECT status FROM agent_status_history WHERE agent_id = $1 ORDER BY version",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(history, ["online", "offline", "online"]);
    let changes = count(
        &db,
        &format!("SELECT status_changes FROM agents WHERE agent_id = '{id}'"),
    )
    .await;
    assert_eq!(changes, 3);
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn the_sweep_waits_one_grace_period_after_an_outage() {
    let redis = TestRedis::new();
    let keys = Keys::new(redis.prefix.clone(), 1);
    let presence = Presence::new(keys.clone());
    let mut conn = redis.connection().await;
    let grace = 1_000;
    let t0 = 1_000_000;

    let beat = presence.heartbeat(&mut conn, "a1", t0, 100).await.unwrap();
    assert!(beat.came_online);
    assert!(
        !presence
            .heartbeat(&mut conn, "a1", t0 + 50, 100)
            .await
            .unwrap()
            .came_online
    );

    // First sweep ever (or after a gap longer than the grace): hold back one grace period.
    let sweep = presence
        .sweep(&mut conn, 0, t0 + 10_000, grace, 10)
        .await
        .unwrap();
    assert!(sweep.resuming);
    assert_eq!(sweep.marked, 0);
    let sweep = presence
        .sweep(&mut conn, 0, t0 + 10_000 + grace - 1, grace, 10)
        .await
        .unwrap();
    assert!(sweep.resuming, "{sweep:?}");
    let sweep = presence
        .sweep(&mut conn, 0, t0 + 10_000 + grace, grace, 10)
        .await
        .unwrap();
    assert!(!sweep.resuming);
    assert_eq!((sweep.marked, sweep.due), (1, 1));

    // The agent comes back; then the sweeper is gone for longer than the grace period.
    assert!(
        presence
            .heartbeat(&mut conn, "a1", t0 + 20_000, 100)
            .await
            .unwrap()
            .came_online
    );
    let sweep = presence
        .sweep(&mut conn, 0, t0 + 60_000, grace, 10)
        .await
        .unwrap();
    assert!(
        sweep.resuming,
        "an outage must not mark the fleet offline: {sweep:?}"
    );
    assert_eq!(sweep.marked, 0);

    let events: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys.presence_events(0))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let kinds: Vec<String> = events
        .iter()
        .map(|(_, fields)| {
            let event: checkplane_wire::events::Event = serde_json::from_str(&fields[0].1).unwrap();
            event.body.type_name().to_owned()
        })
        .collect();
    assert_eq!(kinds, ["agent.online", "agent.offline", "agent.online"]);
}

#[tokio::test]
async fn presence_versions_only_grow() {
    let redis = TestRedis::new();
    let presence = Presence::new(Keys::new(redis.prefix.clone(), 2));
    let mut conn = redis.connection().await;
    let first = presence
        .heartbeat(&mut conn, "v", 5_000, 100)
        .await
        .unwrap();
    assert_eq!(first.version, 5_000, "a fresh agent's version is the time");
    // The presence hash is lost (Redis restored from an old snapshot, say): the next version
    // must still be above every version already projected.
    let _: () = redis::cmd("DEL")
        .arg(presence.keys().presence(presence.keys().shard_of("v")))
        .query_async(&mut conn)
        .await
        .unwrap();
    let again = presence
        .heartbeat(&mut conn, "v", 6_000, 100)
        .await
        .unwrap();
    assert!(
        again.came_online && again.version > first.version,
        "{again:?}"
    );

    // Gateways' clocks differ: a heartbeat stamped at or before the agent's last version (the
    // offline mark of a sweeper whose clock runs ahead) still gets a greater one.
    let shard = presence.keys().shard_of("v");
    for at in [20_000, 20_900, 21_800] {
        // The first sweep notes that sweeping resumed; one a grace later marks.
        presence
            .sweep(&mut conn, shard, at, 1_000, 10)
            .await
            .unwrap();
    }
    let offline: String = redis::cmd("HGET")
        .arg(presence.keys().presence(shard))
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        offline, "offline:21800",
        "marked offline at the sweeper's time"
    );
    // Below the last version, then exactly at it.
    for (clock, want) in [(15_000, 21_801), (21_801, 21_802)] {
        let back = presence
            .heartbeat(&mut conn, "v", clock, 100)
            .await
            .unwrap();
        assert!(back.came_online, "{back:?}");
        assert_eq!(back.version, want, "clock {clock}");
        // Offline again for the next round, at the same version as a sweeper would.
        let _: () = redis::cmd("HSET")
            .arg(presence.keys().presence(shard))
            .arg("v")
            .arg(format!("offline:{}", back.version))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
