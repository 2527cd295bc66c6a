//! `/livez`, `/readyz`, `/metrics` and the JSON fallbacks, in-process.

use std::time::Duration;

use checkplane_runtime::Env;
use checkplane_testkit::servers::{PostgresServer, RedisServer};
use checkplane_testkit::{eventually, store_env, Running, TestDb, TestRedis};

async fn start_gateway(env: Vec<(String, String)>) -> Running<checkplane_runtime::RunError> {
    let mut env = Env::from_pairs(env);
    let config = gateway::load(&mut env).expect("valid test configuration");
    Running::start(|listener, shutdown| gateway::run(config, listener, shutdown)).await
}

#[tokio::test]
async fn ready_when_postgres_redis_and_migrations_are() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gw = start_gateway(store_env(&db, &redis)).await;
    gw.wait_ready(Duration::from_secs(10)).await;

    let (status, body) = gw.get_json("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ready");
    assert_eq!(body["service"], "gateway");
    for dep in ["postgres", "redis", "migrations"] {
        assert_eq!(body["checks"][dep]["ok"], true, "{dep}: {body}");
    }

    let (status, body) = gw.get_json("/livez").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("alive")));

    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_the_error_envelope() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gw = start_gateway(store_env(&db, &redis)).await;

    let (status, body) = gw.get_json("/v1/nope").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "ERR_NOT_FOUND");

    let response = reqwest::Client::new()
        .post(gw.url("/livez"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ERR_METHOD_NOT_ALLOWED");
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_request_counts() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gw = start_gateway(store_env(&db, &redis)).await;
    gw.wait_ready(Duration::from_secs(10)).await;

    let response = reqwest::get(gw.url("/metrics")).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    assert!(
        text.contains("http_requests_total{method=\"GET\",route=\"/readyz\",status=\"200\"}"),
        "{text}"
    );
    assert!(
        text.contains("checkplane_dependency_up{dependency=\"redis\"} 1"),
        "{text}"
    );
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn readyz_names_redis_while_it_is_down_and_recovers() {
    let db = TestDb::new().await;
    let mut redis_server = RedisServer::start();
    let mut env = store_env(&db, &TestRedis::new());
    env.retain(|(k, _)| k != "REDIS_URL");
    env.push(("REDIS_URL".into(), redis_server.url()));
    let gw = start_gateway(env).await;
    gw.wait_ready(Duration::from_secs(10)).await;

    redis_server.stop();
    let body = eventually("503 naming redis", Duration::from_secs(2), || async {
        let (status, body) = gw.get_json("/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert_eq!(body["failed"], serde_json::json!(["redis"]), "{body}");
    assert_eq!(body["error"], serde_json::Value::Null);
    assert_eq!(body["checks"]["postgres"]["ok"], true);

    redis_server.resume();
    gw.wait_ready(Duration::from_secs(5)).await;
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn a_hung_redis_does_not_hang_the_probe() {
    let db = TestDb::new().await;
    let redis_server = RedisServer::start();
    let mut env = store_env(&db, &TestRedis::new());
    env.retain(|(k, _)| k != "REDIS_URL");
    env.push(("REDIS_URL".into(), redis_server.url()));
    env.push(("READY_TIMEOUT".into(), "300ms".into()));
    let gw = start_gateway(env).await;
    gw.wait_ready(Duration::from_secs(10)).await;

    redis_server.freeze();
    // get_json gives up after 5 s and reports 0: a hung probe would show as 0, not 503.
    let (status, body) = gw.get_json("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["failed"], serde_json::json!(["redis"]), "{body}");
    assert_eq!(body["checks"]["redis"]["error"], "timed out", "{body}");

    redis_server.thaw();
    gw.wait_ready(Duration::from_secs(5)).await;
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn readyz_names_postgres_while_it_is_down_and_recovers() {
    let pg = PostgresServer::start();
    let redis = TestRedis::new();
    let env = vec![
        ("DATABASE_URL".to_owned(), pg.url()),
        ("REDIS_URL".to_owned(), redis.url.clone()),
        ("STREAM_PREFIX".to_owned(), redis.prefix.clone()),
    ];
    let gw = start_gateway(env).await;
    gw.wait_ready(Duration::from_secs(10)).await;

    pg.stop();
    let body = eventually("503 naming postgres", Duration::from_secs(2), || async {
        let (status, body) = gw.get_json("/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert_eq!(body["failed"], serde_json::json!(["postgres"]), "{body}");

    pg.resume();
    gw.wait_ready(Duration::from_secs(5)).await;
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn a_database_down_at_start_is_waited_for_not_fatal() {
    let pg = PostgresServer::start();
    pg.stop();
    let redis = TestRedis::new();
    let env = vec![
        ("DATABASE_URL".to_owned(), pg.url()),
        ("REDIS_URL".to_owned(), redis.url.clone()),
        ("STREAM_PREFIX".to_owned(), redis.prefix.clone()),
    ];
    let gw = start_gateway(env).await;

    let (status, body) = gw.get_json("/readyz").await;
    assert_eq!(status, 503);
    let failed: Vec<&str> = body["failed"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(failed, ["migrations", "postgres"], "{body}");

    pg.resume();
    gw.wait_ready(Duration::from_secs(15)).await;
    // Migrations ran once the database came back.
    let client = checkplane_runtime::db::connect(&pg.url().parse().unwrap())
        .await
        .unwrap();
    let rows = client
        .query("SELECT 1 FROM installation", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    gw.stop().await.unwrap();
}
