//! `dns-proxy`: dnsperf (Debian's) against the agent's caching DNS proxy on its cached path,
//! and in the same run against unbound serving the same names with the same number of
//! threads (the proxy's runtime gets as many worker threads as unbound gets threads). The
//! sides alternate for `rounds`; each round is a throughput pass (dnsperf as fast as it can)
//! and a latency pass at a fixed rate with per-query timings (`-v`) for p50 / p99.
//!
//! `agent-rss`: the real agent process (release build) against gateway + scheduler: its
//! resident memory idle, and with 1,000 checks in flight (tcp connects hanging on a full
//! accept queue until their deadline).

use std::process::Command;
use std::time::{Duration, Instant};

use checkplane_testkit::dns::{Unbound, ZONE};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct DnsArgs {
    /// Names served (n<i>.example.test), all asked in turn.
    #[arg(long, default_value_t = 1000)]
    names: usize,
    /// Threads of unbound and worker threads of the proxy's runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds of each throughput pass.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Queries per second of the latency pass.
    #[arg(long, default_value_t = 10_000)]
    latency_qps: u32,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// `dnsperf -s 127.0.0.1 -p port -d file <extra>`: what it printed.
fn dnsperf(port: u16, file: &std::path::Path, extra: &[String]) -> String {
    let out = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(file)
        .args(extra)
        .output()
        .expect("dnsperf (bench/run installs it)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `Response codes:       NOERROR 1000 (100.00%)`: every answer NOERROR.
fn all_noerror(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim();
        l.starts_with("Response codes:")
            && l.contains("NOERROR")
            && l.ends_with("(100.00%)")
            && !l.contains(',')
    })
}

fn number_after(text: &str, label: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
    line[line.find(label)? + label.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

struct Pass {
    qps: f64,
    lost: f64,
    p50_ms: f64,
    p99_ms: f64,
    noerror: bool,
}

fn pass(port: u16, file: &std::path::Path, args: &DnsArgs) -> Pass {
    let throughput = dnsperf(
        port,
        file,
        &[
            "-l".into(),
            args.seconds.to_string(),
            "-c".into(),
            "20".into(),
            "-q".into(),
            "500".into(),
        ],
    );
    if std::env::var_os("DNS_BENCH_DEBUG").is_some() {
        eprintln!("{throughput}");
    }
    let qps = number_after(&throughput, "Queries per second:").unwrap_or(0.0);
    let lost = number_after(&throughput, "Queries lost:").unwrap_or(0.0);
    let noerror = all_noerror(&throughput);
    let timed = dnsperf(
        port,
        file,
        &[
            "-l".into(),
            "2".into(),
            "-Q".into(),
            args.latency_qps.to_string(),
            "-v".into(),
        ],
    );
    // `> NOERROR n1.example.test A 0.000062`: the last field is the latency in seconds.
    let mut latencies: Vec<f64> = timed
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|s| s * 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Pass {
        qps,
        lost,
        p50_ms: (at(0.5) * 1000.0).round() / 1000.0,
        p99_ms: (at(0.99) * 1000.0).round() / 1000.0,
        noerror,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn proxy(args: DnsArgs) {
    let more: Vec<String> = (0..args.names)
        .map(|i| format!("n{i}.example.test. 300 IN A 198.51.100.{}", i % 250 + 1))
        .collect();
    let unbound = Unbound::start_with(ZONE, &more, args.threads as u32);
    let dir = std::env::temp_dir().join(format!("cp-dnsperf-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("names.txt");
    let names: String = (0..args.names)
        .map(|i| format!("n{i}.example.test A\n"))
        .collect();
    std::fs::write(&file, names).unwrap();

    // The proxy on a runtime of its own with the same thread count as unbound.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .unwrap();
    let port = checkplane_testkit::process::free_port();
    let stop = CancellationToken::new();
    let settings = agent::dns_proxy::Settings {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        allow_from: agent::dns_proxy::AllowFrom::loopback(),
        upstream: unbound.addr().parse().unwrap(),
        upstream_timeout: Duration::from_secs(2),
        cache_size: 100_000,
        max_inflight: 1024,
        stale: Duration::from_secs(3600),
    };
    runtime
        .block_on(agent::dns_proxy::start(settings, stop.clone()))
        .unwrap();
    // Warm: every name once through the proxy (its misses go to unbound).
    let warm = dnsperf(port, &file, &["-n".into(), "1".into()]);
    assert!(all_noerror(&warm), "warming the proxy: {warm}");

    let (mut ub, mut px) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let u = pass(unbound.port, &file, &args);
        let p = pass(port, &file, &args);
        eprintln!(
            "round {round}: unbound {:.0} q/s (p99 {} ms), proxy {:.0} q/s (p99 {} ms)",
            u.qps, u.p99_ms, p.qps, p.p99_ms
        );
        assert!(u.noerror && p.noerror, "every answer NOERROR");
        ub.push(u);
        px.push(p);
    }
    let summary = |side: &str, passes: &[Pass]| -> Value {
        json!({
            "side": side,
            "qps": median(passes.iter().map(|p| p.qps).collect()).round(),
            "lost": median(passes.iter().map(|p| p.lost).collect()),
            "p50_ms": median(passes.iter().map(|p| p.p50_ms).collect()),
            "p99_ms": median(passes.iter().map(|p| p.p99_ms).collect()),
            "rounds_qps": passes.iter().map(|p| p.qps.round()).collect::<Vec<_>>(),
        })
    };
    let (u, p) = (summary("unbound", &ub), summary("proxy", &px));
    let ratio = p["qps"].as_f64().unwrap_or(0.0) / u["qps"].as_f64().unwrap_or(1.0);
    println!(
        "{}",
        json!({"bench": "dns_proxy", "names": args.names, "threads": args.threads,
               "seconds": args.seconds, "latency_qps": args.latency_qps, "rounds": args.rounds,
               "unbound": u, "proxy": p, "ratio": (ratio * 1000.0).round() / 1000.0})
    );
    stop.cancel();
    runtime.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[derive(Debug, Clone, clap::Args)]
pub struct RssArgs {
    #[arg(long)]
    pg_url: String,
    #[arg(long)]
    redis_url: String,
    /// The agent binary (bench/run builds it in release).
    #[arg(long)]
    agent_bin: std::path::PathBuf,
    /// Checks in flight for the loaded figure.
    #[arg(long, default_value_t = 1000)]
    checks: usize,
}

/// VmRSS and VmHWM of `pid` (kB).
fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn gauge(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    let text = match http.get(url).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

pub async fn rss(args: RssArgs) {
    let (name, _) = crate::scratch(&args.pg_url).await;
    let db_url = format!("{}/{name}", args.pg_url.rsplit_once('/').unwrap().0);
    let prefix = format!("rss{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let common = [
        ("DATABASE_URL", db_url.as_str()),
        ("REDIS_URL", args.redis_url.as_str()),
        ("STREAM_PREFIX", prefix.as_str()),
        ("LOG_LEVEL", "warn"),
    ];
    let mut gw_env: Vec<(&str, &str)> = common.to_vec();
    gw_env.extend([
        ("GATEWAY_ENROLLMENT_TOKEN", crate::fanout::ENROLL),
        ("GATEWAY_ADMIN_KEY", crate::fanout::ADMIN),
        ("GATEWAY_ALLOW_PRIVATE_TARGETS", "true"),
        // Every client is on 127.0.0.1: no per-address connection cap.
        ("HTTP_MAX_CONNECTIONS_PER_ADDRESS", "0"),
    ]);
    let gw_config = gateway::load(&mut checkplane_runtime::Env::from_pairs(gw_env)).unwrap();
    let sched_config = scheduler::load(&mut checkplane_runtime::Env::from_pairs(common)).unwrap();
    let shutdown = CancellationToken::new();
    let gw_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", gw_listener.local_addr().unwrap());
    let sched_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = tokio::spawn(gateway::run(gw_config, gw_listener, shutdown.clone()));
    let sched = tokio::spawn(scheduler::run(
        sched_config,
        sched_listener,
        shutdown.clone(),
    ));
    let http = reqwest::Client::new();
    crate::fanout::until_ready(&http, &base).await;

    let state = std::env::temp_dir().join(format!("cp-rss-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&state).unwrap();
    let health = checkplane_testkit::process::free_port();
    let n = args.checks.to_string();
    let mut agent = tokio::process::Command::new(&args.agent_bin)
        .envs([
            ("AGENT_CONTROL_PLANE", base.as_str()),
            // The bench's gateway, on loopback.
            ("AGENT_ALLOW_PLAINTEXT", "true"),
            ("AGENT_ENROLLMENT_TOKEN", crate::fanout::ENROLL),
            (
                "AGENT_STATE_FILE",
                &state.join("state.json").display().to_string(),
            ),
            ("AGENT_HEALTH_ADDR", &format!("127.0.0.1:{health}")),
            ("AGENT_ALLOW_PRIVATE_TARGETS", "true"),
            ("AGENT_POOL_TCP_SIZE", &n),
            ("AGENT_MAX_INFLIGHT", &n),
            ("LOG_LEVEL", "warn"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the agent binary");
    let pid = agent.id().unwrap();
    let metrics = format!("http://127.0.0.1:{health}/metrics");
    let (pg, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg
        .query_opt("SELECT 1 FROM agents WHERE status = 'online'", &[])
        .await
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "the agent did not come online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Idle: registered, heartbeating, long-polling, for ten seconds.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (idle_kb, _) = rss_kb(pid);

    // A listener whose accept queue is full: every connect hangs until its deadline.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let port = listener.local_addr().unwrap().port();
    let _fillers: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let started = Instant::now();
    for chunk in (0..args.checks).collect::<Vec<_>>().chunks(50) {
        futures::future::join_all(chunk.iter().map(|_| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let r = http
                    .post(format!("{base}/v1/checks"))
                    .header("x-api-key", crate::fanout::ADMIN)
                    .json(
                        &json!({"kind": "tcp", "target": "127.0.0.1", "options": {"port": port},
                                  "limit": 1, "timeout_ms": 120000}),
                    )
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 202);
            }
        }))
        .await;
    }
    let created_s = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut inflight = 0.0;
    while inflight < args.checks as f64 {
        assert!(
            Instant::now() < deadline,
            "only {inflight} checks in flight"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        inflight = gauge(&http, &metrics, "checkplane_agent_checks_inflight").await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (loaded_kb, peak_kb) = rss_kb(pid);
    println!(
        "{}",
        json!({"bench": "agent_rss", "checks_in_flight": inflight, "idle_rss_mb": (idle_kb as f64 / 102.4).round() / 10.0,
               "loaded_rss_mb": (loaded_kb as f64 / 102.4).round() / 10.0, "peak_rss_mb": (peak_kb as f64 / 102.4).round() / 10.0,
               "create_s": (created_s * 10.0).round() / 10.0})
    );
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    drop(listener);
    shutdown.cancel();
    let _ = gw.await;
    let _ = sched.await;
    drop(pg);
    crate::drop_scratch(&args.pg_url, &name).await;
    let _ = std::fs::remove_dir_all(&state);
}
