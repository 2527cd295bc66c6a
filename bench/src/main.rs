//! checkplane benchmarks. Each measures one side and prints one JSON line; `bench/run` runs
//! both sides of a comparison in one go, prints their command lines and appends the figures to
//! `bench/RESULTS.md`.
//!
//! `fan-out`: see `fanout.rs`; its reference server, `floor.rs`. `dns-proxy` and `agent-rss`:
//! see `dns.rs`.
//!
//! `projection`: events applied into PostgreSQL by the projector (from Redis streams, with the
//! same connection count) beside a raw batch INSERT of the same rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chaos;
mod cpu;
mod dns;
mod fanout;
mod floor;
mod haproxy;
mod limiter;

/// The allocator the service binaries use, so their figures are the services'.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use checkplane_core::keys::Keys;
use checkplane_core::projector::{Projector, ProjectorConfig};
use checkplane_testkit::events::presence;
use checkplane_wire::events::{Event, EventBody};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "checkplane-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Raw PostgreSQL: the rows projection writes, inserted in batches with UNNEST.
    RawInsert(Args),
    /// The projector applying the same events from Redis streams.
    Projector(Args),
    /// Raw Redis: XREADGROUP + XACK of the same tasks, same connection count.
    RawStreams(LeaseArgs),
    /// Simulated agents claiming and reporting through the gateway; then wake-up latency
    /// with 1,000 agents long-polling.
    LeaseCycle(LeaseArgs),
    /// One check to 100 of 1,000 long-polling agents, POST to the last result on GET.
    FanOut(fanout::FanOutArgs),
    /// The same data path in raw Redis streams and one PostgreSQL insert per read.
    FanOutRaw(fanout::FanOutArgs),
    /// The raw data path with HTTP between the agents and Redis: a bare reference server.
    FanOutHttp(fanout::FanOutArgs),
    /// dnsperf against the agent's caching DNS proxy and against unbound, same threads.
    DnsProxy(dns::DnsArgs),
    /// The agent process's resident memory, idle and with 1,000 checks in flight.
    AgentRss(dns::RssArgs),
    /// 10 HAProxy instances x 100 servers: one sync cycle, first and steady.
    HaproxySync(haproxy::HaproxyArgs),
    /// drain / ready from the request to the confirmed state.
    HaproxyAction(haproxy::HaproxyArgs),
    /// Heartbeats through a gateway counting them in the rate limiter and one not counting.
    HeartbeatLimiter(limiter::LimiterArgs),
    /// The whole system under SIGKILLs, pauses, dependency restarts and HAProxy reloads,
    /// then checked for anything lost (exit 1 on a violation).
    Chaos(chaos::ChaosArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct LeaseArgs {
    /// Admin URL of PostgreSQL (lease-cycle: a scratch database for the gateway).
    #[arg(long)]
    pg_url: String,
    /// Redis URL.
    #[arg(long)]
    redis_url: String,
    /// Tasks to run through.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Simulated agents working concurrently (raw: connections).
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Tasks per claim (raw: per XREADGROUP).
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Agents long-polling during the latency measurement.
    #[arg(long, default_value_t = 1_000)]
    pollers: usize,
    /// Wake-ups measured.
    #[arg(long, default_value_t = 300)]
    samples: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct Args {
    /// Admin URL of PostgreSQL (a scratch database is made next to it and dropped).
    #[arg(long)]
    pg_url: String,
    /// Redis URL (projector side).
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// Events to apply.
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Distinct agents the events are about.
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// PostgreSQL connections (raw) / projector replicas, one connection each.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Events per batch (raw) / per read (projector).
    #[arg(long, default_value_t = 500)]
    batch: usize,
}

fn log_of(args: &Args) -> Vec<Event> {
    let now = checkplane_runtime::clock::now_ms();
    (0..args.events)
        .map(|i| {
            let agent = format!("bench-{}", i % args.agents);
            let version = i64::try_from(i / args.agents + 1).unwrap();
            presence(
                &agent,
                version,
                version % 2 == 1,
                now + i64::try_from(i).unwrap(),
            )
        })
        .collect()
}

/// A scratch database, migrated.
async fn scratch(admin_url: &str) -> (String, tokio_postgres::Config) {
    let admin_config: tokio_postgres::Config = admin_url.parse().unwrap();
    let admin = checkplane_runtime::db::connect(&admin_config)
        .await
        .unwrap();
    let name = format!("cpbench_{}", uuid::Uuid::new_v4().simple());
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let mut config = admin_config.clone();
    config.dbname(&name);
    checkplane_runtime::db::migrate(&config).await.unwrap();
    (name, config)
}

async fn drop_scratch(admin_url: &str, name: &str) {
    let admin = checkplane_runtime::db::connect(&admin_url.parse().unwrap())
        .await
        .unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
}

fn report(side: &str, args: &Args, elapsed: Duration) {
    let secs = elapsed.as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bench": "projection",
            "side": side,
            "events": args.events,
            "agents": args.agents,
            "connections": args.connections,
            "batch": args.batch,
            "seconds": (secs * 1000.0).round() / 1000.0,
            "events_per_s": (args.events as f64 / secs).round(),
        })
    );
}

