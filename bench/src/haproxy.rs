//! `haproxy-sync`: 10 real HAProxy processes (Debian's) × 100 servers, registered through the
//! gateway; one sync cycle (every instance polled, differences recorded through the outbox)
//! timed when everything is new and when nothing changed, beside the raw cost of the same
//! Runtime API reads (`show info`, `show servers state`, `show stat` over TCP) in the same run.
//!
//! `haproxy-action`: drain / ready through the API, from the request to the action's
//! `success` on a GET that waits for it (`wait_ms`; the server set and read back through the
//! socket), p50 / p99, beside a raw
//! `set server` + `show servers state` read-back over the socket. With `--via-agent` every
//! instance is reached through an agent of its own (in-process, relaying to the HAProxy's
//! unix socket), as on a node whose socket only its agent can open.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use checkplane_testkit::haproxy::Haproxy;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct HaproxyArgs {
    #[arg(long)]
    pg_url: String,
    #[arg(long)]
    redis_url: String,
    #[arg(long, default_value_t = 10)]
    instances: usize,
    #[arg(long, default_value_t = 100)]
    servers: usize,
    /// Cycles (sync) or actions (action) measured.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Reach each instance through an agent of its own (transport `agent`).
    #[arg(long)]
    via_agent: bool,
}

const ENROLL: &str = "bench-enrollment-token-0123";

