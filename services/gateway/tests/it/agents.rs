//! The agent registry over HTTP: registration, tokens, heartbeats, the operator's list, and
//! every kind of bad input answered with the error envelope.

use std::time::Duration;

use checkplane_runtime::Env;
use checkplane_testkit::{store_env, Running, TestDb, TestRedis};
use serde_json::{json, Value};

pub const ENROLL: &str = "enroll-secret-0123456789";
pub const ADMIN: &str = "admin-key-0123456789abcdef";

pub struct Gw {
    pub running: Running<checkplane_runtime::RunError>,
    pub http: reqwest::Client,
    pub db: TestDb,
    pub redis: TestRedis,
}

pub async fn start() -> Gw {
    start_with(vec![]).await
}

pub async fn start_with(extra: Vec<(String, String)>) -> Gw {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut env = store_env(&db, &redis);
    env.push(("GATEWAY_ENROLLMENT_TOKEN".into(), ENROLL.into()));
    env.push(("GATEWAY_ADMIN_KEY".into(), ADMIN.into()));
    env.extend(extra);
    let config = gateway::load(&mut Env::from_pairs(env)).unwrap();
    let running = Running::start(|l, s| gateway::run(config, l, s)).await;
    running.wait_ready(Duration::from_secs(10)).await;
    Gw {
        running,
        http: reqwest::Client::new(),
        db,
        redis,
    }
}

impl Gw {
    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: Value) -> (u16, Value) {
        let mut request = self.http.post(self.running.url(path)).json(&body);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut request = self.http.get(self.running.url(path));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn register(&self, body: Value) -> (u16, Value) {
        self.post(
            "/v1/agents/register",
            &[("x-enrollment-token", ENROLL)],
            body,
        )
        .await
    }

    /// Register a known host again with its agent's current `token`.
    pub async fn register_with(&self, body: Value, token: &str) -> (u16, Value) {
        self.post(
            "/v1/agents/register",
            &[("x-enrollment-token", ENROLL), ("x-agent-token", token)],
            body,
        )
        .await
    }

    pub async fn heartbeat(&self, id: &str, token: &str) -> (u16, Value) {
        self.post(
            "/v1/agents/heartbeat",
            &[("x-agent-id", id), ("x-agent-token", token)],
            json!({}),
        )
        .await
    }
}

pub fn probe(hostname: &str) -> Value {
    json!({
        "hostname": hostname,
        "labels": {"rack": "r1"},
        "capabilities": {"dns": 4, "http": 2},
        "location": {"country": "de", "city": "Berlin", "asn": 64500, "network": "TestNet"},
        "agent_version": "0.1.0",
    })
}

#[tokio::test]
async fn register_heartbeat_and_rotate() {
    let gw = start().await;
    let (status, first) = gw.register(probe("probe-1")).await;
    assert_eq!(status, 201, "{first}");
    let id = first["agent_id"].as_str().unwrap().to_owned();
    let token = first["token"].as_str().unwrap().to_owned();
    assert_eq!(first["rotated"], false);

    // The registration is readable at once, and the secret is stored only as a hash.
    let row = gw
        .db
        .client()
        .await
        .query_one(
            "SELECT hostname, token_hash, country, status, identity_version FROM agents WHERE agent_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "probe-1");
    assert_ne!(row.get::<_, String>(1), token);
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("DE"));
    assert_eq!(row.get::<_, String>(3), "registered");
    assert_eq!(row.get::<_, i64>(4), 1);

    let (status, beat) = gw.heartbeat(&id, &token).await;
    assert_eq!(status, 200, "{beat}");
    assert_eq!(beat["next_deadline_ms"], 10_000);

    // The same host again with the enrollment token alone, or with a wrong agent token: a
    // takeover, refused; the agent's token goes on working.
    for (status, body) in [
        gw.register(probe("PROBE-1")).await,
        gw.register_with(probe("probe-1"), "cpa_not-its-token")
            .await,
    ] {
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "ERR_CONFLICT");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(&id),
            "{body}"
        );
    }
    assert_eq!(gw.heartbeat(&id, &token).await.0, 200);

    // With its token, the host registers again and the token rotates: the old one stops.
    let (status, second) = gw.register_with(probe("PROBE-1"), &token).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["agent_id"], id.as_str());
    assert_eq!(second["rotated"], true);
    let new_token = second["token"].as_str().unwrap();
    assert_ne!(new_token, token);
    let (status, body) = gw.heartbeat(&id, &token).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "ERR_UNAUTHORIZED");
    assert_eq!(gw.heartbeat(&id, new_token).await.0, 200);

    // Both registrations are events, published to the agents stream and gone from the outbox.
    let client = gw.db.client().await;
    let versions: Vec<i64> = client
        .query(
            "SELECT version FROM events WHERE aggregate_id = $1 ORDER BY version",
            &[&format!("agent:{id}")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2]);
    let outbox: i64 = client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outbox, 0);
    let mut conn = gw.redis.connection().await;
    let stream_len: i64 = redis::cmd("XLEN")
        .arg(format!("{}:events:agents", gw.redis.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stream_len, 2);
    gw.running.stop().await.unwrap();
}

