//! The `http` check: one request, each step timed on its own — name resolution, TCP connect,
//! TLS handshake, the response's head (first byte), the body (download) — over a connection
//! made here (so every step is seen and the address reached is checked, as for tcp).
//!
//! Redirects are reported, not followed. The body is kept up to [`BODY_CAP`] (`truncated`
//! says when there was more); headers are bounded too. For https the certificate is checked
//! against the Mozilla roots but the answer is measured either way: `tls.authorized` and
//! `tls.authorization_error` say what the check found, beside the certificate's subject,
//! issuer, validity and SHA-256 fingerprint.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use checkplane_wire::checks::options;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{json, Map, Value};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant as Deadline;

use crate::check::{allowed, ms, resolve, Outcome};

/// The most of a body kept (bytes).
pub const BODY_CAP: usize = 10 * 1024;
/// The most response headers kept, and the longest value.
const MAX_HEADERS: usize = 100;
const MAX_HEADER_VALUE: usize = 2048;

/// What one http check asks.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub url: &'a str,
    pub method: &'a str,
    /// `http1.1` or `h2` (offered over TLS by ALPN; prior knowledge over plain http).
    pub protocol: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    /// Send `headers` over TLS even to a server whose certificate failed verification.
    pub insecure: bool,
}

impl<'a> Request<'a> {
    /// Read a task's target and options (as the gateway validated them).
    pub fn from_spec(target: &'a str, options: &'a options::Http) -> Self {
        Self {
            url: target,
            method: &options.method,
            protocol: &options.protocol,
            headers: options
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect(),
            insecure: options.insecure,
        }
    }
}

/// The Mozilla roots, built once.
pub fn roots() -> Arc<rustls::RootCertStore> {
    Arc::new(rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    })
}

/// Timings so far, in ms.
#[derive(Default)]
struct Timings(Map<String, Value>);

impl Timings {
    fn put(&mut self, step: &str, d: Duration) {
        self.0.insert(step.to_owned(), json!(ms(d)));
    }
    fn value(&self) -> Value {
        Value::Object(self.0.clone())
    }
}

/// A failure: its code, message, and what was known by then.
struct Failed {
    code: &'static str,
    message: String,
}

fn failed(code: &'static str, message: impl Into<String>) -> Failed {
    Failed {
        code,
        message: message.into(),
    }
}

/// Run `step` before `deadline`, or fail as a timeout of `what`.
async fn before<T>(
    deadline: Deadline,
    what: &str,
    step: impl std::future::Future<Output = T>,
) -> Result<T, Failed> {
    tokio::time::timeout_at(deadline, step)
        .await
        .map_err(|_| failed("ERR_TIMEOUT", format!("timed out during {what}")))
}

/// Run the request within `timeout`.
pub async fn check(
    request: &Request<'_>,
    timeout: Duration,
    allow_private: bool,
    roots: Arc<rustls::RootCertStore>,
) -> Outcome {
    let started = Instant::now();
    let mut timings = Timings::default();
    let mut result = json!({});
    let run = run(
        request,
        Deadline::now() + timeout,
        allow_private,
        roots,
        &mut timings,
        &mut result,
    )
    .await;
    timings.put("total", started.elapsed());
    match run {
        Ok(()) => {
            result["timings"] = timings.value();
            Outcome {
                outcome: crate::check::Ended::Finished,
                result,
            }
        }
        Err(f) => {
            let mut out = Outcome::failed(f.code, f.message, timings.value());
            if let (Value::Object(known), Value::Object(into)) = (result, &mut out.result) {
                for (k, v) in known {
                    into.entry(k).or_insert(v);
                }
            }
            out
        }
    }
}

