//! Serving HTTP/1 on a TCP listener so that no client can hold the service: every connection
//! is in one table, with what it is doing.
//!
//! - **Idle** (no request in flight, no byte of the next one): closed after `idle_timeout`.
//! - **Reading a request head** (bytes arrived, the head is not complete): closed
//!   `header_timeout` after its first byte. A half-sent request is never a request in flight.
//! - **Reading a request body**: the body fails `body_timeout` after the request began (a slow
//!   sender gets 408 from the JSON extractor, and the connection closes).
//! - **Serving** (from the complete head until hyper has taken the response's last bytes):
//!   not timed by its length; long polls and SSE streams are bounded by their own routes.
//! - **Waiting for the client to read** (a write found the socket's send buffer full and has
//!   not gone out since): closed after `idle_timeout`, serving or not, so that a client that
//!   stops reading a live stream or a large answer does not hold it for ever.
//!
//! The table is capped in total and per client address. A connection over a cap closes the
//! oldest idle connection (of that address, for the per-address cap) and takes its place; when
//! none is idle it is answered 503 in the JSON envelope and closed, without reading anything.
//! The total cap never exceeds what the process's file descriptors allow: at start the soft
//! `RLIMIT_NOFILE` is raised to the hard one, and a cap above it less a reserve for the pools is
//! lowered (logged). An `accept` that still fails for lack of descriptors closes the oldest idle
//! connection too.
//!
//! Shutdown stops accepting, closes idle connections, and lets each request in flight finish
//! before its connection closes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tower::ServiceExt;

use crate::http::BodyTimedOut;
use crate::settings::HttpLimits;

/// Descriptors kept back from the connection cap: the PostgreSQL and Redis pools, probes and
/// subscriptions, the gateway's own Redis connections for waiting action lookups (at most 256),
/// refused sockets lingering (at most [`MAX_LINGERING`]), files.
const FD_RESERVE: u64 = 640;

/// How long a refused connection's socket lingers so that its answer is read.
const LINGER: Duration = Duration::from_secs(1);

/// Refused sockets lingering at once (each holds a descriptor for up to [`LINGER`]).
const MAX_LINGERING: usize = 64;