#[tokio::test]
async fn registration_refuses_bad_input_with_precise_codes() {
    let gw = start().await;
    let url = gw.running.url("/v1/agents/register");

    let (status, body) = gw.post("/v1/agents/register", &[], probe("p")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("ERR_UNAUTHORIZED"))
    );
    let (status, _) = gw
        .post(
            "/v1/agents/register",
            &[("x-enrollment-token", "wrong-token-000000")],
            probe("p"),
        )
        .await;
    assert_eq!(status, 401);

    let raw = |body: &'static str, content_type: &'static str| {
        gw.http
            .post(&url)
            .header("x-enrollment-token", ENROLL)
            .header("content-type", content_type)
            .body(body)
    };
    let response = raw("{not json", "application/json").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ERR_BAD_REQUEST");
    let response = raw("{}", "text/plain").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 415);

    let mut unknown = probe("p");
    unknown["surprise"] = json!(1);
    let (status, body) = gw.register(unknown).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("ERR_VALIDATION"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("surprise"),
        "{body}"
    );

    let mut negative = probe("p");
    negative["capabilities"]["dns"] = json!(-1);
    assert_eq!(gw.register(negative).await.0, 422);

    let mut labels = probe("p");
    labels["labels"] = (0..40)
        .map(|i| (format!("k{i}"), json!("v")))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let (status, body) = gw.register(labels).await;
    assert_eq!(status, 422);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("labels:"),
        "{body}"
    );

    let mut kind = probe("p");
    kind["capabilities"]["smtp"] = json!(1);
    let (status, body) = gw.register(kind).await;
    assert_eq!(status, 422);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("capabilities.smtp"),
        "{body}"
    );

    let huge = format!(
        "{{\"hostname\":\"p\",\"capabilities\":{{\"dns\":1}},\"labels\":{{\"k\":\"{}\"}}}}",
        "x".repeat(100 * 1024)
    );
    let response = gw
        .http
        .post(&url)
        .header("x-enrollment-token", ENROLL)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ERR_PAYLOAD_TOO_LARGE");

    // Nothing of the refused requests was recorded.
    let n: i64 = gw
        .db
        .client()
        .await
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    gw.running.stop().await.unwrap();
}

#[tokio::test]
async fn agent_routes_require_a_valid_identity() {
    let gw = start().await;
    let (_, reg) = gw.register(probe("p2")).await;
    let id = reg["agent_id"].as_str().unwrap();
    for headers in [
        vec![],
        vec![("x-agent-id", id)],
        vec![("x-agent-id", id), ("x-agent-token", "cpa_wrong")],
        vec![("x-agent-id", "no such agent"), ("x-agent-token", "x")],
        vec![("x-agent-id", "agt-unknown"), ("x-agent-token", "x")],
    ] {
        let (status, body) = gw.post("/v1/agents/heartbeat", &headers, json!({})).await;
        assert_eq!(status, 401, "{headers:?}");
        assert_eq!(body["error"]["code"], "ERR_UNAUTHORIZED");
    }
    let long = "x".repeat(10_000);
    let (status, _) = gw
        .post(
            "/v1/agents/heartbeat",
            &[("x-agent-id", id), ("x-agent-token", &long)],
            json!({}),
        )
        .await;
    assert_eq!(status, 401);
    gw.running.stop().await.unwrap();
}

