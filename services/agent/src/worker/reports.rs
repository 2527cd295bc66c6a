//! Finished tasks wait in a bounded buffer (a full one drops the oldest and says how many)
//! and go out in batches, kept until the gateway acknowledged them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use checkplane_wire::leases::api::{Cancelled, Completed, ReportRequest, TokenOutcomes};
use tokio_util::sync::CancellationToken;

use super::control::Backoff;
use super::Shared;

/// One report waiting to be sent.
#[derive(Clone)]
pub(super) enum Report {
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
pub(super) struct Reports {
    pub(super) queue: VecDeque<Report>,
    pub(super) dropped: u64,
}

impl Shared {
    pub(super) fn push_report(&self, done: Report) {
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

/// Send reports in batches of up to 100 until `stop`, then once more what is left.
pub(super) async fn report_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = Backoff::new();
    let next_batch = || -> Vec<Report> {
        let reports = shared.reports.lock().unwrap_or_else(|p| p.into_inner());
        reports.queue.iter().take(100).cloned().collect()
    };
    loop {
        if next_batch().is_empty() {
            if stop.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = shared.report_ready.notified() => {}
            }
            continue;
        }
        // The turn first, then the batch: what finished while waiting goes along.
        shared.control.reports.turn().await;
        let batch = next_batch();
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
                    tracing::warn!(token = %refused.token, error = ?refused.error,
                        message = ?refused.message, "report refused");
                }
                let mut reports = shared.reports.lock().unwrap_or_else(|p| p.into_inner());
                let sent: std::collections::HashSet<&str> =
                    batch.iter().map(Report::token).collect();
                reports.queue.retain(|c| !sent.contains(c.token()));
                metrics::gauge!("checkplane_agent_reports_pending").set(reports.queue.len() as f64);
            }
            Err(error) => {
                tracing::warn!(%error, pending = batch.len(), "report failed; kept for the next try");
                let wait = backoff.after(&error);
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
