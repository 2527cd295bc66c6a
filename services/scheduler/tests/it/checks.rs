//! Checks end to end: created over HTTP, fanned out to the chosen agents, run by simulated
//! agents (claim + report), results projected and readable, with selection by location,
//! distinct networks and rotation.

use std::time::Duration;

use checkplane_testkit::process::run_to_end;
use checkplane_testkit::{agent_post, eventually, Running, TestDb, TestRedis};
use serde_json::{json, Value};

use crate::{count, start_gateway, start_scheduler, ENROLL};

const ADMIN: &str = "admin-key-0123456789abcdef";

type Service = Running<checkplane_runtime::RunError>;

struct Stand {
    gw: Service,
    sched: Option<Service>,
    db: TestDb,
    redis: TestRedis,
    http: reqwest::Client,
}

async fn stand() -> Stand {
    stand_with(&[], &[]).await
}

async fn stand_with(gateway: &[(&str, &str)], scheduler: &[(&str, &str)]) -> Stand {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut env = vec![
        ("GATEWAY_ADMIN_KEY", ADMIN),
        ("GATEWAY_ALLOW_PRIVATE_TARGETS", "true"),
    ];
    env.extend_from_slice(gateway);
    let gw = start_gateway(&db, &redis, &env).await;
    let sched = Some(start_scheduler(&db, &redis, scheduler).await);
    Stand {
        gw,
        sched,
        db,
        redis,
        http: reqwest::Client::new(),
    }
}

/// A simulated agent: registered with a declared location, heartbeating once.
struct Agent {
    id: String,
    token: String,
}

impl Stand {
    async fn agent(&self, host: &str, country: &str, asn: u32, kinds: &[&str]) -> Agent {
        let capabilities: serde_json::Map<String, Value> =
            kinds.iter().map(|k| ((*k).to_owned(), json!(4))).collect();
        let (id, token) = checkplane_testkit::register_agent(
            &self.http,
            &self.gw.url(""),
            ENROLL,
            &json!({"hostname": host, "capabilities": capabilities,
                    "location": {"country": country, "asn": asn}}),
        )
        .await;
        let (status, _) = agent_post(
            &self.http,
            &self.gw.url("/v1/agents/heartbeat"),
            &id,
            &token,
            &json!({}),
        )
        .await;
        assert_eq!(status, 200);
        Agent { id, token }
    }

    /// Wait until the projector has every one of `agents` online.
    async fn online(&self, agents: &[&Agent]) {
        let ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
        eventually("agents online", Duration::from_secs(10), || async {
            let n: i64 = self
                .db
                .client()
                .await
                .query_one(
                    "SELECT count(*) FROM agents WHERE status = 'online' AND agent_id = ANY($1)",
                    &[&ids],
                )
                .await
                .unwrap()
                .get(0);
            (n == ids.len() as i64).then_some(())
        })
        .await;
    }