/// An agent says its protocol version on every call: without it (agents from before the
/// header) and with the current one it is served; a version this gateway does not serve is
/// refused before anything else, saying which side to upgrade.
#[tokio::test]
async fn agents_of_a_protocol_this_gateway_does_not_serve_are_refused_with_the_versions() {
    use checkplane_wire::agents::protocol;
    let gw = start().await;
    let current = protocol::CURRENT.to_string();
    let newer = (protocol::CURRENT + 1).to_string();
    fn enroll(version: &str) -> [(&str, &str); 2] {
        [("x-enrollment-token", ENROLL), (protocol::HEADER, version)]
    }

    let (status, body) = gw
        .post("/v1/agents/register", &enroll(&newer), probe("proto-1"))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "ERR_UNSUPPORTED_PROTOCOL");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("speaks protocol {newer}")),
        "{message}"
    );
    assert!(message.contains("upgrade the gateway"), "{message}");
    let (status, body) = gw
        .post("/v1/agents/register", &enroll("one"), probe("proto-1"))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "ERR_VALIDATION");

    let (status, first) = gw
        .post("/v1/agents/register", &enroll(&current), probe("proto-1"))
        .await;
    assert_eq!(status, 201, "{first}");
    let id = first["agent_id"].as_str().unwrap();
    let token = first["token"].as_str().unwrap();
    // Without the header: protocol 1, served.
    let (status, body) = gw.heartbeat(id, token).await;
    assert_eq!(status, 200, "{body}");
    for (path, body) in [
        ("/v1/agents/heartbeat", json!({})),
        ("/v1/agents/extend", json!({"tokens": []})),
        (
            "/v1/agents/claim",
            json!({"capacities": {"dns": 1}, "request_id": "r1", "wait_ms": 0}),
        ),
    ] {
        let agent = [
            ("x-agent-id", id),
            ("x-agent-token", token),
            (protocol::HEADER, newer.as_str()),
        ];
        let (status, answer) = gw.post(path, &agent, body.clone()).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert_eq!(
            answer["error"]["code"], "ERR_UNSUPPORTED_PROTOCOL",
            "{path}"
        );
        let agent = [
            ("x-agent-id", id),
            ("x-agent-token", token),
            (protocol::HEADER, current.as_str()),
        ];
        let (status, answer) = gw.post(path, &agent, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
    }
    // A report's outcome is one of the two there are.
    let agent = [("x-agent-id", id), ("x-agent-token", token)];
    let (status, answer) = gw
        .post(
            "/v1/agents/report",
            &agent,
            json!({"completed": [{"token": "t", "outcome": "exploded"}]}),
        )
        .await;
    assert!((400..500).contains(&status), "{status}: {answer}");
    assert!(answer["error"]["code"].is_string(), "{answer}");
}

