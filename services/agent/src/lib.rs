//! The checkplane agent: runs on each probe host, leases check work from the gateway and
//! reports results (see `worker`). It serves `/livez`, `/readyz` and `/metrics` on its own
//! small health port (`AGENT_HEALTH_ADDR`); `/readyz` asks whether the control plane answers.

pub mod check;
pub mod concurrency;
pub mod dns;
pub mod dns_proxy;
pub mod dns_wire;
pub mod http;
pub mod icmp;
pub mod identity;
pub mod ping;
pub mod relay;
pub mod tcp;
pub mod trace;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use checkplane_runtime::health::{Health, Probe, Unready};
use checkplane_runtime::{BaseSettings, ConfigError, Env, RunError};
use checkplane_wire::kinds::Kind;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The binary's name.
pub const NAME: &str = "agent";

/// Each check kind's pool size unless `AGENT_POOL_<KIND>_SIZE` says otherwise.
fn pool_default(kind: Kind) -> u64 {
    match kind {
        Kind::Dns => 32,
        Kind::Http | Kind::Tcp => 16,
        Kind::Ping => 8,
        Kind::Trace => 4,
        // Only with AGENT_HAPROXY_SOCKET.
        Kind::Haproxy => 2,
    }
}

/// The agent's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Logging, health port (`AGENT_HEALTH_ADDR`), shutdown, probes.
    pub base: BaseSettings,
    /// Base URL of the gateway (`AGENT_CONTROL_PLANE`).
    pub control_plane: reqwest::Url,
    /// `AGENT_CA_FILE`: the only roots the control plane's certificate is checked against
    /// (PEM); unset, the system's roots.
    pub control_plane_roots: Option<Vec<reqwest::Certificate>>,
    /// Where the identity comes from (`AGENT_ID` + `AGENT_AUTH_TOKEN`, or `AGENT_STATE_FILE`
    /// and `AGENT_ENROLLMENT_TOKEN`).
    pub identity: identity::Source,
    /// `AGENT_HOSTNAME`: the name it registers with (default: the host name).
    pub hostname: String,
    /// `AGENT_POOL_<KIND>_SIZE` and `AGENT_MAX_INFLIGHT`.
    pub pools: worker::Pools,
    /// `AGENT_ALLOW_PRIVATE_TARGETS`: check loopback and private addresses too.
    pub allow_private_targets: bool,
    /// `AGENT_TRACE_RUNTIME_WORKERS`: threads of the runtime trace checks run on.
    pub trace_workers: u32,
    /// The caching DNS proxy, when `AGENT_DNS_LISTEN` is set.
    pub dns_proxy: Option<dns_proxy::Settings>,
    /// `AGENT_METRICS_INTERVAL`: how often metrics and controller snapshots are sent.
    pub metrics_interval: Duration,
    /// `AGENT_HAPROXY_SOCKET`: this host's HAProxy Runtime API (a unix socket path or
    /// `host:port`), to which the agent relays commands (tasks of kind `haproxy`).
    pub haproxy_socket: Option<checkplane_haproxy::socket::Endpoint>,
}

