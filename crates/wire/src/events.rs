//! Events: the envelope and every typed event.
//!
//! On a stream an event is one entry with one field, `event`, holding this JSON:
//!
//! ```json
//! {"event_id": "0190...", "type": "agent.registered", "aggregate_id": "agent:a1",
//!  "version": 3, "occurred_at": 1760000000000, "actor": "agent:a1", "schema": 1,
//!  "payload": {...}}
//! ```
//!
//! `occurred_at` is milliseconds since the Unix epoch (Lua scripts make events too, and
//! integers travel through them unchanged). `version` is per aggregate: a current-state column
//! keeps the version that set it, so an older event never overwrites a newer one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The version of the envelope and payload shapes this release writes. Events of an older
/// schema are read through [`upcast`]; a newer one is refused ([`DecodeError::Newer`]).
///
/// - 1: the first.
/// - 2: every actor is `<kind>:<name>` (haproxy-sync wrote a bare `haproxy-sync`, the
///   gateway's `keys` command a bare `cli` when it knew no user), and `task.dead_lettered`
///   always says whether its slot `waits` (absent meant `false`).
pub const SCHEMA: u32 = 2;

/// The actor of the gateway's `keys` command run without a user name (`$USER`).
pub const UNKNOWN_CLI_ACTOR: &str = "cli:unknown";

/// The oldest schema this release still reads.
pub const OLDEST_SCHEMA: u32 = 1;