#[tokio::test]
async fn registration_is_disabled_without_an_enrollment_token() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let config = gateway::load(&mut Env::from_pairs(store_env(&db, &redis))).unwrap();
    let gw = Running::start(|l, s| gateway::run(config, l, s)).await;
    let response = reqwest::Client::new()
        .post(gw.url("/v1/agents/register"))
        .header("x-enrollment-token", ENROLL)
        .json(&probe("p"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    gw.stop().await.unwrap();
}

#[tokio::test]
async fn operators_list_agents_with_filters_and_pages() {
    let gw = start().await;
    for (i, country) in ["DE", "DE", "FR", "US", "DE"].iter().enumerate() {
        let mut body = probe(&format!("host-{i}"));
        body["location"]["country"] = json!(country);
        body["location"]["asn"] = json!(64500 + i);
        if i == 3 {
            body["capabilities"] = json!({"ping": 1});
        }
        assert_eq!(gw.register(body).await.0, 201);
    }
    let admin = [("x-api-key", ADMIN)];
    let (status, page) = gw.get("/v1/agents?limit=2", &admin).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 5);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["has_more"], true);
    let (_, last) = gw.get("/v1/agents?limit=2&offset=4", &admin).await;
    assert_eq!(last["items"].as_array().unwrap().len(), 1);
    assert_eq!(last["has_more"], false);
    let (_, beyond) = gw.get("/v1/agents?limit=2&offset=10", &admin).await;
    assert_eq!(
        (
            beyond["total"].as_i64(),
            beyond["items"].as_array().map(Vec::len)
        ),
        (Some(5), Some(0))
    );

    let (_, de) = gw.get("/v1/agents?country=de", &admin).await;
    assert_eq!(de["total"], 3);
    assert!(de["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["location"]["country"] == "DE"));
    let (_, asn) = gw.get("/v1/agents?asn=64502", &admin).await;
    assert_eq!(asn["items"][0]["hostname"], "host-2");
    let (_, ping) = gw.get("/v1/agents?capability=ping", &admin).await;
    assert_eq!(ping["total"], 1);
    let (_, label) = gw
        .get("/v1/agents?label=rack:r1&status=registered", &admin)
        .await;
    assert_eq!(label["total"], 5);

    assert_eq!(gw.get("/v1/agents", &[]).await.0, 401);
    assert_eq!(
        gw.get("/v1/agents", &[("x-api-key", "nope-nope-nope-nope")])
            .await
            .0,
        401
    );
    for bad in [
        "limit=0",
        "limit=501",
        "offset=-1",
        "status=sleeping",
        "country=DEU",
        "capability=smtp",
        "label=nocolon",
        "asn=x",
        "bogus=1",
    ] {
        let (status, body) = gw.get(&format!("/v1/agents?{bad}"), &admin).await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "ERR_VALIDATION", "{bad}");
    }
    gw.running.stop().await.unwrap();
}

