//! Settings every service shares, read from an [`Env`] in one place.

use std::net::SocketAddr;
use std::time::Duration;

#[cfg(feature = "stores")]
use redis::IntoConnectionInfo;

use crate::config::{ConfigError, Env, Secret};

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings of every binary: logging, listening, shutdown, probes, metrics access.
#[derive(Debug, Clone)]
pub struct BaseSettings {
    /// The binary's name, for logs and metrics.
    pub service: &'static str,
    /// Log format (`LOG_FORMAT`).
    pub log_format: LogFormat,
    /// Tracing filter directives (`LOG_LEVEL`).
    pub log_level: String,
    /// Log to this file instead of stderr (`LOG_FILE`), reopened on SIGHUP (logrotate).
    pub log_file: Option<std::path::PathBuf>,
    /// Where the HTTP server listens (`HTTP_ADDR`, the agent's `AGENT_HEALTH_ADDR`).
    pub listen: SocketAddr,
    /// Bound on shutdown after a signal (`SHUTDOWN_TIMEOUT`).
    pub shutdown_timeout: Duration,
    /// Per-dependency bound of `/readyz` (`READY_TIMEOUT`).
    pub ready_timeout: Duration,
    /// Who may read `/metrics`.
    pub metrics: MetricsAccess,
    /// What one HTTP client may hold of the listener.
    pub http: HttpLimits,
    /// TLS on the listener (the gateway's `GATEWAY_TLS_CERT_FILE` and `…_KEY_FILE`).
    pub tls: Option<crate::tls::TlsFiles>,
}

/// What one HTTP client may hold: connections, time, and the size of a request's head. Bodies
/// are limited per route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpLimits {
    /// From a request head's first byte to its end (`HTTP_HEADER_TIMEOUT`).
    pub header_timeout: Duration,
    /// From a request's head to its body's end (`HTTP_BODY_TIMEOUT`).
    pub body_timeout: Duration,
    /// A connection with no request in flight and none arriving (`HTTP_IDLE_TIMEOUT`).
    pub idle_timeout: Duration,
    /// Open connections (`HTTP_MAX_CONNECTIONS`); lowered to what `RLIMIT_NOFILE` allows.
    pub max_connections: usize,
    /// Open connections from one client address; 0 for none (`HTTP_MAX_CONNECTIONS_PER_ADDRESS`).
    pub max_connections_per_address: usize,
    /// Bytes of a request's path and query (`HTTP_MAX_URI_BYTES`).
    pub max_uri_bytes: usize,
    /// Header fields in a request (`HTTP_MAX_HEADERS`).
    pub max_headers: usize,
    /// Bytes of a request's header fields, names and values (`HTTP_MAX_HEADER_BYTES`).
    pub max_header_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_address: 256,
            max_uri_bytes: 8 * 1024,
            max_headers: 64,
            max_header_bytes: 16 * 1024,
        }
    }
}

impl HttpLimits {
    /// Read the limits, each within bounds that keep the service usable.
    pub fn from_env(env: &mut Env) -> Result<Self, ConfigError> {
        let d = Self::default();
        let secs = Duration::from_secs;
        let count = |env: &mut Env, name: &str, default: usize, min: u64, max: u64| {
            env.u64_in(name, default as u64, min, max)
                .map(|v| usize::try_from(v).unwrap_or(usize::MAX))
        };
        Ok(Self {
            header_timeout: env.duration(
                "HTTP_HEADER_TIMEOUT",
                d.header_timeout,
                Duration::from_millis(100),
                secs(300),
            )?,
            body_timeout: env.duration(
                "HTTP_BODY_TIMEOUT",
                d.body_timeout,
                Duration::from_millis(100),
                secs(600),
            )?,
            idle_timeout: env.duration(
                "HTTP_IDLE_TIMEOUT",
                d.idle_timeout,
                Duration::from_millis(100),
                secs(3600),
            )?,
            max_connections: count(
                env,
                "HTTP_MAX_CONNECTIONS",
                d.max_connections,
                16,
                1_000_000,
            )?,
            max_connections_per_address: count(
                env,
                "HTTP_MAX_CONNECTIONS_PER_ADDRESS",
                d.max_connections_per_address,
                0,
                1_000_000,
            )?,
            max_uri_bytes: count(env, "HTTP_MAX_URI_BYTES", d.max_uri_bytes, 256, 64 * 1024)?,
            max_headers: count(env, "HTTP_MAX_HEADERS", d.max_headers, 8, 256)?,
            max_header_bytes: count(
                env,
                "HTTP_MAX_HEADER_BYTES",
                d.max_header_bytes,
                1024,
                256 * 1024,
            )?,
        })
    }
}

