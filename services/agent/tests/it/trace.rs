//! The trace executor through three real routers: five network namespaces of the test's own
//! (host, r1, r2, r3, target) joined by veth pairs, the routers forwarding; every hop must
//! answer with its own address. And loopback, which is one hop.

use std::time::Duration;

use agent::trace::Probe;

/// The trace, its result held to the schema the gateway enforces.
async fn check(
    target: &str,
    probe: Probe,
    timeout: Duration,
    allow: bool,
) -> agent::check::Outcome {
    let outcome = agent::trace::check(target, probe, timeout, allow).await;
    let trace = checkplane_wire::kinds::Kind::Trace;
    checkplane_wire::results::check(trace, outcome.outcome, &outcome.result)
        .unwrap_or_else(|why| panic!("{why}: {}", outcome.result));
    outcome
}
use checkplane_testkit::netns::{self, Netns};
use serde_json::Value;

/// host 10.201.1.2 — r1 (.1.1 | .2.1) — r2 (.2.2 | .3.1) — r3 (.3.2 | .4.1) — target .4.2
struct Chain {
    host: Netns,
    _routers: [Netns; 3],
    _target: Netns,
}

fn chain() -> Chain {
    let host = Netns::new("host");
    let r1 = Netns::new("r1");
    let r2 = Netns::new("r2");
    let r3 = Netns::new("r3");
    let target = Netns::new("target");
    host.link("h0", "10.201.1.2/24", &r1, "r1a", "10.201.1.1/24");
    r1.link("r1b", "10.201.2.1/24", &r2, "r2a", "10.201.2.2/24");
    r2.link("r2b", "10.201.3.1/24", &r3, "r3a", "10.201.3.2/24");
    r3.link("r3b", "10.201.4.1/24", &target, "t0", "10.201.4.2/24");
    for router in [&r1, &r2, &r3] {
        router.sysctl("net.ipv4.ip_forward", "1");
        router.sysctl("net.ipv4.icmp_ratelimit", "0");
    }
    host.ip(&["route", "add", "default", "via", "10.201.1.1"]);
    r1.ip(&["route", "add", "default", "via", "10.201.2.2"]);
    r2.ip(&["route", "add", "default", "via", "10.201.3.2"]);
    r2.ip(&["route", "add", "10.201.1.0/24", "via", "10.201.2.1"]);
    r3.ip(&["route", "add", "default", "via", "10.201.3.1"]);
    target.ip(&["route", "add", "default", "via", "10.201.4.1"]);
    target.sysctl("net.ipv4.icmp_ratelimit", "0");
    Chain {
        host,
        _routers: [r1, r2, r3],
        _target: target,
    }
}

fn trace_from(ns: &Netns, target: &'static str, probe: Probe) -> Value {
    let outcome = ns.run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(check(target, probe, Duration::from_secs(30), true))
    });
    assert_eq!(outcome.outcome.as_str(), "finished", "{}", outcome.result);
    outcome.result
}

#[test]
fn every_router_of_the_chain_is_a_hop_for_icmp_udp_and_tcp() {
    netns::require();
    let chain = chain();
    for (probe, name) in [
        (Probe::Icmp, "icmp"),
        (Probe::Udp(33434), "udp"),
        (Probe::Tcp(443), "tcp"),
    ] {
        let r = trace_from(&chain.host, "10.201.4.2", probe);
        assert_eq!(r["protocol"], name);
        assert_eq!(r["reached"], true, "{name}: {r}");
        let hops = r["hops"].as_array().unwrap();
        let addresses: Vec<&str> = hops
            .iter()
            .map(|h| h["address"].as_str().unwrap_or("*"))
            .collect();
        assert_eq!(
            addresses,
            ["10.201.1.1", "10.201.2.2", "10.201.3.2", "10.201.4.2"],
            "{name}: {r}"
        );
        for (i, hop) in hops.iter().enumerate() {
            assert_eq!(hop["ttl"], i as u64 + 1);
            let rtts = hop["rtts"].as_array().unwrap();
            assert_eq!(rtts.len(), agent::trace::PROBES, "{r}");
            assert!(
                rtts.iter()
                    .all(|t| t.as_f64().is_some_and(|t| t > 0.0 && t < 1000.0)),
                "{name}: hop {}: {r}",
                i + 1
            );
        }
    }
}

#[test]
fn loopback_is_one_hop_and_unreachable_targets_end_at_the_bound() {
    netns::require();
    let ns = Netns::new("lo");
    let r = trace_from(&ns, "127.0.0.1", Probe::Icmp);
    assert_eq!(r["reached"], true, "{r}");
    assert_eq!(r["hops"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["hops"][0]["address"], "127.0.0.1");

    // Nobody answers on the far side of this link: silent hops until the check's time is up.
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "v0"]);
    ns.ip(&["link", "set", "v0", "up"]);
    ns.ip(&["link", "set", "v1", "up"]);
    let started = std::time::Instant::now();
    let outcome = ns.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(check(
                "10.99.0.2",
                Probe::Udp(33434),
                Duration::from_millis(2500),
                true,
            ))
    });
    assert!(started.elapsed() < Duration::from_secs(4));
    let r = outcome.result;
    assert_eq!(r["reached"], false, "{r}");
    let hops = r["hops"].as_array().unwrap();
    assert!((2..=3).contains(&hops.len()), "{r}");
    assert!(
        hops.iter()
            .all(|h| h["address"].is_null() && h["rtts"][0].is_null()),
        "{r}"
    );
}
