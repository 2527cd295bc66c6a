//! The caching DNS proxy (`AGENT_DNS_LISTEN`, UDP and TCP): answers from its cache while an
//! answer's TTL lasts (aged as it is served), forwards misses to `AGENT_DNS_UPSTREAM`.
//!
//! - **Cache**: bounded by entries (`AGENT_DNS_CACHE_SIZE`) and by size per answer (4 kB);
//!   positive answers live for their smallest TTL, negative ones (NXDOMAIN, NODATA) for
//!   min(SOA TTL, SOA MINIMUM) as RFC 2308 says, and not at all without an SOA. SERVFAIL,
//!   REFUSED and truncated answers are never cached.
//! - **Coalescing**: one upstream query per question in flight; the others asking the same
//!   wait for its answer.
//! - **Stale**: when the upstream fails (timeout, SERVFAIL, REFUSED, unreachable) an answer
//!   expired less than `AGENT_DNS_STALE_SECS` ago is served with TTL 30 (RFC 8767).
//! - **Limits**: at most `AGENT_DNS_MAX_INFLIGHT` queries wait for the upstream, those
//!   joining a question already asked included; past it, and whenever there is nothing to
//!   answer with, SERVFAIL. TCP connections are bounded (256, and 16 per client address),
//!   and idle ones closed.
//! - **Clients**: only sources in `AGENT_DNS_ALLOW_FROM` are answered (loopback when it is
//!   unset, which a non-loopback listen address does not allow); others are dropped without a
//!   word (UDP) or closed (TCP).
//! - **Privacy**: a query goes upstream with its header, question and EDNS size and flags,
//!   and none of the client's EDNS options (its subnet, cookie, padding).
//! - A malformed packet is answered FORMERR (or NOTIMP) when its header can be read, and
//!   dropped otherwise; nothing a client sends stops the proxy.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dns_wire::{self, Query, Refusal, RCODE_SERVFAIL};

/// The largest answer cached.
const MAX_CACHED: usize = 4096;
/// TTL of a stale answer (RFC 8767 §4).
const STALE_TTL: u32 = 30;
/// Most TCP connections at once, and how long one may stay idle.
const MAX_TCP: usize = 256;
/// Most TCP connections of one client address: a flood of idle ones from one client leaves
/// room for the others.
const MAX_TCP_PER_SOURCE: usize = 16;
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Longest a cached answer lives, whatever its TTL says.
const MAX_TTL: u32 = 86_400;

/// The proxy's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// The clients answered.
    pub allow_from: AllowFrom,
    pub upstream: SocketAddr,
    pub upstream_timeout: Duration,
    pub cache_size: u64,
    pub max_inflight: usize,
    pub stale: Duration,
}

/// The networks whose clients the proxy answers (`AGENT_DNS_ALLOW_FROM`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowFrom(Vec<ipnet::IpNet>);

impl AllowFrom {
    /// Most networks listed.
    const MAX: usize = 256;

    /// Loopback only: the default for a proxy on a loopback address.
    pub fn loopback() -> Self {
        let v4 = ipnet::Ipv4Net::new(std::net::Ipv4Addr::LOCALHOST, 8).map(|n| n.trunc());
        let v6 = ipnet::IpNet::from(IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
        Self(v4.map(ipnet::IpNet::from).into_iter().chain([v6]).collect())
    }

    /// CIDRs or addresses, comma-separated.
    pub fn parse(text: &str) -> Result<Self, checkplane_wire::error::Invalid> {
        let invalid =
            |reason: String| checkplane_wire::error::Invalid::new("AGENT_DNS_ALLOW_FROM", reason);
        let nets = text
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|entry| {
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| invalid(format!("{entry:?} is not a CIDR such as 10.0.0.0/8")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if nets.is_empty() {
            return Err(invalid("no network listed".to_owned()));
        }
        if nets.len() > Self::MAX {
            return Err(invalid(format!("at most {} networks", Self::MAX)));
        }
        Ok(Self(nets))
    }

    /// Whether a client at `ip` is answered.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// Open TCP connections per client address, each held by a [`SourceSlot`].
#[derive(Default)]
struct Sources(Mutex<std::collections::HashMap<IpAddr, usize>>);

/// One of a client's TCP connections, given back when dropped.
struct SourceSlot<'a> {
    sources: &'a Sources,
    ip: IpAddr,
}

impl Sources {
    /// A slot for one more connection of `ip`, unless it has [`MAX_TCP_PER_SOURCE`]. An
    /// IPv6 client is its /64 (one host holds a whole /64 to pick addresses from).
    fn take(&self, ip: IpAddr) -> Option<SourceSlot<'_>> {
        let ip = match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
            v4 => v4,
        };
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= MAX_TCP_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot { sources: self, ip })
    }
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        let mut open = self.sources.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A query from a client the proxy does not answer: counted, never answered.
fn denied() {
    metrics::counter!("checkplane_agent_dns_queries_total", "source" => "denied").increment(1);
}

/// One cached answer.
struct Entry {
    bytes: Vec<u8>,
    ttl_offsets: Vec<usize>,
    stored: Instant,
    ttl: u32,
}

impl Entry {
    fn age(&self) -> Duration {
        self.stored.elapsed()
    }
    fn fresh(&self) -> bool {
        self.age() < Duration::from_secs(u64::from(self.ttl))
    }
}

/// Where an answer came from (for the log and the metrics).
#[derive(Debug, Clone, Copy)]
enum Source {
    Cache,
    Upstream,
    Stale,
    Error,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Upstream => "upstream",
            Self::Stale => "stale",
            Self::Error => "error",
        }
    }
}

