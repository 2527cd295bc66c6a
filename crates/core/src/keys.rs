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
//! | `<p>:tasks:{s<n>}:<agent>:<kind>` | stream | tasks for one agent and kind; group `agents` |
//! | `<p>:events:leases:{s<n>}` | stream | lease events of shard n |
//! | `<p>:leases:{s<n>}` | sorted set | live lease tokens by deadline (ms) |
//! | `<p>:leasever:{s<n>}` | hash | per-task event version counter |
//! | `<p>:closed:{s<n>}:<agent>:<kind>:<entry>` | string | tombstone: `closed` or `lost` |
//! | `<p>:claims:{s<n>}:<agent>:<request_id>` | string | the reply to a claim, for retries |
//! | `<p>:reported:{s<n>}:<token>` | string | the reply to a report, for retries |
//! | `<p>:relay:{s<n>}:<agent>:<kind>:<entry>` | list | a relayed task's result, for its waiting asker |
//! | `<p>:dlq:{s<n>}` | stream | tasks over the delivery limit, with the reason |
//! | `<p>:dlqclaim:{s<n>}:<entry>` | string | an admin request acting on that dead letter, until it is done (30 s at most) |
//! | `<p>:haproxy:owner:<instance>` | string | `<replica>/<token>`: who owns an HAProxy instance, until it expires |
//! | `<p>:haproxy:fence:<instance>` | string | counter: the fencing token of the next owner |
//! | `<p>:wake:{s<n>}` | pub/sub | doorbell: an agent id whose tasks stream got work |
//! | `<p>:live:<check>` | pub/sub | the check id, after a projector commit moved its slots |
//! | `<p>:rate:<endpoint>:<caller>` | string | a rate limit's theoretical arrival time (ms, Redis's clock), until it passes |

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

    /// The haproxy-sync replica that owns an HAProxy instance (a lease: its value is the
    /// owner, its expiry the end of the claim).
    pub fn haproxy_owner(&self, instance: &str) -> String {
        format!("{}:haproxy:owner:{instance}", self.prefix)
    }

    /// The fencing counter of an HAProxy instance: each new owner takes the next number.
    pub fn haproxy_fence(&self, instance: &str) -> String {
        format!("{}:haproxy:fence:{instance}", self.prefix)
    }

    /// A forced sync of an HAProxy instance, asked for and not yet started.
    pub fn haproxy_sync_request(&self, instance: &str) -> String {
        format!("{}:haproxy:sync:{instance}", self.prefix)
    }

    /// Stream of presence events of shard `n`.
    pub fn presence_events(&self, n: u32) -> String {
        format!("{}:events:presence:{{s{n}}}", self.prefix)
    }

    /// Set by the scheduler while Redis keeps its data: missing, Redis lost it (or is new),
    /// and the scheduler puts open work back (`fanout::requeue_open_slots`).
    pub fn sentinel(&self) -> String {
        format!("{}:sentinel", self.prefix)
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

    /// Task stream of one agent and kind.
    pub fn tasks(&self, agent: &str, kind: &str) -> String {
        format!(
            "{}:tasks:{{s{}}}:{agent}:{kind}",
            self.prefix,
            self.shard_of(agent)
        )
    }

    /// Lease events of shard `n`.
    pub fn lease_events(&self, n: u32) -> String {
        format!("{}:events:leases:{{s{n}}}", self.prefix)
    }

    /// Live leases of shard `n`, by deadline.
    pub fn leases(&self, n: u32) -> String {
        format!("{}:leases:{{s{n}}}", self.prefix)
    }

    /// Per-task event versions of shard `n`.
    pub fn lease_versions(&self, n: u32) -> String {
        format!("{}:leasever:{{s{n}}}", self.prefix)
    }

    /// Tombstone of one task entry.
    pub fn closed(&self, agent: &str, kind: &str, entry: &str) -> String {
        format!(
            "{}:closed:{{s{}}}:{agent}:{kind}:{entry}",
            self.prefix,
            self.shard_of(agent)
        )
    }

    /// Where a task (by its id, `<check>:<slot>:<attempt>`) was enqueued for `agent`: its
    /// entry id, or `closed` when it was closed before it was enqueued. Makes fan-out
    /// idempotent and lets a task be closed by id.
    pub fn task_ref(&self, agent: &str, task: &str) -> String {
        format!(
            "{}:taskref:{{s{}}}:{task}",
            self.prefix,
            self.shard_of(agent)
        )
    }

    /// The remembered reply to one claim request.
    pub fn claim_reply(&self, agent: &str, request_id: &str) -> String {
        format!(
            "{}:claims:{{s{}}}:{agent}:{request_id}",
            self.prefix,
            self.shard_of(agent)
        )
    }

    /// The remembered reply to the report of one lease.
    pub fn reported(&self, agent: &str, token: &str) -> String {
        format!(
            "{}:reported:{{s{}}}:{token}",
            self.prefix,
            self.shard_of(agent)
        )
    }

    /// Where the result of a relayed task (kind `haproxy`: a Runtime API command carried by
    /// the node's agent) is pushed for the haproxy-sync waiting on it.
    pub fn relay_reply(&self, agent: &str, kind: &str, entry: &str) -> String {
        format!(
            "{}:relay:{{s{}}}:{agent}:{kind}:{entry}",
            self.prefix,
            self.shard_of(agent)
        )
    }

    /// Dead letters of shard `n`.
    pub fn dlq(&self, n: u32) -> String {
        format!("{}:dlq:{{s{n}}}", self.prefix)
    }

    /// Held (briefly) by the admin request acting on one dead letter, so that two never act
    /// on the same one at once.
    pub fn dlq_claim(&self, n: u32, entry: &str) -> String {
        format!("{}:dlqclaim:{{s{n}}}:{entry}", self.prefix)
    }

    /// Live channel of `check`: its id is published there after a projector commit moved
    /// its slots, so live readers look now rather than at their next poll.
    pub fn live(&self, check: &uuid::Uuid) -> String {
        format!("{}:live:{check}", self.prefix)
    }

    /// The rate limit state of one caller at one endpoint (operational, not an event).
    pub fn rate(&self, endpoint: &str, caller: &str) -> String {
        format!("{}:rate:{endpoint}:{caller}", self.prefix)
    }

    /// The channel on which gateways tell each other to forget cached credentials
    /// (`agent:<id>` after a rotation, `key:<key_id>` after a revocation).
    pub fn auth_invalidations(&self) -> String {
        format!("{}:auth", self.prefix)
    }

    /// The pattern of every check's live channel.
    pub fn live_pattern(&self) -> String {
        format!("{}:live:*", self.prefix)
    }

    /// Doorbell channel of shard `n`.
    pub fn wake(&self, n: u32) -> String {
        format!("{}:wake:{{s{n}}}", self.prefix)
    }

    /// Every stream the projector consumes.
    pub fn projected_streams(&self) -> Vec<String> {
        let mut streams: Vec<String> = DOMAINS.iter().map(|d| self.events(d)).collect();
        streams.extend((0..self.shards).map(|n| self.presence_events(n)));
        streams.extend((0..self.shards).map(|n| self.lease_events(n)));
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
