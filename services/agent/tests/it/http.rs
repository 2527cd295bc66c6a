//! The http executor against real local servers: hyper (HTTP/1.1 and h2) on loopback, plain
//! and behind TLS with a self-signed certificate made for the test.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use agent::http::{check, roots, Request, BODY_CAP};
use checkplane_wire::kinds::Kind;
use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::Value;
use sha2::Digest;

const T: Duration = Duration::from_secs(5);

/// Every `x-probe` and `authorization` value the test servers of this process received (only
/// `x-probe` is echoed back).
static RECEIVED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

pub fn received(value: &str) -> bool {
    RECEIVED.lock().unwrap().iter().any(|v| v == value)
}

async fn answer(
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let echo = request
        .headers()
        .get("x-probe")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let authorization = request
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    RECEIVED
        .lock()
        .unwrap()
        .extend([Some(echo.clone()), authorization].into_iter().flatten());
    let version = format!("{:?}", request.version());
    let response = match request.uri().path() {
        "/" => hyper::Response::builder()
            .header("x-probe-echo", echo)
            .header("x-served-over", version)
            .body(Full::new(Bytes::from_static(b"hello"))),
        "/big" => hyper::Response::builder().body(Full::new(Bytes::from(vec![b'x'; 50_000]))),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            hyper::Response::builder().body(Full::new(Bytes::new()))
        }
        "/moved" => hyper::Response::builder()
            .status(301)
            .header("location", "/")
            .body(Full::new(Bytes::new())),
        _ => hyper::Response::builder()
            .status(404)
            .body(Full::new(Bytes::new())),
    };
    Ok(response.unwrap())
}

/// A server on loopback speaking HTTP/1.1 and h2 (by ALPN over TLS, by preface in the
/// clear); with `tls`, the certificate it presents. Its port.
pub async fn serve(tls: Option<rustls::ServerConfig>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            socket.set_nodelay(true).unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let service = hyper::service::service_fn(answer);
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(socket).await {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = builder.serve_connection(io, service).await;
                        }
                    }
                    None => {
                        let io = hyper_util::rt::TokioIo::new(socket);
                        let _ = builder.serve_connection(io, service).await;
                    }
                }
            });
        }
    });
    port
}

/// A self-signed certificate for `localhost` and 127.0.0.1: the server's configuration and
/// the certificate's DER.
fn self_signed() -> (rustls::ServerConfig, Vec<u8>) {
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "checkplane test server");
    params.not_before = rcgen::date_time_ymd(2026, 1, 2);
    params.not_after = rcgen::date_time_ymd(2036, 1, 2);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let der = cert.der().to_vec();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (config, der)
}

async fn get(url: &str, protocol: &str, timeout: Duration, allow: bool) -> (String, Value) {
    let request = Request {
        url,
        method: "GET",
        protocol,
        headers: vec![("x-probe", "42")],
        // Untrusted test certificates are measured with the header all the same.
        insecure: true,
    };
    let outcome = check(&request, timeout, allow, roots()).await;
    checkplane_wire::results::check(Kind::Http, outcome.outcome, &outcome.result)
        .unwrap_or_else(|why| panic!("{why}: {}", outcome.result));
    (outcome.outcome.as_str().to_owned(), outcome.result)
}

fn timing(result: &Value, step: &str) -> Option<f64> {
    result["timings"][step].as_f64()
}

#[tokio::test]
async fn plain_http_in_both_protocols_with_every_timing() {
    let port = serve(None).await;
    let url = format!("http://127.0.0.1:{port}/");
    for (protocol, version) in [("http1.1", "HTTP/1.1"), ("h2", "HTTP/2.0")] {
        let (outcome, r) = get(&url, protocol, T, true).await;
        assert_eq!(outcome, "finished", "{r}");
        assert_eq!(r["status"], 200);
        assert_eq!(r["http_version"], version, "{r}");
        assert_eq!(r["headers"]["x-served-over"], version, "{r}");
        // The check's own header reached the server.
        assert_eq!(r["headers"]["x-probe-echo"], "42");
        assert_eq!(r["body"], "hello");
        assert_eq!(r["truncated"], false);
        assert_eq!(r["address"], "127.0.0.1");
        assert_eq!(r["port"], port);
        assert!(r.get("tls").is_none());
        let total = timing(&r, "total").unwrap();
        for step in ["dns", "tcp", "first_byte", "download"] {
            let t = timing(&r, step).unwrap_or_else(|| panic!("{step}: {r}"));
            assert!(t >= 0.0 && t <= total, "{step}: {r}");
        }
        assert!(timing(&r, "tls").is_none());
    }

    let (_, r) = get(
        &format!("http://127.0.0.1:{port}/moved"),
        "http1.1",
        T,
        true,
    )
    .await;
    assert_eq!(
        r["status"], 301,
        "redirects are reported, not followed: {r}"
    );
    assert_eq!(r["headers"]["location"], "/");

    let head = Request {
        url: &url,
        method: "HEAD",
        protocol: "http1.1",
        headers: vec![],
        insecure: false,
    };
    let outcome = check(&head, T, true, roots()).await;
    assert_eq!(outcome.result["status"], 200);
    assert_eq!(outcome.result["body"], "");
}

