//! Sync: every `HAPROXY_SYNC_INTERVAL` (jittered ±10 %; at once for an instance this
//! replica has not polled yet) each instance this replica owns is polled through its Runtime
//! API, and what differs from the projection becomes events: `haproxy.server_observed` for a
//! server new or changed, `haproxy.server_missing` for a known server the poll did not see.
//! Event ids come from (instance, poll number, server), poll numbers from a counter in
//! PostgreSQL (every poll its own number, whichever replica makes it). The events are
//! recorded, applied and put in the outbox in one transaction, then published.
//!
//! Ownership: a Redis lease per instance (`SET NX PX`, renewed by its holder); a replica that
//! dies leaves its instances to the others within one lease period. An unreachable instance
//! makes no events: nothing is soft-deleted while HAProxy cannot be asked.
//!
//! Restarts and reloads: every `HAPROXY_RELOAD_PROBE_INTERVAL` between polls, each owned
//! instance answers `show info`; a new `Pid` or a smaller `Uptime_sec` than its last poll saw
//! makes it due at once, and that poll re-applies the operator's desired states HAProxy lost.
//! Drift: a poll that finds a server off its desired state notes it in `haproxy_drift`
//! (operational); a later poll that finds it still off makes it drifting (the server views'
//! `drift`, and `checkplane_haproxy_servers_drifting` per instance).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use checkplane_core::keys::Keys;
use checkplane_core::outbox::Written;
use checkplane_runtime::db::Sql;
use checkplane_runtime::stores::Stores;
use checkplane_wire::events::{
    Event, EventBody, HaproxyServerMissing, HaproxyServerObserved, ObservedServer,
};
use checkplane_wire::haproxy::{poll_event_id, server_id, Transport as Reached};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::runtime_api::{ApiError, Client, Direct, Endpoint, Transport};

/// How sync runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub interval: Duration,
    /// How often each owned instance is asked whether it restarted (`show info`).
    pub reload_probe: Duration,
    /// How long an owner's claim on an instance lasts without renewal.
    pub lease: Duration,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub actions: crate::actions::Settings,
    /// `HAPROXY_ALLOWED_ADDRESSES`: where direct instances may be reached.
    pub allowed: std::sync::Arc<checkplane_wire::haproxy::AllowedAddresses>,
}

/// An instance as sync needs it.
#[derive(Debug, Clone)]
struct Instance {
    id: String,
    transport: String,
    address: String,
    /// The agent on the HAProxy host (transport `agent`).
    node: Option<String>,
}

pub use crate::error::SyncError;

/// What one poll found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Polled {
    pub poll: i64,
    pub servers: usize,
    pub observed: usize,
    pub missing: usize,
    /// Desired states put back after a restart or reload.
    pub reapplied: usize,
}

/// Instances polled at once in a round.
const POLLS_AT_ONCE: usize = 16;
/// The longest a restart probe may take.
const PROBE_BUDGET: Duration = Duration::from_secs(1);
/// Instances reached through a node's agent are probed this many times less often.
const RELAYED_PROBE_FACTOR: u32 = 5;

/// KEYS: owner, fence counter. ARGV: replica, lease ms, now ms. Renew our lease, or take it
/// when free with the next fencing token (above the last one and at least the time, so tokens
/// keep rising even if Redis lost the counter): the token we hold it with, 0 when another
/// replica does.
const CLAIM: &str = r"
local held = redis.call('GET', KEYS[1])
if held then
  local sep = string.find(held, '/', 1, true)
  if sep and string.sub(held, 1, sep - 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(string.sub(held, sep + 1))
  end
  return 0
end
local token = string.format('%d', math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1, tonumber(ARGV[3])))
redis.call('SET', KEYS[2], token)
redis.call('SET', KEYS[1], ARGV[1] .. '/' .. token, 'PX', ARGV[2])
return tonumber(token)
";

