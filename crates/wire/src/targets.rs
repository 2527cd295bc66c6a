//! Which check targets are allowed: a host given as an address, in any notation it can be
//! written in, is refused when the address is loopback, private, link-local, multicast or
//! otherwise reserved (IPv4 and IPv6, including IPv4 embedded in IPv6); a host name that only
//! ever names the local machine or network (`localhost`, `*.local`, …) is refused too. Names
//! are resolved on the agent, which checks the addresses again (DNS rebinding).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    Unspecified,
    Loopback,
    Private,
    LinkLocal,
    Multicast,
    Broadcast,
    Reserved,
    Documentation,
    /// A name that resolves locally (`localhost`, `*.local`, `*.internal`, …).
    LocalName,
}

impl Forbidden {
    /// The words used in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "an unspecified address",
            Self::Loopback => "a loopback address",
            Self::Private => "a private address",
            Self::LinkLocal => "a link-local address",
            Self::Multicast => "a multicast address",
            Self::Broadcast => "the broadcast address",
            Self::Reserved => "a reserved address",
            Self::Documentation => "a documentation address",
            Self::LocalName => "a local name",
        }
    }
}

impl std::fmt::Display for Forbidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One part of an `inet_aton` address: decimal, octal (leading `0`) or hex (`0x`).
fn aton_part(part: &str) -> Option<u64> {
    if part.is_empty() || part.len() > 12 {
        return None;
    }
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    if digits.is_empty() {
        // "0x" alone is 0 to inet_aton.
        return (radix == 16).then_some(0);
    }
    u64::from_str_radix(digits, radix).ok()
}

/// An IPv4 address in any form `inet_aton` accepts: `a.b.c.d`, `a.b.c` (c 16 bits), `a.b`
/// (b 24 bits), `a` (32 bits), each part decimal, octal or hex; one trailing dot allowed.
pub fn parse_ipv4_any(host: &str) -> Option<Ipv4Addr> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let values: Vec<u64> = parts.iter().map(|p| aton_part(p)).collect::<Option<_>>()?;
    let (last, head) = values.split_last()?;
    if head.iter().any(|v| *v > 255) {
        return None;
    }
    let last_bits = 8 * (4 - head.len() as u32);
    if *last >= (1u64 << last_bits) {
        return None;
    }
    let mut value: u64 = 0;
    for (i, v) in head.iter().enumerate() {
        value |= v << (24 - 8 * i as u32);
    }
    value |= last;
    Some(Ipv4Addr::from(u32::try_from(value).ok()?))
}

/// An address written any way a client might: IPv4 in `inet_aton` forms, IPv6 with or
/// without brackets and zone id. `None` for anything else (a name).
pub fn parse_ip_any(host: &str) -> Option<IpAddr> {
    let inner = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let without_zone = inner.split_once('%').map_or(inner, |(addr, _)| addr);
    if let Ok(v6) = without_zone.parse::<Ipv6Addr>() {
        return Some(IpAddr::V6(v6));
    }
    if inner != host {
        return None;
    }
    parse_ipv4_any(host).map(IpAddr::V4)
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], bits: u32) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

/// Why an IPv4 address may not be a target, if it may not.
pub fn forbidden_v4(ip: Ipv4Addr) -> Option<Forbidden> {
    use Forbidden::*;
    let table: &[([u8; 4], u32, Forbidden)] = &[
        ([0, 0, 0, 0], 8, Unspecified),
        ([10, 0, 0, 0], 8, Private),
        ([100, 64, 0, 0], 10, Private),
        ([127, 0, 0, 0], 8, Loopback),
        ([169, 254, 0, 0], 16, LinkLocal),
        ([172, 16, 0, 0], 12, Private),
        ([192, 0, 0, 0], 24, Reserved),
        ([192, 0, 2, 0], 24, Documentation),
        ([192, 88, 99, 0], 24, Reserved),
        ([192, 168, 0, 0], 16, Private),
        ([198, 18, 0, 0], 15, Reserved),
        ([198, 51, 100, 0], 24, Documentation),
        ([203, 0, 113, 0], 24, Documentation),
        ([224, 0, 0, 0], 4, Multicast),
        ([255, 255, 255, 255], 32, Broadcast),
        ([240, 0, 0, 0], 4, Reserved),
    ];
    table
        .iter()
        .find(|(net, bits, _)| in_v4(ip, *net, *bits))
        .map(|(_, _, why)| *why)
}

