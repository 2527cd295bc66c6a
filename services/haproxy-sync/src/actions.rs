//! Executing drain / maint / ready. The owner of an instance takes its pending actions (and
//! running ones nobody here is executing: their executor died) and, for each:
//!
//! 1. if the breaker is open, fails it at once (`ERR_INSTANCE_UNAVAILABLE`);
//! 2. commits `running` (an event, through the outbox) before touching HAProxy;
//! 3. reads the server's state; already there: skips the `set`; else `set server … state …`
//!    and reads back to confirm. After a crash between 2 and the end this is what runs again:
//!    it reads first, so a `set` that went through is never sent twice;
//! 4. for a drain with `drain_wait_ms`, waits (bounded) for current sessions to reach 0;
//! 5. commits `success` with what it did, and the state it read back as an observation
//!    caused by the action (so the history says who changed it); or `failed` with why.
//!
//! Connection errors and timeouts are retried after 1, 2 and 4 × `HAPROXY_ACTION_RETRY_BASE`
//! and count against the breaker; HAProxy's own errors fail at once and do not.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use checkplane_core::keys::Keys;
use checkplane_core::outbox::Written;
use checkplane_runtime::db::Sql;
use checkplane_runtime::stores::Stores;
use checkplane_wire::events::{
    Event, EventBody, HaproxyActionUpdated, HaproxyServerObserved, ObservedServer,
};
use checkplane_wire::haproxy::ServerState as Wanted;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::breaker::Breaker;
use crate::error::SyncError;

use crate::runtime_api::{ApiError, Client};
use crate::ACTOR;

/// How actions run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// First retry delay; then twice, then four times as long.
    pub retry_base: Duration,
    /// How long an open breaker waits before a trial.
    pub cooldown: Duration,
    /// Actions running at once per instance (`HAPROXY_ACTION_PARALLELISM`).
    pub parallelism: usize,
}

/// An action to execute.
#[derive(Debug, Clone)]
pub struct Pending {
    pub action_id: String,
    pub instance_id: String,
    pub server_id: String,
    pub backend: String,
    pub server: String,
    pub action: String,
    pub drain_wait_ms: i64,
    pub version: i64,
}

/// The claim an executor works under: its instance's owner lease, held with `token`.
#[derive(Clone)]
pub struct Fence {
    pub conn: redis::aio::ConnectionManager,
    /// The instance's owner key, and the value it holds while the claim is ours.
    pub key: String,
    pub holder: String,
    pub token: i64,
    /// The least lease time left for a command to HAProxy to be sent: it must end before
    /// anyone else could take the instance.
    pub margin: Duration,
}

/// KEYS: owner. ARGV: holder. What is left of the lease (ms) when it is ours, else -1.
const HELD: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PTTL', KEYS[1]) end
return -1
";

impl Fence {
    /// Whether the claim is still ours with at least `margin` left.
    pub(crate) async fn held(&self) -> bool {
        let mut conn = self.conn.clone();
        static SCRIPT: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(HELD));
        let left: redis::RedisResult<i64> = SCRIPT
            .key(&self.key)
            .arg(&self.holder)
            .invoke_async(&mut conn)
            .await;
        left.is_ok_and(|ms| ms >= i64::try_from(self.margin.as_millis()).unwrap_or(i64::MAX))
    }
}

/// Actions of `instances` waiting for an executor (running ones too: their executor may have
/// died), by instance, oldest first, at most 100 per instance.
pub async fn open_actions(
    stores: &Stores,
    instances: &[&str],
) -> Result<HashMap<String, Vec<Pending>>, SyncError> {
    let mut open: HashMap<String, Vec<Pending>> = HashMap::new();
    if instances.is_empty() {
        return Ok(open);
    }
    let client = stores.pg.get().await?;
    let rows = client
        .query(
            "SELECT action_id, instance_id, server_id, backend, server, action, drain_wait_ms, version
             FROM haproxy_actions WHERE instance_id = ANY($1) AND status IN ('pending', 'running')
             ORDER BY requested_at",
            &[&instances],
        )
        .await?;
    for r in rows {
        let pending = Pending {
            action_id: r.get("action_id"),
            instance_id: r.get("instance_id"),
            server_id: r.get("server_id"),
            backend: r.get("backend"),
            server: r.get("server"),
            action: r.get("action"),
            drain_wait_ms: r.get("drain_wait_ms"),
            version: r.get("version"),
        };
        let queue = open.entry(pending.instance_id.clone()).or_default();
        if queue.len() < 100 {
            queue.push(pending);
        }
    }
    Ok(open)
}