/// The sync of one replica.
pub struct Sync {
    stores: Stores,
    keys: Keys,
    /// The service's tracker: actions run on it.
    tracker: TaskTracker,
    shutdown: CancellationToken,
    settings: Settings,
    /// This replica's name in the leases.
    me: String,
    clients: HashMap<String, (String, std::sync::Arc<Client>)>,
    /// When each owned instance is due.
    due: HashMap<String, Instant>,
    /// When each owned instance's restart probe is due.
    probe_due: HashMap<String, Instant>,
    claim: redis::Script,
    breakers: HashMap<String, std::sync::Arc<std::sync::Mutex<crate::breaker::Breaker>>>,
    /// Bounds the actions running at once on each instance.
    lanes: HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>,
    executing: crate::actions::Executing,
    /// Enqueues and closes the commands relayed through nodes' agents.
    leases: checkplane_core::leases::Leases,
    /// The fencing token each owned instance is held with.
    tokens: HashMap<String, i64>,
    /// The instances the last round held.
    owned: HashMap<String, Instance>,
}

fn jittered(interval: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    interval.mul_f64(0.9 + f64::from(nanos % 1000) / 5000.0)
}

impl Sync {
    /// Actions run, and their updates are published, on `tracker`; `shutdown` stops them
    /// between steps (and keeps queued ones from starting).
    pub fn new(
        stores: Stores,
        keys: Keys,
        settings: Settings,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            tracker,
            shutdown,
            stores,
            keys: keys.clone(),
            settings,
            me: format!("sync-{}", uuid::Uuid::new_v4().simple()),
            clients: HashMap::new(),
            due: HashMap::new(),
            probe_due: HashMap::new(),
            claim: redis::Script::new(CLAIM),
            breakers: HashMap::new(),
            lanes: HashMap::new(),
            executing: crate::actions::Executing::default(),
            tokens: HashMap::new(),
            owned: HashMap::new(),
            leases: checkplane_core::leases::Leases::new(
                keys.clone(),
                checkplane_core::leases::LeaseSettings::new(0, 0),
            ),
        }
    }

    fn client(&mut self, instance: &Instance) -> std::sync::Arc<Client> {
        // The way to the instance: its address and, through an agent, which agent.
        let route = format!(
            "{} {} {}",
            instance.transport,
            instance.node.as_deref().unwrap_or(""),
            instance.address
        );
        let fresh = self
            .clients
            .get(&instance.id)
            .is_none_or(|(known, _)| *known != route);
        if fresh {
            let reached = instance.transport.parse::<Reached>();
            let transport: Box<dyn Transport> = match (reached, &instance.node) {
                (Ok(Reached::Agent), Some(node)) => Box::new(crate::relay::Relay {
                    stores: self.stores.clone(),
                    leases: self.leases.clone(),
                    instance: instance.id.clone(),
                    agent: node.clone(),
                    read_timeout: self.settings.read_timeout,
                    waiter: tokio::sync::Mutex::new(None),
                }),
                _ => Box::new(Direct {
                    endpoint: Endpoint::parse(&instance.address),
                    connect_timeout: self.settings.connect_timeout,
                    read_timeout: self.settings.read_timeout,
                    allowed: self.settings.allowed.clone(),
                }),
            };
            let client = Client::new(transport);
            self.clients
                .insert(instance.id.clone(), (route, std::sync::Arc::new(client)));
        }
        self.clients[&instance.id].1.clone()
    }

    /// One round: claim or renew the instances, poll the ones due.
    pub async fn round(&mut self) -> Result<(), SyncError> {
        let client = self.stores.pg.get().await?;
        let instances: Vec<Instance> = client
            .query(
                "SELECT instance_id, transport, address, node FROM haproxy_instances
                 WHERE removed_at IS NULL ORDER BY instance_id",
                &[],
            )
            .await?
            .iter()
            .map(|r| Instance {
                id: r.get("instance_id"),
                transport: r.get("transport"),
                address: r.get("address"),
                node: r.get("node"),
            })
            .collect();
        drop(client);
        let conn = self.stores.redis_shared.clone();
        let lease_ms = u64::try_from(self.settings.lease.as_millis()).unwrap_or(15_000);
        let live: std::collections::HashSet<&str> =
            instances.iter().map(|i| i.id.as_str()).collect();
        // Instances removed since: their gauges say nothing more (an alert on them would go on
        // firing for an instance that is gone).
        let gone: Vec<String> = self
            .tokens
            .keys()
            .chain(self.breakers.keys())
            .filter(|id| !live.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            metrics::gauge!("checkplane_haproxy_servers_drifting", "instance_id" => id.clone())
                .set(0.0);
            metrics::gauge!("checkplane_haproxy_breaker_open", "instance_id" => id.clone())
                .set(0.0);
            self.tokens.remove(&id);
            self.breakers.remove(&id);
        }
        self.due.retain(|id, _| live.contains(id.as_str()));
        self.probe_due.retain(|id, _| live.contains(id.as_str()));
        self.clients.retain(|id, _| live.contains(id.as_str()));
        // The leases of every instance renewed or taken at once (pipelined on the shared
        // connection), then one query for the open actions of all the instances held.
        let claims = instances.iter().map(|instance| {
            let mut conn = conn.clone();
            let (script, me) = (&self.claim, &self.me);
            let (key, counter) = (
                self.keys.haproxy_owner(&instance.id),
                self.keys.haproxy_fence(&instance.id),
            );
            async move {
                script
                    .key(key)
                    .key(counter)
                    .arg(me)
                    .arg(lease_ms)
                    .arg(checkplane_runtime::clock::now_ms())
                    .invoke_async::<i64>(&mut conn)
                    .await
            }
        });
        let held = futures::future::join_all(claims).await;
        let mut owned = Vec::new();
        let mut taken = Vec::new();
        for (instance, held) in instances.iter().zip(held) {
            let token = held?;
            if token > 0 {
                owned.push(instance);
                if self.tokens.insert(instance.id.clone(), token) != Some(token) {
                    taken.push((instance.id.clone(), token));
                }
            } else {
                // Another replica's; poll at once should it come to us.
                self.due.remove(&instance.id);
                if self.tokens.remove(&instance.id).is_some() {
                    // Its new owner counts its drift and keeps its breaker now; this replica's
                    // figures would go stale.
                    metrics::gauge!("checkplane_haproxy_servers_drifting", "instance_id" => instance.id.clone())
                        .set(0.0);
                    metrics::gauge!("checkplane_haproxy_breaker_open", "instance_id" => instance.id.clone())
                        .set(0.0);
                }
            }
        }
        if !taken.is_empty() {
            self.record_fences(&taken).await?;
        }
        self.owned = owned.iter().map(|i| (i.id.clone(), (*i).clone())).collect();
        let ids: Vec<&str> = owned.iter().map(|i| i.id.as_str()).collect();
        // The open actions, and the forced syncs (`POST /v1/haproxy/instances/{id}/sync`)
        // taken at once too: side by side.
        let (open, forced) = futures::join!(
            crate::actions::open_actions(&self.stores, &ids),
            futures::future::join_all(owned.iter().map(|instance| {
                let mut conn = conn.clone();
                let key = self.keys.haproxy_sync_request(&instance.id);
                async move {
                    redis::cmd("GETDEL")
                        .arg(key)
                        .query_async::<Option<String>>(&mut conn)
                        .await
                }
            }))
        );
        let mut open = open?;
        self.probe_restarts(&owned).await?;
        let mut due_now = Vec::new();
        for (instance, forced) in owned.into_iter().zip(forced) {
            if let Some(actions) = open.remove(&instance.id) {
                self.start_actions(instance, actions);
            }
            if forced?.is_some() {
                self.due.insert(instance.id.clone(), Instant::now());
            }
            let due = *self
                .due
                .entry(instance.id.clone())
                .or_insert_with(Instant::now);
            if Instant::now() < due {
                continue;
            }
            self.due.insert(
                instance.id.clone(),
                Instant::now() + jittered(self.settings.interval),
            );
            due_now.push((
                instance.clone(),
                self.client(instance),
                self.fence(&instance.id),
            ));
        }
        // The due instances polled side by side (each on its own connections), a few at once.
        let (stores, keys) = (&self.stores, &self.keys);
        let mut polls = futures::stream::iter(due_now.into_iter().map(
            |(instance, api, fence)| async move {
                let polled = poll(stores, keys, &instance.id, &api, &fence).await;
                (instance, polled)
            },
        ))
        .buffer_unordered(POLLS_AT_ONCE);
        while let Some((instance, polled)) = polls.next().await {
            match polled {
                Ok(polled) => tracing::debug!(instance = %instance.id, ?polled, "polled HAProxy"),
                Err(SyncError::Api(error)) => {
                    metrics::counter!("checkplane_haproxy_poll_failures_total").increment(1);
                    tracing::warn!(instance = %instance.id, transport = %instance.transport, %error, "HAProxy poll failed");
                }
                Err(SyncError::Fenced(id)) => {
                    tracing::warn!(instance = %id, "no longer the instance's owner; left the rest of its poll to the next one");
                }
                Err(other) => return Err(other),
            }
        }
        Ok(())
    }
}

