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

mod claim;
mod control;
mod dispatch;
mod loops;
mod relay;
mod reports;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use checkplane_wire::kinds::Kind;
use checkplane_wire::leases::api::Cancelled;

use crate::http;
use crate::identity::Source;

use control::Control;
use dispatch::Running;
pub use loops::rss_bytes;
use relay::RelayLane;
use reports::{Report, Reports};

/// What the agent runs: each kind's pool size (a kind of size 0 is not declared) and the
/// most checks in flight across kinds.
#[derive(Debug, Clone)]
pub struct Pools {
    pub sizes: BTreeMap<&'static str, u32>,
    pub max_inflight: u32,
}

/// Relayed Runtime API commands (see [`relay`]).
pub(super) const RELAY_KIND: &str = checkplane_haproxy::relay::RELAY_KIND;

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
    let Some(identity) = control::identity(&http, &settings, &stop).await else {
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
            claims: control::Pace::new(control::PACE_PER_SECOND, control::PACE_BURST),
            reports: control::Pace::new(control::PACE_PER_SECOND, control::PACE_BURST),
        },
        settings,
        running: Mutex::default(),
        reports: Mutex::default(),
        report_ready: Notify::new(),
        freed: Notify::new(),
        abort: CancellationToken::new(),
    });
    let tasks = TaskTracker::new();
    // The tickers and loops beside the claims; the reporter outlives them all, to send what
    // the drain below leaves.
    let loops = TaskTracker::new();
    let reporter_stop = CancellationToken::new();
    let reporter = loops.spawn(reports::report_loop(shared.clone(), reporter_stop.clone()));
    loops.spawn(loops::heartbeat_loop(shared.clone(), stop.clone()));
    loops.spawn(loops::extend_loop(shared.clone(), stop.clone()));
    loops.spawn(loops::metrics_loop(shared.clone(), stop.clone()));
    {
        let (shared, stop) = (shared.clone(), stop.clone());
        loops.spawn(async move { crate::concurrency::run(&shared.gate, &stop).await });
    }
    let relays = {
        let (shared, tasks, stop) = (shared.clone(), tasks.clone(), stop.clone());
        loops.spawn(async move { relay::relay_loop(&shared, &tasks, &stop).await })
    };
    loops.close();
    if shared.pools.is_empty() {
        // A relay and nothing else.
        stop.cancelled().await;
    } else {
        claim::claim_loop(&shared, &tasks, &stop).await;
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
    loops.wait().await;
    drop(traces);
}
