//! `chaos`: the whole system under fire, then checked for anything lost.
//!
//! On a PostgreSQL, a Redis (AOF, `everysec`), two HAProxy instances and an unbound of its
//! own, all on loopback, it runs the real binaries: 2 gateways, 2 schedulers (`sched-1`,
//! `sched-2`), 2 haproxy-syncs, a probe agent (dns, http, tcp, ping, trace) and an HAProxy
//! node's agent relaying to its instance, plus simulated agents in this process speaking the
//! lease protocol over HTTP. Every client goes through a front door that joins it to
//! whichever gateway answers. A steady load (checks of every kind, HAProxy actions direct and
//! through the node's agent, live-stream followers) runs while a seeded schedule
//! ([`schedule::plan`]) SIGKILLs and restarts processes, pauses one past the lease TTL,
//! kills and restarts Redis and PostgreSQL, and reloads HAProxy with and without its state
//! file. Then everything is brought up, the load stops, the run waits for quiescence, reads
//! the stores, rebuilds a copy of the database with each binary that can, and
//! [`verify::verify`]s. Exit 1 on any violation, after re-running the seed (`--reruns`) to
//! say how often the failure recurred.

pub mod collect;
pub mod load;
pub mod procs;
pub mod schedule;
pub mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use checkplane_runtime::clock::now_ms;
use checkplane_testkit::haproxy::Haproxy;
use checkplane_testkit::servers::{PostgresServer, RedisServer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use procs::Service;
use schedule::Fault;
use verify::{Fault as FaultRecord, Records, Reload, SseLog};

pub const ADMIN: &str = "chaos-admin-key-0123456789";
pub const ENROLL: &str = "chaos-enrollment-token-0123";
/// The lease TTL the gateways run with; a pause lasts longer.
pub const LEASE_TTL: Duration = Duration::from_secs(4);
const PAUSE: Duration = Duration::from_secs(7);
/// Longer than the projector's reclaim idle (30 s) plus the interval at which the other
/// replica looks for idle entries (15 s): it has taken the paused one's batch before it
/// resumes.
const RECLAIM_PAUSE: Duration = Duration::from_secs(50);

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// How long the faults go on (the set-up and the quiescence come on top).
    #[arg(long, default_value_t = 5.0)]
    pub minutes: f64,
    /// Fixes the fault schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the service binaries are (`target/release`, `target/debug`).
    #[arg(long)]
    pub bin_dir: PathBuf,
    /// Simulated agents.
    #[arg(long, default_value_t = 6)]
    pub sims: usize,
    /// How often a failing seed is run again, to say how often the failure recurs.
    #[arg(long, default_value_t = 3)]
    pub reruns: u32,
}

/// What the run's clients and drivers noted.
#[derive(Default)]
pub struct Ledger {
    pub created: Mutex<Vec<String>>,
    pub refused_checks: Mutex<BTreeMap<String, u64>>,
    pub refused_actions: Mutex<BTreeMap<String, u64>>,
    /// What the simulated agents' reports were answered, per status or error code.
    pub report_answers: Mutex<BTreeMap<String, u64>>,
    pub acks: Mutex<Vec<verify::Ack>>,
    pub actions: Mutex<Vec<verify::ActionRecord>>,
    pub sets: Mutex<Vec<verify::SetCommand>>,
    pub sse: Mutex<Vec<SseLog>>,
    pub faults: Mutex<Vec<FaultRecord>>,
    pub reloads: Mutex<Vec<Reload>>,
    pub max_lag: AtomicI64,
    /// Reports sent by a killed simulated agent's ghost.
    pub ghost_reports: AtomicI64,
    /// What the admin did with dead letters.
    pub letters: Mutex<Vec<verify::LetterAction>>,
    /// `<agent>.<kind>.<entry>` the simulated agents got back at an epoch above 1.
    pub reclaimed: Mutex<std::collections::HashSet<String>>,
}

impl Ledger {
    fn fault(&self, class: &str, target: &str, detail: String) {
        eprintln!("chaos: {class} {target} {detail}");
        self.faults.lock().unwrap().push(FaultRecord {
            class: class.to_owned(),
            target: target.to_owned(),
            at_ms: now_ms(),
            detail,
        });
    }
}

/// Run the seed; on failure run it again `reruns` times. The process's exit code.
pub fn main(args: ChaosArgs) -> i32 {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let first = runtime.block_on(run_once(&args));
    // On stdout (what bench/run records) and at once on stderr, before any re-run.
    eprintln!("{}", first.summary);
    println!("{}", first.summary);
    if first.verdict.passed() {
        return 0;
    }
    let mut recurred = 0;
    for i in 1..=args.reruns {
        eprintln!(
            "chaos: seed {} failed; re-run {i} of {}",
            args.seed, args.reruns
        );
        let again = runtime.block_on(run_once(&args));
        if !again.verdict.passed() {
            recurred += 1;
        }
        eprintln!("{}", again.summary);
    }
    println!(
        "chaos: seed {} FAILED; the failure recurred in {recurred} of {} re-runs",
        args.seed, args.reruns
    );
    1
}

