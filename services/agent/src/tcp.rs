//! The `tcp` check: resolve the target, refuse forbidden addresses (after resolution, so a
//! name that resolves to a private address is caught: DNS rebinding), connect, time each step.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What a check reports: its outcome (`finished` or `failed`) and its typed result.
pub struct Outcome {
    pub outcome: &'static str,
    pub result: Value,
}

impl Outcome {
    /// A failed check with an error code and message, and whatever timings it got.
    pub fn failed(code: &str, message: impl Into<String>, timings: Value) -> Self {
        Self {
            outcome: "failed",
            result: json!({"error": {"code": code, "message": message.into()}, "timings": timings}),
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Resolve `host:port`: the addresses, and how long it took.
pub async fn resolve(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(Vec<SocketAddr>, Duration), Outcome> {
    let started = Instant::now();
    let looked = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await;
    let elapsed = started.elapsed();
    match looked {
        Err(_) => Err(Outcome::failed(
            "ERR_TIMEOUT",
            "name resolution timed out",
            json!({"dns": ms(elapsed)}),
        )),
        Ok(Err(e)) => Err(Outcome::failed(
            "ERR_DNS",
            format!("cannot resolve {host}: {e}"),
            json!({"dns": ms(elapsed)}),
        )),
        Ok(Ok(addrs)) => Ok((addrs.collect(), elapsed)),
    }
}

/// The first address that may be checked, or why none may.
pub fn allowed(addrs: &[SocketAddr], allow_private: bool) -> Result<SocketAddr, Outcome> {
    let mut refused = None;
    for addr in addrs {
        match checkplane_wire::targets::forbidden_ip(addr.ip()) {
            Some(why) if !allow_private => refused = Some((addr, why)),
            _ => return Ok(*addr),
        }
    }
    Err(match refused {
        Some((addr, why)) => Outcome::failed(
            "ERR_TARGET_FORBIDDEN",
            format!("{} is {why}", addr.ip()),
            json!({}),
        ),
        None => Outcome::failed("ERR_DNS", "no address", json!({})),
    })
}

/// Connect to `target` on `port` within `timeout`.
pub async fn check(target: &str, port: u16, timeout: Duration, allow_private: bool) -> Outcome {
    let started = Instant::now();
    let (addrs, dns) = match resolve(target, port, timeout).await {
        Ok(found) => found,
        Err(failed) => return failed,
    };
    let addr = match allowed(&addrs, allow_private) {
        Ok(addr) => addr,
        Err(refused) => return refused,
    };
    let left = timeout.saturating_sub(started.elapsed());
    let connecting = Instant::now();
    let connected = tokio::time::timeout(left, tokio::net::TcpStream::connect(addr)).await;
    let connect = connecting.elapsed();
    let timings = json!({"dns": ms(dns), "connect": ms(connect), "total": ms(started.elapsed())});
    match connected {
        Ok(Ok(stream)) => {
            // Checked again at connect: the address actually reached.
            if let Ok(peer) = stream.peer_addr() {
                if let (Some(why), false) = (
                    checkplane_wire::targets::forbidden_ip(peer.ip()),
                    allow_private,
                ) {
                    return Outcome::failed(
                        "ERR_TARGET_FORBIDDEN",
                        format!("{} is {why}", peer.ip()),
                        timings,
                    );
                }
            }
            Outcome {
                outcome: "finished",
                result: json!({"connected": true, "address": addr.ip().to_string(),
                               "port": port, "timings": timings}),
            }
        }
        Ok(Err(e)) => {
            let code = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "ERR_CONNECTION_REFUSED",
                _ => "ERR_CONNECT",
            };
            let mut failed =
                Outcome::failed(code, format!("connecting to {addr}: {e}"), timings.clone());
            failed.result["address"] = json!(addr.ip().to_string());
            failed
        }
        Err(_) => {
            let mut failed = Outcome::failed(
                "ERR_TIMEOUT",
                format!("no connection to {addr} within {} ms", timeout.as_millis()),
                timings,
            );
            failed.result["address"] = json!(addr.ip().to_string());
            failed
        }
    }
}
