//! The checkplane agent: runs on each probe host, leases check work from the gateway and
//! reports results. It serves `/livez`, `/readyz` and `/metrics` on its own small health port
//! (`AGENT_HEALTH_ADDR`); `/readyz` asks whether the control plane answers.

use std::sync::Arc;
use std::time::Duration;

use checkplane_runtime::health::{Health, Probe};
use checkplane_runtime::{BaseSettings, ConfigError, Env, RunError, StoreSettings};
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The binary's name.
pub const NAME: &str = "agent";

/// The agent's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Logging, health port (`AGENT_HEALTH_ADDR`), shutdown, probes.
    pub base: BaseSettings,
    /// Base URL of the gateway (`AGENT_CONTROL_PLANE`).
    pub control_plane: reqwest::Url,
}

/// Read the configuration from an environment snapshot.
pub fn load(env: &mut Env) -> Result<Config, ConfigError> {
    let base = BaseSettings::from_env(env, NAME, "AGENT_HEALTH_ADDR", "127.0.0.1:9100")?;
    let raw = env.required_string("AGENT_CONTROL_PLANE")?;
    let control_plane = reqwest::Url::parse(&raw)
        .ok()
        .filter(|u| u.scheme() == "http" && u.host().is_some())
        .ok_or_else(|| {
            ConfigError::new(
                "AGENT_CONTROL_PLANE",
                format!("expected an http:// URL of the gateway, got {raw:?}"),
            )
        })?;
    Ok(Config {
        base,
        control_plane,
    })
}

/// Asks the gateway's `/livez`.
struct ControlPlaneProbe {
    client: reqwest::Client,
    livez: reqwest::Url,
}

impl Probe for ControlPlaneProbe {
    fn name(&self) -> &'static str {
        "control_plane"
    }

    fn check(&self, timeout: Duration) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let response = self
                .client
                .get(self.livez.clone())
                .timeout(timeout)
                .send()
                .await
                .map_err(|e| {
                    if e.is_timeout() {
                        "timed out".to_owned()
                    } else {
                        "unreachable".to_owned()
                    }
                })?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(format!("answered {}", response.status().as_u16()))
            }
        })
    }
}

/// Run the agent until `shutdown` fires.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("checkplane-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| RunError::Startup(format!("building the HTTP client: {e}")))?;
    let livez = config
        .control_plane
        .join("livez")
        .map_err(|e| RunError::Startup(format!("control plane URL: {e}")))?;
    let probe: Arc<dyn Probe> = Arc::new(ControlPlaneProbe { client, livez });
    let health = Arc::new(Health::new(
        NAME,
        vec![probe],
        config.base.ready_timeout,
        config.base.metrics.clone(),
    ));
    let app = checkplane_runtime::http::finish(health.router());
    checkplane_runtime::http::serve(listener, app, shutdown)
        .await
        .map_err(RunError::Serve)
}

/// The agent as a launchable [`checkplane_runtime::Service`].
pub struct Service;

impl checkplane_runtime::Service for Service {
    const NAME: &'static str = NAME;
    const MIGRATES: bool = false;
    type Config = Config;

    fn load(env: &mut Env) -> Result<Config, ConfigError> {
        load(env)
    }

    fn base(config: &Config) -> &BaseSettings {
        &config.base
    }

    fn store(_config: &Config) -> Option<&StoreSettings> {
        None
    }

    async fn run(
        config: Config,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), RunError> {
        run(config, listener, shutdown).await
    }
}
