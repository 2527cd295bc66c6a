//! drain / maint / ready through the API, executed by haproxy-sync on a real HAProxy: state
//! read back through the socket, history naming the action, idempotency under 1,000
//! concurrent requests (one `set server` counted by a relay in front of the Runtime API), an
//! operator-level socket, and the circuit breaker around a frozen HAProxy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use checkplane_testkit::haproxy::Haproxy;
use checkplane_testkit::{eventually, TestDb, TestRedis};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sync::{
    backends, call, gateway, haproxy_sync_with, history, history_until, servers_page, Service,
};

/// A TCP relay in front of a Runtime API that counts the `set server` commands through it.
async fn counting_relay(to: std::net::SocketAddr) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let sets = Arc::new(AtomicUsize::new(0));
    let counted = sets.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut command = Vec::new();
                let mut byte = [0u8; 1];
                while client.read_exact(&mut byte).await.is_ok() {
                    command.push(byte[0]);
                    if byte[0] == b'\n' {
                        break;
                    }
                }
                if String::from_utf8_lossy(&command).contains("set server") {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                let Ok(mut upstream) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let _ = upstream.write_all(&command).await;
                let mut reply = Vec::new();
                let _ = upstream.read_to_end(&mut reply).await;
                let _ = client.write_all(&reply).await;
            });
        }
    });
    (addr, sets)
}

/// What most action tests run on: a database, a Redis, one real HAProxy, a gateway and
/// haproxy-sync started with `env`.
struct Stack {
    db: TestDb,
    /// Held for the test's life (its key prefix).
    _redis: TestRedis,
    ha: Haproxy,
    gw: Service,
    sync: Service,
    http: reqwest::Client,
}

impl Stack {
    async fn start(env: &[(&str, &str)]) -> Self {
        let db = TestDb::new().await;
        let redis = TestRedis::new();
        let ha = Haproxy::start(&backends());
        let gw = gateway(&db, &redis).await;
        let sync = haproxy_sync_with(&db, &redis, env).await;
        Self {
            db,
            _redis: redis,
            ha,
            gw,
            sync,
            http: reqwest::Client::new(),
        }
    }

    async fn stop(self) {
        self.sync.stop().await.unwrap();
        self.gw.stop().await.unwrap();
    }
}

/// Register `address` as an instance and wait for its servers: (instance, s1's id).
async fn instance_with_servers(
    http: &reqwest::Client,
    gw: &Service,
    address: &str,
) -> (String, String) {
    let (status, instance) = call(
        http,
        gw,
        "POST",
        "/v1/haproxy/instances",
        Some(json!({"name": format!("lb-{}", uuid::Uuid::new_v4().simple()), "address": address})),
    )
    .await;
    assert_eq!(status, 201, "{instance}");
    let id = instance["id"].as_str().unwrap().to_owned();
    let backend: String = eventually("backends discovered", Duration::from_secs(10), || async {
        let (_, page) = call(
            http,
            gw,
            "GET",
            &format!("/v1/haproxy/instances/{id}/backends"),
            None,
        )
        .await;
        page["items"][0]["id"].as_str().map(str::to_owned)
    })
    .await;
    let page = servers_page(http, gw, &backend).await;
    let s1 = page["items"][0]["id"].as_str().unwrap().to_owned();
    (id, s1)
}

/// `POST /v1/haproxy/servers/{server}/action` with `body`: its status and body.
pub async fn act(http: &reqwest::Client, gw: &Service, server: &str, body: Value) -> (u16, Value) {
    call(
        http,
        gw,
        "POST",
        &format!("/v1/haproxy/servers/{server}/action"),
        Some(body),
    )
    .await
}

/// haproxy-sync's `/metrics` text.
async fn sync_metrics(s: &Stack) -> String {
    checkplane_testkit::metrics_text(&s.sync.url("/metrics")).await
}

/// `done` failed on its first attempt (HAProxy's own answer is not retried), saying `words`.
pub fn failed_at_once(done: &Value, words: &str) {
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(
        done["attempts"], 1,
        "HAProxy's own errors are not retried: {done}"
    );
    let error = done["error"].as_str().unwrap_or_default();
    assert!(error.contains(words), "{done}");
}

/// Request an action (202) and wait for its end: the ended action.
pub async fn act_done(http: &reqwest::Client, gw: &Service, server: &str, body: Value) -> Value {
    let (status, requested) = act(http, gw, server, body).await;
    assert_eq!(status, 202, "{requested}");
    settled(http, gw, requested["id"].as_str().unwrap()).await
}

