//! haproxy-sync: polls HAProxy through its Runtime API and executes drain / maint / ready. Serves its probes on `HTTP_ADDR`.

pub mod actions;
pub mod breaker;
pub mod error;
pub mod relay;
pub use checkplane_haproxy::replies;
pub mod runtime_api;
pub mod sync;

use std::time::Duration;

use checkplane_core::keys::Keys;
use checkplane_runtime::stores::{serve_with_stores, StoreServiceConfig};
use checkplane_runtime::{BaseSettings, ConfigError, Env, RunError, StoreSettings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The binary's name.
pub const NAME: &str = "haproxy-sync";

/// Who haproxy-sync's events say caused them.
pub const ACTOR: &str = "system:haproxy-sync";

/// The haproxy-sync's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub service: StoreServiceConfig,
    /// `HAPROXY_SYNC_INTERVAL`, `HAPROXY_SYNC_LEASE` and the Runtime API timeouts.
    pub sync: sync::Settings,
}

/// Read the configuration from an environment snapshot.
pub fn load(env: &mut Env) -> Result<Config, ConfigError> {
    let service = StoreServiceConfig::from_env(
        env,
        NAME,
        <Service as checkplane_runtime::Service>::LISTEN.1,
    )?;
    let interval = env.duration(
        "HAPROXY_SYNC_INTERVAL",
        Duration::from_secs(60),
        Duration::from_secs(1),
        Duration::from_secs(3600),
    )?;
    let lease = env.duration(
        "HAPROXY_SYNC_LEASE",
        Duration::from_secs(15),
        Duration::from_secs(2),
        Duration::from_secs(600),
    )?;
    let read_timeout = env.duration(
        "HAPROXY_SYNC_TIMEOUT",
        Duration::from_secs(5),
        Duration::from_millis(100),
        Duration::from_secs(60),
    )?;
    let retry_base = env.duration(
        "HAPROXY_ACTION_RETRY_BASE",
        Duration::from_secs(1),
        Duration::from_millis(10),
        Duration::from_secs(60),
    )?;
    let cooldown = env.duration(
        "HAPROXY_BREAKER_COOLDOWN",
        Duration::from_secs(60),
        Duration::from_millis(100),
        Duration::from_secs(3600),
    )?;
    let parallelism =
        usize::try_from(env.u64_in("HAPROXY_ACTION_PARALLELISM", 4, 1, 64)?).unwrap_or(4);
    // Directories as the sockets under them resolve (`/var/run` is `/run`).
    let allowed = env
        .haproxy_allowed_addresses()?
        .with_dirs_resolved(|dir| std::fs::canonicalize(dir).ok());
    let reload_probe = env.duration(
        "HAPROXY_RELOAD_PROBE_INTERVAL",
        Duration::from_secs(2),
        Duration::from_millis(500),
        Duration::from_secs(3600),
    )?;
    Ok(Config {
        service,
        sync: sync::Settings {
            interval,
            reload_probe,
            lease,
            connect_timeout: read_timeout.min(Duration::from_secs(2)),
            read_timeout,
            actions: actions::Settings {
                retry_base,
                cooldown,
                parallelism,
            },
            allowed: std::sync::Arc::new(allowed),
        },
    })
}

/// Run the haproxy-sync until `shutdown` fires.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let settings = config.sync.clone();
    let keys = Keys::new(
        config.service.store.stream_prefix.clone(),
        config.service.store.stream_shards,
    );
    serve_with_stores(config.service, listener, shutdown, move |stores, tracker, shutdown| {
        // Counted every 5 s into `attention` (the work pool is not borrowed per /healthz).
        let attention = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        {
            let attention = attention.clone();
            stores.concerns.add(move || {
                let now = attention
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                async move { now }
            });
        }
        {
            let (pg, schema) = (stores.pg.clone(), stores.clone());
            checkplane_runtime::stores::every(
                tracker,
                shutdown,
                "attention",
                Duration::from_secs(5),
                move || {
                    let (pg, schema, attention) = (pg.clone(), schema.clone(), attention.clone());
                    async move {
                        schema.schema_current().await;
                        let now = needs_attention(&pg).await?;
                        *attention
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
                        Ok::<_, error::SyncError>(())
                    }
                },
            );
        }
        let (stores, shutdown, tracker) = (stores.clone(), shutdown.clone(), tracker.clone());
        tracker.clone().spawn(async move {
            stores.schema_current().await;
            let lease = settings.lease;
            // New events on the haproxy stream (an action requested, a forced sync) start a
            // round at once rather than at the next tick.
            let wake = std::sync::Arc::new(tokio::sync::Notify::new());
            // The instances of actions requested, handed over as they are seen: their open
            // actions are started at once when the instance was held at the last round.
            let (requested_tx, mut requested) = tokio::sync::mpsc::channel(256);
            tracker.spawn(watch_events(
                stores.clone(),
                keys.events("haproxy"),
                wake.clone(),
                requested_tx,
                shutdown.clone(),
            ));
            let mut sync = sync::Sync::new(stores, keys, settings, tracker.clone(), shutdown.clone());
            // Rounds well inside the lease, so the owner renews it in time.
            let mut ticker = tokio::time::interval((lease / 4).min(Duration::from_secs(1)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                    _ = wake.notified() => {}
                    Some(instance) = requested.recv() => {
                        match sync.start_open(&instance).await {
                            Ok(true) => continue,
                            Ok(false) => {}
                            Err(error) => tracing::warn!(error = %checkplane_runtime::error_chain(&error), "starting a requested action"),
                        }
                    }
                }
                let round = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    round = sync.round() => round,
                };
                if let Err(error) = round {
                    tracing::warn!(error = %checkplane_runtime::error_chain(&error), "sync round failed");
                }
            }
        });
        axum::Router::new()
    })
    .await
}

