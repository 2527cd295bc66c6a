//! The chaos run's verdict. What the run recorded on the client side (acknowledged reports,
//! actions, the `set server` commands its recording proxies saw, live streams, faults) and
//! what the stores hold once everything is quiescent, checked against the invariants. Pure:
//! fed [`Records`], it answers a [`Verdict`]; the tests below feed it fabricated records, one
//! per invariant, and see it fail.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

/// How long before a Redis SIGKILL an acknowledged report may have been lost with it: Redis
/// answers a write once it is in its AOF buffer and writes that buffer out at least every
/// second (`appendfsync everysec`), so a kill loses at most the last second; the margin covers
/// the clocks of the two processes.
pub const REDIS_LOSS_WINDOW_MS: i64 = 1_500;

/// A check as PostgreSQL holds it at the end.
#[derive(Debug, Clone)]
pub struct CheckRow {
    pub id: String,
    pub status: String,
    pub slots: i64,
    pub seq: i64,
    pub deadline_ms: i64,
}

/// What an admin did with a dead letter of a check's task, and the final answer.
#[derive(Debug, Clone)]
pub struct LetterAction {
    pub id: String,
    /// `<check>:<slot>:<attempt>`.
    pub task: String,
    /// `requeue` or `drop`.
    pub action: String,
    pub at_ms: i64,
    /// HTTP status and error code of the last try (a 409 or 5xx asked again for up to 5 s).
    pub status: u16,
    pub code: String,
    /// An earlier try went unanswered or answered 5xx: it may have been applied (its answer
    /// lost), and the tries after it then find the letter held (409) or gone (404).
    pub maybe_applied: bool,
}

/// A check's slot as PostgreSQL holds it at the end.
#[derive(Debug, Clone)]
pub struct SlotRow {
    pub check: String,
    pub slot: i32,
    pub attempt: i32,
    pub status: String,
    pub outcome: Option<String>,
    pub result: Option<Value>,
    pub seq: Option<i64>,
    /// When it ended (ms since the epoch).
    pub done_ms: Option<i64>,
}

/// A report a simulated agent was answered `acknowledged` for.
#[derive(Debug, Clone)]
pub struct Ack {
    pub token: String,
    /// `<check>:<slot>:<attempt>`.
    pub task: String,
    pub result: Value,
    pub at_ms: i64,
}

/// `lease.granted` or `lease.reported`, from `events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStep {
    Granted,
    Reported,
}

/// One lease event of a task entry.
#[derive(Debug, Clone)]
pub struct LeaseEvent {
    /// The event's aggregate: `task:<agent>:<kind>:<entry>`.
    pub entry: String,
    pub step: LeaseStep,
    pub epoch: i64,
    /// The aggregate's version: per entry, in the order Redis made them.
    pub version: i64,
    pub event_id: String,
}

/// An action the driver asked for, and how it ended.
#[derive(Debug, Clone)]
pub struct ActionRecord {
    pub key: String,
    /// `<instance label>/<backend>/<server>`.
    pub server: String,
    pub action: String,
    pub requested_ms: i64,
    pub ended_ms: i64,
    /// `success`, `failed`, or `refused` (never accepted).
    pub status: String,
}

/// A `set server … state …` seen by a recording proxy.
#[derive(Debug, Clone)]
pub struct SetCommand {
    /// `<instance label>/<backend>/<server>`.
    pub server: String,
    pub state: String,
    pub at_ms: i64,
}

/// A reload of an HAProxy instance through its master CLI.
#[derive(Debug, Clone)]
pub struct Reload {
    pub instance: String,
    pub at_ms: i64,
}

/// What a live-stream client saw of one check.
#[derive(Debug, Clone, Default)]
pub struct SseLog {
    pub check: String,
    /// Reconnections with `Last-Event-ID`.
    pub resumed: u32,
    /// `(seq, slot)` of each `result` event, in arrival order.
    pub seen: Vec<(i64, i32)>,
    pub finished: bool,
}

/// A projection table whose rebuild differs from the live one.
#[derive(Debug, Clone)]
pub struct TableDiff {
    /// Which rebuild made it: "`scheduler rebuild`", "`haproxy-sync rebuild`", or one after
    /// every event expired.
    pub by: String,
    pub table: String,
    pub only_live: Vec<String>,
    pub only_rebuilt: Vec<String>,
}