async fn run(
    request: &Request<'_>,
    deadline: Deadline,
    allow_private: bool,
    roots: Arc<rustls::RootCertStore>,
    timings: &mut Timings,
    result: &mut Value,
) -> Result<(), Failed> {
    let url = url::Url::parse(request.url)
        .map_err(|e| failed("ERR_BAD_SPEC", format!("not a URL: {e}")))?;
    let tls = match url.scheme() {
        "https" => true,
        "http" => false,
        other => return Err(failed("ERR_BAD_SPEC", format!("scheme {other}"))),
    };
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_owned(),
        Some(url::Host::Ipv4(v4)) => v4.to_string(),
        Some(url::Host::Ipv6(v6)) => v6.to_string(),
        None => return Err(failed("ERR_BAD_SPEC", "the URL has no host")),
    };
    let port = url
        .port_or_known_default()
        .unwrap_or(if tls { 443 } else { 80 });

    let left = deadline.saturating_duration_since(Deadline::now());
    let (addrs, dns) = resolve(&host, port, left)
        .await
        .map_err(|o| failed(code_of(&o), message_of(&o)))?;
    timings.put("dns", dns);
    let addr = allowed(&addrs, allow_private).map_err(|o| failed(code_of(&o), message_of(&o)))?;
    result["address"] = json!(addr.ip().to_string());
    result["port"] = json!(port);

    let connecting = Instant::now();
    let stream = before(deadline, "connect", tokio::net::TcpStream::connect(addr))
        .await?
        .map_err(|e| {
            let code = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "ERR_CONNECTION_REFUSED",
                _ => "ERR_CONNECT",
            };
            failed(code, format!("connecting to {addr}: {e}"))
        })?;
    timings.put("tcp", connecting.elapsed());
    if let Ok(peer) = stream.peer_addr() {
        if let (Some(why), false) = (
            checkplane_wire::targets::forbidden_ip(peer.ip()),
            allow_private,
        ) {
            return Err(failed(
                "ERR_TARGET_FORBIDDEN",
                format!("{} is {why}", peer.ip()),
            ));
        }
    }
    let _ = stream.set_nodelay(true);

    let want_h2 = request.protocol == "h2";
    if tls {
        let verdict = Arc::new(Mutex::new(None));
        let config = tls_config(roots, verdict.clone(), want_h2)?;
        let name = ServerName::try_from(host.clone())
            .map_err(|e| failed("ERR_BAD_SPEC", format!("TLS server name {host}: {e}")))?;
        let handshaking = Instant::now();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let stream = before(
            deadline,
            "the TLS handshake",
            connector.connect(name, stream),
        )
        .await?
        .map_err(|e| failed("ERR_TLS", format!("TLS handshake: {e}")))?;
        timings.put("tls", handshaking.elapsed());
        let (_, session) = stream.get_ref();
        let h2 = session.alpn_protocol() == Some(b"h2");
        // A poisoned lock still holds the verdict: never read it as "verified".
        let refused = verdict.lock().unwrap_or_else(|p| p.into_inner()).clone();
        result["tls"] = tls_details(session, refused.clone());
        // An untrusted certificate is measured, but the check's headers (credentials, often)
        // go only to a server that proved who it is, unless the check says otherwise.
        if let (Some(why), false, false) = (refused, request.headers.is_empty(), request.insecure) {
            return Err(failed(
                "ERR_TLS_UNVERIFIED",
                format!(
                    "the certificate failed verification ({why}): the check's headers are sent \
                     only to a verified server, or with options.insecure: true"
                ),
            ));
        }
        exchange(stream, h2, request, &url, deadline, timings, result).await
    } else {
        exchange(stream, want_h2, request, &url, deadline, timings, result).await
    }
}

fn code_of(o: &Outcome) -> &'static str {
    match o.result["error"]["code"].as_str() {
        Some("ERR_TIMEOUT") => "ERR_TIMEOUT",
        Some("ERR_TARGET_FORBIDDEN") => "ERR_TARGET_FORBIDDEN",
        _ => "ERR_DNS",
    }
}

