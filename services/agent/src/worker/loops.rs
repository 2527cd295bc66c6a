//! The tickers: heartbeat (at the interval the gateway asks for), lease extension (a third
//! of the way into the shortest term), and the agent's metrics and controller snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use checkplane_wire::agents::HeartbeatRequest;
use checkplane_wire::leases::api::{ExtendRequest, TokenOutcomes};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::control::{reregister, sleep_or_stop, Backoff, CallError};
use super::Shared;

pub(super) async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken) {
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
            .post(
                "v1/agents/heartbeat",
                &HeartbeatRequest::default(),
                Duration::from_secs(5),
            )
            .await;
        let wait = match beat {
            Ok(answer) => {
                backoff.reset();
                every = Duration::from_millis(answer.next_deadline_ms.max(100));
                // Well inside the deadline.
                every.mul_f64(0.8)
            }
            Err(CallError::Refused { status: 401, .. }) => {
                let told = reregister(&shared).await;
                let step = backoff.next().min(every);
                told.map_or(step, |after| step.max(backoff.spread(after)))
            }
            Err(error) => {
                tracing::warn!(%error, "heartbeat failed");
                // Sooner than the interval, unless the gateway said to come back later.
                let step = backoff.next().min(every);
                backoff.at_least(step, &error)
            }
        };
        if !sleep_or_stop(wait, &stop).await {
            return;
        }
    }
}

pub(super) async fn extend_loop(shared: Arc<Shared>, stop: CancellationToken) {
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
        let mut told_to_wait = Duration::ZERO;
        for tokens in tokens.chunks(checkplane_wire::leases::api::MAX_TOKENS) {
            let extended: Result<TokenOutcomes, _> = shared
                .control
                .post(
                    "v1/agents/extend",
                    &ExtendRequest {
                        tokens: tokens.to_vec(),
                    },
                    Duration::from_secs(5),
                )
                .await;
            match extended {
                Ok(answer) => {
                    for refused in answer.results.iter().filter(|r| r.error.is_some()) {
                        tracing::warn!(token = %refused.token, error = ?refused.error, "lease extension failed");
                    }
                    renew_terms(&shared, &answer);
                }
                Err(error) => {
                    tracing::warn!(%error, "lease extension failed");
                    told_to_wait = told_to_wait.max(error.retry_after().unwrap_or_default());
                }
            }
        }
        let wait = Duration::from_millis((term / 3).clamp(200, 10_000)).max(told_to_wait);
        if !sleep_or_stop(wait, &stop).await {
            return;
        }
    }
}

/// Each extended lease's term from now on: its new deadline (a lease claimed again after a
/// lost answer arrives with what was left of its term, maybe nothing, which would have the
/// loop extend every 200 ms for the rest of the check).
fn renew_terms(shared: &Shared, answer: &TokenOutcomes) {
    let now = checkplane_runtime::clock::now_ms();
    let deadlines: std::collections::HashMap<&str, i64> = answer
        .results
        .iter()
        .filter_map(|r| Some((r.token.as_str(), r.new_deadline_ms?)))
        .collect();
    let mut running = shared.running.lock().unwrap_or_else(|p| p.into_inner());
    for task in running.values_mut() {
        if let Some(deadline) = deadlines.get(task.token.as_str()) {
            task.lease_ms = u64::try_from(deadline - now).unwrap_or(0);
        }
    }
}

/// Resident memory of this process, from `/proc/self/statm` (bytes).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Send the agent's gauges and the controller's snapshots every `metrics_interval` (and
/// once more at shutdown); snapshots a failed report could not deliver go with the next.
pub(super) async fn metrics_loop(shared: Arc<Shared>, stop: CancellationToken) {
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
