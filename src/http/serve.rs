//! Serving connections: the accept loop and everything a hostile client could abuse
//! below the router.
//!
//! `axum::serve` sets no header-read timeout, so a client sending half a header would
//! hold a connection forever; here every connection is served by hyper's own HTTP/1 and
//! HTTP/2 connections with a timer. Per connection: a TLS handshake timeout, a
//! header-read timeout (from a request head's first byte to its end: see `HeadTimer`;
//! the first bytes of a connection are bounded by it too), caps on header bytes and
//! count, HTTP/2 stream and reset-flood limits, and an idle timeout on the socket itself
//! (no byte moved either way for `idle_timeout` closes it; this is also how long a
//! kept-alive connection may wait for its next request). A semaphore caps concurrent
//! connections: at the cap, new connections wait in the kernel's backlog instead of
//! consuming memory. One address may hold at most `max_connections_per_ip` of them
//! (trusted proxies excepted): beyond it a new connection is closed at once, so one host
//! cannot take every slot.
//!
//! Resting: hyper keeps about 27 KiB of buffers per HTTP/1 connection for as long as it
//! lives, also while it waits for the next request. A kept-alive connection that has
//! waited `REST_AFTER` for its next request, with hyper idle between two requests, ends
//! hyper's connection without closing the socket (`graceful_shutdown` of an idle hyper
//! connection reads and writes nothing more), keeps only the TLS stream until the
//! client sends again, then starts a new hyper connection on it with whatever hyper had
//! read ahead. Nothing the client sees changes; the wait costs the TLS state alone.
//!
//! Each request carries its client address as `ConnectInfo` (see `client_addr`).
//!
//! Closing: a server that answers without reading the whole request (a 413, a download
//! asked for with a body) and then closes a socket with unread bytes in it makes the
//! kernel send a reset, which can destroy the answer before the client reads it. So a
//! connection's socket is closed as nginx's lingering close does (`Lingering`): the
//! write side is shut first (the client sees the end of the answer), then what the
//! client still sends is read and thrown away, for a bounded time and amount, before
//! the socket is closed.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::client_addr::{ForwardedBy, client_address};
use crate::config::ServerConfig;

/// hyper refuses a read buffer smaller than this.
const HYPER_MIN_BUF: usize = 8192;

/// How the accept loop ended.
#[derive(Debug, Default)]
pub(crate) struct Drained {
    /// Connections still open when the grace period ran out (closed by force).
    pub(crate) cut: usize,
}

/// A kept-alive HTTP/1 connection rests (see the module documentation) once it has
/// waited this long for its next request. Short enough that a crowd of idle clients
/// costs little; long enough that a busy connection never rests between requests.
const REST_AFTER: Duration = Duration::from_secs(1);

/// hyper's connection settings, made once.
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(limits: &ServerConfig) -> Self {
        let mut h1 = http1::Builder::new();
        h1.header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(HYPER_MIN_BUF))
            .max_headers(limits.max_headers)
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            // Rapid-reset (CVE-2023-44487) and local-error floods close the connection.
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(64))
            // No server pings: their answers would count as activity and keep an idle
            // HTTP/2 connection open for ever. A dead or idle peer is closed by the idle
            // timeout.
            .keep_alive_interval(None);
        Self { h1, h2 }
    }
}

/// Accepts connections until `shutdown` resolves, then drains for `shutdown_grace`.
pub(crate) async fn serve<S>(
    listener: TcpListener,
    tls: Option<crate::tls::Acceptor>,
    app: S,
    limits: ServerConfig,
    counters: Arc<super::metrics::HttpCounters>,
    shutdown: impl Future<Output = ()>,
) -> Drained
where
    S: App,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = PerAddress::default();
    let (drain, draining) = watch::channel(false);
    let builders = Arc::new(Builders::new(&limits));
    let shared_limits = Arc::new(limits.clone());
    let acceptor = tls;
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let peer_ip = peer.ip().to_canonical();
        let proxy = limits.trusted_proxies.iter().any(|n| n.contains(&peer_ip));
        let held = if proxy {
            None
        } else {
            match per_address.take(peer_ip, limits.max_connections_per_ip) {
                Some(held) => Some(held),
                None => {
                    tracing::debug!(%peer, "connection refused: too many open from this address");
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let open = Gauge::up(counters.clone(), |c| &c.connections_open);
        let connection = Connection {
            app: app.clone(),
            counters: counters.clone(),
            builders: builders.clone(),
            draining: draining.clone(),
            limits: shared_limits.clone(),
            peer,
            proxy,
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            connection.run(stream, acceptor).await;
            drop(open);
            drop(held);
            drop(permit);
        });
    }
    drop(listener);
    // Every connection finishes its request in progress and closes; a resting one
    // closes at once. Each holds its slot until it has.
    let _ = drain.send(true);
    let deadline = Instant::now() + limits.shutdown_grace;
    let total = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    match tokio::time::timeout_at(deadline, slots.acquire_many(total)).await {
        Ok(_) => Drained { cut: 0 },
        Err(_) => {
            tracing::warn!("grace period over; closing the remaining connections");
            Drained {
                cut: limits.max_connections - slots.available_permits(),
            }
        }
    }
}