fn message_of(o: &Outcome) -> String {
    o.result["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Send the request over `io` (HTTP/1.1 or h2) and read the answer.
#[allow(clippy::too_many_arguments)]
async fn exchange<IO>(
    io: IO,
    h2: bool,
    request: &Request<'_>,
    url: &url::Url,
    deadline: Deadline,
    timings: &mut Timings,
    result: &mut Value,
) -> Result<(), Failed>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(io);
    let authority = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    };
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let mut builder = hyper::Request::builder().method(request.method);
    builder = if h2 {
        builder.uri(url.as_str())
    } else {
        builder
            .uri(path.as_str())
            .header("host", authority.as_str())
    };
    builder = builder.header(
        "user-agent",
        concat!("checkplane-agent/", env!("CARGO_PKG_VERSION")),
    );
    for (name, value) in &request.headers {
        builder = builder.header(*name, *value);
    }
    let message = builder
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed("ERR_BAD_SPEC", format!("the request: {e}")))?;

    let sent = Instant::now();
    // The connection's driver: it lives as long as this check (and is aborted with it, so a
    // stalled server cannot keep it).
    let _driver;
    let response = if h2 {
        let (mut sender, conn) = before(
            deadline,
            "the HTTP/2 handshake",
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io),
        )
        .await?
        .map_err(|e| failed("ERR_HTTP", format!("HTTP/2 handshake: {e}")))?;
        _driver = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
        before(
            deadline,
            "the wait for the first byte",
            sender.send_request(message),
        )
        .await?
    } else {
        let (mut sender, conn) = before(
            deadline,
            "the HTTP/1.1 handshake",
            hyper::client::conn::http1::handshake(io),
        )
        .await?
        .map_err(|e| failed("ERR_HTTP", format!("HTTP/1.1 handshake: {e}")))?;
        _driver = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
        before(
            deadline,
            "the wait for the first byte",
            sender.send_request(message),
        )
        .await?
    }
    .map_err(|e| failed("ERR_HTTP", format!("the response: {e}")))?;
    timings.put("first_byte", sent.elapsed());

    result["status"] = json!(response.status().as_u16());
    result["http_version"] = json!(format!("{:?}", response.version()));
    let mut headers = Map::new();
    for (name, value) in response.headers().iter() {
        if headers.len() >= MAX_HEADERS && !headers.contains_key(name.as_str()) {
            continue;
        }
        let text: String = String::from_utf8_lossy(value.as_bytes())
            .chars()
            .take(MAX_HEADER_VALUE)
            .collect();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(seen)) if seen.len() < MAX_HEADER_VALUE => {
                seen.push_str(", ");
                seen.push_str(&text);
            }
            Some(_) => {}
            None => {
                headers.insert(name.as_str().to_owned(), json!(text));
            }
        }
    }
    result["headers"] = Value::Object(headers);

    let downloading = Instant::now();
    let mut body = response.into_body();
    let mut kept: Vec<u8> = Vec::new();
    let mut size: u64 = 0;
    let mut truncated = false;
    loop {
        let frame = match before(deadline, "the download", body.frame()).await {
            Ok(frame) => frame,
            Err(f) => {
                // What arrived so far is still what the check saw.
                timings.put("download", downloading.elapsed());
                put_body(result, &kept, size, truncated);
                return Err(f);
            }
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| failed("ERR_HTTP", format!("the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            size += data.len() as u64;
            let room = BODY_CAP - kept.len();
            kept.extend_from_slice(&data[..data.len().min(room)]);
            if data.len() > room {
                // Enough: the rest is not read (nor timed).
                truncated = true;
                break;
            }
        }
    }
    timings.put("download", downloading.elapsed());
    put_body(result, &kept, size, truncated);
    Ok(())
}

fn put_body(result: &mut Value, kept: &[u8], size: u64, truncated: bool) {
    result["body"] = json!(String::from_utf8_lossy(kept));
    result["body_bytes"] = json!(size);
    result["truncated"] = json!(truncated);
}

/// A verifier that checks like rustls's own but lets the handshake go on, keeping what it
/// found: the check reports an invalid certificate, it does not stop at it.
#[derive(Debug)]
struct Recording {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    verdict: Arc<Mutex<Option<String>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Err(e) =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            if let Ok(mut verdict) = self.verdict.lock() {
                *verdict = Some(e.to_string());
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn tls_config(
    roots: Arc<rustls::RootCertStore>,
    verdict: Arc<Mutex<Option<String>>>,
    want_h2: bool,
) -> Result<rustls::ClientConfig, Failed> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| failed("ERR_TLS", format!("certificate verifier: {e}")))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| failed("ERR_TLS", format!("TLS versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recording { inner, verdict }))
        .with_no_client_auth();
    config.alpn_protocols = if want_h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(config)
}

fn rfc3339(seconds: i64) -> Value {
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(Value::Null, Value::String)
}

/// Protocol, cipher, and the leaf certificate's details.
fn tls_details(session: &rustls::ClientConnection, refused: Option<String>) -> Value {
    let mut tls = json!({
        "protocol": session.protocol_version().map(|v| format!("{v:?}")),
        "cipher": session.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())),
        "alpn": session.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
        "authorized": refused.is_none(),
        "authorization_error": refused,
    });
    let Some(leaf) = session.peer_certificates().and_then(|c| c.first()) else {
        return tls;
    };
    let fingerprint: Vec<String> = sha2::Sha256::digest(leaf.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    tls["fingerprint_sha256"] = json!(fingerprint.join(":"));
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) {
        tls["subject"] = json!(cert.subject().to_string());
        tls["issuer"] = json!(cert.issuer().to_string());
        tls["serial"] = json!(cert.raw_serial_as_string());
        tls["valid_from"] = rfc3339(cert.validity().not_before.timestamp());
        tls["valid_to"] = rfc3339(cert.validity().not_after.timestamp());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            let names: Vec<String> = san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                    x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                        4 => Some(
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).ok()?).to_string(),
                        ),
                        16 => Some(
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).ok()?).to_string(),
                        ),
                        _ => None,
                    },
                    _ => None,
                })
                .collect();
            tls["alt_names"] = json!(names);
        }
    }
    tls
}