/// Wake the sync loop whenever something is added to the haproxy events stream (blocking
/// reads on a connection of the pool's own, from the newest entry on).
async fn watch_events(
    stores: checkplane_runtime::stores::Stores,
    stream: String,
    wake: std::sync::Arc<tokio::sync::Notify>,
    requested: tokio::sync::mpsc::Sender<String>,
    shutdown: CancellationToken,
) {
    const BLOCK: Duration = Duration::from_secs(1);
    let mut last = "$".to_owned();
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    while !shutdown.is_cancelled() {
        let read = async {
            if conn.is_none() {
                conn = Some(stores.blocking_connection(BLOCK).await?);
            }
            let Some(c) = conn.as_mut() else {
                return Ok(None);
            };
            // Nil when the block times out with nothing new.
            let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&stream)
                .arg(&last)
                .query_async(c)
                .await?;
            Ok::<_, redis::RedisError>(reply)
        };
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = read => r,
        };
        match reply {
            Ok(None) => {}
            Ok(Some(reply)) => {
                let entries: Vec<&redis::streams::StreamId> =
                    reply.keys.iter().flat_map(|k| k.ids.iter()).collect();
                if let Some(newest) = entries.last() {
                    last = newest.id.clone();
                }
                // Only what a round acts on: sync's and the executors' own events (polls,
                // action updates) would only start rounds with nothing new to do.
                let mut round = false;
                for entry in &entries {
                    match requested_action(entry) {
                        // A full channel: the round finds it instead.
                        Some(action) => round |= requested.try_send(action).is_err(),
                        None => round |= wakes_a_round(entry),
                    }
                }
                if round {
                    wake.notify_one();
                }
            }
            Err(error) => {
                tracing::debug!(%error, "watching the haproxy stream");
                conn = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The instance of the action a `haproxy.action_requested` entry asks for.
fn requested_action(entry: &redis::streams::StreamId) -> Option<String> {
    let Some(redis::Value::BulkString(raw)) = entry.map.get("event") else {
        return None;
    };
    let event = checkplane_wire::events::Event::decode(serde_json::from_slice(raw).ok()?).ok()?;
    match event.body {
        checkplane_wire::events::EventBody::HaproxyActionRequested(r) => Some(r.instance_id),
        _ => None,
    }
}

/// Whether a haproxy stream entry asks for a round: an action requested, an instance
/// registered or removed (anything unreadable too, to be safe).
fn wakes_a_round(entry: &redis::streams::StreamId) -> bool {
    let Some(redis::Value::BulkString(raw)) = entry.map.get("event") else {
        return true;
    };
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(raw) else {
        return true;
    };
    matches!(
        event["type"].as_str(),
        Some(
            "haproxy.action_requested" | "haproxy.instance_registered" | "haproxy.instance_removed"
        ) | None
    )
}

/// The haproxy-sync as a launchable [`checkplane_runtime::Service`].
pub struct Service;

impl checkplane_runtime::Service for Service {
    const NAME: &'static str = NAME;
    const LISTEN: (&'static str, &'static str) = ("HTTP_ADDR", "0.0.0.0:8082");
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

    async fn run(
        config: Config,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), RunError> {
        run(config, listener, shutdown).await
    }
}

/// What `/healthz` says needs attention: registered instances whose breaker is not closed
/// (it closes at the next action's trial), and their servers drifting from their desired
/// state (as `sync::drifting` counts them, over every instance).
async fn needs_attention(pg: &deadpool_postgres::Pool) -> Result<Option<String>, error::SyncError> {
    let client = pg.get().await?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM haproxy_breakers b JOIN haproxy_instances i USING (instance_id)
                      WHERE b.state <> 'closed' AND i.removed_at IS NULL) AS open,
                    (SELECT count(*) FROM haproxy_drift d JOIN haproxy_servers s USING (server_id)
                       JOIN haproxy_instances i ON i.instance_id = d.instance_id
                      WHERE d.last_poll > d.since_poll AND s.desired_state IS NOT NULL
                        AND s.removed_at IS NULL AND i.removed_at IS NULL
                        AND s.admin_state IS DISTINCT FROM s.desired_state) AS drifting",
            &[],
        )
        .await?;
    let (open, drifting): (i64, i64) = (row.get("open"), row.get("drifting"));
    let mut reasons = Vec::new();
    if open > 0 {
        reasons.push(format!(
            "{open} instance(s) with the breaker open: actions on them wait"
        ));
    }
    if drifting > 0 {
        reasons.push(format!(
            "{drifting} server(s) drifting from their desired state"
        ));
    }
    Ok((!reasons.is_empty()).then(|| reasons.join("; ")))
}