/// Who may read `/metrics`: loopback always; others if public or with the key.
#[derive(Debug, Clone)]
pub struct MetricsAccess {
    /// `METRICS_ALLOW_PUBLIC`.
    pub allow_public: bool,
    /// `METRICS_API_KEY`.
    pub api_key: Option<Secret>,
}

impl BaseSettings {
    /// Read the shared settings; `listen_var` and `default_listen` name the listen address.
    pub fn from_env(
        env: &mut Env,
        service: &'static str,
        listen_var: &str,
        default_listen: &str,
    ) -> Result<Self, ConfigError> {
        let log_format = match env.string("LOG_FORMAT", "text").as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!("expected text or json, got {other:?}"),
                ))
            }
        };
        let log_level = env.string("LOG_LEVEL", "info");
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(ConfigError::new(
                "LOG_LEVEL",
                format!("not a valid filter: {log_level:?}"),
            ));
        }
        let log_file = match env.opt_string("LOG_FILE") {
            None => None,
            Some(path) => {
                let path = std::path::PathBuf::from(path);
                let dir_exists = path.parent().is_some_and(std::path::Path::is_dir);
                if !path.is_absolute() || !dir_exists || path.is_dir() {
                    return Err(ConfigError::new(
                        "LOG_FILE",
                        format!(
                            "expected an absolute path of a file in an existing directory, got {}",
                            path.display()
                        ),
                    ));
                }
                Some(path)
            }
        };
        Ok(Self {
            service,
            log_format,
            log_level,
            log_file,
            listen: env.socket_addr(listen_var, default_listen)?,
            shutdown_timeout: env.duration(
                "SHUTDOWN_TIMEOUT",
                Duration::from_secs(10),
                Duration::from_millis(100),
                Duration::from_secs(600),
            )?,
            ready_timeout: env.duration(
                "READY_TIMEOUT",
                Duration::from_secs(1),
                Duration::from_millis(50),
                Duration::from_secs(30),
            )?,
            metrics: MetricsAccess {
                allow_public: env.bool("METRICS_ALLOW_PUBLIC", false)?,
                api_key: env.secret("METRICS_API_KEY")?,
            },
            http: HttpLimits::from_env(env)?,
            tls: None,
        })
    }
}

#[cfg(feature = "stores")]
/// Settings of the services that keep their state in PostgreSQL and Redis.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// `DATABASE_URL`, parsed.
    pub database: tokio_postgres::Config,
    /// `DATABASE_POOL_SIZE`.
    pub database_pool_size: usize,
    /// `REDIS_URL`, or `REDIS_ADDR` + `REDIS_PASSWORD`.
    pub redis: RedisTarget,
    /// `REDIS_POOL_SIZE`.
    pub redis_pool_size: usize,
    /// `STREAM_PREFIX`.
    pub stream_prefix: String,
    /// `STREAM_SHARDS`.
    pub stream_shards: u32,
    /// `MIGRATE_ON_START`.
    pub migrate_on_start: bool,
}

#[cfg(feature = "stores")]
/// Where Redis is; `Debug` hides the password.
#[derive(Clone)]
pub struct RedisTarget(redis::ConnectionInfo);

#[cfg(feature = "stores")]
impl RedisTarget {
    /// The connection info to hand to the redis crate.
    pub fn connection_info(&self) -> redis::ConnectionInfo {
        self.0.clone()
    }
}

#[cfg(feature = "stores")]
impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisTarget({})", self.0.addr())
    }
}