/// A stream entry left pending in a consumer group.
#[derive(Debug, Clone)]
pub struct Pending {
    pub stream: String,
    pub group: String,
    pub count: i64,
}

/// A fault the chaos driver injected.
#[derive(Debug, Clone)]
pub struct Fault {
    /// `kill`, `pause`, `redis-kill`, `redis-restart`, `pg-restart`, `reload`.
    pub class: String,
    /// What it hit (`gateway-1`, `sim-3`, `redis`, `lb-a`, …).
    pub target: String,
    pub at_ms: i64,
    pub detail: String,
}

/// Everything the verdict is made from.
#[derive(Debug, Clone, Default)]
pub struct Records {
    /// Checks whose creation was answered 202.
    pub created: Vec<String>,
    pub checks: Vec<CheckRow>,
    pub slots: Vec<SlotRow>,
    pub acks: Vec<Ack>,
    pub lease_events: Vec<LeaseEvent>,
    pub actions: Vec<ActionRecord>,
    pub sets: Vec<SetCommand>,
    pub reloads: Vec<Reload>,
    /// Each server's admin state as HAProxy reports it at the end.
    pub final_states: BTreeMap<String, String>,
    /// Each server's desired state as PostgreSQL holds it at the end (`None`: never set).
    pub desired: BTreeMap<String, Option<String>>,
    /// Parked events (`projection_failures`): id, type, error.
    pub parked: Vec<String>,
    pub outbox: i64,
    pub pending: Vec<Pending>,
    /// Dead letters: id, task, reason, deliveries.
    pub dead_letters: Vec<String>,
    pub sse: Vec<SseLog>,
    pub letters: Vec<LetterAction>,
    pub rebuilds: Vec<TableDiff>,
    pub faults: Vec<Fault>,
    /// Fault classes the run was asked to inject.
    pub asked: Vec<String>,
    pub max_projector_lag: i64,
    /// Entries the schedulers' projectors were delivered again and found applied already
    /// (their logs' `redelivered`).
    pub redelivered: u64,
}

/// What the records show.
#[derive(Debug, Default)]
pub struct Verdict {
    pub violations: Vec<String>,
    /// Acknowledged reports a Redis SIGKILL lost, each with the kill.
    pub lost_to_redis: Vec<String>,
    pub counts: BTreeMap<String, i64>,
    /// What is worth reading but no violation (dead-letter actions refused, …).
    pub notes: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    fn bad(&mut self, what: String) {
        self.violations.push(what);
    }

    fn count(&mut self, what: &str, n: i64) {
        *self.counts.entry(what.to_owned()).or_default() += n;
    }
}

/// Check every invariant.
pub fn verify(r: &Records) -> Verdict {
    let mut v = Verdict::default();
    checks_and_slots(r, &mut v);
    acknowledged(r, &mut v);
    lease_history(r, &mut v);
    actions(r, &mut v);
    leftovers(r, &mut v);
    live_streams(r, &mut v);
    dead_letters(r, &mut v);
    slots_waiting_for_admins(r, &mut v);
    for diff in &r.rebuilds {
        v.bad(format!(
            "{} differs in {}: {} rows only live (first: {}), {} only rebuilt (first: {})",
            diff.by,
            diff.table,
            diff.only_live.len(),
            diff.only_live.first().map_or("-", String::as_str),
            diff.only_rebuilt.len(),
            diff.only_rebuilt.first().map_or("-", String::as_str),
        ));
    }
    faults(r, &mut v);
    v
}

