//! The agent's work with the control plane:
//!
//! - **identity** first (see `identity`): given, restored from the state file, or registered;
//! - **heartbeat** ticker, at the interval the gateway asked for;
//! - **claim** loop: asks, per kind, for as many tasks as its pool has free slots, long-polling;
//!   a task id already running is never started twice (a redelivery after a lost answer only
//!   moves the running task to its newer lease token);
//! - **extend** ticker: every lease in flight is extended a third of the way into its term;
//! - **reports**: finished tasks go to a bounded buffer, sent in batches and kept until the
//!   gateway acknowledged them (a full buffer drops the oldest and says how many);
//! - failures of the control plane back off with jitter, from 500 ms up to 30 s.
//!
//! On shutdown it stops claiming, lets running checks finish for up to `drain` (most of
//! `SHUTDOWN_TIMEOUT`), reports the ones still running then as `cancelled` (reason
//! `shutdown`), and sends what it has.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use checkplane_wire::checks::{task_id, TaskSpec};
use checkplane_wire::kinds::Kind;
use checkplane_wire::leases::api::{
    Cancelled, ClaimResponse, Completed, Lease, ReportRequest, TokenOutcomes,
};
use serde_json::{json, Value};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::identity::{self, Identity, Source};
use crate::{check, dns, http, icmp, ping, relay, tcp, trace};

/// What the agent runs: each kind's pool size (a kind of size 0 is not declared) and the
/// most checks in flight across kinds.
#[derive(Debug, Clone)]
pub struct Pools {
    pub sizes: BTreeMap<&'static str, u32>,
    pub max_inflight: u32,
}

/// Relayed Runtime API commands (see [`relay`]).
const RELAY_KIND: &str = checkplane_haproxy::relay::RELAY_KIND;

impl Pools {
    /// The kinds declared (run by this build and of a size above 0), with their sizes.
    pub fn declared(&self) -> BTreeMap<&'static str, u32> {
        self.sizes
            .iter()
            // This build runs every kind there is.
            .filter(|(kind, size)| **size > 0 && kind.parse::<Kind>().is_ok())
            .map(|(kind, size)| (*kind, *size))
            .collect()
    }
}

/// The worker's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub control_plane: reqwest::Url,
    pub source: Source,
    pub hostname: String,
    pub pools: Pools,
    pub allow_private_targets: bool,
    /// Threads of the runtime trace checks run on.
    pub trace_workers: u32,
    /// How often the agent's metrics and controller snapshots are sent.
    pub metrics_interval: Duration,
    /// Most finished results kept while the control plane does not take them.
    pub report_buffer: usize,
    /// How long running checks may go on after shutdown begins.
    pub drain: Duration,
    /// This host's HAProxy Runtime API, when the agent relays commands to it.
    pub haproxy_socket: Option<checkplane_haproxy::socket::Endpoint>,
}

/// A call to the control plane that did not work.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("unreachable: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("answered {status}: {body}")]
    Refused { status: u16, body: String },
}

struct Control {
    http: reqwest::Client,
    base: reqwest::Url,
    /// Replaced when the agent registers again (its token was refused).
    identity: std::sync::RwLock<Identity>,
}

impl Control {
    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
        timeout: Duration,
    ) -> Result<T, CallError> {
        let url = self.base.join(path).map_err(|e| CallError::Refused {
            status: 0,
            body: e.to_string(),
        })?;
        let (id, token) = {
            let identity = self.identity.read().unwrap_or_else(|p| p.into_inner());
            (identity.agent_id.clone(), identity.token.clone())
        };
        let response = self
            .http
            .post(url)
            .header("x-agent-id", id)
            .header("x-agent-token", token)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .inspect_err(|_| {
                metrics::counter!("checkplane_agent_control_plane_errors_total", "call" => path.to_owned())
                    .increment(1);
            })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            metrics::counter!("checkplane_agent_control_plane_errors_total", "call" => path.to_owned())
                .increment(1);
            let body = response.text().await.unwrap_or_default();
            return Err(CallError::Refused {
                status,
                body: body.chars().take(300).collect(),
            });
        }
        Ok(response.json().await?)
    }
}

