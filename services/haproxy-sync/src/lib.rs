//! haproxy-sync: polls HAProxy through its Runtime API and executes drain / maint / ready. Serves its probes on `HTTP_ADDR`.

pub mod replies;
pub mod runtime_api;

use checkplane_runtime::stores::{serve_with_stores, StoreServiceConfig};
use checkplane_runtime::{BaseSettings, ConfigError, Env, RunError, StoreSettings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The binary's name.
pub const NAME: &str = "haproxy-sync";

/// The haproxy-sync's configuration.
pub type Config = StoreServiceConfig;

/// Read the configuration from an environment snapshot.
pub fn load(env: &mut Env) -> Result<Config, ConfigError> {
    StoreServiceConfig::from_env(env, NAME, "0.0.0.0:8082")
}

/// Run the haproxy-sync until `shutdown` fires.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    serve_with_stores(
        config,
        listener,
        shutdown,
        |_stores, _tracker, _shutdown| axum::Router::new(),
    )
    .await
}

/// The haproxy-sync as a launchable [`checkplane_runtime::Service`].
pub struct Service;

impl checkplane_runtime::Service for Service {
    const NAME: &'static str = NAME;
    const REBUILD: bool = true;
    type Config = Config;

    fn load(env: &mut Env) -> Result<Config, ConfigError> {
        load(env)
    }

    fn base(config: &Config) -> &BaseSettings {
        &config.base
    }

    fn store(config: &Config) -> Option<&StoreSettings> {
        Some(&config.store)
    }

    async fn run(
        config: Config,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), RunError> {
        run(config, listener, shutdown).await
    }
}
