//! Black-box tests of the haproxy-sync against real PostgreSQL and Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod actions;
mod applications;
mod relay;
mod runtime_api;
mod sync;

use std::path::Path;
use std::time::Duration;

use checkplane_runtime::Env;
use checkplane_testkit::process::{assert_bad_config_exits_78, assert_sigterm_exits_0, free_port};
use checkplane_testkit::{store_env, Running, TestDb, TestRedis};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_haproxy-sync"))
}

#[tokio::test]
async fn serves_its_probes_in_process() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let config = haproxy_sync::load(&mut Env::from_pairs(store_env(&db, &redis))).unwrap();
    let service = Running::start(|l, s| haproxy_sync::run(config, l, s)).await;
    service.wait_ready(Duration::from_secs(10)).await;
    let (status, body) = service.get_json("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(body["service"], "haproxy-sync");
    assert_eq!(body["checks"]["postgres"]["ok"], true);
    assert_eq!(body["checks"]["redis"]["ok"], true);
    service.stop().await.unwrap();
}

#[test]
fn bad_configuration_exits_78_naming_the_variable() {
    let env = vec![
        (
            "DATABASE_URL".to_owned(),
            "postgres://u@127.0.0.1:1/db".to_owned(),
        ),
        ("HTTP_ADDR".to_owned(), format!("127.0.0.1:{}", free_port())),
    ];
    assert_bad_config_exits_78(bin(), &env);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_0_within_the_bound() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let port = free_port();
    let mut env = store_env(&db, &redis);
    env.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
    env.push(("SHUTDOWN_TIMEOUT".into(), "3s".into()));
    let url = format!("http://127.0.0.1:{port}/readyz");
    assert_sigterm_exits_0(bin(), &env, &url, Duration::from_secs(3)).await;
}

/// `haproxy-sync healthcheck` against the running service: OK; DEGRADED while an instance's
/// breaker is open; DOWN with Redis gone, and with it gone.
#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_says_ok_degraded_and_down() {
    use checkplane_testkit::process::{
        healthcheck, healthcheck_until, private_store_env, ServiceProcess,
    };
    let db = TestDb::new().await;
    let mut redis = checkplane_testkit::servers::RedisServer::start();
    let port = free_port();
    let env = private_store_env(&db, &redis.url(), port);
    let sync = ServiceProcess::spawn(bin(), &[], &env);
    let line = healthcheck_until(bin(), &env, 0, Duration::from_secs(30)).await;
    assert_eq!(line, "haproxy-sync: OK");

    // Two open breakers: a registered instance's, and a removed one's (which says nothing).
    db.client()
        .await
        .batch_execute(
            "INSERT INTO haproxy_instances (instance_id, name, transport, address, created_at, created_by, removed_at)
             VALUES ('hap-1', 'lb-1', 'direct', '127.0.0.1:9', now(), 'test', NULL),
                    ('hap-2', 'lb-2', 'direct', '127.0.0.1:10', now(), 'test', now());
             INSERT INTO haproxy_breakers (instance_id, state, failures, opened_at, updated_at)
             VALUES ('hap-1', 'open', 5, now(), now()), ('hap-2', 'open', 5, now(), now())",
        )
        .await
        .unwrap();
    let line = healthcheck_until(bin(), &env, 1, Duration::from_secs(15)).await;
    assert_eq!(
        line,
        "haproxy-sync: DEGRADED: 1 instance(s) with the breaker open: actions on them wait"
    );

    redis.stop();
    let line = healthcheck_until(bin(), &env, 2, Duration::from_secs(15)).await;
    assert!(line.starts_with("haproxy-sync: DOWN: redis: "), "{line}");
    drop(sync);
    assert_eq!(healthcheck(bin(), &env).0, Some(2));
}