struct Outcome {
    verdict: verify::Verdict,
    summary: String,
}

/// The two HAProxy instances' backend: four servers nobody health-checks, so their state is
/// what is set.
fn backends() -> Vec<(&'static str, Vec<(&'static str, u16)>)> {
    vec![("be", vec![("s0", 1), ("s1", 2), ("s2", 3), ("s3", 4)])]
}

fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// An agent's check pools: dns, http, tcp, ping, trace.
fn pools(sizes: [u32; 5]) -> Vec<(String, String)> {
    ["DNS", "HTTP", "TCP", "PING", "TRACE"]
        .iter()
        .zip(sizes)
        .map(|(kind, n)| (format!("AGENT_POOL_{kind}_SIZE"), n.to_string()))
        .collect()
}

fn port() -> u16 {
    checkplane_testkit::process::free_port()
}

/// The run's dependencies, owned by it.
struct Deps {
    redis: Arc<Mutex<RedisServer>>,
    pg: Arc<PostgresServer>,
    haproxy: Vec<(String, Arc<Haproxy>)>,
    unbound: checkplane_testkit::dns::Unbound,
}

async fn run_once(args: &ChaosArgs) -> Outcome {
    let started = Instant::now();
    let length = Duration::from_secs_f64(args.minutes * 60.0);
    let work = std::env::temp_dir().join(format!(
        "cp-chaos-{}-{}",
        args.seed,
        uuid::Uuid::new_v4().simple()
    ));
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    eprintln!(
        "chaos: seed {}, {:.1} min of faults; logs in {}",
        args.seed,
        args.minutes,
        logs.display()
    );

    // Dependencies of its own.
    let (redis, pg, haproxy, unbound) = tokio::task::spawn_blocking(|| {
        let redis = RedisServer::start_with_fsync("everysec");
        let pg = PostgresServer::start();
        let a = Haproxy::start(&backends());
        let b = Haproxy::start(&backends());
        let c = Haproxy::start(&backends());
        (
            redis,
            pg,
            vec![a, b, c],
            checkplane_testkit::dns::Unbound::start(),
        )
    })
    .await
    .unwrap();
    let redis_url = redis.url();
    let redis_addr: std::net::SocketAddr = ([127, 0, 0, 1], redis.port).into();
    let admin_url = pg.url();
    let (admin, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute("CREATE DATABASE checkplane")
        .await
        .unwrap();
    drop(admin);
    let db_url = format!("{}/checkplane", admin_url.rsplit_once('/').unwrap().0);
    let deps = Deps {
        redis: Arc::new(Mutex::new(redis)),
        pg: Arc::new(pg),
        haproxy: ["lb-a", "lb-b", "lb-c"]
            .iter()
            .map(|s| (*s).to_owned())
            .zip(haproxy.into_iter().map(Arc::new))
            .collect(),
        unbound,
    };
    let ledger = Arc::new(Ledger::default());
    let stop_all = CancellationToken::new();

    // Loopback targets: a TCP listener that accepts, an HTTP server that answers.
    let tcp_target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_port = tcp_target.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = tcp_target.accept().await {
            drop(socket);
        }
    });
    let http_target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_url = format!("http://{}/", http_target.local_addr().unwrap());
    tokio::spawn(async move {
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let _ = axum::serve(http_target, app).await;
    });

    // Recording proxies in front of each Runtime API.
    let mut proxy_addrs = Vec::new();
    for (label, ha) in &deps.haproxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        proxy_addrs.push(listener.local_addr().unwrap());
        tokio::spawn(procs::recording_proxy(
            listener,
            label.clone(),
            ha.stats,
            ledger.clone(),
            stop_all.clone(),
        ));
    }

    // Each scheduler's way to Redis, which can lose an `XACK`.
    let mut cuts = BTreeMap::new();
    let mut scheduler_redis = Vec::new();
    for i in 1..=2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        scheduler_redis.push(format!("redis://{}", listener.local_addr().unwrap()));
        let name = format!("scheduler-{i}");
        let cut = Arc::new(procs::AckCut::default());
        cuts.insert(name.clone(), cut.clone());
        tokio::spawn(procs::ack_cutting_proxy(
            listener,
            name,
            redis_addr,
            cut,
            ledger.clone(),
            stop_all.clone(),
        ));
    }

    // The services.
    let gw_ports = [port(), port()];
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", front.local_addr().unwrap());
    tokio::spawn(procs::front_door(
        front,
        gw_ports.to_vec(),
        stop_all.clone(),
    ));
    let store = [
        ("DATABASE_URL", db_url.clone()),
        ("REDIS_URL", redis_url.clone()),
        ("DATABASE_POOL_SIZE", "6".to_owned()),
        ("REDIS_POOL_SIZE", "6".to_owned()),
        ("LOG_LEVEL", "info".to_owned()),
        ("SHUTDOWN_TIMEOUT", "3s".to_owned()),
        // lb-c's operator socket is in a scratch directory of the temp dir.
        (
            "HAPROXY_ALLOWED_ADDRESSES",
            checkplane_testkit::haproxy_allowed(),
        ),
    ];
    let bin = |name: &str| args.bin_dir.join(name);
    let mut services = Vec::new();
    for (i, p) in gw_ports.iter().enumerate() {
        let mut e = env(&store);
        e.extend(env(&[
            ("HTTP_ADDR", format!("127.0.0.1:{p}")),
            ("GATEWAY_ADMIN_KEY", ADMIN.to_owned()),
            ("GATEWAY_ENROLLMENT_TOKEN", ENROLL.to_owned()),
            ("GATEWAY_ALLOW_PRIVATE_TARGETS", "true".to_owned()),
            ("LEASE_TTL", format!("{}s", LEASE_TTL.as_secs())),
            ("HEARTBEAT_INTERVAL", "2s".to_owned()),
            ("CLAIM_BLOCK_MS", "2000".to_owned()),
            // A task is dead-lettered on its third delivery.
            ("MAX_DELIVERIES", "2".to_owned()),
            ("GATEWAY_LIVE_POLL", "500ms".to_owned()),
            // Every simulated agent is on 127.0.0.1: no per-address connection cap; and every
            // operator call (live streams, waiting action lookups) uses one key.
            ("HTTP_MAX_CONNECTIONS_PER_ADDRESS", "0".to_owned()),
            ("GATEWAY_MAX_WAITS_PER_KEY", "100000".to_owned()),
            // Killed agents' ghosts fail to authenticate from the same address as the living.
            ("GATEWAY_RATE_AUTH_FAILURES", "10000/1m".to_owned()),
            // The driver's checks, live streams and actions are all one key. The agents'
            // limits stay at their defaults.
            ("GATEWAY_RATE_OPERATOR", "off".to_owned()),
        ]));
        services.push(Service::new(
            &format!("gateway-{}", i + 1),
            &bin("gateway"),
            e,
            &logs,
            format!("http://127.0.0.1:{p}/readyz"),
        ));
    }
    for i in 1..=2 {
        let p = port();
        let mut e = env(&store);
        e.extend(env(&[
            ("HTTP_ADDR", format!("127.0.0.1:{p}")),
            ("CONSUMER_NAME", format!("sched-{i}")),
            ("REDIS_URL", scheduler_redis[i - 1].clone()),
            ("OFFLINE_GRACE", "3s".to_owned()),
            ("OUTBOX_MIN_AGE", "1s".to_owned()),
            ("RETRY_BACKOFF", "1s".to_owned()),
        ]));
        services.push(Service::new(
            &format!("scheduler-{i}"),
            &bin("scheduler"),
            e,
            &logs,
            format!("http://127.0.0.1:{p}/readyz"),
        ));
    }
    for i in 1..=2 {
        let p = port();
        let mut e = env(&store);
        e.extend(env(&[
            ("HTTP_ADDR", format!("127.0.0.1:{p}")),
            ("HAPROXY_SYNC_INTERVAL", "5s".to_owned()),
            ("HAPROXY_SYNC_LEASE", "3s".to_owned()),
            ("HAPROXY_SYNC_TIMEOUT", "2s".to_owned()),
            ("HAPROXY_RELOAD_PROBE_INTERVAL", "1s".to_owned()),
            ("HAPROXY_ACTION_RETRY_BASE", "200ms".to_owned()),
            ("HAPROXY_BREAKER_COOLDOWN", "2s".to_owned()),
        ]));
        services.push(Service::new(
            &format!("haproxy-sync-{i}"),
            &bin("haproxy-sync"),
            e,
            &logs,
            format!("http://127.0.0.1:{p}/readyz"),
        ));
    }
    let agent_env = |hostname: &str, health: u16| {
        env(&[
            ("AGENT_CONTROL_PLANE", format!("{base}/")),
            // The gateways behind HAProxy on loopback.
            ("AGENT_ALLOW_PLAINTEXT", "true".to_owned()),
            (
                "AGENT_STATE_FILE",
                work.join(format!("{hostname}.json")).display().to_string(),
            ),
            ("AGENT_ENROLLMENT_TOKEN", ENROLL.to_owned()),
            ("AGENT_HOSTNAME", hostname.to_owned()),
            ("AGENT_HEALTH_ADDR", format!("127.0.0.1:{health}")),
            ("AGENT_METRICS_INTERVAL", "10s".to_owned()),
            ("LOG_LEVEL", "info".to_owned()),
            ("SHUTDOWN_TIMEOUT", "3s".to_owned()),
        ])
    };
    let p = port();
    let mut e = agent_env("probe-1", p);
    e.extend(pools([4, 2, 4, 2, 1]));
    e.push(("AGENT_ALLOW_PRIVATE_TARGETS".into(), "true".into()));
    services.push(Service::new(
        "agent-probe",
        &bin("agent"),
        e,
        &logs,
        format!("http://127.0.0.1:{p}/livez"),
    ));
    let p = port();
    let mut e = agent_env("lb-node-b", p);
    e.extend(pools([0; 5]));
    e.push(("AGENT_HAPROXY_SOCKET".into(), proxy_addrs[1].to_string()));
    services.push(Service::new(
        "agent-relay",
        &bin("agent"),
        e,
        &logs,
        format!("http://127.0.0.1:{p}/livez"),
    ));

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    // The first gateway migrates; then every other process starts.
    services[0].start().unwrap();
    wait_ready(&http, &services[0].ready_url, &services[0]).await;
    for s in services.iter_mut().skip(1) {
        s.start().unwrap();
    }
    for s in &services {
        wait_ready(&http, &s.ready_url, s).await;
    }
    let services = Arc::new(Mutex::new(services));

    // Simulated agents.
    let mut sims = Vec::new();
    for i in 0..args.sims {
        let agent = load::register_sim(&http, &base, i).await;
        let stop = stop_all.child_token();
        tokio::spawn(load::sim_agent(
            http.clone(),
            base.clone(),
            agent.clone(),
            0,
            ledger.clone(),
            stop.clone(),
        ));
        sims.push((agent, stop));
    }
    let sims = Arc::new(Mutex::new(sims));

    // HAProxy: lb-a polled directly (through its recording proxy), lb-b through its node's
    // agent (whose socket is the recording proxy), lb-c directly on an operator-level socket.
    let relay = agent_id(&http, &base, "lb-node-b").await;
    let marked = http
        .put(format!("{base}/v1/servers/{relay}/haproxy"))
        .header("x-api-key", ADMIN)
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap();
    assert!(
        marked.status().is_success(),
        "marking the node: {}",
        marked.status()
    );
    for body in [
        json!({"name": "lb-a", "address": proxy_addrs[0].to_string()}),
        json!({"name": "lb-b", "transport": "agent", "node": relay}),
        // An operator-level socket: every action on lb-c is refused by HAProxy (`Permission
        // denied`), so none of them may ever become a server's desired state.
        json!({"name": "lb-c", "address": deps.haproxy[2].1.operator_socket.display().to_string()}),
    ] {
        let r = http
            .post(format!("{base}/v1/haproxy/instances"))
            .header("x-api-key", ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "registering {body}: {}",
            r.status()
        );
    }
    let (pg_client, connection) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let servers = until(
        "12 HAProxy servers synced",
        Duration::from_secs(60),
        || async {
            let rows = pg_client
                .query(
                    "SELECT s.server_id, i.name, s.backend, s.name FROM haproxy_servers s
                 JOIN haproxy_instances i USING (instance_id)",
                    &[],
                )
                .await
                .ok()?;
            (rows.len() == 12).then(|| {
                rows.iter()
                    .map(|r| {
                        (
                            r.get::<_, String>(0),
                            format!(
                                "{}/{}/{}",
                                r.get::<_, String>(1),
                                r.get::<_, String>(2),
                                r.get::<_, String>(3)
                            ),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        },
    )
    .await;
    drop(pg_client);
    until(
        "the probe agent online",
        Duration::from_secs(30),
        || async {
            let page = admin_get(&http, &base, "/v1/agents?status=online&limit=100").await?;
            page["items"]
                .as_array()?
                .iter()
                .any(|a| a["hostname"] == "probe-1")
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "chaos: everything up after {:.1} s; load and faults for {:.0} s",
        started.elapsed().as_secs_f64(),
        length.as_secs_f64()
    );

    // The load.
    let stop_load = stop_all.child_token();
    let targets = load::Targets {
        dns_resolver: deps.unbound.addr(),
        tcp_port,
        http_url,
    };
    tokio::spawn(load::make_checks(
        http.clone(),
        base.clone(),
        targets,
        Duration::from_millis(400),
        args.seed,
        ledger.clone(),
        stop_load.clone(),
    ));
    let mut drivers = Vec::new();
    let run = format!("r{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    for (id, label) in &servers {
        drivers.push(tokio::spawn(load::act_on_server(
            http.clone(),
            base.clone(),
            id.clone(),
            label.clone(),
            run.clone(),
            args.seed,
            ledger.clone(),
            stop_load.clone(),
        )));
    }
    let stop_followers = stop_all.child_token();
    let followers: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(load::follow_checks(
                http.clone(),
                base.clone(),
                ledger.clone(),
                stop_followers.clone(),
            ))
        })
        .collect();
    let admin = tokio::spawn(load::handle_dead_letters(
        http.clone(),
        base.clone(),
        ledger.clone(),
        stop_followers.clone(),
    ));
    tokio::spawn(load::sample_lag(
        redis_url.clone(),
        "cp".to_owned(),
        ledger.clone(),
        stop_all.clone(),
    ));

    // The faults.
    let names: Vec<String> = {
        let s = services.lock().unwrap();
        s.iter()
            .map(|s| s.name.clone())
            .chain((0..args.sims).map(|i| format!("sim-{i}")))
            .collect()
    };
    let pausable: Vec<String> = names
        .iter()
        .filter(|n| !n.starts_with("sim-"))
        .cloned()
        .collect();
    let instances: Vec<String> = deps.haproxy.iter().map(|(l, _)| l.clone()).collect();
    let schedulers: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with("scheduler-"))
        .cloned()
        .collect();
    let cast = schedule::Cast {
        processes: &names,
        pausable: &pausable,
        schedulers: &schedulers,
        instances: &instances,
    };
    let plan = schedule::plan(args.seed, length, &cast, PAUSE, RECLAIM_PAUSE);
    let chaos_started = Instant::now();
    let mut restarts = Vec::new();
    for (at, fault) in &plan {
        tokio::time::sleep_until((chaos_started + *at).into()).await;
        restarts.push(inject(
            fault, &services, &sims, &deps, &cuts, &http, &base, &ledger, &stop_all,
        ));
    }
    tokio::time::sleep_until((chaos_started + length).into()).await;
    for r in restarts {
        let _ = r.await;
    }

    // Quiescence: everything up, the load stopped, the work finished.
    eprintln!(
        "chaos: faults over after {:.0} s; waiting for quiescence",
        started.elapsed().as_secs_f64()
    );
    {
        let mut s = services.lock().unwrap();
        for service in s.iter_mut() {
            if service.paused {
                service.pause(false);
            }
            if !service.running() {
                eprintln!("chaos: {} was down at the end; starting it", service.name);
                let _ = service.start();
            }
        }
    }
    stop_load.cancel();
    for d in drivers {
        let _ = d.await;
    }
    let (pg_client, connection) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut quiet = Vec::new();
    let finished = wait_for(Duration::from_secs(120), || async {
        let open: i64 = pg_client
            .query_one(
                "SELECT count(*) FROM checks WHERE status <> 'finished'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (open == 0).then_some(())
    })
    .await;
    if finished.is_none() {
        quiet.push("checks still open after 120 s".to_owned());
    }
    let redis_conn = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // The leftovers are what this wait saw last: an empty moment is quiescence (the services
    // keep working afterwards, so a later look may catch an entry in flight).
    let last_seen: Arc<Mutex<(i64, Vec<verify::Pending>)>> = Arc::default();
    let drained = wait_for(Duration::from_secs(60), || {
        let mut conn = redis_conn.clone();
        let (pg, last_seen) = (&pg_client, last_seen.clone());
        async move {
            let outbox: i64 = pg
                .query_one("SELECT count(*) FROM outbox", &[])
                .await
                .ok()?
                .get(0);
            let pending = collect::pending(&mut conn, "cp").await.ok()?;
            let empty = outbox == 0 && pending.is_empty();
            *last_seen.lock().unwrap() = (outbox, pending);
            empty.then_some(())
        }
    })
    .await;
    if drained.is_none() {
        quiet.push("outbox or streams not drained after 60 s".to_owned());
    }
    // Each server's last successfully requested state, as HAProxy should hold it.
    let converged = wait_for(Duration::from_secs(30), || async {
        let states = final_states(&deps).await;
        let expected = expected_states(&pg_client, &ledger).await?;
        (states.len() == 12).then_some(())?;
        states
            .iter()
            .all(|(server, state)| expected.get(server).map_or("ready", String::as_str) == state)
            .then_some(())
    })
    .await;
    if converged.is_none() {
        quiet.push("HAProxy states not converged after 30 s".to_owned());
    }
    stop_followers.cancel();
    for f in followers {
        let _ = f.await;
    }
    let _ = admin.await;
    for (_, stop) in sims.lock().unwrap().iter() {
        stop.cancel();
    }

    // The records.
    let mut records = Records {
        created: ledger.created.lock().unwrap().clone(),
        acks: ledger.acks.lock().unwrap().clone(),
        actions: ledger.actions.lock().unwrap().clone(),
        sets: ledger.sets.lock().unwrap().clone(),
        reloads: ledger.reloads.lock().unwrap().clone(),
        sse: ledger.sse.lock().unwrap().clone(),
        letters: ledger.letters.lock().unwrap().clone(),
        faults: ledger.faults.lock().unwrap().clone(),
        asked: schedule::CLASSES.iter().map(|c| (*c).to_owned()).collect(),
        max_projector_lag: ledger.max_lag.load(Ordering::Relaxed),
        ..Records::default()
    };
    collect::from_postgres(&pg_client, &mut records)
        .await
        .unwrap();
    {
        let (outbox, pending) = last_seen.lock().unwrap().clone();
        records.outbox = outbox;
        records.pending = pending;
    }
    records.final_states = final_states(&deps).await;
    if let Some(page) = admin_get(&http, &base, "/v1/dead-letters?limit=500").await {
        for d in page["items"].as_array().into_iter().flatten() {
            records.dead_letters.push(format!(
                "{} task {} of {} ({}): {} after {} deliveries",
                d["id"].as_str().unwrap_or("?"),
                d["task"].as_str().unwrap_or("-"),
                d["agent_id"].as_str().unwrap_or("?"),
                d["kind"].as_str().unwrap_or("?"),
                d["reason"].as_str().unwrap_or("?"),
                d["deliveries"]
            ));
        }
    }
    drop(pg_client);
    let mut log_tails = String::new();
    {
        let mut s = services.lock().unwrap();
        for service in s.iter_mut() {
            service.stop();
        }
        for service in s.iter() {
            let text = std::fs::read_to_string(service.log_path()).unwrap_or_default();
            let panics = text.lines().filter(|l| l.contains("panicked")).count();
            records.redelivered += collect::redelivered(&text);
            if panics > 0 {
                log_tails.push_str(&format!("{}: {panics} panics\n", service.name));
            }
        }
    }
    for (by, how) in [
        ("scheduler", collect::Rebuild::AsIs),
        ("haproxy-sync", collect::Rebuild::AsIs),
        ("scheduler", collect::Rebuild::EveryEventExpired),
    ] {
        if let Err(e) = collect::rebuild_and_compare(
            &admin_url,
            "checkplane",
            by,
            &bin(by),
            how,
            &mut records.rebuilds,
        )
        .await
        {
            quiet.push(format!("rebuild by {by} ({how:?}) failed: {e}"));
        }
    }
    stop_all.cancel();

    let mut verdict = verify::verify(&records);
    for q in quiet {
        verdict.violations.push(format!("not quiescent: {q}"));
    }
    if !log_tails.is_empty() {
        verdict
            .violations
            .push(format!("service panics:\n{log_tails}"));
    }
    let summary = summarize(
        args,
        &records,
        &verdict,
        &ledger,
        &plan,
        started.elapsed(),
        &logs,
    );
    if verdict.passed() {
        let _ = std::fs::remove_dir_all(&work);
    }
    drop(deps);
    Outcome { verdict, summary }
}

/// Carry out one fault; the returned task finishes once what it took down is back.
#[allow(clippy::too_many_arguments)]
fn inject(
    fault: &Fault,
    services: &Arc<Mutex<Vec<Service>>>,
    sims: &Arc<Mutex<Vec<(load::SimAgent, CancellationToken)>>>,
    deps: &Deps,
    cuts: &BTreeMap<String, Arc<procs::AckCut>>,
    http: &reqwest::Client,
    base: &str,
    ledger: &Arc<Ledger>,
    stop_all: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let ledger = ledger.clone();
    let class = fault.class();
    match fault.clone() {
        Fault::Kill { target, down } if target.starts_with("sim-") => {
            let i: usize = target[4..].parse().unwrap_or(0);
            let agent = {
                let sims = sims.lock().unwrap();
                sims[i].1.cancel();
                sims[i].0.clone()
            };
            ledger.fault(class, &target, format!("down {} ms", down.as_millis()));
            let (sims, http, base, stop_all) = (
                sims.clone(),
                http.clone(),
                base.to_owned(),
                stop_all.clone(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(down).await;
                let stop = stop_all.child_token();
                let life = now_ms() as u64;
                tokio::spawn(load::sim_agent(
                    http,
                    base,
                    agent,
                    life,
                    ledger,
                    stop.clone(),
                ));
                sims.lock().unwrap()[i].1 = stop;
            })
        }
        Fault::Kill { target, down } => {
            // A paused process is left to its pause (which would otherwise be cut short), and
            // a fault is counted only when it happened.
            let killed = services
                .lock()
                .unwrap()
                .iter_mut()
                .find(|s| s.name == target)
                .filter(|s| !s.paused)
                .map(Service::kill)
                .is_some();
            if !killed {
                eprintln!("chaos: kill {target} skipped (paused)");
                return tokio::spawn(async {});
            }
            ledger.fault(class, &target, format!("down {} ms", down.as_millis()));
            let services = services.clone();
            tokio::spawn(async move {
                tokio::time::sleep(down).await;
                if let Some(s) = services
                    .lock()
                    .unwrap()
                    .iter_mut()
                    .find(|s| s.name == target)
                {
                    if !s.running() {
                        let _ = s.start();
                    }
                }
            })
        }
        Fault::Pause { target, paused, .. } => {
            // Only a running process that is not paused already is paused (and counted).
            let stopped = services
                .lock()
                .unwrap()
                .iter_mut()
                .find(|s| s.name == target)
                .filter(|s| !s.paused)
                .and_then(|s| s.running().then(|| s.pause(true)))
                .is_some();
            if !stopped {
                eprintln!("chaos: pause {target} skipped (down or paused already)");
                return tokio::spawn(async {});
            }
            ledger.fault(
                class,
                &target,
                format!(
                    "for {} ms (lease TTL {} ms)",
                    paused.as_millis(),
                    LEASE_TTL.as_millis()
                ),
            );
            let services = services.clone();
            tokio::spawn(async move {
                tokio::time::sleep(paused).await;
                if let Some(s) = services
                    .lock()
                    .unwrap()
                    .iter_mut()
                    .find(|s| s.name == target)
                {
                    if s.paused {
                        s.pause(false);
                    }
                }
            })
        }
        Fault::RedisKill { down } | Fault::RedisRestart { down } => {
            let graceful = matches!(fault, Fault::RedisRestart { .. });
            let redis = deps.redis.clone();
            tokio::task::spawn_blocking(move || {
                let mut redis = redis.lock().unwrap();
                if graceful {
                    let _ = std::process::Command::new("redis-cli")
                        .args(["-p", &redis.port.to_string(), "SHUTDOWN"])
                        .output();
                    ledger.fault(
                        class,
                        "redis",
                        format!("SHUTDOWN, down {} ms", down.as_millis()),
                    );
                } else {
                    ledger.fault(
                        class,
                        "redis",
                        format!("SIGKILL, down {} ms", down.as_millis()),
                    );
                }
                redis.stop();
                std::thread::sleep(down);
                redis.resume();
            })
        }
        Fault::PgRestart { down } => {
            let pg = deps.pg.clone();
            tokio::task::spawn_blocking(move || {
                ledger.fault(
                    class,
                    "postgres",
                    format!("immediate stop, down {} ms", down.as_millis()),
                );
                pg.stop();
                std::thread::sleep(down);
                pg.resume();
            })
        }
        Fault::AckCut { target } => {
            // Noted by the proxy when its cut happens.
            if let Some(cut) = cuts.get(&target) {
                cut.arm();
            }
            tokio::spawn(async {})
        }
        Fault::Reload {
            instance,
            keep_state,
        } => {
            let ha = deps
                .haproxy
                .iter()
                .find(|(l, _)| *l == instance)
                .map(|(_, h)| h.clone());
            tokio::task::spawn_blocking(move || {
                let Some(ha) = ha else { return };
                if keep_state {
                    ha.save_state();
                } else {
                    ha.forget_state();
                }
                ledger.fault(class, &instance, "through the master CLI".to_owned());
                ha.reload(&backends());
                // When the new worker answers: a `set` before it and the re-apply after it
                // fall on either side.
                ledger.reloads.lock().unwrap().push(Reload {
                    instance: instance.clone(),
                    at_ms: now_ms(),
                });
            })
        }
    }
}

async fn wait_ready(http: &reqwest::Client, url: &str, service: &Service) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = http
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} not ready within 60 s: {}",
            service.name,
            std::fs::read_to_string(service.log_path()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn admin_get(http: &reqwest::Client, base: &str, path: &str) -> Option<Value> {
    let r = http
        .get(format!("{base}{path}"))
        .header("x-api-key", ADMIN)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

async fn agent_id(http: &reqwest::Client, base: &str, hostname: &str) -> String {
    until(
        &format!("agent {hostname} registered"),
        Duration::from_secs(30),
        || async {
            let page = admin_get(http, base, "/v1/agents?limit=100").await?;
            page["items"]
                .as_array()?
                .iter()
                .find(|a| a["hostname"] == hostname)
                .and_then(|a| a["agent_id"].as_str().map(str::to_owned))
        },
    )
    .await
}

/// Poll every 250 ms until `probe` answers, within `within`.
async fn wait_for<T, F, Fut>(within: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// [`wait_for`], or stop the run naming what did not happen (set-up only).
async fn until<T, F, Fut>(what: &str, within: Duration, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match wait_for(within, probe).await {
        Some(v) => v,
        None => panic!("chaos set-up: {what}: not within {within:?}"),
    }
}

/// Each server's admin state as HAProxy itself reports it (read directly, not through the
/// recording proxies).
async fn final_states(deps: &Deps) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (label, ha) in &deps.haproxy {
        let ha = ha.clone();
        let reply = tokio::task::spawn_blocking(move || ha.command("show servers state be"))
            .await
            .unwrap_or_default();
        if let Ok(servers) = checkplane_haproxy::replies::parse_servers_state(&reply) {
            for s in servers {
                out.insert(
                    format!("{label}/{}/{}", s.backend, s.server),
                    s.admin_state.name().to_owned(),
                );
            }
        }
    }
    out
}

/// Each server's last successful action, from PostgreSQL.
async fn expected_states(
    pg: &tokio_postgres::Client,
    ledger: &Ledger,
) -> Option<BTreeMap<String, String>> {
    let rows = pg
        .query("SELECT idempotency_key, status FROM haproxy_actions", &[])
        .await
        .ok()?;
    let status: BTreeMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut actions = ledger.actions.lock().unwrap().clone();
    actions.sort_by_key(|a| a.requested_ms);
    let mut out = BTreeMap::new();
    for a in actions {
        if status.get(&a.key).map(String::as_str) == Some("success") {
            out.insert(a.server, a.action);
        }
    }
    Some(out)
}

fn summarize(
    args: &ChaosArgs,
    records: &Records,
    verdict: &verify::Verdict,
    ledger: &Ledger,
    plan: &[(Duration, Fault)],
    took: Duration,
    logs: &Path,
) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "chaos: seed {}, {:.1} min of faults ({} planned), {:.0} s in all: {}\n",
        args.seed,
        args.minutes,
        plan.len(),
        took.as_secs_f64(),
        if verdict.passed() { "PASSED" } else { "FAILED" }
    ));
    for (what, n) in &verdict.counts {
        out.push_str(&format!("  {what}: {n}\n"));
    }
    for (why, n) in ledger.refused_checks.lock().unwrap().iter() {
        out.push_str(&format!("  checks not made ({why}): {n}\n"));
    }
    for (why, n) in ledger.refused_actions.lock().unwrap().iter() {
        out.push_str(&format!("  actions refused ({why}): {n}\n"));
    }
    for (said, n) in ledger.report_answers.lock().unwrap().iter() {
        out.push_str(&format!(
            "  simulated agents' reports answered {said}: {n}\n"
        ));
    }
    out.push_str(&format!(
        "  late reports of killed simulated agents (their ghosts): {}\n",
        ledger.ghost_reports.load(Ordering::Relaxed)
    ));
    let resumed: usize = records.sse.iter().filter(|s| s.resumed > 0).count();
    out.push_str(&format!(
        "  live streams that resumed with Last-Event-ID: {resumed}\n"
    ));
    if !verdict.lost_to_redis.is_empty() {
        out.push_str("  acknowledged reports lost with a Redis SIGKILL:\n");
        for l in &verdict.lost_to_redis {
            out.push_str(&format!("    {l}\n"));
        }
    }
    for note in &verdict.notes {
        out.push_str(&format!("  note: {note}\n"));
    }
    if !records.dead_letters.is_empty() {
        out.push_str("  dead letters:\n");
        for d in &records.dead_letters {
            out.push_str(&format!("    {d}\n"));
        }
    }
    if !verdict.passed() {
        out.push_str(&format!(
            "  VIOLATIONS ({}; logs kept in {}):\n",
            verdict.violations.len(),
            logs.display()
        ));
        for v in verdict.violations.iter().take(50) {
            out.push_str(&format!("    {v}\n"));
        }
        out.push_str("  the faults (ms since the epoch):\n");
        for f in &records.faults {
            out.push_str(&format!(
                "    {} {} {} {}\n",
                f.at_ms, f.class, f.target, f.detail
            ));
        }
    }
    let json = json!({"bench": "chaos", "seed": args.seed, "minutes": args.minutes,
        "passed": verdict.passed(), "violations": verdict.violations.len(),
        "lost_to_redis": verdict.lost_to_redis.len(), "counts": verdict.counts});
    out.push_str(&json.to_string());
    out
}
