//! Just enough of the DNS wire format (RFC 1035, 6891, 2308) for the caching proxy: read a
//! query's question and EDNS, walk a response to find its TTLs and its negative TTL, and
//! write the few answers the proxy makes itself (SERVFAIL, FORMERR, NOTIMP, truncated).
//!
//! Every read is bounds-checked and returns `None`/`Err` on anything malformed: these
//! functions see packets from anyone who can reach the proxy's port, and are fuzzed.

/// Header flags.
const QR: u16 = 0x8000;
const TC: u16 = 0x0200;
const RD: u16 = 0x0100;
const RA: u16 = 0x0080;
const CD: u16 = 0x0010;

/// Response codes the proxy writes.
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NOTIMP: u8 = 4;

/// The OPT pseudo-record's type.
const TYPE_OPT: u16 = 41;
const TYPE_SOA: u16 = 6;

/// The longest name on the wire.
const MAX_NAME: usize = 255;

fn u16_at(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]))
}

fn u32_at(p: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *p.get(at)?,
        *p.get(at + 1)?,
        *p.get(at + 2)?,
        *p.get(at + 3)?,
    ]))
}

/// A query the proxy can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub flags: u16,
    /// The question's name as sent (uncompressed labels, case kept).
    pub qname: Vec<u8>,
    pub qtype: u16,
    pub qclass: u16,
    /// Where the question ends (the header and question are `packet[..question_end]`).
    pub question_end: usize,
    /// The EDNS UDP payload size, if the query has an OPT record.
    pub edns_size: Option<u16>,
    pub dnssec_ok: bool,
}

/// Why a packet is not a query the proxy answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not worth an answer: too short for a header, or a response.
    Ignore,
    /// Answer with this rcode (the header was readable).
    Answer(u8),
}

impl Query {
    /// The cache key: the name in lower case, type, class, and what changes the answer
    /// (EDNS present, DO, CD).
    pub fn key(&self) -> Vec<u8> {
        let mut key: Vec<u8> = self.qname.iter().map(u8::to_ascii_lowercase).collect();
        key.extend_from_slice(&self.qtype.to_be_bytes());
        key.extend_from_slice(&self.qclass.to_be_bytes());
        key.push(
            u8::from(self.edns_size.is_some())
                | u8::from(self.dnssec_ok) << 1
                | u8::from(self.flags & CD != 0) << 2,
        );
        key
    }

    /// The most a UDP answer to it may carry.
    pub fn udp_limit(&self) -> usize {
        usize::from(self.edns_size.unwrap_or(512).clamp(512, 4096))
    }

    /// The name in presentation form (for logs).
    pub fn name_text(&self) -> String {
        let mut out = String::new();
        let mut i = 0;
        while let Some(&len) = self.qname.get(i) {
            if len == 0 {
                break;
            }
            let label = self
                .qname
                .get(i + 1..i + 1 + usize::from(len))
                .unwrap_or_default();
            out.push_str(&String::from_utf8_lossy(label));
            out.push('.');
            i += 1 + usize::from(len);
        }
        if out.is_empty() {
            out.push('.');
        }
        out
    }
}

/// Read an uncompressed name at `at`: its end.
fn plain_name_end(p: &[u8], mut at: usize) -> Option<usize> {
    let start = at;
    loop {
        let len = usize::from(*p.get(at)?);
        if len == 0 {
            at += 1;
            break;
        }
        if len > 63 {
            return None; // a pointer or a reserved label type: not in a question we take
        }
        at += 1 + len;
        if at - start > MAX_NAME {
            return None;
        }
    }
    (at - start <= MAX_NAME).then_some(at)
}

