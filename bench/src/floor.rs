//! `fan-out-http`: the data path of `fan-out-raw` with HTTP between the agents and Redis, as
//! any design whose agents talk to a gateway over HTTP has it, and nothing else of ours: a
//! bare axum server (no authentication, no validation, no Lua, no fencing, no event store, no
//! projection) on a runtime of two workers of its own, like the gateway's. Agents long-poll
//! `POST /claim/<n>` (the server reads the agent's stream, and when it is empty waits for the
//! agent's in-process wake-up), report each task with `POST /report/<n>` (`XACK` + `XADD` of
//! the result, one pipeline), and a run begins with `POST /check`, which adds the run's tasks
//! in one pipeline and wakes their agents. The collector is the raw side's: `XREAD` of the
//! results, one `INSERT` per read, a `SELECT` that sees them all.
//!
//! The simulated agents are the checkplane side's (the same client, one task each per run),
//! so the difference between this and `fan-out-raw` is what HTTP alone costs on this machine,
//! and what `fan-out` spends beyond this is what checkplane adds.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cpu;
use crate::fanout::{
    ack_and_result, raw_spec, run_agents, service_runtime, store_results, summary, take_tasks,
    Baseline, FanOutArgs,
};

/// How long a claim waits for work before it answers empty.
const CLAIM_WAIT: Duration = Duration::from_secs(20);

struct Floor {
    redis: redis::aio::MultiplexedConnection,
    streams: Vec<String>,
    results: String,
    wake: Vec<Notify>,
    spec: String,
}

#[derive(serde::Deserialize)]
struct Check {
    run: usize,
    agents: Vec<usize>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Task {
    id: String,
    run: String,
}

type Shared = Arc<Floor>;

async fn check(State(floor): State<Shared>, Json(check): Json<Check>) -> StatusCode {
    if check.agents.iter().any(|&a| a >= floor.streams.len()) {
        return StatusCode::NOT_FOUND;
    }
    let mut pipe = redis::pipe();
    for &a in &check.agents {
        pipe.cmd("XADD")
            .arg(&floor.streams[a])
            .arg("*")
            .arg("run")
            .arg(check.run)
            .arg("spec")
            .arg(&floor.spec)
            .ignore();
    }
    let added: redis::RedisResult<()> = pipe.query_async(&mut floor.redis.clone()).await;
    if added.is_err() {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    // A wake-up given while nobody waits is kept for the agent's next wait.
    for &a in &check.agents {
        floor.wake[a].notify_one();
    }
    StatusCode::ACCEPTED
}

async fn claim(
    State(floor): State<Shared>,
    Path(agent): Path<usize>,
) -> Result<Json<Vec<Task>>, StatusCode> {
    let stream = floor.streams.get(agent).ok_or(StatusCode::NOT_FOUND)?;
    let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
    loop {
        let reply: Option<redis::streams::StreamReadReply> = take_tasks(stream, None)
            .query_async(&mut floor.redis.clone())
            .await
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
        let tasks: Vec<Task> = reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .filter_map(|e| {
                Some(Task {
                    run: e.get("run")?,
                    id: e.id,
                })
            })
            .collect();
        if !tasks.is_empty() {
            return Ok(Json(tasks));
        }
        tokio::select! {
            _ = floor.wake[agent].notified() => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(Json(Vec::new())),
        }
    }
}

async fn report(
    State(floor): State<Shared>,
    Path(agent): Path<usize>,
    Json(done): Json<Vec<Task>>,
) -> Result<Json<serde_json::Value>, StatusCode> {
    let stream = floor.streams.get(agent).ok_or(StatusCode::NOT_FOUND)?;
    for task in &done {
        let pipe = ack_and_result(stream, &task.id, &floor.results, &task.run, agent);
        let () = pipe
            .query_async(&mut floor.redis.clone())
            .await
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    }
    Ok(Json(json!({"status": "acknowledged"})))
}

pub async fn http(args: FanOutArgs) {
    let setup = Baseline::new(&args, "fohf").await;
    let redis = setup.redis.clone();
    let floor = Arc::new(Floor {
        redis: redis.get_multiplexed_async_connection().await.unwrap(),
        streams: setup.streams.clone(),
        results: setup.results.clone(),
        wake: (0..args.agents).map(|_| Notify::new()).collect(),
        spec: raw_spec(),
    });
    let (rt, listener) = service_runtime("reference");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = Router::new()
        .route("/check", post(check))
        .route("/claim/{agent}", post(claim))
        .route("/report/{agent}", post(report))
        .with_state(floor);
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router).await
    });

    let http = reqwest::Client::new();
    let stop = CancellationToken::new();
    let claimed: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut pollers = Vec::new();
    for a in 0..args.agents {
        let (http, stop, claimed) = (http.clone(), stop.clone(), claimed.clone());
        let claim_url = reqwest::Url::parse(&format!("{base}/claim/{a}")).unwrap();
        let report_url = reqwest::Url::parse(&format!("{base}/report/{a}")).unwrap();
        pollers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let claim = async { http.post(claim_url.clone()).send().await?.bytes().await };
                let got = tokio::select! { _ = stop.cancelled() => return, c = claim => c };
                let Ok(got) = got else { continue };
                let Ok(tasks) = serde_json::from_slice::<Vec<Task>>(&got) else {
                    continue;
                };
                if tasks.is_empty() {
                    continue;
                }
                claimed.lock().unwrap().push(Instant::now());
                let body = serde_json::to_string(&tasks).unwrap();
                let reported = async {
                    http.post(report_url.clone())
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await?
                        .bytes()
                        .await
                };
                if let Ok(answer) = reported.await {
                    let acknowledged = answer.windows(14).any(|w| w == b"\"acknowledged\"");
                    assert!(acknowledged, "report answered {answer:?}");
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // every poller waiting

    let mut reader = redis.get_multiplexed_async_connection().await.unwrap();
    let mut last = "0-0".to_owned();
    let mut totals = Vec::with_capacity(args.runs);
    let mut last_claims = Vec::with_capacity(args.runs);
    let mut cpu_before = cpu::reading(&["reference"]);
    for run in 0..args.warmup + args.runs {
        if run == args.warmup {
            cpu_before = cpu::reading(&["reference"]);
        }
        claimed.lock().unwrap().clear();
        let started = Instant::now();
        let agents: Vec<usize> = run_agents(&args, run).collect();
        let response = http
            .post(format!("{base}/check"))
            .json(&json!({"run": run, "agents": agents}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
        store_results(
            &mut reader,
            &setup.pg,
            &setup.results,
            &mut last,
            run,
            args.fan,
        )
        .await;
        if run >= args.warmup {
            totals.push(started.elapsed().as_secs_f64() * 1000.0);
            let claims = claimed.lock().unwrap();
            last_claims.push(
                claims
                    .iter()
                    .max()
                    .map_or(0.0, |t| t.duration_since(started).as_secs_f64() * 1000.0),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_ms = cpu::per_run(&cpu_before, &cpu::reading(&["reference"]), args.runs);
    stop.cancel();
    for p in pollers {
        let _ = p.await;
    }
    rt.shutdown_background();
    setup.finish(&args).await;
    last_claims.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let round = |v: f64| (v * 100.0).round() / 100.0;
    summary(
        "http",
        &args,
        totals,
        json!({"last_claim_p50_ms": round(crate::percentile(&last_claims, 0.5)),
               "cpu_ms_per_check": cpu_ms}),
    );
}