/// How often idle and half-sent connections are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// What a connection refused at a cap is told before it is closed.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 82\r\n\
\r\n\
{\"error\":{\"code\":\"ERR_UNAVAILABLE\",\"message\":\"too many connections; retry later\"}}";

/// Serve `router` on `listener` within `limits` until `shutdown` fires, then finish the
/// requests in flight; over TLS when `tls` says where the certificate is (read again when
/// it changes).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &HttpLimits,
    tls: Option<&crate::tls::TlsFiles>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = HttpLimits {
        max_connections: connection_cap(limits.max_connections),
        ..limits.clone()
    };
    let (acceptor, _watcher) = match tls {
        None => (None, None),
        Some(files) => {
            let reloading =
                crate::tls::Reloading::new(files.clone()).map_err(std::io::Error::other)?;
            let config = reloading.server_config().map_err(std::io::Error::other)?;
            let watcher = AbortOnDropHandle::new(tokio::spawn(reloading.watch(shutdown.clone())));
            (Some(tokio_rustls::TlsAcceptor::from(config)), Some(watcher))
        }
    };
    let table = Arc::new(Table::new(limits.clone()));
    let connections = TaskTracker::new();
    let refusals = Arc::new(tokio::sync::Semaphore::new(MAX_LINGERING));
    // Until every connection is done: timeouts hold while requests drain at shutdown too.
    let sweeper = AbortOnDropHandle::new(tokio::spawn(sweep(table.clone())));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                if is_out_of_descriptors(&error) {
                    metrics::counter!("http_accept_errors_total", "reason" => "descriptors")
                        .increment(1);
                    table.evict_oldest_idle(None);
                } else {
                    metrics::counter!("http_accept_errors_total", "reason" => "other").increment(1);
                    tracing::debug!(%error, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // No Nagle delay: an SSE event or a long poll's answer goes out when it is written,
        // not when the client acknowledged the previous segment.
        let _ = stream.set_nodelay(true);
        let Some(admitted) = table.admit(peer.ip()) else {
            metrics::counter!("http_connections_closed_total", "reason" => "refused").increment(1);
            // A TLS client cannot read a plain answer: it is only closed.
            if acceptor.is_none() {
                refuse(stream, &refusals);
            }
            continue;
        };
        connections.spawn(connection(
            stream,
            peer,
            router.clone(),
            admitted,
            table.clone(),
            limits.body_timeout,
            acceptor.clone(),
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    drop(sweeper);
    Ok(())
}

/// Answer a connection over the caps with [`REFUSED`] and close it. A fresh socket's send
/// buffer is empty, so the write does not wait for the client. Closing at once would reset
/// the connection when the client's request arrives, and a reset can destroy the answer
/// before the client reads it; so the socket lingers (write side shut, the request read and
/// dropped) for at most [`LINGER`], with at most [`MAX_LINGERING`] such sockets at a time.
fn refuse(stream: TcpStream, refusals: &Arc<tokio::sync::Semaphore>) {
    let _ = stream.try_write(REFUSED);
    let Ok(place) = refusals.clone().try_acquire_owned() else {
        return;
    };
    // detached: bounded by LINGER and MAX_LINGERING; nothing to wait for at shutdown.
    tokio::spawn(async move {
        let _place = place;
        let mut stream = stream;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        let _ = tokio::time::timeout(LINGER, async {
            let mut sink = [0u8; 4096];
            while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    });
}

/// The cap on open connections this process can keep: `wanted`, or less if the descriptors
/// (after raising the soft limit to the hard one) would run out first.
fn connection_cap(wanted: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return wanted;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let affordable = usize::try_from(soft.saturating_sub(FD_RESERVE).max(16)).unwrap_or(usize::MAX);
    if affordable < wanted {
        tracing::warn!(
            wanted,
            open_files = soft,
            cap = affordable,
            "HTTP_MAX_CONNECTIONS lowered to what RLIMIT_NOFILE allows"
        );
        affordable
    } else {
        wanted
    }
}

fn is_out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE
    )
}

/// Serve one connection until it ends, is closed by the table, or the service shuts down.
#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    admitted: Admitted,
    table: Arc<Table>,
    body_timeout: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let Admitted { id, state, close } = admitted;
    let origin = table.origin;
    let watched = Watched {
        stream,
        state: state.clone(),
        origin: table.origin,
    };
    let io = match tls {
        None => Io::Plain(watched),
        // The handshake's first byte starts the header timeout, as a request head's would.
        Some(acceptor) => {
            let accepted = tokio::select! {
                accepted = acceptor.accept(watched) => accepted,
                _ = close.cancelled() => return table.remove(id),
                _ = shutdown.cancelled() => return table.remove(id),
            };
            match accepted {
                Ok(stream) => Io::Tls(Box::new(stream)),
                Err(error) => {
                    metrics::counter!("http_tls_handshake_failures_total").increment(1);
                    tracing::debug!(%error, "TLS handshake failed");
                    return table.remove(id);
                }
            }
        }
    };
    let io = TokioIo::new(io);
    let limits = table.limits.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let router = router.clone();
        let busy = Busy::begin(state.clone(), origin);
        let refused = crate::http::over_head_limits(&request, &limits);
        async move {
            if let Some(refused) = refused {
                metrics::counter!("http_heads_refused_total", "status" => refused.status.as_str().to_owned())
                    .increment(1);
                drop(busy);
                return Ok(refused.into_response());
            }
            let mut request = request.map(|body| {
                if http_body::Body::is_end_stream(&body) {
                    Body::new(body)
                } else {
                    Body::new(Deadline::new(body, body_timeout))
                }
            });
            request.extensions_mut().insert(ConnectInfo(peer));
            let response = match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            // The connection is busy until the response's last byte is written (or the
            // response is dropped with the connection).
            Ok::<_, Infallible>(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _ = &busy;
                    frame
                }))
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.max_headers(table.limits.max_headers.saturating_mul(2).max(100));
    // A half-sent head holds its read buffer until the header timeout: keep that small.
    builder.max_header_size(
        (table.limits.max_uri_bytes + table.limits.max_header_bytes)
            .saturating_mul(2)
            .max(16 * 1024),
    );
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => {
            if let Err(error) = served {
                tracing::debug!(%error, "connection ended with an error");
            }
        }
        _ = close.cancelled() => {}
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = close.cancelled() => {}
            }
        }
    }
    table.remove(id);
}

/// What one connection is doing, written by its I/O and its requests, read by the sweeper.
#[derive(Debug, Default)]
struct ConnState {
    /// Requests from a complete head to the response's last byte.
    busy: AtomicU32,
    /// Milliseconds since the table's origin when the connection last became idle.
    idle_since: AtomicU64,
    /// Milliseconds since the origin (plus one; zero is none) of the first byte read while
    /// idle: the start of a request head.
    head_started: AtomicU64,
    /// Milliseconds since the origin (plus one; zero is none) since when a write has been
    /// waiting for the client to read: a client that stops reading a response.
    write_stalled: AtomicU64,
}

