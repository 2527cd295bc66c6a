//! The dead-letter streams: tasks delivered more than `MAX_DELIVERIES` times.
//!
//! The claim script moves such a task's entry from its agent's task stream to its shard's
//! `dlq:{s<n>}` stream (with the agent, kind, original entry id, reason and delivery count,
//! then the task's own fields: `task` for a check's, and `spec`) and appends
//! `task.dead_lettered`. A check's slot then waits (status `retrying`, outcome
//! `dead_lettered`) for an admin until its deadline. A dead letter's id in the API is
//! `s<shard>-<entry id>`.
//!
//! This module reads and removes entries; putting a check's task back to work is a new
//! attempt of its slot (the gateway records `check.slot_retried`), an anonymous task (tests,
//! benchmarks) is added to its agent's stream again by [`Parked::requeue_anonymous`], atomically
//! with its removal from the dead letters.

use redis::aio::ConnectionLike;
use redis::streams::{StreamId, StreamRangeReply};

use crate::keys::Keys;

/// One dead-lettered task.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// `s<shard>-<entry id>`.
    pub id: String,
    #[serde(skip)]
    pub shard: u32,
    #[serde(skip)]
    pub entry: String,
    pub agent_id: String,
    pub kind: String,
    /// The task's id (`<check>:<slot>:<attempt>` for a check's).
    pub task: Option<String>,
    pub reason: String,
    pub deliveries: u32,
    /// When it was dead-lettered (ms since the epoch, from its entry id).
    pub at_ms: i64,
    /// The task spec (JSON text) it carried.
    #[serde(skip)]
    pub spec: Option<String>,
}

/// A dead letter's id taken apart: (shard, entry), or `None` when it is not one of ours.
pub fn parse_id(keys: &Keys, id: &str) -> Option<(u32, String)> {
    let rest = id.strip_prefix('s')?;
    let (shard, entry) = rest.split_once('-')?;
    let shard: u32 = shard.parse().ok()?;
    let (ms, seq) = entry.split_once('-')?;
    // Stream ids are two u64s: anything else Redis would refuse (an error, not an absence).
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let valid = shard < keys.shards()
        && digits(ms)
        && digits(seq)
        && ms.parse::<u64>().is_ok()
        && seq.parse::<u64>().is_ok();
    valid.then(|| (shard, entry.to_owned()))
}

fn field(entry: &StreamId, name: &str) -> Option<String> {
    entry
        .map
        .get(name)
        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
}

fn decode(shard: u32, entry: &StreamId) -> DeadLetter {
    let at_ms = entry
        .id
        .split_once('-')
        .and_then(|(ms, _)| ms.parse().ok())
        .unwrap_or(0);
    DeadLetter {
        id: format!("s{shard}-{}", entry.id),
        shard,
        entry: entry.id.clone(),
        agent_id: field(entry, "agent").unwrap_or_default(),
        kind: field(entry, "kind").unwrap_or_default(),
        task: field(entry, "task"),
        reason: field(entry, "reason").unwrap_or_default(),
        deliveries: field(entry, "deliveries")
            .and_then(|d| d.parse().ok())
            .unwrap_or(0),
        at_ms,
        spec: field(entry, "spec"),
    }
}

/// KEYS: dlq, the agent's task stream. ARGV: dlq entry, spec, agent, wake channel. Moves an
/// anonymous task back to its agent's stream (a new entry, its deliveries counted afresh),
/// once: 0 when the dead letter is gone already.
const REQUEUE: &str = include_str!("../scripts/dead_letter_requeue.lua");

/// The dead letters of one installation.
#[derive(Clone)]
pub struct Parked {
    keys: Keys,
    requeue: redis::Script,
}

impl Parked {
    pub fn new(keys: Keys) -> Self {
        Self {
            keys,
            requeue: redis::Script::new(REQUEUE),
        }
    }

    /// How many dead letters there are, in all shards.
    pub async fn count(&self, conn: &mut impl ConnectionLike) -> redis::RedisResult<u64> {
        let mut pipe = redis::pipe();
        for n in 0..self.keys.shards() {
            pipe.cmd("XLEN").arg(self.keys.dlq(n));
        }
        let lengths: Vec<u64> = pipe.query_async(conn).await?;
        Ok(lengths.iter().sum())
    }

