//! The dns executor against a real DNS server: Debian's unbound on loopback serving
//! `example.test` (see `checkplane_testkit::dns`).

use std::time::Duration;

use agent::dns::{check, Question};
use checkplane_testkit::dns::Unbound;
use checkplane_wire::kinds::Kind;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(3);

async fn ask(server: &str, name: &str, record: &str, protocol: &str) -> (String, Value) {
    let question = Question {
        name,
        record,
        protocol,
        resolver: Some(server),
    };
    let outcome = check(&question, T, true).await;
    checkplane_wire::results::check(Kind::Dns, outcome.outcome, &outcome.result)
        .unwrap_or_else(|why| panic!("{why}: {}", outcome.result));
    (outcome.outcome.as_str().to_owned(), outcome.result)
}

fn values(result: &Value) -> Vec<(String, String)> {
    result["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["type"].as_str().unwrap().to_owned(),
                a["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn answers_every_record_type_over_udp_and_tcp() {
    let dns = Unbound::start();
    let server = dns.addr();
    for protocol in ["udp", "tcp"] {
        let (outcome, r) = ask(&server, "example.test", "A", protocol).await;
        assert_eq!(outcome, "finished", "{r}");
        assert_eq!(r["rcode"], "NOERROR");
        assert_eq!(r["resolver"], server);
        assert_eq!(r["protocol"], protocol);
        assert_eq!(r["name"], "example.test.");
        assert_eq!(
            r["answers"],
            json!([{"name": "example.test.", "type": "A", "ttl": 300, "class": "IN",
                    "value": "192.0.2.10"}])
        );
        let total = r["timings"]["total"].as_f64().unwrap();
        assert!(total > 0.0 && total < 3000.0, "{r}");
    }
    for (name, record, expected) in [
        ("example.test", "AAAA", ("AAAA", "2001:db8::10")),
        ("example.test", "MX", ("MX", "10 mail.example.test.")),
        ("example.test", "TXT", ("TXT", "v=spf1 -all")),
        ("example.test", "NS", ("NS", "ns.example.test.")),
        ("www.example.test", "CNAME", ("CNAME", "example.test.")),
        (
            "_sip._tcp.example.test",
            "SRV",
            ("SRV", "10 5 5060 sip.example.test."),
        ),
        ("10.2.0.192.in-addr.arpa", "PTR", ("PTR", "example.test.")),
    ] {
        let (outcome, r) = ask(&server, name, record, "udp").await;
        assert_eq!(outcome, "finished", "{record}: {r}");
        assert_eq!(
            values(&r),
            vec![(expected.0.to_owned(), expected.1.to_owned())],
            "{record}: {r}"
        );
    }
    let (_, r) = ask(&server, "example.test", "SOA", "udp").await;
    let (kind, soa) = &values(&r)[0];
    assert_eq!(kind, "SOA");
    assert!(
        soa.starts_with("ns.example.test. hostmaster.example.test. 7 "),
        "{soa}"
    );
    let (_, r) = ask(&server, "example.test", "CAA", "udp").await;
    assert_eq!(values(&r)[0].0, "CAA", "{r}");
    assert!(values(&r)[0].1.contains("ca.example.test"), "{r}");
}

#[tokio::test]
async fn negative_answers_are_measurements_with_their_rcode() {
    let dns = Unbound::start();
    let (outcome, r) = ask(&dns.addr(), "nowhere.example.test", "A", "udp").await;
    assert_eq!(outcome, "finished", "{r}");
    assert_eq!(r["rcode"], "NXDOMAIN");
    assert_eq!(r["answers"], json!([]));
    // The name exists, the type does not: NOERROR without answers (NODATA).
    let (outcome, r) = ask(&dns.addr(), "mail.example.test", "AAAA", "udp").await;
    assert_eq!(outcome, "finished", "{r}");
    assert_eq!(r["rcode"], "NOERROR");
    assert_eq!(r["answers"], json!([]));
}

#[tokio::test]
async fn a_silent_resolver_times_out_and_a_closed_one_is_a_connect_error() {
    // Bound, never answering.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let question = Question {
        name: "example.test",
        record: "A",
        protocol: "udp",
        resolver: Some(&addr),
    };
    let started = std::time::Instant::now();
    let outcome = check(&question, Duration::from_millis(400), true).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(outcome.outcome.as_str(), "failed");
    assert_eq!(
        outcome.result["error"]["code"], "ERR_TIMEOUT",
        "{}",
        outcome.result
    );
    assert_eq!(outcome.result["resolver"], addr.as_str());
    assert!(outcome.result["timings"]["total"].as_f64().unwrap() >= 350.0);

    // Nothing listens over TCP there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let question = Question {
        protocol: "tcp",
        resolver: Some(&addr),
        ..question
    };
    let outcome = check(&question, T, true).await;
    assert_eq!(outcome.outcome.as_str(), "failed");
    assert_eq!(
        outcome.result["error"]["code"], "ERR_CONNECT",
        "{}",
        outcome.result
    );
}

#[tokio::test]
async fn a_private_resolver_is_refused_unless_allowed() {
    let dns = Unbound::start();
    let addr = dns.addr();
    let question = Question {
        name: "example.test",
        record: "A",
        protocol: "udp",
        resolver: Some(&addr),
    };
    let outcome = check(&question, T, false).await;
    assert_eq!(outcome.outcome.as_str(), "failed");
    assert_eq!(outcome.result["error"]["code"], "ERR_TARGET_FORBIDDEN");
    assert_eq!(check(&question, T, true).await.outcome.as_str(), "finished");
}