impl Sync {
    /// Ask each owned instance whose probe is due (and that is not due for a poll anyway)
    /// for its `Pid` and `Uptime_sec`: one that restarted or reloaded since its last poll is
    /// made due at once, so its desired states are back within seconds, not at the next poll.
    /// An instance that does not answer is left to its poll.
    async fn probe_restarts(&mut self, owned: &[&Instance]) -> Result<(), SyncError> {
        let now = Instant::now();
        let mut probed = Vec::new();
        for instance in owned {
            let poll_due = self.due.get(&instance.id).is_none_or(|due| *due <= now);
            let probe_due = self
                .probe_due
                .get(&instance.id)
                .is_none_or(|due| *due <= now);
            if poll_due || !probe_due {
                continue;
            }
            // Through a node's agent each probe is a leased task (two lease events): less often.
            let every = if Reached::is_agent(&instance.transport) {
                self.settings.reload_probe * RELAYED_PROBE_FACTOR
            } else {
                self.settings.reload_probe
            };
            self.probe_due.insert(instance.id.clone(), now + every);
            probed.push(((*instance).clone(), self.client(instance)));
        }
        if probed.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = probed.iter().map(|(i, _)| i.id.as_str()).collect();
        let last: HashMap<String, (Option<i64>, Option<i64>)> = self
            .stores
            .pg
            .get()
            .await?
            .query(
                "SELECT instance_id, pid, uptime_sec FROM haproxy_poll_seq
                 WHERE instance_id = ANY($1)",
                &[&ids],
            )
            .await?
            .iter()
            .map(|r| (r.get("instance_id"), (r.get("pid"), r.get("uptime_sec"))))
            .collect();
        // A direct probe never holds a round up for long (the round also renews leases and
        // starts actions): one that does not answer in time is left to the instance's poll.
        // A relayed one is not cut short: its relay closes the task it enqueued when the
        // command's own timeout passes, and a cut would leave that task and its waiting
        // connection behind.
        let (direct, relayed) = (
            PROBE_BUDGET.min(self.settings.read_timeout),
            self.settings.read_timeout + Duration::from_secs(5),
        );
        let answers = futures::stream::iter(probed.into_iter().map(|(instance, api)| async move {
            let budget = if Reached::is_agent(&instance.transport) {
                relayed
            } else {
                direct
            };
            let info = match tokio::time::timeout(budget, api.show_info()).await {
                Ok(info) => info,
                Err(_) => Err(ApiError::Unreachable("restart probe timed out".to_owned())),
            };
            (instance, info)
        }))
        .buffer_unordered(POLLS_AT_ONCE)
        .collect::<Vec<_>>()
        .await;
        for (instance, info) in answers {
            let info = match info {
                Ok(info) if !info.stopping() => info,
                Ok(_) => continue,
                Err(error) => {
                    tracing::debug!(instance = %instance.id, %error, "restart probe unanswered");
                    continue;
                }
            };
            let Some(&(pid, uptime)) = last.get(&instance.id) else {
                continue;
            };
            let now_seen = (
                info.pid().map(i64::from),
                info.uptime_sec().and_then(|u| i64::try_from(u).ok()),
            );
            if restarted((pid, uptime), now_seen) {
                tracing::info!(instance = %instance.id, "restart probe: HAProxy restarted or reloaded; polling now");
                self.due.insert(instance.id.clone(), Instant::now());
            }
        }
        Ok(())
    }