/// What an upstream exchange gave: the answer, or why not.
type Fetched = Result<Arc<Entry>, Unanswered>;

/// Why a query got no answer from the upstream.
#[derive(Debug, Clone, thiserror::Error)]
enum Unanswered {
    #[error("no answer")]
    Nothing,
    #[error("the upstream query was dropped")]
    Dropped,
    #[error("too many queries in flight")]
    Busy,
    #[error("no answer from {upstream} over {transport} within {ms} ms")]
    Late {
        upstream: SocketAddr,
        transport: &'static str,
        ms: u128,
    },
    #[error("asking {upstream} over {transport}: {error}")]
    Failed {
        upstream: SocketAddr,
        transport: &'static str,
        error: Arc<std::io::Error>,
    },
    #[error("{0} answered something else")]
    Mismatched(SocketAddr),
}

struct Proxy {
    settings: Settings,
    cache: moka::sync::Cache<Vec<u8>, Arc<Entry>>,
    /// Questions being asked upstream, with the channel their answer arrives on.
    inflight: Mutex<std::collections::HashMap<Vec<u8>, watch::Receiver<Option<Fetched>>>>,
    permits: Semaphore,
    sources: Sources,
}

/// Bind the proxy's sockets (so a port in use fails the start), then serve until `stop`.
pub async fn start(settings: Settings, stop: CancellationToken) -> std::io::Result<TaskTracker> {
    let udp = Arc::new(UdpSocket::bind(settings.listen).await?);
    let tcp = TcpListener::bind(udp.local_addr()?).await?;
    tracing::info!(listen = %udp.local_addr()?, upstream = %settings.upstream, "starting DNS proxy");
    let proxy = Arc::new(Proxy {
        cache: moka::sync::Cache::builder()
            .max_capacity(settings.cache_size)
            // Kept past their TTL for the stale window; freshness is judged when read.
            .time_to_live(Duration::from_secs(u64::from(MAX_TTL)) + settings.stale)
            .build(),
        inflight: Mutex::default(),
        permits: Semaphore::new(settings.max_inflight),
        sources: Sources::default(),
        settings,
    });
    // The two listeners and every query and connection they start: waited for at shutdown.
    let tasks = TaskTracker::new();
    tasks.spawn(udp_loop(proxy.clone(), udp, tasks.clone(), stop.clone()));
    tasks.spawn(tcp_loop(proxy, tcp, tasks.clone(), stop));
    tasks.close();
    Ok(tasks)
}

async fn udp_loop(
    proxy: Arc<Proxy>,
    socket: Arc<UdpSocket>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            got = socket.recv_from(&mut buf) => match got {
                Ok(got) => got,
                // ICMP errors from earlier answers and the like: keep serving.
                Err(_) => continue,
            },
        };
        if !proxy.settings.allow_from.admits(peer.ip()) {
            denied();
            continue;
        }
        let packet = &buf[..n];
        let query = match dns_wire::parse_query(packet) {
            Ok(query) => query,
            Err(refusal) => {
                if let Some(answer) = refused(packet, refusal) {
                    let _ = socket.send_to(&answer, peer).await;
                }
                continue;
            }
        };
        // Fresh in the cache: answered here, without a task.
        if let Some(answer) = proxy.cached(&query, query.udp_limit()) {
            let _ = socket.send_to(&answer, peer).await;
            continue;
        }
        let packet = packet.to_vec();
        let (proxy, socket) = (proxy.clone(), socket.clone());
        tasks.spawn(async move {
            let limit = query.udp_limit();
            let answer = proxy.resolve(&query, &packet, limit).await;
            let _ = socket.send_to(&answer, peer).await;
        });
    }
}

