//! The real agent against the real control plane: it registers (keeping its identity in its
//! state file), claims, runs tcp checks against loopback listeners, reports; the results land
//! in PostgreSQL. Restarted from its state file it is the same agent.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use checkplane_runtime::Env;
use checkplane_testkit::process::free_port;
use checkplane_testkit::{eventually, store_env, Running, TestDb, TestRedis};
use serde_json::{json, Value};

use crate::{StateDir, ENROLL};

const ADMIN: &str = "agent-test-admin-key-0123";

type Service = Running<checkplane_runtime::RunError>;

async fn start_agent(gw: &Service, state: &StateDir, extra: &[(&str, &str)]) -> Service {
    let mut env = vec![
        ("AGENT_CONTROL_PLANE".to_owned(), gw.url("/")),
        // The gateway is in this process, on loopback.
        ("AGENT_ALLOW_PLAINTEXT".to_owned(), "true".to_owned()),
        ("AGENT_STATE_FILE".to_owned(), state.file()),
        ("AGENT_HOSTNAME".to_owned(), "probe-e2e".to_owned()),
    ];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let config = agent::load(&mut Env::from_pairs(env)).unwrap();
    let agent = Running::start(|l, s| agent::run(config, l, s)).await;
    agent.wait_ready(Duration::from_secs(10)).await;
    agent
}

