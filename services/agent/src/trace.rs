//! The `trace` check: probes with growing TTL (ICMP echo, UDP datagrams, or TCP SYNs), each
//! answered by the router where its TTL ran out (ICMP time exceeded) or by the target (echo
//! reply, port unreachable, SYN-ACK or RST). [`PROBES`] probes per hop, sent together; a hop
//! waits [`HOP_WAIT`] for them; it stops at the target or after [`MAX_HOPS`].
//!
//! The answers arrive on a raw ICMP socket (the quoted packet inside an ICMP error says which
//! probe it answers), so trace needs root or `CAP_NET_RAW`; without, it is `ERR_UNSUPPORTED`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use checkplane_wire::checks::options;
use serde_json::{json, Value};

use crate::check::{allowed, ms, resolve, Outcome};
use crate::icmp::{echo_reply, echo_request, IcmpSocket, Kind};

/// Probes per hop.
pub const PROBES: usize = 3;
/// The most hops looked at.
pub const MAX_HOPS: u8 = 30;
/// How long one hop's probes wait for their answers.
pub const HOP_WAIT: Duration = Duration::from_secs(1);

/// How a trace probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Icmp,
    Udp(u16),
    Tcp(u16),
}

impl Probe {
    /// From a task's options (as the gateway validated them).
    pub fn from_options(options: &options::Trace) -> Self {
        match options.protocol.as_str() {
            "udp" => Self::Udp(options.port.unwrap_or(33434)),
            "tcp" => Self::Tcp(options.port.unwrap_or(80)),
            _ => Self::Icmp,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Icmp => "icmp",
            Self::Udp(_) => "udp",
            Self::Tcp(_) => "tcp",
        }
    }
}

/// What an ICMP message says about a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A router: the probe's TTL ran out there.
    TimeExceeded,
    /// The target (echo reply; port unreachable for UDP).
    Reached,
    /// Someone said the target cannot be reached (other unreachable codes).
    Unreachable,
}

/// What identifies a probe in an answer: the echo's (ident, seq), or the transport's
/// (source port, destination port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key(u16, u16);

/// Read an ICMP message: which probe it answers and how.
fn parse(v6: bool, icmp: &[u8], probe: Probe) -> Option<(Key, Answer)> {
    if probe == Probe::Icmp {
        if let Some((id, seq)) = echo_reply(v6, icmp) {
            return Some((Key(id, seq), Answer::Reached));
        }
    }
    let (ty, code) = (*icmp.first()?, *icmp.get(1)?);
    let answer = match (v6, ty, code) {
        (false, 11, _) | (true, 3, _) => Answer::TimeExceeded,
        (false, 3, 3) | (true, 1, 4) => Answer::Reached,
        (false, 3, _) | (true, 1, _) => Answer::Unreachable,
        _ => return None,
    };
    // The quoted packet: its IP header, then the first bytes of what it carried.
    let inner = icmp.get(8..)?;
    let (protocol, rest) = if v6 {
        (*inner.get(6)?, inner.get(40..)?)
    } else {
        let header = usize::from(inner.first()? & 0x0f) * 4;
        (*inner.get(9)?, inner.get(header..)?)
    };
    let word = |i: usize| Some(u16::from_be_bytes([*rest.get(i)?, *rest.get(i + 1)?]));
    let key = match (probe, protocol) {
        (Probe::Icmp, 1 | 58) => {
            let echo = if v6 { 128 } else { 8 };
            if *rest.first()? != echo {
                return None;
            }
            Key(word(4)?, word(6)?)
        }
        (Probe::Udp(_), 17) | (Probe::Tcp(_), 6) => Key(word(0)?, word(2)?),
        _ => return None,
    };
    // An echo probe reaching the target is answered by a reply, never port unreachable.
    let answer = match (probe, answer) {
        (Probe::Icmp, Answer::Reached) => Answer::Unreachable,
        (_, a) => a,
    };
    Some((key, answer))
}

/// One probe sent: its hop, its place among the hop's probes, when.
struct Sent {
    hop: usize,
    index: usize,
    at: Instant,
}

