//! The lease API over HTTP: claim (with the long poll), extend, report, and bad input.

use std::time::{Duration, Instant};

use checkplane_core::keys::Keys;
use checkplane_core::leases::{LeaseSettings, Leases};
use checkplane_testkit::servers::RedisServer;
use checkplane_testkit::{eventually, store_env, Running, TestDb, TestRedis};
use serde_json::{json, Value};

use crate::agents::{probe, start_with, Gw, ENROLL};

async fn agent(gw: &Gw, host: &str) -> (String, String) {
    let (status, body) = gw.register(probe(host)).await;
    assert_eq!(status, 201, "{body}");
    (
        body["agent_id"].as_str().unwrap().to_owned(),
        body["token"].as_str().unwrap().to_owned(),
    )
}

fn helper(gw: &Gw) -> Leases {
    Leases::new(
        Keys::new(gw.redis.prefix.clone(), 4),
        LeaseSettings::new(30_000, 5),
    )
}

async fn call(gw: &Gw, path: &str, id: &str, token: &str, body: Value) -> (u16, Value) {
    gw.post(path, &[("x-agent-id", id), ("x-agent-token", token)], body)
        .await
}

#[tokio::test]
async fn claim_extend_report_over_http() {
    let gw = start_with(vec![("LEASE_TTL".into(), "20s".into())]).await;
    let (id, token) = agent(&gw, "worker-1").await;
    let leases = helper(&gw);
    let mut conn = gw.redis.connection().await;
    for host in ["a.example", "b.example"] {
        leases
            .enqueue(
                &mut conn,
                &id,
                "dns",
                &json!({"name": host, "type": "A"}).to_string(),
            )
            .await
            .unwrap();
    }
    let (status, claimed) = call(
        &gw,
        "/v1/agents/claim",
        &id,
        &token,
        json!({"capacities": {"dns": 4}, "request_id": "r1", "agent_id": id}),
    )
    .await;
    assert_eq!(status, 200, "{claimed}");
    let list = claimed["leases"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["kind"], "dns");
    assert_eq!(list[0]["spec"]["name"], "a.example");
    assert_eq!(list[0]["lease_duration_ms"], 20_000);
    let tokens: Vec<String> = list
        .iter()
        .map(|l| l["token"].as_str().unwrap().to_owned())
        .collect();

    // The same request_id again: the same leases, not new ones.
    let (_, again) = call(
        &gw,
        "/v1/agents/claim",
        &id,
        &token,
        json!({"capacities": {"dns": 4}, "request_id": "r1"}),
    )
    .await;
    for (a, b) in again["leases"].as_array().unwrap().iter().zip(list) {
        for field in ["token", "kind", "spec", "lease_until_ms"] {
            assert_eq!(a[field], b[field], "{field}");
        }
    }
    assert_eq!(again["leases"].as_array().unwrap().len(), 2);

    let (status, extended) = call(
        &gw,
        "/v1/agents/extend",
        &id,
        &token,
        json!({"tokens": tokens}),
    )
    .await;
    assert_eq!(status, 200, "{extended}");
    assert!(
        extended["results"][1]["new_deadline_ms"].as_i64().unwrap()
            > checkplane_runtime::clock::now_ms()
    );

    let report = json!({
        "completed": [{"token": tokens[0], "observations": [{"name": "total", "value": 1.5, "unit": "ms"}],
                       "result": {"rcode": "NOERROR", "answers": [{"name": "a.example", "type": "A", "ttl": 60, "class": "IN", "value": "192.0.2.1"}]}}],
        "cancelled": [{"token": tokens[1], "reason": "shutting down"}],
    });
    let (status, reported) = call(&gw, "/v1/agents/report", &id, &token, report.clone()).await;
    assert_eq!(status, 200, "{reported}");
    assert_eq!(reported["results"][0]["status"], "acknowledged");
    assert_eq!(reported["results"][1]["status"], "acknowledged");
    let (_, repeated) = call(&gw, "/v1/agents/report", &id, &token, report).await;
    assert_eq!(repeated, reported, "the same report twice, the same answer");
    let (_, late) = call(
        &gw,
        "/v1/agents/extend",
        &id,
        &token,
        json!({"tokens": [tokens[0]]}),
    )
    .await;
    assert_eq!(late["results"][0]["error"], "ERR_LEASE_UNKNOWN");
    gw.running.stop().await.unwrap();
}