async fn tcp_loop(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            got = listener.accept() => match got {
                Ok(got) => got,
                Err(_) => continue,
            },
        };
        if !proxy.settings.allow_from.admits(peer.ip()) {
            denied();
            drop(stream);
            continue;
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream); // too many: the client tries again later
            continue;
        };
        let proxy = proxy.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            // Past its share, a client's connection is closed at once: its flood of idle
            // connections does not use up everyone's.
            if let Some(_slot) = proxy.sources.take(peer.ip()) {
                let _ = tcp_connection(&proxy, stream, &stop).await;
            }
            drop(permit);
        });
    }
}

/// Length-prefixed queries, one after another, until idle, closed or `stop`.
async fn tcp_connection(
    proxy: &Proxy,
    mut stream: TcpStream,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        let read = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)) => r,
        };
        let Ok(read) = read else { return Ok(()) };
        read?;
        let mut packet = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut packet))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let answer = match dns_wire::parse_query(&packet) {
            Ok(query) => match proxy.cached(&query, usize::MAX) {
                Some(answer) => answer,
                None => proxy.resolve(&query, &packet, usize::MAX).await,
            },
            Err(refusal) => match refused(&packet, refusal) {
                Some(answer) => answer,
                None => return Ok(()),
            },
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&(answer.len() as u16).to_be_bytes());
        framed.extend_from_slice(&answer);
        stream.write_all(&framed).await?;
    }
}

fn refused(packet: &[u8], refusal: Refusal) -> Option<Vec<u8>> {
    let Refusal::Answer(rcode) = refusal else {
        return None;
    };
    metrics::counter!("checkplane_agent_dns_queries_total", "source" => "refused").increment(1);
    dns_wire::header_error(packet, rcode)
}

fn served(query: &Query, source: Source, answer: &[u8]) {
    metrics::counter!("checkplane_agent_dns_queries_total", "source" => source.name()).increment(1);
    tracing::debug!(
        name = %query.name_text(),
        qtype = query.qtype,
        rcode = answer.get(3).map_or(0, |f| f & 0x0f),
        source = source.name(),
        "served DNS response"
    );
}

impl Proxy {
    fn cached(&self, query: &Query, limit: usize) -> Option<Vec<u8>> {
        let entry = self.cache.get(&query.key())?;
        if !entry.fresh() {
            return None;
        }
        let age = u32::try_from(entry.age().as_secs()).unwrap_or(u32::MAX);
        let answer = dns_wire::serve(
            &entry.bytes,
            &entry.ttl_offsets,
            query,
            |ttl| ttl.min(entry.ttl).saturating_sub(age),
            limit,
        );
        served(query, Source::Cache, &answer);
        Some(answer)
    }

    /// Answer a query the cache could not: upstream (coalesced), else stale, else SERVFAIL.
    async fn resolve(&self, query: &Query, packet: &[u8], limit: usize) -> Vec<u8> {
        let key = query.key();
        // Every query waiting for the upstream holds a place, one joining a question already
        // asked too: a flood of one name is bounded like a flood of many.
        let Ok(_place) = self.permits.try_acquire() else {
            return self.unanswered(query, &key, packet, limit, Err(Unanswered::Busy));
        };
        let fetched = match self.join_or_lead(&key) {
            Ok(mut waiting) => {
                // Someone asks already: wait for their answer.
                match waiting.wait_for(Option::is_some).await {
                    Ok(answer) => answer.clone().unwrap_or(Err(Unanswered::Nothing)),
                    Err(_) => Err(Unanswered::Dropped),
                }
            }
            Err(sender) => {
                let fetched = self.fetch(query, packet).await;
                if let Ok(entry) = &fetched {
                    if entry.ttl > 0 && entry.bytes.len() <= MAX_CACHED {
                        self.cache.insert(key.clone(), entry.clone());
                    }
                }
                let _ = sender.send(Some(fetched.clone()));
                self.inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
                fetched
            }
        };
        match fetched {
            Ok(entry) if usable(&entry) => {
                let answer = dns_wire::serve(&entry.bytes, &entry.ttl_offsets, query, |t| t, limit);
                served(query, Source::Upstream, &answer);
                answer
            }
            failed => self.unanswered(query, &key, packet, limit, failed),
        }
    }