fn checks_and_slots(r: &Records, v: &mut Verdict) {
    let known: BTreeSet<&str> = r.checks.iter().map(|c| c.id.as_str()).collect();
    for id in &r.created {
        if !known.contains(id.as_str()) {
            v.bad(format!(
                "check {id} was answered 202 but is not in `checks`"
            ));
        }
    }
    let mut slots: HashMap<&str, Vec<&SlotRow>> = HashMap::new();
    for s in &r.slots {
        slots.entry(s.check.as_str()).or_default().push(s);
    }
    for c in &r.checks {
        v.count("checks", 1);
        v.count("slots", c.slots);
        if c.status != "finished" {
            v.bad(format!("check {} is {}, not finished", c.id, c.status));
        }
        let mine = slots.get(c.id.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        if mine.len() as i64 != c.slots {
            v.bad(format!(
                "check {} has {} slot rows for {} slots",
                c.id,
                mine.len(),
                c.slots
            ));
        }
        // Each slot's end took the check's next seq: one terminal outcome per slot means the
        // seqs are exactly 1..=slots and the check's seq is their count.
        let seqs: BTreeSet<i64> = mine.iter().filter_map(|s| s.seq).collect();
        let ended = mine.iter().filter(|s| s.seq.is_some()).count();
        let expected: BTreeSet<i64> = (1..=c.slots).collect();
        if c.status == "finished"
            && (seqs != expected || ended as i64 != c.slots || c.seq != c.slots)
        {
            v.bad(format!(
                "check {}: slot ends are not one per slot (seq {}, slots {}, slot seqs {:?})",
                c.id, c.seq, c.slots, seqs
            ));
        }
        for s in mine {
            if s.attempt > 1 {
                v.count("retried slots", 1);
            }
            if c.status == "finished" && (s.status != "done" || s.outcome.is_none()) {
                v.bad(format!(
                    "slot {}/{} of a finished check is {} with outcome {:?}",
                    s.check, s.slot, s.status, s.outcome
                ));
            }
            if let Some(outcome) = &s.outcome {
                v.count(&format!("slot outcome {outcome}"), 1);
            }
        }
    }
}

fn acknowledged(r: &Records, v: &mut Verdict) {
    let slots: HashMap<(&str, i32), &SlotRow> = r
        .slots
        .iter()
        .map(|s| ((s.check.as_str(), s.slot), s))
        .collect();
    let kills: Vec<&Fault> = r
        .faults
        .iter()
        .filter(|f| f.class == "redis-kill")
        .collect();
    for ack in &r.acks {
        v.count("acknowledged reports", 1);
        let mut parts = ack.task.split(':');
        let (Some(check), Some(slot)) = (parts.next(), parts.next().and_then(|s| s.parse().ok()))
        else {
            v.bad(format!("acknowledged report {} names no task", ack.token));
            continue;
        };
        let kept = slots
            .get(&(check, slot))
            .is_some_and(|s| s.result.as_ref() == Some(&ack.result));
        if kept {
            continue;
        }
        let killed = kills
            .iter()
            // The ack is noted after its answer arrived, the kill before it was sent: a
            // write just before the kill may be noted a little after it.
            .find(|k| (-500..=REDIS_LOSS_WINDOW_MS).contains(&(k.at_ms - ack.at_ms)));
        let now = slots.get(&(check, slot)).map_or_else(
            || "no such slot".to_owned(),
            |s| {
                format!(
                    "attempt {} {} {:?} result {}",
                    s.attempt,
                    s.status,
                    s.outcome,
                    s.result.as_ref().map_or("null".into(), Value::to_string)
                )
            },
        );
        match killed {
            Some(kill) => v.lost_to_redis.push(format!(
                "{} (task {}, acknowledged {} ms before the Redis SIGKILL at {}; the slot now: {now})",
                ack.token,
                ack.task,
                kill.at_ms - ack.at_ms,
                kill.at_ms
            )),
            None => v.bad(format!(
                "acknowledged result lost: {} (task {}) answered `acknowledged` at {}, the slot holds {now}",
                ack.token, ack.task, ack.at_ms
            )),
        }
    }
}

fn lease_history(r: &Records, v: &mut Verdict) {
    let mut by_entry: HashMap<&str, Vec<&LeaseEvent>> = HashMap::new();
    for e in &r.lease_events {
        by_entry.entry(e.entry.as_str()).or_default().push(e);
    }
    for (entry, events) in &by_entry {
        let mut reports: HashMap<i64, Vec<&str>> = HashMap::new();
        let mut epochs = BTreeSet::new();
        for e in events {
            match e.step {
                LeaseStep::Granted => {
                    epochs.insert(e.epoch);
                }
                LeaseStep::Reported => {
                    reports.entry(e.epoch).or_default().push(&e.event_id);
                    // The fence: no report of an epoch after a newer one was granted.
                    if let Some(newer) = events.iter().find(|g| {
                        g.step == LeaseStep::Granted && g.epoch > e.epoch && g.version < e.version
                    }) {
                        v.bad(format!(
                            "stale epoch: {entry} reported at epoch {} (event {}, version {}) after epoch {} was granted (version {})",
                            e.epoch, e.event_id, e.version, newer.epoch, newer.version
                        ));
                    }
                }
            }
        }
        if epochs.len() > 1 {
            v.count("tasks run twice", 1);
        }
        for (epoch, ids) in reports {
            if ids.len() > 1 {
                v.bad(format!(
                    "result recorded twice: {entry} epoch {epoch} reported {} times (events {})",
                    ids.len(),
                    ids.join(", ")
                ));
            }
        }
    }
}

fn actions(r: &Records, v: &mut Verdict) {
    let mut expected: BTreeMap<&str, &str> = BTreeMap::new();
    let mut ordered: Vec<&ActionRecord> = r.actions.iter().collect();
    ordered.sort_by_key(|a| a.requested_ms);
    for a in ordered {
        v.count(&format!("actions {}", a.status), 1);
        if a.status == "success" {
            expected.insert(&a.server, &a.action);
        }
        if a.status == "refused" {
            continue;
        }
        if !matches!(a.status.as_str(), "success" | "failed") {
            v.bad(format!(
                "action key {} ({} {}) was accepted and is {} at the end",
                a.key, a.action, a.server, a.status
            ));
        }
        // The action's own `set`s: its state on its server within its window. A reload in
        // between takes the state away and the re-apply may set it again, so each stretch
        // between reloads may hold one.
        let instance = a.server.split('/').next().unwrap_or_default();
        let mut cuts: Vec<i64> = r
            .reloads
            .iter()
            .filter(|re| {
                re.instance == instance && re.at_ms > a.requested_ms && re.at_ms < a.ended_ms
            })
            .map(|re| re.at_ms)
            .collect();
        cuts.sort_unstable();
        let mut stretches: BTreeMap<usize, usize> = BTreeMap::new();
        for set in r.sets.iter().filter(|s| {
            s.server == a.server
                && s.state == a.action
                && s.at_ms >= a.requested_ms
                && s.at_ms <= a.ended_ms
        }) {
            let stretch = cuts.iter().filter(|c| **c <= set.at_ms).count();
            *stretches.entry(stretch).or_default() += 1;
        }
        if let Some(n) = stretches.values().copied().max().filter(|n| *n > 1) {
            v.bad(format!(
                "action key {} ({} {}) executed {n} times: `set server … state {}` sent {n} times with no reload between",
                a.key, a.action, a.server, a.action
            ));
        }
    }
    for (server, observed) in &r.final_states {
        let want = expected.get(server.as_str()).copied().unwrap_or("ready");
        if observed != want {
            v.bad(format!(
                "server {server} is {observed} in HAProxy, its last successful action asked {want}"
            ));
        }
    }
    for server in r.desired.keys() {
        if !r.final_states.contains_key(server) {
            v.bad(format!(
                "server {server} could not be read from HAProxy at the end"
            ));
        }
    }
    // Only what HAProxy took becomes a server's desired state: a refused or failed action
    // never does.
    for (server, desired) in &r.desired {
        let want = expected.get(server.as_str()).copied();
        if desired.as_deref() != want {
            v.bad(format!(
                "server {server}'s desired state is {}, its last successful action asked {}",
                desired.as_deref().unwrap_or("unset"),
                want.unwrap_or("nothing")
            ));
        }
    }
    v.count("set server commands", r.sets.len() as i64);
}

fn leftovers(r: &Records, v: &mut Verdict) {
    for parked in &r.parked {
        v.bad(format!("parked event: {parked}"));
    }
    if r.outbox > 0 {
        v.bad(format!("the outbox holds {} rows", r.outbox));
    }
    for p in &r.pending {
        if p.count > 0 {
            v.bad(format!(
                "{} entries left pending in {} group {}",
                p.count, p.stream, p.group
            ));
        }
    }
    v.count("dead letters left at the end", r.dead_letters.len() as i64);
    v.count("largest projector lag", r.max_projector_lag);
}

fn live_streams(r: &Records, v: &mut Verdict) {
    let slots: HashMap<&str, i64> = r.checks.iter().map(|c| (c.id.as_str(), c.slots)).collect();
    for log in &r.sse {
        v.count("live streams", 1);
        if log.resumed > 0 {
            v.count("live streams resumed", 1);
        }
        let mut seqs = BTreeSet::new();
        let mut seen_slots = BTreeSet::new();
        for (seq, slot) in &log.seen {
            if !seqs.insert(*seq) || !seen_slots.insert(*slot) {
                v.bad(format!(
                    "live stream of check {} (resumed {} times) saw seq {seq} / slot {slot} twice",
                    log.check, log.resumed
                ));
            }
        }
        if log.finished {
            let want = slots.get(log.check.as_str()).copied().unwrap_or(0);
            if seen_slots.len() as i64 != want {
                v.bad(format!(
                    "live stream of check {} (resumed {} times) ended after {} of {want} results",
                    log.check,
                    log.resumed,
                    seen_slots.len()
                ));
            }
        }
    }
}

/// A dead-lettered slot waits for an admin until its check's deadline: a requeue gives it
/// its next attempt, a drop ends it `dead_lettered`; neither is refused while the check has
/// time left.
fn dead_letters(r: &Records, v: &mut Verdict) {
    let slots: HashMap<(&str, i32), &SlotRow> = r
        .slots
        .iter()
        .map(|s| ((s.check.as_str(), s.slot), s))
        .collect();
    for l in &r.letters {
        let mut parts = l.task.split(':');
        let (Some(check), Some(slot), Some(attempt)) = (
            parts.next(),
            parts.next().and_then(|s| s.parse::<i32>().ok()),
            parts.next().and_then(|s| s.parse::<i32>().ok()),
        ) else {
            continue;
        };
        let ok = matches!(l.status, 200 | 204);
        let done = match (l.action.as_str(), ok) {
            ("requeue", true) => "dead letters requeued",
            ("drop", true) => "dead letters dropped",
            ("requeue", false) => "dead letters whose requeue was refused or unanswered",
            _ => "dead letters whose drop was refused or unanswered",
        };
        v.count(done, 1);
        // A refusal is no violation by itself (an answer lost and asked again, a letter
        // another request holds, a dead-lettering not projected yet): what the slot did is
        // checked below.
        if !ok {
            v.notes.push(format!(
                "dead letter {} ({}): {} answered {} {} at {}",
                l.id, l.task, l.action, l.status, l.code, l.at_ms
            ));
            continue;
        }
        let Some(s) = slots.get(&(check, slot)) else {
            continue;
        };
        if l.action == "requeue" && s.attempt <= attempt {
            v.bad(format!(
                "dead letter {} was requeued but slot {check}/{slot} is still at attempt {}",
                l.id, s.attempt
            ));
        }
        if l.action == "drop"
            && s.attempt == attempt
            && s.outcome.as_deref() != Some("dead_lettered")
        {
            v.bad(format!(
                "dead letter {} was dropped but slot {check}/{slot} ended {:?}",
                l.id, s.outcome
            ));
        }
    }
}

/// A dead-lettered slot waits: it ends `dead_lettered` by its check's deadline or by an
/// admin's drop, never at once.
fn slots_waiting_for_admins(r: &Records, v: &mut Verdict) {
    let checks: HashMap<&str, &CheckRow> = r.checks.iter().map(|c| (c.id.as_str(), c)).collect();
    let dropped: BTreeSet<&str> = r
        .letters
        .iter()
        .filter(|l| l.action == "drop" && (l.status == 204 || l.maybe_applied))
        .map(|l| l.task.as_str())
        .collect();
    for s in &r.slots {
        if s.outcome.as_deref() != Some("dead_lettered") {
            continue;
        }
        let task = format!("{}:{}:{}", s.check, s.slot, s.attempt);
        let (Some(c), Some(done)) = (checks.get(s.check.as_str()), s.done_ms) else {
            continue;
        };
        if !dropped.contains(task.as_str()) && done < c.deadline_ms - 1_000 {
            v.bad(format!(
                "slot {}/{} ended dead_lettered {} ms before its check's deadline with no admin's drop: it did not wait",
                s.check,
                s.slot,
                c.deadline_ms - done
            ));
        }
    }
}

fn faults(r: &Records, v: &mut Verdict) {
    for f in &r.faults {
        let class = if f.class == "kill" || f.class == "pause" {
            format!(
                "{} {}",
                f.class,
                f.target
                    .trim_end_matches(|c: char| c.is_ascii_digit() || c == '-')
            )
        } else {
            f.class.clone()
        };
        v.count(&format!("fault {class}"), 1);
    }
    for class in &r.asked {
        if !r.faults.iter().any(|f| &f.class == class) {
            v.bad(format!(
                "fault class {class} was asked for and happened zero times"
            ));
        }
    }
    // A lost acknowledgement is there to have a batch delivered again: if none ever was, the
    // projector's dedupe went untested.
    v.count("redelivered events found applied", r.redelivered as i64);
    let cuts = r.faults.iter().filter(|f| f.class == "ack-cut").count();
    if cuts > 0 && r.redelivered == 0 {
        v.bad(format!(
            "{cuts} acknowledgements were lost, yet no projector was delivered an entry it had \
             applied: the dedupe went untested"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// One finished check of two slots, both reported and acknowledged; its lease history; an
    /// action done once; one live stream; every fault class once: a run that passes.
    fn clean() -> Records {
        let slot = |n: i32, nonce: &str| SlotRow {
            check: "c1".into(),
            slot: n,
            attempt: 1,
            status: "done".into(),
            outcome: Some("finished".into()),
            result: Some(json!({"nonce": nonce})),
            seq: Some(i64::from(n) + 1),
            done_ms: Some(2_000),
        };
        let event = |entry: &str, step, epoch, version, id: &str| LeaseEvent {
            entry: entry.into(),
            step,
            epoch,
            version,
            event_id: id.into(),
        };
        Records {
            created: vec!["c1".into()],
            checks: vec![CheckRow {
                id: "c1".into(),
                status: "finished".into(),
                slots: 2,
                seq: 2,
                deadline_ms: 20_000,
            }],
            slots: vec![slot(0, "a"), slot(1, "b")],
            acks: vec![
                Ack {
                    token: "agt-1.dns.1-0.1".into(),
                    task: "c1:0:1".into(),
                    result: json!({"nonce": "a"}),
                    at_ms: 1_000,
                },
                Ack {
                    token: "agt-2.dns.2-0.1".into(),
                    task: "c1:1:1".into(),
                    result: json!({"nonce": "b"}),
                    at_ms: 1_100,
                },
            ],
            lease_events: vec![
                event("task:agt-1:dns:1-0", LeaseStep::Granted, 1, 10, "e1"),
                event("task:agt-1:dns:1-0", LeaseStep::Reported, 1, 11, "e2"),
                event("task:agt-2:dns:2-0", LeaseStep::Granted, 1, 10, "e3"),
                event("task:agt-2:dns:2-0", LeaseStep::Granted, 2, 12, "e4"),
                event("task:agt-2:dns:2-0", LeaseStep::Reported, 2, 13, "e5"),
            ],
            actions: vec![ActionRecord {
                key: "k1".into(),
                server: "lb-a/be/s0".into(),
                action: "drain".into(),
                requested_ms: 2_000,
                ended_ms: 2_100,
                status: "success".into(),
            }],
            sets: vec![SetCommand {
                server: "lb-a/be/s0".into(),
                state: "drain".into(),
                at_ms: 2_050,
            }],
            reloads: vec![Reload {
                instance: "lb-a".into(),
                at_ms: 5_000,
            }],
            final_states: [
                ("lb-a/be/s0".to_owned(), "drain".to_owned()),
                ("lb-c/be/s0".to_owned(), "ready".to_owned()),
            ]
            .into(),
            desired: [
                ("lb-a/be/s0".to_owned(), Some("drain".to_owned())),
                ("lb-c/be/s0".to_owned(), None),
            ]
            .into(),
            sse: vec![SseLog {
                check: "c1".into(),
                resumed: 1,
                seen: vec![(1, 0), (2, 1)],
                finished: true,
            }],
            faults: ["kill", "redis-kill", "reload"]
                .iter()
                .map(|c| Fault {
                    class: (*c).into(),
                    target: "x".into(),
                    at_ms: 9_000,
                    detail: String::new(),
                })
                .collect(),
            asked: vec!["kill".into(), "redis-kill".into(), "reload".into()],
            redelivered: 1,
            ..Records::default()
        }
    }

    fn fails_with(records: &Records, words: &str) {
        let verdict = verify(records);
        assert!(
            verdict.violations.iter().any(|v| v.contains(words)),
            "expected a violation with {words:?}, got {:?}",
            verdict.violations
        );
    }

    #[test]
    fn a_clean_run_passes_and_is_counted() {
        let verdict = verify(&clean());
        assert!(verdict.passed(), "{:?}", verdict.violations);
        assert_eq!(verdict.counts["checks"], 1);
        assert_eq!(verdict.counts["acknowledged reports"], 2);
        assert_eq!(verdict.counts["tasks run twice"], 1);
        assert_eq!(verdict.counts["actions success"], 1);
    }

    #[test]
    fn a_doubled_result_fails() {
        let mut r = clean();
        r.lease_events.push(LeaseEvent {
            entry: "task:agt-1:dns:1-0".into(),
            step: LeaseStep::Reported,
            epoch: 1,
            version: 14,
            event_id: "e9".into(),
        });
        fails_with(&r, "result recorded twice: task:agt-1:dns:1-0 epoch 1");
        // A slot ended twice shows in its check's seq as well.
        let mut r = clean();
        r.checks[0].seq = 3;
        fails_with(&r, "not one per slot");
    }

    #[test]
    fn a_stale_epoch_fails() {
        let mut r = clean();
        r.lease_events.push(LeaseEvent {
            entry: "task:agt-2:dns:2-0".into(),
            step: LeaseStep::Reported,
            epoch: 1,
            version: 14,
            event_id: "e9".into(),
        });
        fails_with(&r, "stale epoch: task:agt-2:dns:2-0 reported at epoch 1");
    }

    #[test]
    fn a_lost_acknowledged_result_fails_unless_a_redis_kill_took_it() {
        let mut r = clean();
        r.slots[1].outcome = Some("timeout".into());
        r.slots[1].result = None;
        fails_with(&r, "acknowledged result lost: agt-2.dns.2-0.1");
        // Within a second before a Redis SIGKILL it is listed with the kill instead.
        r.faults[1].at_ms = 1_900;
        let verdict = verify(&r);
        assert!(verdict.passed(), "{:?}", verdict.violations);
        assert_eq!(verdict.lost_to_redis.len(), 1);
        assert!(verdict.lost_to_redis[0].contains("800 ms before the Redis SIGKILL"));
    }

    #[test]
    fn an_action_executed_twice_fails_but_a_reload_between_may_set_it_again() {
        let mut r = clean();
        r.sets.push(SetCommand {
            server: "lb-a/be/s0".into(),
            state: "drain".into(),
            at_ms: 2_080,
        });
        fails_with(&r, "action key k1 (drain lb-a/be/s0) executed 2 times");
        r.reloads.push(Reload {
            instance: "lb-a".into(),
            at_ms: 2_060,
        });
        assert!(verify(&r).passed());
    }

    #[test]
    fn a_server_off_its_last_successful_state_fails() {
        let mut r = clean();
        r.final_states.insert("lb-a/be/s0".into(), "ready".into());
        fails_with(
            &r,
            "server lb-a/be/s0 is ready in HAProxy, its last successful action asked drain",
        );
        // A failed action does not move what is expected.
        let mut r = clean();
        r.actions.push(ActionRecord {
            key: "k2".into(),
            server: "lb-a/be/s0".into(),
            action: "maint".into(),
            requested_ms: 3_000,
            ended_ms: 3_100,
            status: "failed".into(),
        });
        assert!(verify(&r).passed());
        r.final_states.insert("lb-a/be/s0".into(), "maint".into());
        fails_with(&r, "its last successful action asked drain");
    }

    #[test]
    fn a_failed_action_that_became_desired_fails() {
        let mut r = clean();
        r.actions.push(ActionRecord {
            key: "k3".into(),
            server: "lb-c/be/s0".into(),
            action: "maint".into(),
            requested_ms: 3_000,
            ended_ms: 3_100,
            status: "failed".into(),
        });
        assert!(verify(&r).passed());
        r.desired.insert("lb-c/be/s0".into(), Some("maint".into()));
        fails_with(
            &r,
            "server lb-c/be/s0's desired state is maint, its last successful action asked nothing",
        );
    }

    #[test]
    fn a_dead_lettered_slot_that_did_not_wait_or_a_requeue_without_effect_fails() {
        let mut r = clean();
        r.slots[1].outcome = Some("dead_lettered".into());
        r.slots[1].result = None;
        r.acks.pop();
        // Ended at its check's deadline (20 s): it waited.
        r.slots[1].done_ms = Some(20_500);
        assert!(verify(&r).passed(), "{:?}", verify(&r).violations);
        // Ended at 2 s with no drop: it did not wait for an admin.
        r.slots[1].done_ms = Some(2_000);
        fails_with(
            &r,
            "slot c1/1 ended dead_lettered 18000 ms before its check's deadline",
        );
        // Unless an admin dropped it.
        r.letters.push(LetterAction {
            id: "s1-5-0".into(),
            task: "c1:1:1".into(),
            action: "drop".into(),
            at_ms: 1_900,
            status: 409,
            code: "ERR_CONFLICT".into(),
            maybe_applied: false,
        });
        fails_with(&r, "slot c1/1 ended dead_lettered 18000 ms before");
        // Or a drop whose answer was lost (the retry found the letter held): it may have.
        r.letters.last_mut().unwrap().maybe_applied = true;
        assert!(verify(&r).passed(), "{:?}", verify(&r).violations);
        r.letters.last_mut().unwrap().maybe_applied = false;
        r.letters.last_mut().unwrap().status = 204;
        assert!(verify(&r).passed(), "{:?}", verify(&r).violations);
        // A requeue answered 200 must give the slot its next attempt.
        r.letters.push(LetterAction {
            id: "s1-6-0".into(),
            task: "c1:0:1".into(),
            action: "requeue".into(),
            at_ms: 1_000,
            status: 200,
            code: String::new(),
            maybe_applied: false,
        });
        fails_with(&r, "was requeued but slot c1/0 is still at attempt 1");
    }

    #[test]
    fn a_server_not_read_at_the_end_fails() {
        let mut r = clean();
        r.final_states.remove("lb-c/be/s0");
        fails_with(
            &r,
            "server lb-c/be/s0 could not be read from HAProxy at the end",
        );
    }

    #[test]
    fn an_accepted_action_missing_or_unfinished_fails() {
        let mut r = clean();
        r.actions[0].status = "missing".into();
        fails_with(
            &r,
            "action key k1 (drain lb-a/be/s0) was accepted and is missing at the end",
        );
    }

    #[test]
    fn a_diverging_rebuild_fails() {
        let mut r = clean();
        r.rebuilds.push(TableDiff {
            by: "`haproxy-sync rebuild`".into(),
            table: "haproxy_servers".into(),
            only_live: vec![r#"{"server_id": "x"}"#.into()],
            only_rebuilt: vec![],
        });
        fails_with(&r, "`haproxy-sync rebuild` differs in haproxy_servers");
    }

    #[test]
    fn a_parked_event_or_leftover_work_fails() {
        let mut r = clean();
        r.parked.push("7 lease.reported: malformed".into());
        fails_with(&r, "parked event: 7 lease.reported");
        let mut r = clean();
        r.outbox = 2;
        fails_with(&r, "the outbox holds 2 rows");
        let mut r = clean();
        r.pending.push(Pending {
            stream: "cp:events:checks".into(),
            group: "projector".into(),
            count: 1,
        });
        fails_with(
            &r,
            "1 entries left pending in cp:events:checks group projector",
        );
    }

    #[test]
    fn an_unfinished_check_or_a_missing_created_one_fails() {
        let mut r = clean();
        r.checks[0].status = "in_progress".into();
        fails_with(&r, "check c1 is in_progress, not finished");
        let mut r = clean();
        r.created.push("c2".into());
        fails_with(&r, "check c2 was answered 202 but is not in `checks`");
    }

    #[test]
    fn a_live_stream_seeing_a_result_twice_or_missing_one_fails() {
        let mut r = clean();
        r.sse[0].seen.push((2, 1));
        fails_with(&r, "saw seq 2 / slot 1 twice");
        let mut r = clean();
        r.sse[0].seen.pop();
        fails_with(&r, "ended after 1 of 2 results");
    }

    #[test]
    fn a_lost_acknowledgement_that_redelivered_nothing_fails() {
        let mut r = clean();
        r.faults.push(Fault {
            class: "ack-cut".into(),
            target: "scheduler-1".into(),
            at_ms: 9_500,
            detail: String::new(),
        });
        assert!(verify(&r).passed());
        r.redelivered = 0;
        fails_with(&r, "1 acknowledgements were lost, yet no projector");
    }

    #[test]
    fn a_fault_class_that_never_happened_fails() {
        let mut r = clean();
        r.asked.push("pg-restart".into());
        fails_with(
            &r,
            "fault class pg-restart was asked for and happened zero times",
        );
    }
}