/// Why an IPv6 address may not be a target, if it may not; IPv4 inside it (mapped,
/// compatible, NAT64, 6to4, Teredo) is judged as IPv4.
pub fn forbidden_v6(ip: Ipv6Addr) -> Option<Forbidden> {
    use Forbidden::*;
    let s = ip.segments();
    let v = u128::from(ip);
    let prefix = |net: u128, bits: u32| (v >> (128 - bits)) == (net >> (128 - bits));
    let low32 = Ipv4Addr::from((v & 0xffff_ffff) as u32);
    if v == 0 {
        return Some(Unspecified);
    }
    if v == 1 {
        return Some(Loopback);
    }
    // ::ffff:a.b.c.d (mapped), ::a.b.c.d (compatible), ::ffff:0:a.b.c.d (translated),
    // 64:ff9b::a.b.c.d and 64:ff9b:1::/48 (NAT64): the IPv4 decides.
    if prefix(0xffff_0000_0000, 96)
        || prefix(0, 96)
        || prefix(0xffff_0000_0000_0000, 96)
        || prefix(0x0064_ff9b_0000_0000_0000_0000_0000_0000, 96)
    {
        return forbidden_v4(low32);
    }
    if prefix(0x0064_ff9b_0001_0000_0000_0000_0000_0000, 48) {
        return Some(Reserved);
    }
    // 6to4: 2002:AABB:CCDD::/48 carries AA.BB.CC.DD.
    if s[0] == 0x2002 {
        let embedded = Ipv4Addr::from(((v >> 80) & 0xffff_ffff) as u32);
        return forbidden_v4(embedded);
    }
    // Teredo 2001:0::/32: the server's IPv4, then the client's, inverted, in the low bits.
    if s[0] == 0x2001 && s[1] == 0 {
        let server = Ipv4Addr::from(((v >> 64) & 0xffff_ffff) as u32);
        let client = Ipv4Addr::from(!((v & 0xffff_ffff) as u32));
        return forbidden_v4(server).or_else(|| forbidden_v4(client));
    }
    let table: &[(u128, u32, Forbidden)] = &[
        (0x0100_0000_0000_0000_0000_0000_0000_0000, 64, Reserved), // discard-only
        (0x2001_0000_0000_0000_0000_0000_0000_0000, 23, Reserved), // IETF protocol assignments
        (0x2001_0db8_0000_0000_0000_0000_0000_0000, 32, Documentation),
        (0x3fff_0000_0000_0000_0000_0000_0000_0000, 20, Documentation),
        (0x5f00_0000_0000_0000_0000_0000_0000_0000, 16, Reserved), // SRv6 SIDs
        (0xfc00_0000_0000_0000_0000_0000_0000_0000, 7, Private),   // unique local
        (0xfe80_0000_0000_0000_0000_0000_0000_0000, 10, LinkLocal),
        (0xfec0_0000_0000_0000_0000_0000_0000_0000, 10, Private), // site-local (deprecated)
        (0xff00_0000_0000_0000_0000_0000_0000_0000, 8, Multicast),
    ];
    if let Some((_, _, why)) = table.iter().find(|(net, bits, _)| prefix(*net, *bits)) {
        return Some(*why);
    }
    // Only global unicast (2000::/3) is reachable; everything else is unassigned.
    (!prefix(0x2000_0000_0000_0000_0000_0000_0000_0000, 3)).then_some(Reserved)
}

/// Why an address may not be a target, if it may not.
pub fn forbidden_ip(ip: IpAddr) -> Option<Forbidden> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

/// Names that only mean this machine or its network.
fn local_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = name.split('.').collect();
    let last = labels.last().copied().unwrap_or_default();
    name.is_empty()
        || matches!(
            last,
            "localhost"
                | "local"
                | "internal"
                | "lan"
                | "intranet"
                | "corp"
                | "home"
                | "localdomain"
                | "test"
                | "invalid"
        )
        || name.ends_with(".home.arpa")
        || name == "home.arpa"
}

