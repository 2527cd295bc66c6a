//! The scheduler: projects events made in Redis into PostgreSQL, publishes what the edge left
//! in the outbox, marks agents offline, and keeps `events` within its retention. Serves its
//! probes on `HTTP_ADDR`. Any number of replicas may run: the projector shares work through
//! its consumer group, the sweeps through `SKIP LOCKED` and atomic scripts.

pub mod lifecycle;

use std::sync::Arc;
use std::time::Duration;

use checkplane_core::keys::Keys;
use checkplane_core::leases::{LeaseSettings, Leases};
use checkplane_core::presence::Presence;
use checkplane_core::projector::{Projector, ProjectorConfig};
use checkplane_runtime::clock::now_ms;
use checkplane_runtime::stores::{every, serve_with_stores, StoreServiceConfig};
use checkplane_runtime::{BaseSettings, ConfigError, Env, RunError, StoreSettings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The binary's name.
pub const NAME: &str = "scheduler";
/// The consumer group that projects every event stream into PostgreSQL.
pub const PROJECTOR_GROUP: &str = "projector";

/// The scheduler's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Logging, listening, probes, PostgreSQL and Redis.
    pub service: StoreServiceConfig,
    /// `CONSUMER_NAME`: this replica's stable name in consumer groups (default: host name).
    pub consumer: String,
    /// `OFFLINE_GRACE`: how long past its heartbeat deadline an agent goes offline.
    pub offline_grace: Duration,
    /// `OUTBOX_MIN_AGE`: outbox rows younger than this are left to their gateway.
    pub outbox_min_age: Duration,
    /// `EVENTS_RETENTION`: how long `events` are kept.
    pub events_retention: Duration,
    /// `RESULTS_RETENTION`: how long finished checks and their results are kept.
    pub results_retention: Duration,
    /// `METRICS_RETENTION`: how long agents' reported metrics are kept.
    pub metrics_retention: Duration,
    /// `HAPROXY_HISTORY_RETENTION`: how long HAProxy servers' state history is kept.
    pub history_retention: Duration,
    /// `PROJECTOR_MAX_ATTEMPTS`: failures before an event is parked.
    pub max_attempts: u32,
    /// `MAX_RETRIES`: new attempts of a slot whose agent went away.
    pub max_retries: u32,
    /// `RETRY_BACKOFF`: how long an interrupted slot waits before its next attempt.
    pub retry_backoff: Duration,
    /// Projector lag (events) over which `/healthz` says `degraded` (`PROJECTION_DEGRADED_LAG`).
    pub degraded_lag: u64,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "scheduler".to_owned())
}

