//! Cached credentials forgotten by every replica even when the announcement is lost: a
//! gateway whose subscription to the invalidations drops trusts nothing it cached.

use std::time::Duration;

use checkplane_testkit::servers::RedisServer;
use checkplane_testkit::TestDb;
use serde_json::{json, Value};

use crate::agents::ADMIN;
use crate::limits::replica;

#[tokio::test(flavor = "multi_thread")]
async fn a_key_revoked_while_redis_is_down_is_refused_by_a_replica_that_had_it_cached() {
    let db = TestDb::new().await;
    let mut server = RedisServer::start();
    let ttl = [("GATEWAY_AUTH_CACHE_TTL".to_owned(), "60s".to_owned())];
    let a = replica(&db, &server.url(), "revoke", &ttl).await;
    let b = replica(&db, &server.url(), "revoke", &ttl).await;
    let http = reqwest::Client::new();
    let made: Value = http
        .post(a.url("/v1/keys"))
        .header("x-api-key", ADMIN)
        .json(&json!({"name": "cached", "role": "viewer"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (key, key_id) = (
        made["key"].as_str().unwrap(),
        made["key_id"].as_str().unwrap(),
    );
    let list = |gw: &crate::limits::Service| {
        let request = http.get(gw.url("/v1/agents")).header("x-api-key", key);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(list(&a).await, 200); // cached on replica a for a minute

    // Redis goes away: replica b's revocation cannot be announced.
    server.stop();
    let revoked = http
        .delete(b.url(&format!("/v1/keys/{key_id}")))
        .header("x-api-key", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 204);
    // Replica a lost its subscription, so it trusts nothing it cached: PostgreSQL says no.
    checkplane_testkit::eventually(
        "the revoked key refused on replica a",
        Duration::from_secs(5),
        || async { (list(&a).await == 401).then_some(()) },
    )
    .await;
    server.resume();
    assert_eq!(list(&a).await, 401);
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

/// Gateway replica `b` beside `a`: same database, Redis and prefix.
async fn second(a: &crate::agents::Gw, extra: &[(String, String)]) -> crate::limits::Service {
    replica(&a.db, &a.redis.url, &a.redis.prefix, extra).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_revoked_on_one_replica_is_refused_everywhere_and_its_leases_end_at_once() {
    use checkplane_core::keys::Keys;
    use checkplane_core::leases::{LeaseSettings, Leases};
    // Tokens cached for a minute and leases of five: only the revocation can end either soon.
    let extra = vec![
        ("GATEWAY_AUTH_CACHE_TTL".to_owned(), "60s".to_owned()),
        ("LEASE_TTL".to_owned(), "300s".to_owned()),
    ];
    let a = crate::agents::start_with(extra.clone()).await;
    let b = second(&a, &extra).await;
    let (_, reg) = a.register(crate::agents::probe("doomed")).await;
    let (id, token) = (
        reg["agent_id"].as_str().unwrap().to_owned(),
        reg["token"].as_str().unwrap().to_owned(),
    );
    let agent = [
        ("x-agent-id", id.as_str()),
        ("x-agent-token", token.as_str()),
    ];
    assert_eq!(a.heartbeat(&id, &token).await.0, 200); // cached on replica a
    let keys = Keys::new(a.redis.prefix.clone(), 4);
    let leases = Leases::new(keys.clone(), LeaseSettings::new(300_000, 5));
    let mut conn = a.redis.connection().await;
    for name in ["a.example", "b.example"] {
        let spec = json!({"name": name, "type": "A"}).to_string();
        leases.enqueue(&mut conn, &id, "dns", &spec).await.unwrap();
    }
    let (status, claimed) = a
        .post(
            "/v1/agents/claim",
            &agent,
            json!({"capacities": {"dns": 4}, "request_id": "before"}),
        )
        .await;
    assert_eq!(status, 200, "{claimed}");
    let tokens: Vec<String> = claimed["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["token"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tokens.len(), 2, "{claimed}");
    // A claim of the agent already waiting on replica a (authenticated) when it is revoked.
    let waiting = {
        let request = a
            .http
            .post(a.running.url("/v1/agents/claim"))
            .header("x-agent-id", &id)
            .header("x-agent-token", &token)
            .json(&json!({"capacities": {"dns": 4}, "request_id": "waiting", "wait_ms": 4000}));
        tokio::spawn(async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    checkplane_testkit::eventually("the claim waiting", Duration::from_secs(10), || async {
        checkplane_testkit::metrics_text(&a.running.url("/metrics"))
            .await
            .lines()
            .any(|l| l == "checkplane_claims_waiting 1")
            .then_some(())
    })
    .await;

    // Only an admin revokes, and only a known agent.
    let delete = |path: String, key: &str| {
        let request = a.http.delete(b.url(&path)).header("x-api-key", key);
        async move {
            let r = request.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, made) = a
        .post(
            "/v1/keys",
            &[("x-api-key", ADMIN)],
            json!({"name": "not-admin", "role": "operator"}),
        )
        .await;
    assert_eq!(status, 201);
    let operator = made["key"].as_str().unwrap();
    assert_eq!(delete(format!("/v1/agents/{id}"), operator).await.0, 403);
    let unknown = delete(
        "/v1/agents/agt-0123456789abcdef0123456789abcdef".into(),
        ADMIN,
    )
    .await;
    assert_eq!(unknown.0, 404, "{}", unknown.1);
    assert_eq!(delete("/v1/agents/..%2Fx".into(), ADMIN).await.0, 404);

    let (status, revoked) = delete(format!("/v1/agents/{id}"), ADMIN).await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["leases_recovered"], 2, "{revoked}");
    assert_eq!(revoked["hostname"], "doomed");
    assert!(revoked["revoked_at"].is_string(), "{revoked}");

    // Refused on replica a although it had the token cached for a minute.
    checkplane_testkit::eventually(
        "the revoked agent refused on replica a",
        Duration::from_secs(2),
        || async { (a.heartbeat(&id, &token).await.0 == 401).then_some(()) },
    )
    .await;
    let (status, _) = a
        .post(
            "/v1/agents/extend",
            &agent,
            json!({"tokens": tokens.clone()}),
        )
        .await;
    assert_eq!(status, 401);

    // Its leases ended now, not in five minutes: gone from the shard's set, announced.
    let n = keys.shard_of(&id);
    let left: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.leases(n))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    let events: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys.lease_events(n))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let expired: Vec<Value> = events
        .iter()
        .map(|(_, fields)| serde_json::from_str::<Value>(&fields[0].1).unwrap())
        .filter(|e| e["type"] == "lease.expired")
        .collect();
    assert_eq!(expired.len(), 2, "{expired:?}");
    assert!(
        expired.iter().all(|e| e["actor"] == "key:bootstrap"),
        "{expired:?}"
    );

    // New work for the agent: the claim that was waiting is woken, and granted nothing.
    leases
        .enqueue(
            &mut conn,
            &id,
            "dns",
            &json!({"name": "c.example", "type": "A"}).to_string(),
        )
        .await
        .unwrap();
    let (status, late) = waiting.await.unwrap();
    assert_eq!(status, 200, "{late}");
    assert_eq!(late["leases"], json!([]), "{late}");

    // Its host needs an approval to come back: neither its token nor the enrollment token do.
    let (status, _) = a
        .register_with(crate::agents::probe("doomed"), &token)
        .await;
    assert_eq!(status, 409);
    assert_eq!(a.register(crate::agents::probe("doomed")).await.0, 409);
    let (status, listed) = a.get("/v1/agents", &[("x-api-key", ADMIN)]).await;
    assert_eq!(status, 200);
    assert!(listed["items"][0]["revoked_at"].is_string(), "{listed}");
    let (status, audit) = a
        .get("/v1/audit?action=agent.revoked", &[("x-api-key", ADMIN)])
        .await;
    assert_eq!((status, audit["total"].as_i64()), (200, Some(1)), "{audit}");
    // Again: harmless, nothing left to end.
    let (status, again) = delete(format!("/v1/agents/{id}"), ADMIN).await;
    assert_eq!((status, again["leases_recovered"].as_u64()), (200, Some(0)));

    let (status, _) = a
        .post(
            &format!("/v1/agents/{id}/reenroll"),
            &[("x-api-key", ADMIN)],
            json!({}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, back) = a.register(crate::agents::probe("doomed")).await;
    assert_eq!(
        (status, back["agent_id"].as_str()),
        (200, Some(id.as_str()))
    );
    let fresh = back["token"].as_str().unwrap();
    let beat = a
        .http
        .post(b.url("/v1/agents/heartbeat"))
        .header("x-agent-id", &id)
        .header("x-agent-token", fresh)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        beat.status().as_u16(),
        200,
        "an approved registration's heartbeats count again"
    );
    let (_, listed) = a.get("/v1/agents", &[("x-api-key", ADMIN)]).await;
    assert!(listed["items"][0]["revoked_at"].is_null(), "{listed}");
    b.stop().await.unwrap();
    a.running.stop().await.unwrap();
}
