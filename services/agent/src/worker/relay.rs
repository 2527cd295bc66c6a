//! The relay lane: claims of relayed HAProxy commands on their own long polls and workers,
//! each reply reported on its own at once (see [`crate::relay`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use checkplane_wire::leases::api::{Completed, Lease, ReportRequest, TokenOutcomes};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::claim::claim;
use super::control::{sleep_or_stop, Backoff};
use super::{Shared, RELAY_KIND};
use crate::check;

/// The relayed commands' own workers and wake-up.
pub(super) struct RelayLane {
    pub(super) endpoint: checkplane_haproxy::socket::Endpoint,
    pub(super) pool: Arc<Semaphore>,
    pub(super) freed: Notify,
}

/// Claim relayed commands whenever a relay worker is free (long polls of their own, so a
/// command never waits behind the checks' claim).
pub(super) async fn relay_loop(
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) {
    let Some(lane) = &shared.relay else {
        return;
    };
    let mut backoff = Backoff::new();
    let mut round: u64 = 0;
    while !stop.is_cancelled() {
        if lane.pool.available_permits() == 0 {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = lane.freed.notified() => continue,
            }
        }
        if !shared.control.claims.turn_or_stop(stop).await {
            return;
        }
        let free = lane.pool.available_permits();
        if free == 0 {
            continue;
        }
        round += 1;
        let capacities = BTreeMap::from([(RELAY_KIND.to_owned(), free as u32)]);
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
                if !sleep_or_stop(backoff.after(&error), stop).await {
                    return;
                }
            }
        }
    }
}

/// Relay one command and report its reply at once (three tries: the asker stops waiting at
/// the command's deadline and asks again, so a reply kept longer is of no use).
pub(super) fn start_relay(shared: &Arc<Shared>, tasks: &TaskTracker, lease: Lease) {
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
            Some(_) => crate::relay::execute(&lane.endpoint, &lease.spec).await,
            None => check::Outcome::failed("ERR_OVERLOADED", "no free relay worker", json!({})),
        };
        metrics::counter!("checkplane_agent_relayed_total", "outcome" => outcome.outcome.as_str())
            .increment(1);
        let (ended, result) = check::fitted(
            checkplane_wire::kinds::Kind::Haproxy,
            outcome.outcome,
            outcome.result,
        );
        let body = ReportRequest {
            completed: vec![Completed {
                token: lease.token.clone(),
                outcome: Some(ended),
                observations: Vec::new(),
                result,
            }],
            cancelled: Vec::new(),
        };
        drop(permit);
        lane.freed.notify_one();
        for pause in [50, 200, 0] {
            shared.control.reports.turn().await;
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