    /// The claim this replica holds `instance` under, for commands that change HAProxy.
    fn fence(&self, instance: &str) -> crate::actions::Fence {
        let token = self.tokens.get(instance).copied().unwrap_or(0);
        crate::actions::Fence {
            conn: self.stores.redis_shared.clone(),
            key: self.keys.haproxy_owner(instance),
            holder: format!("{}/{token}", self.me),
            token,
            // A command's whole timeout, or half a lease when the lease is shorter.
            margin: self.settings.read_timeout.min(self.settings.lease / 2),
        }
    }

    /// Write the tokens of instances just taken where action updates check them: from then
    /// on, updates made under an older owner's token are refused.
    async fn record_fences(&self, taken: &[(String, i64)]) -> Result<(), SyncError> {
        let (ids, tokens): (Vec<&str>, Vec<i64>) =
            taken.iter().map(|(i, t)| (i.as_str(), *t)).unzip();
        let client = self.stores.pg.get().await?;
        client
            .execute(
                "INSERT INTO haproxy_fences (instance_id, token, owner, updated_at)
                 SELECT i, t, $3, now() FROM unnest($1::text[], $2::bigint[]) AS f(i, t)
                 ON CONFLICT (instance_id) DO UPDATE SET token = EXCLUDED.token,
                     owner = EXCLUDED.owner, updated_at = now()
                 WHERE haproxy_fences.token < EXCLUDED.token",
                &[&ids, &tokens, &self.me],
            )
            .await?;
        Ok(())
    }

