//! ICMP sockets for `ping` and `trace`: raw when the process may (root or `CAP_NET_RAW`),
//! else the kernel's unprivileged ICMP datagram sockets where `net.ipv4.ping_group_range`
//! lets the process's group use them. Each reply carries its TTL (hop limit for IPv6),
//! read from the IP header or from the kernel's ancillary data.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::sys::socket::{self as nixsock, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;

/// Which kind of socket to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Raw,
    Datagram,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Datagram => "datagram",
        }
    }
}

/// An open ICMP socket for one address family (driven by tokio as a datagram socket: the
/// calls it makes, `sendto` and `recvmsg`, are the same for ICMP).
pub struct IcmpSocket {
    socket: tokio::net::UdpSocket,
    pub kind: Kind,
    v6: bool,
}

/// One ICMP message received.
#[derive(Debug, Clone)]
pub struct Received {
    pub from: IpAddr,
    /// The ICMP message (without the IPv4 header a raw socket delivers).
    pub icmp: Vec<u8>,
    pub ttl: Option<u8>,
}

/// Why no socket could be opened: every kind tried, with the kernel's answer.
#[derive(Debug)]
pub struct Unsupported(pub String);

impl IcmpSocket {
    /// Open the first kind of `kinds` the kernel allows, for `target`'s family.
    pub fn open(target: IpAddr, kinds: &[Kind]) -> Result<Self, Unsupported> {
        let v6 = target.is_ipv6();
        let mut why = Vec::new();
        for &kind in kinds {
            match Self::open_kind(v6, kind) {
                Ok(socket) => return Ok(socket),
                Err(e) => why.push(format!("{} socket: {e}", kind.name())),
            }
        }
        let gid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Gid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
            })
            .unwrap_or_else(|| "?".to_owned());
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range")
            .map(|r| r.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "?".to_owned());
        Err(Unsupported(format!(
            "no ICMP socket ({}); raw sockets need CAP_NET_RAW, datagram sockets need group {gid} inside net.ipv4.ping_group_range ({range})",
            why.join("; ")
        )))
    }

    fn open_kind(v6: bool, kind: Kind) -> io::Result<Self> {
        let (domain, protocol) = if v6 {
            (Domain::IPV6, Protocol::ICMPV6)
        } else {
            (Domain::IPV4, Protocol::ICMPV4)
        };
        let ty = match kind {
            Kind::Raw => Type::RAW,
            Kind::Datagram => Type::DGRAM,
        };
        let socket = Socket::new(domain, ty, Some(protocol))?;
        socket.set_nonblocking(true)?;
        if v6 {
            nixsock::setsockopt(&socket, sockopt::Ipv6RecvHopLimit, &true)?;
        } else {
            nixsock::setsockopt(&socket, sockopt::Ipv4RecvTtl, &true)?;
        }
        let socket = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(socket))?;
        Ok(Self { socket, kind, v6 })
    }

    /// The identifier echo requests carry: the kernel sets a datagram socket's own (its
    /// local port, once it has sent) and delivers it only that socket's replies.
    pub fn ident(&self, wanted: u16) -> u16 {
        match self.kind {
            Kind::Raw => wanted,
            Kind::Datagram => self.socket.local_addr().map_or(wanted, |a| a.port()),
        }
    }

    /// Bind a datagram socket (so its identifier is known before the first send).
    pub fn bind_any(&self) -> io::Result<()> {
        if self.kind == Kind::Raw {
            return Ok(());
        }
        let any: SocketAddr = if self.v6 {
            "[::]:0".parse().map_err(io::Error::other)?
        } else {
            "0.0.0.0:0".parse().map_err(io::Error::other)?
        };
        socket2::SockRef::from(&self.socket).bind(&any.into())
    }

    /// Set the TTL (hop limit) of what is sent next.
    pub fn set_ttl(&self, ttl: u32) -> io::Result<()> {
        let socket = socket2::SockRef::from(&self.socket);
        if self.v6 {
            socket.set_unicast_hops_v6(ttl)
        } else {
            socket.set_ttl_v4(ttl)
        }
    }

    /// Send one ICMP message (its checksum is filled in here for IPv4; the kernel does it
    /// for ICMPv6).
    pub async fn send_to(&self, mut message: Vec<u8>, to: IpAddr) -> io::Result<()> {
        if !self.v6 && message.len() >= 4 {
            message[2] = 0;
            message[3] = 0;
            let sum = checksum(&message);
            message[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        self.socket
            .send_to(&message, SocketAddr::new(to, 0))
            .await
            .map(|_| ())
    }

    /// The next ICMP message that arrives.
    pub async fn recv(&self) -> io::Result<Received> {
        loop {
            let fd = self.socket.as_raw_fd();
            let v6 = self.v6;
            let (from, mut data, mut ttl) = self
                .socket
                .async_io(Interest::READABLE, || recvmsg(fd, v6))
                .await?;
            // A raw IPv4 socket hands over the IP header too.
            if !self.v6 && self.kind == Kind::Raw && !data.is_empty() {
                let header = usize::from(data[0] & 0x0f) * 4;
                if data.len() < header {
                    continue;
                }
                ttl = ttl.or(data.get(8).copied());
                data.drain(..header);
            }
            return Ok(Received {
                from,
                icmp: data,
                ttl,
            });
        }
    }
}

/// recvmsg(2) with the TTL / hop limit from the ancillary data.
fn recvmsg(fd: std::os::fd::RawFd, v6: bool) -> io::Result<(IpAddr, Vec<u8>, Option<u8>)> {
    let mut buf = vec![0u8; 2048];
    let mut control = nix::cmsg_space!(i32);
    let (n, from, ttl) = {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = nixsock::recvmsg::<SockaddrStorage>(
            fd,
            &mut iov,
            Some(&mut control),
            MsgFlags::empty(),
        )?;
        let mut ttl = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                match c {
                    ControlMessageOwned::Ipv4Ttl(t) if !v6 => ttl = u8::try_from(t).ok(),
                    ControlMessageOwned::Ipv6HopLimit(t) if v6 => ttl = u8::try_from(t).ok(),
                    _ => {}
                }
            }
        }
        let from = msg.address.and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        });
        (msg.bytes, from, ttl)
    };
    let from = from.ok_or_else(|| io::Error::other("reply without a source address"))?;
    buf.truncate(n);
    Ok((from, buf, ttl))
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request: type 8 (IPv4) or 128 (IPv6), `ident`, `seq`, `payload`.
pub fn echo_request(v6: bool, ident: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    m.extend_from_slice(&ident.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    m
}

/// An echo reply's identifier and sequence, if `icmp` is one.
pub fn echo_reply(v6: bool, icmp: &[u8]) -> Option<(u16, u16)> {
    let reply = if v6 { 129 } else { 0 };
    if icmp.len() < 8 || icmp[0] != reply || icmp[1] != 0 {
        return None;
    }
    Some((
        u16::from_be_bytes([icmp[4], icmp[5]]),
        u16::from_be_bytes([icmp[6], icmp[7]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_rfc_1071_example_and_a_request_that_sums_to_zero() {
        // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2, checksum 220d.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
        let mut m = echo_request(false, 0x1234, 7, b"abc");
        let sum = checksum(&m);
        m[2..4].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(checksum(&m), 0);
    }

    #[test]
    fn replies_are_recognised_by_type_ident_and_seq() {
        let mut reply = echo_request(false, 9, 3, b"x");
        reply[0] = 0;
        assert_eq!(echo_reply(false, &reply), Some((9, 3)));
        assert_eq!(echo_reply(true, &reply), None);
        assert_eq!(echo_reply(false, &echo_request(false, 9, 3, b"x")), None);
        assert_eq!(echo_reply(false, &reply[..7]), None);
    }
}
