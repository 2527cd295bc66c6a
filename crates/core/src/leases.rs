//! The lease protocol's Redis side: claim, extend, report and close, one Lua script each.
//!
//! A lease is a task entry pending in the `agents` group of the agent's task stream
//! (`tasks:{s<n>}:<agent>:<kind>`) under the agent's consumer name. Its token is
//! `<agent>.<kind>.<entry>.<epoch>`, the epoch being Redis's delivery count of the entry. Every
//! script receives every key it touches in `KEYS`, all of one shard's hash tag, so the scripts
//! run unchanged on Redis Cluster.
//!
//! - **claim**: a repeated `request_id` returns the remembered reply. Otherwise, per kind:
//!   `XAUTOCLAIM` of the agent's own entries idle longer than the lease TTL (lost by a gateway
//!   crash or an agent restart: they come back with the next epoch), then `XREADGROUP >` up to
//!   the capacity asked. An entry delivered more than `max_deliveries` times goes to the DLQ
//!   (`task.dead_lettered`) instead. Each lease is recorded in the shard's `leases` set by
//!   deadline and announced with `lease.granted`.
//! - **extend** / **report**: fenced on owner and epoch. A token whose entry is pending with
//!   another consumer or another delivery count is `ERR_LEASE_LOST`; a tombstoned entry is
//!   `ERR_LEASE_CLOSED` (or `ERR_LEASE_LOST` when recovery took it); no such entry is
//!   `ERR_LEASE_UNKNOWN`. A lease that merely passed its deadline, but that nobody took, is
//!   still valid. Extend is `XCLAIM ... JUSTID` (idle reset, no delivery counted); report
//!   `XACK`s and deletes the entry, removes the lease, appends `lease.reported` with the result, and remembers its
//!   answer so a repeated report gets the same one.
//! - **close** (deadline, cancel): acknowledges and deletes the entry and leaves a tombstone,
//!   so a later report is fenced and the slot never gets two outcomes.
//!
//! Event ids (UUID v7) are made by the caller and passed in.

use redis::aio::ConnectionLike;
use uuid::Uuid;

use crate::keys::Keys;
use checkplane_wire::leases::LeaseToken;
use checkplane_wire::ErrorCode;

const COMMON: &str = include_str!("../scripts/lease_common.lua");

/// KEYS: (task stream, task ref)*, all of one shard. ARGV: wake channel, task ref TTL ms, then
/// (spec, agent, task id or empty)* in the order of the keys. Per task: a task id already
/// enqueued (or closed before it was) is not added again, and its answer is its entry id (or
/// `closed`). Otherwise creates the stream with its `agents` group when it is the first task
/// (only this script makes task streams, always with the group; claim reads a stream that
/// does not exist yet as empty), appends the task, remembers where, and rings the agent's
/// doorbell. Returns the answers in order. (Neither this nor claim lets a command fail as a
/// way of asking: Redis counts every such error in `INFO errorstats`, where operators look for
/// real ones. The fence's XPENDING still fails for a token naming a stream that never
/// existed, a client's mistake, and is not worth a command on every report.)
const ENQUEUE: &str = include_str!("../scripts/lease_enqueue.lua");

/// Tasks one enqueue script adds at most: a script holds Redis while it runs.
const ENQUEUE_BATCH: usize = 128;

/// KEYS: task ref. ARGV: ttl ms. Marks a task closed before it was enqueued, so a late
/// fan-out does not add it; returns the entry id when it was enqueued already.
const CLOSE_UNSENT: &str = include_str!("../scripts/lease_close_unsent.lua");

/// KEYS: leases, lease events, claim reply, dlq, versions, then one task stream per kind, then
/// the shard's presence (a revoked agent is granted nothing). ARGV: agent, now, ttl_ms, max_deliveries, reply_ttl_ms, n_kinds, (kind, count)*, event ids.
const CLAIM: &str = include_str!("../scripts/lease_claim.lua");

/// KEYS: leases, lease events, versions, then (task stream, tombstone) per token.
/// ARGV: agent, now, ttl_ms, event id, then (token, entry, epoch) per token.
/// Returns per token the new deadline or an error code.
const EXTEND: &str = include_str!("../scripts/lease_extend.lua");

/// KEYS: leases, lease events, versions, then (task stream, tombstone, reported reply, relay
/// list) per report. ARGV: agent, now, reply_ttl_ms, then (token, entry, epoch, kind, event id,
/// outcome, result JSON) per report. Returns per report `acknowledged` or the fence's error
/// code. The result of a relayed kind (`haproxy`) goes to its relay list, where its asker
/// waits, and only its size into the event: a Runtime API reply is the asker's business, not
/// history.
const REPORT: &str = include_str!("../scripts/lease_report.lua");