/// Why stored or streamed JSON is not an event this release can use.
#[derive(Debug)]
pub enum DecodeError {
    /// Not JSON, not an envelope, or a payload that does not fit its type.
    Json(serde_json::Error),
    /// No `schema`, or one older than [`OLDEST_SCHEMA`].
    Schema(String),
    /// Written by a newer release: this one cannot know what it means.
    Newer(u64),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Json(e) => write!(f, "undecodable event: {e}"),
            Self::Schema(why) => write!(f, "undecodable event: {why}"),
            Self::Newer(n) => write!(
                f,
                "event of schema {n}, written by a newer release (this one reads {OLDEST_SCHEMA} to {SCHEMA})"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

impl From<serde_json::Error> for DecodeError {
    fn from(e: serde_json::Error) -> Self {
        Self::Json(e)
    }
}

/// Bring an envelope of any schema this release reads up to [`SCHEMA`], one step at a time;
/// the one place that knows what older releases wrote.
pub fn upcast(mut event: serde_json::Value) -> Result<serde_json::Value, DecodeError> {
    let mut schema = match event.get("schema") {
        None => return Err(DecodeError::Schema("no schema".to_owned())),
        Some(given) => given.as_u64().ok_or_else(|| {
            DecodeError::Schema(format!("schema {given} is not a version number"))
        })?,
    };
    if schema > u64::from(SCHEMA) {
        return Err(DecodeError::Newer(schema));
    }
    if schema < u64::from(OLDEST_SCHEMA) {
        return Err(DecodeError::Schema(format!(
            "schema {schema} is older than this release reads ({OLDEST_SCHEMA})"
        )));
    }
    while schema < u64::from(SCHEMA) {
        match schema {
            1 => one_to_two(&mut event),
            _ => unreachable!("every schema below SCHEMA has a step"),
        }
        schema += 1;
        event["schema"] = schema.into();
    }
    Ok(event)
}

/// Schema 1 → 2: actors are `<kind>:<name>` (the `keys` command's bare `cli` is
/// [`UNKNOWN_CLI_ACTOR`], any other bare name a `system:` one); a dead letter says whether
/// its slot waits. Migration V20 brings the actors already in projection rows along.
fn one_to_two(event: &mut serde_json::Value) {
    if let Some(actor) = event.get("actor").and_then(serde_json::Value::as_str) {
        if actor == "cli" {
            event["actor"] = UNKNOWN_CLI_ACTOR.into();
        } else if !actor.contains(':') {
            event["actor"] = format!("system:{actor}").into();
        }
    }
    if event.get("type").and_then(serde_json::Value::as_str) == Some("task.dead_lettered") {
        if let Some(payload) = event.get_mut("payload").and_then(|p| p.as_object_mut()) {
            payload.entry("waits").or_insert(false.into());
        }
    }
}

impl Event {
    /// A new event made now, with a fresh UUID v7 id: the one way Rust code makes an event
    /// (the Lua scripts build the same envelope; core's envelope test pins the two together).
    pub fn new(
        aggregate_id: impl Into<String>,
        version: i64,
        actor: impl Into<String>,
        body: EventBody,
    ) -> Self {
        let occurred_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Self {
            event_id: Uuid::now_v7(),
            aggregate_id: aggregate_id.into(),
            version,
            occurred_at,
            actor: actor.into(),
            schema: SCHEMA,
            body,
        }
    }

    /// The same event under an id of the caller's (one made from what it is about, so that
    /// making it again makes the same event).
    pub fn with_id(self, event_id: Uuid) -> Self {
        Self { event_id, ..self }
    }

    /// An event as stored or streamed, of any schema this release reads.
    pub fn decode(value: serde_json::Value) -> Result<Self, DecodeError> {
        Ok(serde_json::from_value(upcast(value)?)?)
    }

    /// [`Event::decode`] of JSON text.
    pub fn decode_str(text: &str) -> Result<Self, DecodeError> {
        Self::decode(serde_json::from_str(text)?)
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: Uuid,
    pub aggregate_id: String,
    pub version: i64,
    /// Milliseconds since the Unix epoch.
    pub occurred_at: i64,
    /// Who caused it: `agent:<id>`, `key:<name>`, `system:<service>`.
    pub actor: String,
    pub schema: u32,
    #[serde(flatten)]
    pub body: EventBody,
}

/// The typed part: `type` and `payload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload", deny_unknown_fields)]
pub enum EventBody {
    /// An agent registered, or re-registered and so rotated its token.
    #[serde(rename = "agent.registered")]
    AgentRegistered(Box<AgentRegistered>),
    /// An admin let a known host register again with the enrollment token alone (its agent's
    /// token is lost): once, until `until_ms`.
    #[serde(rename = "agent.reenroll_approved")]
    AgentReenrollApproved(AgentReenrollApproved),
    /// An admin revoked an agent: its token is void, its leases are recovered, and its host
    /// registers again only after an approval.
    #[serde(rename = "agent.revoked")]
    AgentRevoked(AgentRevoked),
    /// An agent's heartbeat came in while it was not online.
    #[serde(rename = "agent.online")]
    AgentCameBack(AgentPresence),
    /// An agent missed its heartbeat deadline by more than the grace period.
    #[serde(rename = "agent.offline")]
    AgentWentOffline(AgentPresence),
    /// A task was leased to its agent (epoch = delivery count).
    #[serde(rename = "lease.granted")]
    LeaseGranted(LeaseGranted),
    /// Leases were extended (one event per extend call).
    #[serde(rename = "lease.extended")]
    LeaseExtended(LeaseExtended),
    /// A lease's work was reported.
    #[serde(rename = "lease.reported")]
    LeaseReported(LeaseReported),
    /// A task was closed (deadline, cancel).
    #[serde(rename = "lease.closed")]
    LeaseClosed(LeaseClosed),
    /// Recovery took the lease of a silent agent.
    #[serde(rename = "lease.expired")]
    LeaseExpired(LeaseExpired),
    /// A task went over the delivery limit.
    #[serde(rename = "task.dead_lettered")]
    TaskDeadLettered(TaskDeadLettered),
    /// An operator created a check: its spec and the agents chosen for its slots.
    #[serde(rename = "check.created")]
    CheckCreated(Box<CheckCreated>),
    /// An operator cancelled a check: its open slots are closed as `cancelled`.
    #[serde(rename = "check.cancelled")]
    CheckCancelled(CheckCancelled),
    /// A slot whose attempt was interrupted (agent gone) gets a new attempt on another agent.
    #[serde(rename = "check.slot_retried")]
    CheckSlotRetried(CheckSlotRetried),
    /// Slots ended by the scheduler (deadline, cancel, no agent, retries used up).
    #[serde(rename = "check.slots_closed")]
    CheckSlotsClosed(CheckSlotsClosed),
    /// Waiting slots of a check let run (its parallelism allows more).
    #[serde(rename = "check.slots_released")]
    CheckSlotsReleased(CheckSlotsReleased),
    /// Slots whose agent went away before their task was sent: they wait for a retry.
    #[serde(rename = "check.slots_interrupted")]
    CheckSlotsInterrupted(CheckSlotsClosed),
    /// An operator API key was made.
    #[serde(rename = "key.created")]
    KeyCreated(KeyCreated),
    /// An operator API key was revoked.
    #[serde(rename = "key.revoked")]
    KeyRevoked(KeyRevoked),
    /// An operator registered an HAProxy instance.
    #[serde(rename = "haproxy.instance_registered")]
    HaproxyInstanceRegistered(HaproxyInstanceRegistered),
    /// An operator removed an HAProxy instance (it is no longer polled).
    #[serde(rename = "haproxy.instance_removed")]
    HaproxyInstanceRemoved(HaproxyInstanceRemoved),
    /// A poll saw a server new or changed (id derived from instance, poll, server).
    #[serde(rename = "haproxy.server_observed")]
    HaproxyServerObserved(Box<HaproxyServerObserved>),
    /// A successful poll did not see a server it knew (two in a row soft-delete it).
    #[serde(rename = "haproxy.server_missing")]
    HaproxyServerMissing(HaproxyServerMissing),
    /// An operator asked for drain / maint / ready of a server (idempotency key unique).
    #[serde(rename = "haproxy.action_requested")]
    HaproxyActionRequested(Box<HaproxyActionRequested>),
    /// An action moved on: `running`, `success` or `failed`.
    #[serde(rename = "haproxy.action_updated")]
    HaproxyActionUpdated(HaproxyActionUpdated),
    /// An operator marked a server as an HAProxy node, or unmarked it.
    #[serde(rename = "haproxy.node_marked")]
    HaproxyNodeMarked(HaproxyNodeMarked),
    /// An operator created an application (HAProxy servers link to it by IP:port or name).
    #[serde(rename = "application.created")]
    ApplicationCreated(ApplicationCreated),
    /// An operator created a group of applications.
    #[serde(rename = "application_group.created")]
    ApplicationGroupCreated(ApplicationGroupCreated),
    /// Retention kept a long-lived projection row whose events it dropped: the row as it
    /// stood, which only `rebuild` applies (live, the row is this already).
    #[serde(rename = "projection.snapshot")]
    ProjectionSnapshot(ProjectionSnapshot),
    /// An admin put a dead-lettered task back to work (a check's slot: its next attempt).
    #[serde(rename = "dead_letter.requeued")]
    DeadLetterRequeued(DeadLetterHandled),
    /// An admin dropped a dead-lettered task (a check's waiting slot ends `dead_lettered`).
    #[serde(rename = "dead_letter.dropped")]
    DeadLetterDropped(DeadLetterHandled),
    /// An admin dropped an event parked in `projection_failures`: it will never be applied.
    #[serde(rename = "projection_failure.dropped")]
    ProjectionFailureDropped(ProjectionFailureDropped),
}

impl EventBody {
    /// The `type` string.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::AgentRegistered(_) => "agent.registered",
            Self::AgentReenrollApproved(_) => "agent.reenroll_approved",
            Self::AgentRevoked(_) => "agent.revoked",
            Self::AgentCameBack(_) => "agent.online",
            Self::AgentWentOffline(_) => "agent.offline",
            Self::LeaseGranted(_) => "lease.granted",
            Self::LeaseExtended(_) => "lease.extended",
            Self::LeaseReported(_) => "lease.reported",
            Self::LeaseClosed(_) => "lease.closed",
            Self::LeaseExpired(_) => "lease.expired",
            Self::TaskDeadLettered(_) => "task.dead_lettered",
            Self::CheckCreated(_) => "check.created",
            Self::CheckCancelled(_) => "check.cancelled",
            Self::CheckSlotRetried(_) => "check.slot_retried",
            Self::CheckSlotsClosed(_) => "check.slots_closed",
            Self::CheckSlotsReleased(_) => "check.slots_released",
            Self::CheckSlotsInterrupted(_) => "check.slots_interrupted",
            Self::KeyCreated(_) => "key.created",
            Self::KeyRevoked(_) => "key.revoked",
            Self::HaproxyInstanceRegistered(_) => "haproxy.instance_registered",
            Self::HaproxyInstanceRemoved(_) => "haproxy.instance_removed",
            Self::HaproxyServerObserved(_) => "haproxy.server_observed",
            Self::HaproxyServerMissing(_) => "haproxy.server_missing",
            Self::HaproxyActionRequested(_) => "haproxy.action_requested",
            Self::HaproxyActionUpdated(_) => "haproxy.action_updated",
            Self::HaproxyNodeMarked(_) => "haproxy.node_marked",
            Self::ApplicationCreated(_) => "application.created",
            Self::ApplicationGroupCreated(_) => "application_group.created",
            Self::ProjectionSnapshot(_) => "projection.snapshot",
            Self::DeadLetterRequeued(_) => "dead_letter.requeued",
            Self::DeadLetterDropped(_) => "dead_letter.dropped",
            Self::ProjectionFailureDropped(_) => "projection_failure.dropped",
        }
    }

    /// Whether an operator caused it: such events are also written to the audit log.
    pub fn is_operator_action(&self) -> bool {
        matches!(
            self,
            Self::KeyCreated(_)
                | Self::KeyRevoked(_)
                | Self::AgentReenrollApproved(_)
                | Self::AgentRevoked(_)
                | Self::CheckCreated(_)
                | Self::CheckCancelled(_)
                | Self::HaproxyInstanceRegistered(_)
                | Self::HaproxyInstanceRemoved(_)
                | Self::HaproxyActionRequested(_)
                | Self::HaproxyNodeMarked(_)
                | Self::ApplicationCreated(_)
                | Self::ApplicationGroupCreated(_)
                | Self::DeadLetterRequeued(_)
                | Self::DeadLetterDropped(_)
                | Self::ProjectionFailureDropped(_)
        )
    }
}

/// Where an agent is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Location {
    /// ISO 3166-1 alpha-2, upper case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asn: Option<u32>,
    /// The network's name (an ISP or hosting provider).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// Payload of `agent.registered`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRegistered {
    pub agent_id: String,
    pub hostname: String,
    /// SHA-256 of the agent's secret token, hex.
    pub token_hash: String,
    pub labels: BTreeMap<String, String>,
    /// Check kinds the agent runs, with how many at once.
    pub capabilities: BTreeMap<String, u32>,
    pub location: Location,
    /// `declared`, `geoip` or `none`.
    pub location_source: String,
    /// The address the registration came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The token hash this registration replaced (a known host's): still proof of the
    /// agent until the next registration, for an agent that lost this one's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_token_hash: Option<String>,
}