/// Read the scheduler's configuration.
pub fn load(env: &mut Env) -> Result<Config, ConfigError> {
    let service = StoreServiceConfig::from_env(
        env,
        NAME,
        <Service as checkplane_runtime::Service>::LISTEN.1,
    )?;
    let consumer = env.string("CONSUMER_NAME", &host_name());
    if consumer.len() > 128 || consumer.chars().any(char::is_whitespace) {
        return Err(ConfigError::new(
            "CONSUMER_NAME",
            "at most 128 characters, no spaces",
        ));
    }
    Ok(Config {
        service,
        consumer,
        offline_grace: env.duration(
            "OFFLINE_GRACE",
            Duration::from_secs(30),
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?,
        outbox_min_age: env.duration(
            "OUTBOX_MIN_AGE",
            Duration::from_secs(5),
            Duration::ZERO,
            Duration::from_secs(3600),
        )?,
        events_retention: env.duration(
            "EVENTS_RETENTION",
            Duration::from_secs(30 * 86_400),
            Duration::from_secs(86_400),
            Duration::from_secs(3650 * 86_400),
        )?,
        results_retention: env.duration(
            "RESULTS_RETENTION",
            Duration::from_secs(30 * 86_400),
            Duration::from_secs(3600),
            Duration::from_secs(3650 * 86_400),
        )?,
        metrics_retention: env.duration(
            "METRICS_RETENTION",
            Duration::from_secs(30 * 86_400),
            Duration::from_secs(3600),
            Duration::from_secs(3650 * 86_400),
        )?,
        history_retention: env.duration(
            "HAPROXY_HISTORY_RETENTION",
            Duration::from_secs(30 * 86_400),
            Duration::from_secs(3600),
            Duration::from_secs(3650 * 86_400),
        )?,
        max_attempts: u32::try_from(env.u64_in("PROJECTOR_MAX_ATTEMPTS", 5, 1, 100)?).unwrap_or(5),
        max_retries: u32::try_from(env.u64_in("MAX_RETRIES", 2, 0, 10)?).unwrap_or(2),
        retry_backoff: env.duration(
            "RETRY_BACKOFF",
            Duration::from_secs(2),
            Duration::ZERO,
            Duration::from_secs(600),
        )?,
        degraded_lag: env.u64_in("PROJECTION_DEGRADED_LAG", 10_000, 1, 100_000_000)?,
    })
}

/// Run the scheduler until `shutdown` fires.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let keys = Keys::new(
        config.service.store.stream_prefix.clone(),
        config.service.store.stream_shards,
    );
    let redis_client = redis::Client::open(config.service.store.redis.connection_info())
        .map_err(RunError::Redis)?;
    serve_with_stores(
        config.service.clone(),
        listener,
        shutdown,
        move |stores, tracker, shutdown| {
            let mut projector_config =
                ProjectorConfig::new(keys.projected_streams(), PROJECTOR_GROUP, &config.consumer);
            projector_config.max_attempts = config.max_attempts;
            projector_config.live = Some(keys.clone());
            let projector = Projector::new(projector_config, stores.pg.clone(), redis_client);
            let (schema, stop) = (stores.clone(), shutdown.clone());
            tracker.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = schema.schema_current() => projector.run(stop).await,
                }
            });

            let (pg, redis, schema) = (stores.pg.clone(), stores.redis.clone(), stores.clone());
            let min_age = config.outbox_min_age;
            // Only `enqueue_task` is used by the sweep: it needs the keys and the ref TTL.
            let fanout = Leases::new(keys.clone(), LeaseSettings::new(0, 0));
            every(
                tracker,
                shutdown,
                "outbox_sweep",
                Duration::from_secs(1),
                move || {
                    let (pg, redis, schema, fanout) =
                        (pg.clone(), redis.clone(), schema.clone(), fanout.clone());
                    async move {
                        schema.schema_current().await;
                        while checkplane_core::outbox::sweep(&pg, &redis, &fanout, min_age, 500)
                            .await?
                            == 500
                        {}
                        Ok::<_, checkplane_core::outbox::OutboxError>(())
                    }
                },
            );

            let presence = Presence::new(keys.clone());
            let redis = stores.redis.clone();
            let grace_ms = i64::try_from(config.offline_grace.as_millis()).unwrap_or(i64::MAX);
            let sweep_every =
                (config.offline_grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
            every(
                tracker,
                shutdown,
                "presence_sweep",
                sweep_every,
                move || {
                    let (presence, redis) = (presence.clone(), redis.clone());
                    async move {
                        let mut conn = redis
                            .get()
                            .await
                            .map_err(|e| RunError::Startup(e.to_string()))?;
                        for n in 0..presence.keys().shards() {
                            let sweep = presence
                                .sweep(&mut *conn, n, now_ms(), grace_ms, 200)
                                .await
                                .map_err(RunError::Redis)?;
                            if sweep.marked > 0 {
                                tracing::info!(
                                    shard = n,
                                    marked = sweep.marked,
                                    "agents marked offline"
                                );
                            }
                        }
                        Ok::<_, RunError>(())
                    }
                },
            );

            let leases = Leases::new(keys.clone(), LeaseSettings::new(0, 0));
            let redis = stores.redis.clone();
            every(
                tracker,
                shutdown,
                "lease_recovery",
                Duration::from_secs(1),
                move || {
                    let (leases, redis) = (leases.clone(), redis.clone());
                    async move {
                        let mut conn = redis
                            .get()
                            .await
                            .map_err(|e| RunError::Startup(e.to_string()))?;
                        for n in 0..leases.keys().shards() {
                            let done = leases
                                .recover(&mut *conn, n, now_ms(), 500)
                                .await
                                .map_err(RunError::Redis)?;
                            if done.expired > 0 {
                                tracing::info!(
                                    shard = n,
                                    expired = done.expired,
                                    "leases of silent agents expired"
                                );
                            }
                        }
                        Ok::<_, RunError>(())
                    }
                },
            );

            let lifecycle = lifecycle::Lifecycle {
                stores: stores.clone(),
                leases: Leases::new(keys.clone(), LeaseSettings::new(0, 0)),
                keys: keys.clone(),
                max_retries: config.max_retries,
                retry_backoff: config.retry_backoff,
                awaiting: Default::default(),
            };
            let schema = stores.clone();
            every(
                tracker,
                shutdown,
                "check_lifecycle",
                Duration::from_millis(500),
                move || {
                    let (lifecycle, schema) = (lifecycle.clone(), schema.clone());
                    async move {
                        schema.schema_current().await;
                        let pass = lifecycle.pass().await?;
                        // Slots waiting for the projector are on the gauge, not in the log.
                        let quiet = lifecycle::Pass {
                            awaiting: pass.awaiting,
                            ..Default::default()
                        };
                        if pass != quiet {
                            tracing::info!(?pass, "check lifecycle");
                        }
                        Ok::<_, lifecycle::LifecycleError>(())
                    }
                },
            );

            let (pg, redis, schema) = (stores.pg.clone(), stores.redis.clone(), stores.clone());
            let parked = checkplane_core::dead_letters::Parked::new(keys.clone());
            let watch = Arc::new(Backlog::default());
            let streams = keys.projected_streams();
            {
                let (watch, bound) = (watch.clone(), config.degraded_lag);
                stores.concerns.add(move || {
                    let concern = watch.concern(bound);
                    async move { concern }
                });
            }
            // Redis lost its data (or is new) when the sentinel is missing: every open slot's
            // task goes back into its agent's stream (idempotent: a task Redis has is kept).
            {
                let (pg, redis, schema) = (stores.pg.clone(), stores.redis.clone(), stores.clone());
                let (sentinel, leases) = (
                    keys.sentinel(),
                    Leases::new(keys.clone(), LeaseSettings::new(0, 0)),
                );
                let me = config.consumer.clone();
                every(
                    tracker,
                    shutdown,
                    "redis_sentinel",
                    Duration::from_secs(5),
                    move || {
                        let (pg, redis, schema) = (pg.clone(), redis.clone(), schema.clone());
                        let (sentinel, leases, me) = (sentinel.clone(), leases.clone(), me.clone());
                        async move {
                            schema.schema_current().await;
                            let mut conn = redis.get().await.map_err(|e| RunError::Startup(e.to_string()))?;
                            let set: Option<String> = redis::cmd("SET")
                                .arg(&sentinel)
                                .arg(&me)
                                .arg("NX")
                                .query_async(&mut *conn)
                                .await
                                .map_err(RunError::Redis)?;
                            if set.is_none() {
                                return Ok(());
                            }
                            let client = pg.get().await.map_err(|e| RunError::Startup(e.to_string()))?;
                            let done = checkplane_core::fanout::requeue_open_slots(
                                &**client,
                                &*conn,
                                &leases,
                                |_| {},
                            )
                            .await
                            .map_err(|e| RunError::Startup(checkplane_runtime::error_chain(&e)))?;
                            if done.slots > 0 {
                                tracing::warn!(
                                    slots = done.slots,
                                    checks = done.checks,
                                    closed = done.closed,
                                    "Redis had lost its data: the open slots' tasks are back in their streams"
                                );
                            }
                            Ok::<_, RunError>(())
                        }
                    },
                );
            }
            every(
                tracker,
                shutdown,
                "parked_gauges",
                Duration::from_secs(5),
                move || {
                    let (pg, redis, schema, parked) =
                        (pg.clone(), redis.clone(), schema.clone(), parked.clone());
                    let (watch, streams) = (watch.clone(), streams.clone());
                    async move {
                        schema.schema_current().await;
                        let client = pg
                            .get()
                            .await
                            .map_err(|e| RunError::Startup(e.to_string()))?;
                        let failures = checkplane_core::failures::count(&**client)
                            .await
                            .map_err(|e| RunError::Startup(checkplane_runtime::error_chain(&e)))?;
                        let fleet = client
                            .query_one(
                                "SELECT count(*) AS online,
                                        COALESCE(EXTRACT(EPOCH FROM now() - min(s.last_seen)), 0)::float8
                                            AS oldest
                                 FROM agents a LEFT JOIN agent_last_seen s USING (agent_id)
                                 WHERE a.status = 'online'",
                                &[],
                            )
                            .await
                            .map_err(|e| RunError::Startup(checkplane_runtime::error_chain(&e)))?;
                        metrics::gauge!("checkplane_agents_online")
                            .set(fleet.get::<_, i64>("online") as f64);
                        // Alerted on past twice the heartbeat interval.
                        metrics::gauge!("checkplane_agents_heartbeat_age_max_seconds")
                            .set(fleet.get::<_, f64>("oldest"));
                        drop(client);
                        let mut conn = redis
                            .get()
                            .await
                            .map_err(|e| RunError::Startup(e.to_string()))?;
                        let letters = parked.count(&mut *conn).await.map_err(RunError::Redis)?;
                        let lag = projector_lag(&mut *conn, &streams)
                            .await
                            .map_err(RunError::Redis)?;
                        metrics::gauge!("checkplane_projection_failures").set(failures as f64);
                        metrics::gauge!("checkplane_dead_letters").set(letters as f64);
                        metrics::gauge!("checkplane_projection_lag").set(lag.0 as f64);
                        watch.set(failures, letters, lag);
                        Ok::<_, RunError>(())
                    }
                },
            );

            let (pg, schema) = (stores.pg.clone(), stores.clone());
            let events = config.events_retention;
            let ages = checkplane_core::retention::Ages {
                results: config.results_retention,
                metrics: config.metrics_retention,
                history: config.history_retention,
            };
            every(
                tracker,
                shutdown,
                "retention",
                Duration::from_secs(3600),
                move || {
                    let (pg, schema) = (pg.clone(), schema.clone());
                    async move {
                        use checkplane_core::retention::{
                            maintain_events, trim_results, TRIM_BATCH,
                        };
                        schema.schema_current().await;
                        let failed = |e: tokio_postgres::Error| {
                            RunError::Startup(checkplane_runtime::error_chain(&e))
                        };
                        let mut client = pg
                            .get()
                            .await
                            .map_err(|e| RunError::Startup(e.to_string()))?;
                        let done = maintain_events(&mut client, events).await.map_err(failed)?;
                        tracing::debug!(?done, "events maintenance");
                        let trimmed = trim_results(&client, ages, TRIM_BATCH)
                            .await
                            .map_err(failed)?;
                        if trimmed != Default::default() {
                            tracing::info!(?trimmed, "retention: old results and metrics deleted");
                        }
                        Ok::<_, RunError>(())
                    }
                },
            );
            axum::Router::new()
        },
    )
    .await
}

