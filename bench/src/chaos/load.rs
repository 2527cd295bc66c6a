//! The steady load the faults land on: simulated agents (the lease protocol over HTTP, each
//! acknowledged report noted), checks of every kind, HAProxy actions one at a time per
//! server, live-stream followers, and a sampler of the projector's lag.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::schedule::Rng;
use super::verify::{Ack, ActionRecord, LetterAction, SseLog};
use super::{Ledger, ADMIN, ENROLL};
use checkplane_runtime::clock::now_ms;

/// A simulated agent's identity, kept across its kills (as a state file would).
#[derive(Debug, Clone)]
pub struct SimAgent {
    pub hostname: String,
    pub id: String,
    pub token: String,
}

/// Register simulated agent `i` in ASN 65001 with dns and tcp capacity.
pub async fn register_sim(http: &reqwest::Client, base: &str, i: usize) -> SimAgent {
    let hostname = format!("sim-{i}");
    let body = json!({"hostname": hostname, "capabilities": {"dns": 4, "tcp": 4},
                      "location": {"country": "ZZ", "asn": 65001}});
    let (id, token) = checkplane_testkit::register_agent(http, base, ENROLL, &body).await;
    SimAgent {
        hostname,
        id,
        token,
    }
}

async fn agent_call(
    http: &reqwest::Client,
    url: &str,
    agent: &SimAgent,
    body: &Value,
    timeout: Duration,
) -> Option<(u16, Value)> {
    let response = http
        .post(url)
        .header("x-agent-id", &agent.id)
        .header("x-agent-token", &agent.token)
        .json(body)
        .timeout(timeout)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.unwrap_or(Value::Null)))
}

/// One life of a simulated agent (until `stop`: its kill drops everything in flight):
/// heartbeats every second; claims (retrying a lost answer with the same `request_id`);
/// works each lease 50-1500 ms (now and then longer than the check's deadline), reports it,
/// retrying a report whose answer was lost, and notes every `acknowledged`.
pub async fn sim_agent(
    http: reqwest::Client,
    base: String,
    agent: SimAgent,
    life: u64,
    ledger: Arc<Ledger>,
    stop: CancellationToken,
) {
    let beat = {
        let (http, base, agent, stop) = (http.clone(), base.clone(), agent.clone(), stop.clone());
        async move {
            let url = format!("{base}/v1/agents/heartbeat");
            while !stop.is_cancelled() {
                let _ = agent_call(&http, &url, &agent, &json!({}), Duration::from_secs(2)).await;
                tokio::time::sleep(Duration::from_millis(1_000)).await;
            }
        }
    };
    let work = async {
        let claim_url = format!("{base}/v1/agents/claim");
        let mut rng = Rng::new(life.wrapping_mul(0x1000_0000_01b3) ^ now_ms() as u64);
        let mut round = 0u64;
        while !stop.is_cancelled() {
            round += 1;
            let request_id = format!("{}-{life}-{round}", agent.hostname);
            let body = json!({"capacities": {"dns": 4, "tcp": 4}, "request_id": request_id,
                              "wait_ms": 1500});
            let mut leases = None;
            for _ in 0..5 {
                match agent_call(&http, &claim_url, &agent, &body, Duration::from_secs(4)).await {
                    Some((200, answer)) => {
                        leases = Some(answer["leases"].as_array().cloned().unwrap_or_default());
                        break;
                    }
                    // Transport errors and 5xx: the same request id again.
                    _ => tokio::time::sleep(Duration::from_millis(300)).await,
                }
            }
            let Some(leases) = leases else { continue };
            // Entries this agent got back at a newer epoch: what a ghost of an earlier life
            // waits for.
            for lease in &leases {
                if let Some((entry, epoch)) =
                    lease["token"].as_str().and_then(|t| t.rsplit_once('.'))
                {
                    if epoch != "1" {
                        ledger.reclaimed.lock().unwrap().insert(entry.to_owned());
                    }
                }
            }
            // Each lease's work runs on a task of its own, so a kill of this life leaves
            // it to a ghost (see `report`).
            let jobs: Vec<_> = leases
                .into_iter()
                .map(|lease| {
                    let work_ms = if rng.range(0, 10) == 0 {
                        rng.range(3_000, 6_000)
                    } else {
                        rng.range(50, 1_500)
                    };
                    tokio::spawn(report(
                        http.clone(),
                        base.clone(),
                        agent.clone(),
                        lease,
                        work_ms,
                        ledger.clone(),
                        stop.clone(),
                    ))
                })
                .collect();
            futures::future::join_all(jobs).await;
        }
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = async { tokio::join!(beat, work) } => {}
    }
}

