//! The edge write path survives a gateway killed between commit and publish.

use std::path::Path;
use std::time::Duration;

use checkplane_testkit::process::{free_port, ServiceProcess};
use checkplane_testkit::servers::RedisServer;
use checkplane_testkit::{eventually, store_env, wait_ready, TestDb, TestRedis};

use crate::{count, ENROLL};

#[tokio::test(flavor = "multi_thread")]
async fn an_event_committed_but_never_published_arrives_through_the_sweep() {
    let db = TestDb::new().await;
    let redis_server = RedisServer::start();
    let redis = TestRedis::new();
    let mut env: Vec<(String, String)> = store_env(&db, &redis)
        .into_iter()
        .filter(|(k, _)| k != "REDIS_URL")
        .collect();
    env.push(("REDIS_URL".into(), redis_server.url()));
    let port = free_port();
    env.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
    env.push(("GATEWAY_ENROLLMENT_TOKEN".into(), ENROLL.into()));
    let gateway_bin = Path::new(env!("CARGO_BIN_EXE_scheduler")).with_file_name("gateway");
    let mut gateway = ServiceProcess::spawn(&gateway_bin, &[], &env);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(
        &reqwest::Client::new(),
        &format!("{base}/readyz"),
        Duration::from_secs(20),
    )
    .await;

    // Redis stops answering: the registration commits, and its publish hangs.
    redis_server.freeze();
    let request = tokio::spawn(
        reqwest::Client::new()
            .post(format!("{base}/v1/agents/register"))
            .header("x-enrollment-token", ENROLL)
            .json(&serde_json::json!({"hostname": "crashy", "capabilities": {"dns": 1}}))
            .timeout(Duration::from_secs(30))
            .send(),
    );
    eventually(
        "the registration committed",
        Duration::from_secs(10),
        || async { (count(&db, "SELECT count(*) FROM events").await == 1).then_some(()) },
    )
    .await;
    gateway.signal("KILL");
    gateway.wait(Duration::from_secs(5)).unwrap();
    assert!(
        request.await.unwrap().is_err(),
        "the client never got an answer"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM outbox").await, 1);
    redis_server.thaw();

    let stream = format!("{}:events:agents", redis.prefix);
    let client = redis::Client::open(redis_server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let len: i64 = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 0, "nothing was published before the crash");

    let scheduler = {
        let mut env = store_env(&db, &redis);
        env.retain(|(k, _)| k != "REDIS_URL");
        env.push(("REDIS_URL".into(), redis_server.url()));
        env.push(("OUTBOX_MIN_AGE".into(), "0s".into()));
        let config = scheduler::load(&mut checkplane_runtime::Env::from_pairs(env)).unwrap();
        checkplane_testkit::Running::start(|l, s| scheduler::run(config, l, s)).await
    };
    eventually(
        "the sweep published it",
        Duration::from_secs(10),
        || async {
            let len: i64 = redis::cmd("XLEN")
                .arg(&stream)
                .query_async(&mut conn.clone())
                .await
                .ok()?;
            (len == 1).then_some(())
        },
    )
    .await;
    eventually("the outbox is empty", Duration::from_secs(10), || async {
        (count(&db, "SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    let agents = count(&db, "SELECT count(*) FROM agents WHERE hostname = 'crashy'").await;
    assert_eq!(agents, 1, "the registration itself was never lost");
    scheduler.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_check_whose_gateway_died_before_fan_out_reaches_its_agent_once() {
    let admin = "admin-key-0123456789abcdef";
    let db = TestDb::new().await;
    let redis_server = RedisServer::start();
    let redis = TestRedis::new();
    let mut env: Vec<(String, String)> = store_env(&db, &redis)
        .into_iter()
        .filter(|(k, _)| k != "REDIS_URL")
        .collect();
    env.push(("REDIS_URL".into(), redis_server.url()));
    env.push(("GATEWAY_ENROLLMENT_TOKEN".into(), ENROLL.into()));
    env.push(("GATEWAY_ADMIN_KEY".into(), admin.into()));
    let scheduler = {
        let mut env: Vec<(String, String)> = env
            .iter()
            .filter(|(k, _)| {
                k.starts_with("DATABASE") || k.starts_with("REDIS") || k == "STREAM_PREFIX"
            })
            .cloned()
            .collect();
        env.push(("OUTBOX_MIN_AGE".into(), "0s".into()));
        let config = scheduler::load(&mut checkplane_runtime::Env::from_pairs(env)).unwrap();
        checkplane_testkit::Running::start(|l, s| scheduler::run(config, l, s)).await
    };
    let port = free_port();
    let mut process_env = env.clone();
    process_env.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
    let gateway_bin = Path::new(env!("CARGO_BIN_EXE_scheduler")).with_file_name("gateway");
    let mut gateway = ServiceProcess::spawn(&gateway_bin, &[], &process_env);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_ready(&http, &format!("{base}/readyz"), Duration::from_secs(20)).await;
    let (id, token) = checkplane_testkit::register_agent(
        &http,
        &base,
        ENROLL,
        &serde_json::json!({"hostname": "lonely", "capabilities": {"dns": 2}}),
    )
    .await;
    let (status, _) = checkplane_testkit::agent_post(
        &http,
        &format!("{base}/v1/agents/heartbeat"),
        &id,
        &token,
        &serde_json::json!({}),
    )
    .await;
    assert_eq!(status, 200);
    eventually("the agent is online", Duration::from_secs(10), || async {
        (count(&db, "SELECT count(*) FROM agents WHERE status = 'online'").await == 1).then_some(())
    })
    .await;

    // Redis stops answering: the check commits, its fan-out hangs, the gateway dies.
    redis_server.freeze();
    let request = tokio::spawn(
        http.post(format!("{base}/v1/checks"))
            .header("x-api-key", admin)
            .json(&serde_json::json!({"kind": "dns", "target": "example.com", "limit": 1}))
            .timeout(Duration::from_secs(30))
            .send(),
    );
    eventually("the check committed", Duration::from_secs(10), || async {
        (count(&db, "SELECT count(*) FROM checks").await == 1).then_some(())
    })
    .await;
    gateway.signal("KILL");
    gateway.wait(Duration::from_secs(5)).unwrap();
    assert!(
        request.await.unwrap().is_err(),
        "the client never got an answer"
    );
    let check_id: uuid::Uuid = db
        .client()
        .await
        .query_one("SELECT check_id FROM checks", &[])
        .await
        .unwrap()
        .get(0);
    redis_server.thaw();

    // Another gateway; the agent's claim gets the task the sweep added, once.
    let config = gateway::load(&mut checkplane_runtime::Env::from_pairs(env.clone())).unwrap();
    let gw = checkplane_testkit::Running::start(|l, s| gateway::run(config, l, s)).await;
    gw.wait_ready(Duration::from_secs(10)).await;
    let claim = |wait_ms: u64| {
        let (http, url, id, token) = (
            http.clone(),
            gw.url("/v1/agents/claim"),
            id.clone(),
            token.clone(),
        );
        async move {
            let body = serde_json::json!({"capacities": {"dns": 2}, "request_id": uuid::Uuid::new_v4().simple().to_string(), "wait_ms": wait_ms});
            let (status, answer) =
                checkplane_testkit::agent_post(&http, &url, &id, &token, &body).await;
            assert_eq!(status, 200, "{answer}");
            answer["leases"].as_array().unwrap().clone()
        }
    };
    let leases = eventually("the task arrives", Duration::from_secs(15), || async {
        let leases = claim(1000).await;
        (!leases.is_empty()).then_some(leases)
    })
    .await;
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0]["spec"]["check_id"], check_id.to_string());
    assert!(claim(500).await.is_empty(), "the task was added once");
    eventually("the outbox is empty", Duration::from_secs(10), || async {
        (count(&db, "SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    gw.stop().await.unwrap();
    scheduler.stop().await.unwrap();
}
