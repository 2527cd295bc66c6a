//! The transport through the node's agent, end to end with real processes' code: a real
//! agent (in-process) configured with a real HAProxy's admin socket relays the commands of
//! haproxy-sync, which has no way to the socket itself (the instance has no address). Sync
//! discovers the servers, a drain changes the real server, the agent refuses commands
//! checkplane does not send, replies stay out of the event log, and while the agent is
//! offline commands are refused with `ERR_INSTANCE_UNAVAILABLE`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use checkplane_core::keys::Keys;
use checkplane_core::leases::{LeaseSettings, Leases};
use checkplane_haproxy::relay::{RelayedCommand, RELAY_KIND, SEVERITY_PREFIX};
use checkplane_runtime::Env;
use checkplane_testkit::haproxy::Haproxy;
use checkplane_testkit::{eventually, store_env, Running, TestDb, TestRedis};
use serde_json::{json, Value};

use crate::actions::{act, act_done, admin_bits_in, failed_at_once, settled};
use crate::sync::{
    backends, call, discovered, haproxy_sync_with, history_until, servers_page, Service, ADMIN,
};

const ENROLL: &str = "relay-test-enrollment-0123";

/// Gateway (quick heartbeats) and scheduler (quick offline sweep), in-process.
async fn control_plane(db: &TestDb, redis: &TestRedis) -> (Service, Service) {
    let mut env = store_env(db, redis);
    for (k, v) in [
        ("GATEWAY_ADMIN_KEY", ADMIN),
        ("GATEWAY_ENROLLMENT_TOKEN", ENROLL),
        ("HEARTBEAT_INTERVAL", "300ms"),
    ] {
        env.push((k.to_owned(), v.to_owned()));
    }
    let config = gateway::load(&mut Env::from_pairs(env)).unwrap();
    let gw = Running::start(|l, s| gateway::run(config, l, s)).await;
    gw.wait_ready(Duration::from_secs(10)).await;
    let mut env = store_env(db, redis);
    env.push(("OFFLINE_GRACE".into(), "600ms".into()));
    let config = scheduler::load(&mut Env::from_pairs(env)).unwrap();
    let sched = Running::start(|l, s| scheduler::run(config, l, s)).await;
    sched.wait_ready(Duration::from_secs(10)).await;
    (gw, sched)
}

