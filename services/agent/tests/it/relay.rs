//! The relay's settle against a real HAProxy.

use checkplane_haproxy::socket::Endpoint;
use checkplane_testkit::haproxy::Haproxy;
use serde_json::json;

/// Two settles of one server to one state at once (an action's attempt and its retry, both in
/// the agent's stream) send one `set server` between them: the second reads what the first
/// set. Without the per-server lock both read the old state and both set it.
#[tokio::test(flavor = "multi_thread")]
async fn two_settles_of_one_server_at_once_send_one_set() {
    let ha = Haproxy::start(&[("be", vec![("s1", 18201), ("s2", 18202)])]);
    let endpoint = Endpoint::parse(&ha.admin_socket.display().to_string());
    let deadline = checkplane_runtime::clock::now_ms() + 30_000;
    for (round, state) in ["drain", "ready", "maint", "ready", "drain"]
        .iter()
        .enumerate()
    {
        let spec = json!({"instance_id": "hpi-1", "deadline_ms": deadline,
                          "settle": {"backend": "be", "server": "s1", "state": state}});
        let (a, b) = tokio::join!(
            agent::relay::execute(&endpoint, &spec),
            agent::relay::execute(&endpoint, &spec)
        );
        let sets = [&a, &b]
            .iter()
            .filter(|o| !o.result["replies"][1].is_null())
            .count();
        assert_eq!(a.outcome.as_str(), "finished", "{}", a.result);
        assert_eq!(b.outcome.as_str(), "finished", "{}", b.result);
        assert_eq!(
            sets, 1,
            "round {round} ({state}): {} / {}",
            a.result, b.result
        );
    }
    assert!(ha.command("show servers state be").contains(" s1 "));
}
