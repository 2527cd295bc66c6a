//! `/livez`, `/readyz`, `/healthz` and `/metrics`, the same on every service.
//!
//! `/healthz` (and the `healthcheck` command that asks it) says `ok`, `degraded` or `down`:
//! down when a probe that the service cannot serve without fails (as `/readyz` says), degraded
//! when it serves but needs attention (a probe it can do without, such as the agent's control
//! plane, or one of the service's [`Concerns`]).
//!
//! `/readyz` runs every [`Probe`] concurrently, each bounded by `READY_TIMEOUT`, so a hung
//! dependency makes the answer a 503 naming it instead of hanging the probe. The PostgreSQL and
//! Redis probes use a dedicated connection each, never one from the work pool: a saturated pool
//! must not look like a dead database, and a dead database must not be hidden by a pooled
//! connection that happens to be idle.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use checkplane_wire::health::{CheckOutcome, HealthReport, Readiness};
use checkplane_wire::ErrorCode;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::PrometheusHandle;
use subtle::ConstantTimeEq;

use crate::http::ApiError;
use crate::settings::MetricsAccess;

/// Why a dependency is not ready: what `/readyz` says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unready(pub String);

impl std::fmt::Display for Unready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unready {}

impl From<String> for Unready {
    fn from(reason: String) -> Self {
        Self(reason)
    }
}

impl From<&str> for Unready {
    fn from(reason: &str) -> Self {
        Self(reason.to_owned())
    }
}

/// A dependency that `/readyz` asks.
pub trait Probe: Send + Sync + 'static {
    /// The name `/readyz` reports (`postgres`, `redis`, `migrations`, `control_plane`).
    fn name(&self) -> &'static str;
    /// Answer `Ok` if the dependency works, within `timeout`.
    fn check(&self, timeout: Duration) -> BoxFuture<'_, Result<(), Unready>>;
    /// Whether the service goes on serving without it: its failure makes `/healthz` say
    /// `degraded`, not `down` (`/readyz` still fails).
    fn degrades_only(&self) -> bool {
        false
    }
}

/// One thing a serving service may need attention for: `Some(reason)` when it does. Asked on
/// every `/healthz`, each bounded by `READY_TIMEOUT` (one that does not answer in time says
/// nothing).
pub type Concern = Arc<dyn Fn() -> BoxFuture<'static, Option<String>> + Send + Sync>;

/// The service's [`Concern`]s, added to while it starts.
#[derive(Clone, Default)]
pub struct Concerns(Arc<std::sync::Mutex<Vec<Concern>>>);

impl Concerns {
    /// Ask `concern` on every `/healthz` from now on.
    pub fn add<F, Fut>(&self, concern: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Option<String>> + Send + 'static,
    {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::new(move || Box::pin(concern())));
    }

    /// What needs attention now, each concern bounded by `timeout`.
    pub async fn reasons(&self, timeout: Duration) -> Vec<String> {
        let concerns = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        futures::future::join_all(
            concerns
                .iter()
                .map(|concern| tokio::time::timeout(timeout, concern())),
        )
        .await
        .into_iter()
        .filter_map(|answer| answer.ok().flatten())
        .collect()
    }
}

impl std::fmt::Debug for Concerns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Concerns")
    }
}

#[cfg(feature = "stores")]
/// Probes PostgreSQL with `SELECT 1` on its own connection, reconnecting after any failure.
pub struct PostgresProbe {
    config: tokio_postgres::Config,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

#[cfg(feature = "stores")]
impl PostgresProbe {
    pub fn new(config: tokio_postgres::Config) -> Self {
        Self {
            config,
            client: tokio::sync::Mutex::new(None),
        }
    }
}

#[cfg(feature = "stores")]
impl Probe for PostgresProbe {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn check(&self, timeout: Duration) -> BoxFuture<'_, Result<(), Unready>> {
        Box::pin(async move {
            let mut slot = self.client.lock().await;
            let attempt = tokio::time::timeout(timeout, async {
                if slot.as_ref().is_none_or(|c| c.is_closed()) {
                    *slot = Some(
                        crate::db::connect(&self.config)
                            .await
                            .map_err(|e| Unready(describe(&e)))?,
                    );
                }
                match slot.as_ref() {
                    Some(client) => client
                        .simple_query("SELECT 1")
                        .await
                        .map(drop)
                        .map_err(|e| Unready(describe(&e))),
                    None => Err("not connected".into()),
                }
            })
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            if attempt.is_err() {
                *slot = None;
            }
            attempt
        })
    }
}

#[cfg(feature = "stores")]
/// Probes Redis with `PING` on its own connection, reconnecting after any failure.
pub struct RedisProbe {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

#[cfg(feature = "stores")]
impl RedisProbe {
    pub fn new(target: &crate::settings::RedisTarget) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(target.connection_info())?,
            connection: tokio::sync::Mutex::new(None),
        })
    }
}