/// Trace the way to `target` within `timeout`.
pub async fn check(target: &str, probe: Probe, timeout: Duration, allow_private: bool) -> Outcome {
    let started = Instant::now();
    let deadline = started + timeout;
    let (addrs, _) = match resolve(target, 0, timeout).await {
        Ok(found) => found,
        Err(failed) => return failed,
    };
    let addr = match allowed(&addrs, allow_private) {
        Ok(addr) => addr.ip(),
        Err(refused) => return refused,
    };
    let icmp = match IcmpSocket::open(addr, &[Kind::Raw]) {
        Ok(socket) => socket,
        Err(why) => return Outcome::failed("ERR_UNSUPPORTED", why.0, json!({})),
    };
    let v6 = addr.is_ipv6();
    let ident = u16::from_be_bytes(
        uuid::Uuid::new_v4().as_bytes()[..2]
            .try_into()
            .unwrap_or([0, 1]),
    );
    // UDP probes leave from one socket; each goes to its own port.
    let udp = match probe {
        Probe::Udp(_) => {
            let any: SocketAddr = if v6 {
                SocketAddr::from(([0u16; 8], 0))
            } else {
                SocketAddr::from(([0u8; 4], 0))
            };
            match tokio::net::UdpSocket::bind(any).await {
                Ok(s) => Some(s),
                Err(e) => {
                    return Outcome::failed("ERR_SEND", format!("UDP socket: {e}"), json!({}))
                }
            }
        }
        _ => None,
    };

    let mut hops: Vec<Value> = Vec::new();
    let mut reached = false;
    let mut seq: u16 = 0;
    for ttl in 1..=MAX_HOPS {
        if Instant::now() >= deadline {
            break;
        }
        let hop = usize::from(ttl - 1);
        let mut rtts: Vec<Option<Duration>> = vec![None; PROBES];
        let mut from: Vec<Option<IpAddr>> = vec![None; PROBES];
        let mut waiting: HashMap<Key, Sent> = HashMap::new();
        let mut connects = tokio::task::JoinSet::new();
        for index in 0..PROBES {
            seq = seq.wrapping_add(1);
            let at = Instant::now();
            let sent = match probe {
                Probe::Icmp => {
                    let request = echo_request(v6, ident, seq, &[0x5a; 32]);
                    let set = icmp.set_ttl(u32::from(ttl));
                    match set {
                        Ok(()) => icmp.send_to(request, addr).await.map(|()| Key(ident, seq)),
                        Err(e) => Err(e),
                    }
                }
                Probe::Udp(port) => {
                    let socket = udp.as_ref().map(|s| (s, s.local_addr()));
                    match socket {
                        Some((s, Ok(local))) => {
                            let dport = port.wrapping_add(seq);
                            let ttl_set = if v6 {
                                socket2::SockRef::from(s).set_unicast_hops_v6(u32::from(ttl))
                            } else {
                                s.set_ttl(u32::from(ttl))
                            };
                            match ttl_set {
                                Ok(()) => s
                                    .send_to(
                                        b"checkplane trace probe",
                                        SocketAddr::new(addr, dport),
                                    )
                                    .await
                                    .map(|_| Key(local.port(), dport)),
                                Err(e) => Err(e),
                            }
                        }
                        _ => Err(std::io::Error::other("no UDP socket")),
                    }
                }
                Probe::Tcp(port) => tcp_probe(addr, port, ttl, &mut connects, index),
            };
            match sent {
                Ok(key) => {
                    waiting.insert(key, Sent { hop, index, at });
                }
                Err(e) => tracing::debug!(error = %e, ttl, "trace probe not sent"),
            }
        }
        let hop_deadline = (Instant::now() + HOP_WAIT).min(deadline);
        let mut answered = 0;
        while answered < waiting.len() {
            tokio::select! {
                _ = tokio::time::sleep_until(hop_deadline.into()) => break,
                got = icmp.recv() => {
                    let Ok(got) = got else { continue };
                    let Some((key, answer)) = parse(v6, &got.icmp, probe) else { continue };
                    let Some(sent) = waiting.get(&key) else { continue };
                    if sent.hop != hop || rtts[sent.index].is_some() {
                        continue;
                    }
                    // An echo reply must come from the target itself.
                    if answer == Answer::Reached && got.from != addr {
                        continue;
                    }
                    rtts[sent.index] = Some(sent.at.elapsed());
                    from[sent.index] = Some(got.from);
                    answered += 1;
                    if matches!(answer, Answer::Reached | Answer::Unreachable) {
                        reached |= answer == Answer::Reached;
                    }
                }
                Some(done) = connects.join_next(), if !connects.is_empty() => {
                    // A TCP probe's SYN reached the target: accepted or refused.
                    if let Ok((index, Some(rtt))) = done {
                        if rtts[index].is_none() {
                            rtts[index] = Some(rtt);
                            from[index] = Some(addr);
                            answered += 1;
                            reached = true;
                        }
                    }
                }
            }
        }
        connects.abort_all();
        let address = from.iter().flatten().next().copied();
        let mut entry = json!({
            "ttl": ttl,
            "address": address.map(|a| a.to_string()),
            "rtts": rtts.iter().map(|r| r.map(ms)).collect::<Vec<_>>(),
        });
        let mut others: Vec<String> = from
            .iter()
            .flatten()
            .filter(|a| Some(**a) != address)
            .map(ToString::to_string)
            .collect();
        others.dedup();
        if !others.is_empty() {
            entry["other_addresses"] = json!(others);
        }
        hops.push(entry);
        if reached || from.iter().flatten().any(|a| *a == addr) {
            reached = true;
            break;
        }
    }
    let mut result = json!({
        "address": addr.to_string(),
        "protocol": probe.name(),
        "hops": hops,
        "reached": reached,
        "timings": {"total": ms(started.elapsed())},
    });
    if let Probe::Udp(port) | Probe::Tcp(port) = probe {
        result["port"] = json!(port);
    }
    Outcome {
        outcome: crate::check::Ended::Finished,
        result,
    }
}