    /// Start the open actions of `instance` at once when it was held at the last round
    /// (rounds come well inside the lease; an executor still checks the lease before it
    /// changes HAProxy, and its updates are fenced in PostgreSQL): one query instead of a
    /// round. False when the instance is not ours, or not known to be: a round decides then.
    pub async fn start_open(&mut self, instance: &str) -> Result<bool, SyncError> {
        let Some(instance) = self.owned.get(instance).cloned() else {
            return Ok(false);
        };
        if !self.tokens.contains_key(&instance.id) {
            return Ok(false);
        }
        let mut open = crate::actions::open_actions(&self.stores, &[instance.id.as_str()]).await?;
        if let Some(actions) = open.remove(&instance.id) {
            self.start_actions(&instance, actions);
        }
        Ok(true)
    }

    /// Start executing the instance's `open` actions nobody here runs yet.
    fn start_actions(&mut self, instance: &Instance, open: Vec<crate::actions::Pending>) {
        let api = self.client(instance);
        let cooldown = self.settings.actions.cooldown;
        let breaker = self
            .breakers
            .entry(instance.id.clone())
            .or_insert_with(|| {
                std::sync::Arc::new(std::sync::Mutex::new(crate::breaker::Breaker::new(
                    cooldown,
                )))
            })
            .clone();
        let parallelism = self.settings.actions.parallelism;
        let lanes = self
            .lanes
            .entry(instance.id.clone())
            .or_insert_with(|| std::sync::Arc::new(tokio::sync::Semaphore::new(parallelism)))
            .clone();
        for action in open {
            if !self.executing.claim(&action.action_id) {
                continue;
            }
            let lanes = lanes.clone();
            let outlet = crate::actions::Outlet {
                stores: self.stores.clone(),
                keys: self.keys.clone(),
                tracker: self.tracker.clone(),
                shutdown: self.shutdown.clone(),
            };
            let (api, breaker) = (api.clone(), breaker.clone());
            let (settings, executing) = (self.settings.actions.clone(), self.executing.clone());
            let fence = self.fence(&instance.id);
            self.tracker.spawn(async move {
                let id = action.action_id.clone();
                // A queued action does not start once shutdown began.
                let stop = outlet.shutdown.clone();
                let lane = tokio::select! {
                    _ = stop.cancelled() => None,
                    lane = lanes.acquire_owned() => lane.ok(),
                };
                let Some(_lane) = lane else {
                    executing.release(&id);
                    return;
                };
                if let Err(error) =
                    crate::actions::execute(outlet, api, breaker, settings, action, fence)
                        .await
                {
                    tracing::warn!(action_id = %id, error = %checkplane_runtime::error_chain(&error), "HAProxy action interrupted; retried next round");
                }
                executing.release(&id);
            });
        }
    }
}

