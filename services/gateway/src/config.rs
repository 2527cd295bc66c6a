//! The gateway's configuration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use checkplane_core::ratelimit::Rate;
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
    /// `GATEWAY_RATE_<ENDPOINT>`: rate limits per endpoint and caller.
    pub rates: Rates,
    /// `GATEWAY_TRUSTED_PROXIES`: peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
    /// `HAPROXY_ALLOWED_ADDRESSES`: the direct HAProxy addresses operators may register.
    pub haproxy_allowed: checkplane_wire::haproxy::AllowedAddresses,
    /// `GATEWAY_MAX_WAITS_PER_KEY`: live streams, waiting reads and waiting action lookups one
    /// API key holds at once.
    pub max_waits_per_key: usize,
    /// `GATEWAY_MAX_CLAIMS_PER_AGENT`: long-poll claims one agent holds at once; another is
    /// 429.
    pub max_claims_per_agent: usize,
}

/// Read the gateway's configuration.
pub fn load(env: &mut Env) -> Result<Config, ConfigError> {
    let mut service = StoreServiceConfig::from_env(
        env,
        crate::NAME,
        <crate::Service as checkplane_runtime::Service>::LISTEN.1,
    )?;
    service.base.tls = tls_files(env)?;
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
    let rates = Rates::load(env, heartbeat_interval, lease_ttl)?;
    let trusted_proxies = TrustedProxies::load(env)?;
    let haproxy_allowed = env.haproxy_allowed_addresses()?;
    Ok(Config {
        rates,
        trusted_proxies,
        haproxy_allowed,
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

/// `GATEWAY_TLS_CERT_FILE` and `GATEWAY_TLS_KEY_FILE` (both or neither), read once here so
/// a bad pair stops the start naming the variable; `GATEWAY_TLS_RELOAD_INTERVAL`.
fn tls_files(env: &mut Env) -> Result<Option<checkplane_runtime::tls::TlsFiles>, ConfigError> {
    const CERT: &str = "GATEWAY_TLS_CERT_FILE";
    const KEY: &str = "GATEWAY_TLS_KEY_FILE";
    let reload_every = env.duration(
        "GATEWAY_TLS_RELOAD_INTERVAL",
        Duration::from_secs(10),
        Duration::from_millis(100),
        Duration::from_secs(3600),
    )?;
    let (cert, key) = match (env.opt_string(CERT), env.opt_string(KEY)) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(ConfigError::new(
                KEY,
                "is required with GATEWAY_TLS_CERT_FILE",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                CERT,
                "is required with GATEWAY_TLS_KEY_FILE",
            ))
        }
        (Some(cert), Some(key)) => (PathBuf::from(cert), PathBuf::from(key)),
    };
    let files = checkplane_runtime::tls::TlsFiles {
        cert,
        key,
        reload_every,
    };
    checkplane_runtime::tls::load(&files).map_err(|e| {
        let var = match &e {
            checkplane_runtime::tls::TlsError::File { path, .. }
                if *path == files.key && *path != files.cert =>
            {
                KEY
            }
            _ => CERT,
        };
        ConfigError::new(var, e.to_string())
    })?;
    Ok(Some(files))
}

/// The rate limits, each `None` when set to `off`. Each counts per caller: a hostname for
/// register, an agent for the agent calls, an API key for the operator API, a client address
/// for failed authentications.
#[derive(Debug, Clone)]
pub struct Rates {
    /// `GATEWAY_RATE_REGISTER`, per hostname (`1/10m:3`: an agent restarted with other kinds
    /// registers again at once).
    pub register: Option<Rate>,
    /// `GATEWAY_RATE_HEARTBEAT`, per agent: by default two per `HEARTBEAT_INTERVAL`, three at
    /// once (the agent beats every 0.8 interval; at the 10 s default this is the seed's 6/min
    /// with room for the agent's own schedule).
    pub heartbeat: Option<Rate>,
    /// `GATEWAY_RATE_CLAIM`, per agent (`3000/1m:60`; a long poll counts once).
    /// The agent paces itself to 20/s: slower would slow its work (see the agent's `Pace`).
    pub claim: Option<Rate>,
    /// `GATEWAY_RATE_EXTEND`, per agent: by default six per `LEASE_TTL` (the agent extends
    /// three times per term), at least `30/1m`, ten at once.
    pub extend: Option<Rate>,
    /// `GATEWAY_RATE_REPORT`, per agent (`3000/1m:60`), as the claims.
    pub report: Option<Rate>,
    /// `GATEWAY_RATE_METRICS`, per agent (`60/1m:10`).
    pub metrics: Option<Rate>,
    /// `GATEWAY_RATE_OPERATOR`, per API key (`600/1m:120`).
    pub operator: Option<Rate>,
    /// `GATEWAY_RATE_AUTH_FAILURES`, per client address (`30/1m:30`).
    pub auth_failures: Option<Rate>,
}

impl Rates {
    /// Read every `GATEWAY_RATE_<ENDPOINT>`; the heartbeat's and extension's defaults follow
    /// the intervals the gateway gives agents.
    pub fn load(
        env: &mut Env,
        heartbeat_interval: Duration,
        lease_ttl: Duration,
    ) -> Result<Self, ConfigError> {
        // `count` per `period` seconds, `burst` at once (every default is well over 1 ms).
        let fixed = |count: u32, period: u64, burst: u32| Rate {
            interval: Duration::from_secs(period) / count,
            burst,
        };
        let heartbeat = Rate::new(2, heartbeat_interval, 3).unwrap_or(fixed(6, 60, 3));
        let at_least = fixed(30, 60, 10);
        let extend = Rate::new(6, lease_ttl, 10)
            .filter(|r| r.interval < at_least.interval)
            .unwrap_or(at_least);
        Ok(Self {
            register: rate(env, "GATEWAY_RATE_REGISTER", fixed(1, 600, 3))?,
            heartbeat: rate(env, "GATEWAY_RATE_HEARTBEAT", heartbeat)?,
            claim: rate(env, "GATEWAY_RATE_CLAIM", fixed(3000, 60, 60))?,
            extend: rate(env, "GATEWAY_RATE_EXTEND", extend)?,
            report: rate(env, "GATEWAY_RATE_REPORT", fixed(3000, 60, 60))?,
            metrics: rate(env, "GATEWAY_RATE_METRICS", fixed(60, 60, 10))?,
            operator: rate(env, "GATEWAY_RATE_OPERATOR", fixed(600, 60, 120))?,
            auth_failures: rate(env, "GATEWAY_RATE_AUTH_FAILURES", fixed(30, 60, 30))?,
        })
    }
}

/// `name` as a rate: unset is `default`, `off` is no limit.
fn rate(env: &mut Env, name: &str, default: Rate) -> Result<Option<Rate>, ConfigError> {
    match env.opt_string(name) {
        None => Ok(Some(default)),
        Some(text) if text.trim().eq_ignore_ascii_case("off") => Ok(None),
        Some(text) => Rate::parse(&text)
            .map(Some)
            .map_err(|e| ConfigError::new(name, format!("{e}, or off"))),
    }
}

/// The proxies (`GATEWAY_TRUSTED_PROXIES`: addresses and CIDRs, comma-separated) whose
/// `X-Forwarded-For` is believed; from any other peer the socket's address is the client's.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    /// Most entries `GATEWAY_TRUSTED_PROXIES` may list.
    const MAX: usize = 256;

    pub fn load(env: &mut Env) -> Result<Self, ConfigError> {
        const NAME: &str = "GATEWAY_TRUSTED_PROXIES";
        let Some(text) = env.opt_string(NAME) else {
            return Ok(Self::default());
        };
        let nets = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|entry| {
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        ConfigError::new(
                            NAME,
                            format!(
                                "{entry:?} is neither an address nor a CIDR such as 10.0.0.0/8"
                            ),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if nets.len() > Self::MAX {
            return Err(ConfigError::new(
                NAME,
                format!("at most {} entries", Self::MAX),
            ));
        }
        Ok(Self(nets))
    }

    /// Whether `address` is one of the trusted proxies.
    pub fn contains(&self, address: std::net::IpAddr) -> bool {
        let address = address.to_canonical();
        self.0.iter().any(|net| net.contains(&address))
    }
}