/// What `serve` serves: axum's router or `super::App`.
pub(crate) trait App:
    tower::Service<
        http::Request<Incoming>,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> App for S where
    S: tower::Service<
            http::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

struct Connection<S> {
    app: S,
    counters: Arc<super::metrics::HttpCounters>,
    builders: Arc<Builders>,
    /// Turns true when the server stops taking connections.
    draining: watch::Receiver<bool>,
    limits: Arc<ServerConfig>,
    peer: SocketAddr,
    /// The peer is one of `server.trusted_proxies` (decided once, at accept).
    proxy: bool,
}

/// Which protocol a connection speaks, from its first bytes.
enum Protocol {
    Http1,
    Http2,
}

impl<S: App> Connection<S> {
    async fn run(self, stream: tokio::net::TcpStream, acceptor: Option<crate::tls::Acceptor>) {
        let activity = Arc::new(Activity::new());
        let stream = Lingering(Some(stream));
        match acceptor {
            None => {
                let io = IdleIo::plaintext(stream, activity.clone());
                self.serve_io(io, activity).await;
            }
            Some(acceptor) => {
                let io = IdleIo::raw(stream, activity.clone());
                // Boxed, as hyper's connections are below: the task keeps the size of
                // what it holds while it waits, not of the handshake's state.
                let handshake = tokio::time::timeout(
                    self.limits.tls_handshake_timeout,
                    Box::pin(acceptor.accept(io)),
                );
                match handshake.await {
                    Ok(Ok(Some(tls))) => {
                        // Boxed: an async task keeps a slot for each place its stream
                        // passes through, so a 1.2 KiB stream held inline would be
                        // counted several times over in every connection's task.
                        let io = IdleIo::plaintext(Box::new(tls), activity.clone());
                        self.serve_io(io, activity).await;
                    }
                    Ok(Ok(None)) => {
                        tracing::debug!(peer = %self.peer, "answered an ACME TLS-ALPN-01 validation");
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(peer = %self.peer, error = %err, "TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(peer = %self.peer, "TLS handshake timed out"),
                }
            }
        }
    }

    async fn serve_io<I>(mut self, mut io: I, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
    {
        let peer = self.peer;
        // The first bytes tell HTTP/1 from HTTP/2's preface; a client that sends none
        // within the header-read timeout (or the idle timeout, if shorter) is closed.
        let sniffed = tokio::select! {
            sniffed = sniff(&mut io) => sniffed,
            () = tokio::time::sleep(self.limits.header_read_timeout) => {
                tracing::debug!(%peer, "connection sent no request in time");
                return;
            }
            () = activity.expired(self.limits.idle_timeout) => {
                tracing::debug!(%peer, "idle connection closed");
                return;
            }
            // A stopping server closes a connection that has not begun a request.
            _ = self.draining.wait_for(|draining| *draining) => return,
        };
        let (protocol, first) = match sniffed {
            Ok(Some(sniffed)) => sniffed,
            Ok(None) => return,
            Err(err) => {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
                return;
            }
        };
        let io = Prefixed::new(first, io);
        match protocol {
            Protocol::Http1 => self.serve_http1(io, activity).await,
            Protocol::Http2 => self.serve_http2(io, activity).await,
        }
    }

    /// What hyper calls for each request of this connection.
    fn service(&self, activity: &Arc<Activity>) -> ConnService<S> {
        let peer = self.peer;
        ConnService {
            app: std::cell::RefCell::new(self.app.clone()),
            peer,
            direct: SocketAddr::new(peer.ip().to_canonical(), peer.port()),
            // Only a trusted proxy's requests have their forwarding headers read; every
            // other connection's client is its peer, with no per-request work.
            trusted: self.proxy.then(|| self.limits.clone()),
            activity: activity.clone(),
        }
    }

    /// HTTP/1: one hyper connection per run of requests, resting in between.
    async fn serve_http1<I>(mut self, mut io: Prefixed<I>, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let mut builder = self.builders.h1.clone();
        builder.timer(HeadTimer(activity.clone()));
        let expired = activity.expired(self.limits.idle_timeout);
        tokio::pin!(expired);
        loop {
            let conn = builder
                .serve_connection(TokioIo::new(io), self.service(&activity))
                .with_upgrades();
            // Boxed: hyper's state lives on the heap only while it serves.
            let mut conn = Box::pin(conn);
            let mut resting = false;
            let mut closing = false;
            let mut seen = activity.requests_seen();
            let result = loop {
                tokio::select! {
                    result = conn.as_mut() => break result,
                    () = &mut expired => {
                        tracing::debug!(%peer, "idle connection closed");
                        return;
                    }
                    _ = self.draining.wait_for(|draining| *draining), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    () = tokio::time::sleep(REST_AFTER), if !resting && !closing => {
                        let now = activity.requests_seen();
                        if now == seen && now.waiting_for_next() {
                            // hyper is idle between two requests and read nothing since
                            // the last look: ending it now reads and writes nothing.
                            resting = true;
                            activity.resting.store(true, Ordering::Relaxed);
                            conn.as_mut().graceful_shutdown();
                        }
                        seen = now;
                    }
                }
            };
            activity.resting.store(false, Ordering::Relaxed);
            if let Err(err) = result {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
                return;
            }
            if !resting {
                // hyper closed it (the client asked, an error, a drain) or it was
                // upgraded to a WebSocket, which now owns the stream.
                return;
            }
            let Some(parts) = Pin::into_inner(conn).into_parts() else {
                return;
            };
            io = parts.io.into_inner();
            io.prepend(parts.read_buf);
            if !io.has_prefix() {
                let _resting = Gauge::up(self.counters.clone(), |c| &c.connections_resting);
                tokio::select! {
                    ready = std::future::poll_fn(|cx| io.poll_read_ready(cx)) => {
                        if ready.is_err() {
                            return;
                        }
                    }
                    () = &mut expired => {
                        tracing::debug!(%peer, "idle connection closed");
                        return;
                    }
                    _ = self.draining.wait_for(|draining| *draining) => return,
                }
            }
        }
    }

    async fn serve_http2<I>(mut self, io: Prefixed<I>, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let conn = self
            .builders
            .h2
            .serve_connection(TokioIo::new(io), self.service(&activity));
        let mut conn = Box::pin(conn);
        let expired = activity.expired(self.limits.idle_timeout);
        tokio::pin!(expired);
        let mut closing = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                    return;
                }
                () = &mut expired => {
                    tracing::debug!(%peer, "idle connection closed");
                    return;
                }
                _ = self.draining.wait_for(|draining| *draining), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// One unit of a gauge of `HttpCounters`, given back when dropped.
struct Gauge {
    counters: Arc<super::metrics::HttpCounters>,
    which: fn(&super::metrics::HttpCounters) -> &AtomicU64,
}

impl Gauge {
    fn up(
        counters: Arc<super::metrics::HttpCounters>,
        which: fn(&super::metrics::HttpCounters) -> &AtomicU64,
    ) -> Self {
        which(&counters).fetch_add(1, Ordering::Relaxed);
        Self { counters, which }
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        (self.which)(&self.counters).fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads a connection's first bytes until they differ from HTTP/2's preface or are all
/// of it. `None`: closed before the first byte.
async fn sniff<I: AsyncRead + Unpin>(io: &mut I) -> io::Result<Option<(Protocol, Bytes)>> {
    const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    let mut filled = 0;
    loop {
        let read = io.read(&mut buf[filled..]).await?;
        if read == 0 {
            // Closed: nothing to answer, or a fragment hyper will refuse.
            return Ok(
                (filled > 0).then(|| (Protocol::Http1, Bytes::copy_from_slice(&buf[..filled])))
            );
        }
        filled += read;
        if buf[..filled] != H2_PREFACE[..filled] {
            return Ok(Some((
                Protocol::Http1,
                Bytes::copy_from_slice(&buf[..filled]),
            )));
        }
        if filled == H2_PREFACE.len() {
            return Ok(Some((Protocol::Http2, Bytes::copy_from_slice(&buf))));
        }
    }
}

/// The service hyper calls for each request of one connection: tags the request with
/// its client address, then hands it to the router.
struct ConnService<S> {
    /// hyper calls through `&self`, tower through `&mut self`: one copy per connection
    /// serves every request, borrowed for the time of `call` (which only starts the
    /// request: the future it returns owns what it needs).
    app: std::cell::RefCell<S>,
    peer: SocketAddr,
    direct: SocketAddr,
    /// The settings holding `trusted_proxies`, when the peer is one of them.
    trusted: Option<Arc<ServerConfig>>,
    activity: Arc<Activity>,
}

impl<S: App> hyper::service::Service<http::Request<Incoming>> for ConnService<S> {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = S::Future;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        self.activity.requests.fetch_add(1, Ordering::Relaxed);
        let client = match &self.trusted {
            Some(trusted) => {
                request.extensions_mut().insert(ForwardedBy(self.peer));
                let client =
                    client_address(self.peer.ip(), request.headers(), &trusted.trusted_proxies);
                SocketAddr::new(client, self.peer.port())
            }
            None => self.direct,
        };
        request.extensions_mut().insert(ConnectInfo(client));
        // Every layer of the app is always ready (no layer applies backpressure: limits
        // answer, they do not wait), so calling without `poll_ready` is allowed.
        tower::Service::call(&mut *self.app.borrow_mut(), request)
    }
}

/// A stream with bytes already read from it in front: what a connection's first read
/// took to tell the protocol, or what hyper had read ahead when it stopped.
struct Prefixed<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Prefixed<I> {
    fn new(prefix: Bytes, inner: I) -> Self {
        Self { prefix, inner }
    }

    /// Puts `bytes` in front of what is still unread.
    fn prepend(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if self.prefix.is_empty() {
            self.prefix = bytes;
        } else {
            let mut joined = Vec::with_capacity(bytes.len() + self.prefix.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.prefix);
            self.prefix = Bytes::from(joined);
        }
    }

    fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }
}

impl<I: ReadReady> Prefixed<I> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_read_ready(cx)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let taken = self.prefix.split_to(n);
            buf.put_slice(&taken);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream that can say when its socket has bytes to read, without reading them.
trait ReadReady {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for Lingering {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.0 {
            Some(stream) => stream.poll_read_ready(cx),
            None => Poll::Ready(Err(io::Error::from(io::ErrorKind::NotConnected))),
        }
    }
}

impl<T: ReadReady> ReadReady for IdleIo<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_read_ready(cx)
    }
}

impl<T: ReadReady> ReadReady for Box<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }
}