/// A new process, or one younger than the last poll saw: HAProxy restarted or reloaded.
/// `(pid, uptime_sec)` as the last poll saw them and as seen now.
fn restarted(before: (Option<i64>, Option<i64>), now: (Option<i64>, Option<i64>)) -> bool {
    let ((old_pid, old_uptime), (pid, uptime)) = (before, now);
    (old_pid.is_some() && old_pid != pid)
        || matches!((old_uptime, uptime), (Some(o), Some(n)) if n < o)
}

/// Poll one instance and record what changed.
pub async fn poll(
    stores: &Stores,
    keys: &Keys,
    instance: &str,
    api: &Client,
    fence: &crate::actions::Fence,
) -> Result<Polled, SyncError> {
    let info = api.show_info().await?;
    if info.stopping() {
        // An old process finishing after a reload: not the current state.
        return Ok(Polled::default());
    }
    let states = api.show_servers_state(None).await?;
    let stats = api.show_stat().await?;
    let stat: HashMap<(&str, &str), &crate::replies::StatRow> =
        stats.iter().map(|r| ((r.proxy(), r.name()), r)).collect();
    let seen: BTreeMap<(String, String), ObservedServer> = states
        .iter()
        .map(|s| {
            let row = stat.get(&(s.backend.as_str(), s.server.as_str())).copied();
            (
                (s.backend.clone(), s.server.clone()),
                checkplane_haproxy::replies::observed(s, row),
            )
        })
        .collect();

    let mut client = stores.pg.get().await?;
    let tx = client.transaction().await?;
    let pid = info.pid().map(i64::from);
    let uptime = info.uptime_sec().and_then(|u| i64::try_from(u).ok());
    let before = tx
        .query_opt(
            "SELECT pid, uptime_sec FROM haproxy_poll_seq WHERE instance_id = $1 FOR UPDATE",
            &[&instance],
        )
        .await?;
    let restarted = before
        .as_ref()
        .is_some_and(|r| restarted((r.get("pid"), r.get("uptime_sec")), (pid, uptime)));
    let poll: i64 = tx
        .query_one(
            "INSERT INTO haproxy_poll_seq (instance_id, seq, pid, uptime_sec) VALUES ($1, 1, $2, $3)
             ON CONFLICT (instance_id) DO UPDATE SET seq = haproxy_poll_seq.seq + 1,
                 pid = EXCLUDED.pid, uptime_sec = EXCLUDED.uptime_sec
             RETURNING seq",
            &[&instance, &pid, &uptime],
        )
        .await?
        .get("seq");
    // What the projection holds now, to compare with.
    let rows = tx
        .query(
            "SELECT backend, name, address, port, weight, op_state, admin_state, admin_bits,
                    status, check_status, removed_at IS NOT NULL AS removed, desired_state
             FROM haproxy_servers WHERE instance_id = $1",
            &[&instance],
        )
        .await?;
    let desired: HashMap<(String, String), String> = rows
        .iter()
        .filter_map(|r| {
            Some((
                (r.get("backend"), r.get("name")),
                r.get::<_, Option<String>>("desired_state")?,
            ))
        })
        .collect();
    let known: HashMap<(String, String), (Option<ObservedServer>, bool)> = rows
        .iter()
        .map(|r| {
            let observed = r
                .get::<_, Option<String>>("address")
                .map(|address| ObservedServer {
                    address,
                    port: r
                        .get::<_, Option<i32>>("port")
                        .and_then(|p| u16::try_from(p).ok()),
                    weight: r
                        .get::<_, Option<i32>>("weight")
                        .and_then(|w| u32::try_from(w).ok())
                        .unwrap_or(0),
                    op_state: r.get::<_, Option<String>>("op_state").unwrap_or_default(),
                    admin_state: r
                        .get::<_, Option<String>>("admin_state")
                        .unwrap_or_default(),
                    admin_bits: r
                        .get::<_, Option<i32>>("admin_bits")
                        .and_then(|b| u32::try_from(b).ok())
                        .unwrap_or(0),
                    status: r.get("status"),
                    check_status: r.get("check_status"),
                    scur: None,
                });
            (
                (r.get("backend"), r.get("name")),
                (observed, r.get("removed")),
            )
        })
        .collect();
    let event = |backend: &str, server: &str, body: EventBody| {
        Event::new(
            format!("haproxy-server:{}", server_id(instance, backend, server)),
            poll,
            crate::ACTOR,
            body,
        )
        .with_id(poll_event_id(instance, poll, backend, server))
    };
    let mut events = Vec::new();
    let mut polled = Polled {
        poll,
        servers: seen.len(),
        ..Polled::default()
    };
    for ((backend, server), observed) in &seen {
        let same = known
            .get(&(backend.clone(), server.clone()))
            .is_some_and(|(was, removed)| {
                // Sessions come and go: not a change worth an event by themselves.
                !removed
                    && was.as_ref().is_some_and(|w| {
                        ObservedServer {
                            scur: None,
                            ..observed.clone()
                        } == *w
                    })
            });
        if same {
            continue;
        }
        polled.observed += 1;
        events.push(event(
            backend,
            server,
            EventBody::HaproxyServerObserved(Box::new(HaproxyServerObserved {
                instance_id: instance.to_owned(),
                poll,
                backend: backend.clone(),
                server: server.clone(),
                observed: observed.clone(),
                cause: "sync".to_owned(),
            })),
        ));
    }
    for ((backend, server), (_, removed)) in &known {
        if *removed || seen.contains_key(&(backend.clone(), server.clone())) {
            continue;
        }
        polled.missing += 1;
        events.push(event(
            backend,
            server,
            EventBody::HaproxyServerMissing(HaproxyServerMissing {
                instance_id: instance.to_owned(),
                poll,
                backend: backend.clone(),
                server: server.clone(),
            }),
        ));
    }
    let stream = keys.events("haproxy");
    // Each event touches its own server's rows: recorded together, applied pipelined.
    let mut written = Written::new();
    written.append_independent(&tx, &stream, events).await?;
    let off: Vec<String> = seen
        .iter()
        .filter(|(at, now)| desired.get(*at).is_some_and(|d| *d != now.admin_state))
        .map(|((backend, server), _)| server_id(instance, backend, server))
        .collect();
    // After a restart, the re-apply below forgets the servers it puts back.
    note_drift(&tx, instance, poll, &off).await?;
    let drifting = drifting(&tx, instance).await?;
    tx.commit().await?;
    metrics::gauge!("checkplane_haproxy_servers_drifting", "instance_id" => instance.to_owned())
        .set(drifting as f64);
    drop(client);
    written.publish_now(stores).await;
    metrics::counter!("checkplane_haproxy_polls_total").increment(1);
    if restarted {
        tracing::warn!(
            instance,
            ?pid,
            "HAProxy restarted or reloaded; re-applying desired states"
        );
        polled.reapplied = reapply(stores, keys, instance, api, &seen, fence).await?;
    }
    Ok(polled)
}

