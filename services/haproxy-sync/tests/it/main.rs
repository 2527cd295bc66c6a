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
use checkplane_testkit::process::{assert_bad_config_exits_2, assert_sigterm_exits_0, free_port};
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
fn bad_configuration_exits_2_naming_the_variable() {
    let env = vec![
        (
            "DATABASE_URL".to_owned(),
            "postgres://u@127.0.0.1:1/db".to_owned(),
        ),
        ("HTTP_ADDR".to_owned(), format!("127.0.0.1:{}", free_port())),
    ];
    assert_bad_config_exits_2(bin(), &env);
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