#[tokio::test]
async fn headers_go_to_an_unverified_certificate_only_when_the_check_says_insecure() {
    let (config, _) = self_signed();
    let port = serve(Some(config)).await;
    let url = format!("https://localhost:{port}/");
    let secret = format!("secret-{}", uuid::Uuid::new_v4().simple());
    let request = |insecure: bool, headers| Request {
        url: &url,
        method: "GET",
        protocol: "http1.1",
        headers,
        insecure,
    };
    let held = |o: &agent::check::Outcome| {
        checkplane_wire::results::check(Kind::Http, o.outcome, &o.result)
            .unwrap_or_else(|why| panic!("{why}: {}", o.result));
    };

    let refused = check(
        &request(false, vec![("x-probe", &secret)]),
        T,
        true,
        roots(),
    )
    .await;
    held(&refused);
    assert_eq!(refused.outcome.as_str(), "failed", "{}", refused.result);
    assert_eq!(refused.result["error"]["code"], "ERR_TLS_UNVERIFIED");
    assert!(
        refused.result["error"]["message"]
            .as_str()
            .unwrap()
            .contains("options.insecure"),
        "{}",
        refused.result
    );
    // The certificate is still measured, and the request never left.
    assert_eq!(refused.result["tls"]["authorized"], false);
    assert!(refused.result["status"].is_null(), "{}", refused.result);
    assert!(!received(&secret), "the header reached the server");

    // Without headers there is nothing to keep back: measured as ever.
    let bare = check(&request(false, vec![]), T, true, roots()).await;
    held(&bare);
    assert_eq!(bare.result["status"], 200, "{}", bare.result);

    let insecure = check(&request(true, vec![("x-probe", &secret)]), T, true, roots()).await;
    held(&insecure);
    assert_eq!(insecure.result["status"], 200, "{}", insecure.result);
    assert!(received(&secret), "sent when the check says insecure");
}

#[tokio::test]
async fn https_reports_the_certificate_and_whether_it_is_trusted() {
    let (config, der) = self_signed();
    let port = serve(Some(config)).await;
    let fingerprint: Vec<String> = sha2::Sha256::digest(&der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    for (protocol, version) in [("http1.1", "HTTP/1.1"), ("h2", "HTTP/2.0")] {
        let (outcome, r) = get(&format!("https://localhost:{port}/"), protocol, T, true).await;
        assert_eq!(outcome, "finished", "{r}");
        assert_eq!(r["status"], 200);
        assert_eq!(r["http_version"], version, "{r}");
        let tls = &r["tls"];
        assert_eq!(tls["protocol"], "TLSv1_3", "{tls}");
        assert!(
            tls["cipher"].as_str().unwrap().starts_with("TLS13_"),
            "{tls}"
        );
        // Self-signed: measured, and said to be untrusted.
        assert_eq!(tls["authorized"], false, "{tls}");
        assert!(
            tls["authorization_error"]
                .as_str()
                .unwrap()
                .contains("UnknownIssuer"),
            "{tls}"
        );
        assert_eq!(tls["subject"], "CN=checkplane test server");
        assert_eq!(tls["issuer"], "CN=checkplane test server");
        assert_eq!(tls["valid_from"], "2026-01-02T00:00:00Z");
        assert_eq!(tls["valid_to"], "2036-01-02T00:00:00Z");
        assert_eq!(tls["fingerprint_sha256"], fingerprint.join(":"));
        assert_eq!(
            tls["alt_names"],
            serde_json::json!(["localhost", "127.0.0.1"])
        );
        let t = timing(&r, "tls").unwrap();
        assert!(t > 0.0 && t <= timing(&r, "total").unwrap(), "{r}");
    }
}

#[tokio::test]
async fn the_body_is_capped_and_a_slow_server_times_out_with_the_steps_it_reached() {
    let port = serve(None).await;
    let (outcome, r) = get(&format!("http://127.0.0.1:{port}/big"), "http1.1", T, true).await;
    assert_eq!(outcome, "finished");
    assert_eq!(r["truncated"], true);
    assert_eq!(r["body"].as_str().unwrap().len(), BODY_CAP);

    let started = std::time::Instant::now();
    let (outcome, r) = get(
        &format!("http://127.0.0.1:{port}/slow"),
        "http1.1",
        Duration::from_millis(500),
        true,
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(outcome, "failed");
    assert_eq!(r["error"]["code"], "ERR_TIMEOUT", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("first byte"),
        "{r}"
    );
    assert!(
        timing(&r, "tcp").is_some() && timing(&r, "first_byte").is_none(),
        "{r}"
    );
    assert!(timing(&r, "total").unwrap() >= 450.0, "{r}");
}

#[tokio::test]
async fn refused_and_forbidden_targets() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (outcome, r) = get(&format!("http://127.0.0.1:{port}/"), "http1.1", T, true).await;
    assert_eq!(outcome, "failed");
    assert_eq!(r["error"]["code"], "ERR_CONNECTION_REFUSED", "{r}");

    let open = serve(None).await;
    let (outcome, r) = get(&format!("http://localhost:{open}/"), "http1.1", T, false).await;
    assert_eq!(outcome, "failed");
    assert_eq!(r["error"]["code"], "ERR_TARGET_FORBIDDEN", "{r}");
}