/// Note which servers of `instance` poll `poll` found off their desired state (`off`, server
/// ids): those off at an earlier poll too keep the poll they went off at; the others are
/// forgotten.
async fn note_drift(
    tx: &impl Sql,
    instance: &str,
    poll: i64,
    off: &[String],
) -> Result<(), SyncError> {
    tx.execute(
        "DELETE FROM haproxy_drift WHERE instance_id = $1 AND server_id <> ALL($2)",
        &[&instance, &off],
    )
    .await?;
    tx.execute(
        "INSERT INTO haproxy_drift (server_id, instance_id, since_poll, last_poll, since)
         SELECT s, $1, $3, $3, now() FROM unnest($2::text[]) AS s
         ON CONFLICT (server_id) DO UPDATE SET last_poll = EXCLUDED.last_poll",
        &[&instance, &off, &poll],
    )
    .await?;
    Ok(())
}

/// How many servers of `instance` drift: off their desired state at more than one poll, and
/// still off now (an action or a re-apply since may have put them back). What the server
/// views' `drift` says, counted.
async fn drifting(tx: &impl Sql, instance: &str) -> Result<i64, SyncError> {
    Ok(tx
        .query_one(
            "SELECT count(*) AS n FROM haproxy_drift d JOIN haproxy_servers s USING (server_id)
             WHERE d.instance_id = $1 AND d.last_poll > d.since_poll
               AND s.desired_state IS NOT NULL AND s.removed_at IS NULL
               AND s.admin_state IS DISTINCT FROM s.desired_state",
            &[&instance],
        )
        .await?
        .get("n"))
}

