//! The relay to this host's HAProxy: with `AGENT_HAPROXY_SOCKET` set, the agent takes tasks
//! of kind `haproxy` (Runtime API commands from the haproxy-sync owning the instance) and
//! sends each to that one socket, reporting the raw reply. Only the commands checkplane sends
//! are relayed ([`checkplane_haproxy::relay::relayable`]); the socket is the agent's own
//! setting, never the task's, so no task reaches any other HAProxy.
//!
//! Relayed commands are request and answer, not measurements: they run outside the
//! concurrency controller (a busy probe host still answers its HAProxy's commands at once),
//! on their own claim loop, and each reply is reported on its own right away (a few tries;
//! the asker gives up at the command's deadline and asks again).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use checkplane_haproxy::relay::{
    relayable, settle, RelayedCommand, RelayedSettle, MAX_RELAYED_THEN,
};
use checkplane_haproxy::socket::{self as haproxy_socket, Endpoint, Limits};
use serde_json::{json, Value};

use crate::check::Outcome;

/// Largest reply relayed, all of a task's commands together (a report is at most 4 MiB; a
/// `show stat` of a thousand servers is about 350 kB).
pub const MAX_REPLY: usize = 2 * 1024 * 1024;

/// The longest connect wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends one line after another to the socket, each on its own connection, all before one
/// deadline and within one reply budget: a line checkplane does not send, a passed deadline
/// or an unreachable socket is the task's failure.
struct Sender<'a> {
    endpoint: &'a Endpoint,
    instance_id: &'a str,
    deadline_ms: i64,
    room: AtomicUsize,
}

impl Sender<'_> {
    async fn send(&self, line: String) -> Result<String, Outcome> {
        if !relayable(&line) {
            return Err(forbidden(self.instance_id));
        }
        let left = self.deadline_ms - checkplane_runtime::clock::now_ms();
        let Some(left) = u64::try_from(left).ok().filter(|l| *l > 0) else {
            return Err(Outcome::failed(
                "ERR_TIMEOUT",
                "the command's deadline passed before it was sent",
                json!({}),
            ));
        };
        let left = Duration::from_millis(left);
        let limits = Limits {
            connect_timeout: left.min(CONNECT_TIMEOUT),
            read_timeout: left,
            max_reply: self.room.load(Ordering::Relaxed),
        };
        match haproxy_socket::exchange(self.endpoint, &line, limits).await {
            Ok(reply) => {
                let used = reply.len();
                let _ = self
                    .room
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |room| {
                        Some(room.saturating_sub(used))
                    });
                Ok(reply)
            }
            Err(unreachable) => Err(Outcome::failed("ERR_UNREACHABLE", unreachable.0, json!({}))),
        }
    }
}

fn forbidden(instance_id: &str) -> Outcome {
    tracing::warn!(%instance_id, "refused to relay a command checkplane does not send");
    Outcome::failed(
        "ERR_FORBIDDEN",
        "this agent relays only the commands checkplane sends",
        json!({}),
    )
}

fn finished(replies: &[Option<String>]) -> Outcome {
    Outcome {
        outcome: crate::check::Ended::Finished,
        result: json!({"reply": replies.first(), "replies": replies}),
    }
}

/// One lock per server being settled: two settles of one server never interleave, so the
/// second reads what the first set. Two can be in this agent at once when an action's attempt
/// gave up waiting for its reply (its connection to Redis broke) and its retry was enqueued
/// while the first task was still in the agent's stream: found by the chaos run, where both
/// read `ready` and both sent `set server … state drain` for one action key.
fn server_lock(backend: &str, server: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Forget the servers nobody is settling (only the map holds their lock).
    locks.retain(|_, lock| Arc::strong_count(lock) > 1);
    locks
        .entry(format!("{backend}/{server}"))
        .or_default()
        .clone()
}

/// Run the task `spec` against `endpoint`: a [`RelayedSettle`] (an action's read, set when
/// needed, read-back and stats row, decided here), or the commands of a [`RelayedCommand`],
/// one connection each and in order, before its deadline. The reply is the first command's
/// (`reply`) and every command's (`replies`; a settle's set is `null` when it was not
/// needed); a command that cannot be sent fails the task and nothing after it is sent.
pub async fn execute(endpoint: &Endpoint, spec: &Value) -> Outcome {
    if let Ok(task) = serde_json::from_value::<RelayedSettle>(spec.clone()) {
        if let Err(why) = task.settle.validate() {
            return Outcome::failed("ERR_BAD_SPEC", why.to_string(), json!({}));
        }
        let sender = Sender {
            endpoint,
            instance_id: &task.instance_id,
            deadline_ms: task.deadline_ms,
            room: AtomicUsize::new(MAX_REPLY),
        };
        let lock = server_lock(&task.settle.backend, &task.settle.server);
        let _settling = lock.lock().await;
        return match settle(&task.settle, |line| sender.send(line)).await {
            Ok(replies) => finished(&replies),
            Err(failed) => failed,
        };
    }
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
    // All or nothing: a forbidden line anywhere refuses the task before any is sent.
    if !lines.iter().all(|line| relayable(line)) {
        return forbidden(&command.instance_id);
    }
    let sender = Sender {
        endpoint,
        instance_id: &command.instance_id,
        deadline_ms: command.deadline_ms,
        room: AtomicUsize::new(MAX_REPLY),
    };
    let mut replies = Vec::with_capacity(lines.len());
    for line in lines {
        match sender.send(line.to_owned()).await {
            Ok(reply) => replies.push(Some(reply)),
            Err(failed) => return failed,
        }
    }
    finished(&replies)
}
