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