/// `scheduler replay-failures [--id N]`: replay the parked events (or one), print what
/// happened; exit 0 when none failed again, 1 otherwise.
async fn replay_failures(config: Config, only: Option<i64>) -> std::process::ExitCode {
    let database = &config.service.store.database;
    let outcome = async {
        checkplane_runtime::db::migrate(database).await?;
        let mut client = checkplane_runtime::db::connect(database).await?;
        let left_before = checkplane_core::failures::count(&client).await?;
        let done = checkplane_core::failures::replay(&mut client, only)
            .await
            .map_err(|e| RunError::Startup(checkplane_runtime::error_chain(&e)))?;
        let left = checkplane_core::failures::count(&client).await?;
        Ok::<_, Box<dyn std::error::Error>>((left_before, done, left))
    }
    .await;
    match outcome {
        Ok((before, done, left)) => {
            println!(
                "parked before: {before}; applied: {}, already applied: {}, failed again: {}; parked now: {left}",
                done.applied, done.known, done.failed
            );
            if done.failed == 0 {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("scheduler replay-failures: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `scheduler requeue`: Redis came back empty (or from an old snapshot); every open slot's
/// task goes back into its agent's stream, from PostgreSQL (see
/// [`checkplane_core::fanout::requeue_open_slots`]). A line per batch, then the totals.
async fn requeue(config: Config) -> std::process::ExitCode {
    let store = &config.service.store;
    let keys = Keys::new(store.stream_prefix.clone(), store.stream_shards);
    let leases = Leases::new(keys, LeaseSettings::new(0, 0));
    let outcome = async {
        checkplane_runtime::db::migrate(&store.database).await?;
        let client = checkplane_runtime::db::connect(&store.database).await?;
        let redis = redis::Client::open(store.redis.connection_info())?;
        let conn = redis
            .get_multiplexed_async_connection_with_config(
                &redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(10)))
                    .set_response_timeout(Some(Duration::from_secs(30))),
            )
            .await?;
        let done = checkplane_core::fanout::requeue_open_slots(&client, &conn, &leases, |so_far| {
            println!(
                "requeued {} open slots of {} checks so far",
                so_far.slots, so_far.checks
            );
        })
        .await?;
        Ok::<_, Box<dyn std::error::Error>>(done)
    }
    .await;
    match outcome {
        Ok(done) => {
            println!(
                "requeued {} open slots of {} checks: each task is in its agent's stream{}",
                done.slots,
                done.checks,
                if done.closed > 0 {
                    format!(" but {} Redis had closed already", done.closed)
                } else {
                    String::new()
                }
            );
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "scheduler requeue: {}",
                checkplane_runtime::error_chain(&*error)
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// The scheduler as a launchable [`checkplane_runtime::Service`].
pub struct Service;

impl checkplane_runtime::Service for Service {
    const NAME: &'static str = NAME;
    const LISTEN: (&'static str, &'static str) = ("HTTP_ADDR", "0.0.0.0:8081");
    const REBUILD: bool = true;
    type Config = Config;

    fn rebuild(
        client: tokio_postgres::Client,
    ) -> impl std::future::Future<
        Output = Result<
            checkplane_runtime::launch::Rebuilt,
            checkplane_runtime::launch::RebuildError,
        >,
    > + Send {
        checkplane_core::projection::rebuild_command(client)
    }

    fn load(env: &mut Env) -> Result<Config, ConfigError> {
        load(env)
    }

    fn base(config: &Config) -> &BaseSettings {
        &config.service.base
    }

    fn store(config: &Config) -> Option<&StoreSettings> {
        Some(&config.service.store)
    }

    fn commands() -> Vec<clap::Command> {
        vec![
            clap::Command::new("requeue").about(
                "After Redis lost its data: add the task of every open slot again to its \
                 agent's stream (from PostgreSQL)",
            ),
            clap::Command::new("replay-failures")
                .about("Apply the events parked in projection_failures again (after a fix)")
                .arg(
                    clap::Arg::new("id")
                        .long("id")
                        .value_parser(clap::value_parser!(i64).range(1..))
                        .help("only this parked event (its id in GET /v1/projection-failures)"),
                ),
        ]
    }

    async fn command(
        config: Config,
        name: String,
        args: clap::ArgMatches,
    ) -> std::process::ExitCode {
        match name.as_str() {
            "replay-failures" => replay_failures(config, args.get_one::<i64>("id").copied()).await,
            "requeue" => requeue(config).await,
            _ => std::process::ExitCode::from(2),
        }
    }

    async fn run(
        config: Config,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), RunError> {
        run(config, listener, shutdown).await
    }
}

/// What the scheduler's `/healthz` watches, as its last round of counting found it.
#[derive(Debug, Default)]
struct Backlog(std::sync::Mutex<Option<BacklogRound>>);

#[derive(Debug, Clone)]
struct BacklogRound {
    failures: i64,
    letters: u64,
    lag: (u64, String),
}

impl Backlog {
    fn set(&self, failures: i64, letters: u64, lag: (u64, String)) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(BacklogRound {
            failures,
            letters,
            lag,
        });
    }

    /// Parked events, or a projector `bound` events behind on one stream or more.
    fn concern(&self, bound: u64) -> Option<String> {
        let round = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        let mut reasons = Vec::new();
        if round.failures > 0 || round.letters > 0 {
            reasons.push(format!(
                "{} events parked (projection failures {}, dead letters {}): see the runbook",
                round.failures.unsigned_abs() + round.letters,
                round.failures,
                round.letters
            ));
        }
        if round.lag.0 > bound {
            reasons.push(format!(
                "projection lag {} events (most on {}; PROJECTION_DEGRADED_LAG {bound})",
                round.lag.0, round.lag.1
            ));
        }
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }
}

/// The projector group's lag summed over `streams` (entries added and not yet delivered to
/// it, as `XINFO GROUPS` counts them), and the stream with the most.
async fn projector_lag(
    conn: &mut impl redis::aio::ConnectionLike,
    streams: &[String],
) -> redis::RedisResult<(u64, String)> {
    let mut total = 0;
    let mut worst = (0, String::new());
    for stream in streams {
        let groups: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(conn)
            .await
            .or_else(|e| {
                // A stream nothing was written to yet has no groups to ask.
                if e.to_string().contains("no such key") {
                    Ok(redis::Value::Array(Vec::new()))
                } else {
                    Err(e)
                }
            })?;
        let lag = group_lag(&groups, PROJECTOR_GROUP);
        total += lag;
        if lag > worst.0 {
            worst = (lag, stream.clone());
        }
    }
    Ok((total, worst.1))
}

/// `lag` of `group` in an `XINFO GROUPS` answer (0 when unknown: Redis leaves it nil after
/// entries were deleted).
fn group_lag(groups: &redis::Value, group: &str) -> u64 {
    let redis::Value::Array(groups) = groups else {
        return 0;
    };
    for entry in groups {
        let fields: Vec<(String, redis::Value)> = match entry {
            redis::Value::Array(items) => items
                .chunks(2)
                .filter_map(|pair| match pair {
                    [k, v] => redis::from_redis_value_ref::<String>(k)
                        .ok()
                        .map(|k| (k, v.clone())),
                    _ => None,
                })
                .collect(),
            redis::Value::Map(pairs) => pairs
                .iter()
                .filter_map(|(k, v)| {
                    redis::from_redis_value_ref::<String>(k)
                        .ok()
                        .map(|k| (k, v.clone()))
                })
                .collect(),
            _ => continue,
        };
        let name = fields
            .iter()
            .find(|(k, _)| k == "name")
            .and_then(|(_, v)| redis::from_redis_value_ref::<String>(v).ok());
        if name.as_deref() == Some(group) {
            return fields
                .iter()
                .find(|(k, _)| k == "lag")
                .and_then(|(_, v)| redis::from_redis_value_ref::<u64>(v).ok())
                .unwrap_or(0);
        }
    }
    0
}

#[cfg(test)]
mod backlog_tests {
    use super::*;

    fn group(name: &str, lag: redis::Value) -> redis::Value {
        let s = |t: &str| redis::Value::BulkString(t.as_bytes().to_vec());
        redis::Value::Array(vec![
            s("name"),
            s(name),
            s("consumers"),
            redis::Value::Int(1),
            s("lag"),
            lag,
        ])
    }

    #[test]
    fn the_projector_groups_lag_is_read_from_xinfo_groups() {
        let answer = redis::Value::Array(vec![
            group("other", redis::Value::Int(99)),
            group(PROJECTOR_GROUP, redis::Value::Int(7)),
        ]);
        assert_eq!(group_lag(&answer, PROJECTOR_GROUP), 7);
        let unknown = redis::Value::Array(vec![group(PROJECTOR_GROUP, redis::Value::Nil)]);
        assert_eq!(group_lag(&unknown, PROJECTOR_GROUP), 0);
        assert_eq!(group_lag(&redis::Value::Array(vec![]), PROJECTOR_GROUP), 0);
    }

    #[test]
    fn parked_events_and_lag_over_the_bound_need_attention() {
        let backlog = Backlog::default();
        assert_eq!(backlog.concern(10), None, "nothing counted yet");
        backlog.set(0, 0, (10, "cp:events:checks".into()));
        assert_eq!(backlog.concern(10), None, "at the bound");
        backlog.set(2, 1, (11, "cp:events:checks".into()));
        assert_eq!(
            backlog.concern(10).unwrap(),
            "3 events parked (projection failures 2, dead letters 1): see the runbook; \
             projection lag 11 events (most on cp:events:checks; PROJECTION_DEGRADED_LAG 10)"
        );
    }
}
