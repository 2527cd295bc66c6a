//! Black-box tests of the agent process and its health port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod checks;
mod dns;
mod dns_proxy;
mod http;
mod ping;
mod relay;
mod trace;

use std::path::Path;
use std::time::Duration;

use checkplane_runtime::Env;
use checkplane_testkit::process::{assert_bad_config_exits_78, assert_sigterm_exits_0, free_port};
use checkplane_testkit::{eventually, store_env, Running, TestDb, TestRedis};

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_agent"))
}

/// A fresh folder for an agent's state file, removed when dropped.
pub struct StateDir(pub std::path::PathBuf);

impl Default for StateDir {
    fn default() -> Self {
        let dir = std::env::temp_dir().join(format!("cp-agent-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl StateDir {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn file(&self) -> String {
        self.0.join("state.json").display().to_string()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub const ENROLL: &str = "agent-test-enrollment-0123";

async fn start_gateway(db: &TestDb, redis: &TestRedis) -> Running<checkplane_runtime::RunError> {
    let config = gateway::load(&mut Env::from_pairs(store_env(db, redis))).unwrap();
    let gw = Running::start(|l, s| gateway::run(config, l, s)).await;
    gw.wait_ready(Duration::from_secs(10)).await;
    gw
}

#[tokio::test]
async fn ready_only_while_the_control_plane_answers() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gw = start_gateway(&db, &redis).await;
    let state = StateDir::new();
    let config = agent::load(&mut Env::from_pairs([
        ("AGENT_CONTROL_PLANE", gw.url("/")),
        ("AGENT_ALLOW_PLAINTEXT", "true".to_owned()),
        ("AGENT_ENROLLMENT_TOKEN", ENROLL.to_owned()),
        ("AGENT_STATE_FILE", state.file()),
        ("HTTP_HEADER_TIMEOUT", "300ms".to_owned()),
    ]))
    .unwrap();
    let agent = Running::start(|l, s| agent::run(config, l, s)).await;
    agent.wait_ready(Duration::from_secs(10)).await;
    // The health port has the listener limits of every service.
    checkplane_testkit::raw::assert_listener_limits(agent.addr).await;

    gw.stop().await.unwrap();
    let body = eventually(
        "agent 503 naming the control plane",
        Duration::from_secs(5),
        || async {
            let (status, body) = agent.get_json("/readyz").await;
            (status == 503).then_some(body)
        },
    )
    .await;
    assert_eq!(
        body["failed"],
        serde_json::json!(["control_plane"]),
        "{body}"
    );
    agent.stop().await.unwrap();
}

#[test]
fn bad_configuration_exits_78_naming_the_variable() {
    let state = StateDir::new();
    let env = vec![
        (
            "AGENT_CONTROL_PLANE".to_owned(),
            "http://127.0.0.1:1".to_owned(),
        ),
        ("AGENT_ALLOW_PLAINTEXT".to_owned(), "true".to_owned()),
        (
            "AGENT_HEALTH_ADDR".to_owned(),
            format!("127.0.0.1:{}", free_port()),
        ),
        ("AGENT_ENROLLMENT_TOKEN".to_owned(), ENROLL.to_owned()),
        ("AGENT_STATE_FILE".to_owned(), state.file()),
    ];
    assert_bad_config_exits_78(bin(), &env);

    // No way to an identity: no id, no enrollment token, no state file.
    let mut bare = env.clone();
    bare.retain(|(k, _)| k != "AGENT_ENROLLMENT_TOKEN");
    let out = checkplane_testkit::process::run_to_end(bin(), &[], &bare, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AGENT_ENROLLMENT_TOKEN"));

    // Every pool at 0: nothing to run.
    let mut idle = env.clone();
    for kind in ["DNS", "HTTP", "TCP", "PING", "TRACE"] {
        idle.push((format!("AGENT_POOL_{kind}_SIZE"), "0".to_owned()));
    }
    let out = checkplane_testkit::process::run_to_end(bin(), &[], &idle, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AGENT_POOL_"));

    for (var, value) in [
        ("AGENT_CONTROL_PLANE", "ftp://x"),
        ("AGENT_CONTROL_PLANE", "not a url"),
        ("AGENT_HEALTH_ADDR", "localhost"),
        ("AGENT_POOL_TCP_SIZE", "1025"),
        ("AGENT_POOL_DNS_SIZE", "-1"),
        ("AGENT_MAX_INFLIGHT", "0"),
        ("AGENT_TRACE_RUNTIME_WORKERS", "0"),
        ("AGENT_DNS_LISTEN", "port 53"),
        // Proxy settings without the proxy.
        ("AGENT_DNS_UPSTREAM", "9.9.9.9"),
        ("AGENT_DNS_ALLOW_FROM", "10.0.0.0/8"),
        ("AGENT_ALLOW_PRIVATE_TARGETS", "perhaps"),
        ("AGENT_ALLOW_PLAINTEXT", "perhaps"),
        ("AGENT_CA_FILE", "/nonexistent/ca.pem"),
        ("LOG_FILE", "agent.log"),
        ("LOG_FILE", "/nonexistent/dir/agent.log"),
        ("LOG_FILE", "/tmp"),
        // A file that is not PEM.
        ("AGENT_CA_FILE", "/etc/hostname"),
        // An id without its token.
        ("AGENT_AUTH_TOKEN", "AGENT_ID"),
    ] {
        let mut env = env.clone();
        env.retain(|(k, _)| k != var);
        if value == "AGENT_ID" {
            env.push(("AGENT_ID".to_owned(), "agt-0123".to_owned()));
        } else {
            env.push((var.to_owned(), value.to_owned()));
        }
        let out =
            checkplane_testkit::process::run_to_end(bin(), &[], &env, Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(78), "{var}={value}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(var));
    }

    // A DNS proxy on the network must say whom it answers; and say it right.
    for (listen, allow) in [
        (format!("0.0.0.0:{}", free_port()), None),
        (format!("[::]:{}", free_port()), None),
        (format!("127.0.0.1:{}", free_port()), Some("everyone")),
        (format!("127.0.0.1:{}", free_port()), Some(" , ")),
    ] {
        let mut open = env.clone();
        open.push(("AGENT_DNS_LISTEN".to_owned(), listen.clone()));
        open.push(("AGENT_DNS_UPSTREAM".to_owned(), "192.0.2.53".to_owned()));
        if let Some(allow) = allow {
            open.push(("AGENT_DNS_ALLOW_FROM".to_owned(), allow.to_owned()));
        }
        let out =
            checkplane_testkit::process::run_to_end(bin(), &[], &open, Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(78), "{listen} {allow:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("AGENT_DNS_ALLOW_FROM"), "{stderr}");
    }

    // A plain http:// control plane without AGENT_ALLOW_PLAINTEXT: the token would cross
    // the network in clear.
    let mut plain = env.clone();
    plain.retain(|(k, _)| k != "AGENT_ALLOW_PLAINTEXT");
    let out = checkplane_testkit::process::run_to_end(bin(), &[], &plain, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("AGENT_CONTROL_PLANE") && stderr.contains("AGENT_ALLOW_PLAINTEXT"),
        "{stderr}"
    );
}

/// The agent binary's environment against the in-process gateway `gw`, its health port `port`.
fn process_env(
    gw: &Running<checkplane_runtime::RunError>,
    state: &StateDir,
    port: u16,
) -> Vec<(String, String)> {
    vec![
        ("AGENT_CONTROL_PLANE".to_owned(), gw.url("/")),
        ("AGENT_ALLOW_PLAINTEXT".to_owned(), "true".to_owned()),
        ("AGENT_ENROLLMENT_TOKEN".to_owned(), ENROLL.to_owned()),
        ("AGENT_STATE_FILE".to_owned(), state.file()),
        ("AGENT_HEALTH_ADDR".to_owned(), format!("127.0.0.1:{port}")),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_0_within_the_bound() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gw = start_gateway(&db, &redis).await;
    let port = free_port();
    let state = StateDir::new();
    let mut env = process_env(&gw, &state, port);
    env.push(("SHUTDOWN_TIMEOUT".to_owned(), "3s".to_owned()));
    let url = format!("http://127.0.0.1:{port}/readyz");
    assert_sigterm_exits_0(bin(), &env, &url, Duration::from_secs(3)).await;
    gw.stop().await.unwrap();
}

/// A gateway in-process terminating TLS with a certificate of `ca` (files under `dir`).
async fn tls_gateway(
    db: &TestDb,
    redis: &TestRedis,
    ca: &checkplane_testkit::tls::Ca,
    dir: &Path,
) -> Running<checkplane_runtime::RunError> {
    let (cert, key) = ca.write_server(dir, "gateway");
    let mut env = store_env(db, redis);
    env.extend([
        ("GATEWAY_ENROLLMENT_TOKEN".to_owned(), ENROLL.to_owned()),
        (
            "GATEWAY_TLS_CERT_FILE".to_owned(),
            cert.display().to_string(),
        ),
        ("GATEWAY_TLS_KEY_FILE".to_owned(), key.display().to_string()),
    ]);
    let config = gateway::load(&mut Env::from_pairs(env)).unwrap();
    let gw = Running::start(|l, s| gateway::run(config, l, s)).await;
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    let ready = format!("https://127.0.0.1:{}/readyz", gw.addr.port());
    eventually(
        "the gateway ready over TLS",
        Duration::from_secs(10),
        || async {
            let status = client.get(&ready).send().await.ok()?.status();
            status.is_success().then_some(())
        },
    )
    .await;
    gw
}

#[tokio::test]
async fn the_agent_reaches_an_https_control_plane_only_through_the_ca_it_trusts() {
    use checkplane_testkit::tls::Ca;
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let dir = checkplane_testkit::servers::scratch_dir("agent-tls");
    let (ours, theirs) = (Ca::new("our CA"), Ca::new("someone else's CA"));
    let gw = tls_gateway(&db, &redis, &ours, &dir).await;
    let https = format!("https://127.0.0.1:{}/", gw.addr.port());
    let start = |ca_file: std::path::PathBuf, state: &StateDir| {
        let config = agent::load(&mut Env::from_pairs([
            ("AGENT_CONTROL_PLANE", https.clone()),
            ("AGENT_CA_FILE", ca_file.display().to_string()),
            ("AGENT_ENROLLMENT_TOKEN", ENROLL.to_owned()),
            ("AGENT_STATE_FILE", state.file()),
            ("AGENT_HOSTNAME", "probe-tls".to_owned()),
        ]))
        .unwrap();
        Running::start(|l, s| agent::run(config, l, s))
    };

    // Trusting another CA: the handshake fails, so it is not ready and never registers.
    let state = StateDir::new();
    let stranger = start(theirs.write(&dir, "theirs.pem"), &state).await;
    let body = eventually(
        "not ready: the control plane",
        Duration::from_secs(10),
        || async {
            let (status, body) = stranger.get_json("/readyz").await;
            (status == 503).then_some(body)
        },
    )
    .await;
    assert_eq!(
        body["failed"],
        serde_json::json!(["control_plane"]),
        "{body}"
    );
    stranger.stop().await.unwrap();
    let pg = db.client().await;
    let registered = || async {
        pg.query_one("SELECT count(*) FROM agents", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(registered().await, 0);

    // Trusting ours: ready, registered over TLS.
    let state = StateDir::new();
    let agent = start(ours.write(&dir, "ours.pem"), &state).await;
    agent.wait_ready(Duration::from_secs(10)).await;
    eventually("registered", Duration::from_secs(10), || async {
        (registered().await == 1).then_some(())
    })
    .await;
    agent.stop().await.unwrap();
    gw.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The deployment's logrotate template (`infra/ansible`) rendered for this test: logs under
/// `dir`, owned by root (the tests run as root; deployed, the service user), and a postrotate
/// that signals `pid` (deployed, it signals the checkplane-* units through systemd).
fn logrotate_config(dir: &Path, pid: u32) -> String {
    let shipped = std::fs::read_to_string(
        checkplane_testkit::workspace_root()
            .join("infra/ansible/roles/checkplane_service/templates/checkplane.logrotate.j2"),
    )
    .unwrap();
    let rendered = shipped
        .replace("{{ ansible_managed }}", "rendered by the test")
        .replace("{{ checkplane_service_log_dir }}", &dir.display().to_string())
        .replace("{{ checkplane_service_user }}", "root")
        .replace(
            "systemctl kill --kill-whom=main --signal=HUP 'checkplane-*.service' 2>/dev/null || true",
            &format!("kill -HUP {pid}"),
        );
    assert!(!rendered.contains("{{"), "{rendered}");
    assert!(rendered.contains(&format!("kill -HUP {pid}")), "{rendered}");
    rendered
}

#[tokio::test(flavor = "multi_thread")]
async fn logrotate_rotates_log_file_and_the_service_writes_on_to_a_new_one() {
    use checkplane_testkit::process::ServiceProcess;
    let dir = checkplane_testkit::servers::scratch_dir("logs");
    let log = dir.join("agent.log");
    let state = StateDir::new();
    let port = free_port();
    let env = vec![
        // Nobody answers there: the agent logs its attempts, which is all this needs.
        (
            "AGENT_CONTROL_PLANE".to_owned(),
            "http://127.0.0.1:1/".to_owned(),
        ),
        ("AGENT_ALLOW_PLAINTEXT".to_owned(), "true".to_owned()),
        ("AGENT_ENROLLMENT_TOKEN".to_owned(), ENROLL.to_owned()),
        ("AGENT_STATE_FILE".to_owned(), state.file()),
        ("AGENT_HEALTH_ADDR".to_owned(), format!("127.0.0.1:{port}")),
        ("LOG_FILE".to_owned(), log.display().to_string()),
    ];
    let mut agent = ServiceProcess::spawn(bin(), &[], &env);
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    checkplane_testkit::eventually(
        "the agent logs to LOG_FILE",
        Duration::from_secs(10),
        || {
            let text = read(&log);
            async move { text.contains("starting").then_some(()) }
        },
    )
    .await;
    assert_eq!(agent.stderr(), "", "nothing on stderr with LOG_FILE");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);

    let config = dir.join("logrotate.conf");
    std::fs::write(&config, logrotate_config(&dir, agent.pid())).unwrap();
    let status = dir.join("logrotate.status");
    let logrotate = |args: &[&str]| {
        std::process::Command::new("logrotate")
            .args(args)
            .arg("-s")
            .arg(&status)
            .arg(&config)
            .output()
            .expect("logrotate (./stand test installs it)")
    };
    // The configuration as logrotate reads it (dry run), then a forced rotation.
    let dry = logrotate(&["-d"]);
    assert!(dry.status.success(), "{dry:?}");
    let rotated = logrotate(&["-f"]);
    assert!(rotated.status.success(), "{rotated:?}");
    let old: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("agent.log-"))
        .collect();
    assert_eq!(
        old.len(),
        1,
        "dateext, not compressed yet (delaycompress): {old:?}"
    );
    assert!(read(&dir.join(&old[0])).contains("starting"));
    // The signal made the agent open agent.log again: it writes on there, alive.
    checkplane_testkit::eventually("lines in the new file", Duration::from_secs(10), || {
        let text = read(&log);
        async move { text.contains("log file reopened").then_some(()) }
    })
    .await;
    assert!(
        agent.wait(Duration::from_millis(200)).is_none(),
        "SIGHUP did not stop it"
    );
    agent.signal("TERM");
    assert_eq!(
        agent.wait(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0)
    );
    assert!(read(&log).contains("shutting down"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `agent healthcheck` against the running agent: OK with its control plane; DEGRADED while
/// the control plane is gone (checks in hand still finish, reports wait); DOWN with the agent
/// gone.
#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_says_ok_degraded_and_down() {
    use checkplane_testkit::process::{healthcheck, healthcheck_until, ServiceProcess};
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gw = start_gateway(&db, &redis).await;
    let port = free_port();
    let state = StateDir::new();
    let mut env = process_env(&gw, &state, port);
    env.push(("READY_TIMEOUT".to_owned(), "1s".to_owned()));
    let agent = ServiceProcess::spawn(bin(), &[], &env);
    let line = healthcheck_until(bin(), &env, 0, Duration::from_secs(30)).await;
    assert_eq!(line, "agent: OK");

    gw.stop().await.unwrap();
    let line = healthcheck_until(bin(), &env, 1, Duration::from_secs(15)).await;
    assert!(
        line.starts_with("agent: DEGRADED: control_plane: "),
        "{line}"
    );

    drop(agent);
    let (code, line) = healthcheck(bin(), &env);
    assert_eq!(code, Some(2));
    assert!(
        line.starts_with(&format!("agent: DOWN: not answering at 127.0.0.1:{port}")),
        "{line}"
    );
}