/// After a restart or reload: every server whose operator-desired state HAProxy no longer
/// has gets it again, read back, and recorded in its history (`reapply:<who asked>`).
async fn reapply(
    stores: &Stores,
    keys: &Keys,
    instance: &str,
    api: &Client,
    seen: &BTreeMap<(String, String), ObservedServer>,
    fence: &crate::actions::Fence,
) -> Result<usize, SyncError> {
    let client = stores.pg.get().await?;
    let wanted = client
        .query(
            "SELECT backend, name, desired_state, desired_by FROM haproxy_servers
             WHERE instance_id = $1 AND desired_state IS NOT NULL AND removed_at IS NULL",
            &[&instance],
        )
        .await?;
    drop(client);
    let mut reapplied = 0;
    for row in &wanted {
        let (backend, server, desired, by): (String, String, String, Option<String>) = (
            row.get("backend"),
            row.get("name"),
            row.get("desired_state"),
            row.get("desired_by"),
        );
        let Ok(target) = desired.parse::<checkplane_wire::haproxy::ServerState>() else {
            continue;
        };
        // Only servers this poll saw, in another state than desired.
        let Some(now) = seen.get(&(backend.clone(), server.clone())) else {
            continue;
        };
        if now.admin_state == desired {
            continue;
        }
        // As an action's exchange: only while the instance is surely ours, set unless already
        // there (another owner may have been quicker), read back; one trip through an agent.
        let checked = Instant::now();
        if !fence.held().await {
            return Err(SyncError::Fenced(instance.to_owned()));
        }
        // The stats row too: the history names the status the state restored (`DRAIN`),
        // not the one the reloaded process had before it (`no check`).
        let settled = api
            .settle(&backend, &server, target, true, checked + fence.margin)
            .await?;
        if settled.already {
            continue;
        }
        let observed = checkplane_haproxy::replies::observed(&settled.after, settled.stat.as_ref());
        let mut client = stores.pg.get().await?;
        let tx = client.transaction().await?;
        let poll: i64 = tx
            .query_one(
                "UPDATE haproxy_poll_seq SET seq = seq + 1 WHERE instance_id = $1 RETURNING seq",
                &[&instance],
            )
            .await?
            .get("seq");
        let event = Event::new(
            format!("haproxy-server:{}", server_id(instance, &backend, &server)),
            poll,
            crate::ACTOR,
            EventBody::HaproxyServerObserved(Box::new(HaproxyServerObserved {
                instance_id: instance.to_owned(),
                poll,
                backend: backend.clone(),
                server: server.clone(),
                observed,
                cause: format!("reapply:{}", by.unwrap_or_default()),
            })),
        )
        .with_id(poll_event_id(instance, poll, &backend, &server));
        let stream = keys.events("haproxy");
        let mut written = Written::new();
        written.append(&tx, &stream, &event).await?;
        // Back where it is wanted: nothing to count towards drift.
        tx.execute(
            "DELETE FROM haproxy_drift WHERE server_id = $1",
            &[&server_id(instance, &backend, &server)],
        )
        .await?;
        let drifting = drifting(&tx, instance).await?;
        tx.commit().await?;
        drop(client);
        metrics::gauge!("checkplane_haproxy_servers_drifting", "instance_id" => instance.to_owned())
            .set(drifting as f64);
        written.publish_now(stores).await;
        reapplied += 1;
    }
    Ok(reapplied)
}