fn dns_proxy_settings(env: &mut Env) -> Result<Option<dns_proxy::Settings>, ConfigError> {
    let Some(listen) = env.opt_string("AGENT_DNS_LISTEN") else {
        for name in [
            "AGENT_DNS_UPSTREAM",
            "AGENT_DNS_UPSTREAM_TIMEOUT_MS",
            "AGENT_DNS_CACHE_SIZE",
            "AGENT_DNS_MAX_INFLIGHT",
            "AGENT_DNS_STALE_SECS",
            "AGENT_DNS_ALLOW_FROM",
        ] {
            if env.opt_string(name).is_some() {
                return Err(ConfigError::new(
                    name,
                    "only with AGENT_DNS_LISTEN (the proxy is off)",
                ));
            }
        }
        return Ok(None);
    };
    let listen: std::net::SocketAddr = listen.parse().map_err(|_| {
        ConfigError::new(
            "AGENT_DNS_LISTEN",
            format!("expected an address like 127.0.0.1:5353, got {listen:?}"),
        )
    })?;
    let allow_from = match env.opt_string("AGENT_DNS_ALLOW_FROM") {
        Some(text) => dns_proxy::AllowFrom::parse(&text)
            .map_err(|why| ConfigError::new("AGENT_DNS_ALLOW_FROM", why.reason))?,
        // An open resolver on the network answers anyone (and amplifies for them).
        None if !listen.ip().is_loopback() => {
            return Err(ConfigError::new(
                "AGENT_DNS_ALLOW_FROM",
                format!(
                    "required when AGENT_DNS_LISTEN ({listen}) is not a loopback address: the \
                     networks (CIDRs) whose clients the proxy answers"
                ),
            ))
        }
        None => dns_proxy::AllowFrom::loopback(),
    };
    let upstream = env.required_string("AGENT_DNS_UPSTREAM")?;
    let upstream = upstream
        .parse::<std::net::SocketAddr>()
        .ok()
        .or_else(|| Some(std::net::SocketAddr::new(upstream.parse().ok()?, 53)))
        .ok_or_else(|| {
            ConfigError::new(
                "AGENT_DNS_UPSTREAM",
                format!("expected ip or ip:port, got {upstream:?}"),
            )
        })?;
    Ok(Some(dns_proxy::Settings {
        listen,
        allow_from,
        upstream,
        upstream_timeout: Duration::from_millis(env.u64_in(
            "AGENT_DNS_UPSTREAM_TIMEOUT_MS",
            2000,
            50,
            30_000,
        )?),
        cache_size: env.u64_in("AGENT_DNS_CACHE_SIZE", 10_000, 1, 1_000_000)?,
        max_inflight: usize::try_from(env.u64_in("AGENT_DNS_MAX_INFLIGHT", 1024, 1, 65_536)?)
            .unwrap_or(1024),
        stale: Duration::from_secs(env.u64_in("AGENT_DNS_STALE_SECS", 3600, 0, 604_800)?),
    }))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agent".to_owned())
}

