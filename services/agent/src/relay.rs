//! The relay to this host's HAProxy: with `AGENT_HAPROXY_SOCKET` set, the agent takes tasks
//! of kind `haproxy` (Runtime API commands from the haproxy-sync owning the instance) and
//! sends each to that one socket, reporting the raw reply. Only the commands checkplane sends
//! are relayed ([`checkplane_wire::haproxy::relayable`]); the socket is the agent's own
//! setting, never the task's, so no task reaches any other HAProxy.
//!
//! Relayed commands are request and answer, not measurements: they run outside the
//! concurrency controller (a busy probe host still answers its HAProxy's commands at once),
//! on their own claim loop, and each reply is reported on its own right away (a few tries;
//! the asker gives up at the command's deadline and asks again).

use std::time::Duration;

use checkplane_runtime::haproxy_socket::{self, Endpoint, Limits};
use checkplane_wire::haproxy::{relayable, RelayedCommand};
use serde_json::{json, Value};

use crate::check::Outcome;

/// Largest reply relayed (a report is at most 4 MiB; a `show stat` of a thousand servers is
/// about 350 kB).
pub const MAX_REPLY: usize = 2 * 1024 * 1024;

/// The longest connect wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Send the command of `spec` to `endpoint` before its deadline.
pub async fn execute(endpoint: &Endpoint, spec: &Value) -> Outcome {
    let Ok(command) = serde_json::from_value::<RelayedCommand>(spec.clone()) else {
        return Outcome::failed("ERR_BAD_SPEC", "not a relayed command", json!({}));
    };
    if !relayable(&command.command) {
        tracing::warn!(instance_id = %command.instance_id, "refused to relay a command checkplane does not send");
        return Outcome::failed(
            "ERR_FORBIDDEN",
            "this agent relays only the commands checkplane sends",
            json!({}),
        );
    }
    let left = command.deadline_ms - checkplane_runtime::clock::now_ms();
    let Some(left) = u64::try_from(left).ok().filter(|l| *l > 0) else {
        return Outcome::failed(
            "ERR_TIMEOUT",
            "the command's deadline passed before it was sent",
            json!({}),
        );
    };
    let left = Duration::from_millis(left);
    let limits = Limits {
        connect_timeout: left.min(CONNECT_TIMEOUT),
        read_timeout: left,
        max_reply: MAX_REPLY,
    };
    match haproxy_socket::exchange(endpoint, &command.command, limits).await {
        Ok(reply) => Outcome {
            outcome: "finished",
            result: json!({"reply": reply}),
        },
        Err(unreachable) => Outcome::failed("ERR_UNREACHABLE", unreachable.0, json!({})),
    }
}
