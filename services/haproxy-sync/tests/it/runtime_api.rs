//! The Runtime API client against Debian's real HAProxy, started privately per test: reading
//! state, changing it and reading it back over TCP and the unix socket, HAProxy's own errors
//! (final), an operator-level socket, a stopped and a frozen HAProxy (retryable), a reload.

use std::time::Duration;

use checkplane_testkit::haproxy::Haproxy;
use checkplane_wire::haproxy::ServerState as Target;
use haproxy_sync::runtime_api::{ApiError, Client, Direct, Endpoint};

fn backends() -> Vec<(&'static str, Vec<(&'static str, u16)>)> {
    vec![
        ("be_app", vec![("s1", 18101), ("s2", 18102)]),
        ("be_other", vec![("o1", 18201)]),
    ]
}

fn client(endpoint: Endpoint) -> Client {
    Client::new(Box::new(Direct {
        endpoint,
        connect_timeout: Duration::from_millis(500),
        read_timeout: Duration::from_millis(800),
        allowed: std::sync::Arc::new(
            checkplane_wire::haproxy::AllowedAddresses::parse("127.0.0.0/8,/tmp").unwrap(),
        ),
    }))
}

#[tokio::test]
async fn state_is_read_changed_and_read_back_over_tcp_and_unix() {
    let ha = Haproxy::start(&backends());
    for api in [
        client(Endpoint::Tcp(ha.stats.to_string())),
        client(Endpoint::Unix(ha.admin_socket.clone())),
    ] {
        let info = api.show_info().await.unwrap();
        assert!(info.pid().is_some() && !info.stopping(), "{info:?}");
        assert!(info.get("Version").unwrap().starts_with("2."));
        let servers = api.show_servers_state(None).await.unwrap();
        let names: Vec<(&str, &str)> = servers
            .iter()
            .map(|s| (s.backend.as_str(), s.server.as_str()))
            .collect();
        assert_eq!(
            names,
            [("be_app", "s1"), ("be_app", "s2"), ("be_other", "o1")]
        );
        assert_eq!(servers[0].port, Some(18101));

        for (target, admin, status) in [
            (Target::Drain, 8, "DRAIN"),
            (Target::Maint, 1, "MAINT"),
            (Target::Ready, 0, ""),
        ] {
            api.set_state("be_app", "s1", target).await.unwrap();
            // Repeating it is harmless.
            api.set_state("be_app", "s1", target).await.unwrap();
            let s1 = api.server("be_app", "s1").await.unwrap();
            assert_eq!(s1.admin_state.0, admin, "{target:?}");
            assert_eq!(s1.admin_state.name(), target.as_str());
            let stat = api.show_stat().await.unwrap();
            let row = stat
                .iter()
                .find(|r| r.proxy() == "be_app" && r.name() == "s1")
                .unwrap();
            if !status.is_empty() {
                assert_eq!(row.status(), Some(status), "{row:?}");
            }
            assert_eq!(row.scur(), Some(0));
        }
        // The other server never moved.
        assert_eq!(api.server("be_app", "s2").await.unwrap().admin_state.0, 0);
    }
}

#[tokio::test]
async fn haproxys_own_errors_are_final_and_name_the_problem() {
    let ha = Haproxy::start(&backends());
    let api = client(Endpoint::Tcp(ha.stats.to_string()));
    let err = api
        .set_state("be_app", "s9", Target::Drain)
        .await
        .unwrap_err();
    assert_eq!(err, ApiError::Refused("No such server.".into()));
    assert!(!err.retryable());
    let err = api
        .set_state("be_nope", "s1", Target::Drain)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ApiError::Refused(m) if m.contains("No such")),
        "{err:?}"
    );
    // A name that would smuggle a second command never reaches HAProxy.
    let err = api
        .set_state("be_app", "s1; shutdown", Target::Maint)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Refused(_)));
    // An operator-level socket may read but not change: a configuration error, said so.
    let operator = client(Endpoint::Unix(ha.operator_socket.clone()));
    assert_eq!(operator.show_servers_state(None).await.unwrap().len(), 3);
    let err = operator
        .set_state("be_app", "s1", Target::Drain)
        .await
        .unwrap_err();
    assert_eq!(err, ApiError::Refused("Permission denied".into()));
}

#[tokio::test]
async fn a_stopped_or_frozen_haproxy_is_unreachable_and_retryable() {
    let mut ha = Haproxy::start(&backends());
    let api = client(Endpoint::Tcp(ha.stats.to_string()));
    ha.freeze();
    let started = std::time::Instant::now();
    let err = api.show_info().await.unwrap_err();
    assert!(err.retryable(), "{err:?}");
    // Bounded by the timeouts (1.3 s here), not hanging; generous, the machine may be busy.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "bounded by the timeouts"
    );
    ha.thaw();
    assert!(api.show_info().await.is_ok());
    ha.kill();
    // Refused, or (a process still on its way out) reset: unreachable either way.
    let err = api.show_servers_state(None).await.unwrap_err();
    assert!(matches!(&err, ApiError::Unreachable(_)), "{err:?}");
    assert!(err.retryable());
}

#[tokio::test]
async fn a_reload_through_the_master_cli_shows_a_new_pid_and_the_new_configuration() {
    let ha = Haproxy::start(&backends());
    let api = client(Endpoint::Tcp(ha.stats.to_string()));
    let before = api.show_info().await.unwrap();
    api.set_state("be_app", "s1", Target::Drain).await.unwrap();
    ha.reload(&[("be_app", vec![("s1", 18101)])]);
    let after = api.show_info().await.unwrap();
    assert_ne!(after.pid(), before.pid());
    let servers = api.show_servers_state(None).await.unwrap();
    assert_eq!(servers.len(), 1, "s2 and be_other are gone: {servers:?}");
    // Runtime state does not survive a reload without a server-state file.
    assert_eq!(servers[0].admin_state.name(), "ready");
}
