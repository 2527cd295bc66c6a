//! Operator keys and roles: every operator route refuses a missing key (401) and a lower role
//! (403) and accepts its own; keys are stored hashed, revocable, and every key action is in
//! the audit log.

use checkplane_wire::operators::Role;
use serde_json::{json, Value};

use crate::agents::{start, start_with, Gw, ADMIN};

impl Gw {
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, self.running.url(path));
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A new key with `role`, made by the bootstrap admin: (key_id, key).
    pub async fn key(&self, role: Role, name: &str) -> (String, String) {
        let (status, body) = self
            .call(
                "POST",
                "/v1/keys",
                Some(ADMIN),
                Some(json!({"name": name, "role": role.as_str()})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        (
            body["key_id"].as_str().unwrap().to_owned(),
            body["key"].as_str().unwrap().to_owned(),
        )
    }
}

/// Every operator route with the least role it needs and what that role gets. A new route
/// joins this table.
fn routes(spare_key_id: &str) -> Vec<(&'static str, String, Option<Value>, Role, u16)> {
    vec![
        ("GET", "/v1/agents".into(), None, Role::Viewer, 200),
        (
            "POST",
            "/v1/agents/agt-0123456789abcdef0123456789abcdef/reenroll".into(),
            None,
            Role::Admin,
            404,
        ),
        (
            "DELETE",
            "/v1/agents/agt-0123456789abcdef0123456789abcdef".into(),
            None,
            Role::Admin,
            404,
        ),
        ("GET", "/v1/dead-letters".into(), None, Role::Admin, 200),
        (
            "POST",
            "/v1/dead-letters/requeue".into(),
            None,
            Role::Admin,
            200,
        ),
        ("DELETE", "/v1/dead-letters".into(), None, Role::Admin, 200),
        (
            "POST",
            "/v1/dead-letters/s0-1-0/requeue".into(),
            None,
            Role::Admin,
            404,
        ),
        (
            "DELETE",
            "/v1/dead-letters/s0-1-0".into(),
            None,
            Role::Admin,
            404,
        ),
        (
            "GET",
            "/v1/projection-failures".into(),
            None,
            Role::Admin,
            200,
        ),
        (
            "DELETE",
            "/v1/projection-failures/1".into(),
            None,
            Role::Admin,
            404,
        ),
        (
            "GET",
            "/v1/haproxy/instances".into(),
            None,
            Role::Viewer,
            200,
        ),
        (
            "POST",
            "/v1/haproxy/instances".into(),
            Some(json!({"name": "from-table", "address": "127.0.0.1:9999"})),
            Role::Admin,
            201,
        ),
        (
            "DELETE",
            "/v1/haproxy/instances/hpi-00000000000000000000".into(),
            None,
            Role::Admin,
            404,
        ),
        (
            "GET",
            "/v1/haproxy/instances/hpi-00000000000000000000/backends".into(),
            None,
            Role::Viewer,
            404,
        ),
        (
            "GET",
            "/v1/haproxy/backends/hpb-00000000000000000000/servers".into(),
            None,
            Role::Viewer,
            404,
        ),
        (
            "GET",
            "/v1/haproxy/servers/hps-00000000000000000000/history".into(),
            None,
            Role::Viewer,
            404,
        ),
        (
            "POST",
            "/v1/haproxy/servers/hps-00000000000000000000/action".into(),
            Some(json!({"action": "drain", "idempotency_key": "from-table"})),
            Role::Operator,
            404,
        ),
        (
            "POST",
            "/v1/haproxy/batch/action".into(),
            Some(
                json!({"action": "drain", "idempotency_key": "t", "servers": ["hps-00000000000000000000"]}),
            ),
            Role::Operator,
            202,
        ),
        (
            "POST",
            "/v1/haproxy/instances/hpi-00000000000000000000/sync".into(),
            None,
            Role::Operator,
            404,
        ),
        (
            "GET",
            "/v1/haproxy/actions/hpa-00000000000000000000".into(),
            None,
            Role::Viewer,
            404,
        ),
        ("GET", "/v1/applications".into(), None, Role::Viewer, 200),
        (
            "POST",
            "/v1/applications".into(),
            Some(json!({"name": "from-table"})),
            Role::Admin,
            201,
        ),
        (
            "GET",
            "/v1/applications/app-00000000000000000000/servers".into(),
            None,
            Role::Viewer,
            404,
        ),
        (
            "GET",
            "/v1/application-groups".into(),
            None,
            Role::Viewer,
            200,
        ),
        (
            "POST",
            "/v1/application-groups".into(),
            Some(json!({"name": "from-table", "applications": ["app-00000000000000000000"]})),
            Role::Admin,
            422,
        ),
        (
            "GET",
            "/v1/servers/agt-none/haproxy".into(),
            None,
            Role::Viewer,
            404,
        ),
        (
            "PUT",
            "/v1/servers/agt-none/haproxy".into(),
            Some(json!({"enabled": true})),
            Role::Admin,
            404,
        ),
        (
            "GET",
            "/v1/agents/agt-none/concurrency".into(),
            None,
            Role::Viewer,
            404,
        ),
        ("GET", "/v1/keys".into(), None, Role::Admin, 200),
        (
            "POST",
            "/v1/keys".into(),
            Some(json!({"name": "from-table", "role": "viewer"})),
            Role::Admin,
            201,
        ),
        (
            "DELETE",
            format!("/v1/keys/{spare_key_id}"),
            None,
            Role::Admin,
            204,
        ),
        ("GET", "/v1/audit".into(), None, Role::Admin, 200),
        ("GET", "/v1/checks".into(), None, Role::Viewer, 200),
        (
            "GET",
            "/v1/checks/01234567-89ab-7def-8123-456789abcdef/live".into(),
            None,
            Role::Viewer,
            404,
        ),
        // No agents in this installation: the check is refused after authorisation.
        (
            "POST",
            "/v1/checks".into(),
            Some(json!({"kind": "dns", "target": "example.com", "limit": 1})),
            Role::Operator,
            422,
        ),
        (
            "GET",
            "/v1/checks/01234567-89ab-7def-8123-456789abcdef".into(),
            None,
            Role::Viewer,
            404,
        ),
        (
            "POST",
            "/v1/checks/01234567-89ab-7def-8123-456789abcdef/cancel".into(),
            None,
            Role::Operator,
            404,
        ),
    ]
}

#[tokio::test]
async fn every_operator_route_refuses_a_missing_key_and_a_lower_role() {
    // An unknown key on every route from one address: more failures than the default allows.
    let gw = start_with(vec![(
        "GATEWAY_RATE_AUTH_FAILURES".into(),
        "1000/1m".into(),
    )])
    .await;
    let mut keys = Vec::new();
    for role in Role::ALL {
        keys.push((role, gw.key(role, &format!("table-{role}")).await.1));
    }
    let (spare, _) = gw.key(Role::Viewer, "spare").await;
    let unknown = "cpk_0123456789ab_not-a-real-secret";
    for (method, path, body, needed, granted) in routes(&spare) {
        let (status, answer) = gw.call(method, &path, None, body.clone()).await;
        assert_eq!(status, 401, "{method} {path} without a key: {answer}");
        assert_eq!(answer["error"]["code"], "ERR_UNAUTHORIZED");
        let (status, _) = gw.call(method, &path, Some(unknown), body.clone()).await;
        assert_eq!(status, 401, "{method} {path} with an unknown key");
        for (role, key) in &keys {
            let (status, answer) = gw.call(method, &path, Some(key), body.clone()).await;
            if role.allows(needed) {
                assert_eq!(status, granted, "{method} {path} as {role}: {answer}");
            } else {
                assert_eq!(status, 403, "{method} {path} as {role}: {answer}");
                assert_eq!(answer["error"]["code"], "ERR_FORBIDDEN");
            }
        }
    }
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn keys_are_stored_hashed_revocable_and_audited() {
    // No cache: a revocation anywhere counts at once.
    let gw = start_with(vec![("GATEWAY_AUTH_CACHE_TTL".into(), "0s".into())]).await;
    let (key_id, key) = gw.key(Role::Operator, "ci-bot").await;
    assert!(key.starts_with(&format!("cpk_{key_id}_")), "{key}");

    let client = gw.db.client().await;
    let row = client
        .query_one(
            "SELECT to_jsonb(k)::text, key_hash FROM api_keys k WHERE key_id = $1",
            &[&key_id],
        )
        .await
        .unwrap();
    let stored: String = row.get(0);
    assert!(!stored.contains(&key), "the key itself is not stored");
    assert_eq!(row.get::<_, String>(1), sha256_hex(&key));
    let events: String = client
        .query_one("SELECT string_agg(payload::text, ' ') FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!events.contains(&key), "nor in an event");

    let (status, _) = gw.call("GET", "/v1/agents", Some(&key), None).await;
    assert_eq!(status, 200);
    let (status, listed) = gw.call("GET", "/v1/keys", Some(ADMIN), None).await;
    assert_eq!(status, 200);
    assert!(
        !listed.to_string().contains(&key),
        "a listing never shows keys"
    );
    let mine = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == key_id.as_str())
        .unwrap();
    assert_eq!(mine["role"], "operator");
    assert_eq!(mine["created_by"], "key:bootstrap");

    let (status, _) = gw
        .call("DELETE", &format!("/v1/keys/{key_id}"), Some(ADMIN), None)
        .await;
    assert_eq!(status, 204);
    let (status, answer) = gw.call("GET", "/v1/agents", Some(&key), None).await;
    assert_eq!(status, 401, "a revoked key is refused: {answer}");
    let (status, _) = gw
        .call("DELETE", &format!("/v1/keys/{key_id}"), Some(ADMIN), None)
        .await;
    assert_eq!(status, 204, "revoking twice is a no-op");
    let (status, answer) = gw
        .call("DELETE", "/v1/keys/aaaaaaaaaaaa", Some(ADMIN), None)
        .await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (404, json!("ERR_NOT_FOUND"))
    );
    let (status, _) = gw
        .call("DELETE", "/v1/keys/..%2F..%2Fetc", Some(ADMIN), None)
        .await;
    assert_eq!(status, 404);

    // The audit log: both actions, once each, with who did them, and nothing secret.
    let (status, audit) = gw.call("GET", "/v1/audit", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{audit}");
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["key.revoked", "key.created"],
        "newest first: {audit}"
    );
    assert_eq!(audit["items"][1]["actor"], "key:bootstrap");
    assert_eq!(audit["items"][1]["object"], format!("key:{key_id}"));
    assert_eq!(audit["items"][1]["details"]["role"], "operator");
    assert!(audit["items"][1]["details"].get("key_hash").is_none());

    let (_, revoked) = gw
        .call("GET", "/v1/audit?action=key.revoked", Some(ADMIN), None)
        .await;
    assert_eq!(revoked["total"], 1);
    let (_, by_nobody) = gw
        .call("GET", "/v1/audit?actor=key:someone-else", Some(ADMIN), None)
        .await;
    assert_eq!(by_nobody["total"], 0);
    let (_, page) = gw.call("GET", "/v1/audit?limit=1", Some(ADMIN), None).await;
    assert_eq!(
        (page["total"].clone(), page["has_more"].clone()),
        (json!(2), json!(true))
    );
    let (_, future) = gw
        .call("GET", "/v1/audit?since=253402300799999", Some(ADMIN), None)
        .await;
    assert_eq!(future["total"], 0);
    let (_, past) = gw.call("GET", "/v1/audit?until=1", Some(ADMIN), None).await;
    assert_eq!(past["total"], 0);

    for (query, field) in [
        ("limit=0", "limit"),
        ("offset=-1", "offset"),
        ("since=-5", "since"),
        ("until=99999999999999999", "until"),
    ] {
        let (status, answer) = gw
            .call("GET", &format!("/v1/audit?{query}"), Some(ADMIN), None)
            .await;
        assert!(status == 422 || status == 400, "{query}: {status}");
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(field),
            "{query}: {answer}"
        );
    }
    for (body, field) in [
        (json!({"name": "x y", "role": "viewer"}), "name"),
        (json!({"name": "x".repeat(65), "role": "viewer"}), "name"),
        (json!({"name": "ok", "role": "root"}), "role"),
        (json!({"name": "ok"}), "role"),
    ] {
        let (status, answer) = gw.call("POST", "/v1/keys", Some(ADMIN), Some(body)).await;
        assert!(status == 422 || status == 400, "{answer}");
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(field),
            "{field}: {answer}"
        );
    }
}

