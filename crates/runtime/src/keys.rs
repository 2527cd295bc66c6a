//! Every Redis key name checkplane uses, built here and nowhere else.
//!
//! All keys start with the installation's prefix (`STREAM_PREFIX`, default `cp`), so one Redis
//! can hold several installations and every test its own.
//!
//! Per-agent state is sharded: shard n = crc32(agent id) mod `STREAM_SHARDS` (fixed at
//! install). Every key of shard n carries the hash tag `{s<n>}`, so on Redis Cluster all of a
//! shard's keys live in one slot and one Lua script may touch them together. Scripts receive
//! every key they touch in `KEYS` (never built inside the script), which is what Redis
//! Cluster requires to route a script and what keeps the naming in this one module.
//!
//! | key | type | what |
//! |---|---|---|
//! | `<p>:events:<domain>` | stream | edge events (`agents`, `checks`, `haproxy`, `admin`) |
//! | `<p>:events:presence:{s<n>}` | stream | `agent.online` / `agent.offline` of shard n |
//! | `<p>:heartbeats:{s<n>}` | sorted set | agent id by heartbeat deadline (ms) |
//! | `<p>:presence:{s<n>}` | hash | agent id → `<status>:<version>` (online/offline) |
//! | `<p>:sweeper:{s<n>}` | hash | `last_run`, `resumed_at` (ms) of the presence sweep |

/// Key builder for one installation.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    shards: u32,
}

/// Stream domains of edge events.
pub const DOMAINS: [&str; 4] = ["agents", "checks", "haproxy", "admin"];

impl Keys {
    pub fn new(prefix: impl Into<String>, shards: u32) -> Self {
        Self {
            prefix: prefix.into(),
            shards: shards.max(1),
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Number of shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard an agent belongs to.
    pub fn shard_of(&self, agent_id: &str) -> u32 {
        crc32fast::hash(agent_id.as_bytes()) % self.shards
    }

    /// Stream of edge events of one domain.
    pub fn events(&self, domain: &str) -> String {
        format!("{}:events:{domain}", self.prefix)
    }

    /// Stream of presence events of shard `n`.
    pub fn presence_events(&self, n: u32) -> String {
        format!("{}:events:presence:{{s{n}}}", self.prefix)
    }

    /// Heartbeat deadlines of shard `n`.
    pub fn heartbeats(&self, n: u32) -> String {
        format!("{}:heartbeats:{{s{n}}}", self.prefix)
    }

    /// Presence state of shard `n`.
    pub fn presence(&self, n: u32) -> String {
        format!("{}:presence:{{s{n}}}", self.prefix)
    }

    /// Sweep bookkeeping of shard `n`.
    pub fn sweeper(&self, n: u32) -> String {
        format!("{}:sweeper:{{s{n}}}", self.prefix)
    }

    /// Every stream the projector consumes.
    pub fn projected_streams(&self) -> Vec<String> {
        let mut streams: Vec<String> = DOMAINS.iter().map(|d| self.events(d)).collect();
        streams.extend((0..self.shards).map(|n| self.presence_events(n)));
        streams
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_keys_share_one_hash_tag() {
        let keys = Keys::new("cp", 4);
        let n = keys.shard_of("agent-1");
        assert!(n < 4);
        let tag = format!("{{s{n}}}");
        for key in [
            keys.heartbeats(n),
            keys.presence(n),
            keys.presence_events(n),
            keys.sweeper(n),
        ] {
            assert!(key.starts_with("cp:"), "{key}");
            assert!(key.contains(&tag), "{key}");
        }
    }

    #[test]
    fn sharding_is_crc32_mod_shards() {
        let keys = Keys::new("cp", 7);
        assert_eq!(keys.shard_of("abc"), crc32fast::hash(b"abc") % 7);
    }
}