/// Start one TCP probe (a connect with TTL `ttl`): its key, the attempt joining `connects`
/// with its round trip if the target answered (SYN-ACK or RST).
fn tcp_probe(
    addr: IpAddr,
    port: u16,
    ttl: u8,
    connects: &mut tokio::task::JoinSet<(usize, Option<Duration>)>,
    index: usize,
) -> std::io::Result<Key> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    let any: SocketAddr = if addr.is_ipv6() {
        SocketAddr::from(([0u16; 8], 0))
    } else {
        SocketAddr::from(([0u8; 4], 0))
    };
    socket.bind(any)?;
    let sock = socket2::SockRef::from(&socket);
    if addr.is_ipv6() {
        sock.set_unicast_hops_v6(u32::from(ttl))?;
    } else {
        sock.set_ttl_v4(u32::from(ttl))?;
    }
    let local = socket.local_addr()?.port();
    let at = Instant::now();
    connects.spawn(async move {
        match socket.connect(SocketAddr::new(addr, port)).await {
            Ok(_) => (index, Some(at.elapsed())),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                (index, Some(at.elapsed()))
            }
            Err(_) => (index, None),
        }
    });
    Ok(Key(local, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_header(protocol: u8) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 60, 0, 0, 0, 0, 1, protocol, 0, 0];
        h.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        h
    }

    #[test]
    fn time_exceeded_quoting_each_kind_of_probe_is_matched() {
        // Quoting an echo request (ident 7, seq 3).
        let mut m = vec![11, 0, 0, 0, 0, 0, 0, 0];
        m.extend(ipv4_header(1));
        m.extend(echo_request(false, 7, 3, b"abcd"));
        assert_eq!(
            parse(false, &m, Probe::Icmp),
            Some((Key(7, 3), Answer::TimeExceeded))
        );
        // Quoting a UDP datagram 40000 -> 33435; port unreachable from the target.
        let mut m = vec![3, 3, 0, 0, 0, 0, 0, 0];
        m.extend(ipv4_header(17));
        m.extend([0x9c, 0x40, 0x82, 0x9b, 0, 8, 0, 0]);
        assert_eq!(
            parse(false, &m, Probe::Udp(33434)),
            Some((Key(40000, 33435), Answer::Reached))
        );
        // The same message does not answer a TCP probe.
        assert_eq!(parse(false, &m, Probe::Tcp(80)), None);
    }

    #[test]
    fn truncated_and_foreign_messages_are_ignored() {
        let mut m = vec![11, 0, 0, 0, 0, 0, 0, 0];
        m.extend(ipv4_header(17));
        for cut in 0..m.len() {
            assert_eq!(parse(false, &m[..cut], Probe::Udp(1)), None, "cut at {cut}");
        }
        assert_eq!(parse(false, &[5, 0, 0, 0], Probe::Icmp), None);
        assert_eq!(parse(false, &[], Probe::Icmp), None);
    }
}
