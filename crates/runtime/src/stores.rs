//! The PostgreSQL and Redis work pools of a service, their readiness probes, and
//! migrate-on-start.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db::{self, DbError};
use crate::health::{Gate, PostgresProbe, Probe, RedisProbe};
use crate::settings::StoreSettings;
use crate::RunError;

/// Pools and probes for a service backed by PostgreSQL and Redis.
#[derive(Clone)]
pub struct Stores {
    /// The PostgreSQL work pool.
    pub pg: deadpool_postgres::Pool,
    /// The Redis work pool: for anything that holds a connection, but not blocking reads (its
    /// connections answer within 500 ms or fail): those take [`Stores::blocking_connection`].
    pub redis: deadpool_redis::Pool,
    /// One multiplexed Redis connection shared by every request for short, non-blocking
    /// commands (the lease scripts, heartbeats): concurrent requests pipeline on it, and no
    /// pool checkout (a `PING` round trip each) is paid. It reconnects by itself; never send it
    /// a blocking command.
    pub redis_shared: redis::aio::ConnectionManager,
    /// The settings they were made from.
    pub settings: Arc<StoreSettings>,
    probes: Vec<Arc<dyn Probe>>,
    schema: tokio::sync::watch::Receiver<bool>,
    /// What the service needs attention for (`/healthz` says `degraded`): added to as it
    /// starts.
    pub concerns: crate::health::Concerns,
}

impl Stores {
    /// Build the pools (without connecting) and, when `MIGRATE_ON_START` is on, start applying
    /// migrations in the background: until they are applied `/readyz` answers 503 naming
    /// `migrations`, and a database that is down is retried rather than crashing the process.
    pub fn start(
        settings: StoreSettings,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<Self, RunError> {
        let pg = db::pool(&settings.database, settings.database_pool_size)?;
        let redis = deadpool_redis::Pool::builder(
            deadpool_redis::Manager::new(settings.redis.connection_info())
                .map_err(RunError::Redis)?,
        )
        .max_size(settings.redis_pool_size)
        .runtime(deadpool_redis::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| RunError::Startup(format!("building the Redis pool: {e}")))?;

        let redis_shared = redis::aio::ConnectionManager::new_lazy_with_config(
            redis::Client::open(settings.redis.connection_info()).map_err(RunError::Redis)?,
            redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(5)))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500)),
        )
        .map_err(RunError::Redis)?;

        let mut probes: Vec<Arc<dyn Probe>> = vec![
            Arc::new(PostgresProbe::new(settings.database.clone())),
            Arc::new(RedisProbe::new(&settings.redis).map_err(RunError::Redis)?),
        ];
        // Background work must not touch tables before they exist: it waits for `schema`.
        let (schema_tx, schema) = tokio::sync::watch::channel(false);
        let gate = Gate::closed("migrations", "pending");
        probes.push(gate.clone());
        tracker.spawn(schema_until_current(
            settings.database.clone(),
            settings.migrate_on_start,
            gate,
            schema_tx,
            shutdown.clone(),
        ));
        Ok(Self {
            pg,
            redis,
            redis_shared,
            settings: Arc::new(settings),
            probes,
            schema,
            concerns: crate::health::Concerns::default(),
        })
    }

    /// A Redis connection of its own for blocking commands (`BLPOP`, `XREAD BLOCK`): pooled
    /// and shared connections answer within 500 ms or fail, which a block longer than that
    /// would always do. `block` is the longest block it will be sent.
    pub async fn blocking_connection(
        &self,
        block: Duration,
    ) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(block + Duration::from_secs(5)));
        redis::Client::open(self.settings.redis.connection_info())?
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Run an idempotent Redis operation on the shared connection, once more when the first
    /// try found the connection dropped (Redis restarted or failed over): the manager
    /// reconnects in between. Only for operations that may run twice (the lease scripts are:
    /// claims repeat by `request_id`, reports by their remembered answer).
    pub async fn on_shared<T, F, Fut>(&self, op: F) -> redis::RedisResult<T>
    where
        F: Fn(redis::aio::ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match op(self.redis_shared.clone()).await {
            Err(e) if e.is_unrecoverable_error() || e.is_connection_dropped() => {
                tracing::debug!(error = %e, "shared Redis connection dropped; trying once more");
                op(self.redis_shared.clone()).await
            }
            other => other,
        }
    }

    /// The readiness probes: postgres, redis, migrations.
    pub fn probes(&self) -> Vec<Arc<dyn Probe>> {
        self.probes.clone()
    }

    /// Wait until the database schema is current (migrated here or by another replica).
    pub async fn schema_current(&self) {
        let mut schema = self.schema.clone();
        let _ = schema.wait_for(|current| *current).await;
    }
}

