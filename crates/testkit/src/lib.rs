//! Test support for every checkplane crate.
//!
//! - [`deps`]: the private PostgreSQL, Redis and HAProxy shared by the test run. `./stand test`
//!   starts them under `.stand/test`; a plain `cargo nextest run` starts them the same way on
//!   first use (the stand script is the one place that knows how), so tests never depend on
//!   variables exported by a wrapper.
//! - [`TestDb`]: a fresh database per test, cloned from a migrated template, dropped afterwards.
//! - [`TestRedis`]: a unique key prefix per test; its keys are deleted afterwards.
//! - [`servers`]: PostgreSQL and Redis servers owned by one test, for tests that stop them.
//! - [`dns`]: an unbound of the test's own serving `example.test`.
//! - [`haproxy`]: a real HAProxy of the test's own, with its Runtime API and master CLI.
//! - [`netns`]: network namespaces joined by veth pairs, for hosts and routers on one machine.
//! - [`Running`]: a service started in-process on port 0, with readiness polled to a deadline.
//! - [`raw`]: HTTP bytes on a socket, as a hostile client sends them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod dns;
pub mod events;
pub mod geo;
pub mod haproxy;
pub mod netns;
pub mod process;
pub mod raw;
pub mod servers;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The workspace root (where `stand` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("testkit lives two levels below the workspace root")
        .to_path_buf()
}

/// Where the shared test dependencies are.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Admin URL of the private PostgreSQL (database `postgres`).
    pub pg_url: String,
    /// URL of the private Redis.
    pub redis_url: String,
    /// HAProxy's admin Runtime API over TCP.
    pub haproxy_stats: SocketAddr,
    /// HAProxy's admin Runtime API socket.
    pub haproxy_admin_socket: PathBuf,
    /// HAProxy's operator-level Runtime API socket.
    pub haproxy_operator_socket: PathBuf,
    /// HAProxy's master CLI socket.
    pub haproxy_master_socket: PathBuf,
}

fn read_deps(file: &Path) -> Option<Deps> {
    let text = std::fs::read_to_string(file).ok()?;
    let map: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    Some(Deps {
        pg_url: map.get("PG_URL")?.to_string(),
        redis_url: map.get("REDIS_URL")?.to_string(),
        haproxy_stats: map.get("HAPROXY_STATS")?.parse().ok()?,
        haproxy_admin_socket: map.get("HAPROXY_ADMIN_SOCKET")?.into(),
        haproxy_operator_socket: map.get("HAPROXY_OPERATOR_SOCKET")?.into(),
        haproxy_master_socket: map.get("HAPROXY_MASTER_SOCKET")?.into(),
    })
}

fn port_open(url: &str) -> bool {
    let Some(rest) = url.split("://").nth(1) else {
        return false;
    };
    let hostport = rest
        .rsplit_once('@')
        .map_or(rest, |(_, h)| h)
        .split('/')
        .next()
        .unwrap_or_default();
    hostport
        .parse::<SocketAddr>()
        .ok()
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}

/// The shared private dependencies of this test run, started on first use.
pub fn deps() -> &'static Deps {
    static DEPS: OnceLock<Deps> = OnceLock::new();
    DEPS.get_or_init(|| {
        let root = workspace_root();
        let file = root.join(".stand/test/deps.env");
        if let Some(deps) = read_deps(&file) {
            if port_open(&deps.pg_url) && port_open(&deps.redis_url) {
                return deps;
            }
        }
        let status = std::process::Command::new(root.join("stand"))
            .args(["deps", "up", "test"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("running ./stand deps up test");
        assert!(status.success(), "./stand deps up test failed");
        read_deps(&file).expect(".stand/test/deps.env after ./stand deps up test")
    })
}

/// Run `f` on a fresh thread with its own runtime: cleanup from `Drop`, which may run inside
/// or outside a runtime, and during a panic.
fn block_on_side<F: Future<Output = ()> + Send + 'static>(f: F) {
    let _ = std::thread::spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(f),
            Err(e) => eprintln!("testkit cleanup: no runtime: {e}"),
        }
    })
    .join();
}

async fn admin_client(url: &str) -> tokio_postgres::Client {
    let config: tokio_postgres::Config = url.parse().expect("admin URL");
    checkplane_runtime::db::connect(&config)
        .await
        .expect("connecting to the test PostgreSQL")
}

fn with_dbname(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("URL with a database");
    format!("{base}/{db}")
}

