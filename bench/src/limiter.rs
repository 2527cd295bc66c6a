//! What the rate limiter costs: heartbeat throughput through a gateway whose heartbeat limit
//! is counted (one GCRA call in Redis per heartbeat, at a rate that never refuses) beside an
//! identical gateway with the limit off, on one PostgreSQL and Redis, in interleaved rounds.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, clap::Args)]
pub struct LimiterArgs {
    /// Admin URL of PostgreSQL (a scratch database for the gateways).
    #[arg(long)]
    pg_url: String,
    /// Redis URL.
    #[arg(long)]
    redis_url: String,
    /// Agents heartbeating at once, each in a loop.
    #[arg(long, default_value_t = 32)]
    agents: usize,
    /// Seconds each side runs per round.
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// Rounds; each runs both sides, in alternating order (five of 3 s spread 3-18 % apart
    /// on this 2-core VM: too few for a median).
    #[arg(long, default_value_t = 9)]
    rounds: usize,
}

const ENROLL: &str = "bench-enrollment-token-0123";

/// One gateway on `db_url` with the heartbeat limit `heartbeat_rate`: its base URL.
async fn gateway(
    db_url: &str,
    redis_url: &str,
    prefix: &str,
    heartbeat_rate: &str,
    shutdown: CancellationToken,
) -> String {
    let mut env = checkplane_runtime::Env::from_pairs([
        ("DATABASE_URL", db_url),
        ("REDIS_URL", redis_url),
        ("STREAM_PREFIX", prefix),
        ("GATEWAY_ENROLLMENT_TOKEN", ENROLL),
        ("DATABASE_POOL_SIZE", "16"),
        ("REDIS_POOL_SIZE", "16"),
        ("LOG_LEVEL", "warn"),
        // Every simulated agent is on 127.0.0.1.
        ("HTTP_MAX_CONNECTIONS_PER_ADDRESS", "0"),
        // The bench's own limits: the one measured, and registrations of all its agents.
        ("GATEWAY_RATE_HEARTBEAT", heartbeat_rate),
        ("GATEWAY_RATE_REGISTER", "off"),
    ]);
    let config = gateway::load(&mut env).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    // detached: the bench's gateway runs until `shutdown` at the end of the measurement.
    tokio::spawn(gateway::run(config, listener, shutdown));
    let http = reqwest::Client::new();
    for _ in 0..500 {
        let ready = http.get(format!("{base}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            return base;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("gateway at {base} not ready within 10 s");
}

/// Heartbeats answered 200 per second while every agent loops for `seconds`; panics on any
/// other answer (a refusal would measure the limit, not its cost).
async fn heartbeats_per_second(base: &str, agents: &[(String, String)], seconds: u64) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let url = format!("{base}/v1/agents/heartbeat");
    let loops = agents.iter().map(|(id, token)| {
        let (url, id, token) = (url.clone(), id.clone(), token.clone());
        async move {
            let http = reqwest::Client::new();
            let mut n = 0u64;
            // Bounded by time, and by count should time stop passing.
            while tokio::time::Instant::now() < deadline && n < 1_000_000 {
                let response = http
                    .post(&url)
                    .header("x-agent-id", &id)
                    .header("x-agent-token", &token)
                    .json(&serde_json::json!({}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 200, "heartbeat refused");
                n += 1;
            }
            n
        }
    });
    let started = tokio::time::Instant::now();
    let total: u64 = futures::future::join_all(loops).await.into_iter().sum();
    total as f64 / started.elapsed().as_secs_f64()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

pub async fn heartbeat(args: LimiterArgs) {
    let (name, _) = crate::scratch(&args.pg_url).await;
    let db_url = format!("{}/{name}", args.pg_url.rsplit_once('/').unwrap().0);
    let prefix = format!("lim{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let shutdown = CancellationToken::new();
    // Counted on every heartbeat, never refused: one call a millisecond, a minute's at once.
    let limited = gateway(
        &db_url,
        &args.redis_url,
        &prefix,
        "60000/1m:60000",
        shutdown.clone(),
    )
    .await;
    let unlimited = gateway(&db_url, &args.redis_url, &prefix, "off", shutdown.clone()).await;
    let http = reqwest::Client::new();
    let mut agents = Vec::new();
    for i in 0..args.agents {
        agents.push(
            checkplane_testkit::register_agent(
                &http,
                &limited,
                ENROLL,
                &serde_json::json!({"hostname": format!("hb-{i}"), "capabilities": {"dns": 1}}),
            )
            .await,
        );
    }
    // Warm both (auth caches, pools, statement caches).
    heartbeats_per_second(&limited, &agents, 1).await;
    heartbeats_per_second(&unlimited, &agents, 1).await;
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        if round % 2 == 0 {
            off.push(heartbeats_per_second(&unlimited, &agents, args.seconds).await);
            on.push(heartbeats_per_second(&limited, &agents, args.seconds).await);
        } else {
            on.push(heartbeats_per_second(&limited, &agents, args.seconds).await);
            off.push(heartbeats_per_second(&unlimited, &agents, args.seconds).await);
        }
    }
    shutdown.cancel();
    let (on_median, off_median) = (median(&on), median(&off));
    let cost = (1.0 - on_median / off_median) * 100.0;
    let round = |v: &[f64]| v.iter().map(|x| x.round()).collect::<Vec<_>>();
    println!(
        "{}",
        serde_json::json!({
            "agents": args.agents,
            "seconds": args.seconds,
            "limited_per_s": on_median.round(),
            "unlimited_per_s": off_median.round(),
            "cost_pct": (cost * 10.0).round() / 10.0,
            "rounds_limited": round(&on),
            "rounds_unlimited": round(&off),
        })
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    crate::drop_scratch(&args.pg_url, &name).await;
}