/// Exponential backoff with jitter: 500 ms doubling to 30 s, ±25 %.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(500))
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(500);
    }
    fn next(&mut self) -> Duration {
        let base = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(30));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let spread = (nanos % 500) as f64 / 1000.0 + 0.75; // 0.75 ..= 1.25
        base.mul_f64(spread)
    }
}

async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Find or make the identity; retried with backoff until it works or `stop`.
async fn identity(
    http: &reqwest::Client,
    settings: &Settings,
    stop: &CancellationToken,
) -> Option<Identity> {
    let (enrollment, state_file) = match &settings.source {
        Source::Given { agent_id, token } => {
            return Some(Identity {
                agent_id: agent_id.clone(),
                token: token.expose().to_owned(),
                heartbeat_interval_ms: 10_000,
                declared: None,
            })
        }
        Source::Enrolled {
            enrollment,
            state_file,
        } => (enrollment, state_file),
    };
    let mut backoff = Backoff::new();
    loop {
        match identity::load(state_file) {
            Ok(Some(identity))
                if enrollment.is_some() && identity.declared != Some(declared(settings)) =>
            {
                // Registered with other kinds or pool sizes (an upgrade, a changed
                // configuration): register again, so the control plane knows what it runs.
                tracing::info!(agent_id = %identity.agent_id, "declared kinds changed since registration; registering again");
            }
            Ok(Some(identity)) => {
                if identity
                    .declared
                    .as_ref()
                    .is_some_and(|d| *d != declared(settings))
                {
                    tracing::warn!(agent_id = %identity.agent_id, "declared kinds changed since registration, and there is no AGENT_ENROLLMENT_TOKEN to register again with");
                }
                tracing::info!(agent_id = %identity.agent_id, state_file = %state_file.display(), "restored control plane session");
                return Some(identity);
            }
            Ok(None) => {}
            Err(error) => {
                // Never overwrite a file we cannot read: an operator should look at it.
                tracing::error!(error = %checkplane_runtime::error_chain(&error), "agent state file unusable");
                if !sleep_or_stop(backoff.next(), stop).await {
                    return None;
                }
                continue;
            }
        }
        let Some(enrollment) = enrollment else {
            tracing::error!(state_file = %state_file.display(), "no identity: the state file is gone and no AGENT_ENROLLMENT_TOKEN is set");
            if !sleep_or_stop(backoff.next(), stop).await {
                return None;
            }
            continue;
        };
        match register(http, settings, enrollment, state_file).await {
            Ok(identity) => {
                tracing::info!(agent_id = %identity.agent_id, "registered with the control plane");
                return Some(identity);
            }
            Err(error) => tracing::warn!(%error, "registration failed"),
        }
        if !sleep_or_stop(backoff.next(), stop).await {
            return None;
        }
    }
}

/// The kinds and pool sizes this agent declares.
fn declared(settings: &Settings) -> BTreeMap<String, u32> {
    settings
        .pools
        .declared()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// Register with the enrollment token and keep the answer in the state file (before it is
/// used: without the file a restart would register anew).
async fn register(
    http: &reqwest::Client,
    settings: &Settings,
    enrollment: &checkplane_runtime::Secret,
    state_file: &std::path::Path,
) -> Result<Identity, String> {
    let body = json!({"hostname": settings.hostname,
                      "capabilities": settings.pools.declared(),
                      "agent_version": env!("CARGO_PKG_VERSION")});
    let url = settings
        .control_plane
        .join("v1/agents/register")
        .map_err(|e| e.to_string())?;
    let response = http
        .post(url)
        .header("x-enrollment-token", enrollment.expose())
        .timeout(Duration::from_secs(10))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("unreachable: {e}"))?;
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(format!("answered {status}"));
    }
    let r = response
        .json::<checkplane_wire::agents::RegisterResponse>()
        .await
        .map_err(|e| e.to_string())?;
    let identity = Identity {
        agent_id: r.agent_id,
        token: r.token,
        heartbeat_interval_ms: r.heartbeat_interval_ms,
        declared: Some(declared(settings)),
    };
    identity::store(state_file, &identity).map_err(|e| {
        format!(
            "cannot keep the identity: {}",
            checkplane_runtime::error_chain(&e)
        )
    })?;
    Ok(identity)
}

/// A task in flight: its current lease token and its term.
struct Running {
    token: String,
    lease_ms: u64,
}