/// Payload of `agent.reenroll_approved`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentReenrollApproved {
    pub agent_id: String,
    pub hostname: String,
    /// Until when (ms since the epoch) one registration with the enrollment token alone is
    /// taken.
    pub until_ms: i64,
}

/// Payload of `agent.revoked`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRevoked {
    pub agent_id: String,
    pub hostname: String,
}

/// Payload of `agent.online` and `agent.offline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentPresence {
    pub agent_id: String,
    /// `heartbeat`, `missed_heartbeat` or `revoked`.
    pub reason: String,
}

/// Payload of `lease.granted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseGranted {
    pub agent_id: String,
    pub kind: String,
    pub entry: String,
    pub epoch: i64,
    /// Milliseconds since the epoch.
    pub deadline: i64,
    /// The task's id (`<check>:<slot>:<attempt>`), for tasks of a check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// Payload of `lease.extended`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseExtended {
    pub agent_id: String,
    pub tokens: Vec<String>,
    pub deadline: i64,
}

/// Payload of `lease.reported`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseReported {
    pub agent_id: String,
    pub kind: String,
    pub entry: String,
    pub epoch: i64,
    /// `finished`, `failed` or `cancelled`.
    pub outcome: String,
    pub result: serde_json::Value,
    /// The task's id (`<check>:<slot>:<attempt>`), for tasks of a check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