fn raw(addr: std::net::SocketAddr, command: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(format!("{command}\n").as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// `GET base + path` with the admin key, as JSON.
async fn admin_get(http: &reqwest::Client, base: &str, path: &str) -> serde_json::Value {
    http.get(format!("{base}{path}"))
        .header("x-api-key", crate::fanout::ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    (v[i.min(v.len() - 1)] * 100.0).round() / 100.0
}

struct Setup {
    name: String,
    env: Vec<(String, String)>,
    proxies: Vec<Haproxy>,
    instances: Vec<String>,
    http: reqwest::Client,
    base: String,
    shutdown: CancellationToken,
    gw: tokio::task::JoinHandle<Result<(), checkplane_runtime::RunError>>,
    /// The relaying agents (with `--via-agent`) and their state folder.
    agents: Vec<tokio::task::JoinHandle<Result<(), checkplane_runtime::RunError>>>,
    state: std::path::PathBuf,
}

/// An agent relaying to `ha`'s admin unix socket: its id once online.
async fn relaying_agent(s: &mut Setup, ha: usize) -> String {
    let hostname = format!("lb-node-{ha}");
    let env: Vec<(String, String)> = [
        ("AGENT_CONTROL_PLANE", format!("{}/", s.base)),
        ("AGENT_ALLOW_PLAINTEXT", "true".to_owned()),
        (
            "AGENT_STATE_FILE",
            s.state
                .join(format!("{hostname}.json"))
                .display()
                .to_string(),
        ),
        ("AGENT_ENROLLMENT_TOKEN", ENROLL.to_owned()),
        ("AGENT_HOSTNAME", hostname.clone()),
        (
            "AGENT_HAPROXY_SOCKET",
            s.proxies[ha].admin_socket.display().to_string(),
        ),
        ("AGENT_POOL_DNS_SIZE", "0".to_owned()),
        ("AGENT_POOL_HTTP_SIZE", "0".to_owned()),
        ("AGENT_POOL_TCP_SIZE", "0".to_owned()),
        ("AGENT_POOL_PING_SIZE", "0".to_owned()),
        ("AGENT_POOL_TRACE_SIZE", "0".to_owned()),
        ("AGENT_HEALTH_ADDR", "127.0.0.1:0".to_owned()),
        ("LOG_LEVEL", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let config = agent::load(&mut checkplane_runtime::Env::from_pairs(env)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    s.agents.push(tokio::spawn(agent::run(
        config,
        listener,
        s.shutdown.clone(),
    )));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = admin_get(&s.http, &s.base, "/v1/agents?limit=200").await;
        let found = page["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["hostname"] == hostname.as_str())
            .and_then(|a| a["agent_id"].as_str().map(str::to_owned));
        if let Some(id) = found {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "agent {hostname} not online: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn setup(args: &HaproxyArgs) -> Setup {
    let (name, _) = crate::scratch(&args.pg_url).await;
    let db_url = format!("{}/{name}", args.pg_url.rsplit_once('/').unwrap().0);
    let prefix = format!("hab{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let env: Vec<(String, String)> = [
        ("DATABASE_URL", db_url.as_str()),
        ("REDIS_URL", args.redis_url.as_str()),
        ("STREAM_PREFIX", prefix.as_str()),
        ("LOG_LEVEL", "warn"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let mut gw_env = env.clone();
    gw_env.push(("GATEWAY_ADMIN_KEY".into(), crate::fanout::ADMIN.into()));
    gw_env.push(("GATEWAY_ENROLLMENT_TOKEN".into(), ENROLL.into()));
    // Every client is on 127.0.0.1: no per-address connection cap.
    gw_env.push(("HTTP_MAX_CONNECTIONS_PER_ADDRESS".into(), "0".into()));
    // Every waiting action lookup uses one key.
    gw_env.push(("GATEWAY_MAX_WAITS_PER_KEY".into(), "100000".into()));
    let gw_config = gateway::load(&mut checkplane_runtime::Env::from_pairs(gw_env)).unwrap();
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let gw = tokio::spawn(gateway::run(gw_config, listener, shutdown.clone()));
    let http = reqwest::Client::new();
    crate::fanout::until_ready(&http, &base).await;
    let servers: Vec<(&'static str, u16)> = (0..args.servers)
        .map(|i| {
            (
                &*Box::leak(format!("s{i}").into_boxed_str()),
                20_000 + i as u16,
            )
        })
        .collect();
    let proxies: Vec<Haproxy> = (0..args.instances)
        .map(|_| Haproxy::start(&[("be", servers.clone())]))
        .collect();
    let state = std::env::temp_dir().join(format!("cp-bench-{prefix}"));
    std::fs::create_dir_all(&state).unwrap();
    let mut s = Setup {
        name,
        env,
        proxies,
        instances: Vec::new(),
        http,
        base,
        shutdown,
        gw,
        agents: Vec::new(),
        state,
    };
    for i in 0..s.proxies.len() {
        let body = if args.via_agent {
            let node = relaying_agent(&mut s, i).await;
            let marked = s
                .http
                .put(format!("{}/v1/servers/{node}/haproxy", s.base))
                .header("x-api-key", crate::fanout::ADMIN)
                .json(&json!({"enabled": true}))
                .send()
                .await
                .unwrap();
            assert_eq!(marked.status().as_u16(), 200);
            json!({"name": format!("lb-{i}"), "transport": "agent", "node": node})
        } else {
            json!({"name": format!("lb-{i}"), "address": s.proxies[i].stats.to_string()})
        };
        let r: serde_json::Value = s
            .http
            .post(format!("{}/v1/haproxy/instances", s.base))
            .header("x-api-key", crate::fanout::ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        s.instances.push(r["id"].as_str().unwrap().to_owned());
    }
    s
}

async fn teardown(args: &HaproxyArgs, s: Setup) {
    s.shutdown.cancel();
    for agent in s.agents {
        let _ = agent.await;
    }
    let _ = s.gw.await;
    let _ = std::fs::remove_dir_all(&s.state);
    drop(s.proxies);
    crate::drop_scratch(&args.pg_url, &s.name).await;
}

pub async fn sync_cycle(args: HaproxyArgs) {
    let s = setup(&args).await;
    let mut env = s.env.clone();
    env.push(("HAPROXY_SYNC_INTERVAL".into(), "1h".into()));
    let config = haproxy_sync::load(&mut checkplane_runtime::Env::from_pairs(env)).unwrap();
    let tracker = tokio_util::task::TaskTracker::new();
    let stores = checkplane_runtime::stores::Stores::start(
        config.service.store.clone(),
        &tracker,
        &s.shutdown,
    )
    .unwrap();
    let keys = checkplane_core::keys::Keys::new(
        config.service.store.stream_prefix.clone(),
        config.service.store.stream_shards,
    );
    let mut sync = haproxy_sync::sync::Sync::new(
        stores.clone(),
        keys.clone(),
        config.sync.clone(),
        tracker.clone(),
        s.shutdown.clone(),
    );
    // The first cycle: every server new.
    let started = Instant::now();
    sync.round().await.unwrap();
    let first_ms = started.elapsed().as_secs_f64() * 1000.0;
    let pg = stores.pg.get().await.unwrap();
    let projected: i64 = pg
        .query_one("SELECT count(*) FROM haproxy_servers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(projected as usize, args.instances * args.servers);
    // Steady cycles: nothing changed (forced, as the interval is an hour).
    let mut steady = Vec::new();
    let mut raws = Vec::new();
    let mut conn = stores.redis_shared.clone();
    for _ in 0..args.runs {
        for id in &s.instances {
            let _: () = redis::cmd("SET")
                .arg(keys.haproxy_sync_request(id))
                .arg(1)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let t = Instant::now();
        sync.round().await.unwrap();
        steady.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        for ha in &s.proxies {
            let addr = ha.stats;
            let _ = tokio::task::spawn_blocking(move || {
                (
                    raw(addr, "show info"),
                    raw(addr, "show servers state"),
                    raw(addr, "show stat"),
                )
            })
            .await;
        }
        raws.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "{}",
        json!({"bench": "haproxy_sync", "instances": args.instances, "servers_per_instance": args.servers,
               "first_cycle_ms": (first_ms * 100.0).round() / 100.0,
               "steady_p50_ms": quantile(steady.clone(), 0.5), "steady_p99_ms": quantile(steady, 0.99),
               "raw_reads_p50_ms": quantile(raws.clone(), 0.5), "raw_reads_p99_ms": quantile(raws, 0.99),
               "runs": args.runs})
    );
    drop(pg);
    teardown(&args, s).await;
}

/// Actions made before the measured ones.
const WARMUP: usize = 5;

pub async fn action_latency(args: HaproxyArgs) {
    let s = setup(&args).await;
    let mut env = s.env.clone();
    env.push(("HAPROXY_SYNC_INTERVAL".into(), "1h".into()));
    let config = haproxy_sync::load(&mut checkplane_runtime::Env::from_pairs(env)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sync = tokio::spawn(haproxy_sync::run(config, listener, s.shutdown.clone()));
    // Wait for the first cycle: every server known.
    let (pg, conn) = tokio_postgres::connect(
        &s.env.iter().find(|(k, _)| k == "DATABASE_URL").unwrap().1,
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = pg
            .query_one("SELECT count(*) FROM haproxy_servers", &[])
            .await
            .unwrap()
            .get(0);
        if n as usize == args.instances * args.servers {
            break;
        }
        assert!(Instant::now() < deadline, "servers not synced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let servers: Vec<String> = pg
        .query(
            "SELECT server_id FROM haproxy_servers WHERE instance_id = $1 ORDER BY name LIMIT 20",
            &[&s.instances[0]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut ours = Vec::new();
    let machine = crate::cpu::Machine::now();
    // Five warm-up actions first (the first cycle's last publishes may still be going out).
    for i in 0..args.runs + WARMUP {
        let server = &servers[i % servers.len()];
        let action = if (i / servers.len()) % 2 == 0 {
            "drain"
        } else {
            "ready"
        };
        let t = Instant::now();
        let r: serde_json::Value = s
            .http
            .post(format!("{}/v1/haproxy/servers/{server}/action", s.base))
            .header("x-api-key", crate::fanout::ADMIN)
            .json(&json!({"action": action, "idempotency_key": format!("bench-{i}")}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["id"].as_str().unwrap().to_owned();
        loop {
            let a = admin_get(
                &s.http,
                &s.base,
                &format!("/v1/haproxy/actions/{id}?wait_ms=10000"),
            )
            .await;
            if a["status"] == "success" {
                break;
            }
            assert_ne!(a["status"], "failed", "{a}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if i >= WARMUP {
            ours.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let steal = machine.steal_since();
    // Raw: the same change and read-back straight over the socket.
    let addr = s.proxies[0].stats;
    let mut raws = Vec::new();
    for i in 0..args.runs {
        let state = if i % 2 == 0 { "drain" } else { "ready" };
        let t = Instant::now();
        let _ = tokio::task::spawn_blocking(move || {
            raw(addr, &format!("set server be/s{} state {state}", i % 20));
            raw(addr, "show servers state be")
        })
        .await;
        raws.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // Where an action's time goes, from its events' own times (ms): requested → `running`
    // committed (the round picking it up) → `success` committed (the Runtime API work).
    let phases = pg
        .query(
            "SELECT ((extract(epoch FROM min(occurred_at) FILTER (WHERE payload->>'status' = 'running'))
                     - extract(epoch FROM min(occurred_at) FILTER (WHERE type = 'haproxy.action_requested'))) * 1000)::float8,
                    ((extract(epoch FROM min(occurred_at) FILTER (WHERE payload->>'status' = 'success'))
                     - extract(epoch FROM min(occurred_at) FILTER (WHERE payload->>'status' = 'running'))) * 1000)::float8
             FROM events WHERE aggregate_id LIKE 'haproxy-action:%'
             GROUP BY aggregate_id",
            &[],
        )
        .await
        .unwrap();
    let column = |i: usize| -> Vec<f64> {
        phases
            .iter()
            .filter_map(|r| r.get::<_, Option<f64>>(i))
            .collect()
    };
    println!(
        "{}",
        json!({"bench": "haproxy_action", "transport": if args.via_agent { "agent" } else { "direct" }, "runs": args.runs,
               "p50_ms": quantile(ours.clone(), 0.5), "p99_ms": quantile(ours, 0.99),
               "raw_p50_ms": quantile(raws.clone(), 0.5), "raw_p99_ms": quantile(raws, 0.99),
               "to_running_p50_ms": quantile(column(0), 0.5), "to_running_p99_ms": quantile(column(0), 0.99),
               "running_to_success_p50_ms": quantile(column(1), 0.5),
               "running_to_success_p99_ms": quantile(column(1), 0.99),
               "cpu_steal_pct": steal})
    );
    drop(pg);
    s.shutdown.cancel();
    let _ = sync.await;
    teardown(&args, s).await;
}
