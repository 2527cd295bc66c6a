//! Rate limits per endpoint and caller against real gateways: each limit with its headers,
//! one budget shared by two replicas on one Redis, the in-memory fallback while Redis is
//! down, and `X-Forwarded-For` believed from trusted proxies only.

use std::time::Duration;

use checkplane_runtime::Env;
use checkplane_testkit::servers::RedisServer;
use checkplane_testkit::{store_env, Running, TestDb, TestRedis};
use serde_json::{json, Value};

use crate::agents::{start_with, Gw, ADMIN, ENROLL};

pub type Service = Running<checkplane_runtime::RunError>;

/// Every agent and operator limit at two calls a minute, two at once.
fn tight() -> Vec<(String, String)> {
    [
        "HEARTBEAT",
        "CLAIM",
        "EXTEND",
        "REPORT",
        "METRICS",
        "OPERATOR",
    ]
    .iter()
    .map(|e| (format!("GATEWAY_RATE_{e}"), "2/1m:2".to_owned()))
    .chain([("GATEWAY_RATE_REGISTER".to_owned(), "1/10m".to_owned())])
    .collect()
}

/// An answer's status, `RateLimit-*` and `Retry-After` headers (absent: `None`), and body.
struct Answer {
    status: u16,
    limit: Option<u64>,
    remaining: Option<u64>,
    reset: Option<u64>,
    retry_after: Option<u64>,
    body: Value,
}

async fn answer(response: reqwest::Response) -> Answer {
    let number = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().parse::<u64>().unwrap())
    };
    let (limit, remaining, reset, retry_after) = (
        number("ratelimit-limit"),
        number("ratelimit-remaining"),
        number("ratelimit-reset"),
        number("retry-after"),
    );
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        limit,
        remaining,
        reset,
        retry_after,
        body,
    }
}

async fn as_agent(
    http: &reqwest::Client,
    gw: &Service,
    path: &str,
    (id, token): (&str, &str),
    body: &Value,
) -> Answer {
    let response = http
        .post(gw.url(path))
        .header("x-agent-id", id)
        .header("x-agent-token", token)
        .json(body)
        .send()
        .await
        .unwrap();
    answer(response).await
}

async fn register(http: &reqwest::Client, gw: &Service, hostname: &str, token: &str) -> Answer {
    let response = http
        .post(gw.url("/v1/agents/register"))
        .header("x-enrollment-token", token)
        .json(&json!({"hostname": hostname, "capabilities": {"dns": 1}}))
        .send()
        .await
        .unwrap();
    answer(response).await
}

async fn as_operator(
    http: &reqwest::Client,
    gw: &Service,
    key: &str,
    forwarded: Option<&str>,
) -> Answer {
    let mut request = http.get(gw.url("/v1/agents")).header("x-api-key", key);
    if let Some(chain) = forwarded {
        request = request.header("x-forwarded-for", chain);
    }
    answer(request.send().await.unwrap()).await
}

