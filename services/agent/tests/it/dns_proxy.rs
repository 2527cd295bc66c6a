//! The caching DNS proxy in front of a real authoritative server (a private unbound serving
//! `example.test`), asked by `dig` and by raw packets; answers read back with hickory's
//! parser (not the proxy's own).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent::dns_proxy::{start, Settings};
use checkplane_testkit::dns::Unbound;
use hickory_resolver::proto::op::{Message, ResponseCode};
use tokio_util::sync::CancellationToken;

fn settings(upstream: SocketAddr) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream,
        upstream_timeout: Duration::from_millis(500),
        cache_size: 1000,
        max_inflight: 64,
        stale: Duration::from_secs(600),
    }
}

/// A proxy on a free port: its address (and the token that stops it).
async fn proxy(settings: Settings) -> (SocketAddr, CancellationToken) {
    let port = checkplane_testkit::process::free_port();
    let settings = Settings {
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        ..settings
    };
    let stop = CancellationToken::new();
    start(settings, stop.clone()).await.unwrap();
    (SocketAddr::from(([127, 0, 0, 1], port)), stop)
}

/// `dig @127.0.0.1 -p <port> <args>` (off the runtime the proxy runs on): what it printed.
async fn dig(proxy: SocketAddr, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("dig")
            .arg(format!("@{}", proxy.ip()))
            .args(["-p", &proxy.port().to_string(), "+tries=1", "+time=3"])
            .args(&args)
            .output()
            .expect("dig (./stand test installs dnsutils)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

fn query_packet(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    p.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        p.push(label.len() as u8);
        p.extend_from_slice(label.as_bytes());
    }
    p.extend_from_slice(&[0, 0, qtype as u8, 0, 1]);
    p
}

/// One UDP question: hickory's reading of the answer.
async fn ask(proxy: SocketAddr, name: &str) -> Message {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(proxy).await.unwrap();
    socket.send(&query_packet(0x4242, name, 1)).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let message = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(message.id(), 0x4242);
    message
}

fn a_records(m: &Message) -> Vec<(String, u32)> {
    m.answers()
        .iter()
        .map(|r| (r.data().to_string(), r.ttl()))
        .collect()
}

#[tokio::test]
async fn dig_is_answered_from_the_upstream_then_from_the_cache_when_it_is_gone() {
    let dns = Unbound::start();
    let (addr, _stop) = proxy(settings(dns.addr().parse().unwrap())).await;
    for transport in ["+notcp", "+tcp"] {
        let out = dig(addr, &[transport, "example.test", "A"]).await;
        assert!(out.contains("status: NOERROR"), "{out}");
        assert!(out.contains("192.0.2.10"), "{out}");
    }
    let out = dig(addr, &["example.test", "MX"]).await;
    assert!(out.contains("10 mail.example.test."), "{out}");
    let nx = ask(addr, "nowhere.example.test").await;
    assert_eq!(nx.response_code(), ResponseCode::NXDomain);
    // Without EDNS (dig sends it): a question of its own in the cache.
    let plain = ask(addr, "example.test").await;
    assert_eq!(a_records(&plain), [("192.0.2.10".to_owned(), 300)]);

    drop(dns);
    // The upstream is gone: what was asked is still answered, TTLs aged, not grown.
    let out = dig(addr, &["example.test", "A"]).await;
    assert!(out.contains("192.0.2.10"), "from the cache: {out}");
    let cached = ask(addr, "EXAMPLE.test").await;
    let records = a_records(&cached);
    assert_eq!(records.len(), 1);
    assert!(records[0].1 <= 300, "{records:?}");
    // The asker's spelling of the name comes back (0x20 resolvers check it).
    assert_eq!(cached.queries()[0].name().to_ascii(), "EXAMPLE.test.");
    // Negative answers are cached for the SOA's minimum (60 s here).
    let nx = ask(addr, "nowhere.example.test").await;
    assert_eq!(nx.response_code(), ResponseCode::NXDomain);
    // Never asked, nothing to answer with: SERVFAIL.
    let never = ask(addr, "never.example.test").await;
    assert_eq!(never.response_code(), ResponseCode::ServFail);
}

#[tokio::test]
async fn an_expired_answer_is_served_stale_while_the_upstream_fails_within_the_bound() {
    for (stale, expected) in [
        (Duration::from_secs(600), ResponseCode::NoError),
        (Duration::ZERO, ResponseCode::ServFail),
    ] {
        let dns = Unbound::start();
        let (addr, _stop) = proxy(Settings {
            stale,
            ..settings(dns.addr().parse().unwrap())
        })
        .await;
        let first = ask(addr, "short.example.test").await;
        assert_eq!(a_records(&first), [("192.0.2.77".to_owned(), 1)]);
        drop(dns);
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let later = ask(addr, "short.example.test").await;
        assert_eq!(later.response_code(), expected, "stale window {stale:?}");
        if expected == ResponseCode::NoError {
            assert_eq!(a_records(&later), [("192.0.2.77".to_owned(), 30)]);
        }
    }
}

/// A UDP relay in front of `upstream` that holds each query `delay` and counts them.
async fn slow_relay(upstream: SocketAddr, delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = socket.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            counted.fetch_add(1, Ordering::SeqCst);
            let packet = buf[..n].to_vec();
            let socket = socket.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let out = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                out.send_to(&packet, upstream).await.unwrap();
                let mut answer = vec![0u8; 4096];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(2), out.recv(&mut answer)).await
                {
                    let _ = socket.send_to(&answer[..n], from).await;
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn identical_questions_in_flight_make_one_upstream_query() {
    let dns = Unbound::start();
    let (relay, count) = slow_relay(dns.addr().parse().unwrap(), Duration::from_millis(300)).await;
    let (addr, _stop) = proxy(settings(relay)).await;
    let asked: Vec<_> = (0..50)
        .map(|_| tokio::spawn(async move { ask(addr, "example.test").await }))
        .collect();
    for answer in asked {
        let answer = answer.await.unwrap();
        assert_eq!(a_records(&answer)[0].0, "192.0.2.10");
    }
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "one upstream query for 50 askers"
    );
}

#[tokio::test]
async fn past_the_inflight_limit_the_answer_is_servfail_at_once() {
    let dns = Unbound::start();
    let (relay, upstream) = slow_relay(dns.addr().parse().unwrap(), Duration::from_secs(2)).await;
    let (addr, _stop) = proxy(Settings {
        max_inflight: 1,
        upstream_timeout: Duration::from_secs(5),
        ..settings(relay)
    })
    .await;
    let first = tokio::spawn(async move { ask(addr, "example.test").await });
    // The first question is upstream (the relay holds it for 2 s) before the second is asked.
    checkplane_testkit::eventually(
        "the first query upstream",
        Duration::from_secs(5),
        || async { (upstream.load(Ordering::SeqCst) == 1).then_some(()) },
    )
    .await;
    let second = ask(addr, "mail.example.test").await;
    assert_eq!(second.response_code(), ResponseCode::ServFail);
    assert!(
        !first.is_finished(),
        "answered at once, not queued behind the first"
    );
    assert_eq!(upstream.load(Ordering::SeqCst), 1, "never sent upstream");
    assert_eq!(first.await.unwrap().response_code(), ResponseCode::NoError);
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_nothing_and_the_proxy_serves_on() {
    let dns = Unbound::start();
    let (addr, _stop) = proxy(settings(dns.addr().parse().unwrap())).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(addr).await.unwrap();
    // Two questions: the header is readable, so FORMERR with its id.
    let mut two = query_packet(0x0707, "example.test", 1);
    two[5] = 2;
    socket.send(&two).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!((m.id(), m.response_code()), (0x0707, ResponseCode::FormErr));
    // Garbage of every length, truncated queries, a response, a pointer loop.
    let good = query_packet(1, "example.test", 1);
    let mut junk: Vec<Vec<u8>> = (0..good.len()).map(|cut| good[..cut].to_vec()).collect();
    junk.push(vec![0xff; 600]);
    junk.push({
        let mut loop_ = good.clone();
        loop_[12] = 0xc0;
        loop_[13] = 12;
        loop_
    });
    junk.push({
        let mut response = good.clone();
        response[2] |= 0x80;
        response
    });
    for packet in &junk {
        socket.send(packet).await.unwrap();
    }
    let out = dig(addr, &["example.test", "A"]).await;
    assert!(out.contains("192.0.2.10"), "still serving: {out}");
    // And over TCP: a frame of junk, then a good query on a new connection.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    stream.write_all(&[0, 5, 1, 2, 3, 4, 5]).await.unwrap();
    drop(stream);
    let out = dig(addr, &["+tcp", "example.test", "A"]).await;
    assert!(out.contains("192.0.2.10"), "still serving over TCP: {out}");
}