#[cfg(feature = "stores")]
impl Probe for RedisProbe {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn check(&self, timeout: Duration) -> BoxFuture<'_, Result<(), Unready>> {
        Box::pin(async move {
            let mut slot = self.connection.lock().await;
            let attempt = tokio::time::timeout(timeout, async {
                if slot.is_none() {
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout));
                    let connection = self
                        .client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map_err(|e| Unready(describe_redis(&e)))?;
                    *slot = Some(connection);
                }
                match slot.as_mut() {
                    Some(connection) => redis::cmd("PING")
                        .query_async::<String>(connection)
                        .await
                        .map(drop)
                        .map_err(|e| Unready(describe_redis(&e))),
                    None => Err("not connected".into()),
                }
            })
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
            if attempt.is_err() {
                *slot = None;
            }
            attempt
        })
    }
}

#[cfg(feature = "stores")]
fn describe_redis(error: &redis::RedisError) -> String {
    if error.is_timeout() {
        "timed out".to_owned()
    } else {
        describe(error)
    }
}

/// A readiness condition set by the service itself (for example, migrations applied).
pub struct Gate {
    name: &'static str,
    state: RwLock<Result<(), Unready>>,
}

impl Gate {
    /// A gate that starts closed, with `reason` as its message.
    pub fn closed(name: &'static str, reason: &str) -> Arc<Self> {
        Arc::new(Self {
            name,
            state: RwLock::new(Err(reason.into())),
        })
    }

    /// Open the gate.
    pub fn open(&self) {
        if let Ok(mut state) = self.state.write() {
            *state = Ok(());
        }
    }

    /// Close the gate with a reason.
    pub fn close(&self, reason: impl Into<String>) {
        if let Ok(mut state) = self.state.write() {
            *state = Err(Unready(reason.into()));
        }
    }
}

impl Probe for Gate {
    fn name(&self) -> &'static str {
        self.name
    }

    fn check(&self, _timeout: Duration) -> BoxFuture<'_, Result<(), Unready>> {
        let state = self
            .state
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|_| Err("gate poisoned".into()));
        Box::pin(async move { state })
    }
}

#[cfg(feature = "stores")]
/// An error's chain in one line, cut short: probes report a cause, never a connection string.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    crate::error_chain(error).chars().take(200).collect()
}

/// What the health routes need.
pub struct Health {
    service: &'static str,
    probes: Vec<Arc<dyn Probe>>,
    /// The last round of probes and when it started. One round runs at a time; a request
    /// that waited for a round started after it arrived takes that round's answer (a flood
    /// of `/readyz` or `/healthz` queues here, not on the probes' connections, and is
    /// answered by a few rounds; no answer is older than its request).
    last: tokio::sync::Mutex<Option<(Instant, Readiness)>>,
    concerns: Concerns,
    timeout: Duration,
    metrics: MetricsAccess,
    prometheus: PrometheusHandle,
}

impl Health {
    pub fn new(
        service: &'static str,
        probes: Vec<Arc<dyn Probe>>,
        timeout: Duration,
        metrics: MetricsAccess,
    ) -> Self {
        Self {
            service,
            probes,
            last: tokio::sync::Mutex::new(None),
            concerns: Concerns::default(),
            timeout,
            metrics,
            prometheus: crate::telemetry::prometheus(),
        }
    }

    /// The same, asking `concerns` too.
    pub fn with_concerns(mut self, concerns: Concerns) -> Self {
        self.concerns = concerns;
        self
    }

    /// `ok`, `degraded` or `down`, with the reasons (probes first, then concerns).
    pub async fn report(&self) -> HealthReport {
        let (readiness, concerns) =
            tokio::join!(self.readiness(), self.concerns.reasons(self.timeout));
        let degrading: Vec<&'static str> = self
            .probes
            .iter()
            .filter(|p| p.degrades_only())
            .map(|p| p.name())
            .collect();
        let mut down = Vec::new();
        let mut degraded = Vec::new();
        for name in &readiness.failed {
            let error = readiness
                .checks
                .get(name)
                .and_then(|o| o.error.clone())
                .unwrap_or_default();
            let reason = format!("{name}: {error}");
            if degrading.contains(&name.as_str()) {
                degraded.push(reason);
            } else {
                down.push(reason);
            }
        }
        degraded.extend(concerns);
        let (status, reasons) = if !down.is_empty() {
            ("down", down.into_iter().chain(degraded).collect())
        } else if !degraded.is_empty() {
            ("degraded", degraded)
        } else {
            ("ok", Vec::new())
        };
        HealthReport {
            status: status.to_owned(),
            service: self.service.to_owned(),
            reasons,
        }
    }

