//! Black-box tests of the scheduler against real PostgreSQL and Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backup;
mod checks;
mod leases;
mod outbox;
mod presence;
mod projector;
mod rebuild;
mod retention;

use std::path::Path;
use std::time::Duration;

use checkplane_runtime::Env;
use checkplane_testkit::process::{assert_bad_config_exits_78, assert_sigterm_exits_0, free_port};
use checkplane_testkit::{store_env, Running, TestDb, TestRedis};

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_scheduler"))
}

#[tokio::test]
async fn serves_its_probes_in_process() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut env = store_env(&db, &redis);
    env.push(("HTTP_HEADER_TIMEOUT".into(), "300ms".into()));
    let config = scheduler::load(&mut Env::from_pairs(env)).unwrap();
    let service = Running::start(|l, s| scheduler::run(config, l, s)).await;
    service.wait_ready(Duration::from_secs(10)).await;
    let (status, body) = service.get_json("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(body["service"], "scheduler");
    assert_eq!(body["checks"]["postgres"]["ok"], true);
    assert_eq!(body["checks"]["redis"]["ok"], true);
    // The listener every store-backed service shares (gateway, scheduler, haproxy-sync).
    checkplane_testkit::raw::assert_listener_limits(service.addr).await;
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

/// Start the scheduler in-process with the given extra variables.
pub async fn start_scheduler(
    db: &TestDb,
    redis: &TestRedis,
    extra: &[(&str, &str)],
) -> Running<checkplane_runtime::RunError> {
    let mut env = store_env(db, redis);
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let config = scheduler::load(&mut Env::from_pairs(env)).unwrap();
    let running = Running::start(|l, s| scheduler::run(config, l, s)).await;
    running.wait_ready(Duration::from_secs(10)).await;
    running
}

/// Start the gateway in-process with an enrollment token and the given extra variables.
pub async fn start_gateway(
    db: &TestDb,
    redis: &TestRedis,
    extra: &[(&str, &str)],
) -> Running<checkplane_runtime::RunError> {
    let mut env = store_env(db, redis);
    env.push(("GATEWAY_ENROLLMENT_TOKEN".into(), ENROLL.into()));
    // These tests play agents and operators by hand, at whatever pace a test needs (a
    // heartbeat before every step, a poll every 25 ms); the limits are tested in gateway::it
    // limits, and the real agent within the defaults in agent::it checks.
    for endpoint in [
        "HEARTBEAT",
        "CLAIM",
        "EXTEND",
        "REPORT",
        "METRICS",
        "OPERATOR",
    ] {
        env.push((format!("GATEWAY_RATE_{endpoint}"), "off".into()));
    }
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let config = gateway::load(&mut Env::from_pairs(env)).unwrap();
    let running = Running::start(|l, s| gateway::run(config, l, s)).await;
    running.wait_ready(Duration::from_secs(10)).await;
    running
}

pub const ENROLL: &str = "enroll-secret-0123456789";

/// Register `hostname` through the gateway: (agent id, token).
pub async fn register(
    gw: &Running<checkplane_runtime::RunError>,
    hostname: &str,
) -> (String, String) {
    checkplane_testkit::register_agent(
        &reqwest::Client::new(),
        &gw.url(""),
        ENROLL,
        &serde_json::json!({"hostname": hostname, "capabilities": {"dns": 1}}),
    )
    .await
}

/// One heartbeat; panics unless it is accepted.
pub async fn heartbeat(gw: &Running<checkplane_runtime::RunError>, id: &str, token: &str) {
    let response = reqwest::Client::new()
        .post(gw.url("/v1/agents/heartbeat"))
        .header("x-agent-id", id)
        .header("x-agent-token", token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

/// `SELECT count(*)` of a query.
pub async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// Run `scheduler rebuild` on the database at `url` and expect exit 0.
pub fn rebuild_binary(url: &str) {
    let env = vec![("DATABASE_URL".to_owned(), url.to_owned())];
    let out = tokio::task::block_in_place(|| {
        checkplane_testkit::process::run_to_end(
            bin(),
            &["rebuild"],
            &env,
            std::time::Duration::from_secs(60),
        )
    });
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `scheduler healthcheck` against the running scheduler: OK; DEGRADED once an event is
/// parked (its counting round runs every 5 s); DOWN with Redis gone, and with it gone.
#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_says_ok_degraded_and_down() {
    use checkplane_testkit::process::{
        healthcheck, healthcheck_until, private_store_env, ServiceProcess,
    };
    let db = TestDb::new().await;
    let mut redis = checkplane_testkit::servers::RedisServer::start();
    let port = free_port();
    let env = private_store_env(&db, &redis.url(), port);
    let scheduler = ServiceProcess::spawn(bin(), &[], &env);
    let line = healthcheck_until(bin(), &env, 0, Duration::from_secs(30)).await;
    assert_eq!(line, "scheduler: OK");

    db.client()
        .await
        .execute(
            "INSERT INTO projection_failures (stream, entry_id, consumer_group, attempts, error, entry)
             VALUES ('cp:events:checks', '1-0', 'projector', 5, 'test', '{}')",
            &[],
        )
        .await
        .unwrap();
    let line = healthcheck_until(bin(), &env, 1, Duration::from_secs(15)).await;
    assert!(
        line.starts_with(
            "scheduler: DEGRADED: 1 events parked (projection failures 1, dead letters 0)"
        ),
        "{line}"
    );

    redis.stop();
    let line = healthcheck_until(bin(), &env, 2, Duration::from_secs(15)).await;
    assert!(line.starts_with("scheduler: DOWN: redis: "), "{line}");
    drop(scheduler);
    assert_eq!(healthcheck(bin(), &env).0, Some(2));
}
