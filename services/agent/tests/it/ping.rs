//! The ping executor on loopback with the sockets the kernel allows: raw (the tests run as
//! root), and unprivileged datagram sockets inside a network namespace of the test's own
//! whose `net.ipv4.ping_group_range` allows them, or forbids them.

use std::time::Duration;

use agent::icmp::Kind;

/// The ping, its result held to the schema the gateway enforces.
async fn check(
    target: &str,
    packets: u16,
    timeout: Duration,
    allow: bool,
    kinds: &[Kind],
) -> agent::check::Outcome {
    let outcome = agent::ping::check(target, packets, timeout, allow, kinds).await;
    let ping = checkplane_wire::kinds::Kind::Ping;
    checkplane_wire::results::check(ping, outcome.outcome, &outcome.result)
        .unwrap_or_else(|why| panic!("{why}: {}", outcome.result));
    outcome
}
use checkplane_testkit::netns::{self, Netns};
use serde_json::Value;

const T: Duration = Duration::from_secs(10);

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn assert_all_answered(r: &Value, packets: u64, ttl: u64) {
    assert_eq!(r["stats"]["sent"], packets, "{r}");
    assert_eq!(r["stats"]["received"], packets, "{r}");
    assert_eq!(r["stats"]["loss"], 0.0, "{r}");
    let replies = r["timings"].as_array().unwrap();
    assert_eq!(replies.len() as u64, packets);
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply["seq"], i as u64 + 1, "{r}");
        assert_eq!(reply["ttl"], ttl, "{r}");
        let rtt = reply["rtt"].as_f64().unwrap();
        assert!(rtt > 0.0 && rtt < 1000.0, "{r}");
    }
    let (min, avg, max) = (
        r["stats"]["min"].as_f64().unwrap(),
        r["stats"]["avg"].as_f64().unwrap(),
        r["stats"]["max"].as_f64().unwrap(),
    );
    assert!(min <= avg && avg <= max, "{r}");
}

#[tokio::test]
async fn raw_sockets_ping_loopback_v4_and_v6() {
    assert!(
        is_root(),
        "raw ICMP sockets need root (or CAP_NET_RAW): run the suite as root (./stand test)"
    );
    let outcome = check("127.0.0.1", 3, T, true, &[Kind::Raw]).await;
    assert_eq!(outcome.outcome.as_str(), "finished", "{}", outcome.result);
    assert_eq!(outcome.result["socket"], "raw");
    assert_eq!(outcome.result["address"], "127.0.0.1");
    assert_all_answered(&outcome.result, 3, 64);

    let outcome = check("::1", 2, T, true, &[Kind::Raw]).await;
    assert_eq!(outcome.outcome.as_str(), "finished", "{}", outcome.result);
    assert_all_answered(&outcome.result, 2, 64);

    // Refused before a packet leaves unless loopback targets are allowed.
    let outcome = check("127.0.0.1", 1, T, false, &[Kind::Raw]).await;
    assert_eq!(outcome.result["error"]["code"], "ERR_TARGET_FORBIDDEN");
}

#[test]
fn datagram_sockets_where_ping_group_range_allows_them_and_a_clear_error_where_not() {
    netns::require();
    let allowed = Netns::new("ping");
    allowed.sysctl("net.ipv4.ping_group_range", "0 2147483647");
    let outcome = allowed.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(check("127.0.0.1", 2, T, true, &[Kind::Datagram]))
    });
    assert_eq!(outcome.outcome.as_str(), "finished", "{}", outcome.result);
    assert_eq!(outcome.result["socket"], "datagram");
    assert_all_answered(&outcome.result, 2, 64);

    // A host that never answers (nothing has its address on the other end of the link):
    // measured, all lost.
    allowed.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    allowed.ip(&["addr", "add", "10.99.0.1/24", "dev", "v0"]);
    allowed.ip(&["link", "set", "v0", "up"]);
    allowed.ip(&["link", "set", "v1", "up"]);
    let outcome = allowed.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(check("10.99.0.2", 2, T, true, &[Kind::Datagram]))
    });
    assert_eq!(outcome.outcome.as_str(), "finished", "{}", outcome.result);
    assert_eq!(outcome.result["stats"]["sent"], 2);
    assert_eq!(outcome.result["stats"]["received"], 0);
    assert_eq!(outcome.result["stats"]["loss"], 100.0);
    assert!(outcome.result["stats"]["avg"].is_null());

    let forbidden = Netns::new("noping");
    forbidden.sysctl("net.ipv4.ping_group_range", "1 0");
    let outcome = forbidden.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(check("127.0.0.1", 1, T, true, &[Kind::Datagram]))
    });
    assert_eq!(outcome.outcome.as_str(), "failed");
    assert_eq!(outcome.result["error"]["code"], "ERR_UNSUPPORTED");
    let message = outcome.result["error"]["message"].as_str().unwrap();
    assert!(message.contains("ping_group_range (1 0)"), "{message}");
}
