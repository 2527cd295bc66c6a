//! `fan-out`: one check to `fan` agents, from `POST /v1/checks` to the last result visible
//! on `GET /v1/checks/{id}`, with `agents` simulated agents long-polling their claims and
//! reporting at once. The gateway and the scheduler run in this process.
//!
//! `fan-out-raw`, the floor of the same data path with nothing of ours in it: tasks added to
//! `fan` agents' Redis streams in one pipeline, each agent blocked in `XREADGROUP` takes its
//! task, acknowledges it and adds a result to a results stream, a collector reads the results
//! and writes them to PostgreSQL in one transaction per read, and the run ends when a
//! `SELECT` sees all of them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::{cpu, drop_scratch, percentile, scratch};

#[derive(Debug, Clone, clap::Args)]
pub struct FanOutArgs {
    /// Admin URL of PostgreSQL (a scratch database is made next to it and dropped).
    #[arg(long)]
    pub pg_url: String,
    /// Redis URL.
    #[arg(long)]
    pub redis_url: String,
    /// Agents connected (long-polling) during the runs.
    #[arg(long, default_value_t = 1_000)]
    pub agents: usize,
    /// Agents one check goes to.
    #[arg(long, default_value_t = 100)]
    pub fan: usize,
    /// Measured runs.
    #[arg(long, default_value_t = 100)]
    pub runs: usize,
    /// Runs before measuring.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
}

/// What a simulated agent reads of a claim's answer.
#[derive(serde::Deserialize)]
struct Claimed {
    leases: Vec<ClaimedLease>,
}

#[derive(serde::Deserialize)]
struct ClaimedLease {
    token: String,
}

/// When claims with work and reports were answered during one run.
#[derive(Default)]
struct Marks {
    claimed: Vec<Instant>,
    reported: Vec<Instant>,
}

pub const ADMIN: &str = "bench-admin-key-0123456789";
pub const ENROLL: &str = "bench-enrollment-token-0123";

pub(crate) fn summary(side: &str, args: &FanOutArgs, mut millis: Vec<f64>, extra: Value) {
    millis.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let round = |v: f64| (v * 100.0).round() / 100.0;
    let mut out = json!({"bench": "fan_out", "side": side, "agents": args.agents,
        "fan": args.fan, "runs": millis.len(),
        "p50_ms": round(percentile(&millis, 0.5)), "p99_ms": round(percentile(&millis, 0.99)),
        "max_ms": round(millis.last().copied().unwrap_or(0.0))});
    if let (Some(out), Some(extra)) = (out.as_object_mut(), extra.as_object()) {
        out.extend(extra.clone());
    }
    println!("{out}");
}

/// Commit latency of PostgreSQL itself while the runs go on: one single-row `INSERT` (its own
/// transaction, so one WAL flush) every 20 ms on a connection of its own, until `stop`. Every
/// run waits for synchronous commits (the check's, the projector's), so a disk whose flushes
/// stall shows here first. Answers when each probe began and its latency in ms.
async fn commit_probe(db_url: String, stop: CancellationToken) -> Vec<(Instant, f64)> {
    let (pg, connection) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    pg.batch_execute("CREATE TABLE IF NOT EXISTS bench_commit_probe (n bigint)")
        .await
        .unwrap();
    let insert = pg
        .prepare("INSERT INTO bench_commit_probe VALUES ($1)")
        .await
        .unwrap();
    let mut latencies = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Bounded: at most ten minutes of probes.
    for n in 0..30_000i64 {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        pg.execute(&insert, &[&n]).await.unwrap();
        latencies.push((started, started.elapsed().as_secs_f64() * 1000.0));
    }
    latencies
}

/// A probe commit over this many ms is a stall of the disk.
const STALL_MS: f64 = 50.0;

/// Whether a run (its start and its length in ms) overlapped a stalled probe commit.
fn during_stall(run: (Instant, f64), probes: &[(Instant, f64)]) -> bool {
    let ends = |(at, ms): (Instant, f64)| at + Duration::from_secs_f64(ms / 1000.0);
    probes
        .iter()
        .filter(|(_, ms)| *ms > STALL_MS)
        .any(|&probe| probe.0 < ends(run) && run.0 < ends(probe))
}