/// The action once it has ended: one GET that waits for it (`wait_ms`), no polling.
pub async fn settled(http: &reqwest::Client, gw: &Service, action: &str) -> Value {
    let (status, a) = call(
        http,
        gw,
        "GET",
        &format!("/v1/haproxy/actions/{action}?wait_ms=20000"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{a}");
    assert!(
        ["success", "failed"].contains(&a["status"].as_str().unwrap_or("")),
        "a waiting GET answers once the action has ended: {a}"
    );
    a
}

fn admin_bits(ha: &Haproxy, server: &str) -> u32 {
    admin_bits_in(ha, "be_app", server)
}

/// srv_admin_state of `server` of `backend`, read through the socket.
pub fn admin_bits_in(ha: &Haproxy, backend: &str, server: &str) -> u32 {
    let state = ha.command(&format!("show servers state {backend}"));
    state
        .lines()
        .find(|l| l.split_whitespace().nth(3) == Some(server))
        .and_then(|l| l.split_whitespace().nth(6)?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_maint_and_ready_change_the_real_server_once_per_key() {
    let s = Stack::start(&[("HAPROXY_SYNC_INTERVAL", "1s")]).await;
    let (relay, sets) = counting_relay(s.ha.stats).await;
    let (_, s1) = instance_with_servers(&s.http, &s.gw, &relay).await;

    for (action, bits) in [("drain", 8), ("maint", 1), ("ready", 0)] {
        let (status, requested) = act(
            &s.http,
            &s.gw,
            &s1,
            json!({"action": action, "idempotency_key": format!("k-{action}")}),
        )
        .await;
        assert_eq!(status, 202, "{requested}");
        assert_eq!(requested["status"], "pending");
        let (status, too_long) = call(
            &s.http,
            &s.gw,
            "GET",
            &format!(
                "/v1/haproxy/actions/{}?wait_ms=30001",
                requested["id"].as_str().unwrap()
            ),
            None,
        )
        .await;
        assert_eq!(status, 422, "{too_long}");
        let done = settled(&s.http, &s.gw, requested["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "success", "{done}");
        assert_eq!(done["attempts"], 1);
        assert_eq!(done["detail"]["already"], false);
        // The real server, read back through the socket.
        assert_eq!(admin_bits(&s.ha, "s1"), bits, "{action}");
    }
    assert_eq!(sets.load(Ordering::SeqCst), 3, "one set server per action");
    // Counted by action and outcome, with their durations, on haproxy-sync's /metrics.
    let metrics = sync_metrics(&s).await;
    for action in ["drain", "maint", "ready"] {
        let line =
            format!("checkplane_haproxy_actions_total{{action=\"{action}\",status=\"success\"}} 1");
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
        let count = format!(
            "checkplane_haproxy_action_seconds_count{{action=\"{action}\",status=\"success\"}} 1"
        );
        assert!(metrics.lines().any(|l| l == count), "{count}:\n{metrics}");
    }
    // History names the actions that changed it; the desired state is the last asked.
    let history = history(&s.http, &s.gw, &s1).await;
    let by: Vec<&str> = history
        .iter()
        .map(|h| h["changed_by"].as_str().unwrap())
        .collect();
    assert_eq!(by.len(), 4, "{history:?}");
    assert_eq!(by[0], "sync");
    assert!(by[1..].iter().all(|b| b.starts_with("hpa-")), "{history:?}");

    // A thousand requests with one key at once: one action, one set server.
    let before = sets.load(Ordering::SeqCst);
    let body = json!({"action": "drain", "idempotency_key": "one-key-for-all"});
    let answers =
        futures::future::join_all((0..1000).map(|_| act(&s.http, &s.gw, &s1, body.clone()))).await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(status, a)| {
            assert_eq!(*status, 202, "{a}");
            a["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    let done = settled(&s.http, &s.gw, ids.iter().next().unwrap()).await;
    assert_eq!(done["status"], "success");
    let count: i64 =
        s.db.client()
            .await
            .query_one(
                "SELECT count(*) FROM haproxy_actions WHERE idempotency_key = 'one-key-for-all'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
    assert_eq!(count, 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        sets.load(Ordering::SeqCst),
        before + 1,
        "exactly one set server"
    );
    // Another caller (API key) with the same idempotency key: its own action, which tells it
    // nothing of the first.
    let made: Value = s
        .http
        .post(s.gw.url("/v1/keys"))
        .header("x-api-key", crate::sync::ADMIN)
        .json(&json!({"name": "second-operator", "role": "operator"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let theirs: Value = s
        .http
        .post(s.gw.url(&format!("/v1/haproxy/servers/{s1}/action")))
        .header("x-api-key", made["key"].as_str().unwrap())
        .json(&json!({"action": "drain", "idempotency_key": "one-key-for-all"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let their_id = theirs["id"].as_str().unwrap();
    assert!(!ids.contains(their_id), "{theirs}");
    assert_eq!(
        theirs["requested_by"],
        format!("key:{}", made["key_id"].as_str().unwrap())
    );
    settled(&s.http, &s.gw, their_id).await;
    // The same key with another body: refused, naming the key.
    let (status, refused) = act(
        &s.http,
        &s.gw,
        &s1,
        json!({"action": "maint", "idempotency_key": "one-key-for-all"}),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    assert!(refused["error"]["message"]
        .as_str()
        .unwrap()
        .contains("idempotency_key"));
    // Already drained: no set, said so.
    let done = act_done(
        &s.http,
        &s.gw,
        &s1,
        json!({"action": "drain", "idempotency_key": "drain-again"}),
    )
    .await;
    assert_eq!(done["detail"]["already"], true, "{done}");
    assert_eq!(sets.load(Ordering::SeqCst), before + 1);
    // Bad requests are named.
    for (body, field) in [
        (
            json!({"action": "reboot", "idempotency_key": "x"}),
            "action",
        ),
        (
            json!({"action": "drain", "idempotency_key": ""}),
            "idempotency_key",
        ),
        (
            json!({"action": "maint", "idempotency_key": "y", "drain_wait_ms": 5}),
            "drain_wait_ms",
        ),
    ] {
        let (status, a) = act(&s.http, &s.gw, &s1, body).await;
        assert_eq!(status, 422);
        assert!(
            a["error"]["message"].as_str().unwrap().contains(field),
            "{a}"
        );
    }
    assert_eq!(
        act(
            &s.http,
            &s.gw,
            "hps-00000000000000000000",
            json!({"action": "drain", "idempotency_key": "z"})
        )
        .await
        .0,
        404
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_level_socket_fails_with_a_clear_permission_error() {
    let s = Stack::start(&[("HAPROXY_SYNC_INTERVAL", "1s")]).await;
    let (_, s1) =
        instance_with_servers(&s.http, &s.gw, &s.ha.operator_socket.display().to_string()).await;
    let done = act_done(
        &s.http,
        &s.gw,
        &s1,
        json!({"action": "maint", "idempotency_key": "op-1"}),
    )
    .await;
    failed_at_once(&done, "Permission denied");
    assert_eq!(admin_bits(&s.ha, "s1"), 0);
    // Issue 20: the refused maint is not the desired state (a reload would re-apply it),
    // and the refusal is in the server's history.
    let view = server_view(&s, &s1).await;
    assert_eq!(view["desired"]["state"], Value::Null, "{view}");
    assert_eq!(view["drift"], false, "{view}");
    let history = history(&s.http, &s.gw, &s1).await;
    let failure = history
        .iter()
        .find(|h| h["failed_action"] == "maint")
        .unwrap_or_else(|| panic!("the failure in the history: {history:?}"));
    assert_eq!(failure["changed_by"], done["id"], "{failure}");
    assert!(
        failure["error"]
            .as_str()
            .is_some_and(|e| e.contains("Permission denied")),
        "{failure}"
    );
    assert_eq!(failure["new_state"], "ready", "unchanged: {failure}");
    s.stop().await;
}

/// The server `server` as `GET /v1/haproxy/backends/{its backend}/servers` shows it.
async fn server_view(s: &Stack, server: &str) -> Value {
    let backend: String =
        s.db.client()
            .await
            .query_one(
                "SELECT backend_id FROM haproxy_servers WHERE server_id = $1",
                &[&server],
            )
            .await
            .unwrap()
            .get(0);
    let page = servers_page(&s.http, &s.gw, &backend).await;
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == server)
        .cloned()
        .unwrap()
}

/// Issue 20: a failed action leaves the desired state to the last action that succeeded,
/// and a reload is noticed by the restart probe within seconds (the poll interval here is an
/// hour), which puts that state back and names the status it restored.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_action_keeps_the_last_success_as_desired_and_a_reload_restores_it_in_seconds() {
    let s = Stack::start(&[
        ("HAPROXY_SYNC_INTERVAL", "1h"),
        ("HAPROXY_SYNC_TIMEOUT", "300ms"),
        ("HAPROXY_ACTION_RETRY_BASE", "50ms"),
    ])
    .await;
    let (_, s1) = instance_with_servers(&s.http, &s.gw, &s.ha.stats.to_string()).await;
    let done = act_done(
        &s.http,
        &s.gw,
        &s1,
        json!({"action": "drain", "idempotency_key": "d-ok"}),
    )
    .await;
    assert_eq!(done["status"], "success", "{done}");
    s.ha.freeze();
    let failed = act_done(
        &s.http,
        &s.gw,
        &s1,
        json!({"action": "ready", "idempotency_key": "r-fails"}),
    )
    .await;
    s.ha.thaw();
    assert_eq!(failed["status"], "failed", "{failed}");
    let view = server_view(&s, &s1).await;
    assert_eq!(view["desired"]["state"], "drain", "{view}");
    assert_eq!(view["desired"]["by"], "key:bootstrap", "{view}");
    let history = history(&s.http, &s.gw, &s1).await;
    assert!(
        history
            .iter()
            .any(|h| h["failed_action"] == "ready" && h["changed_by"] == failed["id"]),
        "{history:?}"
    );

    s.ha.reload(&backends());
    let history = history_until(&s.http, &s.gw, &s1, "the drain is re-applied", |h| {
        h["changed_by"]
            .as_str()
            .is_some_and(|b| b.starts_with("reapply:"))
    })
    .await;
    assert_eq!(admin_bits(&s.ha, "s1"), 8, "drained again: {history:?}");
    let last = history.last().unwrap();
    assert_eq!(
        (last["new_state"].as_str(), last["new_status"].as_str()),
        (Some("drain"), Some("DRAIN")),
        "{history:?}"
    );
    s.stop().await;
}

/// Issue 20: a server set behind checkplane's back stays off its desired state: one poll
/// notes it, the next flags it drifting (view and gauge); an action that brings the desired
/// state to what HAProxy has clears it. A reload's own differences, put back by the re-apply,
/// count for nothing. Polls are forced (the interval is an hour), so "one poll" is exact.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_off_its_desired_state_for_two_polls_is_drifting() {
    let s = Stack::start(&[("HAPROXY_SYNC_INTERVAL", "1h")]).await;
    let (instance, s1) = instance_with_servers(&s.http, &s.gw, &s.ha.stats.to_string()).await;
    let sync = || async {
        let (status, body) = call(
            &s.http,
            &s.gw,
            "POST",
            &format!("/v1/haproxy/instances/{instance}/sync"),
            None,
        )
        .await;
        assert_eq!(status, 202, "{body}");
    };
    let done = act_done(
        &s.http,
        &s.gw,
        &s1,
        json!({"action": "drain", "idempotency_key": "d-1"}),
    )
    .await;
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(server_view(&s, &s1).await["drift"], false);
    let gauge = format!("checkplane_haproxy_servers_drifting{{instance_id=\"{instance}\"}}");

    // Set by hand on the socket: the first poll sees it, and that is not drift yet.
    s.ha.command("set server be_app/s1 state ready");
    let polls_before = last_poll(&s, &s1).await;
    sync().await;
    let view = eventually("one poll saw it", Duration::from_secs(15), || async {
        let view = server_view(&s, &s1).await;
        (view["observed"]["admin_state"] == "ready").then_some(view)
    })
    .await;
    assert_eq!(view["drift"], false, "after one poll: {view}");
    assert_eq!(
        last_poll(&s, &s1).await,
        polls_before + 1,
        "exactly one poll"
    );
    sync().await;
    let view = eventually("s1 drifting", Duration::from_secs(15), || async {
        let view = server_view(&s, &s1).await;
        (view["drift"] == true).then_some(view)
    })
    .await;
    assert_eq!(view["desired"]["state"], "drain", "{view}");
    assert!(
        sync_metrics(&s).await.contains(&format!("{gauge} 1\n")),
        "{}",
        sync_metrics(&s).await
    );
    let done = act_done(
        &s.http,
        &s.gw,
        &s1,
        json!({"action": "ready", "idempotency_key": "r-1"}),
    )
    .await;
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(server_view(&s, &s1).await["drift"], false);
    sync().await;
    eventually("the gauge back to 0", Duration::from_secs(15), || async {
        sync_metrics(&s)
            .await
            .contains(&format!("{gauge} 0\n"))
            .then_some(())
    })
    .await;

    // A reload loses the drain (its poll sees s1 off), the re-apply puts it back; then s1 is
    // set by hand once more: one poll later it is still not drift.
    let done = act_done(
        &s.http,
        &s.gw,
        &s1,
        json!({"action": "drain", "idempotency_key": "d-2"}),
    )
    .await;
    assert_eq!(done["status"], "success", "{done}");
    s.ha.reload(&backends());
    history_until(&s.http, &s.gw, &s1, "the drain re-applied", |h| {
        h["changed_by"]
            .as_str()
            .is_some_and(|b| b.starts_with("reapply:"))
    })
    .await;
    assert_eq!(admin_bits(&s.ha, "s1"), 8);
    s.ha.command("set server be_app/s1 state ready");
    sync().await;
    let view = eventually("one poll saw it", Duration::from_secs(15), || async {
        let view = server_view(&s, &s1).await;
        (view["observed"]["admin_state"] == "ready").then_some(view)
    })
    .await;
    assert_eq!(
        view["drift"], false,
        "the reload's difference does not count: {view}"
    );
    assert!(
        sync_metrics(&s).await.contains(&format!("{gauge} 0\n")),
        "{}",
        sync_metrics(&s).await
    );
    s.stop().await;
}

/// How many polls (and re-applies) `server`'s instance has had: its poll counter.
async fn last_poll(s: &Stack, server: &str) -> i64 {
    s.db.client()
        .await
        .query_one(
            "SELECT q.seq FROM haproxy_poll_seq q JOIN haproxy_servers v USING (instance_id)
             WHERE v.server_id = $1",
            &[&server],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_haproxy_is_retried_opens_the_breaker_fails_fast_and_a_trial_closes_it() {
    let s = Stack::start(&[
        ("HAPROXY_SYNC_INTERVAL", "1s"),
        ("HAPROXY_SYNC_TIMEOUT", "300ms"),
        ("HAPROXY_ACTION_RETRY_BASE", "50ms"),
        ("HAPROXY_BREAKER_COOLDOWN", "2s"),
    ])
    .await;
    let (instance, s1) = instance_with_servers(&s.http, &s.gw, &s.ha.stats.to_string()).await;
    s.ha.freeze();
    let done = act_done(
        &s.http,
        &s.gw,
        &s1,
        json!({"action": "drain", "idempotency_key": "f-1"}),
    )
    .await;
    assert_eq!(done["status"], "failed");
    assert_eq!(
        done["attempts"], 3,
        "retried until the breaker opened: {done}"
    );
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("ERR_INSTANCE_UNAVAILABLE"),
        "{done}"
    );
    let (_, view) = call(
        &s.http,
        &s.gw,
        "GET",
        &format!("/v1/haproxy/instances/{instance}"),
        None,
    )
    .await;
    assert_eq!(view["breaker"], "open", "{view}");
    let metrics = sync_metrics(&s).await;
    assert!(
        metrics.contains("checkplane_haproxy_action_attempt_failures_total 3\n"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("checkplane_haproxy_actions_total{action=\"drain\",status=\"failed\"} 1\n"),
        "{metrics}"
    );
    // Open: the next action fails at once, without touching HAProxy.
    let done = act_done(
        &s.http,
        &s.gw,
        &s1,
        json!({"action": "drain", "idempotency_key": "f-2"}),
    )
    .await;
    assert_eq!(
        (done["status"].as_str(), done["attempts"].as_i64()),
        (Some("failed"), Some(0)),
        "{done}"
    );
    // HAProxy is back and the cooldown is over: the trial succeeds and closes the breaker.
    s.ha.thaw();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let done = act_done(
        &s.http,
        &s.gw,
        &s1,
        json!({"action": "drain", "idempotency_key": "f-3"}),
    )
    .await;
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(admin_bits(&s.ha, "s1"), 8);
    let (_, view) = call(
        &s.http,
        &s.gw,
        "GET",
        &format!("/v1/haproxy/instances/{instance}"),
        None,
    )
    .await;
    assert_eq!(view["breaker"], "closed", "{view}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_loses_the_drain_and_sync_puts_it_back_in_the_history() {
    let s = Stack::start(&[("HAPROXY_SYNC_INTERVAL", "1s")]).await;
    let (_, s1) = instance_with_servers(&s.http, &s.gw, &s.ha.stats.to_string()).await;
    let done = act_done(
        &s.http,
        &s.gw,
        &s1,
        json!({"action": "drain", "idempotency_key": "before-reload"}),
    )
    .await;
    assert_eq!(done["status"], "success");
    assert_eq!(admin_bits(&s.ha, "s1"), 8);

    // No server-state file here: the reload forgets the drain.
    s.ha.reload(&backends());
    let history = history_until(&s.http, &s.gw, &s1, "the drain is re-applied", |h| {
        h["changed_by"]
            .as_str()
            .is_some_and(|b| b.starts_with("reapply:"))
    })
    .await;
    assert_eq!(admin_bits(&s.ha, "s1"), 8, "drained again: {history:?}");
    let last = history.last().unwrap();
    assert_eq!(last["new_state"], "drain", "{history:?}");
    assert_eq!(last["changed_by"], "reapply:key:bootstrap");
    // s2 was never asked for anything: left as the reload made it.
    assert_eq!(admin_bits(&s.ha, "s2"), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_drains_each_server_once_and_lists_what_it_could_not() {
    let s = Stack::start(&[("HAPROXY_ACTION_PARALLELISM", "1")]).await;
    let (_, s1) = instance_with_servers(&s.http, &s.gw, &s.ha.stats.to_string()).await;
    let backend =
        s.db.client()
            .await
            .query_one(
                "SELECT backend_id FROM haproxy_servers WHERE server_id = $1",
                &[&s1],
            )
            .await
            .unwrap()
            .get::<_, String>(0);
    let page = servers_page(&s.http, &s.gw, &backend).await;
    let s2 = page["items"][1]["id"].as_str().unwrap().to_owned();
    let body = json!({"action": "drain", "idempotency_key": "batch-1",
                      "servers": [s1, s2, "hps-00000000000000000000"]});
    let (status, answer) = call(
        &s.http,
        &s.gw,
        "POST",
        "/v1/haproxy/batch/action",
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let items = answer["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[2]["error"]["code"], "ERR_NOT_FOUND", "{answer}");
    let ids: Vec<String> = items[..2]
        .iter()
        .map(|i| i["action"]["id"].as_str().unwrap().to_owned())
        .collect();
    for id in &ids {
        assert_eq!(settled(&s.http, &s.gw, id).await["status"], "success");
    }
    assert_eq!((admin_bits(&s.ha, "s1"), admin_bits(&s.ha, "s2")), (8, 8));
    // Sent again: the same actions, nothing new.
    let (_, again) = call(
        &s.http,
        &s.gw,
        "POST",
        "/v1/haproxy/batch/action",
        Some(body),
    )
    .await;
    let again: Vec<&str> = again["items"].as_array().unwrap()[..2]
        .iter()
        .map(|i| i["action"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(again, ids);
    let (status, _) = call(
        &s.http,
        &s.gw,
        "POST",
        "/v1/haproxy/batch/action",
        Some(json!({"action": "drain", "idempotency_key": "b2", "servers": []})),
    )
    .await;
    assert_eq!(status, 422);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_past_its_lease_is_fenced_and_the_next_owner_finishes_the_action() {
    use checkplane_core::keys::Keys;
    use haproxy_sync::actions::{execute, open_actions, Fence, Settings};
    use haproxy_sync::runtime_api::{Client, Direct, Endpoint};

    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let ha = Haproxy::start(&backends());
    let (relay, sets) = counting_relay(ha.stats).await;
    let gw = gateway(&db, &redis).await;
    let http = reqwest::Client::new();
    let first = haproxy_sync_with(&db, &redis, &[]).await;
    let (instance, s1) = instance_with_servers(&http, &gw, &relay).await;
    // The owner stops; a drain is asked for while nobody holds the instance.
    first.stop().await.unwrap();
    let (status, requested) = act(
        &http,
        &gw,
        &s1,
        json!({"action": "drain", "idempotency_key": "fenced-drain"}),
    )
    .await;
    assert_eq!(status, 202, "{requested}");
    let action_id = requested["id"].as_str().unwrap().to_owned();

    // Another replica takes the instance (its lease in Redis, its token in PostgreSQL).
    let keys = Keys::new(redis.prefix.clone(), 4);
    let token = checkplane_runtime::clock::now_ms();
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("SET")
        .arg(keys.haproxy_owner(&instance))
        .arg(format!("sync-other/{token}"))
        .arg("PX")
        .arg(10_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(keys.haproxy_fence(&instance))
        .arg(token)
        .query_async(&mut conn)
        .await
        .unwrap();
    let pg = db.client().await;
    pg.execute(
        "INSERT INTO haproxy_fences (instance_id, token, owner, updated_at) VALUES ($1, $2, 'sync-other', now())
         ON CONFLICT (instance_id) DO UPDATE SET token = EXCLUDED.token, owner = EXCLUDED.owner",
        &[&instance, &token],
    )
    .await
    .unwrap();

    // The old owner, resuming under its old claim, records nothing and sends nothing.
    let env = checkplane_testkit::store_env(&db, &redis);
    let config = haproxy_sync::load(&mut checkplane_runtime::Env::from_pairs(env)).unwrap();
    let (tracker, shutdown) = (
        tokio_util::task::TaskTracker::new(),
        tokio_util::sync::CancellationToken::new(),
    );
    let stores = checkplane_runtime::stores::Stores::start(
        config.service.store.clone(),
        &tracker,
        &shutdown,
    )
    .unwrap();
    let api = Arc::new(Client::new(Box::new(Direct {
        endpoint: Endpoint::parse(&relay),
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(1),
        allowed: Arc::new(checkplane_wire::haproxy::AllowedAddresses::default()),
    })));
    let settings = Settings {
        retry_base: Duration::from_millis(10),
        cooldown: Duration::from_secs(60),
        parallelism: 1,
    };
    let stale = |token: i64, holder: String| Fence {
        conn: stores.redis_shared.clone(),
        key: keys.haproxy_owner(&instance),
        holder,
        token,
        margin: Duration::from_millis(100),
    };
    let run = |fence: Fence| {
        let (stores, keys, api, settings) =
            (stores.clone(), keys.clone(), api.clone(), settings.clone());
        let instance = instance.clone();
        async move {
            let pending = open_actions(&stores, &[instance.as_str()])
                .await
                .unwrap()
                .remove(&instance)
                .unwrap()
                .remove(0);
            let breaker = Arc::new(std::sync::Mutex::new(haproxy_sync::breaker::Breaker::new(
                Duration::from_secs(60),
            )));
            let outlet = haproxy_sync::actions::Outlet {
                stores,
                keys,
                tracker: tokio_util::task::TaskTracker::new(),
                shutdown: tokio_util::sync::CancellationToken::new(),
            };
            execute(outlet, api, breaker, settings, pending, fence).await
        }
    };
    // An older token: refused by PostgreSQL before anything is recorded.
    let refused = run(stale(1, "sync-old/1".into())).await;
    assert!(
        matches!(refused, Err(haproxy_sync::sync::SyncError::Fenced(_))),
        "{refused:?}"
    );
    let status: String = pg
        .query_one(
            "SELECT status FROM haproxy_actions WHERE action_id = $1",
            &[&action_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "pending");
    // The token passes PostgreSQL, but the lease in Redis is not this replica's: it stops
    // before the set.
    let refused = run(stale(token, format!("sync-old/{token}"))).await;
    assert!(
        matches!(refused, Err(haproxy_sync::sync::SyncError::Fenced(_))),
        "{refused:?}"
    );
    assert_eq!(
        sets.load(Ordering::SeqCst),
        0,
        "no set server from a fenced replica"
    );
    assert_eq!(admin_bits(&ha, "s1"), 0);

    // The other replica's lease runs out; a live replica takes the instance with a newer
    // token and finishes the action, reading first: one set server in all.
    let _: () = redis::cmd("DEL")
        .arg(keys.haproxy_owner(&instance))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _next = haproxy_sync_with(&db, &redis, &[]).await;
    let done = settled(&http, &gw, &action_id).await;
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(admin_bits(&ha, "s1"), 8);
    assert_eq!(sets.load(Ordering::SeqCst), 1);
    let newest: i64 = pg
        .query_one(
            "SELECT token FROM haproxy_fences WHERE instance_id = $1",
            &[&instance],
        )
        .await
        .unwrap()
        .get(0);
    assert!(newest > token, "{newest} > {token}");
    shutdown.cancel();
}