    async fn create(&self, body: Value) -> (u16, Value, Option<String>) {
        let response = self
            .http
            .post(self.gw.url("/v1/checks"))
            .header("x-api-key", ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let location = response
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        (
            status,
            response.json().await.unwrap_or(Value::Null),
            location,
        )
    }

    /// The value of an unlabelled metric on the gateway's `/metrics`.
    async fn gateway_metric(&self, name: &str) -> f64 {
        let text = checkplane_testkit::metrics_text(&self.gw.url("/metrics")).await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    /// A DNS check of `example.com` on `limit` agents: its answer and location.
    async fn dns_check(&self, limit: u32) -> (Value, String) {
        let (status, body, location) = self
            .create(json!({"kind": "dns", "target": "example.com", "limit": limit}))
            .await;
        assert_eq!(status, 202, "{body}");
        (body, location.expect("a Location"))
    }

    async fn check(&self, path: &str) -> Value {
        let response = self
            .http
            .get(self.gw.url(path))
            .header("x-api-key", ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        response.json().await.unwrap()
    }

    async fn heartbeat(&self, agent: &Agent) {
        let (status, _) = agent_post(
            &self.http,
            &self.gw.url("/v1/agents/heartbeat"),
            &agent.id,
            &agent.token,
            &json!({}),
        )
        .await;
        assert_eq!(status, 200);
    }

    /// Report `token` as `agent`: the per-token answer (status or error).
    async fn try_report(&self, agent: &Agent, token: &str) -> Value {
        let (status, body) = agent_post(
            &self.http,
            &self.gw.url("/v1/agents/report"),
            &agent.id,
            &agent.token,
            &json!({"completed": [{"token": token, "result": {"rcode": "NOERROR", "answers": []}}]}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body["results"][0].clone()
    }

    /// Poll a check until `done` holds.
    async fn until(&self, location: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        eventually(what, Duration::from_secs(20), || async {
            let check = self.check(location).await;
            done(&check).then_some(check)
        })
        .await
    }

    /// Open the check's live stream, resuming after `last` when given.
    fn live(
        &self,
        location: &str,
        last: Option<&str>,
    ) -> impl std::future::Future<Output = reqwest::Result<reqwest::Response>> {
        let mut request = self
            .http
            .get(self.gw.url(&format!("{location}/live")))
            .header("x-api-key", ADMIN);
        if let Some(last) = last {
            request = request.header("last-event-id", last);
        }
        request.send()
    }

    /// Poll a check until it is finished.
    async fn finished(&self, location: &str, what: &str) -> Value {
        self.until(location, what, |c| c["status"] == "finished")
            .await
    }

    /// Claim as `agent` until something comes, for up to `secs` seconds: the leases.
    async fn claim_eventually(
        &self,
        agent: &Agent,
        kind: &str,
        what: &str,
        secs: u64,
    ) -> Vec<Value> {
        eventually(what, Duration::from_secs(secs), || async {
            let leases = self.claim(agent, kind).await;
            (!leases.is_empty()).then_some(leases)
        })
        .await
    }

    /// Claim (waiting up to a second) as `agent`, heartbeating first: the leases.
    async fn claim(&self, agent: &Agent, kind: &str) -> Vec<Value> {
        self.heartbeat(agent).await;
        let (status, body) = agent_post(
            &self.http,
            &self.gw.url("/v1/agents/claim"),
            &agent.id,
            &agent.token,
            &json!({"capacities": {kind: 4}, "request_id": uuid::Uuid::new_v4().simple().to_string(), "wait_ms": 1000}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body["leases"].as_array().unwrap().clone()
    }

    async fn report(&self, agent: &Agent, token: &str, result: Value) {
        let (status, body) = agent_post(
            &self.http,
            &self.gw.url("/v1/agents/report"),
            &agent.id,
            &agent.token,
            &json!({"completed": [{"token": token, "result": result}]}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["results"][0]["status"], "acknowledged", "{body}");
    }

    async fn stop(self) {
        if let Some(sched) = self.sched {
            sched.stop().await.unwrap();
        }
        self.gw.stop().await.unwrap();
    }

    async fn stop_scheduler(&mut self) {
        self.sched.take().unwrap().stop().await.unwrap();
    }

    async fn start_scheduler(&mut self, env: &[(&str, &str)]) {
        assert!(self.sched.is_none());
        self.sched = Some(start_scheduler(&self.db, &self.redis, env).await);
    }

    /// The value of an unlabelled metric on the scheduler's `/metrics` (0 when absent).
    async fn scheduler_metric(&self, name: &str) -> f64 {
        let url = self.sched.as_ref().unwrap().url("/metrics");
        let text = checkplane_testkit::metrics_text(&url).await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The entries of every shard's lease stream, read into the projector group as
    /// `consumer` and left pending: what a scheduler that read its batch and was SIGKILLed
    /// before its commit leaves behind. Their ids per stream.
    async fn read_leases_as_dead_consumer(&self, consumer: &str) -> Vec<(String, Vec<String>)> {
        let keys = checkplane_core::keys::Keys::new(self.redis.prefix.clone(), 4);
        let mut conn = self.redis.connection().await;
        let mut read = Vec::new();
        for n in 0..keys.shards() {
            let stream = keys.lease_events(n);
            let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("projector")
                .arg(consumer)
                .arg("COUNT")
                .arg(10_000)
                .arg("STREAMS")
                .arg(&stream)
                .arg(">")
                .query_async(&mut conn)
                .await
                .unwrap();
            let ids: Vec<String> = reply
                .map(|r| {
                    r.keys
                        .iter()
                        .flat_map(|k| k.ids.iter().map(|e| e.id.clone()))
                        .collect()
                })
                .unwrap_or_default();
            read.push((stream, ids));
        }
        read
    }
}

fn chosen(check: &Value) -> Vec<String> {
    let mut ids: Vec<String> = check["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["agent_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_check_runs_on_its_agents_and_its_results_are_readable() {
    let s = stand().await;
    let nl = s.agent("nl-1", "NL", 1136, &["dns"]).await;
    let de = s.agent("de-1", "DE", 3320, &["dns"]).await;
    let us = s.agent("us-1", "US", 7018, &["dns", "http"]).await;
    s.online(&[&nl, &de, &us]).await;

    let (status, accepted, location) = s
        .create(
            json!({"kind": "dns", "target": "example.com", "options": {"type": "AAAA"},
                       "locations": [{"country": "NL"}, {"country": "DE"}]}),
        )
        .await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["agents_count"], 2);
    let location = location.expect("a Location header");
    assert_eq!(
        location,
        format!("/v1/checks/{}", accepted["id"].as_str().unwrap())
    );

    // Readable at once, before any agent has done anything.
    let check = s.check(&location).await;
    assert_eq!(check["status"], "queued");
    assert_eq!(chosen(&check), {
        let mut ids = vec![nl.id.clone(), de.id.clone()];
        ids.sort();
        ids
    });
    assert_eq!(check["results"][0]["location"]["country"], "NL");

    // The chosen agents get the task; the other one gets nothing.
    assert!(s.claim(&us, "dns").await.is_empty());
    for (agent, address) in [(&nl, "2001:db8::1"), (&de, "2001:db8::2")] {
        let leases = s.claim(agent, "dns").await;
        assert_eq!(leases.len(), 1, "{leases:?}");
        let spec = &leases[0]["spec"];
        assert_eq!(spec["check_id"], accepted["id"]);
        assert_eq!(
            (spec["kind"].as_str(), spec["target"].as_str()),
            (Some("dns"), Some("example.com"))
        );
        assert_eq!(spec["options"]["type"], "AAAA");
        let answers = json!({"rcode": "NOERROR", "answers": [{"name": "example.com", "type": "AAAA", "ttl": 60, "class": "IN", "value": address}]});
        s.report(agent, leases[0]["token"].as_str().unwrap(), answers)
            .await;
    }

    let done = s.finished(&location, "the check finishes").await;
    assert_eq!(done["done_count"], 2);
    assert_eq!(done["seq"], 2);
    let results = done["results"].as_array().unwrap();
    assert!(results
        .iter()
        .all(|r| r["outcome"] == "finished" && r["status"] == "done"));
    let values: Vec<&str> = results
        .iter()
        .map(|r| {
            r["result"]["result"]["answers"][0]["value"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(values.len(), 2);
    assert!(done["finished_at"].is_string());

    // ETag: the same revision answers 304.
    let response = s
        .http
        .get(s.gw.url(&location))
        .header("x-api-key", ADMIN)
        .send()
        .await
        .unwrap();
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    let again = s
        .http
        .get(s.gw.url(&location))
        .header("x-api-key", ADMIN)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 304);

    // Nothing matches: 422 ERR_NO_AGENTS at once.
    let (status, body, _) = s
        .create(json!({"kind": "http", "target": "http://127.0.0.1:9/", "locations": [{"country": "NL"}]}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("ERR_NO_AGENTS")),
        "{body}"
    );
    // An unknown check: 404; a malformed id too.
    for path in [
        "/v1/checks/01234567-89ab-7def-8123-456789abcdef",
        "/v1/checks/nope",
    ] {
        let response = s
            .http
            .get(s.gw.url(path))
            .header("x-api-key", ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 404);
    }
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM projection_failures").await,
        0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn selection_spreads_over_networks_and_rotates() {
    let s = stand().await;
    // Two agents share AS 64500; one each in AS 64501 and 64502.
    let a1 = s.agent("a1", "NL", 64500, &["ping"]).await;
    let a2 = s.agent("a2", "NL", 64500, &["ping"]).await;
    let b = s.agent("b", "NL", 64501, &["ping"]).await;
    let c = s.agent("c", "DE", 64502, &["ping"]).await;
    s.online(&[&a1, &a2, &b, &c]).await;

    // Three agents: one per network before a second from the same one.
    let (_, first, location) = s
        .create(json!({"kind": "ping", "target": "192.0.2.1", "limit": 3}))
        .await;
    assert_eq!(first["agents_count"], 3);
    let picked = chosen(&s.check(&location.unwrap()).await);
    assert!(
        picked.contains(&b.id) && picked.contains(&c.id),
        "{picked:?}"
    );
    assert!(
        picked.contains(&a1.id) != picked.contains(&a2.id),
        "only one of AS 64500: {picked:?}"
    );

    // Rotation: the agent left out last time is chosen first now.
    let left_out = [&a1, &a2]
        .into_iter()
        .find(|a| !picked.contains(&a.id))
        .unwrap();
    let (_, _, location) = s
        .create(json!({"kind": "ping", "target": "192.0.2.1", "limit": 1}))
        .await;
    assert_eq!(
        chosen(&s.check(&location.unwrap()).await),
        std::slice::from_ref(&left_out.id)
    );

    // By country and ASN.
    let (_, _, location) = s
        .create(json!({"kind": "ping", "target": "192.0.2.1", "locations": [{"country": "de"}]}))
        .await;
    assert_eq!(
        chosen(&s.check(&location.unwrap()).await),
        std::slice::from_ref(&c.id)
    );
    let (_, body, location) = s
        .create(json!({"kind": "ping", "target": "192.0.2.1", "locations": [{"asn": 64500, "limit": 5}]}))
        .await;
    assert_eq!(body["agents_count"], 2);
    let location = location.unwrap();
    let mut both = vec![a1.id.clone(), a2.id.clone()];
    both.sort();
    assert_eq!(chosen(&s.check(&location).await), both);

    // Reusing a check's agents.
    let previous = location.rsplit('/').next().unwrap().to_owned();
    let (status, body, location) = s
        .create(json!({"kind": "ping", "target": "192.0.2.2", "reuse": previous}))
        .await;
    assert_eq!(status, 202, "{body}");
    let newest = location.unwrap();
    assert_eq!(chosen(&s.check(&newest).await), both);

    // The list: newest first, filtered, paged.
    let all = s.check("/v1/checks?kind=ping").await;
    assert_eq!(all["total"], 5);
    assert_eq!(
        format!("/v1/checks/{}", all["items"][0]["id"].as_str().unwrap()),
        newest
    );
    let page = s.check("/v1/checks?kind=ping&limit=2&offset=2").await;
    assert_eq!(
        (
            page["items"].as_array().unwrap().len(),
            page["has_more"].clone()
        ),
        (2, json!(true))
    );
    let none = s.check("/v1/checks?kind=dns").await;
    assert_eq!(
        (none["total"].clone(), none["has_more"].clone()),
        (json!(0), json!(false))
    );
    let queued = s.check("/v1/checks?status=queued").await;
    assert_eq!(queued["total"], 5, "nobody claimed anything");
    assert_eq!(s.check("/v1/checks?until=1").await["total"], 0);
    for bad in [
        "status=done",
        "kind=smtp",
        "limit=0",
        "offset=-1",
        "since=-1",
        "colour=red",
    ] {
        let response = s
            .http
            .get(s.gw.url(&format!("/v1/checks?{bad}")))
            .header("x-api-key", ADMIN)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert!(status == 400 || status == 422, "{bad}: {status}");
        assert!(body["error"]["code"].is_string(), "{bad}: {body}");
    }

    // Across location entries, a network one entry took counts for the next: with b chosen
    // last (so rotation alone would put the AS 64500 agent left over first), NL's one agent
    // after an AS 64500 entry is b.
    let (_, _, location) = s
        .create(json!({"kind": "ping", "target": "192.0.2.1", "locations": [{"asn": 64501}]}))
        .await;
    assert_eq!(
        chosen(&s.check(&location.unwrap()).await),
        std::slice::from_ref(&b.id)
    );
    let (_, _, location) = s
        .create(json!({"kind": "ping", "target": "192.0.2.1",
                       "locations": [{"asn": 64500, "limit": 1}, {"country": "NL", "limit": 1}]}))
        .await;
    let check = s.check(&location.unwrap()).await;
    let second: Vec<&str> = check["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["slot"] == 1)
        .filter_map(|r| r["agent_id"].as_str())
        .collect();
    assert_eq!(second, [b.id.as_str()], "{check}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_dies_mid_check_is_replaced_and_the_check_still_finishes() {
    let s = stand_with(
        &[("LEASE_TTL", "500ms"), ("HEARTBEAT_INTERVAL", "300ms")],
        &[("RETRY_BACKOFF", "0s"), ("MAX_RETRIES", "2")],
    )
    .await;
    let a = s.agent("a", "NL", 64510, &["dns"]).await;
    let b = s.agent("b", "NL", 64511, &["dns"]).await;
    let c = s.agent("c", "NL", 64512, &["dns"]).await;
    s.online(&[&a, &b, &c]).await;
    let (status, body, location) = s
        .create(json!({"kind": "dns", "target": "example.com", "limit": 2}))
        .await;
    assert_eq!(status, 202, "{body}");
    let location = location.unwrap();
    let first = s.check(&location).await;
    let picked = chosen(&first);
    let agents = [&a, &b, &c];
    let dying = agents.iter().find(|x| x.id == picked[0]).unwrap();
    let working = agents.iter().find(|x| x.id == picked[1]).unwrap();
    let spare = agents.iter().find(|x| !picked.contains(&x.id)).unwrap();

    // One agent takes its task and is never heard of again; the other does its work.
    assert_eq!(s.claim(dying, "dns").await.len(), 1);
    let leases = s.claim(working, "dns").await;
    s.report(
        working,
        leases[0]["token"].as_str().unwrap(),
        json!({"rcode": "NOERROR", "answers": []}),
    )
    .await;

    // Its lease expires, the slot is retried on the agent the check does not use yet.
    let retried = s
        .claim_eventually(spare, "dns", "the spare agent gets the retry", 20)
        .await;
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0]["spec"]["attempt"], 2);
    s.report(
        spare,
        retried[0]["token"].as_str().unwrap(),
        json!({"rcode": "NOERROR", "answers": []}),
    )
    .await;

    let done = s.finished(&location, "the check finishes").await;
    let results = done["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "one result per slot");
    assert!(results.iter().all(|r| r["outcome"] == "finished"), "{done}");
    let attempts: Vec<(i64, &str)> = results
        .iter()
        .map(|r| {
            (
                r["attempt"].as_i64().unwrap(),
                r["agent_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(attempts.contains(&(2, spare.id.as_str())), "{attempts:?}");
    assert!(attempts.contains(&(1, working.id.as_str())), "{attempts:?}");

    // With nobody left to take over, the slot ends `no_agent`.
    let lone = s.agent("lone", "NL", 64513, &["tcp"]).await;
    s.online(&[&lone]).await;
    let (_, _, location) = s
        .create(json!({"kind": "tcp", "target": "192.0.2.1", "options": {"port": 80}, "limit": 1}))
        .await;
    let location = location.unwrap();
    assert_eq!(s.claim(&lone, "tcp").await.len(), 1);
    let done = s.finished(&location, "the lone slot ends").await;
    assert_eq!(done["results"][0]["outcome"], "no_agent", "{done}");
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM projection_failures").await,
        0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deadlines_and_cancels_end_every_slot_and_fence_late_reports() {
    let s = stand().await;
    let a = s.agent("a", "NL", 64520, &["dns"]).await;
    s.online(&[&a]).await;

    // Leased, then the deadline passes: the report is fenced, the slot ends `timeout`.
    let (_, _, location) = s
        .create(json!({"kind": "dns", "target": "example.com", "limit": 1, "timeout_ms": 1000}))
        .await;
    let location = location.unwrap();
    let leases = s.claim(&a, "dns").await;
    let token = leases[0]["token"].as_str().unwrap().to_owned();
    let done = s.finished(&location, "the deadline ends it").await;
    assert_eq!(done["results"][0]["outcome"], "timeout", "{done}");
    assert_eq!(s.try_report(&a, &token).await["error"], "ERR_LEASE_CLOSED");

    // Never claimed at all: also `timeout`, never stuck `in_progress`.
    let (_, _, location) = s
        .create(json!({"kind": "dns", "target": "example.org", "limit": 1, "timeout_ms": 1000}))
        .await;
    let location = location.unwrap();
    let done = s.finished(&location, "an untouched check ends").await;
    assert_eq!(done["results"][0]["outcome"], "timeout", "{done}");
    assert!(
        s.claim(&a, "dns").await.is_empty(),
        "the closed task is gone"
    );

    // Cancelled while leased.
    let (_, body, location) = s
        .create(json!({"kind": "dns", "target": "example.net", "limit": 1}))
        .await;
    let location = location.unwrap();
    let leases = s.claim(&a, "dns").await;
    let token = leases[0]["token"].as_str().unwrap().to_owned();
    let cancel = |key: &'static str| {
        let url = s.gw.url(&format!("{location}/cancel"));
        let http = s.http.clone();
        async move {
            http.post(url)
                .header("x-api-key", key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(cancel(ADMIN).await, 202);
    assert_eq!(s.try_report(&a, &token).await["error"], "ERR_LEASE_CLOSED");
    let done = s.finished(&location, "the cancel ends it").await;
    assert_eq!(done["results"][0]["outcome"], "cancelled", "{done}");
    assert_eq!(
        cancel(ADMIN).await,
        200,
        "a finished check is answered as it is"
    );
    let cancelled = count(
        &s.db,
        &format!(
            "SELECT count(*) FROM audit_log WHERE action = 'check.cancelled' AND object = 'check:{}'",
            body["id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(cancelled, 1, "the cancel is audited once");
    s.stop().await;
}

/// Create `n` one-second DNS checks on `agent` (its only agent), claim them all and report
/// each with a result that names it: (location, result) per check, every report acknowledged.
async fn reported_checks(s: &Stand, agent: &Agent, n: usize) -> Vec<(String, Value)> {
    let mut locations = Vec::new();
    for i in 0..n {
        let (status, body, location) = s
            .create(
                json!({"kind": "dns", "target": format!("n{i}.example.com"), "limit": 1,
                           "timeout_ms": 1000}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        locations.push(location.unwrap());
    }
    let mut tokens = Vec::new();
    while tokens.len() < n {
        let leases = s.claim(agent, "dns").await;
        assert!(!leases.is_empty(), "{} of {n} tasks claimed", tokens.len());
        for lease in leases {
            let target = lease["spec"]["target"].as_str().unwrap().to_owned();
            tokens.push((target, lease["token"].as_str().unwrap().to_owned()));
        }
    }
    let mut checks = Vec::new();
    for (target, token) in tokens {
        let i: usize = target
            .strip_prefix('n')
            .and_then(|t| t.split('.').next())
            .unwrap()
            .parse()
            .unwrap();
        let result = json!({"rcode": "NOERROR", "answers": [], "name": format!("report-{i}")});
        s.report(agent, &token, result.clone()).await;
        checks.push((locations[i].clone(), result));
    }
    checks
}

/// Wait until every check's deadline lies `CLOSE_GRACE` and a second behind.
async fn deadlines_overdue(s: &Stand) {
    eventually(
        "every deadline overdue",
        Duration::from_secs(20),
        || async {
            let waiting = count(
                &s.db,
                "SELECT count(*) FROM checks WHERE deadline > now() - interval '4 seconds'",
            )
            .await;
            (waiting == 0).then_some(())
        },
    )
    .await;
}

/// Issue 20, part 1: a scheduler read a batch of reports and was killed before its commit,
/// across the checks' deadlines; its replacement (another consumer name, so the batch waits
/// for `XAUTOCLAIM`) runs the deadline pass long before the projector gets the batch. Every
/// acknowledged report still becomes its slot's result: before the fix, the pass ended all of
/// them `timeout` with no result as soon as it ran (the control check below finishing is the
/// proof that it ran).
#[tokio::test(flavor = "multi_thread")]
async fn reports_acknowledged_across_a_killed_scheduler_are_not_overwritten_by_the_deadline() {
    let mut s = stand_with(&[], &[("CONSUMER_NAME", "sched-1")]).await;
    let a = s.agent("a", "NL", 64520, &["dns"]).await;
    s.online(&[&a]).await;
    s.stop_scheduler().await;

    let checks = reported_checks(&s, &a, 24).await;
    // One more check, never claimed: the deadline pass reaches it after the 24 (it is due
    // last), and ends it, so its end shows that the pass ran over the others.
    let (_, _, control) = s
        .create(
            json!({"kind": "dns", "target": "control.example.com", "limit": 1,
                       "timeout_ms": 1000}),
        )
        .await;
    let control = control.unwrap();
    let pending = s.read_leases_as_dead_consumer("sched-1").await;
    let read: usize = pending.iter().map(|(_, ids)| ids.len()).sum();
    assert!(
        read >= 48,
        "24 grants and 24 reports pending with sched-1, got {read}"
    );
    deadlines_overdue(&s).await;

    s.start_scheduler(&[("CONSUMER_NAME", "sched-2")]).await;
    let done = s
        .finished(&control, "the deadline pass ends the control check")
        .await;
    assert_eq!(done["results"][0]["outcome"], "timeout", "{done}");
    for (location, _) in &checks {
        let check = s.check(location).await;
        assert_ne!(
            check["results"][0]["outcome"], "timeout",
            "a reported slot ended by the deadline pass: {check}"
        );
        assert_ne!(check["status"], "finished", "{check}");
    }
    eventually(
        "the waiting slots on the gauge",
        Duration::from_secs(10),
        || async {
            let awaiting = s
                .scheduler_metric("checkplane_lifecycle_slots_awaiting_projection")
                .await;
            (awaiting == 24.0).then_some(())
        },
    )
    .await;

    // The dead consumer's batch becomes old enough for the new replica's XAUTOCLAIM.
    let mut conn = s.redis.connection().await;
    for (stream, ids) in &pending {
        if ids.is_empty() {
            continue;
        }
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(stream)
            .arg("projector")
            .arg("sched-1")
            .arg(0)
            .arg(ids)
            .arg("IDLE")
            .arg(3_600_000)
            .arg("JUSTID")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    for (location, result) in &checks {
        let check = eventually("the reported result", Duration::from_secs(40), || async {
            let check = s.check(location).await;
            (check["status"] == "finished").then_some(check)
        })
        .await;
        assert_eq!(check["results"][0]["outcome"], "finished", "{check}");
        assert_eq!(&check["results"][0]["result"]["result"], result, "{check}");
    }
    assert_eq!(
        s.scheduler_metric("checkplane_lifecycle_reports_missing_total")
            .await,
        0.0
    );
    s.stop().await;
}

/// Take the one `lease.reported` of `agent`'s shard out of its lease stream (as Redis losing
/// it would): the stream, and the event's JSON.
async fn take_report_event(s: &Stand, agent: &Agent) -> (String, String) {
    let keys = checkplane_core::keys::Keys::new(s.redis.prefix.clone(), 4);
    let stream = keys.lease_events(keys.shard_of(&agent.id));
    let mut conn = s.redis.connection().await;
    let reported: Vec<(String, String)> = checkplane_testkit::events::read(&mut conn, &stream)
        .await
        .into_iter()
        .filter(|(_, event)| event.contains("\"lease.reported\""))
        .collect();
    assert_eq!(reported.len(), 1);
    let _: i64 = redis::cmd("XDEL")
        .arg(&stream)
        .arg(&reported[0].0)
        .query_async(&mut conn)
        .await
        .unwrap();
    (stream, reported[0].1.clone())
}

/// Issue 20, part 1, the bound: a slot whose entry ended in Redis but whose event Redis then
/// lost (here deleted from the lease stream before any projector read it) still ends, once,
/// as `timeout`, when the projector has passed where the event stood; and it is counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_whose_report_event_redis_lost_still_ends_once_and_is_counted() {
    let mut s = stand().await;
    let a = s.agent("a", "NL", 64520, &["dns"]).await;
    s.online(&[&a]).await;
    s.stop_scheduler().await;
    let checks = reported_checks(&s, &a, 1).await;
    take_report_event(&s, &a).await;
    deadlines_overdue(&s).await;

    s.start_scheduler(&[]).await;
    let done = s.finished(&checks[0].0, "the slot ends all the same").await;
    assert_eq!(done["results"][0]["outcome"], "timeout", "{done}");
    assert_eq!(done["results"].as_array().unwrap().len(), 1, "{done}");
    assert_eq!(
        s.scheduler_metric("checkplane_lifecycle_reports_missing_total")
            .await,
        1.0
    );
    s.stop().await;
}

/// Read server-sent events from `response` until `want` non-comment events arrived:
/// (event, id, data).
async fn sse_events(
    response: &mut reqwest::Response,
    want: usize,
) -> Vec<(String, Option<String>, Value)> {
    let mut buffer = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while events.len() < want {
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .expect("events in time")
            .unwrap()
            .expect("the stream stays open");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let (mut event, mut id, mut data) = (String::from("message"), None, String::new());
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if !data.is_empty() {
                events.push((event, id, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread")]
async fn live_results_arrive_and_a_reconnect_with_last_event_id_misses_nothing() {
    let s = stand().await;
    let a = s.agent("a", "NL", 64530, &["dns"]).await;
    let b = s.agent("b", "DE", 64531, &["dns"]).await;
    s.online(&[&a, &b]).await;
    let (_, body, location) = s
        .create(json!({"kind": "dns", "target": "example.com", "limit": 2}))
        .await;
    let location = location.unwrap();
    let open = |last: Option<&str>| s.live(&location, last);
    let mut stream = open(None).await.unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    assert!(stream.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));

    let leases = s.claim(&a, "dns").await;
    s.report(
        &a,
        leases[0]["token"].as_str().unwrap(),
        json!({"rcode": "NOERROR", "answers": []}),
    )
    .await;
    let first = sse_events(&mut stream, 1).await;
    assert_eq!(first[0].0, "result");
    assert_eq!(first[0].1.as_deref(), Some("1"));
    assert_eq!(first[0].2["agent_id"], a.id.as_str());
    drop(stream);

    // While nobody listens, the second result comes in; the reconnect gets it, then the end.
    let leases = s.claim(&b, "dns").await;
    s.report(
        &b,
        leases[0]["token"].as_str().unwrap(),
        json!({"rcode": "NOERROR", "answers": []}),
    )
    .await;
    let mut stream = open(Some("1")).await.unwrap();
    let rest = sse_events(&mut stream, 2).await;
    assert_eq!(
        (rest[0].0.as_str(), rest[0].1.as_deref()),
        ("result", Some("2"))
    );
    assert_eq!(rest[0].2["agent_id"], b.id.as_str());
    assert_eq!(rest[1].0, "finished");
    assert_eq!(rest[1].2["id"], body["id"]);
    // The stream ends after `finished`.
    let end = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
        .await
        .unwrap()
        .unwrap();
    assert!(end.is_none(), "{end:?}");

    // From the start, a finished check replays everything.
    let mut stream = open(None).await.unwrap();
    let all = sse_events(&mut stream, 3).await;
    let ids: Vec<Option<&str>> = all.iter().map(|e| e.1.as_deref()).collect();
    assert_eq!(ids, [Some("1"), Some("2"), None]);
    let response = s
        .http
        .get(s.gw.url(&format!("{location}/live")))
        .header("x-api-key", ADMIN)
        .header("last-event-id", "banana")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 422);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_publishes_a_new_check_after_its_202_without_the_sweep() {
    // The sweep leaves rows younger than a minute alone: only the gateway's own publication,
    // after the answer, can empty the outbox and put the event on the checks stream here.
    let s = stand_with(&[], &[("OUTBOX_MIN_AGE", "60s")]).await;
    let a = s.agent("a", "NL", 64536, &["dns"]).await;
    s.online(&[&a]).await;
    let (body, _) = s.dns_check(1).await;
    eventually("the outbox is empty", Duration::from_secs(10), || async {
        (count(&s.db, "SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    let mut conn = s.redis.connection().await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("{}:events:checks", s.redis.prefix))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let id = body["id"].as_str().unwrap();
    let published = entries
        .iter()
        .flat_map(|(_, fields)| fields)
        .any(|(k, v)| k == "event" && v.contains("check.created") && v.contains(id));
    assert!(published, "check.created of {id} not on the checks stream");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn live_streams_are_woken_by_the_projectors_announcements_not_their_poll() {
    // A stream looks by itself only once a minute here: the results can only arrive in time
    // because the projector announces its commits on the check's live channel.
    let s = stand_with(&[("GATEWAY_LIVE_POLL", "60s")], &[]).await;
    let a = s.agent("a", "NL", 64532, &["dns"]).await;
    let b = s.agent("b", "DE", 64533, &["dns"]).await;
    s.online(&[&a, &b]).await;
    let (body, location) = s.dns_check(2).await;
    let mut stream = s.live(&location, None).await.unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    // The stream has looked once (nothing yet) before the first result exists.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for agent in [&a, &b] {
        let leases = s.claim(agent, "dns").await;
        let token = leases[0]["token"].as_str().unwrap();
        s.report(agent, token, json!({"rcode": "NOERROR", "answers": []}))
            .await;
    }
    let events = sse_events(&mut stream, 3).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(kinds, ["result", "result", "finished"]);
    assert_eq!(events[2].2["id"], body["id"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_with_prefer_wait_answers_when_the_check_changes_or_304_when_it_did_not() {
    let s = stand_with(&[("GATEWAY_LIVE_POLL", "60s")], &[]).await;
    let a = s.agent("a", "NL", 64535, &["dns"]).await;
    s.online(&[&a]).await;
    let (_, location) = s.dns_check(1).await;
    let read = |etag: String, wait: &str| {
        s.http
            .get(s.gw.url(&location))
            .header("x-api-key", ADMIN)
            .header("if-none-match", etag)
            .header("prefer", format!("wait={wait}"))
            .send()
    };
    let first = s
        .http
        .get(s.gw.url(&location))
        .header("x-api-key", ADMIN)
        .send()
        .await
        .unwrap();
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();

    // Unchanged for the whole wait: a 304 after it, not before.
    let asked = std::time::Instant::now();
    let response = read(etag.clone(), "1").await.unwrap();
    assert_eq!(response.status().as_u16(), 304);
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(response.headers()["preference-applied"], "wait=1");

    // Waiting across a change: answered with the changed check once it changed.
    let mut waiting = Box::pin(read(etag.clone(), "20"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting)
            .await
            .is_err(),
        "answered before anything changed"
    );
    let leases = s.claim(&a, "dns").await;
    s.report(
        &a,
        leases[0]["token"].as_str().unwrap(),
        json!({"rcode": "NOERROR", "answers": []}),
    )
    .await;
    let response = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("answered once the check changed")
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_ne!(response.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(response.headers()["preference-applied"], "wait=20");
    let check: Value = response.json().await.unwrap();
    assert_ne!(check["status"], "queued", "{check}");

    // Once finished it does not change any more: a wait is answered at once.
    s.finished(&location, "the check finishes").await;
    let current = s
        .http
        .get(s.gw.url(&location))
        .header("x-api-key", ADMIN)
        .send()
        .await
        .unwrap();
    let etag = current.headers()["etag"].to_str().unwrap().to_owned();
    let response = tokio::time::timeout(Duration::from_secs(5), read(etag, "20"))
        .await
        .expect("a finished check is not waited on")
        .unwrap();
    assert_eq!(response.status().as_u16(), 304);
    assert!(response.headers().get("preference-applied").is_none());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn live_streams_past_the_limit_are_refused_with_429_until_one_ends() {
    let s = stand_with(&[("GATEWAY_MAX_LIVE_STREAMS", "1")], &[]).await;
    let a = s.agent("a", "NL", 64534, &["dns"]).await;
    s.online(&[&a]).await;
    let (_, location) = s.dns_check(1).await;
    let mut first = s.live(&location, None).await.unwrap();
    assert_eq!(first.status().as_u16(), 200);
    let refused = s.live(&location, None).await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    assert_eq!(refused.headers()["retry-after"], "5");
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "ERR_RATE_LIMITED", "{error}");
    assert_eq!(s.gateway_metric("checkplane_live_streams").await, 1.0);
    assert_eq!(
        s.gateway_metric("checkplane_live_streams_refused_total")
            .await,
        1.0
    );

    // The check finishes, the first stream ends after `finished`, and its place is free.
    let leases = s.claim(&a, "dns").await;
    s.report(
        &a,
        leases[0]["token"].as_str().unwrap(),
        json!({"rcode": "NOERROR", "answers": []}),
    )
    .await;
    let events = sse_events(&mut first, 2).await;
    assert_eq!(events[1].0, "finished");
    let end = tokio::time::timeout(Duration::from_secs(5), first.chunk())
        .await
        .unwrap()
        .unwrap();
    assert!(end.is_none(), "{end:?}");
    eventually(
        "the stream's place is given back",
        Duration::from_secs(10),
        || async { (s.gateway_metric("checkplane_live_streams").await == 0.0).then_some(()) },
    )
    .await;
    let again = eventually(
        "a stream is accepted again",
        Duration::from_secs(10),
        || async {
            let response = s.live(&location, None).await.unwrap();
            (response.status().as_u16() == 200).then_some(response)
        },
    )
    .await;
    let mut again = again;
    assert_eq!(sse_events(&mut again, 2).await[1].0, "finished");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_key_holds_at_most_its_share_of_live_streams_and_waiting_reads() {
    let s = stand_with(&[("GATEWAY_MAX_WAITS_PER_KEY", "2")], &[]).await;
    let a = s.agent("a", "NL", 64535, &["dns"]).await;
    s.online(&[&a]).await;
    let (_, location) = s.dns_check(1).await;
    let first = s.live(&location, None).await.unwrap();
    let second = s.live(&location, None).await.unwrap();
    assert_eq!(first.status().as_u16(), 200);
    assert_eq!(second.status().as_u16(), 200);
    let refused = s.live(&location, None).await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    assert_eq!(refused.headers()["retry-after"], "5");
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "ERR_RATE_LIMITED", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this key"),
        "{error}"
    );

    // A read asking to wait answers at once: the key has no place left for its wait.
    let current = s
        .http
        .get(s.gw.url(&location))
        .header("x-api-key", ADMIN)
        .send()
        .await
        .unwrap();
    let etag = current.headers()["etag"].to_str().unwrap().to_owned();
    let read = s
        .http
        .get(s.gw.url(&location))
        .header("x-api-key", ADMIN)
        .header("if-none-match", &etag)
        .header("prefer", "wait=20");
    let response = tokio::time::timeout(Duration::from_secs(5), read.send())
        .await
        .expect("no place to wait: answered at once")
        .unwrap();
    assert_eq!(response.status().as_u16(), 304);
    assert!(response.headers().get("preference-applied").is_none());

    // Another key has its own share.
    let created: Value = s
        .http
        .post(s.gw.url("/v1/keys"))
        .header("x-api-key", ADMIN)
        .json(&json!({"name": "other", "role": "viewer"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let other = created["key"].as_str().unwrap().to_owned();
    let theirs = s
        .http
        .get(s.gw.url(&format!("{location}/live")))
        .header("x-api-key", &other)
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status().as_u16(), 200);

    // A stream that ends gives its place back.
    drop(first);
    eventually(
        "the key's place is given back",
        Duration::from_secs(10),
        || async {
            let response = s.live(&location, None).await.unwrap();
            (response.status().as_u16() == 200).then_some(())
        },
    )
    .await;
    drop((second, theirs));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_past_its_long_polls_is_refused_with_429() {
    let s = stand_with(&[("GATEWAY_MAX_CLAIMS_PER_AGENT", "2")], &[]).await;
    let a = s.agent("a", "NL", 64536, &["dns"]).await;
    s.online(&[&a]).await;
    let url = s.gw.url("/v1/agents/claim");
    let claim = |wait_ms: u64| {
        let (url, http, a) = (&url, &s.http, &a);
        async move {
            let body = json!({"capacities": {"dns": 1}, "request_id": uuid::Uuid::new_v4().simple().to_string(), "wait_ms": wait_ms});
            agent_post(http, url, &a.id, &a.token, &body).await
        }
    };
    // The first claim waits for work (there is none); a second one at the same time does not.
    // Two claims wait for work (there is none); a third one at the same time is refused, and
    // one that does not wait is answered as always.
    let waiting = futures::future::join(claim(15_000), claim(15_000));
    let third = async {
        // Both are in their wait once the gateway counts them.
        eventually("two claims wait", Duration::from_secs(5), || async {
            let waiting =
                checkplane_testkit::metric(&s.gw.url("/metrics"), "checkplane_claims_waiting")
                    .await;
            (waiting == 2.0).then_some(())
        })
        .await;
        let refused = tokio::time::timeout(Duration::from_secs(5), claim(15_000))
            .await
            .expect("past its share, a claim is answered at once");
        let polled = tokio::time::timeout(Duration::from_secs(5), claim(0))
            .await
            .expect("a claim that does not wait");
        (refused, polled)
    };
    tokio::select! {
        _ = waiting => panic!("the first claims should still be waiting"),
        ((status, body), (polled, leases)) = third => {
            assert_eq!(status, 429, "{body}");
            assert_eq!(body["error"]["code"], "ERR_RATE_LIMITED", "{body}");
            assert_eq!(polled, 200, "{leases}");
            assert_eq!(leases["leases"], json!([]), "{leases}");
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_left_unclaimed_by_an_agent_that_went_offline_is_retried_elsewhere() {
    let s = stand_with(
        &[("HEARTBEAT_INTERVAL", "300ms")],
        &[("OFFLINE_GRACE", "300ms"), ("RETRY_BACKOFF", "0s")],
    )
    .await;
    let a = s.agent("a", "NL", 64540, &["dns"]).await;
    let b = s.agent("b", "NL", 64541, &["dns"]).await;
    s.online(&[&a, &b]).await;
    // A long deadline: only the offline handling can end this in time.
    let (status, body, location) = s
        .create(json!({"kind": "dns", "target": "example.com", "limit": 1, "timeout_ms": 120000}))
        .await;
    assert_eq!(status, 202, "{body}");
    let location = location.unwrap();
    let first = s.check(&location).await;
    let picked = chosen(&first);
    let (silent, spare) = if picked[0] == a.id {
        (&a, &b)
    } else {
        (&b, &a)
    };

    // The chosen agent never claims and stops heartbeating; the spare keeps heartbeating
    // (`claim` heartbeats first) and gets attempt 2.
    let retried = s
        .claim_eventually(spare, "dns", "the spare agent gets the slot", 20)
        .await;
    assert_eq!(retried[0]["spec"]["attempt"], 2, "{retried:?}");
    s.report(
        spare,
        retried[0]["token"].as_str().unwrap(),
        json!({"rcode": "NOERROR", "answers": []}),
    )
    .await;
    let done = s.finished(&location, "the check finishes").await;
    let results = done["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{done}");
    assert_eq!(results[0]["agent_id"], spare.id.as_str());
    assert_eq!(results[0]["outcome"], "finished");

    // The agent that was gone finds nothing when it comes back: its task was closed.
    assert!(s.claim(silent, "dns").await.is_empty());
    let closed = count(
        &s.db,
        &format!(
            "SELECT count(*) FROM lease_history WHERE agent_id = '{}'
             AND type = 'lease.closed' AND detail::text LIKE '%offline%'",
            silent.id
        ),
    )
    .await;
    assert_eq!(closed, 1, "its task was closed once, as offline");
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM projection_failures").await,
        0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_agents_slots_go_to_other_agents_at_once() {
    // Leases of five minutes: without the revocation's recovery the leased slot would wait
    // them out.
    let s = stand_with(&[("LEASE_TTL", "300s")], &[("RETRY_BACKOFF", "0s")]).await;
    let a = s.agent("a", "NL", 64540, &["dns"]).await;
    let b = s.agent("b", "NL", 64541, &["dns"]).await;
    s.online(&[&a, &b]).await;
    let (status, body, location) = s
        .create(json!({"kind": "dns", "target": "example.com", "limit": 1, "timeout_ms": 120000}))
        .await;
    assert_eq!(status, 202, "{body}");
    let location = location.unwrap();
    let picked = chosen(&s.check(&location).await);
    let (doomed, spare) = if picked[0] == a.id {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let leased = s
        .claim_eventually(doomed, "dns", "the chosen agent leases its slot", 10)
        .await;
    assert_eq!(leased[0]["spec"]["attempt"], 1, "{leased:?}");

    let revoked = s
        .http
        .delete(s.gw.url(&format!("/v1/agents/{}", doomed.id)))
        .header("x-api-key", ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 200);
    let revoked: Value = revoked.json().await.unwrap();
    assert_eq!(revoked["leases_recovered"], 1, "{revoked}");

    let retried = s
        .claim_eventually(spare, "dns", "the spare agent gets the slot", 20)
        .await;
    assert_eq!(retried[0]["spec"]["attempt"], 2, "{retried:?}");
    s.report(
        spare,
        retried[0]["token"].as_str().unwrap(),
        json!({"rcode": "NOERROR", "answers": []}),
    )
    .await;
    let done = s.finished(&location, "the check finishes").await;
    let results = done["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "{done}");
    assert_eq!(results[0]["agent_id"], spare.id.as_str());

    // The revoked agent's late report is refused at the door.
    let (status, _) = agent_post(
        &s.http,
        &s.gw.url("/v1/agents/report"),
        &doomed.id,
        &doomed.token,
        &json!({"completed": [{"token": leased[0]["token"], "result": {"rcode": "NOERROR", "answers": []}}]}),
    )
    .await;
    assert_eq!(status, 401);
    eventually(
        "the revoked agent offline, for that reason",
        Duration::from_secs(10),
        || async {
            let row =
                s.db.client()
                    .await
                    .query_one(
                        "SELECT a.status, h.reason FROM agents a
                     JOIN agent_status_history h USING (agent_id)
                     WHERE agent_id = $1 ORDER BY h.version DESC LIMIT 1",
                        &[&doomed.id],
                    )
                    .await
                    .unwrap();
            let (status, reason): (String, String) = (row.get("status"), row.get("reason"));
            (status == "offline" && reason == "revoked").then_some(())
        },
    )
    .await;
    assert_eq!(
        count(&s.db, "SELECT count(*) FROM projection_failures").await,
        0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_parallel_bounds_the_slots_running_at_once() {
    let s = stand_with(&[("DEFAULT_MAX_PARALLEL", "2")], &[]).await;
    let agents = [
        s.agent("p1", "NL", 64550, &["dns"]).await,
        s.agent("p2", "DE", 64551, &["dns"]).await,
        s.agent("p3", "FR", 64552, &["dns"]).await,
    ];
    s.online(&agents.iter().collect::<Vec<_>>()).await;

    for bad in [json!(0), json!(1001), json!("two")] {
        let (status, body, _) = s
            .create(
                json!({"kind": "dns", "target": "example.com", "limit": 3, "max_parallel": bad}),
            )
            .await;
        assert_eq!(status, 422, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_parallel"),
            "{body}"
        );
    }

    // One at a time: the first slot is sent, the others wait.
    let (status, body, location) = s
        .create(json!({"kind": "dns", "target": "example.com", "limit": 3, "max_parallel": 1}))
        .await;
    assert_eq!((status, body["agents_count"].as_u64()), (202, Some(3)));
    let location = location.unwrap();
    let check = s.check(&location).await;
    assert_eq!(check["max_parallel"], 1);
    let statuses = |c: &Value| -> Vec<String> {
        c["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["status"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(statuses(&check), ["pending", "waiting", "waiting"]);
    let by_slot: Vec<&Agent> = check["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| agents.iter().find(|a| a.id == r["agent_id"]).unwrap())
        .collect();
    assert!(s.claim(by_slot[1], "dns").await.is_empty(), "slot 1 waits");
    assert!(s.claim(by_slot[2], "dns").await.is_empty(), "slot 2 waits");
    for (n, agent) in by_slot.iter().enumerate() {
        let leases = s
            .claim_eventually(agent, "dns", "the slot is released", 10)
            .await;
        assert_eq!(leases[0]["spec"]["slot"], n as u64);
        // While this one runs, the next one is still waiting.
        let now = s.check(&location).await;
        let running = statuses(&now)
            .iter()
            .filter(|s| *s == "pending" || *s == "leased")
            .count();
        assert_eq!(running, 1, "{now}");
        s.report(
            agent,
            leases[0]["token"].as_str().unwrap(),
            json!({"rcode": "NOERROR", "answers": []}),
        )
        .await;
    }
    let done = s.finished(&location, "the check finishes").await;
    assert_eq!(done["done_count"], 3);

    // The installation's default applies when the check gives none.
    let (_, _, location) = s
        .create(json!({"kind": "dns", "target": "example.org", "limit": 3}))
        .await;
    let check = s.check(&location.unwrap()).await;
    assert_eq!(check["max_parallel"], 2);
    assert_eq!(statuses(&check), ["pending", "pending", "waiting"]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn live_results_from_two_projector_replicas_arrive_in_seq_order_without_gaps() {
    const AGENTS: usize = 24;
    let s = stand().await;
    let second = start_scheduler(&s.db, &s.redis, &[("CONSUMER_NAME", "replica-2")]).await;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        agents.push(
            s.agent(&format!("r{i}"), "NL", 64600 + i as u32, &["dns"])
                .await,
        );
    }
    s.online(&agents.iter().collect::<Vec<_>>()).await;
    let (status, body, location) = s
        .create(json!({"kind": "dns", "target": "example.com", "limit": AGENTS}))
        .await;
    assert_eq!(
        (status, body["agents_count"].as_u64()),
        (202, Some(AGENTS as u64))
    );
    let location = location.unwrap();
    let mut tokens = Vec::new();
    for agent in &agents {
        let leases = s.claim(agent, "dns").await;
        assert_eq!(leases.len(), 1);
        tokens.push(leases[0]["token"].as_str().unwrap().to_owned());
    }
    let open = |last: Option<String>| s.live(&location, last.as_deref());
    let mut stream = open(None).await.unwrap();

    // Every agent reports at once: both replicas project, committing concurrently.
    let reports = agents.iter().zip(&tokens).map(|(agent, token)| {
        let (http, url) = (s.http.clone(), s.gw.url("/v1/agents/report"));
        async move {
            let (status, body) = agent_post(
                &http,
                &url,
                &agent.id,
                &agent.token,
                &json!({"completed": [{"token": token, "result": {"rcode": "NOERROR", "answers": []}}]}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
    });
    futures::future::join_all(reports).await;

    // A third of the way through, the reader goes away and comes back with its last id.
    let mut seen = sse_events(&mut stream, AGENTS / 3).await;
    drop(stream);
    let last = seen.last().unwrap().1.clone().unwrap();
    let mut stream = open(Some(last)).await.unwrap();
    seen.extend(sse_events(&mut stream, AGENTS - AGENTS / 3 + 1).await);

    let (results, end) = seen.split_at(AGENTS);
    assert_eq!(end[0].0, "finished", "{end:?}");
    let ids: Vec<i64> = results
        .iter()
        .map(|(event, id, _)| {
            assert_eq!(event, "result");
            id.as_deref().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(
        ids,
        (1..=AGENTS as i64).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    let mut slots: Vec<u64> = results
        .iter()
        .map(|(_, _, data)| data["slot"].as_u64().unwrap())
        .collect();
    slots.sort_unstable();
    assert_eq!(
        slots,
        (0..AGENTS as u64).collect::<Vec<_>>(),
        "every slot once"
    );
    let done = s.check(&location).await;
    assert_eq!(
        (done["status"].as_str(), done["seq"].as_i64()),
        (Some("finished"), Some(AGENTS as i64))
    );
    second.stop().await.unwrap();
    s.stop().await;
}

impl Stand {
    /// `method` on `path` as the admin: status and JSON body.
    async fn admin(&self, method: &str, path: &str) -> (u16, Value) {
        let response = self
            .http
            .request(method.parse().unwrap(), self.gw.url(path))
            .header("x-api-key", ADMIN)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The dead letters, once there are `n`.
    async fn dead_letters(&self, n: usize) -> Vec<Value> {
        eventually("the dead letters", Duration::from_secs(20), || async {
            let (status, page) = self.admin("GET", "/v1/dead-letters?limit=50").await;
            assert_eq!(status, 200, "{page}");
            let items = page["items"].as_array().cloned().unwrap_or_default();
            (items.len() == n && page["total"] == n).then_some(items)
        })
        .await
    }
}

/// Issue 20, part 4: tasks past `MAX_DELIVERIES` wait in the dead letters, their slots open
/// until an admin acts: a requeue gives the slot its next attempt on the same agent, a drop
/// ends it `dead_lettered`, the deadline ends the ones nobody handled (and a requeue of those
/// is refused); all and one at a time, an anonymous task too; audited; on the gauge.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_requeued_and_dropped_by_admins() {
    let s = stand_with(&[("LEASE_TTL", "1s"), ("MAX_DELIVERIES", "1")], &[]).await;
    let a = s.agent("a", "NL", 64520, &["dns"]).await;
    s.online(&[&a]).await;
    let mut checks = Vec::new();
    for (target, timeout) in [
        ("a.example", 60_000),
        ("b.example", 60_000),
        ("c.example", 60_000),
        ("d.example", 5_000),
    ] {
        let (status, body, location) = s
            .create(json!({"kind": "dns", "target": target, "limit": 1, "timeout_ms": timeout}))
            .await;
        assert_eq!(status, 202, "{body}");
        checks.push((target, location.unwrap()));
    }
    // A task without a check (as tests and benchmarks make them).
    let keys = checkplane_core::keys::Keys::new(s.redis.prefix.clone(), 4);
    let leases = checkplane_core::leases::Leases::new(
        keys.clone(),
        checkplane_core::leases::LeaseSettings::new(1_000, 1),
    );
    leases
        .enqueue(
            &mut s.redis.connection().await,
            &a.id,
            "dns",
            r#"{"anonymous":true}"#,
        )
        .await
        .unwrap();
    // Claimed and never reported: each comes back after the lease TTL at delivery 2, one
    // more than allowed.
    eventually(
        "five tasks dead-lettered",
        Duration::from_secs(20),
        || async {
            let _ = s.claim(&a, "dns").await;
            let (_, page) = s.admin("GET", "/v1/dead-letters").await;
            (page["total"] == 5).then_some(())
        },
    )
    .await;
    let letters = s.dead_letters(5).await;
    let letter_of = |target: &str| -> Value {
        let check = checks.iter().find(|(t, _)| *t == target).unwrap();
        let id = check.1.rsplit('/').next().unwrap().to_owned();
        letters
            .iter()
            .find(|l| l["task"].as_str().is_some_and(|t| t.starts_with(&id)))
            .cloned()
            .unwrap_or_else(|| panic!("{target} in {letters:?}"))
    };
    let anonymous = letters
        .iter()
        .find(|l| l["task"].is_null())
        .unwrap()
        .clone();
    assert_eq!(letter_of("a.example")["reason"], "max_deliveries");
    assert_eq!(letter_of("a.example")["deliveries"], 2);
    eventually("the gauge", Duration::from_secs(15), || async {
        (s.scheduler_metric("checkplane_dead_letters").await == 5.0).then_some(())
    })
    .await;
    // The slots wait: the checks are not finished.
    let a_check = s.check(&checks[0].1).await;
    assert_eq!(a_check["status"], "in_progress", "{a_check}");
    assert_eq!(
        a_check["results"][0]["outcome"], "dead_lettered",
        "{a_check}"
    );

    // Requeue one: the slot's second attempt, on the same agent; it runs and reports.
    // Three admins at once: one requeue, the others find it gone or its slot moved on.
    let id = letter_of("a.example")["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/dead-letters/{id}/requeue");
    let (one, two, three) = tokio::join!(
        s.admin("POST", &path),
        s.admin("POST", &path),
        s.admin("POST", &path)
    );
    let mut answers = vec![one, two, three];
    answers.sort_by_key(|(status, _)| *status);
    let (status, requeued) = &answers[0];
    assert_eq!(
        (*status, requeued["attempt"].as_u64()),
        (200, Some(2)),
        "{answers:?}"
    );
    assert!(
        answers[1..]
            .iter()
            .all(|(status, _)| [404, 409].contains(status)),
        "{answers:?}"
    );
    let (status, again) = s.admin("POST", &path).await;
    assert_eq!(status, 404, "gone once requeued: {again}");
    // The anonymous one goes back on its stream.
    let (status, _) = s
        .admin(
            "POST",
            &format!(
                "/v1/dead-letters/{}/requeue",
                anonymous["id"].as_str().unwrap()
            ),
        )
        .await;
    assert_eq!(status, 200);
    let mut claimed = Vec::new();
    while claimed.len() < 2 {
        claimed.extend(
            s.claim_eventually(&a, "dns", "the requeued tasks", 10)
                .await,
        );
    }
    let retried = claimed
        .iter()
        .find(|l| l["spec"]["target"] == "a.example")
        .expect("the check's task");
    assert_eq!(retried["spec"]["attempt"], 2, "{retried}");
    assert!(
        claimed.iter().any(|l| l["spec"]["anonymous"] == true),
        "{claimed:?}"
    );
    s.report(
        &a,
        retried["token"].as_str().unwrap(),
        json!({"rcode": "NOERROR", "answers": []}),
    )
    .await;
    let done = s.finished(&checks[0].1, "the requeued slot finishes").await;
    assert_eq!(done["results"][0]["outcome"], "finished", "{done}");
    assert_eq!(done["results"][0]["attempt"], 2, "{done}");

    // Drop one: its slot ends at once.
    // Three admins at once here too: one drop (one audit row), the others 404 or 409.
    let id = letter_of("b.example")["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/dead-letters/{id}");
    let (one, two, three) = tokio::join!(
        s.admin("DELETE", &path),
        s.admin("DELETE", &path),
        s.admin("DELETE", &path)
    );
    let mut codes = vec![one.0, two.0, three.0];
    codes.sort_unstable();
    assert_eq!(codes[0], 204, "{codes:?}");
    assert!(
        codes[1..].iter().all(|c| [404, 409].contains(c)),
        "{codes:?}"
    );
    assert_eq!(
        s.admin("DELETE", &format!("/v1/dead-letters/{id}")).await.0,
        404
    );
    let done = s.finished(&checks[1].1, "the dropped slot ends").await;
    assert_eq!(done["results"][0]["outcome"], "dead_lettered", "{done}");
    // Nobody acted on d before its deadline: it ended `dead_lettered`, and cannot run again.
    let done = s.finished(&checks[3].1, "the deadline ends d").await;
    assert_eq!(done["results"][0]["outcome"], "dead_lettered", "{done}");
    // Requeue all: c runs again, d is refused (its check ended) and stays.
    let (status, all) = s.admin("POST", "/v1/dead-letters/requeue").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["requeued"].as_array().unwrap().len(), 1, "{all}");
    assert_eq!(
        all["refused"][0]["id"],
        letter_of("d.example")["id"],
        "{all}"
    );
    assert_eq!(all["refused"][0]["code"], "ERR_CONFLICT", "{all}");
    // Drop all: d goes.
    assert_eq!(
        s.admin("DELETE", "/v1/dead-letters?limit=0").await.0,
        422,
        "bounded"
    );
    assert_eq!(s.admin("DELETE", "/v1/dead-letters?all=1").await.0, 422);
    let (status, dropped) = s.admin("DELETE", "/v1/dead-letters?limit=10").await;
    assert_eq!(
        (status, dropped["dropped"].as_u64()),
        (200, Some(1)),
        "{dropped}"
    );
    s.dead_letters(0).await;
    for (path, code) in [
        ("/v1/dead-letters/nonsense/requeue", 404),
        ("/v1/dead-letters/s9999-1-0/requeue", 404),
        ("/v1/dead-letters/s0-1-0", 404),
        // Past what a stream id holds: still the client's mistake, not a Redis error.
        ("/v1/dead-letters/s0-99999999999999999999-0", 404),
    ] {
        let method = if path.ends_with("requeue") {
            "POST"
        } else {
            "DELETE"
        };
        assert_eq!(s.admin(method, path).await.0, code, "{path}");
    }
    let audited = count(
        &s.db,
        "SELECT count(*) FROM audit_log WHERE action IN ('dead_letter.requeued', 'dead_letter.dropped')",
    )
    .await;
    assert_eq!(
        audited, 5,
        "a, the anonymous one and c requeued; b and d dropped"
    );
    eventually("the gauge back to 0", Duration::from_secs(15), || async {
        (s.scheduler_metric("checkplane_dead_letters").await == 0.0).then_some(())
    })
    .await;
    s.stop().await;
}

/// Issue 20, part 4: an event that cannot be applied is parked, listed with its error and on
/// the gauge; after a fix, `scheduler replay-failures` applies it; one that still cannot be is
/// left (exit 1) and an admin drops it (audited).
#[tokio::test(flavor = "multi_thread")]
async fn parked_events_are_listed_replayed_after_a_fix_and_dropped() {
    use checkplane_testkit::events::{registered, xadd};
    let s = stand_with(&[], &[("PROJECTOR_MAX_ATTEMPTS", "1")]).await;
    let keys = checkplane_core::keys::Keys::new(s.redis.prefix.clone(), 4);
    let mut conn = s.redis.connection().await;
    // Two agents claiming one host name: the second's registration breaks the unique index.
    let first = registered("agt-first", 1, checkplane_runtime::clock::now_ms());
    let mut second = registered("agt-second", 1, checkplane_runtime::clock::now_ms());
    if let checkplane_wire::events::EventBody::AgentRegistered(r) = &mut second.body {
        r.hostname = "agt-first.test".into();
    }
    xadd(&mut conn, &keys.events("agents"), &first).await;
    xadd(&mut conn, &keys.events("agents"), &second).await;
    let parked = eventually("parked", Duration::from_secs(15), || async {
        let (_, page) = s.admin("GET", "/v1/projection-failures").await;
        (page["total"] == 1).then_some(page)
    })
    .await;
    let item = &parked["items"][0];
    assert_eq!(item["event_type"], "agent.registered", "{item}");
    assert_eq!(item["event_id"], second.event_id.to_string(), "{item}");
    assert!(
        item["error"].as_str().unwrap().contains("duplicate"),
        "{item}"
    );
    eventually("the gauge", Duration::from_secs(15), || async {
        (s.scheduler_metric("checkplane_projection_failures").await == 1.0).then_some(())
    })
    .await;

    // The fix (here: the first agent's host renamed), then the replay.
    s.db.client()
        .await
        .execute(
            "UPDATE agents SET hostname = 'renamed.test' WHERE agent_id = 'agt-first'",
            &[],
        )
        .await
        .unwrap();
    let env = vec![("DATABASE_URL".to_owned(), s.db.url.clone())];
    let out = tokio::task::block_in_place(|| {
        run_to_end(
            crate::bin(),
            &["replay-failures"],
            &env,
            Duration::from_secs(60),
        )
    });
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{printed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("applied: 1"), "{printed}");
    let hostname: String =
        s.db.client()
            .await
            .query_one(
                "SELECT hostname FROM agents WHERE agent_id = 'agt-second'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
    assert_eq!(hostname, "agt-first.test");

    // An entry that is no event at all: replayed, it fails again; an admin drops it.
    let _: String = redis::cmd("XADD")
        .arg(keys.events("agents"))
        .arg("*")
        .arg("event")
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    let parked = eventually("parked again", Duration::from_secs(15), || async {
        let (_, page) = s.admin("GET", "/v1/projection-failures").await;
        (page["total"] == 1).then_some(page)
    })
    .await;
    let id = parked["items"][0]["id"].as_i64().unwrap();
    let out = tokio::task::block_in_place(|| {
        run_to_end(
            crate::bin(),
            &["replay-failures", "--id", &id.to_string()],
            &env,
            Duration::from_secs(60),
        )
    });
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (_, page) = s.admin("GET", "/v1/projection-failures").await;
    assert_eq!(page["items"][0]["attempts"], 2, "{page}");
    assert_eq!(
        s.admin("DELETE", &format!("/v1/projection-failures/{id}"))
            .await
            .0,
        204
    );
    assert_eq!(
        s.admin("DELETE", &format!("/v1/projection-failures/{id}"))
            .await
            .0,
        404
    );
    assert_eq!(s.admin("DELETE", "/v1/projection-failures/x").await.0, 404);
    let (_, page) = s.admin("GET", "/v1/projection-failures").await;
    assert_eq!(page["total"], 0, "{page}");
    let audited = count(
        &s.db,
        "SELECT count(*) FROM audit_log WHERE action = 'projection_failure.dropped'",
    )
    .await;
    assert_eq!(audited, 1);
    s.stop().await;
}

/// A slot waiting in the dead letters does not hold a place of its check's `max_parallel`:
/// the next slot is released and runs meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_lettered_slot_does_not_hold_back_the_next_under_max_parallel() {
    let s = stand_with(&[("LEASE_TTL", "1s"), ("MAX_DELIVERIES", "1")], &[]).await;
    let nl = s.agent("nl", "NL", 64520, &["dns"]).await;
    let de = s.agent("de", "DE", 64521, &["dns"]).await;
    s.online(&[&nl, &de]).await;
    let (status, body, location) = s
        .create(
            json!({"kind": "dns", "target": "example.com", "limit": 2, "max_parallel": 1,
                       "timeout_ms": 60000}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let location = location.unwrap();
    // Whichever agent has the first slot claims it and never reports: dead-lettered at the
    // second delivery.
    let check = s.check(&location).await;
    let first = check["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["status"] != "waiting")
        .unwrap()["agent_id"]
        .clone();
    let (holder, other) = if first == nl.id.as_str() {
        (&nl, &de)
    } else {
        (&de, &nl)
    };
    s.claim_eventually(holder, "dns", "the first slot's task", 10)
        .await;
    s.dead_letters(0).await;
    eventually("dead-lettered", Duration::from_secs(15), || async {
        let _ = s.claim(holder, "dns").await;
        let (_, page) = s.admin("GET", "/v1/dead-letters").await;
        (page["total"] == 1).then_some(())
    })
    .await;
    // The second slot is released to the other agent.
    let leases = s
        .claim_eventually(other, "dns", "the released second slot", 15)
        .await;
    s.report(
        other,
        leases[0]["token"].as_str().unwrap(),
        json!({"rcode": "NOERROR", "answers": []}),
    )
    .await;
    let check = s
        .until(&location, "the second slot finished", |c| {
            c["results"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["outcome"] == "finished")
        })
        .await;
    assert_ne!(
        check["status"], "finished",
        "the first slot still waits: {check}"
    );
    s.stop().await;
}

/// A report whose event the projector parked (here: made undecodable in the stream) is not
/// taken for lost: its slot waits past the deadline for an admin; once the parked event is
/// dropped, the slot ends `timeout`, counted as missing.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_whose_report_event_is_parked_waits_for_an_admin() {
    let mut s = stand_with(&[], &[("PROJECTOR_MAX_ATTEMPTS", "1")]).await;
    let a = s.agent("a", "NL", 64520, &["dns"]).await;
    s.online(&[&a]).await;
    s.stop_scheduler().await;
    let checks = reported_checks(&s, &a, 1).await;
    let (_, _, control) = s
        .create(
            json!({"kind": "dns", "target": "control.example.com", "limit": 1,
                       "timeout_ms": 1000}),
        )
        .await;
    let (stream, event) = take_report_event(&s, &a).await;
    // The same event, but an outcome no release reads: undecodable, so parked.
    let broken = event.replace("\"outcome\":\"finished\"", "\"outcome\":5");
    assert_ne!(broken, event);
    let mut conn = s.redis.connection().await;
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("event")
        .arg(&broken)
        .query_async(&mut conn)
        .await
        .unwrap();
    deadlines_overdue(&s).await;

    s.start_scheduler(&[("PROJECTOR_MAX_ATTEMPTS", "1")]).await;
    s.finished(&control.unwrap(), "the deadline pass ran").await;
    let parked = eventually("parked", Duration::from_secs(15), || async {
        let (_, page) = s.admin("GET", "/v1/projection-failures").await;
        (page["total"] == 1).then_some(page)
    })
    .await;
    // Parked means acknowledged: the projector has passed it. A check due after that ends
    // only once a pass has run since, which saw the parked one too: it still waits.
    let conn = s.redis.connection().await;
    eventually("acknowledged", Duration::from_secs(10), || async {
        let pending: redis::streams::StreamPendingReply =
            redis::AsyncCommands::xpending(&mut conn.clone(), &stream, "projector")
                .await
                .unwrap();
        (pending.count() == 0).then_some(())
    })
    .await;
    s.heartbeat(&a).await;
    let (_, _, later) = s
        .create(
            json!({"kind": "dns", "target": "later.example.com", "limit": 1,
                       "timeout_ms": 1000}),
        )
        .await;
    s.finished(&later.unwrap(), "a pass after the parking")
        .await;
    assert_eq!(
        s.scheduler_metric("checkplane_lifecycle_slots_awaiting_projection")
            .await,
        1.0
    );
    let check = s.check(&checks[0].0).await;
    assert_ne!(check["status"], "finished", "{check}");
    assert_eq!(
        s.scheduler_metric("checkplane_lifecycle_reports_missing_total")
            .await,
        0.0
    );
    let id = parked["items"][0]["id"].as_i64().unwrap();
    assert_eq!(
        s.admin("DELETE", &format!("/v1/projection-failures/{id}"))
            .await
            .0,
        204
    );
    let done = s.finished(&checks[0].0, "ended once dropped").await;
    assert_eq!(done["results"][0]["outcome"], "timeout", "{done}");
    assert_eq!(
        s.scheduler_metric("checkplane_lifecycle_reports_missing_total")
            .await,
        1.0
    );
    s.stop().await;
}

/// A claim's script can run well after the `now` it was given: its Redis call waits out a
/// Redis restart (found by the chaos run: the claim began while Redis was down, the check was
/// made and its task enqueued meanwhile, and the grant carried a time from before the check).
/// The grant's event must not predate the task it grants, or a rebuild, which replays in
/// time order, applies it before `check.created` and loses the slot's `started_at`.
#[tokio::test(flavor = "multi_thread")]
async fn a_grant_whose_claim_ran_late_does_not_predate_its_check_in_a_rebuild() {
    let s = stand().await;
    let a = s.agent("late", "NL", 64530, &["dns"]).await;
    s.online(&[&a]).await;
    let claim_began = checkplane_runtime::clock::now_ms();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, _, location) = s
        .create(json!({"kind": "dns", "target": "late.example.com", "limit": 1}))
        .await;
    assert_eq!(status, 202);
    let location = location.unwrap();
    let keys = checkplane_core::keys::Keys::new(s.redis.prefix.clone(), 4);
    let leases = checkplane_core::leases::Leases::new(
        keys,
        checkplane_core::leases::LeaseSettings::new(30_000, 5),
    );
    let mut conn = s.redis.connection().await;
    let granted = leases
        .claim(&mut conn, &a.id, "late-1", &[("dns", 1)], claim_began)
        .await
        .unwrap();
    assert_eq!(granted.len(), 1);
    let (status, answer) = agent_post(
        &s.http,
        &s.gw.url("/v1/agents/report"),
        &a.id,
        &a.token,
        &json!({"completed": [{"token": granted[0].token, "result": {"rcode": "NOERROR", "answers": []}}]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let check = s
        .finished(&location, "the late grant's check finishes")
        .await;
    assert_eq!(check["results"][0]["outcome"], "finished", "{check}");
    let db = s.db.client().await;
    let started: Option<i64> = db
        .query_one(
            "SELECT (extract(epoch FROM started_at) * 1000)::bigint FROM check_slots",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(started.is_some(), "the live slot has its start");
    drop(db);
    let url = s.db.url.clone();
    let before = checkplane_core::projection::canonical_dump(&s.db.client().await)
        .await
        .unwrap();
    let Stand {
        gw,
        sched,
        db: _db,
        redis: _redis,
        ..
    } = s;
    sched.unwrap().stop().await.unwrap();
    gw.stop().await.unwrap();
    crate::rebuild_binary(&url);
    let after = {
        let config: tokio_postgres::Config = url.parse().unwrap();
        let client = checkplane_runtime::db::connect(&config).await.unwrap();
        checkplane_core::projection::canonical_dump(&client)
            .await
            .unwrap()
    };
    let slots = |d: &[(String, Vec<String>)]| {
        d.iter()
            .find(|(t, _)| t == "check_slots")
            .map(|(_, rows)| rows.clone())
            .unwrap()
    };
    assert_eq!(slots(&before), slots(&after), "check_slots after a rebuild");
    assert_eq!(before, after);
}

/// Issue 26, Redis lost: every key of the deployment gone mid-check. With the scheduler
/// stopped nothing comes back by itself; `scheduler requeue` puts the open slots' tasks back
/// from PostgreSQL (and adds nothing while Redis still has them); the late report of a lost
/// lease is refused. Lost again with the scheduler running: it notices its sentinel is gone
/// and requeues by itself. Both checks finish, each slot with one result.
#[tokio::test(flavor = "multi_thread")]
async fn after_redis_lost_its_data_requeue_lets_the_open_checks_finish_once() {
    let mut s = stand().await;
    let a = s.agent("a", "NL", 64520, &["dns"]).await;
    s.online(&[&a]).await;
    let check = |timeout: u32| json!({"kind": "dns", "target": "example.com", "limit": 1, "timeout_ms": timeout});
    let (status, _, leased) = s.create(check(300_000)).await;
    assert_eq!(status, 202);
    let (leased, first) = (
        leased.unwrap(),
        s.claim_eventually(&a, "dns", "the first task", 10).await,
    );
    assert_eq!(first.len(), 1);
    let lost = first[0]["token"].as_str().unwrap().to_owned();
    let (status, _, pending) = s.create(check(300_000)).await;
    assert_eq!(status, 202);
    let pending = pending.unwrap();
    let db = s.db.client().await;
    eventually("both slots open in PostgreSQL", Duration::from_secs(20), || async {
        let open: i64 = db
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'leased') * 10 + count(*) FILTER (WHERE status = 'pending')
                 FROM check_slots",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (open == 11).then_some(())
    })
    .await;

    let keys = checkplane_core::keys::Keys::new(s.redis.prefix.clone(), 4);
    let stream = keys.tasks(&a.id, "dns");
    let mut conn = s.redis.connection().await;
    let entries = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move {
            redis::cmd("XLEN")
                .arg(&stream)
                .query_async::<u64>(&mut conn)
                .await
                .unwrap()
        }
    };
    let before = entries(&mut conn).await;
    let env = checkplane_testkit::store_env(&s.db, &s.redis);
    let requeue = || {
        let out = tokio::task::block_in_place(|| {
            run_to_end(crate::bin(), &["requeue"], &env, Duration::from_secs(30))
        });
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = requeue();
    assert!(
        said.ends_with("requeued 2 open slots of 2 checks: each task is in its agent's stream\n"),
        "{said}"
    );
    assert_eq!(
        entries(&mut conn).await,
        before,
        "nothing added while Redis has them"
    );

    // Redis loses everything of this deployment, the scheduler stopped.
    s.stop_scheduler().await;
    let lose_everything = |mut conn: redis::aio::MultiplexedConnection, prefix: String| async move {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!keys.is_empty());
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    };
    lose_everything(conn.clone(), s.redis.prefix.clone()).await;
    assert!(
        s.claim(&a, "dns").await.is_empty(),
        "the tasks went with Redis"
    );
    let late = s.try_report(&a, &lost).await;
    assert_ne!(late["status"], "acknowledged", "{late}");
    let said = requeue();
    assert!(
        said.ends_with("requeued 2 open slots of 2 checks: each task is in its agent's stream\n"),
        "{said}"
    );
    let mut got = Vec::new();
    while got.len() < 2 {
        got.extend(
            s.claim_eventually(&a, "dns", "the requeued tasks", 10)
                .await,
        );
    }
    assert_eq!(got.len(), 2, "{got:?}");
    // The first check's task reported; the second's lease lost with Redis again, now with the
    // scheduler running: it requeues by itself.
    let of = |lease: &Value, location: &str| {
        location.ends_with(lease["spec"]["check_id"].as_str().unwrap_or("-"))
    };
    let (done_now, lost_again): (Vec<&Value>, Vec<&Value>) =
        got.iter().partition(|lease| of(lease, &leased));
    assert_eq!((done_now.len(), lost_again.len()), (1, 1), "{got:?}");
    s.report(
        &a,
        done_now[0]["token"].as_str().unwrap(),
        json!({"rcode": "NOERROR", "answers": []}),
    )
    .await;
    s.start_scheduler(&[]).await;
    s.finished(&leased, "the first check finishes").await;
    lose_everything(conn.clone(), s.redis.prefix.clone()).await;
    let again = s
        .claim_eventually(&a, "dns", "the task requeued by the scheduler itself", 20)
        .await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(of(&again[0], &pending), "{again:?}");
    s.report(
        &a,
        again[0]["token"].as_str().unwrap(),
        json!({"rcode": "NOERROR", "answers": []}),
    )
    .await;
    for check in [&leased, &pending] {
        let done = s
            .finished(check, "the check finishes after the requeue")
            .await;
        let results = done["results"].as_array().unwrap();
        assert_eq!(results.len(), 1, "{done}");
        assert_eq!(results[0]["outcome"], "finished", "{done}");
    }
    s.stop().await;
}
