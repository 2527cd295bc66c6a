//! The HTTP edge of checkplane: agent, operator and HAProxy APIs, plus the probes every
//! service has.

pub mod agents;
pub mod applications;
pub mod auth;
pub mod checks;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod edge;
pub mod geoip;
pub mod haproxy;
pub mod leases;
pub mod limits;
pub mod operators;
pub mod paging;
pub mod parked;
pub mod places;
pub mod revocations;
pub mod state;

use std::sync::Arc;

use checkplane_core::doorbell::Doorbell;
use checkplane_core::keys::Keys;
use checkplane_core::leases::{LeaseSettings, Leases};
use checkplane_core::presence::Presence;
use checkplane_runtime::http::BodyLimit;
use checkplane_runtime::stores::serve_with_stores;
use checkplane_runtime::{BaseSettings, ConfigError, Env, RunError, StoreSettings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{load, Config};

/// The binary's name.
pub const NAME: &str = "gateway";

/// How long after the rate limiter last counted in memory `/healthz` says `degraded`.
const LIMITER_CONCERN: std::time::Duration = std::time::Duration::from_secs(60);

/// The body limit of the operator routes that do not set their own.
const OPERATOR_BODY_LIMIT: usize = 64 * 1024;

/// Run the gateway until `shutdown` fires.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    if config.enrollment_token.is_none() {
        tracing::warn!("GATEWAY_ENROLLMENT_TOKEN is not set: agents cannot register");
    }
    let service = config.service.clone();
    let keys = Keys::new(
        service.store.stream_prefix.clone(),
        service.store.stream_shards,
    );
    let redis_client =
        redis::Client::open(service.store.redis.connection_info()).map_err(RunError::Redis)?;
    let lease_settings = LeaseSettings::new(
        i64::try_from(config.lease_ttl.as_millis()).unwrap_or(i64::MAX),
        config.max_deliveries,
    );
    let config = Arc::new(config);
    serve_with_stores(
        service,
        listener,
        shutdown,
        move |stores, tracker, shutdown| {
            let doorbell = Doorbell::default();
            tracker.spawn(doorbell.clone().subscribe(
                redis_client.clone(),
                keys.clone(),
                shutdown.clone(),
            ));
            let auth_cache = Arc::new(credentials::AuthCache::new(config.auth_cache_ttl));
            let key_cache = Arc::new(credentials::KeyCache::new(config.auth_cache_ttl));
            tracker.spawn(revocations::follow(
                redis_client,
                keys.auth_invalidations(),
                auth_cache.clone(),
                key_cache.clone(),
                shutdown.clone(),
            ));
            let live_streams = Arc::new(tokio::sync::Semaphore::new(config.max_live_streams));
            let key_waits = places::Places::new("stream", config.max_waits_per_key);
            let agent_claims = places::Places::new("claim", config.max_claims_per_agent);
            let limiter = Arc::new(checkplane_core::ratelimit::Limiter::new(keys.clone()));
            let watched = limiter.clone();
            stores.concerns.add(move || {
                let ago = watched.fell_back_ago().filter(|ago| *ago < LIMITER_CONCERN);
                async move {
                    Some(format!(
                        "rate limiter: counted in memory {}s ago (Redis failed or hung): \
                         limits are per replica until it answers",
                        ago?.as_secs()
                    ))
                }
            });
            let state = state::AppState::new(state::Shared {
                stores: stores.clone(),
                presence: Presence::new(keys.clone()),
                leases: Leases::new(keys.clone(), lease_settings),
                doorbell,
                keys,
                auth_cache,
                key_cache,
                config,
                shutdown: shutdown.clone(),
                action_waiters: Arc::new(tokio::sync::Semaphore::new(haproxy::MAX_ACTION_WAITERS)),
                live_streams,
                key_waits,
                agent_claims,
                limiter,
                tracker: tracker.clone(),
            });
            agents::router()
                .merge(leases::router())
                .merge(operators::router())
                .merge(checks::router())
                // Their routes' bodies are small operator requests.
                .merge(haproxy::router().layer(BodyLimit(OPERATOR_BODY_LIMIT)))
                .merge(applications::router().layer(BodyLimit(OPERATOR_BODY_LIMIT)))
                .merge(parked::router().layer(BodyLimit(OPERATOR_BODY_LIMIT)))
                .layer(axum::middleware::from_fn(limits::headers))
                .with_state(state)
        },
    )
    .await
}

/// The gateway as a launchable [`checkplane_runtime::Service`].
pub struct Service;

impl checkplane_runtime::Service for Service {
    const NAME: &'static str = NAME;
    const LISTEN: (&'static str, &'static str) = ("HTTP_ADDR", "0.0.0.0:8080");
    const TLS: Option<&'static str> = Some("GATEWAY_TLS_CERT_FILE");
    type Config = Config;

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
        vec![cli::keys_command()]
    }

    async fn command(
        config: Config,
        name: String,
        args: clap::ArgMatches,
    ) -> std::process::ExitCode {
        match name.as_str() {
            "keys" => cli::keys(config, args).await,
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
