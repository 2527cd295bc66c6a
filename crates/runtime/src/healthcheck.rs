//! `<service> healthcheck`: ask the running service's `/healthz` on this host and say what it
//! said in one line, with the exit code systemd timers, Docker's `HEALTHCHECK` and monitoring
//! scripts read: 0 OK, 1 DEGRADED (serving, needs attention), 2 DOWN (not serving, or not
//! answering). The service's own configuration says where it listens and whether over TLS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use checkplane_wire::health::HealthReport;
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::settings::BaseSettings;

/// Exit codes of `healthcheck`.
pub const OK: u8 = 0;
pub const DEGRADED: u8 = 1;
pub const DOWN: u8 = 2;

/// The largest `/healthz` body read.
const MAX_BODY: usize = 64 * 1024;

/// What the service said, or why it could not be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Answered(HealthReport),
    NotAnswering(String),
}

impl Verdict {
    /// The exit code and the line to print.
    pub fn outcome(&self, service: &str) -> (u8, String) {
        match self {
            Self::NotAnswering(why) => (DOWN, format!("{service}: DOWN: {why}")),
            Self::Answered(report) => {
                let reasons = report.reasons.join("; ");
                match report.status.as_str() {
                    "ok" => (OK, format!("{service}: OK")),
                    "degraded" => (DEGRADED, format!("{service}: DEGRADED: {reasons}")),
                    "down" => (DOWN, format!("{service}: DOWN: {reasons}")),
                    other => (DOWN, format!("{service}: DOWN: unknown status {other:?}")),
                }
            }
        }
    }
}

/// The command: ask, print one line, exit with its code.
pub async fn run(base: &BaseSettings, tls: bool) -> ExitCode {
    let bound = base.ready_timeout * 2 + Duration::from_secs(3);
    let mut verdict = ask(base.listen, tls, bound).await;
    // A wildcard IPv6 listener also takes IPv4 (where the host has no IPv6 loopback).
    if matches!(verdict, Verdict::NotAnswering(_)) && base.listen.ip() == Ipv6Addr::UNSPECIFIED {
        let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), base.listen.port());
        verdict = ask(v4, tls, bound).await;
    }
    // Another service answering on that port is not this one.
    if let Verdict::Answered(report) = &verdict {
        if report.service != base.service {
            verdict = Verdict::NotAnswering(format!(
                "{} answers on {}, not {}",
                report.service,
                local(base.listen),
                base.service
            ));
        }
    }
    let (code, line) = verdict.outcome(base.service);
    println!("{line}");
    ExitCode::from(code)
}

/// Where a service listening on `listen` is asked from its own host.
fn local(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port())
        }
        _ => listen,
    }
}

/// GET `/healthz` of the service at `listen`, within `bound`.
pub async fn ask(listen: SocketAddr, tls: bool, bound: Duration) -> Verdict {
    let addr = local(listen);
    match tokio::time::timeout(bound, get(addr, tls)).await {
        Ok(Ok(verdict)) => verdict,
        Ok(Err(why)) => Verdict::NotAnswering(format!("not answering at {addr}: {why}")),
        Err(_) => Verdict::NotAnswering(format!(
            "not answering at {addr}: no answer within {bound:?}"
        )),
    }
}

/// Why the service could not be asked.
#[derive(Debug, thiserror::Error)]
enum Unasked {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Request(#[from] hyper::http::Error),
    #[error("{0}")]
    Body(#[from] Box<dyn std::error::Error + Send + Sync>),
    #[error("/healthz answered {0} without a health report")]
    NoReport(hyper::StatusCode),
}

async fn get(addr: SocketAddr, tls: bool) -> Result<Verdict, Unasked> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    if tls {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config()?));
        let name = ServerName::IpAddress(addr.ip().into());
        let stream = connector.connect(name, tcp).await?;
        exchange(TokioIo::new(stream), addr).await
    } else {
        exchange(TokioIo::new(tcp), addr).await
    }
}

async fn exchange<T>(io: T, addr: SocketAddr) -> Result<Verdict, Unasked>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    // The connection's driver ends when the exchange below is done and `sender` drops (the
    // command exits right after).
    // detached: one request's connection, in a command that exits when it is answered.
    tokio::spawn(connection);
    let request = hyper::Request::get("/healthz")
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "checkplane-healthcheck")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await?
        .to_bytes();
    serde_json::from_slice::<HealthReport>(&body)
        .map(Verdict::Answered)
        .map_err(|_| Unasked::NoReport(status))
}

/// TLS to the service's own listener on this host: whatever certificate it holds is accepted
/// (its signature over the handshake still checked). What answers on the service's own
/// address is the question here, not whose certificate it has; the CA may be one this host
/// does not trust.
fn tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(OwnListener(provider)))
            .with_no_client_auth(),
    )
}

#[derive(Debug)]
struct OwnListener(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for OwnListener {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(status: &str, reasons: &[&str]) -> Verdict {
        Verdict::Answered(HealthReport {
            status: status.to_owned(),
            service: "gateway".to_owned(),
            reasons: reasons.iter().map(|r| (*r).to_owned()).collect(),
        })
    }

    #[test]
    fn each_verdict_has_its_code_and_one_line() {
        assert_eq!(
            report("ok", &[]).outcome("gateway"),
            (0, "gateway: OK".to_owned())
        );
        assert_eq!(
            report("degraded", &["a", "b"]).outcome("gateway"),
            (1, "gateway: DEGRADED: a; b".to_owned())
        );
        assert_eq!(
            report("down", &["redis: timed out"]).outcome("gateway"),
            (2, "gateway: DOWN: redis: timed out".to_owned())
        );
        assert_eq!(report("weird", &[]).outcome("gateway").0, 2);
        assert_eq!(
            Verdict::NotAnswering("refused".into()).outcome("agent"),
            (2, "agent: DOWN: refused".to_owned())
        );
    }

    #[test]
    fn a_wildcard_listen_is_asked_on_loopback() {
        assert_eq!(
            local("0.0.0.0:8080".parse().unwrap()),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            local("[::]:8080".parse().unwrap()),
            "[::1]:8080".parse().unwrap()
        );
        assert_eq!(
            local("10.0.0.5:8080".parse().unwrap()),
            "10.0.0.5:8080".parse().unwrap()
        );
    }
}