/// One report waiting to be sent.
#[derive(Clone)]
enum Report {
    Completed(Completed),
    Cancelled(Cancelled),
}

impl Report {
    fn token(&self) -> &str {
        match self {
            Self::Completed(c) => &c.token,
            Self::Cancelled(c) => &c.token,
        }
    }
}

#[derive(Default)]
struct Reports {
    queue: VecDeque<Report>,
    dropped: u64,
}

struct Shared {
    control: Control,
    settings: Settings,
    /// By task id (or token, for a task without an id).
    running: Mutex<HashMap<String, Running>>,
    reports: Mutex<Reports>,
    report_ready: Notify,
    /// One pool per declared kind.
    pools: BTreeMap<&'static str, Arc<Semaphore>>,
    /// Checks in flight across kinds, under the concurrency controller's window.
    gate: crate::concurrency::Gate,
    /// Trusted roots of https checks.
    roots: Arc<rustls::RootCertStore>,
    /// The runtime of trace checks (long, mostly waiting: kept off the other checks').
    traces: tokio::runtime::Handle,
    freed: Notify,
    /// Stops the checks still running when the drain is over.
    abort: CancellationToken,
    /// The relay to this host's HAProxy, when configured.
    relay: Option<RelayLane>,
}

/// The relayed commands' own workers and wake-up.
struct RelayLane {
    endpoint: checkplane_haproxy::socket::Endpoint,
    pool: Arc<Semaphore>,
    freed: Notify,
}

impl Shared {
    fn push_report(&self, done: Report) {
        let mut reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        if reports.queue.len() >= self.settings.report_buffer {
            reports.queue.pop_front();
            reports.dropped += 1;
            metrics::counter!("checkplane_agent_reports_dropped_total").increment(1);
            tracing::warn!(
                dropped = reports.dropped,
                "report buffer full: dropped the oldest result"
            );
        }
        reports.queue.push_back(done);
        metrics::gauge!("checkplane_agent_reports_pending").set(reports.queue.len() as f64);
        drop(reports);
        self.report_ready.notify_one();
    }
}

/// The trace checks' runtime, shut down without waiting when dropped (also when the worker
/// itself is dropped mid-await: a runtime may not be dropped in async code otherwise).
struct TraceRuntime(Option<tokio::runtime::Runtime>);

impl TraceRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(runtime) => runtime.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for TraceRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Run until `stop`, then finish what runs and send the reports. `done` is cancelled when
/// everything is sent or given up.
pub async fn run(http: reqwest::Client, settings: Settings, stop: CancellationToken) {
    let Some(identity) = identity(&http, &settings, &stop).await else {
        return;
    };
    let traces = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.trace_workers as usize)
        .thread_name("trace")
        .enable_all()
        .build()
    {
        Ok(runtime) => TraceRuntime(Some(runtime)),
        Err(error) => {
            tracing::error!(%error, "cannot start the trace runtime");
            return;
        }
    };
    // Checks share the pools and the concurrency window; relayed commands have their own.
    let checks: BTreeMap<&'static str, u32> = settings
        .pools
        .declared()
        .into_iter()
        .filter(|(kind, _)| *kind != RELAY_KIND)
        .collect();
    let relay = settings.haproxy_socket.clone().map(|endpoint| RelayLane {
        endpoint,
        pool: Arc::new(Semaphore::new(
            settings
                .pools
                .declared()
                .get(RELAY_KIND)
                .copied()
                .unwrap_or(1) as usize,
        )),
        freed: Notify::new(),
    });
    let shared = Arc::new(Shared {
        pools: checks
            .iter()
            .map(|(kind, size)| (*kind, Arc::new(Semaphore::new(*size as usize))))
            .collect(),
        gate: crate::concurrency::Gate::new(settings.pools.max_inflight, checks.values().sum()),
        relay,
        roots: http::roots(),
        traces: traces.handle(),
        control: Control {
            http,
            base: settings.control_plane.clone(),
            identity: std::sync::RwLock::new(identity),
        },
        settings,
        running: Mutex::default(),
        reports: Mutex::default(),
        report_ready: Notify::new(),
        freed: Notify::new(),
        abort: CancellationToken::new(),
    });
    let tasks = TaskTracker::new();
    let reporter_stop = CancellationToken::new();
    let reporter = tokio::spawn(report_loop(shared.clone(), reporter_stop.clone()));
    let beats = tokio::spawn(heartbeat_loop(shared.clone(), stop.clone()));
    let extends = tokio::spawn(extend_loop(shared.clone(), stop.clone()));
    let ticks = {
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move { crate::concurrency::run(&shared.gate, &stop).await })
    };
    let reports = tokio::spawn(metrics_loop(shared.clone(), stop.clone()));
    let relays = {
        let (shared, tasks, stop) = (shared.clone(), tasks.clone(), stop.clone());
        tokio::spawn(async move { relay_loop(&shared, &tasks, &stop).await })
    };
    if shared.pools.is_empty() {
        // A relay and nothing else.
        stop.cancelled().await;
    } else {
        claim_loop(&shared, &tasks, &stop).await;
    }
    let _ = relays.await;
    // Stop claiming; let the running checks finish for a while, cancel the rest, send.
    tasks.close();
    if tokio::time::timeout(shared.settings.drain, tasks.wait())
        .await
        .is_err()
    {
        let left: Vec<(String, Running)> = shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        tracing::warn!(
            running = left.len(),
            "shutting down: checks still running are reported cancelled"
        );
        for (_, task) in left {
            shared.push_report(Report::Cancelled(Cancelled {
                token: task.token,
                reason: Some("shutdown".to_owned()),
            }));
        }
        shared.abort.cancel();
        tasks.wait().await;
    }
    reporter_stop.cancel();
    let _ = reporter.await;
    let _ = beats.await;
    let _ = extends.await;
    let _ = ticks.await;
    let _ = reports.await;
    drop(traces);
}