    /// A page of the dead letters, newest first, and how many there are.
    pub async fn list(
        &self,
        conn: &mut impl ConnectionLike,
        limit: usize,
        offset: usize,
    ) -> redis::RedisResult<(Vec<DeadLetter>, u64)> {
        let total = self.count(conn).await?;
        // The newest `offset + limit` of each shard hold the page (dead-letter streams are
        // capped, so this is bounded).
        let mut pipe = redis::pipe();
        for n in 0..self.keys.shards() {
            pipe.cmd("XREVRANGE")
                .arg(self.keys.dlq(n))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(offset + limit);
        }
        let shards: Vec<StreamRangeReply> = pipe.query_async(conn).await?;
        let mut all: Vec<DeadLetter> = shards
            .iter()
            .zip(0..)
            .flat_map(|(reply, n)| reply.ids.iter().map(move |e| decode(n, e)))
            .collect();
        let order = |d: &DeadLetter| {
            let (ms, seq) = d.entry.split_once('-').unwrap_or(("0", "0"));
            (
                ms.parse::<u64>().unwrap_or(0),
                seq.parse::<u64>().unwrap_or(0),
                d.shard,
            )
        };
        all.sort_by_key(|d| std::cmp::Reverse(order(d)));
        Ok((all.into_iter().skip(offset).take(limit).collect(), total))
    }

    /// The dead letter `id`, if there is one.
    pub async fn get(
        &self,
        conn: &mut impl ConnectionLike,
        id: &str,
    ) -> redis::RedisResult<Option<DeadLetter>> {
        let Some((shard, entry)) = parse_id(&self.keys, id) else {
            return Ok(None);
        };
        let found: StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.keys.dlq(shard))
            .arg(&entry)
            .arg(&entry)
            .query_async(conn)
            .await?;
        Ok(found.ids.first().map(|e| decode(shard, e)))
    }

    /// Take the right to act on `letter` (requeue or drop) for up to 30 s: `false` when
    /// another request holds it. Whoever holds it finds the letter there or gone for good.
    pub async fn claim(
        &self,
        conn: &mut impl ConnectionLike,
        letter: &DeadLetter,
    ) -> redis::RedisResult<bool> {
        let taken: Option<String> = redis::cmd("SET")
            .arg(self.keys.dlq_claim(letter.shard, &letter.entry))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(30_000)
            .query_async(conn)
            .await?;
        Ok(taken.is_some())
    }

    /// Give back what [`Parked::claim`] took.
    pub async fn release(
        &self,
        conn: &mut impl ConnectionLike,
        letter: &DeadLetter,
    ) -> redis::RedisResult<()> {
        redis::cmd("DEL")
            .arg(self.keys.dlq_claim(letter.shard, &letter.entry))
            .query_async(conn)
            .await
    }

    /// Remove a dead letter; `false` when it was gone already.
    pub async fn remove(
        &self,
        conn: &mut impl ConnectionLike,
        letter: &DeadLetter,
    ) -> redis::RedisResult<bool> {
        let removed: i64 = redis::cmd("XDEL")
            .arg(self.keys.dlq(letter.shard))
            .arg(&letter.entry)
            .query_async(conn)
            .await?;
        Ok(removed == 1)
    }

    /// Put an anonymous task (no task id) back on its agent's stream and ring the agent's
    /// doorbell, removing it from the dead letters in the same step; `false` when it was
    /// gone already.
    pub async fn requeue_anonymous(
        &self,
        conn: &mut impl ConnectionLike,
        letter: &DeadLetter,
    ) -> redis::RedisResult<bool> {
        let moved: i64 = self
            .requeue
            .key(self.keys.dlq(letter.shard))
            .key(self.keys.tasks(&letter.agent_id, &letter.kind))
            .arg(&letter.entry)
            .arg(letter.spec.as_deref().unwrap_or("{}"))
            .arg(&letter.agent_id)
            .arg(self.keys.wake(letter.shard))
            .invoke_async(conn)
            .await?;
        Ok(moved == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_a_known_shard_and_a_stream_id_of_two_u64s() {
        let keys = Keys::new("cp", 4);
        assert_eq!(
            parse_id(&keys, "s3-1700000000000-7"),
            Some((3, "1700000000000-7".into()))
        );
        for bad in [
            "s4-1-0",
            "s0-99999999999999999999-0",
            "s0-1-99999999999999999999",
            "s0-+1-0",
            "s0-1",
            "0-1-0",
            "s-1-0",
            "s0--0",
            "",
        ] {
            assert_eq!(parse_id(&keys, bad), None, "{bad}");
        }
    }
}