impl Eq for LeaseReported {}

/// Payload of `lease.closed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseClosed {
    pub agent_id: String,
    pub kind: String,
    pub entry: String,
    /// `timeout`, `cancelled` or `lease_expired`.
    pub reason: String,
    /// The task's id (`<check>:<slot>:<attempt>`), for tasks of a check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// Payload of `lease.expired`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseExpired {
    pub agent_id: String,
    pub kind: String,
    pub entry: String,
    pub epoch: i64,
    /// The task's id (`<check>:<slot>:<attempt>`), for tasks of a check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

/// Payload of `task.dead_lettered`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDeadLettered {
    pub agent_id: String,
    pub kind: String,
    pub entry: String,
    pub deliveries: i64,
    /// The task's id (`<check>:<slot>:<attempt>`), for tasks of a check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The check's slot waits for an admin (made so since dead letters can be requeued);
    /// absent in schema 1 events made before, whose slots ended `dead_lettered` at once (as
    /// a rebuild still ends them): [`upcast`] makes it `false`.
    pub waits: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_with_type_and_payload_fields() {
        let event = Event {
            event_id: Uuid::nil(),
            aggregate_id: "presence:a1".into(),
            version: 2,
            occurred_at: 1_760_000_000_000,
            actor: "system:scheduler".into(),
            schema: SCHEMA,
            body: EventBody::AgentWentOffline(AgentPresence {
                agent_id: "a1".into(),
                reason: "missed_heartbeat".into(),
            }),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "agent.offline");
        assert_eq!(json["payload"]["agent_id"], "a1");
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
    }

    /// Stored as release 1 wrote them (a haproxy-sync observation, a dead letter of before
    /// requeues): read as today's events.
    #[test]
    fn schema_1_events_are_upcast_and_newer_ones_refused() {
        let observed = serde_json::json!({
            "event_id": Uuid::nil(), "aggregate_id": "haproxy-server:s", "version": 4,
            "occurred_at": 1_760_000_000_000_i64, "actor": "haproxy-sync", "schema": 1,
            "type": "haproxy.server_missing",
            "payload": {"instance_id": "i", "poll": 4, "backend": "b", "server": "s"},
        });
        let event = Event::decode(observed.clone()).unwrap();
        assert_eq!(event.actor, "system:haproxy-sync");
        assert_eq!(event.schema, SCHEMA);
        // An actor already `<kind>:<name>` stays as it is; the keys command's bare `cli` is
        // the same actor it writes today.
        let mut keyed = observed.clone();
        keyed["actor"] = "key:ops".into();
        assert_eq!(Event::decode(keyed).unwrap().actor, "key:ops");
        let mut cli = observed.clone();
        cli["actor"] = "cli".into();
        assert_eq!(Event::decode(cli).unwrap().actor, UNKNOWN_CLI_ACTOR);
        let mut odd = observed.clone();
        odd["schema"] = "2".into();
        assert!(
            matches!(Event::decode(odd), Err(DecodeError::Schema(why)) if why.contains("not a version"))
        );

        let letter = serde_json::json!({
            "event_id": Uuid::nil(), "aggregate_id": "task:t", "version": 1,
            "occurred_at": 0, "actor": "system:gateway", "schema": 1,
            "type": "task.dead_lettered",
            "payload": {"agent_id": "a", "kind": "dns", "entry": "1-0", "deliveries": 6,
                        "task": "t"},
        });
        let EventBody::TaskDeadLettered(dead) = Event::decode(letter.clone()).unwrap().body else {
            panic!("not a dead letter");
        };
        assert!(!dead.waits);
        // Schema 2 says it: one without `waits` is refused, not guessed.
        let mut unsaid = letter.clone();
        unsaid["schema"] = 2.into();
        assert!(matches!(Event::decode(unsaid), Err(DecodeError::Json(_))));

        let mut newer = letter;
        newer["schema"] = (SCHEMA + 1).into();
        let refused = Event::decode(newer).unwrap_err();
        assert!(matches!(refused, DecodeError::Newer(n) if n == u64::from(SCHEMA) + 1));
        assert!(refused.to_string().contains("newer release"), "{refused}");
        let mut none = observed;
        none.as_object_mut().unwrap().remove("schema");
        assert!(matches!(Event::decode(none), Err(DecodeError::Schema(_))));
    }

    #[test]
    fn unknown_types_and_fields_are_refused() {
        let base = serde_json::json!({
            "event_id": Uuid::nil(), "aggregate_id": "x", "version": 1, "occurred_at": 0,
            "actor": "a", "schema": 1,
        });
        let mut unknown = base.clone();
        unknown["type"] = "agent.exploded".into();
        unknown["payload"] = serde_json::json!({});
        assert!(serde_json::from_value::<Event>(unknown).is_err());
        let mut extra = base;
        extra["type"] = "agent.online".into();
        extra["payload"] = serde_json::json!({"agent_id": "a", "reason": "r", "x": 1});
        assert!(serde_json::from_value::<Event>(extra).is_err());
    }
}