async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = shared
        .control
        .identity
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .heartbeat_interval_ms;
    let mut every = Duration::from_millis(interval.max(100));
    let mut backoff = Backoff::new();
    loop {
        let beat: Result<checkplane_wire::agents::HeartbeatResponse, _> = shared
            .control
            .post("v1/agents/heartbeat", &json!({}), Duration::from_secs(5))
            .await;
        let wait = match beat {
            Ok(answer) => {
                backoff.reset();
                every = Duration::from_millis(answer.next_deadline_ms.max(100));
                // Well inside the deadline.
                every.mul_f64(0.8)
            }
            Err(CallError::Refused { status: 401, .. }) => {
                reregister(&shared).await;
                backoff.next().min(every)
            }
            Err(error) => {
                tracing::warn!(%error, "heartbeat failed");
                backoff.next().min(every)
            }
        };
        if !sleep_or_stop(wait, &stop).await {
            return;
        }
    }
}

/// The control plane no longer takes this agent's token (another registration of its host
/// name rotated it, or an operator removed it): register again when an enrollment token is
/// configured, else say so. Two agents sharing a host name take each other's token this way,
/// and each such turn is logged.
async fn reregister(shared: &Shared) {
    let Source::Enrolled {
        enrollment: Some(enrollment),
        state_file,
    } = &shared.settings.source
    else {
        tracing::error!("heartbeat failed: the control plane refuses this agent's token, and there is no AGENT_ENROLLMENT_TOKEN to register again");
        return;
    };
    tracing::warn!(
        "heartbeat failed: the control plane refuses this agent's token; registering again"
    );
    match register(
        &shared.control.http,
        &shared.settings,
        enrollment,
        state_file,
    )
    .await
    {
        Ok(identity) => {
            tracing::info!(agent_id = %identity.agent_id, "registered with the control plane");
            *shared
                .control
                .identity
                .write()
                .unwrap_or_else(|p| p.into_inner()) = identity;
        }
        Err(error) => tracing::warn!(%error, "registration failed"),
    }
}