/// Two calls allowed (remaining 1, then 0), the third refused with every header.
fn assert_two_then_refused(calls: &[Answer], what: &str) {
    for (n, call) in calls.iter().take(2).enumerate() {
        assert!(
            (200..300).contains(&call.status),
            "{what} call {n}: {} {}",
            call.status,
            call.body
        );
        assert_eq!(call.limit, Some(2), "{what} call {n}");
        assert_eq!(call.remaining, Some(1 - n as u64), "{what} call {n}");
        assert!(call.reset.is_some_and(|r| r > 0), "{what} call {n}");
        assert_eq!(call.retry_after, None, "{what} call {n}");
    }
    let refused = &calls[2];
    assert_eq!(refused.status, 429, "{what}: {}", refused.body);
    assert_eq!(refused.body["error"]["code"], "ERR_RATE_LIMITED", "{what}");
    assert_eq!(
        (refused.limit, refused.remaining),
        (Some(2), Some(0)),
        "{what}"
    );
    // Two a minute: the next call is allowed 30 s after the first; the whole burst 60 s.
    let retry = refused.retry_after.unwrap_or(0);
    assert!((25..=30).contains(&retry), "{what}: Retry-After {retry}");
    let reset = refused.reset.unwrap_or(0);
    assert!(
        (55..=60).contains(&reset),
        "{what}: RateLimit-Reset {reset}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_agent_call_and_the_operator_api_have_their_limit_with_its_headers() {
    let gw = start_with(tight()).await;
    let http = &gw.http;
    let run = &gw.running;
    let first = register(http, run, "limited-a", ENROLL).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!((first.limit, first.remaining), (Some(1), Some(0)));
    let a_id = first.body["agent_id"].as_str().unwrap().to_owned();
    let a_token = first.body["token"].as_str().unwrap().to_owned();
    let a = (a_id.as_str(), a_token.as_str());
    let (b_id, b_token) = checkplane_testkit::register_agent(
        http,
        &run.url(""),
        ENROLL,
        &json!({"hostname": "limited-b", "capabilities": {"dns": 1}}),
    )
    .await;

    // Well-formed calls (a lease token of the caller's that leases nothing is answered per
    // token), so each allowed one succeeds.
    let body = |path: &str, id: &str, n: usize| match path {
        "/v1/agents/claim" => {
            json!({"capacities": {"dns": 1}, "request_id": format!("r{n}"), "wait_ms": 0})
        }
        "/v1/agents/extend" => json!({"tokens": [format!("{id}.dns.1-0.1")]}),
        "/v1/agents/report" => {
            json!({"completed": [{"token": format!("{id}.dns.1-0.1"), "result": {"rcode": "NOERROR", "answers": []}}]})
        }
        "/v1/agents/metrics" => json!({"metrics": {"x": 1.0}}),
        _ => json!({}),
    };
    for path in [
        "/v1/agents/heartbeat",
        "/v1/agents/claim",
        "/v1/agents/extend",
        "/v1/agents/report",
        "/v1/agents/metrics",
    ] {
        let mut answers = Vec::new();
        for n in 0..3 {
            answers.push(as_agent(http, run, path, a, &body(path, &a_id, n)).await);
        }
        assert_two_then_refused(&answers, path);
        // Per agent: another agent has its own budget.
        let other = as_agent(http, run, path, (&b_id, &b_token), &body(path, &b_id, 9)).await;
        assert!((200..300).contains(&other.status), "{path}: {}", other.body);
        assert_eq!(other.remaining, Some(1), "{path}");
    }

    // Per API key.
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(as_operator(http, run, ADMIN, None).await);
    }
    assert_two_then_refused(&answers, "operator");

    // Per hostname: the same host again (proven by its token) is refused for ten minutes,
    // another host is not; a wrong enrollment token counts against the address, not the host.
    let response = http
        .post(run.url("/v1/agents/register"))
        .header("x-enrollment-token", ENROLL)
        .header("x-agent-token", &a_token)
        .json(&json!({"hostname": "limited-a", "capabilities": {"dns": 1}}))
        .send()
        .await
        .unwrap();
    let again = answer(response).await;
    assert_eq!(again.status, 429, "{}", again.body);
    assert_eq!(again.body["error"]["code"], "ERR_RATE_LIMITED");
    let retry = again.retry_after.unwrap_or(0);
    assert!((590..=600).contains(&retry), "Retry-After {retry}");
    let wrong = register(http, run, "limited-c", "not-the-enrollment-token").await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    // Counted as this address's first failed authentication (30 at once by default).
    assert_eq!((wrong.limit, wrong.remaining), (Some(30), Some(29)));
    assert_eq!(register(http, run, "limited-c", ENROLL).await.status, 201);

    let metrics = checkplane_testkit::metrics_text(&run.url("/metrics")).await;
    for endpoint in ["heartbeat", "claim", "extend", "report", "metrics"] {
        let series =
            format!("checkplane_rate_limited_total{{endpoint=\"{endpoint}\",caller=\"agent\"}}");
        assert_eq!(
            checkplane_testkit::metric_in(&metrics, &series),
            1.0,
            "{series}"
        );
    }
    for (endpoint, caller) in [("operator", "key"), ("register", "hostname")] {
        let series =
            format!("checkplane_rate_limited_total{{endpoint=\"{endpoint}\",caller=\"{caller}\"}}");
        assert_eq!(
            checkplane_testkit::metric_in(&metrics, &series),
            1.0,
            "{series}"
        );
    }
}