/// Payload of `key.created`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyCreated {
    pub key_id: String,
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// SHA-256 of the whole key, hex (the key has 256 random bits: no salt needed).
    pub key_hash: String,
}

/// Payload of `key.revoked`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRevoked {
    pub key_id: String,
}

/// Payload of `check.created`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckCreated {
    pub check_id: Uuid,
    pub kind: String,
    pub target: String,
    /// The kind's options, defaults filled in.
    pub options: serde_json::Value,
    /// The selection as asked (`locations`, `limit` or `reuse`).
    pub selection: serde_json::Value,
    /// When open slots are closed as `timeout` (ms since the epoch).
    pub deadline: i64,
    pub slots: Vec<CheckSlot>,
    /// How many slots run at once: the first ones are sent at creation, the rest wait for
    /// `check.slots_released`. None: all at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
}

impl CheckCreated {
    /// The slots sent at creation (the first `max_parallel`).
    pub fn first_wave(&self) -> &[CheckSlot] {
        let n = self.max_parallel.map_or(self.slots.len(), |n| n as usize);
        &self.slots[..n.min(self.slots.len())]
    }
}

impl Eq for CheckCreated {}

/// One slot of a check: the agent chosen for its first attempt, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSlot {
    pub slot: u32,
    pub agent_id: String,
    pub location: Location,
    /// Which `locations` entry the slot is for (retries keep to it); none for `limit`/`reuse`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<u32>,
}