/// KEYS: leases, lease events, versions, task stream, tombstone.
/// ARGV: agent, kind, entry, now, event id, reason, tombstone value, tombstone_ttl_ms,
/// task id (or empty).
/// Returns 1 when the task was open and is now closed; when it had ended already (reported,
/// closed, expired, dead-lettered), the id of the newest entry of the lease events stream
/// (`0-0` for none): the event that ended it is at or below it.
const CLOSE: &str = include_str!("../scripts/lease_close.lua");

/// KEYS: leases, lease events, versions, task stream, tombstone, heartbeats.
/// ARGV: token, agent, kind, entry, epoch, now, event id, tombstone_ttl_ms, and for a revoked
/// agent `revoked` and the actor (its leases end whatever their deadline and heartbeat).
/// Returns `expired`, `stale` (no longer that delivery: just forgotten), `alive` (the agent
/// still heartbeats: its late report stays welcome) or `not_due`.
const RECOVER: &str = include_str!("../scripts/lease_recover.lua");

/// What one recovery pass over a shard did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Leases taken from silent agents (`lease.expired`).
    pub expired: u32,
    /// Past their deadline, but their agents still heartbeat.
    pub alive: u32,
    /// Entries no longer at that delivery, or malformed: dropped from the set.
    pub stale: u32,
}

/// A lease granted by a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub token: String,
    pub kind: String,
    /// When the lease ends without an extension (ms); a replayed claim keeps the original.
    pub deadline_ms: i64,
    /// The task entry's fields.
    pub fields: Vec<(String, String)>,
}

/// Where a report or an extension stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fenced<T> {
    Ok(T),
    Refused(LeaseRefusal),
}

/// Why the fence refused a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseRefusal {
    /// Another consumer holds the entry, or it was delivered again since.
    Lost,
    /// The task was closed (deadline, cancel).
    Closed,
    /// No such task.
    Unknown,
}

impl LeaseRefusal {
    /// Its code on the wire.
    pub fn code(self) -> ErrorCode {
        match self {
            Self::Lost => ErrorCode::LeaseLost,
            Self::Closed => ErrorCode::LeaseClosed,
            Self::Unknown => ErrorCode::LeaseUnknown,
        }
    }

    /// A script's refusal, by its wire code.
    fn from_script(reply: &str) -> redis::RedisResult<Self> {
        match reply.parse::<ErrorCode>() {
            Ok(ErrorCode::LeaseLost) => Ok(Self::Lost),
            Ok(ErrorCode::LeaseClosed) => Ok(Self::Closed),
            Ok(ErrorCode::LeaseUnknown) => Ok(Self::Unknown),
            _ => Err(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "a lease script answered neither a result nor a refusal",
                reply.to_owned(),
            ))),
        }
    }
}

/// One task entry.
#[derive(Debug, Clone, Copy)]
pub struct TaskRef<'a> {
    pub agent: &'a str,
    pub kind: &'a str,
    pub entry: &'a str,
    /// The task's id, carried into `lease.closed` (empty for tasks without one).
    pub task: &'a str,
}

/// What closing a task by its id did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskClosed {
    /// It was open and is closed now: its `lease.closed` is on the lease stream.
    Closed,
    /// It was closed before it was sent (its close was marked already): no event was made.
    Already,
    /// Its entry was ended before (reported, closed, expired or dead-lettered): the event that
    /// ended it is on the shard's lease stream at or below `tip` (read in the same script),
    /// perhaps not projected yet.
    Ended { tip: String },
    /// It had not been sent: a mark now keeps a late fan-out from adding it, and no event
    /// was made.
    Unsent,
}

/// Why a task is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The check's deadline passed.
    Timeout,
    /// An operator cancelled the check.
    Cancelled,
    /// Recovery took the lease of an agent that went silent.
    LeaseExpired,
    /// The agent went offline before it took the task: the slot is retried elsewhere.
    Offline,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::LeaseExpired => "lease_expired",
            Self::Offline => "offline",
        }
    }

    fn tombstone(self) -> &'static str {
        match self {
            Self::LeaseExpired => "lost",
            Self::Timeout | Self::Cancelled | Self::Offline => "closed",
        }
    }
}