/// Where actions' updates go: the stores, the stream keys, and the service's task tracker
/// their publications run on (shutdown waits for them); and the service's shutdown, which
/// stops an action between its steps (open, it is the next owner's or the next round's).
#[derive(Clone)]
pub struct Outlet {
    pub stores: Stores,
    pub keys: Keys,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
}

/// What every update of one action is recorded with: the outlet, the action, and the
/// fencing token it is executed under.
#[derive(Clone, Copy)]
struct Recorder<'a> {
    outlet: &'a Outlet,
    action: &'a Pending,
    fence: i64,
    /// When this executor took the action up.
    started: Instant,
}

/// Record an update of `action` (version after `*version`), with the server state it read
/// back as an observation caused by it when `observed` (its poll number taken in the same
/// transaction). Published in the background: the outbox has the events once committed, and
/// nothing here waits for the stream.
async fn update(
    record: &Recorder<'_>,
    version: &mut i64,
    observed: Option<ObservedServer>,
    body: HaproxyActionUpdated,
) -> Result<(), SyncError> {
    let Recorder {
        outlet,
        action,
        fence,
        started,
    } = *record;
    *version += 1;
    let event = Event::new(
        format!("haproxy-action:{}", action.action_id),
        *version,
        ACTOR,
        EventBody::HaproxyActionUpdated(body),
    );
    let stream = outlet.keys.events("haproxy");
    let mut client = outlet.stores.pg.get().await?;
    let tx = client.transaction().await?;
    // A newer owner's token (written when it took the instance) refuses this update; the
    // share lock orders it against that write.
    let newest: Option<i64> = tx
        .query_opt(
            "SELECT token FROM haproxy_fences WHERE instance_id = $1 FOR SHARE",
            &[&action.instance_id],
        )
        .await?
        .map(|r| r.get("token"));
    if newest.is_some_and(|t| t > fence) {
        return Err(SyncError::Fenced(action.instance_id.clone()));
    }
    let mut events = Vec::with_capacity(2);
    if let Some(observed) = observed {
        events.push(observation(&tx, action, observed).await?);
    }
    events.push(event);
    // The observation and the update touch rows of their own: recorded together.
    let mut written = Written::new();
    written.append_independent(&tx, &stream, events).await?;
    tx.commit().await?;
    drop(client);
    if let Some(EventBody::HaproxyActionUpdated(u)) = written.events().last().map(|e| &e.body) {
        if u.status == "success" || u.status == "failed" {
            let labels = [
                ("action", action.action.clone()),
                ("status", u.status.clone()),
            ];
            metrics::counter!("checkplane_haproxy_actions_total", &labels).increment(1);
            metrics::histogram!("checkplane_haproxy_action_seconds", &labels)
                .record(started.elapsed().as_secs_f64());
        }
    }
    written.publish(&outlet.stores, &outlet.tracker);
    Ok(())
}

/// Keep the breaker's state where the API reads it.
pub async fn store_breaker(stores: &Stores, instance: &str, breaker: &Breaker) {
    let write = async {
        let client = stores.pg.get().await?;
        let opened_ago_ms = breaker
            .opened_at
            .map(|t| i64::try_from(t.elapsed().as_millis()).unwrap_or(0));
        client
            .execute(
                "INSERT INTO haproxy_breakers (instance_id, state, failures, opened_at, updated_at)
                 VALUES ($1, $2, $3, now() - $4::bigint * interval '1 millisecond', now())
                 ON CONFLICT (instance_id) DO UPDATE SET state = EXCLUDED.state,
                     failures = EXCLUDED.failures, opened_at = EXCLUDED.opened_at, updated_at = now()",
                &[
                    &instance,
                    &breaker.state.name(),
                    &i32::try_from(breaker.failures).unwrap_or(i32::MAX),
                    &opened_ago_ms,
                ],
            )
            .await?;
        Ok::<_, SyncError>(())
    };
    if let Err(error) = write.await {
        tracing::warn!(instance, error = %checkplane_runtime::error_chain(&error), "cannot record the breaker's state");
    }
    metrics::gauge!("checkplane_haproxy_breaker_open", "instance_id" => instance.to_owned()).set(
        if breaker.state.name() == "closed" {
            0.0
        } else {
            1.0
        },
    );
}