/// Skip a name that may end in a compression pointer: where what follows it starts.
fn skip_name(p: &[u8], mut at: usize) -> Option<usize> {
    let mut seen = 0;
    loop {
        let len = *p.get(at)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(at + 1),
            0x00 => {
                at += 1 + usize::from(len);
                seen += 1 + usize::from(len);
                if seen > MAX_NAME {
                    return None;
                }
            }
            0xc0 => {
                p.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

/// Read a query.
pub fn parse_query(p: &[u8]) -> Result<Query, Refusal> {
    let id = u16_at(p, 0).ok_or(Refusal::Ignore)?;
    let flags = u16_at(p, 2).ok_or(Refusal::Ignore)?;
    if p.len() < 12 || flags & QR != 0 {
        return Err(Refusal::Ignore);
    }
    if (flags >> 11) & 0x0f != 0 {
        return Err(Refusal::Answer(RCODE_NOTIMP));
    }
    let counts = [
        u16_at(p, 4).unwrap_or(0),
        u16_at(p, 6).unwrap_or(0),
        u16_at(p, 8).unwrap_or(0),
        u16_at(p, 10).unwrap_or(0),
    ];
    if counts[0] != 1 || counts[1] != 0 || counts[2] != 0 || counts[3] > 1 {
        return Err(Refusal::Answer(RCODE_FORMERR));
    }
    let form = Refusal::Answer(RCODE_FORMERR);
    let name_end = plain_name_end(p, 12).ok_or(form)?;
    let qtype = u16_at(p, name_end).ok_or(form)?;
    let qclass = u16_at(p, name_end + 2).ok_or(form)?;
    let question_end = name_end + 4;
    let (mut edns_size, mut dnssec_ok) = (None, false);
    if counts[3] == 1 {
        // The one additional record a query may carry: OPT, owned by the root.
        let at = question_end;
        if p.get(at) != Some(&0) || u16_at(p, at + 1) != Some(TYPE_OPT) {
            return Err(form);
        }
        edns_size = Some(u16_at(p, at + 3).ok_or(form)?);
        let ttl = u32_at(p, at + 5).ok_or(form)?;
        dnssec_ok = ttl & 0x8000 != 0;
        let rdlen = usize::from(u16_at(p, at + 9).ok_or(form)?);
        if p.len() < at + 11 + rdlen {
            return Err(form);
        }
    }
    Ok(Query {
        id,
        flags,
        qname: p[12..name_end].to_vec(),
        qtype,
        qclass,
        question_end,
        edns_size,
        dnssec_ok,
    })
}

/// A query as the proxy forwards it: its header and question as the client sent them, and
/// its OPT record (UDP size, extended flags, DO) without options: a client's subnet (ECS),
/// cookie or padding are not the upstream's business.
pub fn forwardable(p: &[u8], query: &Query) -> Vec<u8> {
    let mut out = p[..query.question_end].to_vec();
    if query.edns_size.is_some() {
        // Owner, type, UDP size and TTL (flags) as sent; RDLENGTH 0.
        out.extend_from_slice(&p[query.question_end..query.question_end + 9]);
        out.extend_from_slice(&[0, 0]);
    }
    out
}

/// What the proxy needs to know of a response to cache and serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub rcode: u8,
    pub truncated: bool,
    pub answers: u16,
    /// Offsets of every TTL field (OPT excluded), to age them when served.
    pub ttl_offsets: Vec<usize>,
    /// The smallest TTL of the answer and authority records.
    pub min_ttl: Option<u32>,
    /// RFC 2308: min(SOA TTL, SOA MINIMUM) of the authority section's SOA.
    pub negative_ttl: Option<u32>,
}

/// Walk a response (it must answer `query`: same id and question, case aside).
pub fn parse_response(p: &[u8], query: &Query, sent_id: u16) -> Option<Response> {
    if u16_at(p, 0)? != sent_id {
        return None;
    }
    let flags = u16_at(p, 2)?;
    if flags & QR == 0 || u16_at(p, 4)? != 1 {
        return None;
    }
    let name_end = plain_name_end(p, 12)?;
    let asked = p.get(12..name_end)?;
    if !asked.eq_ignore_ascii_case(&query.qname)
        || u16_at(p, name_end)? != query.qtype
        || u16_at(p, name_end + 2)? != query.qclass
    {
        return None;
    }
    let mut at = name_end + 4;
    let counts = [u16_at(p, 6)?, u16_at(p, 8)?, u16_at(p, 10)?];
    let mut ttl_offsets = Vec::new();
    let mut min_ttl: Option<u32> = None;
    let mut negative_ttl = None;
    for (section, count) in counts.iter().enumerate() {
        for _ in 0..*count {
            at = skip_name(p, at)?;
            let rtype = u16_at(p, at)?;
            let ttl = u32_at(p, at + 4)?;
            let rdlen = usize::from(u16_at(p, at + 8)?);
            let rdata = at + 10;
            if p.len() < rdata + rdlen {
                return None;
            }
            if rtype != TYPE_OPT {
                ttl_offsets.push(at + 4);
                if section < 2 {
                    min_ttl = Some(min_ttl.map_or(ttl, |m| m.min(ttl)));
                }
            }
            if section == 1 && rtype == TYPE_SOA {
                let serial_at = skip_name(p, skip_name(p, rdata)?)?;
                let minimum = u32_at(p, serial_at + 16)?;
                negative_ttl = Some(ttl.min(minimum));
            }
            at = rdata + rdlen;
        }
    }
    Some(Response {
        rcode: (flags & 0x0f) as u8,
        truncated: flags & TC != 0,
        answers: counts[0],
        ttl_offsets,
        min_ttl,
        negative_ttl,
    })
}

/// Serve a stored response to `query`: its id and name case, its RD bit, each TTL `ttl`
/// gives for the stored one. Too long for UDP at `limit`: a truncated answer instead.
pub fn serve(
    stored: &[u8],
    ttl_offsets: &[usize],
    query: &Query,
    ttl: impl Fn(u32) -> u32,
    limit: usize,
) -> Vec<u8> {
    if stored.len() > limit || stored.len() < 12 {
        return truncated(query, stored);
    }
    let mut out = stored.to_vec();
    out[0..2].copy_from_slice(&query.id.to_be_bytes());
    let flags = u16::from_be_bytes([out[2], out[3]]);
    let flags = (flags & !RD) | (query.flags & RD);
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    let name = 12..12 + query.qname.len();
    if out.get(name.clone()).is_some() {
        out[name].copy_from_slice(&query.qname);
    }
    for &at in ttl_offsets {
        if let Some(old) = u32_at(&out, at) {
            out[at..at + 4].copy_from_slice(&ttl(old).to_be_bytes());
        }
    }
    out
}

/// The header and question of `query` with QR, RA, the query's RD and `rcode`.
pub fn answer_only_header(query: &Query, packet: &[u8], rcode: u8, extra_flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(query.question_end);
    out.extend_from_slice(&query.id.to_be_bytes());
    let flags = QR | RA | extra_flags | (query.flags & (RD | CD)) | u16::from(rcode & 0x0f);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(packet.get(12..query.question_end).unwrap_or_default());
    out
}

/// A truncated answer (TC set, no records): the client asks again over TCP.
fn truncated(query: &Query, stored: &[u8]) -> Vec<u8> {
    let rcode = stored.get(3).map_or(0, |f| f & 0x0f);
    let mut out = Vec::with_capacity(12 + query.qname.len() + 4);
    out.extend_from_slice(&query.id.to_be_bytes());
    let flags = QR | RA | TC | (query.flags & (RD | CD)) | u16::from(rcode);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&query.qname);
    out.extend_from_slice(&query.qtype.to_be_bytes());
    out.extend_from_slice(&query.qclass.to_be_bytes());
    out
}

/// An error answer to a packet whose question could not be read: header only (zero
/// counts), its id, or nothing for a packet too short to have one.
pub fn header_error(packet: &[u8], rcode: u8) -> Option<Vec<u8>> {
    let id = u16_at(packet, 0)?;
    let flags = u16_at(packet, 2)?;
    if packet.len() < 12 || flags & QR != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&id.to_be_bytes());
    let opcode = flags & 0x7800;
    let out_flags = QR | RA | opcode | (flags & RD) | u16::from(rcode & 0x0f);
    out.extend_from_slice(&out_flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    Some(out)
}

/// Put a new id into a query being forwarded.
pub fn with_id(packet: &[u8], id: u16) -> Vec<u8> {
    let mut out = packet.to_vec();
    if out.len() >= 2 {
        out[0..2].copy_from_slice(&id.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` of `qtype`, optionally with EDNS.
    pub fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec();
        p.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
        for label in name.trim_end_matches('.').split('.') {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        if let Some(size) = edns {
            p.push(0);
            p.extend_from_slice(&TYPE_OPT.to_be_bytes());
            p.extend_from_slice(&size.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0x80, 0, 0, 0]);
        }
        p
    }

    #[test]
    fn a_query_is_read_with_its_edns() {
        let q = parse_query(&query(7, "Example.Test", 1, Some(1232))).unwrap();
        assert_eq!((q.id, q.qtype, q.qclass), (7, 1, 1));
        assert_eq!(q.name_text(), "Example.Test.");
        assert_eq!(q.edns_size, Some(1232));
        assert!(q.dnssec_ok);
        assert_eq!(q.udp_limit(), 1232);
        let lower = parse_query(&query(8, "example.test", 1, Some(1232))).unwrap();
        assert_eq!(q.key(), lower.key(), "the key ignores case");
        let plain = parse_query(&query(8, "example.test", 1, None)).unwrap();
        assert_ne!(plain.key(), lower.key(), "EDNS changes the answer");
    }

    #[test]
    fn malformed_queries_are_refused_or_ignored() {
        assert_eq!(parse_query(&[1, 2, 3]), Err(Refusal::Ignore));
        let mut response = query(1, "a.test", 1, None);
        response[2] |= 0x80;
        assert_eq!(parse_query(&response), Err(Refusal::Ignore));
        let mut two = query(1, "a.test", 1, None);
        two[5] = 2;
        assert_eq!(parse_query(&two), Err(Refusal::Answer(RCODE_FORMERR)));
        let mut notify = query(1, "a.test", 1, None);
        notify[2] |= 4 << 3;
        assert_eq!(parse_query(&notify), Err(Refusal::Answer(RCODE_NOTIMP)));
        let full = query(1, "a.test", 1, Some(512));
        for cut in 12..full.len() {
            assert_eq!(
                parse_query(&full[..cut]),
                Err(Refusal::Answer(RCODE_FORMERR)),
                "cut at {cut}"
            );
        }
        // A compression pointer in the question.
        let mut pointer = query(1, "a.test", 1, None);
        pointer[12] = 0xc0;
        assert_eq!(parse_query(&pointer), Err(Refusal::Answer(RCODE_FORMERR)));
    }

    /// A response to `q`: one A record (TTL 300) and, for NXDOMAIN, an SOA (TTL 3600,
    /// MINIMUM 60), names compressed.
    fn response(q: &[u8], nxdomain: bool) -> Vec<u8> {
        let mut p = q.to_vec();
        p.truncate(parse_query(q).unwrap().question_end);
        p[2] = 0x81;
        p[3] = if nxdomain { 0x83 } else { 0x80 };
        p[11] = 0;
        if nxdomain {
            p[7] = 0;
            p[9] = 1;
            p.extend_from_slice(&[0xc0, 12, 0, 6, 0, 1, 0, 0, 0x0e, 0x10]);
            let rdata: Vec<u8> = [
                &[0xc0, 12][..],
                &[0xc0, 12],
                &1u32.to_be_bytes(),
                &2u32.to_be_bytes(),
                &3u32.to_be_bytes(),
                &4u32.to_be_bytes(),
                &60u32.to_be_bytes(),
            ]
            .concat();
            p.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            p.extend_from_slice(&rdata);
        } else {
            p[7] = 1;
            p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4, 192, 0, 2, 10]);
        }
        p
    }

    #[test]
    fn responses_are_walked_for_their_ttls() {
        let q = query(5, "example.test", 1, None);
        let parsed = parse_query(&q).unwrap();
        let ok = parse_response(&response(&q, false), &parsed, 5).unwrap();
        assert_eq!((ok.rcode, ok.answers, ok.min_ttl), (0, 1, Some(300)));
        assert_eq!(ok.ttl_offsets.len(), 1);
        let nx = parse_response(&response(&q, true), &parsed, 5).unwrap();
        assert_eq!((nx.rcode, nx.answers, nx.negative_ttl), (3, 0, Some(60)));
        // Another id, another question: not ours.
        assert!(parse_response(&response(&q, false), &parsed, 6).is_none());
        let other = parse_query(&query(5, "other.test", 1, None)).unwrap();
        assert!(parse_response(&response(&q, false), &other, 5).is_none());
        // Cut anywhere: never a panic, never a wrong walk.
        let full = response(&q, true);
        for cut in 0..full.len() {
            assert!(
                parse_response(&full[..cut], &parsed, 5).is_none(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn serving_ages_ttls_and_takes_the_askers_id_and_case() {
        let q = query(5, "example.test", 1, None);
        let stored = response(&q, false);
        let parsed = parse_query(&q).unwrap();
        let r = parse_response(&stored, &parsed, 5).unwrap();
        let asker = parse_query(&query(99, "ExAmPlE.test", 1, None)).unwrap();
        let out = serve(&stored, &r.ttl_offsets, &asker, |t| t - 100, 512);
        assert_eq!(&out[0..2], &99u16.to_be_bytes());
        assert_eq!(&out[12..12 + asker.qname.len()], &asker.qname[..]);
        assert_eq!(u32_at(&out, r.ttl_offsets[0]), Some(200));
        // Too big for the asker's UDP limit: truncated, question only.
        let small = serve(&stored, &r.ttl_offsets, &asker, |t| t, 20);
        assert_eq!(small[2] & 0x02, 0x02, "TC set");
        assert_eq!(u16_at(&small, 6), Some(0));
        assert_eq!(parse_response(&small, &asker, 99).unwrap().answers, 0);
    }

    #[test]
    fn error_answers_keep_the_id() {
        let q = query(0x1234, "a.test", 1, None);
        let mut two = q.clone();
        two[5] = 2;
        let out = header_error(&two, RCODE_FORMERR).unwrap();
        assert_eq!(&out[0..2], &[0x12, 0x34]);
        assert_eq!(out[3] & 0x0f, RCODE_FORMERR);
        assert!(header_error(&[0x12], RCODE_FORMERR).is_none());
        let parsed = parse_query(&q).unwrap();
        let fail = answer_only_header(&parsed, &q, RCODE_SERVFAIL, 0);
        assert_eq!(fail[3] & 0x0f, RCODE_SERVFAIL);
        assert_eq!(&fail[12..], &q[12..parsed.question_end]);
    }

    /// The proxy's packet handling on bytes from anyone: never a panic, and what it finds
    /// stays inside the packet. A fixed number of cases, so CI's time is bounded.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
            let len = base.len();
            (
                proptest::collection::vec((0..len, any::<u8>()), 0..6),
                0..=len + 8,
                proptest::collection::vec(any::<u8>(), 0..8),
            )
                .prop_map(move |(flips, cut, tail)| {
                    let mut p = base.clone();
                    for (at, byte) in flips {
                        p[at] = byte;
                    }
                    p.extend(tail);
                    p.truncate(cut);
                    p
                })
        }

        fn check_all(packet: &[u8]) {
            let asked = parse_query(&query(5, "example.test", 1, Some(1232))).unwrap();
            if let Some(r) = parse_response(packet, &asked, 5) {
                for &at in &r.ttl_offsets {
                    assert!(at + 4 <= packet.len());
                }
                let _ = serve(packet, &r.ttl_offsets, &asked, |t| t / 2, 512);
            }
            match parse_query(packet) {
                Ok(q) => {
                    assert!(q.question_end <= packet.len());
                    let _ = q.key();
                    let _ = q.name_text();
                    let _ = answer_only_header(&q, packet, RCODE_SERVFAIL, 0);
                    let _ = serve(packet, &[0, 3, packet.len()], &q, |t| t, q.udp_limit());
                }
                Err(Refusal::Answer(code)) => {
                    assert!(header_error(packet, code).is_some());
                }
                Err(Refusal::Ignore) => {}
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

            #[test]
            fn random_bytes(packet in proptest::collection::vec(any::<u8>(), 0..600)) {
                check_all(&packet);
            }

            #[test]
            fn mutated_queries(packet in mutated(query(5, "example.test", 1, Some(1232)))) {
                check_all(&packet);
            }

            #[test]
            fn mutated_responses(packet in mutated(response(&query(5, "example.test", 1, Some(1232)), true))) {
                check_all(&packet);
            }
        }
    }
}
