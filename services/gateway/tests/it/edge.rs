//! The listener against slow and oversized clients: limits on a request's head and body
//! answered in the envelope, connection caps that drop the oldest idle connection first, and
//! thousands of held connections that neither keep `/livez` from answering nor stay open past
//! their timeouts.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use checkplane_testkit::process::{free_port, ServiceProcess};
use checkplane_testkit::raw::{closed_within, exchange, raise_open_files, read_answer};
use checkplane_testkit::{metric, metric_in, store_env, wait_ready, TestDb, TestRedis};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::agents::{start_with, ADMIN};

const WITHIN: Duration = Duration::from_secs(5);

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A `POST /v1/checks` whose body is 10 of 100 bytes: a request in flight, waiting for the
/// rest. Returns once the handler reads the body (the server's `100 Continue` says so).
async fn slow_body(addr: SocketAddr, close: bool) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let connection = if close { "close" } else { "keep-alive" };
    let head = format!(
        "POST /v1/checks HTTP/1.1\r\nHost: gw\r\nX-API-Key: {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\
         Connection: {connection}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    tokio::time::timeout(WITHIN, async {
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.unwrap();
            assert_eq!(n, 1, "closed before 100 Continue: {seen:?}");
            seen.push(byte[0]);
        }
    })
    .await
    .expect("100 Continue");
    assert!(
        seen.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    stream.write_all(b"{\"kind\":\"t").await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread")]
async fn heads_over_the_limits_are_refused_in_the_envelope() {
    let gw = start_with(vec![]).await;
    let addr = gw.running.addr;

    let long = format!(
        "GET /livez?pad={} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    let answer = exchange(addr, long.as_bytes(), WITHIN).await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (414, "ERR_URI_TOO_LONG")
    );

    let many: String = (0..70).map(|i| format!("X-Pad-{i}: 1\r\n")).collect();
    let many = format!("GET /livez HTTP/1.1\r\nHost: gw\r\n{many}Connection: close\r\n\r\n");
    let answer = exchange(addr, many.as_bytes(), WITHIN).await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (431, "ERR_HEADERS_TOO_LARGE")
    );

    let big = format!(
        "GET /livez HTTP/1.1\r\nHost: gw\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(20 * 1024)
    );
    let answer = exchange(addr, big.as_bytes(), WITHIN).await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (431, "ERR_HEADERS_TOO_LARGE")
    );

    // Far over hyper's own read buffer: its bodiless 431, the documented exception.
    let huge = format!(
        "GET /livez HTTP/1.1\r\nHost: gw\r\nX-Pad: {}\r\n\r\n",
        "c".repeat(1024 * 1024)
    );
    let answer = exchange(addr, huge.as_bytes(), WITHIN).await;
    assert_eq!(answer.status, 431);

    // Within the limits the same routes answer.
    let fine = format!(
        "GET /livez?pad={} HTTP/1.1\r\nHost: gw\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(1024),
        "b".repeat(1024)
    );
    assert_eq!(exchange(addr, fine.as_bytes(), WITHIN).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declared_body_over_the_route_limit_is_refused_before_it_is_sent() {
    let gw = start_with(vec![]).await;
    for path in ["/v1/agents/register", "/v1/checks", "/v1/haproxy/instances"] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n\
             Content-Length: 1000000000000\r\n\r\n"
        );
        let answer = exchange(gw.running.addr, request.as_bytes(), WITHIN).await;
        assert_eq!(
            (answer.status, answer.code().as_str()),
            (413, "ERR_PAYLOAD_TOO_LARGE"),
            "{path}: {answer:?}"
        );
        assert_eq!(answer.header("connection").as_deref(), Some("close"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_slower_than_the_body_timeout_gets_408() {
    let gw = start_with(env(&[("HTTP_BODY_TIMEOUT", "1s")])).await;
    let mut stream = slow_body(gw.running.addr, false).await;
    let answer = read_answer(&mut stream, WITHIN).await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (408, "ERR_REQUEST_TIMEOUT"),
        "{answer:?}"
    );
    // The request asked to keep the connection; the server closes it all the same.
    assert_eq!(answer.header("connection").as_deref(), Some("close"));
    assert!(closed_within(&mut stream, WITHIN).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_per_address_cap_drops_the_oldest_idle_and_refuses_when_all_are_busy() {
    let gw = start_with(env(&[("HTTP_MAX_CONNECTIONS_PER_ADDRESS", "3")])).await;
    let addr = gw.running.addr;
    let livez = b"GET /livez HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";

    // Three idle connections (the third closes the readiness probe's pooled connection, the
    // oldest idle one); a fourth request closes the oldest of the three and is served.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    assert_eq!(exchange(addr, livez, WITHIN).await.status, 200);
    assert!(closed_within(&mut idle[0], WITHIN).await, "the oldest idle");
    for stream in &mut idle[1..] {
        assert!(!closed_within(stream, Duration::from_millis(300)).await);
    }
    drop(idle);

    // Three requests in flight: nothing idle to drop, so the next connection is refused.
    let mut busy = Vec::new();
    for _ in 0..3 {
        busy.push(slow_body(addr, true).await);
    }
    let refused = exchange(addr, livez, WITHIN).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (503, "ERR_UNAVAILABLE"),
        "{refused:?}"
    );
    assert_eq!(refused.header("retry-after").as_deref(), Some("1"));
    for stream in &mut busy {
        assert!(!closed_within(stream, Duration::from_millis(100)).await);
    }

    // One of them goes away: there is room again.
    busy.pop();
    checkplane_testkit::eventually("room after a busy connection closed", WITHIN, || async {
        (exchange(addr, livez, WITHIN).await.status == 200).then_some(())
    })
    .await;
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_gateway"))
}

async fn gateway_process(
    db: &TestDb,
    redis: &TestRedis,
    wrapper: &[&str],
    extra: &[(&str, &str)],
) -> (ServiceProcess, SocketAddr) {
    let port = free_port();
    let mut env = store_env(db, redis);
    env.push(("HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
    env.extend(self::env(extra));
    let process = match wrapper.split_first() {
        None => ServiceProcess::spawn(bin(), &[], &env),
        Some((program, args)) => {
            let mut args = args.to_vec();
            let gateway = bin().to_str().unwrap();
            args.push(gateway);
            ServiceProcess::spawn(Path::new(program), &args, &env)
        }
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let http = reqwest::Client::new();
    wait_ready(
        &http,
        &format!("http://{addr}/readyz"),
        Duration::from_secs(30),
    )
    .await;
    (process, addr)
}

/// `/livez` from a fresh client with a 5 s timeout.
async fn livez(addr: SocketAddr) -> u16 {
    let http = reqwest::Client::builder()
        .timeout(WITHIN)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    match http.get(format!("http://{addr}/livez")).send().await {
        Ok(response) => response.status().as_u16(),
        Err(error) => panic!("/livez did not answer: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_held_connections_neither_stop_livez_nor_outlive_their_timeouts() {
    raise_open_files(4_500);
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let (gateway, addr) = gateway_process(
        &db,
        &redis,
        &[],
        &[
            ("HTTP_HEADER_TIMEOUT", "5s"),
            ("HTTP_IDLE_TIMEOUT", "8s"),
            ("HTTP_MAX_CONNECTIONS_PER_ADDRESS", "0"),
        ],
    )
    .await;

    let mut held = Vec::new();
    for i in 0..2_000 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 1 {
            stream
                .write_all(b"POST /v1/checks HTTP/1.1\r\nHost: gw\r\nContent-Le")
                .await
                .unwrap();
        }
        held.push(stream);
    }
    for _ in 0..5 {
        assert_eq!(livez(addr).await, 200);
    }
    let metrics = format!("http://{addr}/metrics");
    assert!(metric(&metrics, "http_connections_open").await >= 2_000.0);
    // Opened well within the timeouts: the newest of each kind is still held.
    for stream in &mut held[1_998..] {
        assert!(!closed_within(stream, Duration::from_millis(100)).await);
    }

    // Every held connection is closed by the server: the half-sent ones by the header
    // timeout, the silent ones by the idle timeout (the counters say which).
    for (i, stream) in held.iter_mut().enumerate() {
        assert!(
            closed_within(stream, Duration::from_secs(20)).await,
            "held connection {i} still open: {}",
            gateway.stderr()
        );
    }
    let text = checkplane_testkit::metrics_text(&metrics).await;
    let closed = |reason: &str| {
        metric_in(
            &text,
            &format!("http_connections_closed_total{{reason=\"{reason}\"}}"),
        )
    };
    assert!(closed("header_timeout") >= 1_000.0, "{text}");
    assert!(closed("idle_timeout") >= 1_000.0, "{text}");
    assert_eq!(closed("evicted"), 0.0, "{text}");
    assert_eq!(livez(addr).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_descriptors_the_oldest_idle_connections_make_room() {
    // The finding this answers: 1,100 connections to a gateway with 1,024 descriptors and
    // `/livez` stopped answering.
    raise_open_files(2_048);
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let (gateway, addr) = gateway_process(
        &db,
        &redis,
        &["prlimit", "--nofile=1024:1024"],
        &[("HTTP_MAX_CONNECTIONS_PER_ADDRESS", "0")],
    )
    .await;
    assert!(
        gateway
            .stderr()
            .contains("HTTP_MAX_CONNECTIONS lowered to what RLIMIT_NOFILE allows"),
        "{}",
        gateway.stderr()
    );

    let mut held = Vec::new();
    for _ in 0..1_100 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    for _ in 0..5 {
        assert_eq!(livez(addr).await, 200);
    }
    // The first ones opened were dropped to make room; the newest are still held.
    assert!(closed_within(&mut held[0], WITHIN).await);
    assert!(!closed_within(held.last_mut().unwrap(), Duration::from_millis(300)).await);
    let evicted = metric(
        &format!("http://{addr}/metrics"),
        r#"http_connections_closed_total{reason="evicted"}"#,
    )
    .await;
    assert!(evicted >= 300.0, "evicted {evicted}");
}