/// One claim (a long poll of up to `wait_ms`) for `capacities`, with a fresh request id
/// (`<prefix><random>-<round>`); `None` when `stop` fired first.
async fn claim(
    shared: &Shared,
    capacities: Value,
    wait_ms: u64,
    prefix: &str,
    round: u64,
    stop: &CancellationToken,
) -> Option<Result<ClaimResponse, CallError>> {
    let request_id = format!(
        "{prefix}{}-{round}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let body = json!({"capacities": capacities, "request_id": request_id, "wait_ms": wait_ms});
    let claim =
        shared
            .control
            .post::<ClaimResponse>("v1/agents/claim", &body, Duration::from_secs(30));
    tokio::select! {
        _ = stop.cancelled() => None,
        c = claim => Some(c),
    }
}

async fn claim_loop(shared: &Arc<Shared>, tasks: &TaskTracker, stop: &CancellationToken) {
    let mut backoff = Backoff::new();
    let mut round: u64 = 0;
    while !stop.is_cancelled() {
        round += 1;
        let (capacities, complete) = capacities(shared, round);
        if capacities.is_empty() {
            // Full: until a check ends, or the window grows.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = shared.freed.notified() => continue,
                _ = tokio::time::sleep(crate::concurrency::TICK) => continue,
            }
        }
        let wait_ms = if complete { 20_000 } else { 1_000 };
        let Some(claimed) = claim(shared, json!(capacities), wait_ms, "", round, stop).await else {
            return;
        };
        match claimed {
            Ok(answer) => {
                backoff.reset();
                if !answer.leases.is_empty() {
                    tracing::info!(leases = answer.leases.len(), "dispatcher received batch");
                    metrics::counter!("checkplane_agent_leases_total")
                        .increment(answer.leases.len() as u64);
                }
                for lease in answer.leases {
                    start(shared, tasks, lease);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "claim failed");
                if !sleep_or_stop(backoff.next(), stop).await {
                    return;
                }
            }
        }
    }
}

/// Claim relayed commands whenever a relay worker is free (long polls of their own, so a
/// command never waits behind the checks' claim).
async fn relay_loop(shared: &Arc<Shared>, tasks: &TaskTracker, stop: &CancellationToken) {
    let Some(lane) = &shared.relay else {
        return;
    };
    let mut backoff = Backoff::new();
    let mut round: u64 = 0;
    while !stop.is_cancelled() {
        let free = lane.pool.available_permits();
        if free == 0 {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = lane.freed.notified() => continue,
            }
        }
        round += 1;
        let capacities = json!({RELAY_KIND: free});
        let Some(claimed) = claim(shared, capacities, 20_000, "r", round, stop).await else {
            return;
        };
        match claimed {
            Ok(answer) => {
                backoff.reset();
                for lease in answer.leases {
                    start_relay(shared, tasks, lease);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "claim of relayed commands failed");
                if !sleep_or_stop(backoff.next(), stop).await {
                    return;
                }
            }
        }
    }
}