/// Payload of `check.cancelled`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckCancelled {
    pub check_id: Uuid,
}

/// Payload of `check.slot_retried`: the slot's next attempt and its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSlotRetried {
    pub check_id: Uuid,
    pub kind: String,
    pub target: String,
    pub options: serde_json::Value,
    pub deadline: i64,
    pub slot: u32,
    /// The new attempt (the interrupted one plus one).
    pub attempt: u32,
    pub agent_id: String,
    pub location: Location,
}

/// Payload of `check.slots_released`: what the released slots' tasks need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSlotsReleased {
    pub check_id: Uuid,
    pub kind: String,
    pub target: String,
    pub options: serde_json::Value,
    pub deadline: i64,
    /// (slot, agent): each slot's first attempt.
    pub slots: Vec<(u32, String)>,
}

/// Payload of `check.slots_closed` and `check.slots_interrupted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSlotsClosed {
    pub check_id: Uuid,
    /// `timeout`, `cancelled`, `no_agent`, or the interruption (`lease_expired`, `offline`)
    /// when no retry is left.
    pub outcome: String,
    /// (slot, attempt): only that attempt is closed.
    pub slots: Vec<(u32, u32)>,
}

/// Payload of `haproxy.instance_registered`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxyInstanceRegistered {
    pub instance_id: String,
    pub name: String,
    /// `direct` (TCP `host:port` or a unix socket path) or `agent` (through the node's agent).
    pub transport: String,
    pub address: String,
    /// The node (agent) it runs on, if known.
    #[serde(default)]
    pub node: Option<String>,
}

