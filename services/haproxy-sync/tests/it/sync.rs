//! Sync end to end: an instance registered over the gateway's API is polled by haproxy-sync
//! through a real HAProxy's Runtime API; backends and servers appear in the read API, a state
//! changed behind our back shows in the server's history, a server removed by a reload is
//! soft-deleted after two polls, and nothing is deleted while HAProxy is down.

use std::time::Duration;

use checkplane_runtime::Env;
use checkplane_testkit::haproxy::Haproxy;
use checkplane_testkit::{eventually, store_env, Running, TestDb, TestRedis};
use serde_json::{json, Value};

pub const ADMIN: &str = "sync-test-admin-key-012345";

pub type Service = Running<checkplane_runtime::RunError>;

pub async fn gateway(db: &TestDb, redis: &TestRedis) -> Service {
    let mut env = store_env(db, redis);
    env.push(("GATEWAY_ADMIN_KEY".into(), ADMIN.into()));
    // Some tests send a thousand requests at once, all from 127.0.0.1, with one key.
    env.push(("HTTP_MAX_CONNECTIONS_PER_ADDRESS".into(), "0".into()));
    env.push(("GATEWAY_RATE_OPERATOR".into(), "off".into()));
    let config = gateway::load(&mut Env::from_pairs(env)).unwrap();
    let gw = Running::start(|l, s| gateway::run(config, l, s)).await;
    gw.wait_ready(Duration::from_secs(10)).await;
    gw
}

async fn haproxy_sync(db: &TestDb, redis: &TestRedis) -> Service {
    haproxy_sync_with(db, redis, &[]).await
}

pub async fn haproxy_sync_with(db: &TestDb, redis: &TestRedis, extra: &[(&str, &str)]) -> Service {
    let mut env = store_env(db, redis);
    for (k, v) in [
        ("HAPROXY_SYNC_INTERVAL", "1s"),
        ("HAPROXY_SYNC_LEASE", "2s"),
        ("HAPROXY_SYNC_TIMEOUT", "500ms"),
    ] {
        if !extra.iter().any(|(name, _)| *name == k) {
            env.push((k.to_owned(), v.to_owned()));
        }
    }
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let config = haproxy_sync::load(&mut Env::from_pairs(env)).unwrap();
    let sync = Running::start(|l, s| haproxy_sync::run(config, l, s)).await;
    sync.wait_ready(Duration::from_secs(10)).await;
    sync
}