    /// No usable answer came: stale, else the upstream's own error answer, else SERVFAIL.
    fn unanswered(
        &self,
        query: &Query,
        key: &[u8],
        packet: &[u8],
        limit: usize,
        failed: Fetched,
    ) -> Vec<u8> {
        if let Some(answer) = self.stale(query, key, limit) {
            return answer;
        }
        let why = match &failed {
            Ok(_) => "the upstream answered with an error".to_owned(),
            Err(why) => why.to_string(),
        };
        match failed {
            // The upstream's own error answer, when it gave one.
            Ok(entry) => {
                let answer = dns_wire::serve(&entry.bytes, &entry.ttl_offsets, query, |t| t, limit);
                served(query, Source::Upstream, &answer);
                answer
            }
            Err(_) => {
                tracing::debug!(name = %query.name_text(), error = %why, "DNS upstream failed");
                let answer = dns_wire::answer_only_header(query, packet, RCODE_SERVFAIL, 0);
                served(query, Source::Error, &answer);
                answer
            }
        }
    }

    /// Join the upstream query for `key` in flight, or become the one who makes it.
    fn join_or_lead(
        &self,
        key: &[u8],
    ) -> Result<watch::Receiver<Option<Fetched>>, watch::Sender<Option<Fetched>>> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(waiting) = inflight.get(key) {
            return Ok(waiting.clone());
        }
        let (sender, receiver) = watch::channel(None);
        inflight.insert(key.to_vec(), receiver);
        Err(sender)
    }

    fn stale(&self, query: &Query, key: &[u8], limit: usize) -> Option<Vec<u8>> {
        let entry = self.cache.get(key)?;
        let expired_for = entry
            .age()
            .saturating_sub(Duration::from_secs(u64::from(entry.ttl)));
        if expired_for > self.settings.stale {
            return None;
        }
        let answer = dns_wire::serve(
            &entry.bytes,
            &entry.ttl_offsets,
            query,
            |_| STALE_TTL,
            limit,
        );
        served(query, Source::Stale, &answer);
        Some(answer)
    }

    /// Ask the upstream over UDP (TCP when the answer is truncated), from a socket of its
    /// own (a fresh port and id per query), within the upstream timeout.
    async fn fetch(&self, query: &Query, packet: &[u8]) -> Fetched {
        let upstream = self.settings.upstream;
        let within = self.settings.upstream_timeout;
        let id = u16::from_be_bytes(
            uuid::Uuid::new_v4().as_bytes()[..2]
                .try_into()
                .unwrap_or([0; 2]),
        );
        let forwarded = dns_wire::with_id(&dns_wire::forwardable(packet, query), id);
        let late = |transport| Unanswered::Late {
            upstream,
            transport,
            ms: within.as_millis(),
        };
        let failed = |transport| {
            move |error| Unanswered::Failed {
                upstream,
                transport,
                error: Arc::new(error),
            }
        };
        let udp = tokio::time::timeout(within, ask_udp(upstream, &forwarded, query, id))
            .await
            .map_err(|_| late("UDP"))?
            .map_err(failed("UDP"))?;
        let bytes = match udp {
            Some(bytes) => bytes,
            None => tokio::time::timeout(within, ask_tcp(upstream, &forwarded))
                .await
                .map_err(|_| late("TCP"))?
                .map_err(failed("TCP"))?,
        };
        let response =
            dns_wire::parse_response(&bytes, query, id).ok_or(Unanswered::Mismatched(upstream))?;
        let ttl = match (response.rcode, response.answers) {
            (0, n) if n > 0 => response.min_ttl.unwrap_or(0),
            (0 | 3, _) => response.negative_ttl.unwrap_or(0),
            _ => 0,
        };
        Ok(Arc::new(Entry {
            bytes,
            ttl_offsets: response.ttl_offsets,
            stored: Instant::now(),
            ttl: ttl.min(MAX_TTL),
        }))
    }
}

/// An answer worth serving as it is: NOERROR or NXDOMAIN (not SERVFAIL, REFUSED, ...).
fn usable(entry: &Entry) -> bool {
    matches!(entry.bytes.get(3).map(|f| f & 0x0f), Some(0 | 3))
}

/// One UDP exchange: the answer, or `None` when it came truncated (ask over TCP).
async fn ask_udp(
    upstream: SocketAddr,
    packet: &[u8],
    query: &Query,
    id: u16,
) -> std::io::Result<Option<Vec<u8>>> {
    let local: SocketAddr = if upstream.is_ipv6() {
        SocketAddr::from(([0u16; 8], 0))
    } else {
        SocketAddr::from(([0u8; 4], 0))
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(packet).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Only the answer to this question counts (a connected socket hears only the
        // upstream; the id and question must match too).
        let Some(response) = dns_wire::parse_response(&buf[..n], query, id) else {
            continue;
        };
        if response.truncated {
            return Ok(None);
        }
        buf.truncate(n);
        return Ok(Some(buf));
    }
}

async fn ask_tcp(upstream: SocketAddr, packet: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}