/// Another gateway on `gw`'s PostgreSQL and Redis with the same variables.
pub async fn replica(
    db: &TestDb,
    redis_url: &str,
    prefix: &str,
    extra: &[(String, String)],
) -> Service {
    let mut env = store_env(db, &TestRedis::new());
    for (k, v) in env.iter_mut() {
        if k == "REDIS_URL" {
            *v = redis_url.to_owned();
        }
        if k == "STREAM_PREFIX" {
            *v = prefix.to_owned();
        }
    }
    env.push(("GATEWAY_ENROLLMENT_TOKEN".into(), ENROLL.into()));
    env.push(("GATEWAY_ADMIN_KEY".into(), ADMIN.into()));
    env.extend(extra.iter().cloned());
    let config = gateway::load(&mut Env::from_pairs(env)).unwrap();
    let running = Running::start(|l, s| gateway::run(config, l, s)).await;
    running.wait_ready(Duration::from_secs(10)).await;
    running
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_on_one_redis_share_each_callers_budget() {
    let extra = vec![("GATEWAY_RATE_HEARTBEAT".to_owned(), "3/1m:3".to_owned())];
    let gw: Gw = start_with(extra.clone()).await;
    let other = replica(&gw.db, &gw.redis.url, &gw.redis.prefix, &extra).await;
    let (id, token) = checkplane_testkit::register_agent(
        &gw.http,
        &gw.running.url(""),
        ENROLL,
        &json!({"hostname": "shared-budget", "capabilities": {"dns": 1}}),
    )
    .await;
    let beat = |on: &'static str| {
        let (http, id, token) = (gw.http.clone(), id.clone(), token.clone());
        let target = if on == "a" { &gw.running } else { &other };
        let url = target.url("");
        async move {
            let response = http
                .post(format!("{url}/v1/agents/heartbeat"))
                .header("x-agent-id", id)
                .header("x-agent-token", token)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            answer(response).await
        }
    };
    let mut seen = Vec::new();
    for on in ["a", "b", "a", "b", "a"] {
        let call = beat(on).await;
        seen.push((on, call.status, call.remaining));
    }
    assert_eq!(
        seen,
        [
            ("a", 200, Some(2)),
            ("b", 200, Some(1)),
            ("a", 200, Some(0)),
            ("b", 429, Some(0)),
            ("a", 429, Some(0)),
        ]
    );
    other.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn while_redis_is_down_each_gateway_counts_in_memory_and_says_so() {
    let db = TestDb::new().await;
    let mut server = RedisServer::start();
    let gw = replica(
        &db,
        &server.url(),
        "fallback",
        &[("GATEWAY_RATE_OPERATOR".to_owned(), "2/1m:2".to_owned())],
    )
    .await;
    let http = reqwest::Client::new();
    let gauge = "checkplane_rate_limiter_fallback";
    let first = as_operator(&http, &gw, ADMIN, None).await;
    assert_eq!((first.status, first.remaining), (200, Some(1)));
    assert_eq!(
        checkplane_testkit::metric(&gw.url("/metrics"), gauge).await,
        0.0
    );

    server.stop();
    // Redis's count is out of reach: this gateway counts afresh, two then refused; the
    // operator API's reads need PostgreSQL only, so they go on.
    let calls = [
        as_operator(&http, &gw, ADMIN, None).await,
        as_operator(&http, &gw, ADMIN, None).await,
        as_operator(&http, &gw, ADMIN, None).await,
    ];
    assert_two_then_refused(&calls, "operator while Redis is down");
    assert_eq!(
        checkplane_testkit::metric(&gw.url("/metrics"), gauge).await,
        1.0
    );

    server.resume();
    // Back on Redis, whose count says one call so far.
    let back = checkplane_testkit::eventually(
        "the limiter counts in Redis again",
        Duration::from_secs(10),
        || async {
            let call = as_operator(&http, &gw, ADMIN, None).await;
            (call.status == 200).then_some(call)
        },
    )
    .await;
    assert_eq!(back.remaining, Some(0));
    assert_eq!(
        checkplane_testkit::metric(&gw.url("/metrics"), gauge).await,
        0.0
    );
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn x_forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    let failures = ("GATEWAY_RATE_AUTH_FAILURES".to_owned(), "2/1m:2".to_owned());
    let wrong = "cpk_0123456789ab_not-a-real-secret";

    // No trusted proxy: the header is the client's own word, and every call is the socket's.
    let open = start_with(vec![failures.clone()]).await;
    let (http, run) = (&open.http, &open.running);
    for chain in ["203.0.113.7", "203.0.113.7"] {
        assert_eq!(as_operator(http, run, wrong, Some(chain)).await.status, 401);
    }
    let other = as_operator(http, run, wrong, Some("198.51.100.9")).await;
    assert_eq!(other.status, 429, "{}", other.body);

    // Behind a trusted proxy (this test's loopback): the last untrusted address counts.
    let proxied = start_with(vec![
        failures,
        (
            "GATEWAY_TRUSTED_PROXIES".to_owned(),
            "127.0.0.1, 10.0.0.0/8".to_owned(),
        ),
    ])
    .await;
    let (http, run) = (&proxied.http, &proxied.running);
    assert_eq!(
        as_operator(http, run, wrong, Some("203.0.113.7"))
            .await
            .status,
        401
    );
    // A forged entry left of the client's, and a trusted hop right of it: still 203.0.113.7.
    assert_eq!(
        as_operator(http, run, wrong, Some("192.0.2.1, 203.0.113.7, 10.1.2.3"))
            .await
            .status,
        401
    );
    // With the port some proxies add: still 203.0.113.7.
    let third = as_operator(http, run, wrong, Some("203.0.113.7:4444")).await;
    assert_eq!(third.status, 429, "{}", third.body);
    assert_eq!(third.body["error"]["code"], "ERR_RATE_LIMITED");
    // Another client behind the same proxy has its own budget.
    let other = as_operator(http, run, wrong, Some("198.51.100.9")).await;
    assert_eq!(other.status, 401, "{}", other.body);

    // A registration behind the proxy is located at the client's address.
    let response = http
        .post(run.url("/v1/agents/register"))
        .header("x-enrollment-token", ENROLL)
        .header("x-forwarded-for", "198.51.100.20")
        .json(&json!({"hostname": "behind-proxy", "capabilities": {"dns": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let pg = proxied.db.client().await;
    let address: Option<String> = checkplane_testkit::eventually(
        "the registration is projected",
        Duration::from_secs(10),
        || async {
            pg.query_opt(
                "SELECT address FROM agents WHERE hostname = 'behind-proxy'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, Option<String>>(0))
        },
    )
    .await;
    assert_eq!(address.as_deref(), Some("198.51.100.20"));
}
