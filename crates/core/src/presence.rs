//! Agent presence: heartbeats and the offline sweep, decided in Redis by two Lua scripts.
//!
//! Heartbeats are not events. A heartbeat moves the agent's deadline in the shard's
//! `heartbeats` sorted set; only a transition is an event: the first heartbeat of an agent
//! that is not online appends `agent.online` to the shard's presence stream, and the sweep
//! appends `agent.offline` for agents whose deadline passed by more than the grace period.
//! The scheduler's projector brings these into PostgreSQL.
//!
//! The current status and its version live in the shard's `presence` hash as
//! `<status>:<version>`. A transition's version is `max(previous + 1, now_ms)`: strictly
//! increasing per agent, and still above every version PostgreSQL has seen if Redis ever lost
//! the hash, so a stale projection is never pinned by a reset counter.
//!
//! After the control plane itself was down (Redis unreachable, or no sweeper for longer than
//! the grace period), the sweep waits one full grace period before marking anyone offline:
//! agents could not heartbeat through our outage, and must not be declared dead for it.
//! Event ids are made by the caller (UUID v7) and passed in, as the scripts cannot make them.

use redis::aio::ConnectionLike;
use uuid::Uuid;

use crate::keys::Keys;

const STATE: &str = include_str!("../scripts/presence_state.lua");

/// KEYS: heartbeats, presence, presence stream. ARGV: agent, now_ms, deadline_ms, event_id.
/// Returns {came_online (0/1, or -1 for a revoked agent: nothing moved), version}.
const HEARTBEAT: &str = include_str!("../scripts/presence_heartbeat.lua");

/// KEYS: heartbeats, presence, presence stream, sweeper. ARGV: now_ms, grace_ms, max,
/// event ids (max of them). Returns {marked offline, due, resuming (0/1)}.
const SWEEP: &str = include_str!("../scripts/presence_sweep.lua");

/// KEYS: heartbeats, presence, presence stream. ARGV: agent, now_ms, event_id, actor. Takes the
/// agent out of the heartbeats, marks it `revoked` (an online agent goes offline first, with
/// reason `revoked`). Returns 1, or 0 when it was revoked already.
const REVOKE: &str = include_str!("../scripts/presence_revoke.lua");

/// KEYS: presence. ARGV: agent. A revoked agent becomes offline again (it registered anew).
/// Returns 1 when it was revoked.
const REINSTATE: &str = include_str!("../scripts/presence_reinstate.lua");

/// What a heartbeat did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// The agent was not online and now is (an `agent.online` event was appended).
    pub came_online: bool,
    /// Its presence version.
    pub version: i64,
    /// The agent is revoked: the heartbeat was refused and moved nothing.
    pub revoked: bool,
}

/// What one sweep of one shard did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Agents marked offline.
    pub marked: u32,
    /// Agents whose deadline had passed (some may have been offline already).
    pub due: u32,
    /// The sweep is holding back after a control-plane outage.
    pub resuming: bool,
}

/// The presence scripts of one installation.
#[derive(Clone)]
pub struct Presence {
    keys: Keys,
    heartbeat: redis::Script,
    sweep: redis::Script,
    revoke: redis::Script,
    reinstate: redis::Script,
}

impl Presence {
    pub fn new(keys: Keys) -> Self {
        Self {
            keys,
            heartbeat: redis::Script::new(&format!("{STATE}{HEARTBEAT}")),
            sweep: redis::Script::new(&format!("{STATE}{SWEEP}")),
            revoke: redis::Script::new(&format!("{STATE}{REVOKE}")),
            reinstate: redis::Script::new(&format!("{STATE}{REINSTATE}")),
        }
    }

    /// The key builder.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Record a heartbeat: the agent's next deadline is `now_ms + interval_ms`.
    pub async fn heartbeat(
        &self,
        conn: &mut impl ConnectionLike,
        agent_id: &str,
        now_ms: i64,
        interval_ms: i64,
    ) -> redis::RedisResult<Beat> {
        let n = self.keys.shard_of(agent_id);
        let (came, version): (i64, i64) = self
            .heartbeat
            .key(self.keys.heartbeats(n))
            .key(self.keys.presence(n))
            .key(self.keys.presence_events(n))
            .arg(agent_id)
            .arg(now_ms)
            .arg(now_ms.saturating_add(interval_ms))
            .arg(Uuid::now_v7().to_string())
            .invoke_async(conn)
            .await?;
        Ok(Beat {
            came_online: came == 1,
            version,
            revoked: came == -1,
        })
    }

    /// Revoke an agent in Redis: no heartbeat of it counts from now on, and an online agent
    /// goes offline (`agent.offline`, reason `revoked`, by `actor`) so its unclaimed work is
    /// taken back. `false` when it was revoked already.
    pub async fn revoke(
        &self,
        conn: &mut impl ConnectionLike,
        agent_id: &str,
        now_ms: i64,
        actor: &str,
    ) -> redis::RedisResult<bool> {
        let n = self.keys.shard_of(agent_id);
        let done: i64 = self
            .revoke
            .key(self.keys.heartbeats(n))
            .key(self.keys.presence(n))
            .key(self.keys.presence_events(n))
            .arg(agent_id)
            .arg(now_ms)
            .arg(Uuid::now_v7().to_string())
            .arg(actor)
            .invoke_async(conn)
            .await?;
        Ok(done == 1)
    }

    /// Undo [`Presence::revoke`] (the agent registered again, approved): it is offline until
    /// its next heartbeat. `false` when it was not revoked.
    pub async fn reinstate(
        &self,
        conn: &mut impl ConnectionLike,
        agent_id: &str,
    ) -> redis::RedisResult<bool> {
        let n = self.keys.shard_of(agent_id);
        let done: i64 = self
            .reinstate
            .key(self.keys.presence(n))
            .arg(agent_id)
            .invoke_async(conn)
            .await?;
        Ok(done == 1)
    }

    /// Mark agents of shard `n` offline whose deadline passed more than `grace_ms` ago, at most
    /// `max` of them.
    pub async fn sweep(
        &self,
        conn: &mut impl ConnectionLike,
        n: u32,
        now_ms: i64,
        grace_ms: i64,
        max: u32,
    ) -> redis::RedisResult<Sweep> {
        let mut invocation = self.sweep.prepare_invoke();
        invocation
            .key(self.keys.heartbeats(n))
            .key(self.keys.presence(n))
            .key(self.keys.presence_events(n))
            .key(self.keys.sweeper(n))
            .arg(now_ms)
            .arg(grace_ms)
            .arg(max);
        for _ in 0..max {
            invocation.arg(Uuid::now_v7().to_string());
        }
        let (marked, due, resuming): (u32, u32, i64) = invocation.invoke_async(conn).await?;
        Ok(Sweep {
            marked,
            due,
            resuming: resuming == 1,
        })
    }
}