/// Settings of the lease scripts.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// `LEASE_TTL` in ms.
    pub ttl_ms: i64,
    /// `MAX_DELIVERIES`.
    pub max_deliveries: u32,
    /// How long claim and report replies are remembered for retries.
    pub reply_ttl_ms: i64,
    /// How long tombstones are kept.
    pub tombstone_ttl_ms: i64,
}

impl LeaseSettings {
    /// `ttl_ms` and `max_deliveries`, with claim and report replies remembered for ten minutes
    /// and tombstones kept for a day.
    pub fn new(ttl_ms: i64, max_deliveries: u32) -> Self {
        Self {
            ttl_ms,
            max_deliveries,
            reply_ttl_ms: 10 * 60 * 1000,
            tombstone_ttl_ms: 24 * 3600 * 1000,
        }
    }
}

/// A task to add to an agent's stream (see [`Leases::enqueue_tasks`]).
#[derive(Debug, Clone, Copy)]
pub struct NewTask<'a> {
    pub agent: &'a str,
    pub kind: &'a str,
    /// `<check>:<slot>:<attempt>`, added once; empty for an anonymous task (tests, benchmarks).
    pub task: &'a str,
    /// The task spec, JSON.
    pub spec: &'a str,
}

fn empty_answer() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Parse,
        "the enqueue script answered fewer entries than it was given tasks",
    ))
}

/// The lease scripts of one installation.
#[derive(Clone)]
pub struct Leases {
    keys: Keys,
    settings: LeaseSettings,
    claim: redis::Script,
    extend: redis::Script,
    report: redis::Script,
    close: redis::Script,
    recover: redis::Script,
    enqueue: redis::Script,
    close_unsent: redis::Script,
}

impl Leases {
    pub fn new(keys: Keys, settings: LeaseSettings) -> Self {
        Self {
            keys,
            settings,
            claim: redis::Script::new(&format!("{COMMON}{CLAIM}")),
            extend: redis::Script::new(&format!("{COMMON}{EXTEND}")),
            report: redis::Script::new(&format!("{COMMON}{REPORT}")),
            close: redis::Script::new(&format!("{COMMON}{CLOSE}")),
            recover: redis::Script::new(&format!("{COMMON}{RECOVER}")),
            enqueue: redis::Script::new(ENQUEUE),
            close_unsent: redis::Script::new(CLOSE_UNSENT),
        }
    }