/// Why an attempt stopped.
enum Attempt {
    Api(ApiError),
    /// The instance is no longer (surely) ours.
    Fenced,
    /// The service is shutting down.
    Stopped,
}

impl From<ApiError> for Attempt {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl From<crate::replies::Malformed> for Attempt {
    fn from(e: crate::replies::Malformed) -> Self {
        Self::Api(ApiError::Malformed(e))
    }
}

/// What one attempt did.
async fn attempt(
    api: &Client,
    action: &Pending,
    target: Wanted,
    fence: &Fence,
    stop: &CancellationToken,
) -> Result<(Value, ObservedServer), Attempt> {
    // Only while the instance is surely ours: a replica paused past its lease must not change
    // HAProxy under the next owner. No command of the exchange is sent after the margin the
    // lease had left when checked.
    let checked = Instant::now();
    if !fence.held().await {
        return Err(Attempt::Fenced);
    }
    let drain_wait = target == Wanted::Drain && action.drain_wait_ms > 0;
    // Read, set unless already there, read back and (unless a drain waits for its sessions
    // first) the stats row in one turn: through the node's agent, one trip.
    let settled = api
        .settle(
            &action.backend,
            &action.server,
            target,
            !drain_wait,
            checked + fence.margin,
        )
        .await?;
    let (already, after) = (settled.already, settled.after);
    if after.admin_state.state() != target {
        return Err(Attempt::Api(ApiError::Refused(format!(
            "read back {} after set {}",
            after.admin_state.name(),
            target.as_str()
        ))));
    }
    let mut detail = json!({"already": already, "admin_bits": after.admin_state.0});
    let mut scur = None;
    let mut stat = settled.stat;
    if drain_wait {
        let until = Instant::now()
            + Duration::from_millis(u64::try_from(action.drain_wait_ms).unwrap_or(0));
        let started = Instant::now();
        loop {
            let sessions = api
                .show_stat_server(&action.backend, after.server_id)
                .await?
                .and_then(|r| r.scur());
            scur = sessions;
            if sessions == Some(0) || Instant::now() >= until {
                break;
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(Attempt::Stopped),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        detail["drained"] = json!(scur == Some(0));
        detail["scur"] = json!(scur);
        detail["waited_ms"] = json!(started.elapsed().as_millis() as u64);
        stat = api
            .show_stat_server(&action.backend, after.server_id)
            .await?;
    }
    let mut observed = checkplane_haproxy::replies::observed(&after, stat.as_ref());
    observed.scur = scur.or(observed.scur);
    Ok((detail, observed))
}

/// Run one action to its end.
#[allow(clippy::too_many_arguments)]
pub async fn execute(
    outlet: Outlet,
    api: Arc<Client>,
    breaker: Arc<Mutex<Breaker>>,
    settings: Settings,
    action: Pending,
    fence: Fence,
) -> Result<(), SyncError> {
    let mut version = action.version;
    let record = Recorder {
        outlet: &outlet,
        action: &action,
        fence: fence.token,
        started: Instant::now(),
    };
    let Ok(target) = action.action.parse::<Wanted>() else {
        return Ok(());
    };
    let fail = |attempts: u32, error: String| HaproxyActionUpdated {
        action_id: action.action_id.clone(),
        status: "failed".to_owned(),
        attempts,
        detail: Value::Null,
        error: Some(error),
    };
    let allowed = breaker
        .lock()
        .map(|mut b| b.allow(Instant::now()))
        .unwrap_or(false);
    if !allowed {
        let error = "ERR_INSTANCE_UNAVAILABLE: the instance's circuit breaker is open".to_owned();
        return update(&record, &mut version, None, fail(0, error)).await;
    }
    let delays = [
        Duration::ZERO,
        settings.retry_base,
        settings.retry_base * 2,
        settings.retry_base * 4,
    ];
    let mut attempts = 0u32;
    let mut last_error = String::new();
    for (i, delay) in delays.iter().enumerate() {
        if i > 0 {
            tokio::select! {
                _ = outlet.shutdown.cancelled() => return Err(SyncError::Stopped),
                _ = tokio::time::sleep(*delay) => {}
            }
            let allowed = breaker
                .lock()
                .map(|mut b| b.allow(Instant::now()))
                .unwrap_or(false);
            if !allowed {
                last_error =
                    format!("ERR_INSTANCE_UNAVAILABLE: circuit breaker open after: {last_error}");
                break;
            }
        }
        attempts += 1;
        let running = HaproxyActionUpdated {
            action_id: action.action_id.clone(),
            status: "running".to_owned(),
            attempts,
            detail: Value::Null,
            error: None,
        };
        update(&record, &mut version, None, running).await?;
        match attempt(&api, &action, target, &fence, &outlet.shutdown).await {
            Ok((detail, observed)) => {
                if let Ok(mut b) = breaker.lock() {
                    b.success();
                }
                let snapshot = breaker.lock().map(|b| b.clone()).ok();
                if let Some(b) = snapshot {
                    store_breaker(&outlet.stores, &action.instance_id, &b).await;
                }
                let done = HaproxyActionUpdated {
                    action_id: action.action_id.clone(),
                    status: "success".to_owned(),
                    attempts,
                    detail,
                    error: None,
                };
                tracing::info!(action_id = %action.action_id, action = %action.action, server = %action.server, "HAProxy action done");
                return update(&record, &mut version, Some(observed), done).await;
            }
            Err(Attempt::Stopped) => return Err(SyncError::Stopped),
            Err(Attempt::Fenced) => {
                tracing::warn!(action_id = %action.action_id, instance = %action.instance_id, "no longer the instance's owner; leaving the action to the next one");
                return Err(SyncError::Fenced(action.instance_id.clone()));
            }
            Err(Attempt::Api(ApiError::Unreachable(why))) => {
                last_error = why;
                let snapshot = breaker
                    .lock()
                    .map(|mut b| {
                        b.failure(Instant::now());
                        b.clone()
                    })
                    .ok();
                if let Some(b) = snapshot {
                    store_breaker(&outlet.stores, &action.instance_id, &b).await;
                }
                metrics::counter!("checkplane_haproxy_action_attempt_failures_total").increment(1);
                tracing::warn!(action_id = %action.action_id, attempt = attempts, error = %last_error, "HAProxy action attempt failed");
            }
            Err(Attempt::Api(final_error)) => {
                return update(
                    &record,
                    &mut version,
                    None,
                    fail(attempts, final_error.to_string()),
                )
                .await;
            }
        }
    }
    update(&record, &mut version, None, fail(attempts, last_error)).await
}

/// The state an action read back, as an observation caused by it (its own poll number).
async fn observation(
    tx: &deadpool_postgres::Transaction<'_>,
    action: &Pending,
    observed: ObservedServer,
) -> Result<Event, SyncError> {
    let poll: i64 = tx
        .query_one(
            "INSERT INTO haproxy_poll_seq (instance_id, seq) VALUES ($1, 1)
             ON CONFLICT (instance_id) DO UPDATE SET seq = haproxy_poll_seq.seq + 1 RETURNING seq",
            &[&action.instance_id],
        )
        .await?
        .get("seq");
    Ok(Event::new(
        format!("haproxy-server:{}", action.server_id),
        poll,
        ACTOR,
        EventBody::HaproxyServerObserved(Box::new(HaproxyServerObserved {
            instance_id: action.instance_id.clone(),
            poll,
            backend: action.backend.clone(),
            server: action.server.clone(),
            observed,
            cause: action.action_id.clone(),
        })),
    )
    .with_id(checkplane_wire::haproxy::poll_event_id(
        &action.instance_id,
        poll,
        &action.backend,
        &action.server,
    )))
}

/// Which actions this replica is executing (so a round does not start one twice).
#[derive(Default, Clone)]
pub struct Executing(Arc<Mutex<HashSet<String>>>);

impl Executing {
    /// Mark `id` as ours; `false` when it already was.
    pub fn claim(&self, id: &str) -> bool {
        self.0
            .lock()
            .map(|mut s| s.insert(id.to_owned()))
            .unwrap_or(false)
    }
    pub fn release(&self, id: &str) {
        if let Ok(mut s) = self.0.lock() {
            s.remove(id);
        }
    }
}