/// Relay one command and report its reply at once (three tries: the asker stops waiting at
/// the command's deadline and asks again, so a reply kept longer is of no use).
fn start_relay(shared: &Arc<Shared>, tasks: &TaskTracker, lease: Lease) {
    let Some(lane) = &shared.relay else {
        return;
    };
    let permit = lane.pool.clone().try_acquire_owned().ok();
    let shared = shared.clone();
    tasks.spawn(async move {
        let Some(lane) = &shared.relay else {
            return;
        };
        let outcome = match permit {
            Some(_) => relay::execute(&lane.endpoint, &lease.spec).await,
            None => check::Outcome::failed("ERR_OVERLOADED", "no free relay worker", json!({})),
        };
        metrics::counter!("checkplane_agent_relayed_total", "outcome" => outcome.outcome)
            .increment(1);
        let body = ReportRequest {
            completed: vec![Completed {
                token: lease.token.clone(),
                outcome: Some(outcome.outcome.to_owned()),
                observations: Vec::new(),
                result: outcome.result,
            }],
            cancelled: Vec::new(),
        };
        drop(permit);
        lane.freed.notify_one();
        for pause in [50, 200, 0] {
            let sent: Result<TokenOutcomes, _> = shared
                .control
                .post("v1/agents/report", &body, Duration::from_secs(5))
                .await;
            match sent {
                Ok(_) => return,
                Err(error) if pause > 0 => {
                    tracing::debug!(%error, "report of a relayed command failed; trying again");
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Err(error) => {
                    tracing::warn!(%error, token = %lease.token, "report of a relayed command failed; its asker will ask again");
                }
            }
        }
    });
}

/// How many tasks of each kind to ask for (see [`share`]).
fn capacities(shared: &Shared, round: u64) -> (BTreeMap<&'static str, u32>, bool) {
    let free: Vec<(&'static str, u32)> = shared
        .pools
        .iter()
        .map(|(kind, pool)| (*kind, pool.available_permits() as u32))
        .collect();
    share(&free, shared.gate.free(), round)
}

/// Share `left` (what the concurrency window has free) among the kinds by what each pool
/// has `free`, one at a time from a different kind each `round`, so every kind gets its
/// part. Also says whether every kind with a free worker got at least one: when not (the
/// window is short), the claim must not long-poll, or the kinds left out would wait a
/// whole poll for their turn.
fn share(
    free: &[(&'static str, u32)],
    mut left: u32,
    round: u64,
) -> (BTreeMap<&'static str, u32>, bool) {
    let n = free.len();
    let mut asked = vec![0u32; n];
    let first = if n == 0 {
        0
    } else {
        (round % n as u64) as usize
    };
    while left > 0 {
        let mut gave = false;
        for i in 0..n {
            let k = (first + i) % n;
            if left > 0 && asked[k] < free[k].1 {
                asked[k] += 1;
                left -= 1;
                gave = true;
            }
        }
        if !gave {
            break;
        }
    }
    let complete = free.iter().zip(&asked).all(|((_, f), a)| *f == 0 || *a > 0);
    let asked = free
        .iter()
        .zip(asked)
        .filter(|(_, a)| *a > 0)
        .map(|((kind, _), a)| (*kind, a))
        .collect();
    (asked, complete)
}

/// Start one leased task, unless its task id is running already.
fn start(shared: &Arc<Shared>, tasks: &TaskTracker, lease: Lease) {
    let spec: Option<TaskSpec> = serde_json::from_value(lease.spec.clone()).ok();
    let key = spec
        .as_ref()
        .map(|s| task_id(s.check_id, s.slot, s.attempt))
        .unwrap_or_else(|| lease.token.clone());
    {
        let mut running = shared.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(task) = running.get_mut(&key) {
            // Delivered again (a lost claim answer): the run goes on under the newer lease.
            tracing::info!(task = %key, "task already running; following its new lease");
            task.token = lease.token;
            task.lease_ms = lease.lease_duration_ms;
            return;
        }
        running.insert(
            key.clone(),
            Running {
                token: lease.token.clone(),
                lease_ms: lease.lease_duration_ms,
            },
        );
    }
    let permit = shared
        .pools
        .get(lease.kind.as_str())
        .and_then(|pool| pool.clone().try_acquire_owned().ok());
    let Some(permit) = permit else {
        // Asked for no more than was free; should the pool be full anyway, say so at once.
        finish(
            shared,
            &key,
            "failed",
            json!({"error": {"code": "ERR_OVERLOADED", "message": "no free worker"}}),
        );
        return;
    };
    let shared = shared.clone();
    tasks.spawn(async move {
        let run = async {
            let _place = shared.gate.enter().await;
            execute(&shared, lease.kind.as_str(), spec.as_ref()).await
        };
        // Aborted at the end of a shutdown's drain: the canceller has reported it.
        if let Some(outcome) = shared.abort.run_until_cancelled(run).await {
            metrics::counter!("checkplane_agent_checks_total",
                "kind" => lease.kind.clone(), "outcome" => outcome.outcome)
            .increment(1);
            let timed_out = outcome.result["error"]["code"] == "ERR_TIMEOUT";
            shared.gate.ended(timed_out);
            finish(&shared, &key, outcome.outcome, outcome.result);
        }
        drop(permit);
        shared.freed.notify_one();
    });
}

/// The longest any check runs on this agent.
const MAX_CHECK: Duration = Duration::from_secs(60);
/// What a check leaves of its deadline for its report to arrive (a fifth of its time at most).
const REPORT_MARGIN: Duration = Duration::from_millis(500);

async fn execute(shared: &Shared, kind: &str, spec: Option<&TaskSpec>) -> check::Outcome {
    let Some(spec) = spec else {
        return check::Outcome::failed("ERR_BAD_SPEC", "the task spec is not a check", json!({}));
    };
    // Done a little before the check's deadline, so the result (a timeout included) is
    // reported before the scheduler closes the slot as `timeout` without one.
    let left = spec.deadline_ms - checkplane_runtime::clock::now_ms();
    let left = Duration::from_millis(u64::try_from(left).unwrap_or(0));
    let margin = (left / 5).min(REPORT_MARGIN);
    let timeout = left.saturating_sub(margin).min(MAX_CHECK);
    let Ok(kind) = kind.parse::<Kind>() else {
        return check::Outcome::failed(
            "ERR_UNSUPPORTED",
            format!("this agent does not run {kind} checks"),
            json!({}),
        );
    };
    match kind {
        Kind::Tcp => {
            let Some(port) = spec
                .options
                .get("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
            else {
                return check::Outcome::failed("ERR_BAD_SPEC", "options.port missing", json!({}));
            };
            tcp::check(
                &spec.target,
                port,
                timeout,
                shared.settings.allow_private_targets,
            )
            .await
        }
        Kind::Dns => {
            let question = dns::Question::from_spec(&spec.target, &spec.options);
            dns::check(&question, timeout, shared.settings.allow_private_targets).await
        }
        Kind::Http => {
            let request = http::Request::from_spec(&spec.target, &spec.options);
            let allow = shared.settings.allow_private_targets;
            http::check(&request, timeout, allow, shared.roots.clone()).await
        }
        Kind::Ping => {
            let packets = spec
                .options
                .get("packets")
                .and_then(Value::as_u64)
                .unwrap_or(3);
            let packets = u16::try_from(packets.clamp(1, 16)).unwrap_or(3);
            let allow = shared.settings.allow_private_targets;
            let kinds = [icmp::Kind::Raw, icmp::Kind::Datagram];
            ping::check(&spec.target, packets, timeout, allow, &kinds).await
        }
        Kind::Trace => {
            let probe = trace::Probe::from_options(&spec.options);
            let target = spec.target.clone();
            let allow = shared.settings.allow_private_targets;
            let traced = shared
                .traces
                .spawn(async move { trace::check(&target, probe, timeout, allow).await });
            traced.await.unwrap_or_else(|e| {
                check::Outcome::failed("ERR_INTERNAL", format!("trace: {e}"), json!({}))
            })
        }
        // Relayed commands never come here (see `relay`).
        Kind::Haproxy => check::Outcome::failed(
            "ERR_BAD_SPEC",
            "a relayed command is not a check",
            json!({}),
        ),
    }
}

fn finish(shared: &Shared, key: &str, outcome: &str, result: Value) {
    let Some(task) = shared
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(key)
    else {
        return;
    };
    shared.push_report(Report::Completed(Completed {
        token: task.token,
        outcome: Some(outcome.to_owned()),
        observations: Vec::new(),
        result,
    }));
}

/// Resident memory of this process, from `/proc/self/statm` (bytes).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Send the agent's gauges and the controller's snapshots every `metrics_interval` (and
/// once more at shutdown); snapshots a failed report could not deliver go with the next.
async fn metrics_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let stopping = !sleep_or_stop(shared.settings.metrics_interval, &stop).await;
        let now = checkplane_runtime::clock::now_ms();
        let snapshots = shared.gate.take_snapshots(now);
        let mut metrics: BTreeMap<String, f64> = shared
            .gate
            .gauges()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        if let Some(rss) = rss_bytes() {
            metrics.insert("process.rss_bytes".into(), rss as f64);
        }
        let pending = shared
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue
            .len();
        metrics.insert("reports.pending".into(), pending as f64);
        let body = checkplane_wire::agents::MetricsReport {
            metrics,
            concurrency: snapshots.clone(),
        };
        let sent: Result<Value, _> = shared
            .control
            .post("v1/agents/metrics", &body, Duration::from_secs(10))
            .await;
        if let Err(error) = sent {
            tracing::warn!(%error, "metrics report failed; snapshots kept for the next");
            shared.gate.restore(snapshots);
        }
        if stopping {
            return;
        }
    }
}

async fn extend_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (tokens, term) = {
            let running = shared.running.lock().unwrap_or_else(|p| p.into_inner());
            let term = running.values().map(|r| r.lease_ms).min().unwrap_or(30_000);
            (
                running
                    .values()
                    .map(|r| r.token.clone())
                    .collect::<Vec<_>>(),
                term,
            )
        };
        // The gateway takes at most MAX_TOKENS per call.
        for tokens in tokens.chunks(checkplane_wire::leases::api::MAX_TOKENS) {
            let extended: Result<TokenOutcomes, _> = shared
                .control
                .post(
                    "v1/agents/extend",
                    &json!({ "tokens": tokens }),
                    Duration::from_secs(5),
                )
                .await;
            match extended {
                Ok(answer) => {
                    for refused in answer.results.iter().filter(|r| r.error.is_some()) {
                        tracing::warn!(token = %refused.token, error = ?refused.error, "lease extension failed");
                    }
                }
                Err(error) => tracing::warn!(%error, "lease extension failed"),
            }
        }
        let wait = Duration::from_millis((term / 3).clamp(200, 10_000));
        if !sleep_or_stop(wait, &stop).await {
            return;
        }
    }
}

/// Send reports in batches of up to 100 until `stop`, then once more what is left.
async fn report_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = Backoff::new();
    loop {
        let batch: Vec<Report> = {
            let reports = shared.reports.lock().unwrap_or_else(|p| p.into_inner());
            reports.queue.iter().take(100).cloned().collect()
        };
        if batch.is_empty() {
            if stop.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = shared.report_ready.notified() => {}
            }
            continue;
        }
        let mut body = ReportRequest {
            completed: Vec::new(),
            cancelled: Vec::new(),
        };
        for report in &batch {
            match report.clone() {
                Report::Completed(c) => body.completed.push(c),
                Report::Cancelled(c) => body.cancelled.push(c),
            }
        }
        let sent: Result<TokenOutcomes, _> = shared
            .control
            .post("v1/agents/report", &body, Duration::from_secs(10))
            .await;
        match sent {
            Ok(answer) => {
                backoff.reset();
                for refused in answer.results.iter().filter(|r| r.error.is_some()) {
                    // Fenced (lost, closed): the control plane will not take this result.
                    tracing::warn!(token = %refused.token, error = ?refused.error, "report refused");
                }
                let mut reports = shared.reports.lock().unwrap_or_else(|p| p.into_inner());
                let sent: std::collections::HashSet<&str> =
                    batch.iter().map(Report::token).collect();
                reports.queue.retain(|c| !sent.contains(c.token()));
                metrics::gauge!("checkplane_agent_reports_pending").set(reports.queue.len() as f64);
            }
            Err(error) => {
                tracing::warn!(%error, pending = batch.len(), "report failed; kept for the next try");
                let wait = backoff.next();
                if stop.is_cancelled() {
                    // Shutting down: one more try after a short wait, then give up.
                    tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
                    let left = shared
                        .reports
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .queue
                        .len();
                    tracing::warn!(left, "shutting down with unsent reports");
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::share;

    const FREE: [(&str, u32); 5] = [
        ("dns", 32),
        ("http", 16),
        ("tcp", 16),
        ("ping", 7),
        ("trace", 4),
    ];

    #[test]
    fn the_window_is_shared_out_evenly_and_never_exceeded() {
        for left in [0, 1, 3, 5, 10, 63, 75, 500] {
            for round in 0..5 {
                let (asked, complete) = share(&FREE, left, round);
                let total: u32 = asked.values().sum();
                assert_eq!(total, left.min(75), "left {left}: {asked:?}");
                for (kind, free) in FREE {
                    assert!(asked.get(kind).copied().unwrap_or(0) <= free);
                }
                // With at least one place per kind, every kind gets one.
                assert_eq!(complete, left >= 5, "left {left}: {asked:?}");
                assert_eq!(asked.len() as u32, left.min(5), "left {left}: {asked:?}");
            }
        }
        // 63 = 4 trace + 7 ping + 52 among three, none above its pool.
        let (asked, _) = share(&FREE, 63, 0);
        assert_eq!((asked["trace"], asked["ping"]), (4, 7));
        assert_eq!((asked["http"], asked["tcp"]), (16, 16));
        assert_eq!(asked["dns"], 20);
        // A short window goes round the kinds, one round after another.
        let turns: std::collections::BTreeSet<&str> = (0..5)
            .flat_map(|round| share(&FREE, 1, round).0.into_keys())
            .collect();
        assert_eq!(turns.len(), 5);
    }

    #[test]
    fn a_full_pool_is_not_asked_for() {
        let (asked, complete) = share(&[("dns", 0), ("tcp", 2)], 10, 0);
        assert_eq!(asked.into_iter().collect::<Vec<_>>(), [("tcp", 2)]);
        assert!(complete);
        assert!(share(&[("dns", 0)], 10, 0).0.is_empty());
    }
}
