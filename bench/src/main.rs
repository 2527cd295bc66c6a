//! checkplane benchmarks. Each measures one side and prints one JSON line; `bench/run` runs
//! both sides of a comparison in one go, prints their command lines and appends the figures to
//! `bench/RESULTS.md`.
//!
//! `projection`: events applied into PostgreSQL by the projector (from Redis streams, with the
//! same connection count) beside a raw batch INSERT of the same rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use checkplane_runtime::keys::Keys;
use checkplane_runtime::projector::{Projector, ProjectorConfig};
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

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    match cli.command {
        Command::RawInsert(args) => runtime.block_on(raw_insert(args)),
        Command::Projector(args) => runtime.block_on(projector(args)),
    }
}
