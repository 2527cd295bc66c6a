//! The transport through the node's agent: each command becomes a task of kind `haproxy` in
//! that one agent's task stream (the node named when the instance was registered, never any
//! other agent), the agent relays it to its local socket and reports the raw reply, which the
//! report script pushes to the task's relay list, where this side waits for it.
//!
//! - An agent that is not online (its presence in Redis) refuses the command at once:
//!   [`ApiError::Unavailable`], `ERR_INSTANCE_UNAVAILABLE`.
//! - No reply by the command's deadline: the task is closed (a late report is fenced, so the
//!   agent never answers a command nobody waits for) and the command is
//!   [`ApiError::Unreachable`], retried like a socket timeout.
//! - The agent could not reach its socket: [`ApiError::Unreachable`] with its message.

use std::time::{Duration, Instant};

use checkplane_core::leases::{CloseReason, Leases};
use checkplane_haproxy::relay::{RelayedCommand, RelayedSettle, Settle, RELAY_KIND};
use checkplane_runtime::clock::now_ms;
use checkplane_runtime::stores::Stores;

use crate::runtime_api::{settle_by_commands, ApiError, Reply, Transport};

/// Commands relayed by `agent` to `instance`.
pub struct Relay {
    pub stores: Stores,
    pub leases: Leases,
    pub instance: String,
    pub agent: String,
    /// How long a command may take on the agent's side.
    pub read_timeout: Duration,
    /// Where replies are waited for: a connection of its own (a blocking pop on a pooled one
    /// would fail after 500 ms), made on first use and again after an error. Commands to one
    /// instance run one at a time, so one is enough.
    pub waiter: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

/// Time for the claim and the report around the command itself.
const CARRY: Duration = Duration::from_secs(1);

fn redis_error(e: redis::RedisError) -> ApiError {
    ApiError::Unreachable(format!("Redis: {e}"))
}

impl Relay {
    /// Whether the agent is online (its presence, as heartbeats and the sweep keep it).
    async fn online(&self) -> Result<bool, ApiError> {
        let keys = self.leases.keys();
        let mut conn = self.stores.redis_shared.clone();
        let presence: Option<String> = redis::cmd("HGET")
            .arg(keys.presence(keys.shard_of(&self.agent)))
            .arg(&self.agent)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(presence.is_some_and(|p| p.starts_with("online:")))
    }

    /// One command, one task: its reply.
    async fn relay(&self, command: &str) -> Result<String, ApiError> {
        let spec = RelayedCommand {
            instance_id: self.instance.clone(),
            command: command.to_owned(),
            then: Vec::new(),
            deadline_ms: now_ms() + millis(self.read_timeout),
        };
        self.trip(&spec)
            .await?
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| ApiError::Unreachable("the agent's report has no reply".to_owned()))
    }

    /// A settle, one task: the agent decides on the set where the socket is. An agent from
    /// before settles refuses the task (`ERR_BAD_SPEC`): then one task per command.
    async fn relay_settle(
        &self,
        settle: &Settle,
        not_after: Instant,
    ) -> Result<Vec<Option<String>>, ApiError> {
        let within = not_after
            .saturating_duration_since(Instant::now())
            .min(self.read_timeout);
        let spec = RelayedSettle {
            instance_id: self.instance.clone(),
            settle: settle.clone(),
            deadline_ms: now_ms() + millis(within),
        };
        match self.trip(&spec).await {
            Err(ApiError::Refused(why)) if why.contains("ERR_BAD_SPEC") => {
                settle_by_commands(self, settle, not_after).await
            }
            other => other,
        }
    }

    /// The task `spec` to the node's agent, and its replies when it reports.
    async fn trip(&self, spec: &impl serde::Serialize) -> Result<Vec<Option<String>>, ApiError> {
        if !self.online().await? {
            return Err(ApiError::Unavailable(format!(
                "the node's agent {} is offline",
                self.agent
            )));
        }
        let wait = self.read_timeout + CARRY;
        let spec = serde_json::to_string(spec).map_err(|e| ApiError::Unreachable(e.to_string()))?;
        let task = format!("hap:{}:{}", self.instance, uuid::Uuid::now_v7().simple());
        let mut conn = self.stores.redis_shared.clone();
        let entry = self
            .leases
            .enqueue_task(&mut conn, &self.agent, RELAY_KIND, &task, &spec)
            .await
            .map_err(redis_error)?;
        let reply_key = self
            .leases
            .keys()
            .relay_reply(&self.agent, RELAY_KIND, &entry);
        let popped: Option<(String, String)> = {
            let mut waiter = self.waiter.lock().await;
            if waiter.is_none() {
                *waiter = Some(
                    self.stores
                        .blocking_connection(wait)
                        .await
                        .map_err(redis_error)?,
                );
            }
            let Some(conn) = waiter.as_mut() else {
                return Err(ApiError::Unreachable("no Redis connection".to_owned()));
            };
            let popped = redis::cmd("BLPOP")
                .arg(&reply_key)
                .arg(wait.as_secs_f64())
                .query_async(conn)
                .await;
            if popped.is_err() {
                *waiter = None;
            }
            popped.map_err(redis_error)?
        };
        let Some((_, reply)) = popped else {
            // Fence the late report: nobody waits for it any more.
            let closed = self
                .leases
                .close_task(
                    &mut conn,
                    &self.agent,
                    RELAY_KIND,
                    &task,
                    CloseReason::Timeout,
                    now_ms(),
                )
                .await;
            if let Err(error) = closed {
                tracing::warn!(%error, task, "cannot close a relayed command nobody answered");
            }
            return Err(ApiError::Unreachable(format!(
                "the node's agent {} did not answer within {} ms",
                self.agent,
                wait.as_millis()
            )));
        };
        parse_reply(&reply)
    }
}