/// A resting TLS stream holds no plaintext: hyper read until the stream had none left
/// before it went idle (see `serve_http1`), so the socket says when the client sends.
impl<T: ReadReady> ReadReady for tokio_rustls::server::TlsStream<T> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().0.poll_read_ready(cx)
    }
}

/// Open connections per address.
#[derive(Debug, Default, Clone)]
struct PerAddress(Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>);

/// One open connection of an address; gives its place back when dropped.
struct Held {
    table: PerAddress,
    ip: IpAddr,
}

impl PerAddress {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more connection from `ip`, unless it holds `max` already.
    fn take(&self, ip: IpAddr, max: usize) -> Option<Held> {
        let mut table = self.table();
        let open = table.entry(ip).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(Held {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut table = self.table.table();
        if let Some(open) = table.get_mut(&self.ip) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                table.remove(&self.ip);
            }
        }
    }
}

/// A lingering close waits at most this long for the client to stop sending...
const LINGER_TIME: Duration = Duration::from_secs(5);
/// ...at most this long for each next chunk...
const LINGER_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// ...and reads at most this much before closing anyway.
const LINGER_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Sockets lingering at once; beyond this, a socket is closed at once.
const LINGER_MAX_SOCKETS: usize = 4096;

static LINGERING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A connection's TCP stream, closed with a lingering close when dropped (see the
/// module documentation).
struct Lingering(Option<tokio::net::TcpStream>);

