//! The gateway terminating TLS itself: a client trusting its CA gets through, one trusting
//! another CA or speaking plain HTTP does not, and a certificate replaced on disk is served
//! without a restart (a half-written one is not).

use std::time::Duration;

use checkplane_runtime::Env;
use checkplane_testkit::servers::scratch_dir;
use checkplane_testkit::tls::Ca;
use checkplane_testkit::{eventually, store_env, Running, TestDb, TestRedis};

/// A client trusting `ca` only.
fn trusting(ca: &Ca) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap()])
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_serves_tls_and_a_renewed_certificate_without_a_restart() {
    let dir = scratch_dir("gateway-tls");
    let (first, second) = (Ca::new("first CA"), Ca::new("second CA"));
    let (cert, key) = first.write_server(&dir, "gateway");
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let mut env = store_env(&db, &redis);
    env.extend([
        (
            "GATEWAY_TLS_CERT_FILE".to_owned(),
            cert.display().to_string(),
        ),
        ("GATEWAY_TLS_KEY_FILE".to_owned(), key.display().to_string()),
        ("GATEWAY_TLS_RELOAD_INTERVAL".to_owned(), "100ms".to_owned()),
    ]);
    let config = gateway::load(&mut Env::from_pairs(env)).unwrap();
    let gw = Running::start(|l, s| gateway::run(config, l, s)).await;
    let url = format!("https://127.0.0.1:{}/readyz", gw.addr.port());
    let status = |client: reqwest::Client| {
        let url = url.clone();
        async move { client.get(&url).send().await.map(|r| r.status().as_u16()) }
    };
    eventually("ready over TLS", Duration::from_secs(10), || async {
        (status(trusting(&first)).await.ok() == Some(200)).then_some(())
    })
    .await;

    // Another CA's client, and plain HTTP, get nowhere.
    let refused = status(trusting(&second)).await.unwrap_err();
    assert!(refused.is_connect(), "{refused:?}");
    let plain = reqwest::Client::new()
        .get(gw.url("/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");

    // The certificate is renewed (by the second CA) in place: served without a restart.
    second.write_server(&dir, "gateway renewed");
    eventually(
        "the renewed certificate served",
        Duration::from_secs(10),
        || async { (status(trusting(&second)).await.ok() == Some(200)).then_some(()) },
    )
    .await;
    assert!(status(trusting(&first)).await.is_err());

    // A certificate file that does not read (half-written): the renewed one stays.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    let metrics = format!("https://127.0.0.1:{}/metrics", gw.addr.port());
    eventually(
        "the failed reload counted",
        Duration::from_secs(10),
        || async {
            let text = trusting(&second)
                .get(&metrics)
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (checkplane_testkit::metric_in(&text, "checkplane_tls_reload_failures_total") >= 1.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(status(trusting(&second)).await.ok(), Some(200));
    gw.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_certificate_without_its_key_or_that_does_not_read_stops_the_start() {
    let dir = scratch_dir("gateway-tls-bad");
    let ca = Ca::new("a CA");
    let (cert, key) = ca.write_server(&dir, "gateway");
    let (other_cert, _) = Ca::new("another").write_server(&scratch_dir("gateway-tls-other"), "x");
    let load = |pairs: &[(&str, String)]| {
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), "postgres://u@127.0.0.1:1/db".into()),
            ("REDIS_URL".into(), "redis://127.0.0.1:1/".into()),
        ];
        env.extend(pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        gateway::load(&mut Env::from_pairs(env)).map(|_| ())
    };
    let cert_s = cert.display().to_string();
    let key_s = key.display().to_string();
    assert!(load(&[
        ("GATEWAY_TLS_CERT_FILE", cert_s.clone()),
        ("GATEWAY_TLS_KEY_FILE", key_s.clone())
    ])
    .is_ok());
    for (pairs, var) in [
        (
            vec![("GATEWAY_TLS_CERT_FILE", cert_s.clone())],
            "GATEWAY_TLS_KEY_FILE",
        ),
        (
            vec![("GATEWAY_TLS_KEY_FILE", key_s.clone())],
            "GATEWAY_TLS_CERT_FILE",
        ),
        (
            vec![
                ("GATEWAY_TLS_CERT_FILE", "/nonexistent.crt".to_owned()),
                ("GATEWAY_TLS_KEY_FILE", key_s.clone()),
            ],
            "GATEWAY_TLS_CERT_FILE",
        ),
        (
            vec![
                ("GATEWAY_TLS_CERT_FILE", cert_s.clone()),
                ("GATEWAY_TLS_KEY_FILE", "/nonexistent.key".to_owned()),
            ],
            "GATEWAY_TLS_KEY_FILE",
        ),
        // The key of another certificate.
        (
            vec![
                ("GATEWAY_TLS_CERT_FILE", other_cert.display().to_string()),
                ("GATEWAY_TLS_KEY_FILE", key_s.clone()),
            ],
            "GATEWAY_TLS_CERT_FILE",
        ),
        // A key where the certificate should be.
        (
            vec![
                ("GATEWAY_TLS_CERT_FILE", key_s.clone()),
                ("GATEWAY_TLS_KEY_FILE", key_s.clone()),
            ],
            "GATEWAY_TLS_CERT_FILE",
        ),
    ] {
        let error = load(&pairs).unwrap_err();
        assert_eq!(error.var, var, "{pairs:?}: {error}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
