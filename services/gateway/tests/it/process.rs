//! The gateway as a real process: exit codes, signals, replicas migrating together.

use std::path::Path;
use std::time::Duration;

use checkplane_testkit::process::{
    assert_bad_config_exits_78, assert_sigterm_exits_0, free_port, run_to_end, ServiceProcess,
};
use checkplane_testkit::{store_env, wait_ready, TestDb, TestRedis};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_gateway"))
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

    let out = run_to_end(bin(), &[], &[], Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));
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

#[tokio::test(flavor = "multi_thread")]
async fn replicas_migrating_at_once_end_with_one_schema() {
    let db = TestDb::empty().await;
    let redis = TestRedis::new();
    let mut replicas = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let mut env = store_env(&db, &redis);
        env.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
        replicas.push(ServiceProcess::spawn(bin(), &[], &env));
        urls.push(format!("http://127.0.0.1:{port}/readyz"));
    }
    let migrate_env = store_env(&db, &redis);
    let one_shot = tokio::task::spawn_blocking(move || {
        run_to_end(
            bin(),
            &["--migrate-only"],
            &migrate_env,
            Duration::from_secs(30),
        )
    });
    let http = reqwest::Client::new();
    for url in &urls {
        wait_ready(&http, url, Duration::from_secs(30)).await;
    }
    let out = one_shot.await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for replica in &replicas {
        let log = replica.stderr();
        assert!(!log.contains("ERROR"), "{log}");
    }

    let client = db.client().await;
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM refinery_schema_history ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected = checkplane_runtime::db::embedded_migrations().len();
    assert_eq!(versions.len(), expected, "{versions:?}");
    let mut unique = versions.clone();
    unique.dedup();
    assert_eq!(unique, versions, "a migration was recorded twice");
    let installations: i64 = client
        .query_one("SELECT count(*) FROM installation", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(installations, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_and_secrets_from_files_never_printed() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    // The private PostgreSQL trusts loopback, so the password is carried but not checked.
    let url_with_password = db.url.replacen("postgres@", "postgres:sekrit-pw@", 1);
    assert_ne!(url_with_password, db.url);
    let dir = std::env::temp_dir().join(format!("cp-secret-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("database_url");
    std::fs::write(&secret_file, format!("{url_with_password}\n")).unwrap();

    let port = free_port();
    let mut env: Vec<(String, String)> = store_env(&db, &redis)
        .into_iter()
        .filter(|(k, _)| k != "DATABASE_URL")
        .collect();
    env.push((
        "DATABASE_URL_FILE".into(),
        secret_file.display().to_string(),
    ));
    env.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
    env.push(("LOG_FORMAT".into(), "json".into()));
    env.push(("LOG_LEVEL".into(), "debug".into()));
    let mut gw = ServiceProcess::spawn(bin(), &[], &env);
    let http = reqwest::Client::new();
    wait_ready(
        &http,
        &format!("http://127.0.0.1:{port}/readyz"),
        Duration::from_secs(20),
    )
    .await;
    gw.signal("TERM");
    let status = tokio::task::block_in_place(|| gw.wait(Duration::from_secs(10))).unwrap();
    assert_eq!(status.code(), Some(0));

    let log = gw.stderr();
    assert!(!log.contains("sekrit-pw"), "the password was logged: {log}");
    let mut lines = 0;
    for line in log.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            value["level"].is_string() && value["timestamp"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines >= 2, "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn uuid_like() -> String {
    format!("{}-{:?}", std::process::id(), std::time::SystemTime::now())
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect()
}

/// Forwards one HTTP exchange to `upstream` and throws the answer away: the answer is lost on
/// the way, as when the gateway dies after its script ran. Returns once the upstream answered.
async fn lose_the_answer(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.unwrap();
        let mut request = vec![0u8; 64 * 1024];
        let n = client.read(&mut request).await.unwrap();
        let mut server = tokio::net::TcpStream::connect(upstream).await.unwrap();
        server.write_all(&request[..n]).await.unwrap();
        let mut answer = vec![0u8; 64 * 1024];
        let got = server.read(&mut answer).await.unwrap();
        assert!(got > 0, "the gateway answered");
        drop(client); // the agent never sees it
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_whose_answer_was_lost_is_recovered_by_its_request_id_or_after_the_ttl() {
    use checkplane_core::keys::Keys;
    use checkplane_core::leases::{LeaseSettings, Leases};
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let port = free_port();
    let mut env = store_env(&db, &redis);
    env.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
    env.push((
        "GATEWAY_ENROLLMENT_TOKEN".into(),
        "enroll-secret-0123456789".into(),
    ));
    env.push(("LEASE_TTL".into(), "500ms".into()));
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut first = ServiceProcess::spawn(bin(), &[], &env);
    wait_ready(&http, &format!("{base}/readyz"), Duration::from_secs(20)).await;
    let (id, token) = checkplane_testkit::register_agent(
        &http,
        &base,
        "enroll-secret-0123456789",
        &serde_json::json!({"hostname": "unlucky", "capabilities": {"dns": 2}}),
    )
    .await;
    let leases = Leases::new(
        Keys::new(redis.prefix.clone(), 4),
        LeaseSettings::new(500, 5),
    );
    let mut conn = redis.connection().await;
    leases.enqueue(&mut conn, &id, "dns", "{}").await.unwrap();
    leases.enqueue(&mut conn, &id, "dns", "{}").await.unwrap();

    // The claim runs its script; the answer is lost and the gateway dies.
    let (proxy, forwarded) =
        lose_the_answer(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
    let claim = serde_json::json!({"capacities": {"dns": 2}, "request_id": "lost-1"});
    let lost = http
        .post(format!("http://{proxy}/v1/agents/claim"))
        .header("x-agent-id", &id)
        .header("x-agent-token", &token)
        .json(&claim)
        .send()
        .await;
    assert!(lost.is_err(), "the agent got no answer");
    forwarded.await.unwrap();
    first.signal("KILL");
    first.wait(Duration::from_secs(5)).unwrap();

    let _second = ServiceProcess::spawn(bin(), &[], &env);
    wait_ready(&http, &format!("{base}/readyz"), Duration::from_secs(20)).await;
    let call = |body: serde_json::Value| {
        let (http, id, token, url) = (
            http.clone(),
            id.clone(),
            token.clone(),
            format!("{base}/v1/agents/claim"),
        );
        async move {
            http.post(url)
                .header("x-agent-id", id)
                .header("x-agent-token", token)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    // The retry with the same request_id gets the very leases at once.
    let retried = call(claim.clone()).await;
    let tokens: Vec<String> = retried["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["token"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tokens.len(), 2, "{retried}");
    assert!(tokens.iter().all(|t| t.ends_with(".1")), "{tokens:?}");
    // An agent that lost its request id gets them back after the lease TTL, at epoch 2.
    let back = checkplane_testkit::eventually("leases back after the TTL", Duration::from_secs(10), || {
        let call = &call;
        async move {
            let body = call(serde_json::json!({"capacities": {"dns": 2}, "request_id": uuid::Uuid::new_v4().simple().to_string()})).await;
            let got: Vec<String> = body["leases"].as_array()?.iter().filter_map(|l| l["token"].as_str().map(str::to_owned)).collect();
            (got.len() == 2).then_some(got)
        }
    })
    .await;
    assert!(back.iter().all(|t| t.ends_with(".2")), "{back:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_made_on_the_command_line_work_until_revoked() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let env = store_env(&db, &redis);
    let run = |args: &[&str]| run_to_end(bin(), args, &env, Duration::from_secs(30));

    let out = run(&["keys", "create", "--role", "operator", "--name", "ci-bot"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("cpk_"), "the key alone on stdout: {key}");
    assert!(!stderr.contains(&key), "the key is printed once");
    let key_id = checkplane_wire::operators::key_id_of(&key)
        .unwrap()
        .to_owned();

    let port = free_port();
    let mut server_env = env.clone();
    server_env.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
    server_env.push(("GATEWAY_AUTH_CACHE_TTL".into(), "0s".into()));
    let mut server = ServiceProcess::spawn(bin(), &[], &server_env);
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&http, &format!("{base}/readyz"), Duration::from_secs(30)).await;
    let agents = |key: String| {
        let http = http.clone();
        let url = format!("{base}/v1/agents");
        async move {
            http.get(url)
                .header("x-api-key", key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(agents(key.clone()).await, 200);

    let out = run(&["keys", "list"]);
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        listing.contains(&key_id) && listing.contains("ci-bot") && listing.contains("operator")
    );
    assert!(!listing.contains(&key), "{listing}");

    let out = run(&["keys", "revoke", &key_id]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        agents(key.clone()).await,
        401,
        "revoked on the command line"
    );

    assert_eq!(
        run(&["keys", "create", "--role", "root", "--name", "x"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        run(&["keys", "create", "--role", "admin", "--name", "a b"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(run(&["keys", "revoke", "../etc"]).status.code(), Some(2));
    let out = run(&["keys", "revoke", "aaaaaaaaaaaa"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such key"));

    server.signal("TERM");
    assert!(server.wait(Duration::from_secs(10)).is_some());
    // The scheduler's outbox sweep publishes what the command line recorded.
    let outbox: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outbox, 2, "key.created and key.revoked wait for the sweep");
}

/// `gateway healthcheck` against the running gateway: OK; DEGRADED while its rate limiter has
/// just counted in memory (Redis paused for writes: the limiter's script hung, `PING` still
/// answered); DOWN with Redis gone, and DOWN with the gateway gone.
#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_says_ok_degraded_and_down() {
    use checkplane_testkit::process::{healthcheck, healthcheck_until, private_store_env};
    let db = TestDb::new().await;
    let mut redis = checkplane_testkit::servers::RedisServer::start();
    let port = free_port();
    let mut env = private_store_env(&db, &redis.url(), port);
    env.push((
        "GATEWAY_ENROLLMENT_TOKEN".into(),
        "enroll-0123456789abcdef".into(),
    ));
    let gateway = ServiceProcess::spawn(bin(), &[], &env);
    let http = reqwest::Client::new();
    wait_ready(
        &http,
        &format!("http://127.0.0.1:{port}/readyz"),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        healthcheck(bin(), &env),
        (Some(0), "gateway: OK".to_owned())
    );

    let admin = redis::Client::open(redis.url()).unwrap();
    let mut conn = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A failed enrollment is counted by the limiter: its script waits on the pause.
    let refused = http
        .post(format!("http://127.0.0.1:{port}/v1/agents/register"))
        .header("x-enrollment-token", "wrong-token-0123456789")
        .json(&serde_json::json!({"hostname": "h", "capabilities": {"ping": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let (code, line) = healthcheck(bin(), &env);
    assert_eq!(code, Some(1), "{line}");
    assert!(
        line.starts_with("gateway: DEGRADED: rate limiter: counted in memory"),
        "{line}"
    );

    redis.stop();
    let line = healthcheck_until(bin(), &env, 2, Duration::from_secs(15)).await;
    assert!(line.starts_with("gateway: DOWN: redis: "), "{line}");

    drop(gateway);
    let (code, line) = healthcheck(bin(), &env);
    assert_eq!(code, Some(2));
    assert!(
        line.starts_with(&format!("gateway: DOWN: not answering at 127.0.0.1:{port}")),
        "{line}"
    );
}
