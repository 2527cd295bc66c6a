//! The `tcp` check: resolve the target, refuse forbidden addresses (after resolution, so a
//! name that resolves to a private address is caught: DNS rebinding), connect, time each step.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::check::{allowed, ms, resolve, Outcome};

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
                outcome: crate::check::Ended::Finished,
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