/// Work a lease `work_ms`, then report it. If this life of the agent was killed meanwhile,
/// its work is not lost but late: a ghost of the old life (a process that was cut off, not
/// dead) reports it once the agent's next life has taken the lease back at a newer epoch, so
/// the fence has to refuse it (`ERR_LEASE_LOST`); whatever the answer, an `acknowledged` is
/// noted like any other.
async fn report(
    http: reqwest::Client,
    base: String,
    agent: SimAgent,
    lease: Value,
    work_ms: u64,
    ledger: Arc<Ledger>,
    life: CancellationToken,
) {
    if lease["spec"]["target"] == POISON {
        // An agent that never finishes this task: each delivery comes back after the lease
        // TTL, until the gateway dead-letters it.
        return;
    }
    tokio::time::sleep(Duration::from_millis(work_ms)).await;
    if life.is_cancelled() {
        // The ghost reports once the next life got the entry back at a newer epoch (or the
        // lease ended otherwise and will not come back: after 20 s at most).
        let entry = lease["token"]
            .as_str()
            .and_then(|t| t.rsplit_once('.'))
            .map(|(entry, _)| entry.to_owned())
            .unwrap_or_default();
        for _ in 0..200 {
            if ledger.reclaimed.lock().unwrap().contains(&entry) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ledger
            .ghost_reports
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let (http, base, agent) = (&http, base.as_str(), &agent);
    let Some(token) = lease["token"].as_str() else {
        return;
    };
    let spec = &lease["spec"];
    let task = format!(
        "{}:{}:{}",
        spec["check_id"].as_str().unwrap_or_default(),
        spec["slot"],
        spec["attempt"]
    );
    // A result of the lease's kind, as the gateway requires; a dns one names its lease.
    let timings = json!({"total": work_ms});
    let result = match lease["kind"].as_str() {
        Some("tcp") => json!({"connected": true, "address": "192.0.2.1", "port": 1,
                              "timings": timings}),
        _ => json!({"rcode": "NOERROR", "answers": [], "name": token, "timings": timings}),
    };
    let body = json!({"completed": [{"token": token, "outcome": "finished", "result": result}]});
    let url = format!("{base}/v1/agents/report");
    for _ in 0..10 {
        if let Some((200, answer)) =
            agent_call(http, &url, agent, &body, Duration::from_secs(4)).await
        {
            let said = answer["results"][0]["status"]
                .as_str()
                .or(answer["results"][0]["error"].as_str())
                .unwrap_or("?");
            tally(&ledger.report_answers, said.to_owned());
            if said == "acknowledged" {
                ledger.acks.lock().unwrap().push(Ack {
                    token: token.to_owned(),
                    task: task.clone(),
                    result: result.clone(),
                    at_ms: now_ms(),
                });
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

/// An answer's status and its envelope's error code (empty when it has none).
async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let code = response
        .json::<Value>()
        .await
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status, code)
}

/// Count one more `what`.
fn tally(counts: &std::sync::Mutex<std::collections::BTreeMap<String, u64>>, what: String) {
    *counts.lock().unwrap().entry(what).or_default() += 1;
}

/// The target the simulated agents never finish a task for (dead letters are made of it).
pub const POISON: &str = "poison.example.test";

/// What the checks are aimed at on loopback.
#[derive(Debug, Clone)]
pub struct Targets {
    pub dns_resolver: String,
    pub tcp_port: u16,
    pub http_url: String,
}

/// The check bodies, in turn: every kind the real probe agent answers on loopback (dns
/// against a private unbound, http, tcp, ping, trace), and dns / tcp for the simulated
/// agents (ASN 65001) with deadlines of a few seconds, so deadlines land in the faults.
fn check_body(n: u64, t: &Targets, rng: &mut Rng) -> Value {
    // Short deadlines land in the faults; longer ones leave a killed agent's next life time
    // to take its leases back before the deadline (what the fence is tested on).
    let timeout = if rng.range(0, 2) == 0 {
        rng.range(3_000, 8_000)
    } else {
        rng.range(10_000, 16_000)
    };
    match n % 7 {
        0 => json!({"kind": "dns", "target": "example.test",
                    "options": {"type": "A", "resolver": t.dns_resolver},
                    "locations": [{"asn": 65001, "limit": 3}], "timeout_ms": timeout}),
        1 => json!({"kind": "tcp", "target": "127.0.0.1", "options": {"port": t.tcp_port},
                    "limit": 3, "timeout_ms": timeout}),
        2 => {
            json!({"kind": "http", "target": t.http_url, "limit": 1, "timeout_ms": timeout.max(5_000)})
        }
        3 => json!({"kind": "dns", "target": "example.test",
                    "options": {"type": "MX", "resolver": t.dns_resolver},
                    "limit": 2, "timeout_ms": timeout}),
        4 => json!({"kind": "ping", "target": "127.0.0.1", "options": {"packets": 1},
                    "limit": 1, "timeout_ms": timeout.max(5_000)}),
        5 => json!({"kind": "tcp", "target": "127.0.0.1", "options": {"port": t.tcp_port},
                    "locations": [{"asn": 65001, "limit": 4}], "max_parallel": 2,
                    "timeout_ms": timeout}),
        _ => json!({"kind": "trace", "target": "127.0.0.1", "options": {"protocol": "icmp"},
                    "limit": 1, "timeout_ms": 8_000}),
    }
}

/// Make a check every `every` until `stop`; each 202 is noted (other answers are counted:
/// `ERR_NO_AGENTS` while the probe agent is offline is expected).
pub async fn make_checks(
    http: reqwest::Client,
    base: String,
    targets: Targets,
    every: Duration,
    seed: u64,
    ledger: Arc<Ledger>,
    stop: CancellationToken,
) {
    let mut rng = Rng::new(seed ^ 0xc4ec);
    for n in 0..100_000u64 {
        if stop.is_cancelled() {
            return;
        }
        let body = if n % 20 == 10 {
            json!({"kind": "dns", "target": POISON, "locations": [{"asn": 65001, "limit": 1}],
                   "timeout_ms": 25_000})
        } else {
            check_body(n, &targets, &mut rng)
        };
        let answer = http
            .post(format!("{base}/v1/checks"))
            .header("x-api-key", ADMIN)
            .json(&body)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match answer {
            Ok(r) if r.status().as_u16() == 202 => {
                if let Ok(v) = r.json::<Value>().await {
                    if let Some(id) = v["id"].as_str() {
                        ledger.created.lock().unwrap().push(id.to_owned());
                    }
                }
            }
            Ok(r) => {
                let (status, code) = error_of(r).await;
                tally(&ledger.refused_checks, format!("{status} {code}"));
            }
            Err(_) => tally(&ledger.refused_checks, "unreachable".into()),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One server's actions, one at a time until `stop`: a state other than the last one asked,
/// under a fresh key, the request retried with the same key until answered; then waited for
/// (bounded). The status each ended with is read from PostgreSQL at the end.
#[allow(clippy::too_many_arguments)]
pub async fn act_on_server(
    http: reqwest::Client,
    base: String,
    server_id: String,
    label: String,
    run: String,
    seed: u64,
    ledger: Arc<Ledger>,
    stop: CancellationToken,
) {
    let mut rng = Rng::new(seed ^ crc(&label));
    let mut last = "ready";
    for n in 0..10_000u32 {
        if stop.is_cancelled() {
            return;
        }
        let choices: Vec<&str> = ["drain", "maint", "ready"]
            .into_iter()
            .filter(|a| *a != last)
            .collect();
        let action = *rng.pick(&choices);
        let key = format!("{run}-{}-{n}", label.replace('/', "."));
        let requested_ms = now_ms();
        let mut id = None;
        let mut refused = false;
        let deadline = Instant::now() + Duration::from_secs(30);
        while id.is_none() && !refused && Instant::now() < deadline {
            let answer = http
                .post(format!("{base}/v1/haproxy/servers/{server_id}/action"))
                .header("x-api-key", ADMIN)
                .json(&json!({"action": action, "idempotency_key": key}))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => {
                    id = r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["id"].as_str().map(str::to_owned));
                }
                Ok(r) if r.status().is_client_error() => {
                    refused = true;
                    let (status, code) = error_of(r).await;
                    tally(&ledger.refused_actions, format!("{status} {code}"));
                }
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        ledger.actions.lock().unwrap().push(ActionRecord {
            key: key.clone(),
            server: label.clone(),
            action: action.to_owned(),
            requested_ms,
            ended_ms: requested_ms,
            status: if id.is_some() { "accepted" } else { "refused" }.to_owned(),
        });
        if let Some(id) = id {
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline && !stop.is_cancelled() {
                let answer = http
                    .get(format!("{base}/v1/haproxy/actions/{id}?wait_ms=3000"))
                    .header("x-api-key", ADMIN)
                    .timeout(Duration::from_secs(6))
                    .send()
                    .await;
                let status = match answer {
                    Ok(r) => r.json::<Value>().await.ok().map(|v| v["status"].clone()),
                    Err(_) => None,
                };
                match status.as_ref().and_then(Value::as_str) {
                    Some("success") => {
                        last = action;
                        break;
                    }
                    Some("failed") => break,
                    Some(_) => {}
                    None => tokio::time::sleep(Duration::from_millis(300)).await,
                }
            }
        }
        let pause = Duration::from_millis(rng.range(200, 1_500));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

fn crc(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Follow the newest created check's live stream to its `finished`, resuming with
/// `Last-Event-ID` whenever the connection drops (a killed gateway), then the next one,
/// until `stop`.
pub async fn follow_checks(
    http: reqwest::Client,
    base: String,
    ledger: Arc<Ledger>,
    stop: CancellationToken,
) {
    let mut followed = std::collections::HashSet::new();
    while !stop.is_cancelled() {
        let next = ledger
            .created
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|id| !followed.contains(*id))
            .cloned();
        let Some(check) = next else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        followed.insert(check.clone());
        let log = follow_one(&http, &base, &check, &stop).await;
        ledger.sse.lock().unwrap().push(log);
    }
}

async fn follow_one(
    http: &reqwest::Client,
    base: &str,
    check: &str,
    stop: &CancellationToken,
) -> SseLog {
    let mut log = SseLog {
        check: check.to_owned(),
        ..SseLog::default()
    };
    let mut last: Option<i64> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut connections = 0u32;
    while !log.finished && Instant::now() < deadline && !stop.is_cancelled() {
        let mut request = http
            .get(format!("{base}/v1/checks/{check}/live"))
            .header("x-api-key", ADMIN);
        if let Some(seq) = last {
            request = request.header("last-event-id", seq.to_string());
        }
        connections += 1;
        if connections > 1 {
            log.resumed += 1;
        }
        let Ok(mut response) = request.send().await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        if !response.status().is_success() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        let mut buffer = String::new();
        loop {
            let chunk = tokio::select! {
                _ = stop.cancelled() => return log,
                c = tokio::time::timeout(Duration::from_secs(20), response.chunk()) => c,
            };
            let Ok(Ok(Some(bytes))) = chunk else { break };
            buffer.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                let (mut kind, mut data) = ("", String::new());
                for line in event.lines() {
                    if let Some(k) = line.strip_prefix("event:") {
                        kind = k.trim();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                }
                match kind {
                    "result" => {
                        let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                        if let (Some(seq), Some(slot)) = (v["seq"].as_i64(), v["slot"].as_i64()) {
                            log.seen.push((seq, slot as i32));
                            last = Some(seq);
                        }
                    }
                    "finished" => log.finished = true,
                    _ => {}
                }
            }
            if log.finished {
                break;
            }
        }
    }
    log
}

/// The projector group's lag summed over the event streams, every second until `stop`;
/// the largest is kept in the ledger.
pub async fn sample_lag(
    redis_url: String,
    prefix: String,
    ledger: Arc<Ledger>,
    stop: CancellationToken,
) {
    let Ok(client) = redis::Client::open(redis_url.as_str()) else {
        return;
    };
    while !stop.is_cancelled() {
        if let Ok(Ok(mut conn)) = tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await
        {
            if let Ok(streams) =
                super::collect::streams(&mut conn, &format!("{prefix}:events:*")).await
            {
                let mut lag = 0i64;
                for stream in streams {
                    for group in super::collect::groups(&mut conn, &stream)
                        .await
                        .unwrap_or_default()
                    {
                        if group.name == scheduler::PROJECTOR_GROUP {
                            lag += super::collect::lag(&mut conn, &stream, &group)
                                .await
                                .unwrap_or(0);
                        }
                    }
                }
                ledger
                    .max_lag
                    .fetch_max(lag, std::sync::atomic::Ordering::Relaxed);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// An admin looking at the dead letters every second until `stop`: each letter of a check's
/// task is requeued or dropped, in turn. A 409 is asked again for up to 5 s (the
/// dead-lettering may not be projected yet); the final answer is noted.
pub async fn handle_dead_letters(
    http: reqwest::Client,
    base: String,
    ledger: Arc<Ledger>,
    stop: CancellationToken,
) {
    let mut seen = std::collections::HashSet::new();
    let mut turn = 0u64;
    while !stop.is_cancelled() {
        let page = http
            .get(format!("{base}/v1/dead-letters?limit=100"))
            .header("x-api-key", ADMIN)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let items = match page {
            Ok(r) => r
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["items"].as_array().cloned())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        for letter in items {
            let (Some(id), Some(task)) = (letter["id"].as_str(), letter["task"].as_str()) else {
                continue;
            };
            if task.split(':').count() != 3 || !seen.insert(id.to_owned()) {
                continue;
            }
            turn += 1;
            let action = if turn % 2 == 1 { "requeue" } else { "drop" };
            let at_ms = now_ms();
            let mut answer = (0u16, String::new());
            let mut maybe_applied = false;
            for _ in 0..10 {
                let request = if action == "requeue" {
                    http.post(format!("{base}/v1/dead-letters/{id}/requeue"))
                } else {
                    http.delete(format!("{base}/v1/dead-letters/{id}"))
                };
                let Ok(r) = request
                    .header("x-api-key", ADMIN)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                else {
                    maybe_applied = true;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                };
                answer = error_of(r).await;
                let status = answer.0;
                if status != 409 && status < 500 {
                    break;
                }
                maybe_applied |= status >= 500;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            ledger.letters.lock().unwrap().push(LetterAction {
                id: id.to_owned(),
                task: task.to_owned(),
                action: action.to_owned(),
                at_ms,
                status: answer.0,
                code: answer.1,
                maybe_applied,
            });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