impl Lingering {
    fn stream(&mut self) -> io::Result<&mut tokio::net::TcpStream> {
        self.0
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(stream) = self.0.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if LINGERING.fetch_add(1, Ordering::Relaxed) >= LINGER_MAX_SOCKETS {
            LINGERING.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        runtime.spawn(async move {
            linger(stream).await;
            LINGERING.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Shuts the write side, then reads and discards until the client closes its side, goes
/// quiet for `LINGER_READ_TIMEOUT`, or `LINGER_TIME` or `LINGER_MAX_BYTES` runs out.
async fn linger(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let deadline = Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 16 * 1024];
    let mut drained = 0usize;
    while drained < LINGER_MAX_BYTES {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(LINGER_READ_TIMEOUT);
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_read(cx, buf),
            Err(err) => Poll::Ready(Err(err)),
        }
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_write(cx, buf),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_flush(cx),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_shutdown(cx),
            Err(err) => Poll::Ready(Err(err)),
        }
    }
}

/// When bytes last moved on a connection, in milliseconds since it opened, and where
/// its requests stand.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
    /// Reads of HTTP bytes (after TLS) so far.
    request_reads: AtomicU64,
    /// Request heads hyper has started waiting for (one timer each, see `HeadTimer`).
    heads: AtomicU64,
    /// Requests hyper has read and handed to the router.
    requests: AtomicU64,
    /// The connection is ending hyper's state to rest: its stream stays open.
    resting: std::sync::atomic::AtomicBool,
}

/// Where a connection's requests stand (see `Activity::requests_seen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestsSeen {
    reads: u64,
    heads: u64,
    requests: u64,
}