#[tokio::test]
async fn a_waiting_claim_is_woken_by_new_work() {
    let gw = start_with(vec![]).await;
    let (id, token) = agent(&gw, "waiter").await;
    let leases = helper(&gw);
    let started = Instant::now();
    let waiting = {
        let http = gw.http.clone();
        let url = gw.running.url("/v1/agents/claim");
        let (id, token) = (id.clone(), token.clone());
        tokio::spawn(async move {
            let r = http
                .post(url)
                .header("x-agent-id", id)
                .header("x-agent-token", token)
                .json(
                    &json!({"capacities": {"http": 1}, "request_id": "wait-1", "wait_ms": 15_000}),
                )
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap(),
                Instant::now(),
            )
        })
    };
    // The claim is in its wait (it found nothing) before the work arrives: so only the
    // doorbell can answer it before its 15 s are over.
    let metrics = gw.running.url("/metrics");
    eventually("the claim waiting", Duration::from_secs(10), || async {
        checkplane_testkit::metrics_text(&metrics)
            .await
            .lines()
            .any(|l| l == "checkplane_claims_waiting 1")
            .then_some(())
    })
    .await;
    let mut conn = gw.redis.connection().await;
    let enqueued = Instant::now();
    leases
        .enqueue(&mut conn, &id, "http", "{\"url\":\"http://127.0.0.1/\"}")
        .await
        .unwrap();
    let (status, body, answered) = waiting.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["leases"].as_array().unwrap().len(), 1, "{body}");
    // Woken by the doorbell: not by the end of its 15 s wait, nor by its look again after a
    // lease TTL (30 s here).
    let woken = answered.duration_since(enqueued);
    assert!(
        woken < Duration::from_secs(5),
        "answered {woken:?} after the enqueue, {:?} after the claim",
        answered.duration_since(started)
    );
    let metrics_after = checkplane_testkit::metrics_text(&metrics).await;
    assert!(
        metrics_after
            .lines()
            .any(|l| l == "checkplane_claims_waiting 0"),
        "the wait is over"
    );

    // With nothing to do, a claim answers empty when its wait is over.
    let (status, empty) = call(
        &gw,
        "/v1/agents/claim",
        &id,
        &token,
        json!({"capacities": {"http": 1}, "request_id": "wait-2", "wait_ms": 100}),
    )
    .await;
    assert_eq!(
        (status, empty["leases"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    gw.running.stop().await.unwrap();
}

#[tokio::test]
async fn lease_calls_refuse_bad_input_with_precise_codes() {
    let gw = start_with(vec![]).await;
    let (id, token) = agent(&gw, "strict").await;
    let (other_id, other_token) = agent(&gw, "other").await;
    let leases = helper(&gw);
    let mut conn = gw.redis.connection().await;
    leases
        .enqueue(&mut conn, &other_id, "tcp", "{}")
        .await
        .unwrap();
    let (_, theirs) = call(
        &gw,
        "/v1/agents/claim",
        &other_id,
        &other_token,
        json!({"capacities": {"tcp": 1}, "request_id": "o1"}),
    )
    .await;
    let their_token = theirs["leases"][0]["token"].as_str().unwrap().to_owned();

    for (body, code) in [
        (
            json!({"capacities": {"dns": -1}, "request_id": "x"}),
            "ERR_VALIDATION",
        ),
        (
            json!({"capacities": {"dns": 5000}, "request_id": "x"}),
            "ERR_VALIDATION",
        ),
        (
            json!({"capacities": {"dns": 1000, "http": 1000}, "request_id": "x"}),
            "ERR_VALIDATION",
        ),
        (
            json!({"capacities": {"smtp": 1}, "request_id": "x"}),
            "ERR_VALIDATION",
        ),
        (
            json!({"capacities": {}, "request_id": "x"}),
            "ERR_VALIDATION",
        ),
        (
            json!({"capacities": {"dns": 1}, "request_id": "no spaces"}),
            "ERR_VALIDATION",
        ),
        (
            json!({"capacities": {"dns": 1}, "request_id": "x".repeat(65)}),
            "ERR_VALIDATION",
        ),
        (json!({"capacities": {"dns": 1}}), "ERR_VALIDATION"),
        (
            json!({"capacities": {"dns": 1}, "request_id": "x", "extra": 1}),
            "ERR_VALIDATION",
        ),
        (
            json!({"capacities": {"dns": 1}, "request_id": "x", "agent_id": other_id}),
            "ERR_FORBIDDEN",
        ),
    ] {
        let (status, answer) = call(&gw, "/v1/agents/claim", &id, &token, body.clone()).await;
        assert_eq!(answer["error"]["code"], code, "{body}: {status} {answer}");
    }
    let forged = their_token.replacen(&other_id, &id, 1);
    for (tokens, status, code) in [
        (json!([their_token]), 403, "ERR_FORBIDDEN"),
        (json!(["garbage"]), 422, "ERR_VALIDATION"),
        (
            json!([&their_token[..their_token.len() - 2]]),
            422,
            "ERR_VALIDATION",
        ),
        (json!([format!("{}.dns.1-0", id)]), 422, "ERR_VALIDATION"),
        (json!(["x".repeat(500)]), 422, "ERR_VALIDATION"),
        (
            json!((0..10_000)
                .map(|i| format!("{id}.dns.{i}-0.1"))
                .collect::<Vec<_>>()),
            422,
            "ERR_VALIDATION",
        ),
    ] {
        let (got, answer) = call(
            &gw,
            "/v1/agents/extend",
            &id,
            &token,
            json!({"tokens": tokens}),
        )
        .await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{answer}"
        );
    }
    // A well-formed token of mine that names no lease of mine.
    let (status, answer) = call(
        &gw,
        "/v1/agents/extend",
        &id,
        &token,
        json!({"tokens": [forged]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer["results"][0]["error"], "ERR_LEASE_UNKNOWN");
    let (status, answer) = call(
        &gw,
        "/v1/agents/report",
        &id,
        &token,
        json!({"completed": [{"token": their_token}]}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (403, Some("ERR_FORBIDDEN"))
    );
    let (status, _) = call(&gw, "/v1/agents/report", &id, &token, json!({})).await;
    assert_eq!(status, 422);
    let (status, _) = call(
        &gw,
        "/v1/agents/report",
        &id,
        &token,
        json!({"completed": [{"token": forged, "outcome": "exploded"}]}),
    )
    .await;
    assert_eq!(status, 422);
    gw.running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_waiting_claims_hold_no_redis_connection() {
    let db = TestDb::new().await;
    let redis_server = RedisServer::start();
    let redis = TestRedis::new();
    let mut env = store_env(&db, &redis);
    env.retain(|(k, _)| k != "REDIS_URL" && k != "REDIS_POOL_SIZE");
    env.push(("REDIS_URL".into(), redis_server.url()));
    env.push(("REDIS_POOL_SIZE".into(), "4".into()));
    env.push(("GATEWAY_ENROLLMENT_TOKEN".into(), ENROLL.into()));
    // A thousand claims of one agent, all from 127.0.0.1.
    env.push(("HTTP_MAX_CONNECTIONS_PER_ADDRESS".into(), "0".into()));
    env.push(("GATEWAY_MAX_CLAIMS_PER_AGENT".into(), "1000".into()));
    env.push(("GATEWAY_RATE_CLAIM".into(), "off".into()));
    let config = gateway::load(&mut checkplane_runtime::Env::from_pairs(env)).unwrap();
    let gw = Running::start(|l, s| gateway::run(config, l, s)).await;
    gw.wait_ready(Duration::from_secs(10)).await;
    let http = reqwest::Client::new();
    let (id, token) =
        checkplane_testkit::register_agent(&http, &gw.url(""), ENROLL, &probe("many")).await;

    let mut waiting = Vec::new();
    for i in 0..1000 {
        let (http, url, id, token) = (
            http.clone(),
            gw.url("/v1/agents/claim"),
            id.clone(),
            token.clone(),
        );
        waiting.push(tokio::spawn(async move {
            http.post(url).header("x-agent-id", id).header("x-agent-token", token)
                .json(&json!({"capacities": {"dns": 1}, "request_id": format!("w{i}"), "wait_ms": 4_000}))
                .send().await.map(|r| r.status().as_u16()).unwrap_or(0)
        }));
    }
    let client = redis::Client::open(redis_server.url()).unwrap();
    // A generous answer time: the 1,000 claims keep this Redis busy on two shared cores.
    let patient =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&patient)
        .await
        .unwrap();
    let mut peak = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn)
            .await
            .unwrap();
        peak = peak.max(list.lines().count());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Pool (4) + the shared lease connection + doorbell subscriber + readiness probe + this
    // test's own connection.
    assert!(
        peak <= 4 + 1 + 1 + 1 + 1,
        "{peak} Redis connections with 1,000 claims waiting"
    );
    let statuses = futures_util(waiting).await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{:?}",
        statuses.iter().filter(|s| **s != 200).count()
    );
    eventually("the gateway stops", Duration::from_secs(10), || async {
        Some(())
    })
    .await;
    gw.stop().await.unwrap();
}

async fn futures_util(tasks: Vec<tokio::task::JoinHandle<u16>>) -> Vec<u16> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn an_answer_lost_on_the_way_is_recovered_by_retrying_the_request_id() {
    let gw = start_with(vec![]).await;
    let (id, token) = agent(&gw, "unlucky").await;
    let leases = helper(&gw);
    let mut conn = gw.redis.connection().await;
    leases.enqueue(&mut conn, &id, "dns", "{}").await.unwrap();
    // The script ran and the gateway died before answering: nobody saw these leases.
    let lost = leases
        .claim(
            &mut conn,
            &id,
            "retry-me",
            &[("dns", 1)],
            checkplane_runtime::clock::now_ms(),
        )
        .await
        .unwrap();
    assert_eq!(lost.len(), 1);
    let (status, body) = call(
        &gw,
        "/v1/agents/claim",
        &id,
        &token,
        json!({"capacities": {"dns": 1}, "request_id": "retry-me"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["leases"][0]["token"], lost[0].token.as_str());
    gw.running.stop().await.unwrap();
}

#[tokio::test]
async fn a_result_that_does_not_fit_its_kind_is_refused_alone_naming_the_field() {
    let gw = start_with(vec![]).await;
    let (id, token) = agent(&gw, "sloppy").await;
    let leases = helper(&gw);
    let mut conn = gw.redis.connection().await;
    for kind in ["tcp", "tcp", "dns"] {
        leases.enqueue(&mut conn, &id, kind, "{}").await.unwrap();
    }
    let (status, claimed) = call(
        &gw,
        "/v1/agents/claim",
        &id,
        &token,
        json!({"capacities": {"tcp": 2, "dns": 1}, "request_id": "r1"}),
    )
    .await;
    assert_eq!(status, 200, "{claimed}");
    let token_of = |kind: &str, n: usize| -> String {
        claimed["leases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["kind"] == kind)
            .nth(n)
            .unwrap()["token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (tcp_bad, tcp_good, dns) = (token_of("tcp", 0), token_of("tcp", 1), token_of("dns", 0));
    let good_tcp = json!({"connected": true, "address": "192.0.2.1", "port": 443,
                          "timings": {"dns": 0.2, "connect": 1.0, "total": 1.3}});
    let (status, answer) = call(
        &gw,
        "/v1/agents/report",
        &id,
        &token,
        json!({"completed": [
            // The seed's case: a tcp result of `connected` alone.
            {"token": tcp_bad, "result": {"connected": true}},
            {"token": tcp_good, "result": good_tcp},
            // A dns answer whose ttl is not a number.
            {"token": dns, "result": {"rcode": "NOERROR", "answers": [
                {"name": "a.", "type": "A", "ttl": "long", "class": "IN", "value": "192.0.2.1"}]}},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results[0]["error"], "ERR_VALIDATION", "{answer}");
    assert_eq!(
        results[0]["message"],
        "completed[0].result.address: a finished tcp result needs it"
    );
    assert_eq!(results[1]["status"], "acknowledged", "{answer}");
    let why = results[2]["message"].as_str().unwrap();
    assert!(
        why.starts_with("completed[2].result.answers[0].ttl: "),
        "{why}"
    );

    // Failed needs its error; an unknown field is named; the refused lease is still open.
    for (result, outcome, field) in [
        (
            json!({"address": "192.0.2.1"}),
            "failed",
            "completed[0].result.error",
        ),
        (
            json!({"connected": true, "address": "192.0.2.1", "port": 1, "cookie": "x"}),
            "finished",
            "completed[0].result.cookie",
        ),
        (json!("connected"), "finished", "completed[0].result"),
    ] {
        let (_, answer) = call(
            &gw,
            "/v1/agents/report",
            &id,
            &token,
            json!({"completed": [{"token": tcp_bad, "outcome": outcome, "result": result}]}),
        )
        .await;
        let why = answer["results"][0]["message"].as_str().unwrap();
        assert!(why.starts_with(&format!("{field}: ")), "{why}");
    }
    let (_, answer) = call(
        &gw,
        "/v1/agents/report",
        &id,
        &token,
        json!({"completed": [{"token": tcp_bad, "outcome": "failed",
               "result": {"error": {"code": "ERR_TIMEOUT", "message": "no connection"},
                          "timings": {"dns": 0.2}}}]}),
    )
    .await;
    assert_eq!(answer["results"][0]["status"], "acknowledged", "{answer}");
    gw.running.stop().await.unwrap();
}