/// The services' thread names, by which their CPU is told apart.
const SERVICES: &[&str] = &["gateway", "scheduler"];

/// A runtime of two workers whose threads carry `name`, and a loopback listener for it.
pub(crate) fn service_runtime(name: &str) -> (tokio::runtime::Runtime, std::net::TcpListener) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    (runtime, listener)
}

pub async fn until_ready(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "{base} not ready in 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn checks(args: FanOutArgs) {
    let (name, _) = scratch(&args.pg_url).await;
    let prefix = format!("fob{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let db_url = format!("{}/{name}", args.pg_url.rsplit_once('/').unwrap().0);
    let common = [
        ("DATABASE_URL", db_url.as_str()),
        ("REDIS_URL", args.redis_url.as_str()),
        ("STREAM_PREFIX", prefix.as_str()),
        ("DATABASE_POOL_SIZE", "16"),
        ("REDIS_POOL_SIZE", "16"),
        ("LOG_LEVEL", "warn"),
    ];
    let mut gw_env: Vec<(&str, &str)> = common.to_vec();
    gw_env.extend([
        ("GATEWAY_ENROLLMENT_TOKEN", ENROLL),
        ("GATEWAY_ADMIN_KEY", ADMIN),
        // Agents heartbeat once; nobody goes offline during the runs.
        ("HEARTBEAT_INTERVAL", "600s"),
        // Every simulated agent is on 127.0.0.1: no per-address connection cap.
        ("HTTP_MAX_CONNECTIONS_PER_ADDRESS", "0"),
    ]);
    let gw_config = gateway::load(&mut checkplane_runtime::Env::from_pairs(gw_env)).unwrap();
    let sched_config = scheduler::load(&mut checkplane_runtime::Env::from_pairs(common)).unwrap();
    let shutdown = CancellationToken::new();
    // Each service on a runtime of its own (as in its own process), its threads named after
    // it, so the CPU each spends can be read apart.
    let (gw_rt, gw_listener) = service_runtime("gateway");
    let base = format!("http://{}", gw_listener.local_addr().unwrap());
    let (sched_rt, sched_listener) = service_runtime("scheduler");
    let sched_base = format!("http://{}", sched_listener.local_addr().unwrap());
    let gw = gw_rt.spawn({
        let shutdown = shutdown.clone();
        async move {
            let listener = tokio::net::TcpListener::from_std(gw_listener).unwrap();
            gateway::run(gw_config, listener, shutdown).await
        }
    });
    let sched = sched_rt.spawn({
        let shutdown = shutdown.clone();
        async move {
            let listener = tokio::net::TcpListener::from_std(sched_listener).unwrap();
            scheduler::run(sched_config, listener, shutdown).await
        }
    });
    let http = reqwest::Client::new();
    until_ready(&http, &base).await;
    until_ready(&http, &sched_base).await;

    // Agents in 20 countries and 200 networks, each heartbeating once.
    let mut agents: Vec<(String, String)> = Vec::with_capacity(args.agents);
    for chunk in (0..args.agents).collect::<Vec<_>>().chunks(32) {
        let regs = futures::future::join_all(chunk.iter().map(|i| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let body = json!({"hostname": format!("fan-{i}"), "capabilities": {"dns": 4},
                    "location": {"country": format!("C{}", (b'A' + (i % 20) as u8) as char),
                                 "asn": 64512 + (i % 200) as u32}});
                let (id, token) =
                    checkplane_testkit::register_agent(&http, &base, ENROLL, &body).await;
                let url = format!("{base}/v1/agents/heartbeat");
                let (status, _) =
                    checkplane_testkit::agent_post(&http, &url, &id, &token, &json!({})).await;
                assert_eq!(status, 200);
                (id, token)
            }
        }))
        .await;
        agents.extend(regs);
    }
    let admin = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(admin.1);
    let pg = admin.0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let online: i64 = pg
            .query_one("SELECT count(*) FROM agents WHERE status = 'online'", &[])
            .await
            .unwrap()
            .get(0);
        if online as usize == args.agents {
            break;
        }
        assert!(Instant::now() < deadline, "only {online} agents online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The statistics a running installation has: autovacuum analyzes a table within a minute
    // of such a change, but the runs start seconds after the scratch database was made. On
    // tables never analyzed, the planner takes the 1,000 online agents for one and looks up
    // their selection times one by one (3.1 ms for the selection instead of 1.9 ms).
    pg.batch_execute("ANALYZE").await.unwrap();

    // Every agent long-polls; whatever it gets it reports at once. When each claim with work
    // and each report was answered, to show where a run's time goes. The simulated agents
    // are lean (URLs parsed once, bodies written as text, only the tokens read from a claim's
    // answer): they share the two cores with what is measured.
    let stop = CancellationToken::new();
    let marks: Arc<Mutex<Marks>> = Arc::default();
    let mut pollers = Vec::new();
    let claim_url = reqwest::Url::parse(&format!("{base}/v1/agents/claim")).unwrap();
    let report_url = reqwest::Url::parse(&format!("{base}/v1/agents/report")).unwrap();
    for (p, (id, token)) in agents.iter().cloned().enumerate() {
        let (http, stop, marks) = (http.clone(), stop.clone(), marks.clone());
        let (claim_url, report_url) = (claim_url.clone(), report_url.clone());
        pollers.push(tokio::spawn(async move {
            let post = |url: &reqwest::Url, body: String| {
                http.post(url.clone())
                    .header("x-agent-id", &id)
                    .header("x-agent-token", &token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
            };
            for round in 0.. {
                let body = format!(
                    r#"{{"capacities":{{"dns":4}},"request_id":"p{p}r{round}","wait_ms":20000}}"#
                );
                let claim = async { post(&claim_url, body).await?.bytes().await };
                let claimed = tokio::select! { _ = stop.cancelled() => return, c = claim => c };
                let Ok(claimed) = claimed else { continue };
                let Ok(claimed) = serde_json::from_slice::<Claimed>(&claimed) else {
                    continue;
                };
                if claimed.leases.is_empty() {
                    continue;
                }
                marks.lock().unwrap().claimed.push(Instant::now());
                let completed: Vec<String> = claimed
                    .leases
                    .iter()
                    .map(|l| {
                        format!(
                            r#"{{"token":"{}","result":{{"rcode":"NOERROR","answers":[]}}}}"#,
                            l.token
                        )
                    })
                    .collect();
                let body = format!(r#"{{"completed":[{}]}}"#, completed.join(","));
                let reported = async { post(&report_url, body).await?.bytes().await };
                if let Ok(answer) = reported.await {
                    let acknowledged = answer.windows(14).any(|w| w == b"\"acknowledged\"");
                    assert!(acknowledged, "report answered {answer:?}");
                }
                marks.lock().unwrap().reported.push(Instant::now());
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // every poller waiting
    eprintln!(
        "fan-out: {} agents online and long-polling; {} runs",
        args.agents,
        args.warmup + args.runs
    );

    let mut totals = Vec::with_capacity(args.runs);
    let mut accepted = Vec::with_capacity(args.runs);
    let mut gets = 0usize;
    let mut phases: Vec<[f64; 4]> = Vec::with_capacity(args.runs);
    let mut spans: Vec<(Instant, f64)> = Vec::with_capacity(args.runs);
    let probe_stop = CancellationToken::new();
    let mut probe = None;
    let polling = Instant::now();
    let mut cpu_before = cpu::reading(SERVICES);
    let mut machine = cpu::Machine::now();
    for run in 0..args.warmup + args.runs {
        if run == args.warmup {
            probe = Some(tokio::spawn(commit_probe(
                db_url.clone(),
                probe_stop.clone(),
            )));
            cpu_before = cpu::reading(SERVICES);
            machine = cpu::Machine::now();
        }
        *marks.lock().unwrap() = Marks::default();
        let started = Instant::now();
        let response = http
            .post(format!("{base}/v1/checks"))
            .header("x-api-key", ADMIN)
            .json(&json!({"kind": "dns", "target": "example.com", "limit": args.fan}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
        let body: Value = response.json().await.unwrap();
        let answered = started.elapsed();
        assert_eq!(body["agents_count"].as_u64(), Some(args.fan as u64));
        let url = format!("{base}/v1/checks/{}", body["id"].as_str().unwrap());
        // Read as a client following a check would: with the ETag and `Prefer: wait`, each
        // read answers when the check changed (an unchanged one, a bodiless 304 after 5 s).
        let mut etag = String::new();
        let check = loop {
            let response = http
                .get(&url)
                .header("x-api-key", ADMIN)
                .header("if-none-match", &etag)
                .header("prefer", "wait=5")
                .send()
                .await
                .unwrap();
            gets += 1;
            if response.status().as_u16() == 200 {
                etag = response.headers()["etag"].to_str().unwrap().to_owned();
                let check: Value = response.json().await.unwrap();
                if check["status"] == "finished" {
                    break check;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "run {run} not finished in 30 s"
            );
        };
        let total = started.elapsed();
        let results = check["results"].as_array().unwrap();
        assert_eq!(results.len(), args.fan);
        assert!(
            results.iter().all(|r| r["outcome"] == "finished"),
            "{check}"
        );
        if run >= args.warmup {
            totals.push(total.as_secs_f64() * 1000.0);
            accepted.push(answered.as_secs_f64() * 1000.0);
            let marks = marks.lock().unwrap();
            let last = |v: &[Instant]| {
                v.iter()
                    .max()
                    .map_or(0.0, |t| t.duration_since(started).as_secs_f64() * 1000.0)
            };
            phases.push([
                last(&marks.claimed),
                last(&marks.reported),
                total.as_secs_f64() * 1000.0,
                started.duration_since(polling).as_secs_f64(),
            ]);
            spans.push((started, total.as_secs_f64() * 1000.0));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_ms = cpu::per_run(&cpu_before, &cpu::reading(SERVICES), args.runs);
    probe_stop.cancel();
    let probes = match probe {
        Some(probe) => probe.await.unwrap(),
        None => Vec::new(),
    };
    // The runs no stalled commit overlapped: what the services did, apart from the disk.
    let mut clear: Vec<f64> = spans
        .iter()
        .filter(|&&run| !during_stall(run, &probes))
        .map(|&(_, ms)| ms)
        .collect();
    let stalled_runs = spans.len() - clear.len();
    clear.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut commits: Vec<f64> = probes.iter().map(|&(_, ms)| ms).collect();
    commits.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let steal = machine.steal_since();
    stop.cancel();
    for p in pollers {
        let _ = p.await;
    }
    // Rotation: with `runs` checks of `fan` agents, how evenly the work was spread.
    let spread: (i64, i64) = {
        let row = pg
            .query_one(
                "SELECT min(n), max(n) FROM (SELECT a.agent_id, count(s.slot) AS n
                 FROM agents a LEFT JOIN check_slots s USING (agent_id) GROUP BY 1) t",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    // The projector's own view: batches and their mean time.
    let metrics = http
        .get(format!("{sched_base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let pick = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let batches = pick("checkplane_projector_batch_seconds_count");
    let batch_mean_ms = pick("checkplane_projector_batch_seconds_sum") / batches.max(1.0) * 1000.0;
    shutdown.cancel();
    let _ = gw.await;
    let _ = sched.await;
    gw_rt.shutdown_background();
    sched_rt.shutdown_background();
    drop(pg);
    drop_scratch(&args.pg_url, &name).await;
    accepted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let round = |v: f64| (v * 100.0).round() / 100.0;
    let median_of = |i: usize| {
        let mut v: Vec<f64> = phases.iter().map(|p| p[i]).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        round(percentile(&v, 0.5))
    };
    // The slowest runs, with when their last claim and last report came: where a tail is.
    let mut slowest: Vec<(usize, [f64; 4])> = phases.iter().copied().enumerate().collect();
    slowest.sort_by(|a, b| b.1[2].partial_cmp(&a.1[2]).unwrap());
    let slowest: Vec<Value> = slowest
        .iter()
        .take(3)
        .map(|(run, [claim, report, total, at])| {
            json!({"run": run, "at_s": round(*at), "last_claim_ms": round(*claim),
                   "last_report_ms": round(*report), "total_ms": round(*total)})
        })
        .collect();
    summary(
        "checkplane",
        &args,
        totals,
        json!({"accepted_p50_ms": round(percentile(&accepted, 0.5)),
               "accepted_p99_ms": round(percentile(&accepted, 0.99)),
               "gets_per_run": gets / (args.warmup + args.runs),
               "last_claim_p50_ms": median_of(0), "last_report_p50_ms": median_of(1),
               "projector_batches": batches, "projector_batch_mean_ms": round(batch_mean_ms),
               "slots_per_agent_min": spread.0, "slots_per_agent_max": spread.1,
               "cpu_ms_per_check": cpu_ms, "cpu_steal_pct": steal, "slowest": slowest,
               "commit_p50_ms": round(percentile(&commits, 0.5)),
               "commit_p99_ms": round(percentile(&commits, 0.99)),
               "commit_max_ms": round(commits.last().copied().unwrap_or(0.0)),
               "commits_over_50ms": commits.iter().filter(|&&ms| ms > STALL_MS).count(),
               "runs_during_stalls": stalled_runs,
               "p50_ms_outside_stalls": round(percentile(&clear, 0.5)),
               "p99_ms_outside_stalls": round(percentile(&clear, 0.99))}),
    );
}

/// What both baselines stand on: a scratch database with a results table, and in Redis the
/// agents' task streams (`<prefix>:tasks:<n>`, each with its `agents` group) and a results
/// stream, all under a prefix of their own.
pub(crate) struct Baseline {
    name: String,
    pub pg: tokio_postgres::Client,
    pub redis: redis::Client,
    pub conn: redis::aio::MultiplexedConnection,
    pub results: String,
    pub streams: Vec<String>,
}

impl Baseline {
    pub async fn new(args: &FanOutArgs, tag: &str) -> Self {
        let (name, _) = scratch(&args.pg_url).await;
        let db_url = format!("{}/{name}", args.pg_url.rsplit_once('/').unwrap().0);
        let (pg, connection) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        pg.batch_execute(
            "CREATE TABLE raw_results (run int, agent int, result jsonb,
                                       PRIMARY KEY (run, agent))",
        )
        .await
        .unwrap();
        let prefix = format!("{tag}{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let redis = redis::Client::open(args.redis_url.as_str()).unwrap();
        let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
        let streams: Vec<String> = (0..args.agents)
            .map(|a| format!("{prefix}:tasks:{a}"))
            .collect();
        for stream in &streams {
            let _: () = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg("agents")
                .arg("$")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        Self {
            name,
            pg,
            redis,
            conn,
            results: format!("{prefix}:results"),
            streams,
        }
    }

    /// Delete the streams and drop the database.
    pub async fn finish(mut self, args: &FanOutArgs) {
        let mut keys = std::mem::take(&mut self.streams);
        keys.push(self.results.clone());
        for chunk in keys.chunks(500) {
            let _: i64 = redis::cmd("DEL")
                .arg(chunk)
                .query_async(&mut self.conn)
                .await
                .unwrap();
        }
        drop(self.pg);
        drop_scratch(&args.pg_url, &self.name).await;
    }
}

/// The baselines' collector: read the results stream after `last` and write what each read
/// brings in one `INSERT`, until `fan` results of `run` are stored; then a `SELECT` sees them.
pub(crate) async fn store_results(
    reader: &mut redis::aio::MultiplexedConnection,
    pg: &tokio_postgres::Client,
    results: &str,
    last: &mut String,
    run: usize,
    fan: usize,
) {
    let mut stored = 0usize;
    while stored < fan {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(200)
            .arg("STREAMS")
            .arg(results)
            .arg(&*last)
            .query_async(reader)
            .await
            .unwrap();
        let entries: Vec<redis::streams::StreamId> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .collect();
        let Some(tail) = entries.last() else { continue };
        *last = tail.id.clone();
        let field = |e: &redis::streams::StreamId, f: &str| e.get::<String>(f).unwrap();
        let runs: Vec<i32> = entries
            .iter()
            .map(|e| field(e, "run").parse().unwrap())
            .collect();
        let who: Vec<i32> = entries
            .iter()
            .map(|e| field(e, "agent").parse().unwrap())
            .collect();
        let bodies: Vec<String> = entries.iter().map(|e| field(e, "result")).collect();
        pg.execute(
            "INSERT INTO raw_results SELECT r, a, b::jsonb
             FROM unnest($1::int[], $2::int[], $3::text[]) AS u(r, a, b)",
            &[&runs, &who, &bodies],
        )
        .await
        .unwrap();
        stored += entries.len();
    }
    let seen: i64 = pg
        .query_one(
            "SELECT count(*) FROM raw_results WHERE run = $1",
            &[&(run as i32)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen as usize, fan);
}

/// The pipeline that acknowledges an agent's task and adds its result.
pub(crate) fn ack_and_result(
    stream: &str,
    entry: &str,
    results: &str,
    run: &str,
    agent: usize,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("XACK")
        .arg(stream)
        .arg("agents")
        .arg(entry)
        .ignore()
        .cmd("XADD")
        .arg(results)
        .arg("*")
        .arg("run")
        .arg(run)
        .arg("agent")
        .arg(agent)
        .arg("result")
        .arg(r#"{"answers": []}"#)
        .ignore();
    pipe
}

/// An agent's read of up to four new tasks of its stream, blocking `block_ms` if given.
pub(crate) fn take_tasks(stream: &str, block_ms: Option<u64>) -> redis::Cmd {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg("agents").arg("a").arg("COUNT").arg(4);
    if let Some(ms) = block_ms {
        cmd.arg("BLOCK").arg(ms);
    }
    cmd.arg("STREAMS").arg(stream).arg(">");
    cmd
}

/// What the baselines send as a task.
pub(crate) fn raw_spec() -> String {
    json!({"check_id": uuid::Uuid::nil(), "slot": 0, "attempt": 1, "kind": "dns",
           "target": "example.com", "options": {"type": "A"}, "deadline_ms": 0})
    .to_string()
}

/// The agents a baseline's run goes to.
pub(crate) fn run_agents(args: &FanOutArgs, run: usize) -> impl Iterator<Item = usize> + '_ {
    (0..args.fan).map(move |i| (run * args.fan + i) % args.agents)
}

pub async fn raw(args: FanOutArgs) {
    let mut base = Baseline::new(&args, "forb").await;
    let (redis, results, streams) = (
        base.redis.clone(),
        base.results.clone(),
        base.streams.clone(),
    );
    // Every agent blocked on its own stream, on its own connection.
    let stop = CancellationToken::new();
    let mut agents = Vec::new();
    for (a, key) in streams.iter().cloned().enumerate() {
        let (client, stop, results) = (redis.clone(), stop.clone(), results.clone());
        agents.push(tokio::spawn(async move {
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            while !stop.is_cancelled() {
                let reply: Option<redis::streams::StreamReadReply> = take_tasks(&key, Some(200))
                    .query_async(&mut c)
                    .await
                    .unwrap();
                for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                    let run: String = entry.get("run").unwrap();
                    let pipe = ack_and_result(&key, &entry.id, &results, &run, a);
                    let _: () = pipe.query_async(&mut c).await.unwrap();
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut reader = redis.get_multiplexed_async_connection().await.unwrap();
    let mut last = "0-0".to_owned();
    let mut totals = Vec::with_capacity(args.runs);
    let spec = raw_spec();
    for run in 0..args.warmup + args.runs {
        let started = Instant::now();
        let mut pipe = redis::pipe();
        for a in run_agents(&args, run) {
            pipe.cmd("XADD")
                .arg(&streams[a])
                .arg("*")
                .arg("run")
                .arg(run)
                .arg("spec")
                .arg(&spec)
                .ignore();
        }
        let _: () = pipe.query_async(&mut base.conn).await.unwrap();
        store_results(&mut reader, &base.pg, &results, &mut last, run, args.fan).await;
        if run >= args.warmup {
            totals.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    for a in agents {
        let _ = a.await;
    }
    base.finish(&args).await;
    summary("raw", &args, totals, json!({}));
}