#[cfg(feature = "stores")]
impl StoreSettings {
    /// Read the store settings.
    pub fn from_env(env: &mut Env) -> Result<Self, ConfigError> {
        let database_url = env
            .secret("DATABASE_URL")?
            .ok_or_else(|| ConfigError::new("DATABASE_URL", "is required but not set"))?;
        let mut database: tokio_postgres::Config = database_url.expose().parse().map_err(|_| {
            ConfigError::new(
                "DATABASE_URL",
                "not a valid PostgreSQL connection string (postgres://user:pass@host:port/db)",
            )
        })?;
        if database.get_connect_timeout().is_none() {
            database.connect_timeout(Duration::from_secs(5));
        }
        database.application_name("checkplane");

        let redis = match env.secret("REDIS_URL")? {
            Some(url) => {
                if env.opt_string("REDIS_ADDR").is_some() {
                    return Err(ConfigError::new(
                        "REDIS_ADDR",
                        "set either REDIS_URL or REDIS_ADDR, not both",
                    ));
                }
                let info = url.expose().into_connection_info().map_err(|_| {
                    ConfigError::new(
                        "REDIS_URL",
                        "not a valid Redis URL (redis://[:password@]host:port[/db])",
                    )
                })?;
                if env.secret("REDIS_PASSWORD")?.is_some() {
                    return Err(ConfigError::new(
                        "REDIS_PASSWORD",
                        "put the password in REDIS_URL, or use REDIS_ADDR",
                    ));
                }
                info
            }
            None => {
                let addr = env.string("REDIS_ADDR", "127.0.0.1:6379");
                let (host, port) = addr
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                    .filter(|(h, _)| !h.is_empty())
                    .ok_or_else(|| {
                        ConfigError::new("REDIS_ADDR", format!("expected host:port, got {addr:?}"))
                    })?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let mut info = (host.to_owned(), port)
                    .into_connection_info()
                    .map_err(|_| {
                        ConfigError::new("REDIS_ADDR", format!("expected host:port, got {addr:?}"))
                    })?;
                if let Some(password) = env.secret("REDIS_PASSWORD")? {
                    let settings = info
                        .redis_settings()
                        .clone()
                        .set_password(password.expose());
                    info = info.set_redis_settings(settings);
                }
                info
            }
        };

        let stream_prefix = env.string("STREAM_PREFIX", "cp");
        if stream_prefix.len() > 32
            || !stream_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::new(
                "STREAM_PREFIX",
                "use up to 32 letters, digits, '-' or '_'",
            ));
        }

        Ok(Self {
            database,
            database_pool_size: env.u64_in("DATABASE_POOL_SIZE", 16, 1, 512)? as usize,
            redis: RedisTarget(redis),
            redis_pool_size: env.u64_in("REDIS_POOL_SIZE", 16, 1, 512)? as usize,
            stream_prefix,
            stream_shards: env.u64_in("STREAM_SHARDS", 4, 1, 1024)? as u32,
            migrate_on_start: env.bool("MIGRATE_ON_START", true)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "stores")]
    fn store(pairs: &[(&str, &str)]) -> Result<StoreSettings, ConfigError> {
        StoreSettings::from_env(&mut Env::from_pairs(pairs.iter().copied()))
    }

    #[cfg(feature = "stores")]
    #[test]
    fn database_url_is_required() {
        assert_eq!(store(&[]).unwrap_err().var, "DATABASE_URL");
    }

    #[cfg(feature = "stores")]
    #[test]
    fn bad_database_url_is_named_without_its_value() {
        let err = store(&[("DATABASE_URL", "postgres://u:hunter2@h:notaport/db")]).unwrap_err();
        assert_eq!(err.var, "DATABASE_URL");
        assert!(!err.to_string().contains("hunter2"));
    }

    #[cfg(feature = "stores")]
    #[test]
    fn redis_addr_and_password() {
        let s = store(&[
            ("DATABASE_URL", "postgres://u@127.0.0.1:5/db"),
            ("REDIS_ADDR", "127.0.0.1:7000"),
            ("REDIS_PASSWORD", "pw"),
        ])
        .unwrap();
        let info = s.redis.connection_info();
        assert_eq!(info.redis_settings().password(), Some("pw"));
        assert!(!format!("{s:?}").contains("pw\""));
    }

    #[cfg(feature = "stores")]
    #[test]
    fn redis_url_and_addr_together_are_refused() {
        let err = store(&[
            ("DATABASE_URL", "postgres://u@127.0.0.1:5/db"),
            ("REDIS_URL", "redis://127.0.0.1:1/"),
            ("REDIS_ADDR", "127.0.0.1:7000"),
        ])
        .unwrap_err();
        assert_eq!(err.var, "REDIS_ADDR");
    }

    #[cfg(feature = "stores")]
    #[test]
    fn bad_redis_addr_and_prefix() {
        let base = ("DATABASE_URL", "postgres://u@127.0.0.1:5/db");
        assert_eq!(
            store(&[base, ("REDIS_ADDR", "nohost")]).unwrap_err().var,
            "REDIS_ADDR"
        );
        assert_eq!(
            store(&[base, ("STREAM_PREFIX", "a b")]).unwrap_err().var,
            "STREAM_PREFIX"
        );
    }

    #[test]
    fn bad_log_format_is_named() {
        let mut env = Env::from_pairs([("LOG_FORMAT", "xml")]);
        let err = BaseSettings::from_env(&mut env, "t", "HTTP_ADDR", "127.0.0.1:0").unwrap_err();
        assert_eq!(err.var, "LOG_FORMAT");
    }
}