/// Apply migrations (or, with `MIGRATE_ON_START=false`, wait for another process to have
/// applied them), retrying while the database is unreachable; then open the gate.
async fn schema_until_current(
    config: tokio_postgres::Config,
    migrate: bool,
    gate: Arc<Gate>,
    schema: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let attempt = async {
            if migrate {
                let report = db::migrate(&config).await?;
                tracing::info!(applied = ?report.applied, "migrations are up to date");
                Ok(true)
            } else {
                db::schema_is_current(&config).await
            }
        };
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return,
            attempt = attempt => attempt,
        };
        match attempt {
            Ok(true) => {
                gate.open();
                let _ = schema.send(true);
                return;
            }
            Ok(false) => gate.close("pending: run `migrate`"),
            Err(error) => {
                let reason = match &error {
                    DbError::Connect(_) => "database unreachable".to_owned(),
                    other => format!("failed: {}", crate::error_chain(other)),
                };
                tracing::warn!(error = %crate::error_chain(&error), retry_in = ?backoff, "schema not current yet");
                gate.close(reason);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// The settings of a service backed by PostgreSQL and Redis.
#[derive(Debug, Clone)]
pub struct StoreServiceConfig {
    pub base: crate::settings::BaseSettings,
    pub store: StoreSettings,
}

impl StoreServiceConfig {
    /// Read both, with the service's default listen address.
    pub fn from_env(
        env: &mut crate::config::Env,
        service: &'static str,
        default_listen: &str,
    ) -> Result<Self, crate::config::ConfigError> {
        Ok(Self {
            base: crate::settings::BaseSettings::from_env(
                env,
                service,
                "HTTP_ADDR",
                default_listen,
            )?,
            store: {
                let mut store = StoreSettings::from_env(env)?;
                // `pg_stat_activity` shows which service a connection is.
                store
                    .database
                    .application_name(format!("checkplane-{service}"));
                store
            },
        })
    }
}

/// Run a store-backed service: start the stores, let `build` add its routes and background
/// tasks, serve until `shutdown`, then wait for every background task to stop.
pub async fn serve_with_stores(
    config: StoreServiceConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    build: impl FnOnce(&Stores, &TaskTracker, &CancellationToken) -> axum::Router,
) -> Result<(), RunError> {
    let tracker = TaskTracker::new();
    let stores = Stores::start(config.store, &tracker, &shutdown)?;
    let health = Arc::new(
        crate::health::Health::new(
            config.base.service,
            stores.probes(),
            config.base.ready_timeout,
            config.base.metrics.clone(),
        )
        .with_concerns(stores.concerns.clone()),
    );
    let routes = build(&stores, &tracker, &shutdown);
    let app = crate::http::finish(health.router().merge(routes));
    let served = crate::listener::serve(
        listener,
        app,
        &config.base.http,
        config.base.tls.as_ref(),
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    served.map_err(RunError::Serve)
}

/// Run `work` every `interval` until `shutdown`; a failed round is logged and the next one
/// comes as usual. Stops between rounds.
pub fn every<F, Fut, E>(
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    name: &'static str,
    interval: Duration,
    mut work: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: std::error::Error + 'static,
{
    let shutdown = shutdown.clone();
    tracker.spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let round = tokio::select! {
                _ = shutdown.cancelled() => return,
                round = work() => round,
            };
            if let Err(error) = round {
                metrics::counter!("checkplane_task_errors_total", "task" => name).increment(1);
                tracing::warn!(task = name, error = %crate::error_chain(&error), "background round failed");
            }
        }
    });
}