/// A request in flight on a connection, until dropped.
struct Busy {
    state: Arc<ConnState>,
    origin: Instant,
}

impl Busy {
    fn begin(state: Arc<ConnState>, origin: Instant) -> Self {
        state.busy.fetch_add(1, Ordering::AcqRel);
        state.head_started.store(0, Ordering::Release);
        Self { state, origin }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.state
            .idle_since
            .store(millis_since(self.origin), Ordering::Release);
        self.state.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The socket, noting when a request head starts to arrive on an idle connection and when
/// writes stop making progress.
struct Watched {
    stream: TcpStream,
    state: Arc<ConnState>,
    origin: Instant,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before
            && self.state.busy.load(Ordering::Acquire) == 0
            && self.state.head_started.load(Ordering::Acquire) == 0
        {
            self.state
                .head_started
                .store(millis_since(self.origin) + 1, Ordering::Release);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note_write(polled.is_pending());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.note_write(polled.is_pending());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Watched {
    /// A write waited for the client (the socket's send buffer is full), or went out.
    fn note_write(&self, waiting: bool) {
        let stalled = &self.state.write_stalled;
        if waiting {
            if stalled.load(Ordering::Acquire) == 0 {
                stalled.store(millis_since(self.origin) + 1, Ordering::Release);
            }
        } else if stalled.load(Ordering::Acquire) != 0 {
            stalled.store(0, Ordering::Release);
        }
    }
}

/// A connection's stream: the watched socket, or TLS over it.
enum Io {
    Plain(Watched),
    Tls(Box<tokio_rustls::server::TlsStream<Watched>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn millis_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
}

/// A request body that fails once `timeout` has passed since the request began. Its timer
/// is only set when the body is waited for (most bodies come with their head).
struct Deadline {
    body: Incoming,
    started: Instant,
    deadline: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
}

impl Deadline {
    fn new(body: Incoming, timeout: Duration) -> Self {
        Self {
            body,
            started: Instant::now(),
            deadline: None,
            timeout,
        }
    }
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match this
                .deadline
                .get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(this.started + this.timeout))
                })
                .as_mut()
                .poll(cx)
            {
                Poll::Ready(()) => {
                    metrics::counter!("http_body_timeouts_total").increment(1);
                    Poll::Ready(Some(Err(Box::new(BodyTimedOut(this.timeout)))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Every open connection: who it is from and what it is doing.
struct Table {
    limits: HttpLimits,
    origin: Instant,
    inner: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    connections: HashMap<u64, Entry>,
    per_address: HashMap<IpAddr, usize>,
}

struct Entry {
    peer: IpAddr,
    state: Arc<ConnState>,
    close: CancellationToken,
}

/// A connection the table took in.
struct Admitted {
    id: u64,
    state: Arc<ConnState>,
    close: CancellationToken,
}

impl Table {
    fn new(limits: HttpLimits) -> Self {
        Self {
            limits,
            origin: Instant::now(),
            inner: Mutex::new(Open::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take in a connection from `peer`, closing the oldest idle one where a cap is reached;
    /// `None` when a cap is reached and nothing there is idle.
    fn admit(&self, peer: IpAddr) -> Option<Admitted> {
        let mut open = self.lock();
        let per_address_cap = self.limits.max_connections_per_address;
        if per_address_cap > 0
            && open.per_address.get(&peer).copied().unwrap_or(0) >= per_address_cap
            && !self.evict(&mut open, Some(peer))
        {
            return None;
        }
        if open.connections.len() >= self.limits.max_connections && !self.evict(&mut open, None) {
            return None;
        }
        let id = open.next_id;
        open.next_id += 1;
        let state = Arc::new(ConnState::default());
        state
            .idle_since
            .store(millis_since(self.origin), Ordering::Release);
        let close = CancellationToken::new();
        open.connections.insert(
            id,
            Entry {
                peer,
                state: state.clone(),
                close: close.clone(),
            },
        );
        *open.per_address.entry(peer).or_default() += 1;
        metrics::gauge!("http_connections_open").set(open.connections.len() as f64);
        Some(Admitted { id, state, close })
    }

    /// Close the oldest idle connection (from `peer` only, if given).
    fn evict_oldest_idle(&self, peer: Option<IpAddr>) -> bool {
        let mut open = self.lock();
        self.evict(&mut open, peer)
    }

    fn evict(&self, open: &mut Open, peer: Option<IpAddr>) -> bool {
        let oldest = open
            .connections
            .iter()
            .filter(|(_, e)| peer.is_none_or(|p| e.peer == p))
            .filter(|(_, e)| e.state.busy.load(Ordering::Acquire) == 0)
            .min_by_key(|(id, e)| (e.state.idle_since.load(Ordering::Acquire), **id))
            .map(|(id, _)| *id);
        match oldest {
            Some(id) => {
                Self::close(open, id);
                metrics::counter!("http_connections_closed_total", "reason" => "evicted")
                    .increment(1);
                true
            }
            None => false,
        }
    }

    fn close(open: &mut Open, id: u64) {
        if let Some(entry) = open.connections.remove(&id) {
            entry.close.cancel();
            if let Some(count) = open.per_address.get_mut(&entry.peer) {
                *count -= 1;
                if *count == 0 {
                    open.per_address.remove(&entry.peer);
                }
            }
        }
        metrics::gauge!("http_connections_open").set(open.connections.len() as f64);
    }

    /// A connection that ended on its own.
    fn remove(&self, id: u64) {
        Self::close(&mut self.lock(), id);
    }

    /// Close the connections idle, reading a head, or waiting for the client to read for too
    /// long.
    fn sweep(&self) {
        let now = millis_since(self.origin);
        let idle_ms = u64::try_from(self.limits.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let header_ms = u64::try_from(self.limits.header_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut open = self.lock();
        let mut expired = Vec::new();
        for (id, entry) in &open.connections {
            let state = &entry.state;
            // Serving or not: a client that reads nothing of what it is sent for the idle
            // timeout holds the connection for nothing (a live stream it stopped reading
            // would otherwise stay open for ever).
            let stalled = state.write_stalled.load(Ordering::Acquire);
            if stalled > 0 && now.saturating_sub(stalled - 1) >= idle_ms {
                expired.push((*id, "write_stalled"));
                continue;
            }
            if state.busy.load(Ordering::Acquire) > 0 {
                continue;
            }
            let head_started = state.head_started.load(Ordering::Acquire);
            if head_started > 0 {
                if now.saturating_sub(head_started - 1) >= header_ms {
                    expired.push((*id, "header_timeout"));
                }
            } else if now.saturating_sub(state.idle_since.load(Ordering::Acquire)) >= idle_ms {
                expired.push((*id, "idle_timeout"));
            }
        }
        for (id, reason) in expired {
            Self::close(&mut open, id);
            metrics::counter!("http_connections_closed_total", "reason" => reason).increment(1);
        }
    }
}

async fn sweep(table: Arc<Table>) {
    let mut ticker = tokio::time::interval(SWEEP_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        table.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_address: usize) -> HttpLimits {
        HttpLimits {
            max_connections: max,
            max_connections_per_address: per_address,
            ..HttpLimits::default()
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn streaming_router() -> Router {
        use axum::routing::get;
        Router::new()
            .route(
                "/slow",
                get(|| async {
                    let chunks = futures::stream::unfold(0u32, |n| async move {
                        if n == 6 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let chunk = Bytes::from(format!("chunk{n};"));
                        Some((Ok::<_, Infallible>(chunk), n + 1))
                    });
                    Body::from_stream(chunks)
                }),
            )
            .route(
                "/endless",
                get(|| async {
                    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                    Body::from_stream(futures::stream::repeat_with(move || {
                        Ok::<_, Infallible>(chunk.clone())
                    }))
                }),
            )
    }

    /// [`serve`] on an ephemeral port of 127.0.0.1 with `limits`, until the token is dropped.
    async fn serving(limits: HttpLimits) -> (SocketAddr, tokio_util::sync::DropGuard) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("an address");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move { serve(listener, streaming_router(), &limits, None, stop).await });
        (addr, shutdown.drop_guard())
    }

    fn idle_after(ms: u64) -> HttpLimits {
        HttpLimits {
            idle_timeout: Duration::from_millis(ms),
            ..HttpLimits::default()
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_response_still_streaming_is_not_idle() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, _stop) = serving(idle_after(300)).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        // 1.2 s of chunks, 200 ms apart, through a 300 ms idle timeout: all of them arrive.
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("the answer ends")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.contains("chunk5;"), "{answer}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_client_that_stops_reading_is_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, _stop) = serving(idle_after(300)).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /endless HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("write");
        // Read nothing while the server fills the socket's buffers and waits on them: past the
        // idle timeout (and a sweep) it gives up. Nothing here can observe that but the end.
        tokio::time::sleep(Duration::from_secs(2)).await;
        // What was sent before is still to read, then the end; a server still streaming
        // would keep this loop reading until the timeout.
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the server still streams to a client that stopped reading"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_stalled_past_the_idle_timeout_closes_even_a_busy_connection() {
        let table = Table::new(idle_after(10_000));
        let conn = table.admit(ip(1)).expect("room");
        let _busy = Busy::begin(conn.state.clone(), table.origin);
        conn.state
            .write_stalled
            .store(millis_since(table.origin) + 1, Ordering::Release);
        tokio::time::advance(Duration::from_secs(9)).await;
        table.sweep();
        assert!(!conn.close.is_cancelled());
        tokio::time::advance(Duration::from_secs(1)).await;
        table.sweep();
        assert!(conn.close.is_cancelled());
    }

    #[test]
    fn the_refusal_is_a_complete_answer_in_the_envelope() {
        let text = std::str::from_utf8(REFUSED).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let body: checkplane_wire::ErrorBody = serde_json::from_str(body).expect("the envelope");
        assert_eq!(body.error.code, checkplane_wire::ErrorCode::Unavailable);
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_idle_connection_makes_room() {
        let table = Table::new(limits(2, 0));
        let first = table.admit(ip(1)).expect("room");
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = table.admit(ip(2)).expect("room");
        let third = table
            .admit(ip(3))
            .expect("the oldest idle is closed for it");
        assert!(first.close.is_cancelled());
        assert!(!second.close.is_cancelled());
        assert!(!third.close.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_is_never_evicted_and_a_full_table_refuses() {
        let table = Table::new(limits(2, 0));
        let first = table.admit(ip(1)).expect("room");
        let second = table.admit(ip(2)).expect("room");
        let _a = Busy::begin(first.state.clone(), table.origin);
        let _b = Busy::begin(second.state.clone(), table.origin);
        assert!(table.admit(ip(3)).is_none());
        assert!(!first.close.is_cancelled() && !second.close.is_cancelled());
        drop(_b);
        assert!(table.admit(ip(3)).is_some());
        assert!(second.close.is_cancelled());
        assert!(!first.close.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn the_per_address_cap_evicts_within_that_address() {
        let table = Table::new(limits(10, 2));
        let a1 = table.admit(ip(1)).expect("room");
        let b1 = table.admit(ip(2)).expect("room");
        tokio::time::advance(Duration::from_secs(1)).await;
        let a2 = table.admit(ip(1)).expect("room");
        let a3 = table.admit(ip(1)).expect("a1 makes room");
        assert!(a1.close.is_cancelled());
        assert!(!b1.close.is_cancelled() && !a2.close.is_cancelled() && !a3.close.is_cancelled());
        let _busy2 = Busy::begin(a2.state.clone(), table.origin);
        let _busy3 = Busy::begin(a3.state.clone(), table.origin);
        assert!(table.admit(ip(1)).is_none(), "ip 1 has nothing idle");
        assert!(
            table.admit(ip(2)).is_some(),
            "other addresses are not affected"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_half_sent_connections_expire_on_their_own_clocks() {
        let table = Table::new(HttpLimits {
            idle_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(5),
            ..HttpLimits::default()
        });
        let idle = table.admit(ip(1)).expect("room");
        let half_sent = table.admit(ip(2)).expect("room");
        let serving = table.admit(ip(3)).expect("room");
        half_sent
            .state
            .head_started
            .store(millis_since(table.origin) + 1, Ordering::Release);
        let _busy = Busy::begin(serving.state.clone(), table.origin);
        tokio::time::advance(Duration::from_secs(5)).await;
        table.sweep();
        assert!(half_sent.close.is_cancelled());
        assert!(!idle.close.is_cancelled());
        tokio::time::advance(Duration::from_secs(55)).await;
        table.sweep();
        assert!(idle.close.is_cancelled());
        assert!(
            !serving.close.is_cancelled(),
            "a request in flight is not timed here"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_request_starts_the_idle_clock_again() {
        let table = Table::new(HttpLimits {
            idle_timeout: Duration::from_secs(10),
            ..HttpLimits::default()
        });
        let conn = table.admit(ip(1)).expect("room");
        let busy = Busy::begin(conn.state.clone(), table.origin);
        tokio::time::advance(Duration::from_secs(30)).await;
        table.sweep();
        assert!(
            !conn.close.is_cancelled(),
            "a request in flight is not idle"
        );
        drop(busy);
        tokio::time::advance(Duration::from_secs(9)).await;
        table.sweep();
        assert!(!conn.close.is_cancelled());
        tokio::time::advance(Duration::from_secs(1)).await;
        table.sweep();
        assert!(conn.close.is_cancelled());
    }
}