/// A host name as DNS allows it: labels of 1-63 letters, digits and hyphens (not at either
/// end), 253 characters at most, one trailing dot allowed, and a last label that is not all
/// digits (that would be a mistyped address, not a name).
pub fn valid_hostname(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()) && !l.starts_with("0x"))
}

/// Why a target host (an address in any notation, or a name) may not be checked.
pub fn forbidden_host(host: &str) -> Option<Forbidden> {
    match parse_ip_any(host) {
        Some(ip) => forbidden_ip(ip),
        None if local_name(host) => Some(Forbidden::LocalName),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_in_every_notation_is_refused() {
        for host in [
            "127.0.0.1",
            "127.1",
            "127.0.1",
            "2130706433",
            "0x7f000001",
            "0x7F.0.0.1",
            "0177.0.0.1",
            "0177.0000.0000.0001",
            "017700000001",
            "127.0.0.1.",
            "127.255.255.254",
            "::1",
            "[::1]",
            "0:0:0:0:0:0:0:1",
            "::ffff:127.0.0.1",
            "::ffff:7f00:1",
            "[::ffff:127.0.0.1]",
            "::127.0.0.1",
            "64:ff9b::127.0.0.1",
            "2002:7f00:1::",
        ] {
            assert!(
                matches!(forbidden_host(host), Some(Forbidden::Loopback)),
                "{host}: {:?}",
                forbidden_host(host)
            );
        }
    }

    #[test]
    fn private_link_local_multicast_and_reserved_are_refused() {
        for (host, why) in [
            ("10.1.2.3", Forbidden::Private),
            ("012.1.2.3", Forbidden::Private),
            ("172.16.0.1", Forbidden::Private),
            ("172.31.255.255", Forbidden::Private),
            ("192.168.1.1", Forbidden::Private),
            ("0xc0a80101", Forbidden::Private),
            ("3232235777", Forbidden::Private),
            ("100.64.0.1", Forbidden::Private),
            ("169.254.169.254", Forbidden::LinkLocal),
            ("0xa9fea9fe", Forbidden::LinkLocal),
            ("224.0.0.1", Forbidden::Multicast),
            ("255.255.255.255", Forbidden::Broadcast),
            ("0.0.0.0", Forbidden::Unspecified),
            ("0", Forbidden::Unspecified),
            ("0x", Forbidden::Unspecified),
            ("240.0.0.1", Forbidden::Reserved),
            ("192.0.2.7", Forbidden::Documentation),
            ("198.18.0.1", Forbidden::Reserved),
            ("::", Forbidden::Unspecified),
            ("fc00::1", Forbidden::Private),
            ("fd12:3456::1", Forbidden::Private),
            ("fe80::1", Forbidden::LinkLocal),
            ("fe80::1%eth0", Forbidden::LinkLocal),
            ("[fe80::1%25eth0]", Forbidden::LinkLocal),
            ("ff02::1", Forbidden::Multicast),
            ("2001:db8::1", Forbidden::Documentation),
            ("::ffff:10.0.0.1", Forbidden::Private),
            ("::ffff:169.254.169.254", Forbidden::LinkLocal),
            ("2002:c0a8:0101::1", Forbidden::Private),
            ("100::1", Forbidden::Reserved),
            ("4000::1", Forbidden::Reserved),
            // Teredo with a private client (inverted in the low 32 bits: 10.0.0.1).
            ("2001:0:4136:e378:8000:63bf:f5ff:fffe", Forbidden::Private),
        ] {
            assert_eq!(forbidden_host(host), Some(why), "{host}");
        }
    }

    #[test]
    fn public_addresses_and_names_are_allowed() {
        for host in [
            "8.8.8.8",
            "1.1.1.1",
            "0x08080808",
            "134744072",
            "93.184.216.34",
            "172.32.0.1",
            "192.169.0.1",
            "2606:4700:4700::1111",
            "[2a00:1450:4001:830::200e]",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:0808:0808::1",
            "example.com",
            "www.example.org.",
            "localhost.example.com",
        ] {
            assert_eq!(forbidden_host(host), None, "{host}");
        }
    }

    #[test]
    fn local_names_are_refused() {
        for host in [
            "localhost",
            "LOCALHOST.",
            "foo.localhost",
            "printer.local",
            "db.internal",
            "nas.home.arpa",
            "box.lan",
        ] {
            assert_eq!(forbidden_host(host), Some(Forbidden::LocalName), "{host}");
        }
    }

    #[test]
    fn host_names_follow_dns_rules() {
        for good in [
            "example.com",
            "a-b.example.com.",
            "xn--bcher-kva.example",
            "_dmarc.example.com",
            "x",
        ] {
            assert!(valid_hostname(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "-a.com",
            "a-.com",
            "a..b",
            "08.1.1.1",
            "1.2.3.4.5",
            "a.0x10",
            "a b.com",
            &"a".repeat(64),
            "é.com",
        ] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn not_addresses_are_names() {
        for host in [
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.256",
            "08.1.1.1",
            "[1.2.3.4]",
            "1..2",
        ] {
            assert_eq!(parse_ip_any(host), None, "{host}");
        }
        assert_eq!(
            parse_ipv4_any("1.2.65535"),
            Some(Ipv4Addr::new(1, 2, 255, 255))
        );
        assert_eq!(
            parse_ipv4_any("1.16777215"),
            Some(Ipv4Addr::new(1, 255, 255, 255))
        );
        assert_eq!(parse_ipv4_any("1.16777216"), None);
    }

    /// Every way to write `ip` that `inet_aton` and IPv6 parsers accept.
    fn notations(ip: Ipv4Addr, style: u8) -> Vec<String> {
        let [a, b, c, d] = ip.octets();
        let n = u32::from(ip);
        let part = |v: u32, s: u8| match s % 3 {
            0 => v.to_string(),
            1 => format!("0x{v:x}"),
            _ => format!("0{v:o}"),
        };
        vec![
            ip.to_string(),
            format!(
                "{}.{}.{}.{}",
                part(a.into(), style),
                part(b.into(), style / 3),
                part(c.into(), style / 9),
                part(d.into(), style / 27)
            ),
            format!(
                "{}.{}.{}",
                part(a.into(), style),
                part(b.into(), style / 3),
                part((u32::from(c) << 8) | u32::from(d), style / 9)
            ),
            format!(
                "{}.{}",
                part(a.into(), style),
                part(n & 0xff_ffff, style / 3)
            ),
            part(n, style),
            format!("{ip}."),
            format!("::ffff:{ip}"),
            format!("[::ffff:{:x}:{:x}]", n >> 16, n & 0xffff),
            format!("64:ff9b::{ip}"),
        ]
    }

    proptest::proptest! {
        #[test]
        fn every_notation_of_an_address_is_judged_like_the_address(raw: u32, style in 0u8..81) {
            let ip = Ipv4Addr::from(raw);
            let expected = forbidden_v4(ip);
            for written in notations(ip, style) {
                proptest::prop_assert_eq!(forbidden_host(&written), expected, "{} as {}", ip, written);
            }
        }

        #[test]
        fn every_notation_of_a_forbidden_address_is_refused(
            net in proptest::sample::select(vec![
                ([127u8, 0, 0, 0], 8u32), ([10, 0, 0, 0], 8), ([172, 16, 0, 0], 12),
                ([192, 168, 0, 0], 16), ([169, 254, 0, 0], 16), ([100, 64, 0, 0], 10),
                ([224, 0, 0, 0], 4), ([0, 0, 0, 0], 8), ([240, 0, 0, 0], 4),
            ]),
            host_bits: u32,
            style in 0u8..81,
        ) {
            let mask = u32::MAX >> net.1;
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::from(net.0)) | (host_bits & mask));
            for written in notations(ip, style) {
                proptest::prop_assert!(forbidden_host(&written).is_some(), "{} as {}", ip, written);
            }
        }
    }
}
