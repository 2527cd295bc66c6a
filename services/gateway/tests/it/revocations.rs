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