    /// Every probe's answer: a round started after this call, its own or one it waited for.
    pub async fn readiness(&self) -> Readiness {
        let arrived = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, readiness)) = last.as_ref() {
            if *started >= arrived {
                return readiness.clone();
            }
        }
        let started = Instant::now();
        let readiness = self.probe_round().await;
        *last = Some((started, readiness.clone()));
        readiness
    }

    /// Run every probe concurrently.
    async fn probe_round(&self) -> Readiness {
        let outcomes = futures::future::join_all(self.probes.iter().map(|probe| async move {
            let started = Instant::now();
            // The probe bounds itself; this outer bound also covers waiting for its lock.
            let result = tokio::time::timeout(self.timeout * 2, probe.check(self.timeout))
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
            let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            metrics::gauge!("checkplane_dependency_up", "dependency" => probe.name())
                .set(if result.is_ok() { 1.0 } else { 0.0 });
            (
                probe.name().to_owned(),
                CheckOutcome {
                    ok: result.is_ok(),
                    elapsed_ms,
                    error: result.err().map(|unready| unready.0),
                },
            )
        }))
        .await;
        let checks: BTreeMap<_, _> = outcomes.into_iter().collect();
        let failed: Vec<String> = checks
            .iter()
            .filter(|(_, o)| !o.ok)
            .map(|(n, _)| n.clone())
            .collect();
        Readiness {
            status: if failed.is_empty() {
                "ready"
            } else {
                "not_ready"
            }
            .to_owned(),
            service: self.service.to_owned(),
            failed,
            checks,
        }
    }

    /// `/livez`, `/readyz`, `/metrics`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/livez", get(livez))
            .route("/readyz", get(readyz))
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics_text))
            .with_state(self)
    }
}

async fn livez(State(health): State<Arc<Health>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "alive", "service": health.service}))
}

async fn readyz(State(health): State<Arc<Health>>) -> Response {
    let readiness = health.readiness().await;
    let status = if readiness.failed.is_empty() {
        StatusCode::OK
    } else {
        tracing::warn!(failed = ?readiness.failed, "not ready");
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

/// 200 for `ok` and `degraded` (serving), 503 for `down`.
async fn healthz(State(health): State<Arc<Health>>) -> Response {
    let report = health.report().await;
    let status = if report.status == "down" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(report)).into_response()
}

/// Loopback clients always; others when public, or with the right key (compared in constant
/// time).
fn metrics_allowed(access: &MetricsAccess, peer: IpAddr, key: Option<&[u8]>) -> bool {
    let key_ok = match (&access.api_key, key) {
        (Some(expected), Some(given)) => bool::from(expected.expose().as_bytes().ct_eq(given)),
        _ => false,
    };
    peer.is_loopback() || access.allow_public || key_ok
}

async fn metrics_text(
    State(health): State<Arc<Health>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let key = headers.get("x-api-key").map(|v| v.as_bytes());
    if !metrics_allowed(&health.metrics, peer.ip(), key) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "metrics are served to loopback clients, or with the metrics key",
        )
        .into_response();
    }
    // This host's clock at the scrape: Prometheus compares it with its own (events' versions
    // come from the gateways' clocks; the rules alert on skew).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!("checkplane_clock_seconds").set(now);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        health.prometheus.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn metrics_access() {
        let remote: IpAddr = "192.0.2.7".parse().unwrap();
        let closed = MetricsAccess {
            allow_public: false,
            api_key: Some(Secret::new("k3y")),
        };
        assert!(metrics_allowed(&closed, "127.0.0.1".parse().unwrap(), None));
        assert!(metrics_allowed(&closed, "::1".parse().unwrap(), None));
        assert!(!metrics_allowed(&closed, remote, None));
        assert!(!metrics_allowed(&closed, remote, Some(b"wrong")));
        assert!(!metrics_allowed(&closed, remote, Some(b"k3")));
        assert!(metrics_allowed(&closed, remote, Some(b"k3y")));
        let public = MetricsAccess {
            allow_public: true,
            api_key: None,
        };
        assert!(metrics_allowed(&public, remote, None));
        let keyless = MetricsAccess {
            allow_public: false,
            api_key: None,
        };
        assert!(!metrics_allowed(&keyless, remote, Some(b"")));
    }

    #[tokio::test]
    async fn gate_reports_its_reason() {
        let gate = Gate::closed("migrations", "pending");
        assert_eq!(
            gate.check(Duration::from_secs(1)).await,
            Err("pending".into())
        );
        gate.open();
        assert_eq!(gate.check(Duration::from_secs(1)).await, Ok(()));
    }
}
