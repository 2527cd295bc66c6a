//! The gateway's configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use checkplane_runtime::stores::StoreServiceConfig;
use checkplane_runtime::{ConfigError, Env, Secret};

/// Everything the gateway reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Logging, listening, probes, PostgreSQL and Redis.
    pub service: StoreServiceConfig,
    /// `GATEWAY_ENROLLMENT_TOKEN`: what agents present to register; unset disables registration.
    pub enrollment_token: Option<Secret>,
    /// `GATEWAY_ADMIN_KEY`: the admin key for operator reads until API keys exist.
    pub admin_key: Option<Secret>,
    /// `HEARTBEAT_INTERVAL`: how often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// `GEOIP_CITY_DB` / `GEOIP_ASN_DB`: MaxMind databases to locate agents by address.
    pub geoip: Option<Arc<crate::geoip::GeoIp>>,
}

/// Read the gateway's configuration.
pub fn load(env: &mut Env) -> Result<Config, ConfigError> {
    let service = StoreServiceConfig::from_env(env, crate::NAME, "0.0.0.0:8080")?;
    let enrollment_token = env.secret("GATEWAY_ENROLLMENT_TOKEN")?;
    if let Some(token) = &enrollment_token {
        if token.expose().len() < 16 {
            return Err(ConfigError::new(
                "GATEWAY_ENROLLMENT_TOKEN",
                "must be at least 16 characters",
            ));
        }
    }
    let admin_key = env.secret("GATEWAY_ADMIN_KEY")?;
    if let Some(key) = &admin_key {
        if key.expose().len() < 16 {
            return Err(ConfigError::new(
                "GATEWAY_ADMIN_KEY",
                "must be at least 16 characters",
            ));
        }
    }
    let heartbeat_interval = env.duration(
        "HEARTBEAT_INTERVAL",
        Duration::from_secs(10),
        Duration::from_millis(100),
        Duration::from_secs(600),
    )?;
    let city = env.opt_string("GEOIP_CITY_DB").map(PathBuf::from);
    let asn = env.opt_string("GEOIP_ASN_DB").map(PathBuf::from);
    let geoip = crate::geoip::GeoIp::open(city.as_deref(), asn.as_deref())?.map(Arc::new);
    Ok(Config {
        service,
        enrollment_token,
        admin_key,
        heartbeat_interval,
        geoip,
    })
}