const RAW_EVENTS: &str = "INSERT INTO events (event_id, occurred_at, type, aggregate_id, version, actor, schema, payload)
    SELECT id, 'epoch'::timestamptz + ms * interval '1 millisecond', t, agg, v, actor, 1, payload
    FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::jsonb[])
      AS u(id, ms, t, agg, v, actor, payload)";
const RAW_HISTORY: &str =
    "INSERT INTO agent_status_history (event_id, agent_id, status, version, reason, occurred_at)
    SELECT id, agent, status, v, reason, 'epoch'::timestamptz + ms * interval '1 millisecond'
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::bigint[])
      AS u(id, agent, status, v, reason, ms)";
const RAW_AGENTS: &str = "INSERT INTO agents (agent_id, status, status_changed_at, status_version, status_changes)
    SELECT agent, (array_agg(status ORDER BY v DESC))[1],
           'epoch'::timestamptz + (array_agg(ms ORDER BY v DESC))[1] * interval '1 millisecond',
           max(v), count(*)
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS u(agent, status, v, ms)
    GROUP BY agent ORDER BY agent
    ON CONFLICT (agent_id) DO UPDATE SET
      status = CASE WHEN agents.status_version < EXCLUDED.status_version THEN EXCLUDED.status ELSE agents.status END,
      status_changed_at = CASE WHEN agents.status_version < EXCLUDED.status_version THEN EXCLUDED.status_changed_at ELSE agents.status_changed_at END,
      status_version = GREATEST(agents.status_version, EXCLUDED.status_version),
      status_changes = agents.status_changes + EXCLUDED.status_changes";

