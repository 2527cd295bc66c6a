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
use checkplane_wire::haproxy::{relayable, RelayedCommand, MAX_RELAYED_THEN};
use serde_json::{json, Value};

use crate::check::Outcome;

/// Largest reply relayed, all of a task's commands together (a report is at most 4 MiB; a
/// `show stat` of a thousand servers is about 350 kB).
pub const MAX_REPLY: usize = 2 * 1024 * 1024;

/// The longest connect wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Send the commands of `spec` to `endpoint`, one connection each and in order, before its
/// deadline. The reply is the first command's (`reply`) and every command's (`replies`); a
/// command that cannot be sent fails the task and nothing after it is sent.
pub async fn execute(endpoint: &Endpoint, spec: &Value) -> Outcome {
    let Ok(command) = serde_json::from_value::<RelayedCommand>(spec.clone()) else {
        return Outcome::failed("ERR_BAD_SPEC", "not a relayed command", json!({}));
    };
    if command.then.len() > MAX_RELAYED_THEN {
        return Outcome::failed(
            "ERR_BAD_SPEC",
            format!("at most {} commands after the first", MAX_RELAYED_THEN),
            json!({}),
        );
    }
    let lines: Vec<&str> = std::iter::once(command.command.as_str())
        .chain(command.then.iter().map(String::as_str))
        .collect();
    if !lines.iter().all(|line| relayable(line)) {
        tracing::warn!(instance_id = %command.instance_id, "refused to relay a command checkplane does not send");
        return Outcome::failed(
            "ERR_FORBIDDEN",
            "this agent relays only the commands checkplane sends",
            json!({}),
        );
    }
    let mut replies: Vec<String> = Vec::with_capacity(lines.len());
    let mut room = MAX_REPLY;
    for line in lines {
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
            max_reply: room,
        };
        match haproxy_socket::exchange(endpoint, line, limits).await {
            Ok(reply) => {
                room = room.saturating_sub(reply.len());
                replies.push(reply);
            }
            Err(unreachable) => {
                return Outcome::failed("ERR_UNREACHABLE", unreachable.0, json!({}))
            }
        }
    }
    Outcome {
        outcome: "finished",
        result: json!({"reply": replies.first(), "replies": replies}),
    }
}