/// Payload of `haproxy.instance_removed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxyInstanceRemoved {
    pub instance_id: String,
}

/// A server as HAProxy reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservedServer {
    pub address: String,
    pub port: Option<u16>,
    pub weight: u32,
    /// `stopped`, `starting`, `running`, `stopping`.
    pub op_state: String,
    /// `ready`, `drain` or `maint`, and the raw bit mask.
    pub admin_state: String,
    pub admin_bits: u32,
    /// `show stat`'s `status` (`UP`, `DOWN`, `DRAIN`, `MAINT`, `no check`, ...).
    pub status: Option<String>,
    pub check_status: Option<String>,
    /// Current sessions.
    pub scur: Option<u64>,
}

/// Payload of `haproxy.server_observed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxyServerObserved {
    pub instance_id: String,
    /// The poll that saw it (per instance, increasing).
    pub poll: i64,
    pub backend: String,
    pub server: String,
    pub observed: ObservedServer,
    /// What the state change was caused by: `sync` (seen by a poll), or an action's id.
    pub cause: String,
}

/// Payload of `haproxy.server_missing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxyServerMissing {
    pub instance_id: String,
    pub poll: i64,
    pub backend: String,
    pub server: String,
}

/// Payload of `haproxy.action_requested`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxyActionRequested {
    pub action_id: String,
    pub idempotency_key: String,
    pub server_id: String,
    pub instance_id: String,
    pub backend: String,
    pub server: String,
    /// `drain`, `maint` or `ready`.
    pub action: String,
    /// For drain: how long to wait for current sessions to reach 0 (0: do not wait).
    pub drain_wait_ms: u64,
}

/// Payload of `haproxy.node_marked`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxyNodeMarked {
    /// The server: the agent id of the agent on that host.
    pub server_id: String,
    pub hostname: String,
    pub enabled: bool,
}

/// Payload of `application.created`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationCreated {
    pub application_id: String,
    pub name: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// Payload of `application_group.created`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationGroupCreated {
    pub group_id: String,
    pub name: String,
    pub applications: Vec<String>,
}

/// Payload of `projection.snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionSnapshot {
    /// The long-lived projection table.
    pub table: String,
    /// The row, as `to_jsonb` gives it (counters hold what the dropped events counted).
    pub row: serde_json::Value,
}

/// Payload of `dead_letter.requeued` and `dead_letter.dropped`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterHandled {
    /// `s<shard>-<entry id>` in the dead-letter streams.
    pub dead_letter_id: String,
    pub agent_id: String,
    pub kind: String,
    /// The task's id (`<check>:<slot>:<attempt>` for a check's).
    #[serde(default)]
    pub task: Option<String>,
    /// For a check's task requeued: the attempt it runs as now.
    #[serde(default)]
    pub attempt: Option<u32>,
}

/// Payload of `projection_failure.dropped`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionFailureDropped {
    pub failure_id: i64,
    pub stream: String,
    pub entry_id: String,
    #[serde(default)]
    pub event_id: Option<Uuid>,
    pub error: String,
}

/// Payload of `haproxy.action_updated`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaproxyActionUpdated {
    pub action_id: String,
    /// `running`, `success` or `failed`.
    pub status: String,
    pub attempts: u32,
    /// What happened (already there, set and confirmed, sessions at the end of a drain
    /// wait), or why it failed.
    #[serde(default)]
    pub detail: serde_json::Value,
    #[serde(default)]
    pub error: Option<String>,
}