async fn raw_batch(client: &mut tokio_postgres::Client, batch: &[Event]) {
    let mut ids = Vec::new();
    let mut ms = Vec::new();
    let mut types = Vec::new();
    let mut aggregates = Vec::new();
    let mut versions = Vec::new();
    let mut actors = Vec::new();
    let mut payloads = Vec::new();
    let mut agents = Vec::new();
    let mut statuses = Vec::new();
    let mut reasons = Vec::new();
    for e in batch {
        let (status, p) = match &e.body {
            EventBody::AgentCameBack(p) => ("online", p),
            EventBody::AgentWentOffline(p) => ("offline", p),
            _ => unreachable!("presence only"),
        };
        ids.push(e.event_id);
        ms.push(e.occurred_at);
        types.push(e.body.type_name().to_owned());
        aggregates.push(e.aggregate_id.clone());
        versions.push(e.version);
        actors.push(e.actor.clone());
        payloads.push(serde_json::to_value(p).unwrap());
        agents.push(p.agent_id.clone());
        statuses.push(status.to_owned());
        reasons.push(p.reason.clone());
    }
    let tx = client.transaction().await.unwrap();
    tx.execute(
        RAW_EVENTS,
        &[
            &ids,
            &ms,
            &types,
            &aggregates,
            &versions,
            &actors,
            &payloads,
        ],
    )
    .await
    .unwrap();
    tx.execute(
        RAW_HISTORY,
        &[&ids, &agents, &statuses, &versions, &reasons, &ms],
    )
    .await
    .unwrap();
    tx.execute(RAW_AGENTS, &[&agents, &statuses, &versions, &ms])
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn raw_insert(args: Args) {
    let log = log_of(&args);
    let (name, config) = scratch(&args.pg_url).await;
    let batches: Vec<Vec<Event>> = log.chunks(args.batch).map(<[Event]>::to_vec).collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let mine: Vec<Vec<Event>> = batches
            .iter()
            .skip(c)
            .step_by(args.connections)
            .cloned()
            .collect();
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = checkplane_runtime::db::connect(&config).await.unwrap();
            for batch in mine {
                raw_batch(&mut client, &batch).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let client = checkplane_runtime::db::connect(&config).await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(usize::try_from(n).unwrap(), args.events);
    drop(client);
    drop_scratch(&args.pg_url, &name).await;
    report("raw_insert", &args, elapsed);
}

async fn projector(args: Args) {
    let log = log_of(&args);
    let (name, config) = scratch(&args.pg_url).await;
    let prefix = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let keys = Keys::new(prefix.clone(), 4);
    let redis = redis::Client::open(args.redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    for chunk in log.chunks(1000) {
        let mut pipe = redis::pipe();
        for event in chunk {
            let agent = match &event.body {
                EventBody::AgentCameBack(p) | EventBody::AgentWentOffline(p) => &p.agent_id,
                _ => unreachable!("presence only"),
            };
            pipe.cmd("XADD")
                .arg(keys.presence_events(keys.shard_of(agent)))
                .arg("*")
                .arg("event")
                .arg(serde_json::to_string(event).unwrap())
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }

    let pg = checkplane_runtime::db::pool(&config, args.connections).unwrap();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let mut pc = ProjectorConfig::new(keys.projected_streams(), "projector", &format!("c{c}"));
        pc.batch = args.batch;
        pc.block = Duration::from_millis(20);
        let p = Projector::new(pc, pg.clone(), redis.clone());
        tasks.push(tokio::spawn(p.run(shutdown.clone())));
    }
    let probe = checkplane_runtime::db::connect(&config).await.unwrap();
    loop {
        let n: i64 = probe
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .unwrap()
            .get(0);
        if usize::try_from(n).unwrap() >= args.events {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    drop(probe);
    drop(pg);
    let mut keys_to_drop: Vec<String> = keys.projected_streams();
    keys_to_drop.retain(|k| k.starts_with(&prefix));
    let _: i64 = redis::cmd("DEL")
        .arg(&keys_to_drop)
        .query_async(&mut conn)
        .await
        .unwrap();
    drop_scratch(&args.pg_url, &name).await;
    report("projector", &args, elapsed);
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn raw_streams(args: LeaseArgs) {
    let prefix = format!("rawb{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let redis = redis::Client::open(args.redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let streams: Vec<String> = (0..args.workers)
        .map(|w| format!("{prefix}:tasks:{w}"))
        .collect();
    for (i, chunk) in (0..args.tasks).collect::<Vec<_>>().chunks(1000).enumerate() {
        let mut pipe = redis::pipe();
        for t in chunk {
            pipe.cmd("XADD")
                .arg(&streams[t % args.workers])
                .arg("*")
                .arg("spec")
                .arg("{}")
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
        let _ = i;
    }
    for s in &streams {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(s)
            .arg("agents")
            .arg("0")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (w, stream) in streams.iter().enumerate() {
        let (client, stream, batch) = (redis.clone(), stream.clone(), args.batch);
        tasks.push(tokio::spawn(async move {
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let mut done = 0usize;
            loop {
                let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("agents")
                    .arg(format!("agent-{w}"))
                    .arg("COUNT")
                    .arg(batch)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let ids: Vec<String> = reply
                    .map(|r| {
                        r.keys
                            .into_iter()
                            .flat_map(|k| k.ids.into_iter().map(|i| i.id))
                            .collect()
                    })
                    .unwrap_or_default();
                if ids.is_empty() {
                    return done;
                }
                let _: i64 = redis::cmd("XACK")
                    .arg(&stream)
                    .arg("agents")
                    .arg(&ids)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                done += ids.len();
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(total, args.tasks);
    let _: i64 = redis::cmd("DEL")
        .arg(&streams)
        .query_async(&mut conn)
        .await
        .unwrap();
    println!(
        "{}",
        serde_json::json!({"bench": "lease_cycle", "side": "raw_streams", "tasks": args.tasks,
        "connections": args.workers, "batch": args.batch, "seconds": (secs * 1000.0).round() / 1000.0,
        "tasks_per_s": (args.tasks as f64 / secs).round()})
    );
}

async fn post_json(
    http: &reqwest::Client,
    url: &str,
    id: &str,
    token: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    checkplane_testkit::agent_post(http, url, id, token, &body)
        .await
        .1
}

async fn lease_cycle(args: LeaseArgs) {
    let (name, config) = scratch(&args.pg_url).await;
    let prefix = format!("lcb{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let enroll = "bench-enrollment-token-0123";
    let db_url = format!("{}/{name}", args.pg_url.rsplit_once('/').unwrap().0);
    let env = checkplane_runtime::Env::from_pairs([
        ("DATABASE_URL", db_url.as_str()),
        ("REDIS_URL", args.redis_url.as_str()),
        ("STREAM_PREFIX", prefix.as_str()),
        ("GATEWAY_ENROLLMENT_TOKEN", enroll),
        ("DATABASE_POOL_SIZE", "16"),
        ("REDIS_POOL_SIZE", "16"),
        ("LOG_LEVEL", "warn"),
        // Every simulated agent is on 127.0.0.1: no per-address connection cap.
        ("HTTP_MAX_CONNECTIONS_PER_ADDRESS", "0"),
        // The simulated agents loop as fast as they can (about 60 claims a second each, over
        // the 50 a real agent may make): every call is counted, so the limiter's cost is in
        // the figure, and none refused, so the figure is the lease path's.
        ("GATEWAY_RATE_CLAIM", "60000/1m:60000"),
        ("GATEWAY_RATE_REPORT", "60000/1m:60000"),
        ("GATEWAY_RATE_REGISTER", "off"),
    ]);
    let mut env = env;
    let gw_config = gateway::load(&mut env).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(gateway::run(gw_config, listener, shutdown.clone()));
    let http = reqwest::Client::new();
    loop {
        if http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let agents_needed = args.pollers.max(args.workers);
    let mut agents = Vec::new();
    for chunk in (0..agents_needed).collect::<Vec<_>>().chunks(32) {
        let regs = futures::future::join_all(chunk.iter().map(|i| {
            let http = http.clone();
            let url = format!("{base}/v1/agents/register");
            async move {
                let r: serde_json::Value = http.post(url).header("x-enrollment-token", enroll)
                    .json(&serde_json::json!({"hostname": format!("bench-{i}"), "capabilities": {"dns": 64}}))
                    .send().await.unwrap().json().await.unwrap();
                (r["agent_id"].as_str().unwrap().to_owned(), r["token"].as_str().unwrap().to_owned())
            }
        })).await;
        agents.extend(regs);
    }
    let keys = Keys::new(prefix.clone(), 4);
    let leases = checkplane_core::leases::Leases::new(
        keys.clone(),
        checkplane_core::leases::LeaseSettings::new(30_000, 5),
    );
    let redis = redis::Client::open(args.redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    for chunk in (0..args.tasks).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        if chunk[0] == 0 {
            // What `Leases::enqueue` does for a stream's first task: its consumer group.
            for (agent, _) in agents.iter().take(args.workers) {
                let _: redis::RedisResult<()> = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(keys.tasks(agent, "dns"))
                    .arg("agents")
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut conn)
                    .await;
            }
        }
        for t in chunk {
            let (agent, _) = &agents[t % args.workers];
            pipe.cmd("XADD")
                .arg(keys.tasks(agent, "dns"))
                .arg("*")
                .arg("spec")
                .arg("{}")
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }

    // Throughput: each worker claims a batch, reports it, until its stream is empty.
    let started = Instant::now();
    let mut workers = Vec::new();
    for (w, (id, token)) in agents.iter().take(args.workers).cloned().enumerate() {
        let (http, base, batch) = (http.clone(), base.clone(), args.batch);
        workers.push(tokio::spawn(async move {
            let mut done = 0usize;
            for round in 0.. {
                let claimed = post_json(&http, &format!("{base}/v1/agents/claim"), &id, &token,
                    serde_json::json!({"capacities": {"dns": batch}, "request_id": format!("w{w}r{round}"), "wait_ms": 0})).await;
                let tokens: Vec<serde_json::Value> = claimed["leases"].as_array().unwrap().iter()
                    .map(|l| serde_json::json!({"token": l["token"],
                        "result": {"rcode": "NOERROR", "answers": []}})).collect();
                if tokens.is_empty() { return done; }
                done += tokens.len();
                post_json(&http, &format!("{base}/v1/agents/report"), &id, &token, serde_json::json!({"completed": tokens})).await;
            }
            done
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(total, args.tasks);
    // Where the time goes, coarsely: the gateway's own mean time per route.
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mean_ms = |route: &str| {
        let pick = |name: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(name) && l.contains(&format!("route=\"{route}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let count = pick("http_request_duration_seconds_count");
        if count > 0.0 {
            (pick("http_request_duration_seconds_sum") / count * 1e5).round() / 100.0
        } else {
            0.0
        }
    };
    let claim_ms = mean_ms("/v1/agents/claim");
    let report_ms = mean_ms("/v1/agents/report");

    // Wake-up latency with `pollers` agents long-polling: enqueue for one, time its answer.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let stop = CancellationToken::new();
    let mut pollers = Vec::new();
    for (p, (id, token)) in agents.iter().take(args.pollers).cloned().enumerate() {
        let (http, base, tx, stop) = (http.clone(), base.clone(), tx.clone(), stop.clone());
        pollers.push(tokio::spawn(async move {
            let claim_url = format!("{base}/v1/agents/claim");
            for round in 0.. {
                let claim = post_json(&http, &claim_url, &id, &token,
                    serde_json::json!({"capacities": {"dns": 1}, "request_id": format!("p{p}r{round}"), "wait_ms": 20_000}));
                let claimed = tokio::select! { _ = stop.cancelled() => return, c = claim => c };
                let got = Instant::now();
                if let Some(lease) = claimed["leases"].as_array().and_then(|l| l.first()) {
                    let _ = tx.send((p, got));
                    post_json(&http, &format!("{base}/v1/agents/report"), &id, &token,
                        serde_json::json!({"completed": [{"token": lease["token"],
                            "result": {"rcode": "NOERROR", "answers": []}}]})).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // let every poller start waiting
    let mut latencies = Vec::with_capacity(args.samples);
    for s in 0..args.samples {
        let target = (s * 7919) % args.pollers;
        let (agent, _) = &agents[target];
        let sent = Instant::now();
        leases.enqueue(&mut conn, agent, "dns", "{}").await.unwrap();
        let (who, got) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(who, target);
        latencies.push(got.duration_since(sent).as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    for p in pollers {
        let _ = p.await;
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    shutdown.cancel();
    let _ = server.await;
    drop_scratch(&args.pg_url, &name).await;
    println!(
        "{}",
        serde_json::json!({"bench": "lease_cycle", "side": "gateway", "tasks": args.tasks,
        "workers": args.workers, "batch": args.batch, "seconds": (secs * 1000.0).round() / 1000.0,
        "tasks_per_s": (args.tasks as f64 / secs).round(), "pollers": args.pollers, "samples": latencies.len(),
        "wake_p50_ms": (percentile(&latencies, 0.5) * 100.0).round() / 100.0,
        "wake_p99_ms": (percentile(&latencies, 0.99) * 100.0).round() / 100.0,
        "gateway_mean_claim_ms": claim_ms, "gateway_mean_report_ms": report_ms})
    );
    let _ = config;
}

fn main() {
    let cli = Cli::parse();
    if let Command::Chaos(args) = cli.command {
        std::process::exit(chaos::main(args));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    match cli.command {
        Command::RawInsert(args) => runtime.block_on(raw_insert(args)),
        Command::Projector(args) => runtime.block_on(projector(args)),
        Command::RawStreams(args) => runtime.block_on(raw_streams(args)),
        Command::LeaseCycle(args) => runtime.block_on(lease_cycle(args)),
        Command::FanOut(args) => runtime.block_on(fanout::checks(args)),
        Command::FanOutRaw(args) => runtime.block_on(fanout::raw(args)),
        Command::FanOutHttp(args) => runtime.block_on(floor::http(args)),
        Command::DnsProxy(args) => dns::proxy(args),
        Command::AgentRss(args) => runtime.block_on(dns::rss(args)),
        Command::HaproxySync(args) => runtime.block_on(haproxy::sync_cycle(args)),
        Command::HaproxyAction(args) => runtime.block_on(haproxy::action_latency(args)),
        Command::HeartbeatLimiter(args) => runtime.block_on(limiter::heartbeat(args)),
        Command::Chaos(_) => unreachable!("handled above"),
    }
}