/// Read the configuration from an environment snapshot.
pub fn load(env: &mut Env) -> Result<Config, ConfigError> {
    let base = {
        let (var, default) = <Service as checkplane_runtime::Service>::LISTEN;
        BaseSettings::from_env(env, NAME, var, default)
    }?;
    let raw = env.required_string("AGENT_CONTROL_PLANE")?;
    let control_plane = reqwest::Url::parse(&raw)
        .ok()
        .filter(|u| matches!(u.scheme(), "https" | "http") && u.host().is_some())
        .ok_or_else(|| {
            ConfigError::new(
                "AGENT_CONTROL_PLANE",
                format!("expected an https:// URL of the gateway, got {raw:?}"),
            )
        })?;
    let allow_plaintext = env.bool("AGENT_ALLOW_PLAINTEXT", false)?;
    if control_plane.scheme() == "http" && !allow_plaintext {
        return Err(ConfigError::new(
            "AGENT_CONTROL_PLANE",
            format!(
                "{raw:?} is plain http: the agent's token would cross the network in clear; \
                 use https://, or set AGENT_ALLOW_PLAINTEXT=true (a gateway on this host)"
            ),
        ));
    }
    let control_plane_roots = match env.opt_string("AGENT_CA_FILE") {
        None => None,
        Some(path) => {
            let pem = std::fs::read(&path)
                .map_err(|e| ConfigError::new("AGENT_CA_FILE", format!("{path}: {e}")))?;
            let roots = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|roots| !roots.is_empty())
                .ok_or_else(|| {
                    ConfigError::new("AGENT_CA_FILE", format!("{path}: no PEM certificate in it"))
                })?;
            Some(roots)
        }
    };
    let agent_id = env.opt_string("AGENT_ID");
    let token = env.secret("AGENT_AUTH_TOKEN")?;
    let enrollment = env.secret("AGENT_ENROLLMENT_TOKEN")?;
    let state_file = std::path::PathBuf::from(
        env.string("AGENT_STATE_FILE", "/var/lib/checkplane-agent/state.json"),
    );
    let identity = match (agent_id, token) {
        (Some(agent_id), Some(token)) => identity::Source::Given { agent_id, token },
        (Some(_), None) => {
            return Err(ConfigError::new(
                "AGENT_AUTH_TOKEN",
                "required with AGENT_ID",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "AGENT_ID",
                "required with AGENT_AUTH_TOKEN",
            ))
        }
        (None, None) => {
            if enrollment.is_none() && !state_file.exists() {
                return Err(ConfigError::new(
                    "AGENT_ENROLLMENT_TOKEN",
                    format!(
                        "required to register: there is no identity in {} and no AGENT_ID",
                        state_file.display()
                    ),
                ));
            }
            identity::Source::Enrolled {
                enrollment,
                state_file,
            }
        }
    };
    let hostname = env.string("AGENT_HOSTNAME", &host_name());
    if hostname.is_empty() || hostname.len() > 253 {
        return Err(ConfigError::new("AGENT_HOSTNAME", "1 to 253 characters"));
    }
    let mut sizes = std::collections::BTreeMap::new();
    for kind in Kind::CHECKS {
        let name = format!("AGENT_POOL_{}_SIZE", kind.as_str().to_ascii_uppercase());
        let size = env.u64_in(&name, pool_default(kind), 0, 1024)?;
        sizes.insert(kind.as_str(), u32::try_from(size).unwrap_or(0));
    }
    let haproxy_socket = env.opt_string("AGENT_HAPROXY_SOCKET");
    let haproxy_socket = match haproxy_socket {
        Some(address) => {
            let path_like = address.starts_with('/') && address.len() <= 100;
            let host_port = address
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !(path_like || host_port) {
                return Err(ConfigError::new(
                    "AGENT_HAPROXY_SOCKET",
                    "an absolute unix socket path or host:port",
                ));
            }
            let size = env.u64_in(
                "AGENT_POOL_HAPROXY_SIZE",
                pool_default(Kind::Haproxy),
                1,
                16,
            )?;
            sizes.insert(Kind::Haproxy.as_str(), u32::try_from(size).unwrap_or(2));
            Some(checkplane_haproxy::socket::Endpoint::parse(&address))
        }
        None => {
            if env.opt_string("AGENT_POOL_HAPROXY_SIZE").is_some() {
                return Err(ConfigError::new(
                    "AGENT_POOL_HAPROXY_SIZE",
                    "only with AGENT_HAPROXY_SOCKET (the relay is off)",
                ));
            }
            None
        }
    };
    let pools = worker::Pools {
        sizes,
        max_inflight: u32::try_from(env.u64_in("AGENT_MAX_INFLIGHT", 64, 1, 4096)?).unwrap_or(64),
    };
    if pools.declared().is_empty() {
        return Err(ConfigError::new(
            "AGENT_POOL_TCP_SIZE",
            "every AGENT_POOL_<KIND>_SIZE is 0: the agent would run nothing",
        ));
    }
    let allow_private_targets = env.bool("AGENT_ALLOW_PRIVATE_TARGETS", false)?;
    let trace_workers =
        u32::try_from(env.u64_in("AGENT_TRACE_RUNTIME_WORKERS", 1, 1, 64)?).unwrap_or(1);
    let dns_proxy = dns_proxy_settings(env)?;
    let metrics_interval = env.duration(
        "AGENT_METRICS_INTERVAL",
        Duration::from_secs(60),
        Duration::from_secs(1),
        Duration::from_secs(3600),
    )?;
    Ok(Config {
        base,
        control_plane,
        control_plane_roots,
        identity,
        hostname,
        pools,
        allow_private_targets,
        trace_workers,
        dns_proxy,
        metrics_interval,
        haproxy_socket,
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

    /// Checks in hand still run and their reports wait in the buffer: `/healthz` says
    /// `degraded` (`/readyz` still fails: no new work comes).
    fn degrades_only(&self) -> bool {
        true
    }

    fn check(&self, timeout: Duration) -> BoxFuture<'_, Result<(), Unready>> {
        Box::pin(async move {
            let response = self
                .client
                .get(self.livez.clone())
                .timeout(timeout)
                .send()
                .await
                .map_err(|e| {
                    Unready::from(if e.is_timeout() {
                        "timed out"
                    } else {
                        "unreachable"
                    })
                })?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(Unready(format!("answered {}", response.status().as_u16())))
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
    let mut client = reqwest::Client::builder();
    if let Some(roots) = &config.control_plane_roots {
        client = client.tls_certs_only(roots.iter().cloned());
    }
    let client = client
        // A redirect would carry the agent's token elsewhere (reqwest keeps custom headers,
        // also from https to http): the control plane never redirects.
        .redirect(reqwest::redirect::Policy::none())
        .https_only(config.control_plane.scheme() == "https")
        .connect_timeout(Duration::from_secs(5))
        // Below the gateway's HTTP_IDLE_TIMEOUT (60 s by default), so that a pooled connection
        // is not reused just as the gateway closes it.
        .pool_idle_timeout(Duration::from_secs(20))
        .user_agent(concat!("checkplane-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| RunError::Startup(format!("building the HTTP client: {e}")))?;
    let livez = config
        .control_plane
        .join("livez")
        .map_err(|e| RunError::Startup(format!("control plane URL: {e}")))?;
    let probe: Arc<dyn Probe> = Arc::new(ControlPlaneProbe {
        client: client.clone(),
        livez,
    });
    let settings = worker::Settings {
        control_plane: config.control_plane.clone(),
        source: config.identity.clone(),
        hostname: config.hostname.clone(),
        pools: config.pools.clone(),
        allow_private_targets: config.allow_private_targets,
        trace_workers: config.trace_workers,
        metrics_interval: config.metrics_interval,
        report_buffer: 10_000,
        haproxy_socket: config.haproxy_socket.clone(),
        // Time left after the drain to send the last reports.
        drain: config.base.shutdown_timeout.mul_f64(0.7),
    };
    let proxy = match config.dns_proxy.clone() {
        Some(proxy) => Some(
            dns_proxy::start(proxy.clone(), shutdown.clone())
                .await
                .map_err(|e| RunError::Startup(format!("DNS proxy on {}: {e}", proxy.listen)))?,
        ),
        None => None,
    };
    let work = tokio_util::task::TaskTracker::new();
    work.spawn(worker::run(client, settings, shutdown.clone()));
    work.close();
    let health = Arc::new(Health::new(
        NAME,
        vec![probe],
        config.base.ready_timeout,
        config.base.metrics.clone(),
    ));
    let app = checkplane_runtime::http::finish(health.router());
    let served =
        checkplane_runtime::listener::serve(listener, app, &config.base.http, None, shutdown)
            .await
            .map_err(RunError::Serve);
    // Running checks finish and their reports go out (the launcher bounds this with
    // SHUTDOWN_TIMEOUT).
    work.wait().await;
    if let Some(proxy) = proxy {
        proxy.wait().await;
    }
    served
}

/// The agent as a launchable [`checkplane_runtime::Service`].
pub struct Service;

impl checkplane_runtime::Service for Service {
    const NAME: &'static str = NAME;
    const LISTEN: (&'static str, &'static str) = ("AGENT_HEALTH_ADDR", "127.0.0.1:9100");
    const MIGRATES: bool = false;
    type Config = Config;

    fn load(env: &mut Env) -> Result<Config, ConfigError> {
        load(env)
    }

    fn base(config: &Config) -> &BaseSettings {
        &config.base
    }

    async fn run(
        config: Config,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), RunError> {
        run(config, listener, shutdown).await
    }
}
