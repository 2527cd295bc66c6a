//! The caching DNS proxy in front of a real authoritative server (a private unbound serving
//! `example.test`), asked by `dig` and by raw packets; answers read back with hickory's
//! parser (not the proxy's own).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent::dns_proxy::{start, AllowFrom, Settings};
use checkplane_testkit::dns::Unbound;
use hickory_resolver::proto::op::{Message, ResponseCode};
use tokio_util::sync::CancellationToken;

fn settings(upstream: SocketAddr) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        allow_from: AllowFrom::loopback(),
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

#[tokio::test]
async fn waiters_joining_a_question_in_flight_count_against_the_limit() {
    let dns = Unbound::start();
    let (relay, upstream) = slow_relay(dns.addr().parse().unwrap(), Duration::from_secs(2)).await;
    let (addr, _stop) = proxy(Settings {
        max_inflight: 2,
        upstream_timeout: Duration::from_secs(5),
        ..settings(relay)
    })
    .await;
    let first = tokio::spawn(async move { ask(addr, "example.test").await });
    checkplane_testkit::eventually(
        "the first query upstream",
        Duration::from_secs(5),
        || async { (upstream.load(Ordering::SeqCst) == 1).then_some(()) },
    )
    .await;
    // Three more of the same question: one joins (the second place), two find none.
    let more: Vec<_> = (0..3)
        .map(|_| tokio::spawn(async move { ask(addr, "example.test").await }))
        .collect();
    checkplane_testkit::eventually("two answered at once", Duration::from_secs(1), || async {
        (more.iter().filter(|t| t.is_finished()).count() == 2).then_some(())
    })
    .await;
    let mut codes = Vec::new();
    for task in more {
        codes.push(task.await.unwrap().response_code());
    }
    codes.sort_by_key(|c| u16::from(*c));
    assert_eq!(
        codes,
        [
            ResponseCode::NoError,
            ResponseCode::ServFail,
            ResponseCode::ServFail
        ]
    );
    assert_eq!(first.await.unwrap().response_code(), ResponseCode::NoError);
    assert_eq!(upstream.load(Ordering::SeqCst), 1, "one question upstream");
}

/// A UDP relay in front of `upstream` that keeps every packet it forwards.
async fn recording_relay(
    upstream: SocketAddr,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let socket = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = socket.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let packet = buf[..n].to_vec();
            kept.lock().unwrap().push(packet.clone());
            let out = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            out.send_to(&packet, upstream).await.unwrap();
            let mut answer = vec![0u8; 4096];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_secs(2), out.recv(&mut answer)).await
            {
                let _ = socket.send_to(&answer[..n], from).await;
            }
        }
    });
    (addr, seen)
}

/// `query_packet` with an OPT record (UDP size 1232, DO) carrying a client subnet (ECS,
/// option 8: 198.51.100.0/24) and a client cookie (option 10).
fn query_with_options(id: u16, name: &str) -> Vec<u8> {
    let mut p = query_packet(id, name, 1);
    p[11] = 1; // ARCOUNT
    let ecs = [0u8, 8, 0, 7, 0, 1, 24, 0, 198, 51, 100];
    let cookie = [0u8, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8];
    let rdlen = (ecs.len() + cookie.len()) as u16;
    p.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0]);
    p.extend_from_slice(&rdlen.to_be_bytes());
    p.extend_from_slice(&ecs);
    p.extend_from_slice(&cookie);
    p
}

#[tokio::test]
async fn a_clients_edns_options_never_go_upstream() {
    let dns = Unbound::start();
    let (relay, seen) = recording_relay(dns.addr().parse().unwrap()).await;
    let (addr, _stop) = proxy(settings(relay)).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(addr).await.unwrap();
    let sent = query_with_options(0x5151, "example.test");
    socket.send(&sent).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let answer = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(a_records(&answer)[0].0, "192.0.2.10");
    let upstream = seen.lock().unwrap().clone();
    assert_eq!(upstream.len(), 1);
    let forwarded = Message::from_vec(&upstream[0]).unwrap();
    let edns = forwarded
        .extensions()
        .as_ref()
        .expect("the OPT record goes along");
    assert_eq!(edns.max_payload(), 1232, "the client's UDP size");
    assert!(edns.flags().dnssec_ok, "and its DO bit");
    assert_eq!(edns.options().as_ref().len(), 0, "but none of its options");
    // Byte for byte: the question as sent, the OPT record with RDLENGTH 0.
    let question_end = sent.len() - 11 - 23;
    assert_eq!(upstream[0][2..question_end], sent[2..question_end]);
    assert_eq!(upstream[0].len(), question_end + 11);
}

#[tokio::test]
async fn clients_outside_allow_from_get_nothing() {
    let dns = Unbound::start();
    let (addr, _stop) = proxy(Settings {
        // Documentation addresses only: loopback is not among them.
        allow_from: AllowFrom::parse("192.0.2.0/24, 2001:db8::/32").unwrap(),
        ..settings(dns.addr().parse().unwrap())
    })
    .await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(addr).await.unwrap();
    socket
        .send(&query_packet(7, "example.test", 1))
        .await
        .unwrap();
    let mut buf = vec![0u8; 512];
    let silent = tokio::time::timeout(Duration::from_millis(700), socket.recv(&mut buf)).await;
    assert!(silent.is_err(), "a denied client gets no answer over UDP");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let packet = query_packet(8, "example.test", 1);
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&packet);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.write_all(&framed).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut got)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed at once over TCP: {read:?} {got:?}"
    );
    // The same proxy with loopback allowed answers.
    let (open, _stop) = proxy(Settings {
        allow_from: AllowFrom::parse("127.0.0.1/32").unwrap(),
        ..settings(dns.addr().parse().unwrap())
    })
    .await;
    assert_eq!(
        a_records(&ask(open, "example.test").await)[0].0,
        "192.0.2.10"
    );
}

/// One TCP question from a socket bound to `source`: the answer's rcode, or `None` when the
/// connection was closed first.
async fn ask_tcp_from(source: std::net::IpAddr, proxy: SocketAddr) -> Option<ResponseCode> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut stream = socket.connect(proxy).await.ok()?;
    let packet = query_packet(9, "example.test", 1);
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&packet);
    stream.write_all(&framed).await.ok()?;
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut len))
        .await
        .ok()?
        .ok()?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await.ok()?;
    Some(Message::from_vec(&answer).ok()?.response_code())
}

#[tokio::test]
async fn one_client_holding_idle_tcp_connections_does_not_shut_out_the_others() {
    let dns = Unbound::start();
    let (addr, _stop) = proxy(settings(dns.addr().parse().unwrap())).await;
    // A client on 127.0.0.1 opens connections and says nothing on them.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Its share is 16: one more of its questions finds its connection closed.
    let one = "127.0.0.1".parse().unwrap();
    assert_eq!(ask_tcp_from(one, addr).await, None);
    // Another client (127.0.0.2 is loopback too) is answered over TCP.
    let other = "127.0.0.2".parse().unwrap();
    assert_eq!(ask_tcp_from(other, addr).await, Some(ResponseCode::NoError));
    drop(idle);
    // Its connections closed, the first client has its share back.
    checkplane_testkit::eventually(
        "the first client answered again",
        Duration::from_secs(5),
        || async { (ask_tcp_from(one, addr).await == Some(ResponseCode::NoError)).then_some(()) },
    )
    .await;
}