async fn create(http: &reqwest::Client, gw: &Service, body: Value) -> String {
    let response = http
        .post(gw.url("/v1/checks"))
        .header("x-api-key", ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    response.headers()["location"].to_str().unwrap().to_owned()
}

async fn finished(http: &reqwest::Client, gw: &Service, location: &str) -> Value {
    eventually("the check finishes", Duration::from_secs(20), || async {
        let check: Value = http
            .get(gw.url(location))
            .header("x-api-key", ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (check["status"] == "finished").then_some(check)
    })
    .await
}

/// Gateway and scheduler in-process, with the agents' enrollment token and loopback targets.
async fn control_plane(gateway_env: &[(&str, &str)]) -> (TestDb, TestRedis, Service, Service) {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut env = store_env(&db, &redis);
    for (k, v) in [
        ("GATEWAY_ENROLLMENT_TOKEN", ENROLL),
        ("GATEWAY_ADMIN_KEY", ADMIN),
        ("GATEWAY_ALLOW_PRIVATE_TARGETS", "true"),
    ]
    .iter()
    .chain(gateway_env)
    {
        env.push(((*k).to_owned(), (*v).to_owned()));
    }
    let gw_config = gateway::load(&mut Env::from_pairs(env)).unwrap();
    let gw = Running::start(|l, s| gateway::run(gw_config, l, s)).await;
    gw.wait_ready(Duration::from_secs(10)).await;
    let sched_config = scheduler::load(&mut Env::from_pairs(store_env(&db, &redis))).unwrap();
    let sched = Running::start(|l, s| scheduler::run(sched_config, l, s)).await;
    sched.wait_ready(Duration::from_secs(10)).await;
    (db, redis, gw, sched)
}

/// A listener that never accepts, its queue full: a connect to it hangs until the test
/// takes what is queued.
async fn hanging_listener() -> (tokio::net::TcpListener, u16, Vec<std::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let port = listener.local_addr().unwrap().port();
    let fillers = (0..2)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    (listener, port, fillers)
}

/// The environment of an agent process.
fn process_env(gw: &Service, state: &StateDir, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("AGENT_CONTROL_PLANE", gw.url("/")),
        ("AGENT_ALLOW_PLAINTEXT", "true".to_owned()),
        ("AGENT_HEALTH_ADDR", format!("127.0.0.1:{}", free_port())),
        ("AGENT_STATE_FILE", state.file()),
        ("AGENT_ALLOW_PRIVATE_TARGETS", "true".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    env
}

async fn slot_status(http: &reqwest::Client, gw: &Service, location: &str) -> Value {
    let check: Value = http
        .get(gw.url(location))
        .header("x-api-key", ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    check["results"][0]["status"].clone()
}

/// An agent that registers with the enrollment token and may check loopback targets.
const ENROLLED: &[(&str, &str)] = &[
    ("AGENT_ENROLLMENT_TOKEN", ENROLL),
    ("AGENT_ALLOW_PRIVATE_TARGETS", "true"),
];

/// A loopback listener that accepts (and drops) every connection: its port.
async fn accepting_listener() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    port
}

/// A tcp check to 127.0.0.1:`port` on one agent, run to its end: the check and its slot.
async fn run_tcp(http: &reqwest::Client, gw: &Service, port: u16) -> (Value, Value) {
    let location = create(
        http,
        gw,
        json!({"kind": "tcp", "target": "127.0.0.1", "options": {"port": port}, "limit": 1}),
    )
    .await;
    let done = finished(http, gw, &location).await;
    let slot = done["results"][0].clone();
    (done, slot)
}

/// The id of the (only) agent once it is online.
async fn online_agent(pg: &tokio_postgres::Client) -> String {
    eventually("the agent is online", Duration::from_secs(15), || async {
        pg.query_opt("SELECT agent_id FROM agents WHERE status = 'online'", &[])
            .await
            .unwrap()
            .map(|r| r.get(0))
    })
    .await
}

/// A tcp check to `port` (a hanging listener's) once its agent has leased it: its location.
async fn leased_check(http: &reqwest::Client, gw: &Service, port: u16) -> String {
    let location = create(
        http,
        gw,
        json!({"kind": "tcp", "target": "127.0.0.1", "options": {"port": port},
               "limit": 1, "timeout_ms": 60000}),
    )
    .await;
    eventually(
        "the agent runs the check",
        Duration::from_secs(10),
        || async { (slot_status(http, gw, &location).await == "leased").then_some(()) },
    )
    .await;
    location
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_checks_run_on_a_real_agent_and_a_restart_keeps_its_identity() {
    let (db, _redis, gw, sched) = control_plane(&[]).await;

    // A target that accepts, and a port where nothing listens.
    let open = accepting_listener().await;
    let closed = free_port();

    let state = StateDir::new();
    let agent = start_agent(&gw, &state, ENROLLED).await;
    let pg = db.client().await;
    let agent_id: String = eventually("the agent is online", Duration::from_secs(15), || async {
        pg.query_opt(
            "SELECT agent_id FROM agents WHERE hostname = 'probe-e2e' AND status = 'online'",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
    })
    .await;
    // Its identity is kept, readable by its owner only.
    let meta = std::fs::metadata(state.file()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let kept: Value = serde_json::from_slice(&std::fs::read(state.file()).unwrap()).unwrap();
    assert_eq!(kept["agent_id"], agent_id.as_str());

    let http = reqwest::Client::new();
    let (done, slot) = run_tcp(&http, &gw, open).await;
    assert_eq!(slot["agent_id"], agent_id.as_str());
    assert_eq!(slot["outcome"], "finished", "{done}");
    let result = &slot["result"]["result"];
    assert_eq!(result["connected"], true, "{result}");
    assert_eq!(result["address"], "127.0.0.1");
    assert_eq!(result["port"], open);
    for timing in ["dns", "connect", "total"] {
        assert!(
            result["timings"][timing].as_f64().unwrap() >= 0.0,
            "{result}"
        );
    }

    let (done, slot) = run_tcp(&http, &gw, closed).await;
    assert_eq!(slot["outcome"], "failed", "{done}");
    assert_eq!(
        slot["result"]["result"]["error"]["code"], "ERR_CONNECTION_REFUSED",
        "{done}"
    );

    // What it did is on its metrics.
    let metrics = checkplane_testkit::metrics_text(&agent.url("/metrics")).await;
    let checks = |outcome: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("checkplane_agent_checks_total")
                    && l.contains("kind=\"tcp\"")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(
        (checks("finished"), checks("failed")),
        (Some(1.0), Some(1.0)),
        "{metrics}"
    );

    // Restarted with its state file alone (no enrollment token): the same agent. Without
    // AGENT_ALLOW_PRIVATE_TARGETS it refuses the loopback target the gateway let through.
    agent.stop().await.unwrap();
    let agent = start_agent(&gw, &state, &[]).await;
    let (done, slot) = run_tcp(&http, &gw, open).await;
    assert_eq!(slot["agent_id"], agent_id.as_str());
    assert_eq!(slot["outcome"], "failed", "{done}");
    assert_eq!(
        slot["result"]["result"]["error"]["code"], "ERR_TARGET_FORBIDDEN",
        "{done}"
    );
    let registered: i64 = pg
        .query_one(
            "SELECT count(*) FROM agents WHERE hostname = 'probe-e2e'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(registered, 1, "one agent, not a second registration");
    // The results are in PostgreSQL, one task row each.
    let reported: i64 = pg
        .query_one(
            "SELECT count(*) FROM tasks WHERE agent_id = $1 AND status = 'reported'",
            &[&agent_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reported, 3);
    agent.stop().await.unwrap();
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_a_check_in_flight_reports_it_cancelled_and_exits_0() {
    use checkplane_testkit::process::ServiceProcess;
    let (db, _redis, gw, sched) = control_plane(&[]).await;

    let (_hanging, port, fillers) = hanging_listener().await;
    let state = StateDir::new();
    let agent_env = process_env(
        &gw,
        &state,
        &[
            ("AGENT_ENROLLMENT_TOKEN", ENROLL),
            ("SHUTDOWN_TIMEOUT", "3s"),
        ],
    );
    let mut process = ServiceProcess::spawn(crate::bin(), &[], &agent_env);
    let pg = db.client().await;
    online_agent(&pg).await;
    let http = reqwest::Client::new();
    let location = leased_check(&http, &gw, port).await;

    process.signal("TERM");
    let status = tokio::task::block_in_place(|| process.wait(Duration::from_secs(6)));
    let stderr = process.stderr();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{stderr}");
    assert!(stderr.contains("reported cancelled"), "{stderr}");
    let done = finished(&http, &gw, &location).await;
    let slot = &done["results"][0];
    assert_eq!(slot["outcome"], "cancelled", "{done}");
    assert_eq!(slot["result"]["reason"], "shutdown", "{done}");
    drop(fillers);
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_check_resumes_from_its_state_file_and_its_lease_recovers() {
    use checkplane_testkit::process::ServiceProcess;
    let (db, _redis, gw, sched) = control_plane(&[("LEASE_TTL", "1s")]).await;
    let (listener, port, fillers) = hanging_listener().await;
    let state = StateDir::new();
    let mut first = ServiceProcess::spawn(
        crate::bin(),
        &[],
        &process_env(&gw, &state, &[("AGENT_ENROLLMENT_TOKEN", ENROLL)]),
    );
    let pg = db.client().await;
    let agent_id = online_agent(&pg).await;
    let http = reqwest::Client::new();
    let location = leased_check(&http, &gw, port).await;
    first.signal("KILL");
    tokio::task::block_in_place(|| first.wait(Duration::from_secs(5))).unwrap();

    // The target answers now; the agent comes back with its state file alone.
    drop(fillers);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    let mut second = ServiceProcess::spawn(crate::bin(), &[], &process_env(&gw, &state, &[]));
    let done = finished(&http, &gw, &location).await;
    let slot = &done["results"][0];
    assert_eq!(slot["agent_id"], agent_id.as_str(), "{done}");
    assert_eq!(
        (slot["attempt"].as_i64(), slot["outcome"].as_str()),
        (Some(1), Some("finished")),
        "{done}"
    );
    assert_eq!(slot["result"]["result"]["connected"], true, "{done}");
    // The lease came back to the same agent with the next epoch.
    let epochs: Vec<i64> = pg
        .query(
            "SELECT epoch FROM lease_history
             WHERE agent_id = $1 AND type = 'lease.granted' ORDER BY epoch",
            &[&agent_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(epochs, [1, 2]);
    let agents: i64 = pg
        .query_one("SELECT count(*) FROM agents", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(agents, 1, "no second registration");
    second.signal("TERM");
    let status = tokio::task::block_in_place(|| second.wait(Duration::from_secs(10)));
    let stderr = second.stderr();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{stderr}");
    assert!(
        stderr.contains("restored control plane session"),
        "{stderr}"
    );
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn another_registration_of_the_agents_host_is_refused_and_the_agent_works_on() {
    let (db, _redis, gw, sched) = control_plane(&[
        ("HEARTBEAT_INTERVAL", "300ms"),
        ("GATEWAY_AUTH_CACHE_TTL", "0s"),
    ])
    .await;
    let open = accepting_listener().await;
    let state = StateDir::new();
    let agent = start_agent(&gw, &state, ENROLLED).await;
    let agent_id = online_agent(&db.client().await).await;
    let token = |state: &StateDir| -> String {
        let kept: Value = serde_json::from_slice(&std::fs::read(state.file()).unwrap()).unwrap();
        kept["token"].as_str().unwrap().to_owned()
    };
    let before = token(&state);

    // Someone else with the enrollment token registers the same host name: refused (it would
    // take the agent's identity).
    let http = reqwest::Client::new();
    let taken = http
        .post(gw.url("/v1/agents/register"))
        .header("x-enrollment-token", ENROLL)
        .json(&json!({"hostname": "probe-e2e", "capabilities": {"tcp": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(taken.status().as_u16(), 409);

    // The agent heartbeats through it (more than one interval) and works on, same token.
    let pg = db.client().await;
    let seen = || async {
        pg.query_one(
            "SELECT last_seen FROM agent_last_seen WHERE agent_id = $1",
            &[&agent_id],
        )
        .await
        .ok()
        .map(|r| r.get::<_, std::time::SystemTime>(0))
    };
    let first_seen = seen().await;
    eventually(
        "a heartbeat after the refusal",
        Duration::from_secs(10),
        || async { (seen().await > first_seen).then_some(()) },
    )
    .await;
    assert_eq!(token(&state), before);
    let (done, slot) = run_tcp(&http, &gw, open).await;
    assert_eq!(slot["agent_id"], agent_id.as_str(), "{done}");
    assert_eq!(slot["outcome"], "finished", "{done}");
    agent.stop().await.unwrap();
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_check_of_every_kind_runs_on_the_agent_process_and_lands_in_postgres() {
    use checkplane_testkit::process::ServiceProcess;
    let (db, _redis, gw, sched) = control_plane(&[]).await;
    let dns = checkplane_testkit::dns::Unbound::start();
    let web = crate::http::serve(None).await;
    let open = accepting_listener().await;

    let state = StateDir::new();
    let proxy = format!("127.0.0.1:{}", free_port());
    let upstream = dns.addr();
    let mut env = process_env(&gw, &state, ENROLLED);
    env.push(("AGENT_DNS_LISTEN".to_owned(), proxy.clone()));
    env.push(("AGENT_DNS_UPSTREAM".to_owned(), upstream.clone()));
    let mut process = ServiceProcess::spawn(crate::bin(), &[], &env);
    let pg = db.client().await;
    online_agent(&pg).await;
    // Its caching DNS proxy answers dig.
    let (ip, port) = proxy.split_once(':').unwrap();
    let (ip, port) = (ip.to_owned(), port.to_owned());
    let dug = tokio::task::spawn_blocking(move || {
        std::process::Command::new("dig")
            .args([
                &format!("@{ip}"),
                "-p",
                &port,
                "+tries=1",
                "+time=3",
                "example.test",
                "A",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let dug = String::from_utf8_lossy(&dug.stdout);
    assert!(dug.contains("192.0.2.10"), "{dug}");
    assert!(process.stderr().contains("starting DNS proxy"));
    let http = reqwest::Client::new();
    let bodies = [
        json!({"kind": "dns", "target": "example.test",
               "options": {"type": "MX", "resolver": dns.addr()}, "limit": 1}),
        json!({"kind": "http", "target": format!("http://127.0.0.1:{web}/"), "limit": 1}),
        json!({"kind": "tcp", "target": "127.0.0.1", "options": {"port": open}, "limit": 1}),
        json!({"kind": "ping", "target": "127.0.0.1", "options": {"packets": 2}, "limit": 1}),
        json!({"kind": "trace", "target": "127.0.0.1", "limit": 1}),
    ];
    let mut locations = Vec::new();
    for body in bodies {
        locations.push(create(&http, &gw, body).await);
    }
    for location in &locations {
        let done = finished(&http, &gw, location).await;
        assert_eq!(done["results"][0]["outcome"], "finished", "{done}");
    }
    // What each result says, as PostgreSQL holds it.
    let rows = pg
        .query(
            "SELECT c.kind, s.outcome, s.result FROM check_slots s JOIN checks c USING (check_id)
              ORDER BY c.kind",
            &[],
        )
        .await
        .unwrap();
    let results: std::collections::BTreeMap<String, Value> = rows
        .iter()
        .map(|r| {
            assert_eq!(r.get::<_, Option<String>>(1).as_deref(), Some("finished"));
            let result: Value = r.get(2);
            (r.get(0), result["result"].clone())
        })
        .collect();
    assert_eq!(results.len(), 5, "{results:?}");
    assert_eq!(results["dns"]["rcode"], "NOERROR", "{results:?}");
    assert_eq!(
        results["dns"]["answers"][0]["value"],
        "10 mail.example.test."
    );
    assert_eq!(results["dns"]["resolver"], dns.addr());
    assert_eq!(results["http"]["status"], 200, "{results:?}");
    assert_eq!(results["http"]["body"], "hello");
    assert!(results["http"]["timings"]["first_byte"].as_f64().is_some());
    assert_eq!(results["tcp"]["connected"], true);
    // Ping needs raw sockets (root) or ping_group_range: the agent says which it used.
    if results["ping"]["socket"].is_string() {
        assert_eq!(results["ping"]["stats"]["received"], 2, "{results:?}");
    }
    assert_eq!(results["trace"]["reached"], true, "{results:?}");
    assert_eq!(results["trace"]["hops"][0]["address"], "127.0.0.1");

    process.signal("TERM");
    let status = tokio::task::block_in_place(|| process.wait(Duration::from_secs(10)));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        process.stderr()
    );
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn checks_timing_out_together_shrink_the_window_and_operators_see_it_collapse() {
    let (db, _redis, gw, sched) = control_plane(&[]).await;
    let (_hanging, port, fillers) = hanging_listener().await;
    let state = StateDir::new();
    let agent = start_agent(
        &gw,
        &state,
        &[
            ("AGENT_ENROLLMENT_TOKEN", ENROLL),
            ("AGENT_ALLOW_PRIVATE_TARGETS", "true"),
            ("AGENT_MAX_INFLIGHT", "32"),
            ("AGENT_POOL_TCP_SIZE", "32"),
            ("AGENT_METRICS_INTERVAL", "1s"),
        ],
    )
    .await;
    let pg = db.client().await;
    let agent_id = online_agent(&pg).await;
    let http = reqwest::Client::new();
    // Twenty connects that hang until their check's deadline: most of what ends in the
    // tick they end in is a timeout.
    let mut locations = Vec::new();
    for _ in 0..20 {
        locations.push(
            create(
                &http,
                &gw,
                json!({"kind": "tcp", "target": "127.0.0.1", "options": {"port": port},
                       "limit": 1, "timeout_ms": 1500}),
            )
            .await,
        );
    }
    for location in &locations {
        let done = finished(&http, &gw, location).await;
        let slot = &done["results"][0];
        // The agent's own timeout, or (a report later than the deadline) the check's.
        let timed_out = slot["result"]["result"]["error"]["code"] == "ERR_TIMEOUT"
            || slot["outcome"] == "timeout";
        assert!(timed_out, "{done}");
    }
    // The collapse, then the way back up, as operators read it.
    let windows: Vec<Value> = eventually(
        "the window shrinks and grows back",
        Duration::from_secs(20),
        || async {
            let page: Value = http
                .get(gw.url(&format!("/v1/agents/{agent_id}/concurrency?limit=500")))
                .header("x-api-key", ADMIN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let items = page["items"].as_array().cloned().unwrap_or_default();
            let shrank = items.iter().position(|w| {
                w["backpressure"] == true
                    && w["reason"] == "timeouts"
                    && w["window"].as_u64() < Some(32)
            })?;
            items[shrank..]
                .iter()
                .any(|w| {
                    w["backpressure"] == false
                        && w["window"].as_u64() > items[shrank]["window"].as_u64()
                })
                .then_some(items)
        },
    )
    .await;
    assert!(windows.iter().all(|w| w["max"] == 32), "{windows:?}");
    // The gauges are on the agent's metrics too.
    let metrics = checkplane_testkit::metrics_text(&agent.url("/metrics")).await;
    for gauge in [
        "checkplane_agent_concurrency_window",
        "checkplane_agent_concurrency_backpressure",
        "checkplane_agent_dispatcher_queue_fill",
    ] {
        assert!(metrics.contains(gauge), "{gauge}: {metrics}");
    }
    drop(fillers);
    agent.stop().await.unwrap();
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
}

/// The kinds an agent's row says it runs.
async fn declared_kinds(pg: &tokio_postgres::Client, agent_id: &str) -> Vec<String> {
    let caps: Value = pg
        .query_one(
            "SELECT capabilities FROM agents WHERE agent_id = $1",
            &[&agent_id],
        )
        .await
        .unwrap()
        .get(0);
    caps.as_object().unwrap().keys().cloned().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_restarted_with_other_kinds_registers_them_as_the_same_agent() {
    let (db, _redis, gw, sched) = control_plane(&[]).await;
    let state = StateDir::new();
    let only_tcp = [
        ("AGENT_ENROLLMENT_TOKEN", ENROLL),
        ("AGENT_POOL_DNS_SIZE", "0"),
        ("AGENT_POOL_HTTP_SIZE", "0"),
        ("AGENT_POOL_PING_SIZE", "0"),
        ("AGENT_POOL_TRACE_SIZE", "0"),
    ];
    let agent = start_agent(&gw, &state, &only_tcp).await;
    let pg = db.client().await;
    let agent_id = online_agent(&pg).await;
    assert_eq!(declared_kinds(&pg, &agent_id).await, ["tcp"]);
    agent.stop().await.unwrap();

    // Every kind now: it registers again (same host name, so the same agent) and says so.
    let agent = start_agent(&gw, &state, &[("AGENT_ENROLLMENT_TOKEN", ENROLL)]).await;
    let all = eventually(
        "the new kinds are known",
        Duration::from_secs(10),
        || async {
            let k = declared_kinds(&pg, &agent_id).await;
            (k.len() == 5).then_some(k)
        },
    )
    .await;
    assert_eq!(all, ["dns", "http", "ping", "tcp", "trace"]);
    // The gateway commits the registration before the agent has its answer and writes its
    // state file: wait for the file too.
    let kept = eventually(
        "the state file has the new kinds",
        Duration::from_secs(10),
        || async {
            let file = std::fs::read(state.file()).ok()?;
            let kept: Value = serde_json::from_slice(&file).ok()?;
            (kept["declared"]["trace"] == 4).then_some(kept)
        },
    )
    .await;
    assert_eq!(kept["agent_id"], agent_id.as_str());
    agent.stop().await.unwrap();
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
}

/// Requests of each agent route the gateway answered (any status), from its `/metrics`.
fn route_counts(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    let mut counts = std::collections::BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("http_requests_total{"))
    {
        let Some(route) = line
            .split("route=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .filter(|r| r.starts_with("/v1/agents/"))
        else {
            continue;
        };
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        *counts.entry(route.to_owned()).or_default() += value;
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_agent_at_full_capacity_for_a_minute_is_never_rate_limited_and_a_looping_client_is()
{
    use checkplane_testkit::process::ServiceProcess;
    // Every agent limit at its default. The operator API is this test's driver (40 checks a
    // second), not what is tested: unlimited.
    let (db, _redis, gw, sched) = control_plane(&[("GATEWAY_RATE_OPERATOR", "off")]).await;
    let port = accepting_listener().await;
    let state = StateDir::new();
    let health = format!("127.0.0.1:{}", free_port());
    let mut agent = ServiceProcess::spawn(
        crate::bin(),
        &[],
        &process_env(
            &gw,
            &state,
            &[
                ("AGENT_ENROLLMENT_TOKEN", ENROLL),
                ("AGENT_HEALTH_ADDR", health.as_str()),
                ("AGENT_HOSTNAME", "probe-full-load"),
                ("AGENT_POOL_TCP_SIZE", "4"),
                ("AGENT_METRICS_INTERVAL", "1s"),
            ],
        ),
    );
    let agent_metrics = format!("http://{health}/metrics");
    let http = reqwest::Client::new();
    online_agent(&db.client().await).await;
    let leases = || async {
        checkplane_testkit::metric(&agent_metrics, "checkplane_agent_leases_total").await
    };
    let before = route_counts(&checkplane_testkit::metrics_text(&gw.url("/metrics")).await);

    // A minute of one tcp check every 25 ms, each its own claim and report unless the agent
    // gathers them: 40 claims and 40 reports a second unpaced, over the agent's own pace
    // (20/s), so it claims and reports as fast as it ever will.
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    let mut created = 0u32;
    while started.elapsed() < Duration::from_secs(60) {
        tick.tick().await;
        create(
            &http,
            &gw,
            json!({"kind": "tcp", "target": "127.0.0.1", "options": {"port": port}, "limit": 1}),
        )
        .await;
        created += 1;
    }
    let leased = leases().await;
    let after = route_counts(&checkplane_testkit::metrics_text(&gw.url("/metrics")).await);
    let per_minute = |route: &str| {
        after.get(route).copied().unwrap_or(0.0) - before.get(route).copied().unwrap_or(0.0)
    };
    let rates: Vec<String> = after
        .keys()
        .map(|route| format!("{route} {}/min", per_minute(route)))
        .collect();
    eprintln!("created {created}, leased {leased}; {rates:?}");
    // At full pace (at least 60 % of 20 a second), never past it (an unpaced agent makes one
    // claim and one report per check here: 2,400 a minute), and keeping up with the work.
    let claims = per_minute("/v1/agents/claim");
    assert!(
        (720.0..=1300.0).contains(&claims),
        "{claims} claims a minute: {rates:?}"
    );
    let reports = per_minute("/v1/agents/report");
    assert!(reports <= 1300.0, "{reports} reports a minute: {rates:?}");
    assert!(
        leased >= 0.9 * f64::from(created),
        "the agent ran {leased} of {created} checks"
    );

    // Not one refusal of any call, rate limit or other.
    let text = checkplane_testkit::metrics_text(&agent_metrics).await;
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("checkplane_agent_control_plane_errors_total"))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let limited = checkplane_testkit::metrics_text(&gw.url("/metrics")).await;
    assert!(
        !limited.contains("checkplane_rate_limited_total"),
        "{limited}"
    );

    // A client looping on the heartbeat is refused within the default burst of three.
    let (id, token) = checkplane_testkit::register_agent(
        &http,
        &gw.url(""),
        ENROLL,
        &json!({"hostname": "probe-looping", "capabilities": {"tcp": 1}}),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let (status, _) = checkplane_testkit::agent_post(
            &http,
            &gw.url("/v1/agents/heartbeat"),
            &id,
            &token,
            &json!({}),
        )
        .await;
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let series = r#"checkplane_rate_limited_total{endpoint="heartbeat",caller="agent"}"#;
    assert_eq!(
        checkplane_testkit::metric(&gw.url("/metrics"), series).await,
        2.0
    );

    agent.signal("TERM");
    tokio::task::block_in_place(|| agent.wait(Duration::from_secs(15)));
    sched.stop().await.unwrap();
    gw.stop().await.unwrap();
}

/// Everything the in-process services log, at debug level, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    /// The process's tracing goes here from now on (nextest runs each test in a process).
    fn install() -> Self {
        let captured = Self::default();
        tracing_subscriber::fmt()
            // What a service run with LOG_LEVEL=debug logs.
            .with_env_filter(checkplane_runtime::telemetry::log_filter("debug"))
            .with_writer(captured.clone())
            .with_ansi(false)
            .try_init()
            .expect("no other subscriber in this test process");
        captured
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http_checks_header_values_appear_in_no_read_route_audit_entry_log_or_error() {
    use checkplane_testkit::process::ServiceProcess;
    let logs = Captured::install();
    let (db, _redis, gw, sched) = control_plane(&[]).await;
    let web = crate::http::serve(None).await;
    let secret = format!("sentinel-{}", uuid::Uuid::new_v4().simple());
    let state = StateDir::new();
    let mut env = process_env(&gw, &state, ENROLLED);
    env.push(("LOG_LEVEL".to_owned(), "debug".to_owned()));
    let mut process = ServiceProcess::spawn(crate::bin(), &[], &env);
    let pg = db.client().await;
    let agent_id = online_agent(&pg).await;
    let http = reqwest::Client::new();
    let mut seen: Vec<(String, String)> = Vec::new();

    // Refused checks that carry it: their error bodies do not repeat it.
    let url = format!("http://127.0.0.1:{web}/");
    for bad in [
        json!({"kind": "http", "target": url, "limit": 0,
               "options": {"headers": {"authorization": format!("Bearer {secret}")}}}),
        json!({"kind": "http", "target": url, "limit": 1,
               "options": {"headers": {"authorization": format!("Bearer {secret}\n")}}}),
        json!({"kind": "http", "target": url, "limit": 1,
               "options": {"headers": {"host": secret}}}),
        json!({"kind": "http", "target": url, "limit": 1,
               "options": {"headers": {"authorization": ["Bearer", secret]}}}),
    ] {
        let answer = http
            .post(gw.url("/v1/checks"))
            .header("x-api-key", ADMIN)
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), 422);
        seen.push(("a refusal".into(), answer.text().await.unwrap()));
    }

    let location = create(
        &http,
        &gw,
        json!({"kind": "http", "target": url, "limit": 1,
               "options": {"headers": {"authorization": format!("Bearer {secret}"),
                                       "x-api-token": secret}}}),
    )
    .await;
    let done = finished(&http, &gw, &location).await;
    assert_eq!(
        done["results"][0]["result"]["result"]["status"], 200,
        "{done}"
    );
    assert!(
        crate::http::received(&format!("Bearer {secret}")),
        "the header was sent to the target"
    );
    // Read back, the names are there and the values are not.
    assert_eq!(
        done["options"]["headers"],
        json!({"authorization": "[redacted]", "x-api-token": "[redacted]"}),
        "{done}"
    );
    let get = |path: String| {
        let request = http.get(gw.url(&path)).header("x-api-key", ADMIN);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    for path in [
        location.clone(),
        "/v1/checks".to_owned(),
        "/v1/audit".to_owned(),
        "/v1/audit?action=check.created".to_owned(),
        "/v1/agents".to_owned(),
        format!("/v1/agents/{agent_id}/concurrency"),
        "/v1/dead-letters".to_owned(),
        "/v1/projection-failures".to_owned(),
    ] {
        let body = get(path.clone()).await;
        seen.push((path, body));
    }
    // The live stream, replayed from the start to its end.
    let live = http
        .get(gw.url(&format!("{location}/live")))
        .header("x-api-key", ADMIN)
        .send()
        .await
        .unwrap();
    let stream = tokio::time::timeout(Duration::from_secs(5), live.text()).await;
    let stream = match stream {
        Ok(text) => text.unwrap(),
        Err(_) => panic!("the live stream of a finished check did not end"),
    };
    assert!(stream.contains("event: result"), "{stream}");
    seen.push(("the live stream".into(), stream));
    let audit = get("/v1/audit?action=check.created".into()).await;
    assert!(audit.contains("[redacted]"), "{audit}");

    sched.stop().await.unwrap();
    process.signal("TERM");
    process.wait(Duration::from_secs(10));
    gw.stop().await.unwrap();
    seen.push(("the gateway's and scheduler's logs".into(), logs.text()));
    seen.push(("the agent's log".into(), process.stderr()));
    assert!(
        logs.text().contains("check created"),
        "the capture holds the services' logs"
    );
    for (place, text) in &seen {
        assert!(!text.contains(&secret), "{place} shows the header: {text}");
    }
    // Where it does live: the events (and so backups), which only the database's users read.
    let kept: i64 = pg
        .query_one(
            "SELECT count(*) AS n FROM events WHERE payload::text LIKE '%' || $1 || '%'",
            &[&secret],
        )
        .await
        .unwrap()
        .get("n");
    assert!(kept >= 1, "the spec is in the events");
}