    /// Claim up to `count` tasks per kind for `agent`; a repeated `request_id` returns the
    /// same leases.
    pub async fn claim(
        &self,
        conn: &mut impl ConnectionLike,
        agent: &str,
        request_id: &str,
        capacities: &[(&str, u32)],
        now_ms: i64,
    ) -> redis::RedisResult<Vec<Granted>> {
        let n = self.keys.shard_of(agent);
        let mut inv = self.claim.prepare_invoke();
        inv.key(self.keys.leases(n))
            .key(self.keys.lease_events(n))
            .key(self.keys.claim_reply(agent, request_id))
            .key(self.keys.dlq(n))
            .key(self.keys.lease_versions(n));
        for (kind, _) in capacities {
            inv.key(self.keys.tasks(agent, kind));
        }
        inv.key(self.keys.presence(n));
        inv.arg(agent)
            .arg(now_ms)
            .arg(self.settings.ttl_ms)
            .arg(self.settings.max_deliveries)
            .arg(self.settings.reply_ttl_ms)
            .arg(capacities.len());
        let mut total = 0;
        for (kind, count) in capacities {
            inv.arg(*kind).arg(*count);
            total += count;
        }
        for _ in 0..total {
            inv.arg(Uuid::now_v7().to_string());
        }
        let reply: String = inv.invoke_async(conn).await?;
        let parsed: Vec<serde_json::Value> = serde_json::from_str(&reply).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Parse, "claim reply", e.to_string()))
        })?;
        Ok(parsed
            .into_iter()
            .map(|v| {
                let fields = v["fields"]
                    .as_array()
                    .map(|f| {
                        f.chunks(2)
                            .filter_map(|p| {
                                Some((
                                    p.first()?.as_str()?.to_owned(),
                                    p.get(1)?.as_str()?.to_owned(),
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Granted {
                    token: v["token"].as_str().unwrap_or_default().to_owned(),
                    kind: v["kind"].as_str().unwrap_or_default().to_owned(),
                    deadline_ms: v["deadline"].as_i64().unwrap_or_default(),
                    fields,
                }
            })
            .collect())
    }

    /// Extend the leases of `tokens` (all of `agent`): per token the new deadline (ms) or the
    /// fence's refusal.
    pub async fn extend(
        &self,
        conn: &mut impl ConnectionLike,
        agent: &str,
        tokens: &[LeaseToken],
        now_ms: i64,
    ) -> redis::RedisResult<Vec<Fenced<i64>>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let n = self.keys.shard_of(agent);
        let mut inv = self.extend.prepare_invoke();
        inv.key(self.keys.leases(n))
            .key(self.keys.lease_events(n))
            .key(self.keys.lease_versions(n));
        for t in tokens {
            inv.key(self.keys.tasks(agent, t.kind))
                .key(self.keys.closed(agent, t.kind, &t.entry));
        }
        inv.arg(agent)
            .arg(now_ms)
            .arg(self.settings.ttl_ms)
            .arg(Uuid::now_v7().to_string());
        for t in tokens {
            inv.arg(t.to_string()).arg(&t.entry).arg(t.epoch);
        }
        let replies: Vec<String> = inv.invoke_async(conn).await?;
        replies
            .into_iter()
            .map(|r| match r.parse::<i64>() {
                Ok(deadline) => Ok(Fenced::Ok(deadline)),
                Err(_) => LeaseRefusal::from_script(&r).map(Fenced::Refused),
            })
            .collect()
    }

    /// Report the outcome of a lease (`result` is JSON); `acknowledged`, again for a repeat.
    pub async fn report(
        &self,
        conn: &mut impl ConnectionLike,
        token: &LeaseToken,
        outcome: &str,
        result: &serde_json::Value,
        now_ms: i64,
    ) -> redis::RedisResult<Fenced<()>> {
        let mut replies = self
            .report_many(conn, &[(token, outcome, result)], now_ms)
            .await?;
        Ok(replies
            .pop()
            .unwrap_or(Fenced::Refused(LeaseRefusal::Unknown)))
    }

    /// Report several leases of one agent in one script call; per report `acknowledged` (also
    /// for a repeat) or the fence's refusal.
    pub async fn report_many(
        &self,
        conn: &mut impl ConnectionLike,
        reports: &[(&LeaseToken, &str, &serde_json::Value)],
        now_ms: i64,
    ) -> redis::RedisResult<Vec<Fenced<()>>> {
        let Some((first, _, _)) = reports.first() else {
            return Ok(Vec::new());
        };
        let agent = first.agent.as_str();
        let n = self.keys.shard_of(agent);
        let mut inv = self.report.prepare_invoke();
        inv.key(self.keys.leases(n))
            .key(self.keys.lease_events(n))
            .key(self.keys.lease_versions(n));
        inv.arg(agent).arg(now_ms).arg(self.settings.reply_ttl_ms);
        for (token, outcome, result) in reports {
            // All tokens of one call are one agent's: their keys share the shard's hash tag.
            let text = token.to_string();
            inv.key(self.keys.tasks(agent, token.kind))
                .key(self.keys.closed(agent, token.kind, &token.entry))
                .key(self.keys.reported(agent, &text))
                .key(self.keys.relay_reply(agent, token.kind, &token.entry));
            inv.arg(text)
                .arg(&token.entry)
                .arg(token.epoch)
                .arg(token.kind)
                .arg(Uuid::now_v7().to_string())
                .arg(*outcome)
                .arg(result.to_string());
        }
        let replies: Vec<String> = inv.invoke_async(conn).await?;
        replies
            .into_iter()
            .map(|r| {
                if r == "acknowledged" {
                    Ok(Fenced::Ok(()))
                } else {
                    LeaseRefusal::from_script(&r).map(Fenced::Refused)
                }
            })
            .collect()
    }

    /// Close a task and fence later reports (`lease_expired` answers `ERR_LEASE_LOST`, the
    /// others `ERR_LEASE_CLOSED`). `true` when it was open.
    pub async fn close(
        &self,
        conn: &mut impl ConnectionLike,
        task: &TaskRef<'_>,
        reason: CloseReason,
        now_ms: i64,
    ) -> redis::RedisResult<bool> {
        Ok(self
            .close_entry(conn, task, reason, now_ms)
            .await?
            .is_none())
    }

    /// [`Leases::close`]: `None` when it was open and is closed now, else the lease stream's
    /// newest entry id when the close found it ended already.
    async fn close_entry(
        &self,
        conn: &mut impl ConnectionLike,
        task: &TaskRef<'_>,
        reason: CloseReason,
        now_ms: i64,
    ) -> redis::RedisResult<Option<String>> {
        let n = self.keys.shard_of(task.agent);
        let closed: redis::Value = self
            .close
            .key(self.keys.leases(n))
            .key(self.keys.lease_events(n))
            .key(self.keys.lease_versions(n))
            .key(self.keys.tasks(task.agent, task.kind))
            .key(self.keys.closed(task.agent, task.kind, task.entry))
            .arg(task.agent)
            .arg(task.kind)
            .arg(task.entry)
            .arg(now_ms)
            .arg(Uuid::now_v7().to_string())
            .arg(reason.as_str())
            .arg(reason.tombstone())
            .arg(self.settings.tombstone_ttl_ms)
            .arg(task.task)
            .invoke_async(conn)
            .await?;
        Ok(match closed {
            redis::Value::Int(1) => None,
            other => Some(redis::from_redis_value(other)?),
        })
    }

    /// Close a task by its id: the entry it was enqueued as, or, when it was not enqueued
    /// yet, a mark that keeps a late fan-out from adding it. `true` when it was open.
    pub async fn close_task(
        &self,
        conn: &mut impl ConnectionLike,
        agent: &str,
        kind: &str,
        task: &str,
        reason: CloseReason,
        now_ms: i64,
    ) -> redis::RedisResult<TaskClosed> {
        let entry: Option<String> = self
            .close_unsent
            .key(self.keys.task_ref(agent, task))
            .arg(self.settings.tombstone_ttl_ms)
            .invoke_async(conn)
            .await?;
        match entry.as_deref() {
            None => Ok(TaskClosed::Unsent),
            Some("closed") => Ok(TaskClosed::Already),
            Some(entry) => {
                let task = TaskRef {
                    agent,
                    kind,
                    entry,
                    task,
                };
                Ok(match self.close_entry(conn, &task, reason, now_ms).await? {
                    None => TaskClosed::Closed,
                    Some(tip) => TaskClosed::Ended { tip },
                })
            }
        }
    }

    /// Take the leases of shard `n` that are past their deadline and whose agent is past its
    /// heartbeat deadline too, at most `max` per pass. Each is fenced and expired atomically.
    pub async fn recover(
        &self,
        conn: &mut impl ConnectionLike,
        n: u32,
        now_ms: i64,
        max: u32,
    ) -> redis::RedisResult<Recovery> {
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.leases(n))
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(max)
            .query_async(conn)
            .await?;
        let mut done = Recovery::default();
        for text in due {
            let Ok(token) = LeaseToken::parse(&text) else {
                let _: i64 = redis::cmd("ZREM")
                    .arg(self.keys.leases(n))
                    .arg(&text)
                    .query_async(conn)
                    .await?;
                done.stale += 1;
                continue;
            };
            let outcome = self
                .recover_one(conn, n, &text, &token, now_ms, None)
                .await?;
            match outcome.as_str() {
                "expired" => done.expired += 1,
                "alive" => done.alive += 1,
                "stale" => done.stale += 1,
                _ => {}
            }
        }
        Ok(done)
    }

    /// End every lease of a revoked agent now, whatever its deadline (`lease.expired` by
    /// `actor`; each slot's next attempt goes elsewhere): how many. Call it after
    /// [`crate::presence::Presence::revoke`], which stops new claims, so none is missed.
    pub async fn recover_agent(
        &self,
        conn: &mut impl ConnectionLike,
        agent: &str,
        now_ms: i64,
        actor: &str,
    ) -> redis::RedisResult<u32> {
        let n = self.keys.shard_of(agent);
        // Tokens start with `<agent>.`; agent ids hold no glob characters (A-Z a-z 0-9 _ -).
        let pattern = format!("{agent}.*");
        let mut tokens = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<String>) = redis::cmd("ZSCAN")
                .arg(self.keys.leases(n))
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await?;
            // ZSCAN answers member, score, member, score, ...
            tokens.extend(page.into_iter().step_by(2));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        tokens.sort();
        tokens.dedup();
        let mut expired = 0;
        for text in tokens {
            let Ok(token) = LeaseToken::parse(&text) else {
                continue;
            };
            if token.agent.as_str() != agent {
                continue;
            }
            if self
                .recover_one(conn, n, &text, &token, now_ms, Some(actor))
                .await?
                == "expired"
            {
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// One run of the recovery script.
    async fn recover_one(
        &self,
        conn: &mut impl ConnectionLike,
        n: u32,
        text: &str,
        token: &LeaseToken,
        now_ms: i64,
        revoked_by: Option<&str>,
    ) -> redis::RedisResult<String> {
        let agent = token.agent.as_str();
        let mut inv = self.recover.prepare_invoke();
        inv.key(self.keys.leases(n))
            .key(self.keys.lease_events(n))
            .key(self.keys.lease_versions(n))
            .key(self.keys.tasks(agent, token.kind))
            .key(self.keys.closed(agent, token.kind, &token.entry))
            .key(self.keys.heartbeats(n))
            .arg(text)
            .arg(agent)
            .arg(token.kind)
            .arg(&token.entry)
            .arg(token.epoch)
            .arg(now_ms)
            .arg(Uuid::now_v7().to_string())
            .arg(self.settings.tombstone_ttl_ms);
        if let Some(actor) = revoked_by {
            inv.arg("revoked").arg(actor);
        }
        inv.invoke_async(conn).await
    }

    /// Add a task for `agent` and ring its shard's doorbell: its entry id. For tests and
    /// benchmarks; fan-out uses [`Leases::enqueue_tasks`].
    pub async fn enqueue(
        &self,
        conn: &mut impl ConnectionLike,
        agent: &str,
        kind: &str,
        spec: &str,
    ) -> redis::RedisResult<String> {
        self.enqueue_task(conn, agent, kind, "", spec).await
    }

    /// Add task `task` (`<check>:<slot>:<attempt>`) for `agent` once: a repeat (the outbox
    /// sweep after a crash) answers the entry it was added as, and a task closed before it
    /// was added answers `closed` and is not added. An empty `task` is added every time.
    pub async fn enqueue_task(
        &self,
        conn: &mut impl ConnectionLike,
        agent: &str,
        kind: &str,
        task: &str,
        spec: &str,
    ) -> redis::RedisResult<String> {
        let task = NewTask {
            agent,
            kind,
            task,
            spec,
        };
        let mut ids: Vec<String> = self.enqueue_script(&[task]).invoke_async(conn).await?;
        ids.pop().ok_or_else(empty_answer)
    }

    /// [`Leases::enqueue_task`] for many tasks: one script per shard (and per
    /// [`ENQUEUE_BATCH`] tasks), the scripts pipelined on `conn`. The answers (entry id or
    /// `closed`) come in the order of `tasks`.
    pub async fn enqueue_tasks(
        &self,
        conn: &(impl ConnectionLike + Clone + Send),
        tasks: &[NewTask<'_>],
    ) -> redis::RedisResult<Vec<String>> {
        let mut by_shard: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
        for (i, task) in tasks.iter().enumerate() {
            by_shard
                .entry(self.keys.shard_of(task.agent))
                .or_default()
                .push(i);
        }
        let batches: Vec<&[usize]> = by_shard
            .values()
            .flat_map(|order| order.chunks(ENQUEUE_BATCH))
            .collect();
        let calls = batches.iter().map(|batch| {
            let mut conn = conn.clone();
            let picked: Vec<NewTask<'_>> = batch.iter().map(|&i| tasks[i]).collect();
            let invocation = self.enqueue_script(&picked);
            async move { invocation.invoke_async::<Vec<String>>(&mut conn).await }
        });
        let answers = futures::future::try_join_all(calls).await?;
        let mut out = vec![String::new(); tasks.len()];
        for (batch, ids) in batches.iter().zip(answers) {
            if ids.len() != batch.len() {
                return Err(empty_answer());
            }
            for (&i, id) in batch.iter().zip(ids) {
                out[i] = id;
            }
        }
        Ok(out)
    }

    /// The enqueue script for `tasks`, all of one shard.
    fn enqueue_script(&self, tasks: &[NewTask<'_>]) -> redis::ScriptInvocation<'_> {
        let mut inv = self.enqueue.prepare_invoke();
        let shard = tasks.first().map_or(0, |t| self.keys.shard_of(t.agent));
        inv.arg(self.keys.wake(shard))
            .arg(self.settings.tombstone_ttl_ms);
        for t in tasks {
            inv.key(self.keys.tasks(t.agent, t.kind));
            if t.task.is_empty() {
                // No ref is read or written; the stream stands in for it (same hash tag).
                inv.key(self.keys.tasks(t.agent, t.kind));
            } else {
                inv.key(self.keys.task_ref(t.agent, t.task));
            }
            inv.arg(t.spec).arg(t.agent).arg(t.task);
        }
        inv
    }

    /// The key builder.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The settings.
    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }
}