/// An agent relaying to `socket` (and running tcp checks only): it and its id once online.
async fn relaying_agent(gw: &Service, state: &std::path::Path, socket: &str) -> (Service, String) {
    let env: Vec<(String, String)> = [
        ("AGENT_CONTROL_PLANE", gw.url("/")),
        ("AGENT_ALLOW_PLAINTEXT", "true".to_owned()),
        ("AGENT_STATE_FILE", state.display().to_string()),
        ("AGENT_ENROLLMENT_TOKEN", ENROLL.to_owned()),
        ("AGENT_HOSTNAME", "lb-host-1".to_owned()),
        ("AGENT_HAPROXY_SOCKET", socket.to_owned()),
        ("AGENT_POOL_DNS_SIZE", "0".to_owned()),
        ("AGENT_POOL_HTTP_SIZE", "0".to_owned()),
        ("AGENT_POOL_PING_SIZE", "0".to_owned()),
        ("AGENT_POOL_TRACE_SIZE", "0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let config = agent::load(&mut Env::from_pairs(env)).unwrap();
    let agent = Running::start(|l, s| agent::run(config, l, s)).await;
    agent.wait_ready(Duration::from_secs(10)).await;
    let http = reqwest::Client::new();
    let id = eventually("the agent is online", Duration::from_secs(15), || async {
        let (_, page) = call(&http, gw, "GET", "/v1/agents?status=online", None).await;
        page["items"][0]["agent_id"].as_str().map(str::to_owned)
    })
    .await;
    (agent, id)
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_go_through_the_nodes_agent_and_are_refused_while_it_is_offline() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let ha = Haproxy::start(&backends());
    let (gw, _sched) = control_plane(&db, &redis).await;
    let state = tempdir();
    let socket = ha.admin_socket.display().to_string();
    let (agent, node) = relaying_agent(&gw, &state.0, &socket).await;
    let http = reqwest::Client::new();

    // The node must be marked before an instance may be reached through it.
    let register = json!({"name": "lb-via-agent", "transport": "agent", "node": node});
    let (status, refused) = call(
        &http,
        &gw,
        "POST",
        "/v1/haproxy/instances",
        Some(register.clone()),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("node:"),
        "{refused}"
    );
    let (status, unknown) = mark(&http, &gw, "no-such-agent", true).await;
    assert_eq!(status, 404, "{unknown}");
    let (status, marked) = mark(&http, &gw, &node, true).await;
    assert_eq!(status, 200, "{marked}");
    assert_eq!(marked["haproxy_node"], true);
    assert_eq!(marked["relays"], true, "the agent declares the relay");
    assert_eq!(marked["hostname"], "lb-host-1");
    let (status, instance) =
        call(&http, &gw, "POST", "/v1/haproxy/instances", Some(register)).await;
    assert_eq!(status, 201, "{instance}");
    let id = instance["id"].as_str().unwrap().to_owned();
    let (status, busy) = mark(&http, &gw, &node, false).await;
    assert_eq!(status, 409, "a node in use is not unmarked: {busy}");

    // Sync discovers the servers through the agent: haproxy-sync has no address to use.
    let _sync = haproxy_sync_with(&db, &redis, &[("HAPROXY_SYNC_TIMEOUT", "2s")]).await;
    let found = discovered(&http, &gw, &id, 2).await;
    assert_eq!(found["items"][0]["name"], "be_app");
    let backend = found["items"][0]["id"].as_str().unwrap().to_owned();
    let servers = servers_page(&http, &gw, &backend).await;
    assert_eq!(servers["items"][0]["name"], "s1");
    let s1 = servers["items"][0]["id"].as_str().unwrap().to_owned();

    // A drain through the agent changes the real server, in one relayed task: the agent
    // reads, sets (the server was ready), reads back and reads the stats row.
    let keys = Keys::new(redis.prefix.clone(), 4);
    let relayed_before = relayed_reports(&redis, &keys, &node).await;
    let (status, action) = act(
        &http,
        &gw,
        &s1,
        json!({"action": "drain", "idempotency_key": "relay-drain-1"}),
    )
    .await;
    assert_eq!(status, 202, "{action}");
    let action_id = action["id"].as_str().unwrap().to_owned();
    let done = settled(&http, &gw, &action_id).await;
    assert_eq!(done["status"], "success", "{done}");
    // Forced drain (8), read through the socket.
    assert_eq!(admin_bits_in(&ha, "be_app", "s1"), 8);
    assert_eq!(
        relayed_reports(&redis, &keys, &node).await - relayed_before,
        1,
        "read, set, read-back and stats as one task"
    );
    assert_eq!(done["detail"]["already"], false, "{done}");
    history_until(&http, &gw, &s1, "the drain in history", |h| {
        h["new_state"] == "drain" && h["changed_by"] == action_id.as_str()
    })
    .await;
    // Asked again under another key, the agent finds it drained and sets nothing.
    let relayed_before = relayed_reports(&redis, &keys, &node).await;
    let again = act_done(
        &http,
        &gw,
        &s1,
        json!({"action": "drain", "idempotency_key": "relay-drain-2"}),
    )
    .await;
    assert_eq!(again["status"], "success", "{again}");
    assert_eq!(again["detail"]["already"], true, "{again}");
    assert_eq!(
        relayed_reports(&redis, &keys, &node).await - relayed_before,
        1
    );

    // The commands went as leased tasks of the node's agent, their replies kept out of the
    // event log (only their size is recorded).
    let pg = db.client().await;
    let relayed: Vec<Value> = pg
        .query(
            "SELECT result FROM tasks WHERE agent_id = $1 AND kind = 'haproxy' AND status = 'reported'",
            &[&node],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(relayed.len() >= 4, "{relayed:?}");
    assert!(
        relayed
            .iter()
            .all(|r| r["relayed_bytes"].as_u64().is_some()),
        "{relayed:?}"
    );

    // The agent refuses a command checkplane does not send, and says so.
    let leases = Leases::new(keys.clone(), LeaseSettings::new(30_000, 5));
    let conn = redis.connection().await;
    let deadline_ms = checkplane_runtime::clock::now_ms() + 60_000;
    let command = |command: &str, then: &[&str]| {
        serde_json::to_value(RelayedCommand {
            instance_id: id.clone(),
            command: format!("{SEVERITY_PREFIX}{command}"),
            then: then
                .iter()
                .map(|c| format!("{SEVERITY_PREFIX}{c}"))
                .collect(),
            deadline_ms,
        })
        .unwrap()
    };
    let relay = |task: &'static str, spec: Value| {
        let (leases, keys, node) = (&leases, &keys, &node);
        let mut conn = conn.clone();
        async move {
            let entry = leases
                .enqueue_task(&mut conn, node, RELAY_KIND, task, &spec.to_string())
                .await
                .unwrap();
            let (_, pushed): (String, String) = redis::cmd("BLPOP")
                .arg(keys.relay_reply(node, RELAY_KIND, &entry))
                .arg(10)
                .query_async(&mut conn)
                .await
                .unwrap();
            pushed
        }
    };
    let pushed = relay("hap:test:forbidden", command("show env", &[])).await;
    assert!(pushed.starts_with("failed "), "{pushed}");
    assert!(pushed.contains("ERR_FORBIDDEN"), "{pushed}");
    // Nor does one hide behind an allowed first command; nor more than three follow one.
    let pushed = relay(
        "hap:test:forbidden-then",
        command("show info", &["show env"]),
    )
    .await;
    assert!(pushed.contains("ERR_FORBIDDEN"), "{pushed}");
    let many = ["show info"; 4];
    let pushed = relay("hap:test:too-many", command("show info", &many)).await;
    assert!(pushed.contains("ERR_BAD_SPEC"), "{pushed}");
    // A settle names a backend and server as commands can carry them, and a state to set.
    for (task, backend, state) in [
        ("hap:test:settle-name", "be_app;show env", "drain"),
        ("hap:test:settle-state", "be_app", "stopped"),
    ] {
        let spec = json!({"instance_id": id, "deadline_ms": deadline_ms,
                          "settle": {"backend": backend, "server": "s1", "state": state}});
        let pushed = relay(task, spec).await;
        assert!(pushed.starts_with("failed "), "{pushed}");
        assert!(pushed.contains("ERR_BAD_SPEC"), "{pushed}");
    }
    // A sequence comes back as every command's reply, in order.
    let pushed = relay(
        "hap:test:sequence",
        command("show info", &["show servers state be_app"]),
    )
    .await;
    let (outcome, report) = pushed.split_once(' ').unwrap();
    assert_eq!(outcome, "finished", "{pushed}");
    let report: Value = serde_json::from_str(report).unwrap();
    let replies = report["result"]["replies"].as_array().unwrap();
    assert_eq!(replies.len(), 2, "{report}");
    assert!(replies[0].as_str().unwrap().contains("Pid:"), "{report}");
    assert!(replies[1].as_str().unwrap().contains("be_app"), "{report}");

    // A node whose agent does not relay (no AGENT_HAPROXY_SOCKET): refused, saying so.
    let base = gw.url("");
    let base = base.trim_end_matches('/');
    let (plain, token) = checkplane_testkit::register_agent(
        &http,
        base,
        ENROLL,
        &json!({"hostname": "lb-host-2", "capabilities": {"tcp": 1}}),
    )
    .await;
    let beat = format!("{base}/v1/agents/heartbeat");
    let (status, _) =
        checkplane_testkit::agent_post(&http, &beat, &plain, &token, &json!({})).await;
    assert_eq!(status, 200);
    let (status, marked) = mark(&http, &gw, &plain, true).await;
    assert_eq!(status, 200, "{marked}");
    assert_eq!(marked["relays"], false);
    let (status, silent) = call(
        &http,
        &gw,
        "POST",
        "/v1/haproxy/instances",
        Some(json!({"name": "lb-silent", "transport": "agent", "node": plain})),
    )
    .await;
    assert_eq!(status, 201, "{silent}");
    let (status, refused) = call(
        &http,
        &gw,
        "POST",
        &format!(
            "/v1/haproxy/instances/{}/sync",
            silent["id"].as_str().unwrap()
        ),
        None,
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "ERR_INSTANCE_UNAVAILABLE");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not relay"),
        "{refused}"
    );

    // The agent stops: once it is offline, commands are refused at once.
    agent.stop().await.unwrap();
    eventually(
        "the node's agent is offline",
        Duration::from_secs(15),
        || async {
            let (_, view) = call(
                &http,
                &gw,
                "GET",
                &format!("/v1/servers/{node}/haproxy"),
                None,
            )
            .await;
            (view["agent_status"] == "offline").then_some(())
        },
    )
    .await;
    let (status, refused) = act(
        &http,
        &gw,
        &s1,
        json!({"action": "ready", "idempotency_key": "relay-ready-1"}),
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "ERR_INSTANCE_UNAVAILABLE");
    let (status, refused) = call(
        &http,
        &gw,
        "POST",
        &format!("/v1/haproxy/instances/{id}/sync"),
        None,
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "ERR_INSTANCE_UNAVAILABLE");
    // Its servers stay: an unreachable instance makes no events.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let servers = servers_page(&http, &gw, &backend).await;
    assert_eq!(servers["total"], 2, "{servers}");
}

/// A folder removed when dropped.
struct TempDir(std::path::PathBuf);

fn tempdir() -> TempDir {
    let dir = std::env::temp_dir().join(format!("cp-relay-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir.join("state.json"))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_set_the_nodes_socket_refuses_fails_the_action_at_once_with_haproxys_words() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let ha = Haproxy::start(&backends());
    let (gw, _sched) = control_plane(&db, &redis).await;
    let state = tempdir();
    // The agent's socket is HAProxy's operator-level one: it may read, not set.
    let socket = ha.operator_socket.display().to_string();
    let (_agent, node) = relaying_agent(&gw, &state.0, &socket).await;
    let http = reqwest::Client::new();
    let (_sync, s1) = instance_through(&http, &gw, (&db, &redis), &node, "lb-operator").await;

    let done = act_done(
        &http,
        &gw,
        &s1,
        json!({"action": "maint", "idempotency_key": "operator-maint"}),
    )
    .await;
    failed_at_once(&done, "Permission denied");
    assert_eq!(admin_bits_in(&ha, "be_app", "s1"), 0, "nothing was set");
}

/// `node` marked as an HAProxy node, an instance `name` reached through it, and a haproxy-sync
/// that has discovered its servers: that haproxy-sync, and the id of be_app's s1.
async fn instance_through(
    http: &reqwest::Client,
    gw: &Service,
    (db, redis): (&TestDb, &TestRedis),
    node: &str,
    name: &str,
) -> (Service, String) {
    let (status, marked) = mark(http, gw, node, true).await;
    assert_eq!((status, &marked["relays"]), (200, &json!(true)), "{marked}");
    let register = json!({"name": name, "transport": "agent", "node": node});
    let (status, instance) = call(http, gw, "POST", "/v1/haproxy/instances", Some(register)).await;
    assert_eq!(status, 201, "{instance}");
    let sync = haproxy_sync_with(db, redis, &[("HAPROXY_SYNC_TIMEOUT", "2s")]).await;
    let found = discovered(http, gw, instance["id"].as_str().unwrap(), 2).await;
    let servers = servers_page(http, gw, found["items"][0]["id"].as_str().unwrap()).await;
    assert_eq!(servers["items"][0]["name"], "s1");
    (sync, servers["items"][0]["id"].as_str().unwrap().to_owned())
}

/// An agent from before settles, simulated over the agents' API: it heartbeats, claims its
/// `haproxy` tasks, relays a single command with the real agent's code and refuses a settle as
/// that agent did (`ERR_BAD_SPEC`, not a relayed command). What it was asked, in order: the
/// command line, or `settle`.
fn older_agent(
    gw: &Service,
    id: String,
    token: String,
    socket: std::path::PathBuf,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<String>>>) {
    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    let base = gw.url("");
    let base = base.trim_end_matches('/').to_owned();
    let log = asked.clone();
    let task = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let endpoint = checkplane_haproxy::socket::Endpoint::Unix(socket);
        let (beat, claim, report) = (
            format!("{base}/v1/agents/heartbeat"),
            format!("{base}/v1/agents/claim"),
            format!("{base}/v1/agents/report"),
        );
        let post = checkplane_testkit::agent_post;
        let mut beaten = tokio::time::Instant::now() - Duration::from_secs(1);
        for round in 0u64.. {
            if beaten.elapsed() >= Duration::from_millis(150) {
                post(&http, &beat, &id, &token, &json!({})).await;
                beaten = tokio::time::Instant::now();
            }
            let body = json!({"capacities": {"haproxy": 2}, "request_id": format!("old-{round}"),
                              "wait_ms": 100});
            let (_, claimed) = post(&http, &claim, &id, &token, &body).await;
            for lease in claimed["leases"].as_array().into_iter().flatten() {
                let spec = &lease["spec"];
                let outcome = if spec.get("settle").is_some() {
                    log.lock().unwrap().push("settle".to_owned());
                    agent::check::Outcome::failed(
                        "ERR_BAD_SPEC",
                        "not a relayed command",
                        json!({}),
                    )
                } else {
                    let line = spec["command"].as_str().unwrap_or_default();
                    log.lock()
                        .unwrap()
                        .push(line.trim_start_matches(SEVERITY_PREFIX).to_owned());
                    agent::relay::execute(&endpoint, spec).await
                };
                let done = json!({"completed": [{"token": lease["token"],
                    "outcome": outcome.outcome, "result": outcome.result}]});
                let (status, _) = post(&http, &report, &id, &token, &done).await;
                assert_eq!(status, 200);
            }
        }
    });
    (task, asked)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_from_before_settles_gets_an_actions_commands_one_task_each() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let ha = Haproxy::start(&backends());
    let (gw, _sched) = control_plane(&db, &redis).await;
    let http = reqwest::Client::new();
    let base = gw.url("");
    let (node, token) = checkplane_testkit::register_agent(
        &http,
        base.trim_end_matches('/'),
        ENROLL,
        &json!({"hostname": "lb-old", "capabilities": {"haproxy": 2}}),
    )
    .await;
    let (old, asked) = older_agent(&gw, node.clone(), token, ha.admin_socket.clone());
    eventually(
        "the older agent is online",
        Duration::from_secs(15),
        || async {
            let (_, page) = call(&http, &gw, "GET", "/v1/agents?status=online", None).await;
            (page["total"] == 1).then_some(())
        },
    )
    .await;
    let (_sync, s1) = instance_through(&http, &gw, (&db, &redis), &node, "lb-old").await;

    let before = asked.lock().unwrap().len();
    let done = act_done(
        &http,
        &gw,
        &s1,
        json!({"action": "maint", "idempotency_key": "old-agent-maint"}),
    )
    .await;
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(admin_bits_in(&ha, "be_app", "s1"), 1);
    // The settle was refused once; then the read, the set, the read-back and the stats row
    // went one task each (sync's own polls may come in between).
    let asked: Vec<String> = asked.lock().unwrap()[before..].to_vec();
    let of = |what: &str| asked.iter().filter(|a| a.as_str() == what).count();
    assert_eq!(of("settle"), 1, "{asked:?}");
    assert_eq!(of("set server be_app/s1 state maint"), 1, "{asked:?}");
    let settle_at = asked.iter().position(|a| a == "settle").unwrap();
    let after: Vec<&str> = asked[settle_at + 1..]
        .iter()
        .map(String::as_str)
        .filter(|a| a.starts_with("set server") || a.starts_with("show stat be_app 4 "))
        .collect();
    assert_eq!(after.len(), 2, "the set, then the stats row: {asked:?}");
    assert_eq!(after[0], "set server be_app/s1 state maint");
    old.abort();
}

/// How many relayed commands `agent` has reported: `lease.reported` events of kind
/// `haproxy` in its shard's lease stream (written by the report script itself, so counted
/// without waiting for the projector).
async fn relayed_reports(redis: &TestRedis, keys: &Keys, agent: &str) -> usize {
    let mut conn = redis.connection().await;
    checkplane_testkit::events::read(&mut conn, &keys.lease_events(keys.shard_of(agent)))
        .await
        .into_iter()
        .filter_map(|(_, raw)| serde_json::from_str::<Value>(&raw).ok())
        .filter(|e| {
            e["type"] == "lease.reported"
                && e["payload"]["kind"] == RELAY_KIND
                && e["payload"]["agent_id"] == agent
        })
        .count()
}

/// `PUT /v1/servers/{node}/haproxy` with `enabled`: its status and body.
async fn mark(http: &reqwest::Client, gw: &Service, node: &str, enabled: bool) -> (u16, Value) {
    call(
        http,
        gw,
        "PUT",
        &format!("/v1/servers/{node}/haproxy"),
        Some(json!({"enabled": enabled})),
    )
    .await
}