/// The name of the migrated template for the current set of migrations.
fn template_name() -> String {
    // FNV-1a over the migrations' names and checksums: a new migration means a new template.
    let mut hash: u64 = 0xcbf29ce484222325;
    for byte in checkplane_runtime::db::embedded_migrations()
        .join("\n")
        .bytes()
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x100000001b3);
    }
    format!("cp_tpl_{hash:016x}")
}

/// Advisory lock key serialising template creation across test processes.
const TEMPLATE_LOCK: i64 = 0x63705f746d706c;

/// A database that belongs to one test, dropped when it goes out of scope.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub config: tokio_postgres::Config,
    admin_url: String,
}

impl TestDb {
    /// A fresh, migrated database.
    pub async fn new() -> Self {
        Self::create(true).await
    }

    /// A fresh database with no schema at all (for migration tests).
    pub async fn empty() -> Self {
        Self::create(false).await
    }

    async fn create(migrated: bool) -> Self {
        let admin_url = deps().pg_url.clone();
        let admin = admin_client(&admin_url).await;
        let name = format!("cp_test_{}", uuid::Uuid::new_v4().simple());
        if migrated {
            let template = ensure_template(&admin, &admin_url).await;
            admin
                .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
                .await
                .expect("cloning the template");
        } else {
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("creating an empty database");
        }
        let url = with_dbname(&admin_url, &name);
        Self {
            config: url.parse().expect("test database URL"),
            name,
            url,
            admin_url,
        }
    }

    /// A connection of the test's own.
    pub async fn client(&self) -> tokio_postgres::Client {
        checkplane_runtime::db::connect(&self.config)
            .await
            .expect("connecting to the test database")
    }
}

async fn ensure_template(admin: &tokio_postgres::Client, admin_url: &str) -> String {
    let template = template_name();
    admin
        .execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK])
        .await
        .expect("template lock");
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
        .await
        .expect("looking up the template")
        .is_some();
    if !exists {
        let building = format!("{template}_building");
        for statement in [
            format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"),
            format!("CREATE DATABASE {building}"),
        ] {
            admin
                .batch_execute(&statement)
                .await
                .expect("creating the template");
        }
        {
            let config: tokio_postgres::Config = with_dbname(admin_url, &building)
                .parse()
                .expect("template URL");
            let mut client = checkplane_runtime::db::connect(&config)
                .await
                .expect("connecting to the template");
            checkplane_runtime::db::migrate_with(&mut client)
                .await
                .expect("migrating the template");
        }
        // The migration connection closes asynchronously: retry the rename until it is gone.
        let mut tries = 0;
        while let Err(e) = admin
            .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {template}"))
            .await
        {
            tries += 1;
            assert!(tries < 100, "renaming the template: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        admin
            .batch_execute(&format!("ALTER DATABASE {template} WITH IS_TEMPLATE true"))
            .await
            .expect("marking the template");
    }
    admin
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK])
        .await
        .expect("template unlock");
    template
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        block_on_side(async move {
            let admin = admin_client(&admin_url).await;
            if let Err(e) = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
            {
                eprintln!("testkit: dropping {name}: {e}");
            }
        });
    }
}

/// A Redis key prefix that belongs to one test; its keys are deleted when it goes out of scope.
pub struct TestRedis {
    pub prefix: String,
    pub url: String,
}

impl TestRedis {
    pub fn new() -> Self {
        Self {
            prefix: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            url: deps().redis_url.clone(),
        }
    }

    /// A connection of the test's own.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .expect("redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connecting to the test Redis")
    }
}

impl Default for TestRedis {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let url = self.url.clone();
        let pattern = format!("{}:*", self.prefix);
        block_on_side(async move {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                return;
            };
            let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                return;
            };
            let mut cursor: u64 = 0;
            loop {
                let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                else {
                    return;
                };
                if !keys.is_empty() {
                    let _: redis::RedisResult<()> =
                        redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await;
                }
                if next == 0 {
                    return;
                }
                cursor = next;
            }
        });
    }
}

/// The environment a store-backed service needs to use `db` and `redis`.
pub fn store_env(db: &TestDb, redis: &TestRedis) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), db.url.clone()),
        ("REDIS_URL".into(), redis.url.clone()),
        ("STREAM_PREFIX".into(), redis.prefix.clone()),
        ("DATABASE_POOL_SIZE".into(), "4".into()),
        ("REDIS_POOL_SIZE".into(), "4".into()),
        // The test HAProxies' sockets are in scratch directories under the temp dir.
        ("HAPROXY_ALLOWED_ADDRESSES".into(), haproxy_allowed()),
    ]
}

