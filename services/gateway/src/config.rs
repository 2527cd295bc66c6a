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
    /// `GATEWAY_ADMIN_KEY`: the bootstrap admin key (actor `key:bootstrap`).
    pub admin_key: Option<Secret>,
    /// `HEARTBEAT_INTERVAL`: how often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// `GEOIP_CITY_DB` / `GEOIP_ASN_DB`: MaxMind databases to locate agents by address.
    pub geoip: Option<Arc<crate::geoip::GeoIp>>,
    /// `LEASE_TTL`: how long a lease lasts without an extension.
    pub lease_ttl: Duration,
    /// `MAX_DELIVERIES`: deliveries of one task before it is dead-lettered.
    pub max_deliveries: u32,
    /// `CLAIM_BLOCK_MS`: the longest a claim may wait for work.
    pub claim_block: Duration,
    /// `GATEWAY_AUTH_CACHE_TTL`: how long a verified agent token is trusted without asking
    /// PostgreSQL again.
    pub auth_cache_ttl: Duration,
    /// `GATEWAY_ALLOW_PRIVATE_TARGETS`: accept targets in private and reserved ranges.
    pub allow_private_targets: bool,
    /// `DEFAULT_MAX_PARALLEL`: slots of one check that run at once when the check does not
    /// say; fixed into the check when it is made, so replicas never disagree.
    pub default_max_parallel: u32,
    /// `GATEWAY_LIVE_POLL`: how often a live stream looks for new results when no
    /// announcement came (announcements are lost while the subscription reconnects).
    pub live_poll: Duration,
    /// `GATEWAY_MAX_LIVE_STREAMS`: live streams open at once on this gateway; one more is 429.
    pub max_live_streams: usize,
    /// `GATEWAY_RATE_AUTH_FAILURES`: failed authentications per client address; past it, 429
    /// without asking PostgreSQL.
    pub auth_failures: checkplane_core::ratelimit::Rate,
    /// `GATEWAY_MAX_WAITS_PER_KEY`: live streams, waiting reads and waiting action lookups one
    /// API key holds at once.
    pub max_waits_per_key: usize,
    /// `GATEWAY_MAX_CLAIMS_PER_AGENT`: long-poll claims one agent holds at once; another is
    /// 429.
    pub max_claims_per_agent: usize,
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
    let lease_ttl = env.duration(
        "LEASE_TTL",
        Duration::from_secs(30),
        Duration::from_millis(100),
        Duration::from_secs(3600),
    )?;
    let max_deliveries = u32::try_from(env.u64_in("MAX_DELIVERIES", 5, 1, 100)?).unwrap_or(5);
    let claim_block = Duration::from_millis(env.u64_in("CLAIM_BLOCK_MS", 20_000, 0, 120_000)?);
    let auth_cache_ttl = env.duration(
        "GATEWAY_AUTH_CACHE_TTL",
        Duration::from_secs(5),
        Duration::ZERO,
        Duration::from_secs(300),
    )?;
    let allow_private_targets = env.bool("GATEWAY_ALLOW_PRIVATE_TARGETS", false)?;
    let default_max_parallel =
        u32::try_from(env.u64_in("DEFAULT_MAX_PARALLEL", 100, 1, 1000)?).unwrap_or(100);
    let live_poll = env.duration(
        "GATEWAY_LIVE_POLL",
        Duration::from_secs(1),
        Duration::from_millis(100),
        Duration::from_secs(60),
    )?;
    let max_live_streams =
        usize::try_from(env.u64_in("GATEWAY_MAX_LIVE_STREAMS", 1000, 1, 100_000)?).unwrap_or(1000);
    let max_waits_per_key =
        usize::try_from(env.u64_in("GATEWAY_MAX_WAITS_PER_KEY", 16, 1, 100_000)?).unwrap_or(16);
    let max_claims_per_agent =
        usize::try_from(env.u64_in("GATEWAY_MAX_CLAIMS_PER_AGENT", 4, 2, 100_000)?).unwrap_or(4);
    let auth_failures = checkplane_core::ratelimit::Rate::parse(
        &env.string("GATEWAY_RATE_AUTH_FAILURES", "30/1m:30"),
    )
    .map_err(|e| ConfigError::new("GATEWAY_RATE_AUTH_FAILURES", e.to_string()))?;
    Ok(Config {
        auth_failures,
        max_waits_per_key,
        max_claims_per_agent,
        live_poll,
        max_live_streams,
        default_max_parallel,
        allow_private_targets,
        auth_cache_ttl,
        service,
        enrollment_token,
        admin_key,
        heartbeat_interval,
        geoip,
        lease_ttl,
        max_deliveries,
        claim_block,
    })
}
