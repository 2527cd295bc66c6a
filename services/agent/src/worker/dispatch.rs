//! Running a leased task: one run per task id (a redelivery follows the newer lease), a
//! worker of its kind's pool and a place in the concurrency window, the check itself, and
//! its result handed to the reports.

use std::sync::Arc;
use std::time::Duration;

use checkplane_wire::checks::{options, task_id, TaskSpec};
use checkplane_wire::kinds::Kind;
use checkplane_wire::leases::api::{Completed, Lease};
use serde_json::{json, Value};
use tokio_util::task::TaskTracker;

use super::reports::Report;
use super::Shared;
use crate::{check, dns, http, icmp, ping, tcp, trace};

/// A task in flight: its current lease token and its term.
pub(super) struct Running {
    pub(super) token: String,
    pub(super) lease_ms: u64,
}

/// Start one leased task, unless its task id is running already.
pub(super) fn start(shared: &Arc<Shared>, tasks: &TaskTracker, lease: Lease) {
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
            check::Ended::Failed,
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
                "kind" => lease.kind.clone(), "outcome" => outcome.outcome.as_str())
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
pub(super) const MAX_CHECK: Duration = Duration::from_secs(60);
/// What a check leaves of its deadline for its report to arrive (a fifth of its time at most).
pub(super) const REPORT_MARGIN: Duration = Duration::from_millis(500);

/// A task's options as its kind's type; a spec that does not fit fails the task.
fn decode<T: serde::de::DeserializeOwned>(spec: &TaskSpec) -> Result<T, check::Outcome> {
    serde_json::from_value(spec.options.clone())
        .map_err(|e| check::Outcome::failed("ERR_BAD_SPEC", format!("options: {e}"), json!({})))
}

pub(super) async fn execute(
    shared: &Shared,
    kind: &str,
    spec: Option<&TaskSpec>,
) -> check::Outcome {
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
    let allow = shared.settings.allow_private_targets;
    match kind {
        Kind::Tcp => {
            let options: options::Tcp = match decode(spec) {
                Ok(options) => options,
                Err(failed) => return failed,
            };
            tcp::check(&spec.target, options.port, timeout, allow).await
        }
        Kind::Dns => {
            let options: options::Dns = match decode(spec) {
                Ok(options) => options,
                Err(failed) => return failed,
            };
            let question = dns::Question::from_spec(&spec.target, &options);
            dns::check(&question, timeout, allow).await
        }
        Kind::Http => {
            let options: options::Http = match decode(spec) {
                Ok(options) => options,
                Err(failed) => return failed,
            };
            let request = http::Request::from_spec(&spec.target, &options);
            http::check(&request, timeout, allow, shared.roots.clone()).await
        }
        Kind::Ping => {
            let options: options::Ping = match decode(spec) {
                Ok(options) => options,
                Err(failed) => return failed,
            };
            let packets = options.packets.clamp(1, 16);
            let kinds = [icmp::Kind::Raw, icmp::Kind::Datagram];
            ping::check(&spec.target, packets, timeout, allow, &kinds).await
        }
        Kind::Trace => {
            let options: options::Trace = match decode(spec) {
                Ok(options) => options,
                Err(failed) => return failed,
            };
            let probe = trace::Probe::from_options(&options);
            let target = spec.target.clone();
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

pub(super) fn finish(shared: &Shared, key: &str, outcome: check::Ended, result: Value) {
    let Some(task) = shared
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(key)
    else {
        return;
    };
    let (outcome, result) = match checkplane_wire::leases::LeaseToken::parse(&task.token) {
        Ok(lease) => match lease.kind.parse::<Kind>() {
            Ok(kind) => check::fitted(kind, outcome, result),
            Err(()) => (outcome, result),
        },
        Err(_) => (outcome, result),
    };
    shared.push_report(Report::Completed(Completed {
        token: task.token,
        outcome: Some(outcome),
        observations: Vec::new(),
        result,
    }));
}