#[tokio::test]
async fn agents_without_a_declared_location_are_located_by_address() {
    use checkplane_testkit::geo::{write_databases, Place};
    let dir = std::env::temp_dir().join(format!("cp-geo-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (city, asn) = (dir.join("city.mmdb"), dir.join("asn.mmdb"));
    write_databases(
        &[
            Place {
                ip: "127.0.0.2".parse().unwrap(),
                country: "DE",
                city: "Berlin",
                asn: 64500,
                network: "Net A",
            },
            Place {
                ip: "127.0.0.3".parse().unwrap(),
                country: "FR",
                city: "Paris",
                asn: 64501,
                network: "Net B",
            },
            Place {
                ip: "127.0.0.4".parse().unwrap(),
                country: "US",
                city: "Boston",
                asn: 4_200_000_001,
                network: "Net C",
            },
        ],
        &city,
        &asn,
    );
    let gw = start_with(vec![
        ("GEOIP_CITY_DB".into(), city.display().to_string()),
        ("GEOIP_ASN_DB".into(), asn.display().to_string()),
    ])
    .await;
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let register_from = |ip: &'static str, body: Value| {
        let client = from(ip);
        let url = gw.running.url("/v1/agents/register");
        async move {
            let r = client
                .post(url)
                .header("x-enrollment-token", ENROLL)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            r.json::<Value>().await.unwrap()["agent_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let undeclared = |host: &str| json!({"hostname": host, "capabilities": {"ping": 1}});
    let a = register_from("127.0.0.2", undeclared("geo-a")).await;
    let b = register_from("127.0.0.3", undeclared("geo-b")).await;
    let c = register_from("127.0.0.4", undeclared("geo-c")).await;
    let unknown = register_from("127.0.0.9", undeclared("geo-unknown")).await;
    let declared = register_from("127.0.0.2", probe("geo-declared")).await;

    let client = gw.db.client().await;
    let located = |id: String| {
        let client = &client;
        async move {
            let r = client
                .query_one("SELECT country, city, asn, network, location_source, address FROM agents WHERE agent_id = $1", &[&id])
                .await
                .unwrap();
            (
                r.get::<_, Option<String>>(0),
                r.get::<_, Option<String>>(1),
                r.get::<_, Option<i64>>(2),
                r.get::<_, Option<String>>(3),
                r.get::<_, String>(4),
                r.get::<_, String>(5),
            )
        }
    };
    assert_eq!(
        located(a).await,
        (
            Some("DE".into()),
            Some("Berlin".into()),
            Some(64500),
            Some("Net A".into()),
            "geoip".into(),
            "127.0.0.2".into()
        )
    );
    assert_eq!(located(b).await.0.as_deref(), Some("FR"));
    assert_eq!(
        located(c).await.2,
        Some(4_200_000_001),
        "four-byte ASNs fit"
    );
    assert_eq!(
        located(unknown).await,
        (None, None, None, None, "none".into(), "127.0.0.9".into())
    );
    let d = located(declared).await;
    assert_eq!((d.0.as_deref(), d.4.as_str()), (Some("DE"), "declared"));
    assert_eq!(
        d.2,
        Some(64500),
        "the declared location wins over the lookup"
    );
    gw.running.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_geoip_database_stops_start_up_naming_the_variable() {
    let mut env = Env::from_pairs([
        ("DATABASE_URL", "postgres://u@127.0.0.1:1/db"),
        ("GEOIP_ASN_DB", "/nonexistent/asn.mmdb"),
    ]);
    let err = gateway::load(&mut env).unwrap_err();
    assert_eq!(err.var, "GEOIP_ASN_DB");
}

#[tokio::test]
async fn rotated_tokens_and_revoked_keys_stop_working_on_every_replica_at_once() {
    // Caches trusted for a minute: only the announcement can make the replicas forget.
    let ttl = ("GATEWAY_AUTH_CACHE_TTL".to_owned(), "60s".to_owned());
    let a = start_with(vec![ttl.clone()]).await;
    // A second replica on the same database and Redis.
    let mut env = store_env(&a.db, &a.redis);
    env.push(("GATEWAY_ENROLLMENT_TOKEN".into(), ENROLL.into()));
    env.push(("GATEWAY_ADMIN_KEY".into(), ADMIN.into()));
    env.push(ttl);
    let config = gateway::load(&mut Env::from_pairs(env)).unwrap();
    let b = Running::start(|l, s| gateway::run(config, l, s)).await;
    b.wait_ready(Duration::from_secs(10)).await;

    let (_, reg) = a.register(probe("rotating")).await;
    let (id, old) = (
        reg["agent_id"].as_str().unwrap().to_owned(),
        reg["token"].as_str().unwrap().to_owned(),
    );
    assert_eq!(a.heartbeat(&id, &old).await.0, 200); // now cached on replica a
    let (_, new) =
        checkplane_testkit::reregister_agent(&a.http, &b.url(""), ENROLL, &probe("rotating"), &old)
            .await;
    assert_eq!(
        a.heartbeat(&id, &new).await.0,
        200,
        "the new token works at once everywhere"
    );
    checkplane_testkit::eventually(
        "the old token refused on replica a",
        Duration::from_secs(5),
        || async { (a.heartbeat(&id, &old).await.0 == 401).then_some(()) },
    )
    .await;

    // A key verified on replica a (so cached there), revoked on replica b.
    let (status, made) = a
        .post(
            "/v1/keys",
            &[("x-api-key", ADMIN)],
            json!({"name": "short-lived", "role": "viewer"}),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let key = made["key"].as_str().unwrap();
    let key_id = made["key_id"].as_str().unwrap();
    assert_eq!(a.get("/v1/agents", &[("x-api-key", key)]).await.0, 200);
    let revoked = a
        .http
        .delete(b.url(&format!("/v1/keys/{key_id}")))
        .header("x-api-key", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 204);
    checkplane_testkit::eventually(
        "the revoked key refused on replica a",
        Duration::from_secs(5),
        || async { (a.get("/v1/agents", &[("x-api-key", key)]).await.0 == 401).then_some(()) },
    )
    .await;
    b.stop().await.unwrap();
    a.running.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_reports_are_kept_and_their_snapshots_read_back_in_order() {
    let gw = start().await;
    let (_, reg) = gw.register(probe("metered")).await;
    let id = reg["agent_id"].as_str().unwrap().to_owned();
    let token = reg["token"].as_str().unwrap().to_owned();
    let auth = [
        ("x-agent-id", id.as_str()),
        ("x-agent-token", token.as_str()),
    ];
    let now = checkplane_runtime::clock::now_ms();
    let snap = |at: i64, window: u32, pressure: bool, reason: Option<&str>| {
        json!({"at_ms": at, "window": window, "max": 64, "inflight": window, "queued": 3,
               "backpressure": pressure, "reason": reason})
    };
    let body = json!({
        "metrics": {"concurrency.window": 44.0, "process.rss_bytes": 9_000_000.0},
        "concurrency": [snap(now - 2000, 64, false, None), snap(now - 1000, 44, true, Some("timeouts"))],
    });
    let (status, answer) = gw.post("/v1/agents/metrics", &auth, body.clone()).await;
    assert_eq!(status, 202, "{answer}");
    // Sent again (a lost answer): the snapshots are kept once.
    assert_eq!(gw.post("/v1/agents/metrics", &auth, body).await.0, 202);
    let (status, page) = gw
        .get(
            &format!("/v1/agents/{id}/concurrency"),
            &[("x-api-key", ADMIN)],
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 2, "{page}");
    assert_eq!(page["items"][0]["window"], 64);
    assert_eq!(page["items"][1]["window"], 44);
    assert_eq!(page["items"][1]["backpressure"], true);
    assert_eq!(page["items"][1]["reason"], "timeouts");
    let (_, later) = gw
        .get(
            &format!("/v1/agents/{id}/concurrency?from={}", now - 1500),
            &[("x-api-key", ADMIN)],
        )
        .await;
    assert_eq!(later["total"], 1, "{later}");
    let kept: serde_json::Value = gw
        .db
        .client()
        .await
        .query_one(
            "SELECT metrics FROM agent_metrics WHERE agent_id = $1 LIMIT 1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept["process.rss_bytes"], 9_000_000.0);

    // Bad reports name what is wrong.
    for (bad, field) in [
        (json!({"metrics": {"no spaces": 1.0}}), "metrics.no spaces"),
        (
            json!({"concurrency": [snap(now - 2 * 86_400_000, 1, false, None)]}),
            "concurrency[0].at_ms",
        ),
        (
            json!({"concurrency": [snap(now, 65, false, None)]}),
            "concurrency[0].window",
        ),
        (
            json!({"concurrency": [snap(now, 1, true, Some("Bad Reason"))]}),
            "concurrency[0].reason",
        ),
        (
            json!({"concurrency": (0..601).map(|i| snap(now - i, 1, false, None)).collect::<Vec<_>>()}),
            "concurrency",
        ),
        (json!({"extra": 1}), "extra"),
    ] {
        let (status, answer) = gw.post("/v1/agents/metrics", &auth, bad).await;
        assert_eq!(status, 422, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{field}: {message}");
    }
    // Agents only, and operators read only agents that exist.
    assert_eq!(gw.post("/v1/agents/metrics", &[], json!({})).await.0, 401);
    let (status, _) = gw
        .get("/v1/agents/agt-nobody/concurrency", &[("x-api-key", ADMIN)])
        .await;
    assert_eq!(status, 404);
    let (status, _) = gw
        .get(
            &format!("/v1/agents/{id}/concurrency?limit=0"),
            &[("x-api-key", ADMIN)],
        )
        .await;
    assert_eq!(status, 422);
    gw.running.stop().await.unwrap();
}

#[tokio::test]
async fn a_host_that_lost_its_token_registers_again_once_an_admin_approves() {
    let gw = start().await;
    let (_, first) = gw.register(probe("rebuilt")).await;
    let id = first["agent_id"].as_str().unwrap().to_owned();
    let old = first["token"].as_str().unwrap().to_owned();
    let failures = r#"checkplane_rate_limited_total{endpoint="auth_failures",caller="address"}"#;

    // The enrollment token alone: refused, and counted as a failed authentication.
    let response = gw
        .http
        .post(gw.running.url("/v1/agents/register"))
        .header("x-enrollment-token", ENROLL)
        .json(&probe("rebuilt"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 409);
    assert_eq!(response.headers()["ratelimit-remaining"], "29");
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("/v1/agents/{id}/reenroll")),
        "{body}"
    );
    assert_eq!(
        checkplane_testkit::metric(&gw.running.url("/metrics"), failures).await,
        0.0
    );

    // An admin approves: one registration by the enrollment token alone, within the hour.
    let before = checkplane_runtime::clock::now_ms();
    let (status, approval) = gw
        .post(
            &format!("/v1/agents/{id}/reenroll"),
            &[("x-api-key", ADMIN)],
            Value::Null,
        )
        .await;
    assert_eq!(status, 200, "{approval}");
    assert_eq!(approval["hostname"], "rebuilt");
    let until = approval["until_ms"].as_i64().unwrap();
    assert!(
        (before + 3_500_000..=before + 3_700_000).contains(&until),
        "{approval}"
    );
    let (status, again) = gw.register(probe("rebuilt")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["agent_id"], id.as_str());
    assert_eq!(again["rotated"], true);
    assert_eq!(gw.heartbeat(&id, &old).await.0, 401);
    let new = again["token"].as_str().unwrap();
    assert_eq!(gw.heartbeat(&id, new).await.0, 200);

    // Used up: the enrollment token alone is refused again.
    assert_eq!(gw.register(probe("rebuilt")).await.0, 409);
    // An approval past its hour is no approval.
    let (status, _) = gw
        .post(
            &format!("/v1/agents/{id}/reenroll"),
            &[("x-api-key", ADMIN)],
            Value::Null,
        )
        .await;
    assert_eq!(status, 200);
    gw.db
        .client()
        .await
        .execute(
            "UPDATE agents SET reenroll_until = now() - interval '1 second' WHERE agent_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(gw.register(probe("rebuilt")).await.0, 409);
    let (status, _) = gw
        .post(
            "/v1/agents/agt-0123456789abcdef0123456789abcdef/reenroll",
            &[("x-api-key", ADMIN)],
            Value::Null,
        )
        .await;
    assert_eq!(status, 404);

    // The approval is in the audit log, by whom.
    let (status, audit) = gw
        .get(
            "/v1/audit?action=agent.reenroll_approved",
            &[("x-api-key", ADMIN)],
        )
        .await;
    assert_eq!(status, 200, "{audit}");
    assert_eq!(audit["total"], 2, "{audit}");
    assert_eq!(audit["items"][0]["actor"], "key:bootstrap");
    assert_eq!(audit["items"][0]["object"], format!("agent:{id}"));
}

#[tokio::test]
async fn a_re_registration_whose_answer_was_lost_is_taken_with_the_token_it_replaced() {
    let gw = start().await;
    let (_, first) = gw.register(probe("lossy")).await;
    let id = first["agent_id"].as_str().unwrap().to_owned();
    let t1 = first["token"].as_str().unwrap().to_owned();
    // Committed, but the agent never read the answer: it still holds t1.
    let (status, second) = gw.register_with(probe("lossy"), &t1).await;
    assert_eq!(status, 200, "{second}");
    let t2 = second["token"].as_str().unwrap().to_owned();
    // So it tries again with t1, the token that registration replaced: taken.
    let (status, third) = gw.register_with(probe("lossy"), &t1).await;
    assert_eq!(status, 200, "{third}");
    assert_eq!(third["agent_id"], id.as_str());
    let t3 = third["token"].as_str().unwrap();
    assert_eq!(gw.heartbeat(&id, t3).await.0, 200);
    assert_eq!(gw.heartbeat(&id, &t2).await.0, 401);
    // Two registrations back is no proof.
    let (status, body) = gw.register_with(probe("lossy"), &t1).await;
    assert_eq!(status, 409, "{body}");
}

#[tokio::test]
async fn a_heartbeat_refuses_fields_it_does_not_know_like_every_other_body() {
    let gw = start().await;
    let (_, reg) = gw.register(probe("chatty")).await;
    let id = reg["agent_id"].as_str().unwrap();
    let token = reg["token"].as_str().unwrap();
    let auth = [("x-agent-id", id), ("x-agent-token", token)];
    let (status, body) = gw
        .post("/v1/agents/heartbeat", &auth, json!({"status": "fine"}))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "ERR_VALIDATION");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("status"),
        "{body}"
    );
    assert_eq!(
        gw.post("/v1/agents/heartbeat", &auth, json!({})).await.0,
        200
    );
}