pub async fn call(
    http: &reqwest::Client,
    gw: &Service,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http
        .request(method.parse().unwrap(), gw.url(path))
        .header("x-api-key", ADMIN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The state history of `server`, oldest first.
pub async fn history(http: &reqwest::Client, gw: &Service, server: &str) -> Vec<Value> {
    let (_, page) = call(
        http,
        gw,
        "GET",
        &format!("/v1/haproxy/servers/{server}/history"),
        None,
    )
    .await;
    page["items"].as_array().cloned().unwrap_or_default()
}

/// The history of `server` once a row of it satisfies `found`.
pub async fn history_until(
    http: &reqwest::Client,
    gw: &Service,
    server: &str,
    what: &str,
    found: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    eventually(what, Duration::from_secs(15), || async {
        let items = history(http, gw, server).await;
        items.iter().any(&found).then_some(items)
    })
    .await
}

/// `GET /v1/haproxy/backends/{backend}/servers`: the first page.
pub async fn servers_page(http: &reqwest::Client, gw: &Service, backend: &str) -> Value {
    let (status, page) = call(
        http,
        gw,
        "GET",
        &format!("/v1/haproxy/backends/{backend}/servers"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    page
}

/// The backends page of `instance` once it lists `n` backends.
pub async fn discovered(http: &reqwest::Client, gw: &Service, instance: &str, n: usize) -> Value {
    eventually("backends discovered", Duration::from_secs(15), || async {
        let (_, page) = call(
            http,
            gw,
            "GET",
            &format!("/v1/haproxy/instances/{instance}/backends"),
            None,
        )
        .await;
        (page["total"] == n).then_some(page)
    })
    .await
}

pub fn backends() -> Vec<(&'static str, Vec<(&'static str, u16)>)> {
    vec![
        ("be_app", vec![("s1", 18101), ("s2", 18102)]),
        ("be_other", vec![("o1", 18201)]),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_discovers_follows_and_soft_deletes_servers() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut ha = Haproxy::start(&backends());
    let gw = gateway(&db, &redis).await;
    let http = reqwest::Client::new();
    let (status, instance) = call(
        &http,
        &gw,
        "POST",
        "/v1/haproxy/instances",
        Some(json!({"name": "lb-1", "address": ha.stats.to_string()})),
    )
    .await;
    assert_eq!(status, 201, "{instance}");
    let id = instance["id"].as_str().unwrap().to_owned();
    let sync = haproxy_sync(&db, &redis).await;

    // Discovered: both backends with their servers.
    let found = discovered(&http, &gw, &id, 2).await;
    assert_eq!(found["items"][0]["name"], "be_app");
    assert_eq!(found["items"][0]["servers"], 2);
    assert_eq!(found["items"][1]["servers"], 1);
    let backend = found["items"][0]["id"].as_str().unwrap().to_owned();
    let servers_of = |include_removed: bool| {
        let (http, gw, backend) = (&http, &gw, backend.clone());
        async move {
            let (_, page) = call(
                http,
                gw,
                "GET",
                &format!(
                    "/v1/haproxy/backends/{backend}/servers?include_removed={include_removed}"
                ),
                None,
            )
            .await;
            page["items"].as_array().cloned().unwrap_or_default()
        }
    };
    let servers = servers_of(false).await;
    assert_eq!(servers[0]["name"], "s1");
    assert_eq!(servers[0]["observed"]["admin_state"], "ready");
    assert_eq!(servers[0]["observed"]["port"], 18101);
    assert!(servers[0]["desired"]["state"].is_null());
    let s1 = servers[0]["id"].as_str().unwrap().to_owned();

    // Drained behind our back (straight through the socket): the next poll records it.
    assert_eq!(ha.command("set server be_app/s1 state drain").trim(), "");
    let history = history_until(&http, &gw, &s1, "the drain is in the history", |h| {
        h["new_state"] == "drain"
    })
    .await;
    assert_eq!(
        history[0]["previous_state"],
        Value::Null,
        "first seen: {history:?}"
    );
    assert_eq!(history[0]["new_state"], "ready");
    assert_eq!(history[1]["previous_state"], "ready");
    assert_eq!(history[1]["new_state"], "drain");
    assert_eq!(history[1]["new_status"], "DRAIN");
    assert_eq!(history[1]["changed_by"], "sync");
    assert_eq!(history.len(), 2, "unchanged polls add nothing: {history:?}");

    // s2 leaves the configuration (reload through the master CLI): gone after two polls.
    ha.reload(&[
        ("be_app", vec![("s1", 18101)]),
        ("be_other", vec![("o1", 18201)]),
    ]);
    let servers = eventually("s2 soft-deleted", Duration::from_secs(15), || async {
        let live = servers_of(false).await;
        (live.len() == 1).then_some(live)
    })
    .await;
    assert_eq!(servers[0]["name"], "s1");
    let all = servers_of(true).await;
    let s2 = all.iter().find(|s| s["name"] == "s2").unwrap();
    assert!(s2["removed_at"].is_string(), "{s2}");
    let misses: i32 = db
        .client()
        .await
        .query_one(
            "SELECT missed_polls FROM haproxy_servers WHERE name = 's2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(misses, 2);

    // HAProxy down: polls fail, nothing is deleted however long it lasts.
    ha.kill();
    let before: i64 = db
        .client()
        .await
        .query_one("SELECT last_poll FROM haproxy_instances", &[])
        .await
        .unwrap()
        .get(0);
    // Three polls fail (not a wait of some seconds: the polls themselves are counted).
    let metrics = sync.url("/metrics");
    let failures =
        || checkplane_testkit::metric(&metrics, "checkplane_haproxy_poll_failures_total");
    let failed_before = failures().await;
    eventually("three failed polls", Duration::from_secs(30), || async {
        (failures().await >= failed_before + 3.0).then_some(())
    })
    .await;
    let live = servers_of(false).await;
    assert_eq!(live.len(), 1, "{live:?}");
    let after: i64 = db
        .client()
        .await
        .query_one("SELECT last_poll FROM haproxy_instances", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, after, "no poll recorded while unreachable");
    sync.stop().await.unwrap();
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_are_registered_validated_listed_and_removed() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let gw = gateway(&db, &redis).await;
    let http = reqwest::Client::new();
    for (body, field) in [
        (json!({"name": "lb", "address": "nohost"}), "address"),
        // Found by hand: a URL read as host `http://127.0.0.1`, port 1.
        (
            json!({"name": "lb", "address": "http://127.0.0.1:1"}),
            "address",
        ),
        (
            json!({"name": "lb", "address": "localhost:9999"}),
            "address",
        ),
        (
            json!({"name": "lb", "address": "/etc/passwd"}),
            "HAPROXY_ALLOWED_ADDRESSES",
        ),
        (
            json!({"name": "lb", "address": "10.0.0.1:9999"}),
            "HAPROXY_ALLOWED_ADDRESSES",
        ),
        (
            json!({"name": "lb", "address": "/tmp/../etc/haproxy.sock"}),
            "address",
        ),
        (json!({"name": "", "address": "127.0.0.1:1"}), "name"),
        (
            json!({"name": "lb", "address": "/run/h.sock", "transport": "agent"}),
            "node",
        ),
        (
            json!({"name": "lb", "address": "127.0.0.1:1", "colour": "red"}),
            "colour",
        ),
    ] {
        let (status, answer) = call(&http, &gw, "POST", "/v1/haproxy/instances", Some(body)).await;
        assert_eq!(status, 422, "{answer}");
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(field),
            "{answer}"
        );
    }
    let (status, first) = call(
        &http,
        &gw,
        "POST",
        "/v1/haproxy/instances",
        Some(json!({"name": "lb", "address": "127.0.0.1:1"})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, dup) = call(
        &http,
        &gw,
        "POST",
        "/v1/haproxy/instances",
        Some(json!({"name": "lb", "address": "127.0.0.1:2"})),
    )
    .await;
    assert_eq!(status, 409, "{dup}");
    assert_eq!(dup["error"]["code"], "ERR_CONFLICT");
    let (_, list) = call(&http, &gw, "GET", "/v1/haproxy/instances", None).await;
    assert_eq!(list["total"], 1);
    let id = first["id"].as_str().unwrap();
    assert_eq!(
        call(
            &http,
            &gw,
            "DELETE",
            &format!("/v1/haproxy/instances/{id}"),
            None
        )
        .await
        .0,
        204
    );
    assert_eq!(
        call(
            &http,
            &gw,
            "DELETE",
            &format!("/v1/haproxy/instances/{id}"),
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(
        call(
            &http,
            &gw,
            "GET",
            &format!("/v1/haproxy/instances/{id}"),
            None
        )
        .await
        .0,
        404
    );
    // The name is free again, and both actions are in the audit log with their actor.
    assert_eq!(
        call(
            &http,
            &gw,
            "POST",
            "/v1/haproxy/instances",
            Some(json!({"name": "lb", "address": "127.0.0.1:3"}))
        )
        .await
        .0,
        201
    );
    let (_, audit) = call(
        &http,
        &gw,
        "GET",
        "/v1/audit?action=haproxy.instance_removed",
        None,
    )
    .await;
    assert_eq!(audit["total"], 1, "{audit}");
    assert_eq!(audit["items"][0]["actor"], "key:bootstrap");
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_owner_stopping_hands_the_instance_over_and_a_forced_sync_runs_at_once() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let ha = Haproxy::start(&backends());
    let gw = gateway(&db, &redis).await;
    let http = reqwest::Client::new();
    let slow = [
        ("HAPROXY_SYNC_INTERVAL", "1h"),
        ("HAPROXY_SYNC_LEASE", "2s"),
    ];
    // The first replica alone: it owns the instance and polls it once (then not for an hour).
    let first = haproxy_sync_with(&db, &redis, &slow).await;
    let (_, instance) = call(
        &http,
        &gw,
        "POST",
        "/v1/haproxy/instances",
        Some(json!({"name": "lb-handover", "address": ha.stats.to_string()})),
    )
    .await;
    let id = instance["id"].as_str().unwrap().to_owned();
    let backend: String = eventually("first poll", Duration::from_secs(10), || async {
        let (_, page) = call(
            &http,
            &gw,
            "GET",
            &format!("/v1/haproxy/instances/{id}/backends"),
            None,
        )
        .await;
        page["items"][0]["id"].as_str().map(str::to_owned)
    })
    .await;
    let page = servers_page(&http, &gw, &backend).await;
    let s1 = page["items"][0]["id"].as_str().unwrap().to_owned();
    let second = haproxy_sync_with(&db, &redis, &slow).await;
    first.stop().await.unwrap();

    // Changed behind our back: the second replica takes the instance once the first one's
    // lease has run out, and polls it at once.
    assert_eq!(ha.command("set server be_app/s1 state maint").trim(), "");
    let history_with = |state: &'static str| {
        history_until(&http, &gw, &s1, "the change is seen", move |h| {
            h["new_state"] == state
        })
    };
    let changes = history_with("maint").await;
    // Seen ready once, then maint once: the takeover doubled nothing.
    let states: Vec<&str> = changes
        .iter()
        .map(|h| h["new_state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["ready", "maint"], "{changes:?}");

    // The interval is an hour: only a forced sync sees the next change.
    assert_eq!(ha.command("set server be_app/s1 state drain").trim(), "");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = history(&http, &gw, &s1).await;
    assert_eq!(seen.len(), 2, "no poll before the forced one: {seen:?}");
    let (status, _) = call(
        &http,
        &gw,
        "POST",
        &format!("/v1/haproxy/instances/{id}/sync"),
        None,
    )
    .await;
    assert_eq!(status, 202);
    let changes = history_with("drain").await;
    assert_eq!(changes.len(), 3, "{changes:?}");
    let (status, _) = call(
        &http,
        &gw,
        "POST",
        "/v1/haproxy/instances/hpi-00000000000000000000/sync",
        None,
    )
    .await;
    assert_eq!(status, 404);
    second.stop().await.unwrap();
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn haproxy_sync_reaches_no_socket_outside_the_allowed_addresses_even_through_a_link() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let ha = Haproxy::start(&backends());
    // An allowed directory holding a link to the real admin socket, which lies outside it.
    let allowed_dir = checkplane_testkit::servers::scratch_dir("haproxy-allowed");
    let link = allowed_dir.join("admin.sock");
    std::os::unix::fs::symlink(&ha.admin_socket, &link).unwrap();
    let allowed = format!("127.0.0.0/8,{}", allowed_dir.display());
    let mut env = store_env(&db, &redis);
    env.push(("GATEWAY_ADMIN_KEY".into(), ADMIN.into()));
    env.push(("HAPROXY_ALLOWED_ADDRESSES".into(), allowed.clone()));
    let config = gateway::load(&mut Env::from_pairs(env)).unwrap();
    let gw = Running::start(|l, s| gateway::run(config, l, s)).await;
    gw.wait_ready(Duration::from_secs(10)).await;
    let http = reqwest::Client::new();
    let register = |name: &str, address: String| {
        call(
            &http,
            &gw,
            "POST",
            "/v1/haproxy/instances",
            Some(json!({"name": name, "address": address})),
        )
    };
    // The socket itself is outside the list: refused at the door.
    let (status, refused) = register("direct", ha.admin_socket.display().to_string()).await;
    assert_eq!(status, 422, "{refused}");
    // The link is inside it as written, so the gateway takes it; haproxy-sync resolves it.
    let (status, linked) = register("linked", link.display().to_string()).await;
    assert_eq!(status, 201, "{linked}");
    let linked = linked["id"].as_str().unwrap().to_owned();
    // A control on loopback TCP, which the list allows: polled as usual.
    let (status, control) = register("control", ha.stats.to_string()).await;
    assert_eq!(status, 201, "{control}");
    let control = control["id"].as_str().unwrap().to_owned();
    let sync = haproxy_sync_with(
        &db,
        &redis,
        &[("HAPROXY_ALLOWED_ADDRESSES", allowed.as_str())],
    )
    .await;

    discovered(&http, &gw, &control, 2).await;
    let metrics = sync.url("/metrics");
    let failures =
        || checkplane_testkit::metric(&metrics, "checkplane_haproxy_poll_failures_total");
    eventually(
        "polls of the link failing",
        Duration::from_secs(30),
        || async { (failures().await >= 3.0).then_some(()) },
    )
    .await;
    let (status, backends) = call(
        &http,
        &gw,
        "GET",
        &format!("/v1/haproxy/instances/{linked}/backends"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        backends["total"], 0,
        "nothing read through the link: {backends}"
    );
    let polled: i64 = db
        .client()
        .await
        .query_one(
            "SELECT last_poll FROM haproxy_instances WHERE instance_id = $1",
            &[&linked],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(polled, 0, "never polled");
    sync.stop().await.unwrap();
    gw.stop().await.unwrap();
    std::fs::remove_dir_all(&allowed_dir).unwrap();
}
