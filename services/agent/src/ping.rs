//! The `ping` check: `packets` ICMP echo requests, [`INTERVAL`] apart, each reply timed and
//! its TTL kept; a request unanswered [`REPLY_WAIT`] after the last one was sent is lost.
//! Any number of replies, none included, is a measurement (`finished`); no socket is
//! `ERR_UNSUPPORTED` with the reason.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::check::{allowed, ms, resolve, Outcome};
use crate::icmp::{echo_reply, echo_request, IcmpSocket, Kind};

/// Between two requests.
pub const INTERVAL: Duration = Duration::from_millis(500);
/// How long the last request may wait for its reply.
pub const REPLY_WAIT: Duration = Duration::from_secs(2);

/// Ping `target` `packets` times within `timeout`, with the first socket kind of `kinds`
/// the kernel allows.
pub async fn check(
    target: &str,
    packets: u16,
    timeout: Duration,
    allow_private: bool,
    kinds: &[Kind],
) -> Outcome {
    let started = Instant::now();
    let deadline = started + timeout;
    let (addrs, dns) = match resolve(target, 0, timeout).await {
        Ok(found) => found,
        Err(failed) => return failed,
    };
    let addr = match allowed(&addrs, allow_private) {
        Ok(addr) => addr.ip(),
        Err(refused) => return refused,
    };
    let socket = match IcmpSocket::open(addr, kinds) {
        Ok(socket) => socket,
        Err(why) => return Outcome::failed("ERR_UNSUPPORTED", why.0, json!({})),
    };
    if let Err(e) = socket.bind_any() {
        return Outcome::failed(
            "ERR_UNSUPPORTED",
            format!("binding the ICMP socket: {e}"),
            json!({}),
        );
    }
    let v6 = addr.is_ipv6();
    let token = *uuid::Uuid::new_v4().as_bytes();
    let ident = socket.ident(u16::from_be_bytes([token[0], token[1]]));
    let mut payload = token.to_vec();
    payload.resize(56, 0x5a);

    let packets = packets.max(1);
    let mut sent: HashMap<u16, Instant> = HashMap::new();
    let mut replies: Vec<(u16, Duration, Option<u8>)> = Vec::new();
    let mut next_seq: u16 = 1;
    let mut next_send = Instant::now();
    let mut send_error = None;
    loop {
        let all_sent = next_seq > packets;
        if all_sent && replies.len() == sent.len() {
            break;
        }
        // Waiting ends at the next send, else REPLY_WAIT after the last one.
        let wake = if all_sent {
            sent.values()
                .max()
                .map_or(Instant::now(), |t| *t + REPLY_WAIT)
        } else {
            next_send
        }
        .min(deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {
                if wake >= deadline || all_sent {
                    break;
                }
                let request = echo_request(v6, ident, next_seq, &payload);
                match socket.send_to(request, addr).await {
                    Ok(()) => {
                        sent.insert(next_seq, Instant::now());
                    }
                    Err(e) => send_error = Some(e.to_string()),
                }
                next_seq += 1;
                next_send += INTERVAL;
            }
            got = socket.recv() => {
                let Ok(got) = got else { continue };
                let Some((id, seq)) = echo_reply(v6, &got.icmp) else { continue };
                // A raw socket sees every echo reply of the host: ours carry our token.
                let ours = id == ident && got.from == addr
                    && got.icmp.get(8..24) == Some(&token[..]);
                if !ours || replies.iter().any(|r| r.0 == seq) {
                    continue;
                }
                if let Some(at) = sent.get(&seq) {
                    replies.push((seq, at.elapsed(), got.ttl));
                }
            }
        }
    }
    replies.sort_by_key(|r| r.0);
    let rtts: Vec<f64> = replies.iter().map(|r| ms(r.1)).collect();
    let transmitted = sent.len();
    let received = replies.len();
    let loss = if transmitted == 0 {
        100.0
    } else {
        ((transmitted - received) as f64 * 1e5 / transmitted as f64).round() / 1e3
    };
    let (min, avg, max) = if rtts.is_empty() {
        (None, None, None)
    } else {
        let sum: f64 = rtts.iter().sum();
        (
            rtts.iter().copied().reduce(f64::min),
            Some((sum / rtts.len() as f64 * 1e3).round() / 1e3),
            rtts.iter().copied().reduce(f64::max),
        )
    };
    let mut result = json!({
        "address": addr.to_string(),
        "socket": socket.kind.name(),
        "timings": replies.iter().map(|(seq, rtt, ttl)| json!({"seq": seq, "rtt": ms(*rtt), "ttl": ttl})).collect::<Vec<_>>(),
        "stats": {"min": min, "avg": avg, "max": max, "loss": loss,
                  "sent": transmitted, "received": received},
        "dns": ms(dns),
        "total": ms(started.elapsed()),
    });
    if let Some(error) = send_error {
        result["send_error"] = json!(error);
    }
    if transmitted == 0 {
        return Outcome::failed(
            "ERR_SEND",
            format!(
                "no echo request could be sent to {addr}: {}",
                result["send_error"].as_str().unwrap_or("deadline")
            ),
            json!({"dns": ms(dns)}),
        );
    }
    Outcome {
        outcome: crate::check::Ended::Finished,
        result,
    }
}