/// `<outcome> <report JSON>` as the report script pushed it: the raw replies, or why not.
fn parse_reply(pushed: &str) -> Result<Vec<Option<String>>, ApiError> {
    let (outcome, report) = pushed.split_once(' ').unwrap_or((pushed, "{}"));
    let report: serde_json::Value = serde_json::from_str(report)
        .map_err(|e| ApiError::Unreachable(format!("the agent's report: {e}")))?;
    let result = &report["result"];
    match outcome {
        "finished" => match result["replies"].as_array() {
            // A settle's set not needed is `null`.
            Some(replies) => replies
                .iter()
                .map(|r| match r {
                    serde_json::Value::Null => Ok(None),
                    r => r.as_str().map(|r| Some(r.to_owned())).ok_or_else(|| {
                        ApiError::Unreachable("the agent's report has a reply not text".to_owned())
                    }),
                })
                .collect(),
            // An agent from before command sequences: the one reply.
            None => result["reply"]
                .as_str()
                .map(|r| vec![Some(r.to_owned())])
                .ok_or_else(|| ApiError::Unreachable("the agent's report has no reply".to_owned())),
        },
        "cancelled" => Err(ApiError::Unreachable(
            "the node's agent shut down before it answered".to_owned(),
        )),
        _ => {
            let code = result["error"]["code"].as_str().unwrap_or("ERR_INTERNAL");
            let message = result["error"]["message"].as_str().unwrap_or("");
            match code {
                // The socket, not HAProxy: worth another try.
                "ERR_UNREACHABLE" | "ERR_TIMEOUT" | "ERR_OVERLOADED" => Err(ApiError::Unreachable(
                    format!("the node's agent: {message}"),
                )),
                _ => Err(ApiError::Refused(format!(
                    "the node's agent refused: {code}: {message}"
                ))),
            }
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Transport for Relay {
    fn send<'a>(&'a self, command: &'a str) -> Reply<'a, String> {
        Box::pin(self.relay(command))
    }

    fn settle<'a>(
        &'a self,
        settle: &'a Settle,
        not_after: Instant,
    ) -> Reply<'a, Vec<Option<String>>> {
        Box::pin(self.relay_settle(settle, not_after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushed_replies_are_told_apart() {
        assert_eq!(
            parse_reply(r#"finished {"observations":[],"result":{"reply":"1\n# be\n"}}"#),
            Ok(vec![Some("1\n# be\n".to_owned())])
        );
        assert_eq!(
            parse_reply(r#"finished {"result":{"reply":"\n","replies":["\n",null,"1\n# be\n"]}}"#),
            Ok(vec![
                Some("\n".to_owned()),
                None,
                Some("1\n# be\n".to_owned())
            ])
        );
        assert!(matches!(
            parse_reply(r#"finished {"result":{"replies":["\n",3]}}"#),
            Err(ApiError::Unreachable(_))
        ));
        assert!(matches!(
            parse_reply(r#"failed {"result":{"error":{"code":"ERR_UNREACHABLE","message":"connecting: refused"}}}"#),
            Err(ApiError::Unreachable(m)) if m.contains("refused")
        ));
        assert!(matches!(
            parse_reply(r#"failed {"result":{"error":{"code":"ERR_FORBIDDEN","message":"no"}}}"#),
            Err(ApiError::Refused(_))
        ));
        assert!(matches!(
            parse_reply(r#"cancelled {"reason":"shutdown"}"#),
            Err(ApiError::Unreachable(_))
        ));
        assert!(matches!(
            parse_reply("finished not-json"),
            Err(ApiError::Unreachable(_))
        ));
    }
}