impl RequestsSeen {
    /// hyper has answered a request and waits for the head of the next one: every
    /// exchange so far is complete, none has begun.
    fn waiting_for_next(self) -> bool {
        self.requests > 0 && self.heads > self.requests
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            request_reads: AtomicU64::new(0),
            heads: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            resting: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.store(self.elapsed_ms(), Ordering::Relaxed);
    }

    fn touch_request_bytes(&self) {
        self.touch();
        self.request_reads.fetch_add(1, Ordering::Relaxed);
    }

    fn request_reads(&self) -> u64 {
        self.request_reads.load(Ordering::Relaxed)
    }

    fn requests_seen(&self) -> RequestsSeen {
        RequestsSeen {
            reads: self.request_reads(),
            heads: self.heads.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
        }
    }

    /// Resolves once no byte has moved for `idle`.
    async fn expired(&self, idle: Duration) {
        loop {
            let last = self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let due = last + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// A stream that records activity on every successful read or write. The `plaintext`
/// one is what hyper reads (after TLS): its reads are HTTP bytes from the client.
struct IdleIo<T> {
    inner: T,
    activity: Arc<Activity>,
    plaintext: bool,
}

impl<T> IdleIo<T> {
    fn raw(inner: T, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            plaintext: false,
        }
    }

    fn plaintext(inner: T, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            plaintext: true,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if self.plaintext {
                self.activity.touch_request_bytes();
            } else {
                self.activity.touch();
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.plaintext && self.activity.resting.load(Ordering::Relaxed) {
            // hyper ends its state to rest (see `Connection::serve_http1`): the stream
            // stays open for the next request.
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's timer for the header-read timeout of one HTTP/1 connection.
///
/// hyper starts its header-read timer as soon as it waits for a request head, so on a
/// kept-alive connection the wait for the *next* request would be cut after
/// `header_read_timeout` (10 s) instead of `idle_timeout` (2 min). This timer keeps
/// hyper's semantics for a connection's first request (counted from when hyper starts
/// reading it: the silent-connection check covers the wait before that), but for every
/// later request it starts counting only when that request's first bytes arrive.
/// Waiting with no byte at all is the idle timeout's to end.
#[derive(Clone)]
struct HeadTimer(Arc<Activity>);

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        // hyper creates one timer per request head (and drops it once the head is read).
        let first_head = self.0.heads.fetch_add(1, Ordering::Relaxed) == 0;
        let waiting_since_reads = (!first_head).then(|| (self.0.clone(), self.0.request_reads()));
        Box::pin(HeadDeadline {
            timeout: duration,
            waiting_since_reads,
            sleep: None,
        })
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep(deadline.saturating_duration_since(std::time::Instant::now()))
    }
}

/// One request head's deadline (see `HeadTimer`).
struct HeadDeadline {
    timeout: Duration,
    /// For a later request, until its first bytes: the connection's read count before it.
    waiting_since_reads: Option<(Arc<Activity>, u64)>,
    /// Allocated once the clock runs (most heads arrive whole and never start it).
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for HeadDeadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some((activity, reads)) = &this.waiting_since_reads {
            // hyper polls this after each read that leaves the head incomplete, so the
            // first poll that sees a new read runs within that read's poll: the head's
            // clock starts now. Before it nothing is armed; the socket's readiness, not
            // this timer, wakes the connection.
            if activity.request_reads() == *reads {
                return Poll::Pending;
            }
            this.waiting_since_reads = None;
        }
        let timeout = this.timeout;
        this.sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)))
            .as_mut()
            .poll(cx)
    }
}

impl hyper::rt::Sleep for HeadDeadline {}
