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

const STATE: &str = r#"
local function state(hash, agent)
  local s = redis.call('HGET', hash, agent)
  if not s then return 'registered', 0 end
  local sep = string.find(s, ':', 1, true)
  return string.sub(s, 1, sep - 1), tonumber(string.sub(s, sep + 1))
end
local function event(id, agent, version, now, status, reason, actor)
  return cjson.encode({event_id = id, aggregate_id = 'presence:' .. agent, version = version,
    occurred_at = now, actor = actor, schema = 1, type = 'agent.' .. status,
    payload = {agent_id = agent, reason = reason}})
end
"#;

/// KEYS: heartbeats, presence, presence stream. ARGV: agent, now_ms, deadline_ms, event_id.
/// Returns {came_online (0/1), version}.
const HEARTBEAT: &str = r#"
local agent, now = ARGV[1], tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], agent)
local status, version = state(KEYS[2], agent)
if status == 'online' then return {0, version} end
version = math.max(version + 1, now)
redis.call('HSET', KEYS[2], agent, 'online:' .. version)
redis.call('XADD', KEYS[3], '*', 'event',
  event(ARGV[4], agent, version, now, 'online', 'heartbeat', 'agent:' .. agent))
return {1, version}
"#;

/// KEYS: heartbeats, presence, presence stream, sweeper. ARGV: now_ms, grace_ms, max,
/// event ids (max of them). Returns {marked offline, due, resuming (0/1)}.
const SWEEP: &str = r#"
local now, grace, max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local last = tonumber(redis.call('HGET', KEYS[4], 'last_run') or '0')
local resumed = tonumber(redis.call('HGET', KEYS[4], 'resumed_at') or '0')
if now - last > grace then
  resumed = now
  redis.call('HSET', KEYS[4], 'resumed_at', now)
end
redis.call('HSET', KEYS[4], 'last_run', now)
if now - resumed < grace then return {0, 0, 1} end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - grace, 'LIMIT', 0, max)
local marked = 0
for _, agent in ipairs(due) do
  redis.call('ZREM', KEYS[1], agent)
  local status, version = state(KEYS[2], agent)
  if status == 'online' then
    marked = marked + 1
    version = math.max(version + 1, now)
    redis.call('HSET', KEYS[2], agent, 'offline:' .. version)
    redis.call('XADD', KEYS[3], '*', 'event',
      event(ARGV[3 + marked], agent, version, now, 'offline', 'missed_heartbeat', 'system:scheduler'))
  end
end
return {marked, #due, 0}
"#;

/// What a heartbeat did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// The agent was not online and now is (an `agent.online` event was appended).
    pub came_online: bool,
    /// Its presence version.
    pub version: i64,
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
}

impl Presence {
    pub fn new(keys: Keys) -> Self {
        Self {
            keys,
            heartbeat: redis::Script::new(&format!("{STATE}{HEARTBEAT}")),
            sweep: redis::Script::new(&format!("{STATE}{SWEEP}")),
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
        })
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