/// Loopback and the temp directory (resolved): where the tests' HAProxies listen.
pub fn haproxy_allowed() -> String {
    let temp = std::env::temp_dir();
    let temp = std::fs::canonicalize(&temp).unwrap_or(temp);
    format!(
        "127.0.0.0/8,::1/128,{}",
        temp.display().to_string().trim_end_matches('/')
    )
}

/// Poll `probe` every 25 ms until it returns `Some`, or panic after `within` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A service running in-process on an ephemeral port.
pub struct Running<E> {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    handle: JoinHandle<Result<(), E>>,
    http: reqwest::Client,
}

impl<E: Send + 'static> Running<E> {
    /// Bind 127.0.0.1:0 and spawn `run(listener, shutdown)`.
    pub async fn start<F, Fut>(run: F) -> Self
    where
        F: FnOnce(TcpListener, CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind :0");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(run(listener, shutdown.clone()));
        Self {
            addr,
            shutdown,
            handle,
            http: reqwest::Client::new(),
        }
    }

    /// `http://addr/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// GET `path`: status and body as JSON (`Null` when the body is not JSON).
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        get_json(&self.http, &self.url(path)).await
    }

    /// Wait until `/readyz` answers 200.
    pub async fn wait_ready(&self, within: Duration) {
        let url = self.url("/readyz");
        let http = self.http.clone();
        wait_ready(&http, &url, within).await;
    }

    /// Fire shutdown and wait for the service to return.
    pub async fn stop(self) -> Result<(), E> {
        self.shutdown.cancel();
        self.handle.await.expect("service task panicked")
    }
}

/// GET `url`: status and body as JSON (`Null` when the body is not JSON, 0 when unreachable).
pub async fn get_json(http: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    match http.get(url).timeout(Duration::from_secs(5)).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.json().await.unwrap_or(serde_json::Value::Null);
            (status, body)
        }
        Err(_) => (0, serde_json::Value::Null),
    }
}

/// Poll `url` until it answers 200, or panic with the last answer.
pub async fn wait_ready(http: &reqwest::Client, url: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = get_json(http, url).await;
        if status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} not ready within {within:?}: last answer {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A service's `/metrics` text (`metrics_url`: the full URL), which must answer 200.
pub async fn metrics_text(metrics_url: &str) -> String {
    let response = reqwest::get(metrics_url).await.expect("GET /metrics");
    assert_eq!(response.status().as_u16(), 200, "{metrics_url}");
    response.text().await.expect("the metrics text")
}

/// The value of the series `name` at `metrics_url` (0 while it was never counted).
pub async fn metric(metrics_url: &str, name: &str) -> f64 {
    metric_in(&metrics_text(metrics_url).await, name)
}

/// The value of the series `name` in a metrics text: a bare name, or one with its labels as
/// the exporter writes them (`http_connections_closed_total{reason="evicted"}`); 0 when absent.
pub fn metric_in(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// POST `body` to `url` as an agent (`X-Agent-Id` + `X-Agent-Token`): status and JSON body.
pub async fn agent_post(
    http: &reqwest::Client,
    url: &str,
    id: &str,
    token: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = http
        .post(url)
        .header("x-agent-id", id)
        .header("x-agent-token", token)
        .json(body)
        .send()
        .await
        .expect("agent call");
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// Register an agent through the gateway at `base` (`http://host:port`): (agent id, token).
pub async fn register_agent(
    http: &reqwest::Client,
    base: &str,
    enrollment: &str,
    body: &serde_json::Value,
) -> (String, String) {
    register_as(http, base, enrollment, body, None).await
}

/// Register a known host again, proving it with its agent's current `token`: (agent id, the
/// new token).
pub async fn reregister_agent(
    http: &reqwest::Client,
    base: &str,
    enrollment: &str,
    body: &serde_json::Value,
    token: &str,
) -> (String, String) {
    register_as(http, base, enrollment, body, Some(token)).await
}

async fn register_as(
    http: &reqwest::Client,
    base: &str,
    enrollment: &str,
    body: &serde_json::Value,
    token: Option<&str>,
) -> (String, String) {
    let mut request = http.post(format!("{base}/v1/agents/register"));
    if let Some(token) = token {
        request = request.header("x-agent-token", token);
    }
    let response = request
        .header("x-enrollment-token", enrollment)
        .json(body)
        .send()
        .await
        .expect("register");
    assert!(
        response.status().is_success(),
        "register: {}",
        response.status()
    );
    let reply: serde_json::Value = response.json().await.expect("register reply");
    (
        reply["agent_id"].as_str().expect("agent_id").to_owned(),
        reply["token"].as_str().expect("token").to_owned(),
    )
}