#[tokio::test]
async fn check_targets_in_private_ranges_are_refused_and_bad_options_named() {
    let gw = start().await;
    for target in [
        "127.0.0.1",
        "0x7f.1",
        "2130706433",
        "[::1]",
        "::ffff:10.0.0.1",
        "169.254.169.254",
        "localhost",
    ] {
        let (status, answer) = gw
            .call(
                "POST",
                "/v1/checks",
                Some(ADMIN),
                Some(json!({"kind": "ping", "target": target, "limit": 1})),
            )
            .await;
        assert_eq!(status, 422, "{target}: {answer}");
        assert_eq!(answer["error"]["code"], "ERR_TARGET_FORBIDDEN", "{target}");
        assert!(answer["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("target:"));
    }
    let (status, answer) = gw
        .call(
            "POST",
            "/v1/checks",
            Some(ADMIN),
            Some(json!({"kind": "http", "target": "http://0x7f000001:8080/", "limit": 1})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (422, Some("ERR_TARGET_FORBIDDEN"))
    );
    for (body, field) in [
        (
            json!({"kind": "tcp", "target": "example.com", "limit": 1}),
            "options.port",
        ),
        (
            json!({"kind": "dns", "target": "example.com", "options": {"type": "ANY"}, "limit": 1}),
            "options.type",
        ),
        (
            json!({"kind": "ping", "target": "example.com", "options": {"packets": 99}, "limit": 1}),
            "options.packets",
        ),
        (
            json!({"kind": "ping", "target": "example.com", "limit": 5000}),
            "limit",
        ),
    ] {
        let (status, answer) = gw.call("POST", "/v1/checks", Some(ADMIN), Some(body)).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (422, Some("ERR_VALIDATION"))
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(field),
            "{answer}"
        );
    }
    // Not JSON, unknown fields, too large: the envelope, never a 500.
    let (status, answer) = gw
        .call(
            "POST",
            "/v1/checks",
            Some(ADMIN),
            Some(json!({"kind": "ping", "target": "x.com", "limit": 1, "colour": "red"})),
        )
        .await;
    assert!(status == 400 || status == 422, "{answer}");
    assert!(answer["error"]["code"].is_string());
    let huge = "a".repeat(70 * 1024);
    let (status, _) = gw
        .call(
            "POST",
            "/v1/checks",
            Some(ADMIN),
            Some(json!({"kind": "ping", "target": huge, "limit": 1})),
        )
        .await;
    assert_eq!(status, 413);
}

/// A series of the gateway's `/metrics` (0 when absent).
async fn labelled(gw: &Gw, series: &str) -> f64 {
    checkplane_testkit::metric(&gw.running.url("/metrics"), series).await
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_authentications_from_one_address_are_refused_before_postgresql() {
    let gw = start_with(vec![("GATEWAY_RATE_AUTH_FAILURES".into(), "3/1m:3".into())]).await;
    // A key verified before the failures (so in the cache), and a wrong one of the same form.
    let (_, good) = gw.key(Role::Viewer, "verified").await;
    assert_eq!(gw.call("GET", "/v1/agents", Some(&good), None).await.0, 200);
    let wrong = format!("{}x", &good[..good.len() - 1]);
    let lookups = r#"checkplane_auth_lookups_total{kind="key"}"#;

    let before = labelled(&gw, lookups).await;
    for _ in 0..3 {
        let (status, body) = gw.call("GET", "/v1/agents", Some(&wrong), None).await;
        assert_eq!(status, 401, "{body}");
    }
    assert_eq!(labelled(&gw, lookups).await, before + 3.0);

    // Past three failures: 429 at once, without asking PostgreSQL; an agent's wrong token from
    // the same address too.
    let response = gw
        .http
        .get(gw.running.url("/v1/agents"))
        .header("x-api-key", &wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ERR_RATE_LIMITED", "{body}");
    let (status, body) = checkplane_testkit::agent_post(
        &gw.http,
        &gw.running.url("/v1/agents/heartbeat"),
        "agt-0123456789abcdef0123456789abcdef",
        "cpa_wrong",
        &json!({}),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(labelled(&gw, lookups).await, before + 3.0);
    assert_eq!(
        labelled(&gw, r#"checkplane_auth_lookups_total{kind="agent"}"#).await,
        0.0
    );

    // Credentials that need no PostgreSQL still pass: the bootstrap key, a key in the cache.
    assert_eq!(gw.call("GET", "/v1/agents", Some(ADMIN), None).await.0, 200);
    assert_eq!(gw.call("GET", "/v1/agents", Some(&good), None).await.0, 200);
}
