//! The Lua scripts build their events' envelopes by hand (`cjson.encode`), apart from the serde
//! types that read them. This pins the two together: every kind of event a script emits is
//! made here on a real Redis, and each must decode as a `checkplane_wire::events::Event`, say
//! the current schema, and serialize back to the very JSON the script wrote (a field the
//! script adds, drops, renames or types differently fails here, not in a projector).

use checkplane_core::keys::Keys;
use checkplane_core::leases::{CloseReason, LeaseSettings, Leases, TaskRef};
use checkplane_core::presence::Presence;
use checkplane_testkit::{events, TestRedis};
use checkplane_wire::events::{Event, SCHEMA};
use checkplane_wire::leases::LeaseToken;
use serde_json::Value;

/// `null`s dropped from objects: Lua has no null in a table (cjson leaves the key out), serde
/// writes `None` as `null`; both mean absent.
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

#[tokio::test]
async fn every_event_a_script_builds_is_a_wire_event_field_for_field() {
    let redis = TestRedis::new();
    let mut conn = redis.connection().await;
    // One shard: every event lands on one lease stream and one presence stream.
    let keys = Keys::new(redis.prefix.clone(), 1);
    let presence = Presence::new(keys.clone());
    // A task goes to the dead letters on its second delivery.
    let leases = Leases::new(keys.clone(), LeaseSettings::new(1_000, 1));
    let t = checkplane_runtime::clock::now_ms();
    let agent = "agt-envelopes";

    // agent.online, then agent.offline once its deadline and the grace passed.
    let beat = presence
        .heartbeat(&mut conn, agent, t, 1_000)
        .await
        .unwrap();
    assert!(beat.came_online);

    for i in 0..4 {
        leases
            .enqueue(&mut conn, agent, "dns", &format!("{{\"n\":{i}}}"))
            .await
            .unwrap();
    }
    // lease.granted ×3
    let granted = leases
        .claim(&mut conn, agent, "r1", &[("dns", 3)], t)
        .await
        .unwrap();
    assert_eq!(granted.len(), 3);
    let tokens: Vec<LeaseToken> = granted
        .iter()
        .map(|g| LeaseToken::parse(&g.token).unwrap())
        .collect();
    // lease.extended, lease.reported
    leases
        .extend(&mut conn, agent, &tokens[..1], t + 10)
        .await
        .unwrap();
    leases
        .report(
            &mut conn,
            &tokens[0],
            "success",
            &serde_json::json!({"answers": ["192.0.2.1"]}),
            t + 20,
        )
        .await
        .unwrap();
    // lease.closed
    let closed = leases
        .close(
            &mut conn,
            &TaskRef {
                agent,
                kind: "dns",
                entry: &tokens[1].entry,
                task: "",
            },
            CloseReason::Timeout,
            t + 30,
        )
        .await
        .unwrap();
    assert!(closed);
    // lease.expired: past its deadline, its agent past its heartbeat deadline.
    let recovered = leases.recover(&mut conn, 0, t + 10_000, 10).await.unwrap();
    assert_eq!(recovered.expired, 1, "{recovered:?}");
    // task.dead_lettered: a lease of 1 ms lost and claimed back is its task's second
    // delivery, over the limit. (Redis measures the idle time itself: a real pause.)
    let brief = Leases::new(keys.clone(), LeaseSettings::new(1, 1));
    brief
        .enqueue(&mut conn, "agt-dlq", "trace", "{}")
        .await
        .unwrap();
    let first = brief
        .claim(&mut conn, "agt-dlq", "r2", &[("trace", 1)], t)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let second = brief
        .claim(&mut conn, "agt-dlq", "r3", &[("trace", 1)], t + 5)
        .await
        .unwrap();
    assert!(second.is_empty(), "dead-lettered, not granted: {second:?}");
    // agent.offline: a first sweep only notes that sweeping resumed; one a grace later marks.
    for at in [t + 20_000, t + 20_900, t + 21_800] {
        presence.sweep(&mut conn, 0, at, 1_000, 10).await.unwrap();
    }

    let mut raw = events::read(&mut conn, &keys.lease_events(0)).await;
    raw.extend(events::read(&mut conn, &keys.presence_events(0)).await);
    let mut types = std::collections::BTreeSet::new();
    for (_, text) in &raw {
        let written: Value = serde_json::from_str(text).unwrap();
        let event: Event =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("not a wire Event ({e}): {text}"));
        assert_eq!(event.schema, SCHEMA, "{text}");
        let read_back = serde_json::to_value(&event).unwrap();
        assert_eq!(
            without_nulls(read_back),
            without_nulls(written),
            "the script's envelope and the wire type disagree"
        );
        types.insert(event.body.type_name());
    }
    let want = [
        "agent.offline",
        "agent.online",
        "lease.closed",
        "lease.expired",
        "lease.extended",
        "lease.granted",
        "lease.reported",
        "task.dead_lettered",
    ];
    assert_eq!(
        types.into_iter().collect::<Vec<_>>(),
        want,
        "every kind of event the scripts emit is made here"
    );
}
