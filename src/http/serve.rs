//! Serving connections: the accept loop and everything a hostile client could abuse
//! below the router.
//!
//! `axum::serve` sets no header-read timeout, so a client sending half a header would
//! hold a connection forever; here every connection goes through hyper-util's builder
//! with a timer. Per connection: a TLS handshake timeout, a header-read timeout (which in
//! hyper also bounds the wait for the next request on a kept-alive connection), caps on
//! header bytes and count, HTTP/2 stream and reset-flood limits, and an idle timeout on
//! the socket itself (no byte moved either way for `idle_timeout` closes it). A
//! semaphore caps concurrent connections: at the cap, new connections wait in the
//! kernel's backlog instead of consuming memory. One address may hold at most
//! `max_connections_per_ip` of them (trusted proxies excepted): beyond it a new
//! connection is closed at once, so one host cannot take every slot.
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

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::ServiceExt;

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

fn connection_builder(limits: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(HYPER_MIN_BUF))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Rapid-reset (CVE-2023-44487) and local-error floods close the connection.
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(64))
        // No server pings: their answers would count as activity and keep an idle HTTP/2
        // connection open for ever. A dead or idle peer is closed by the idle timeout.
        .keep_alive_interval(None);
    builder
}

/// Accepts connections until `shutdown` resolves, then drains for `shutdown_grace`.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<crate::tls::Acceptor>,
    app: Router,
    limits: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Drained {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = PerAddress::default();
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(connection_builder(&limits));
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
        let connection = Connection {
            app: app.clone(),
            builder: builder.clone(),
            watcher: graceful.watcher(),
            limits: limits.clone(),
            peer,
            proxy,
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            connection.run(stream, acceptor).await;
            drop(held);
            drop(permit);
        });
    }
    drop(listener);
    let deadline = Instant::now() + limits.shutdown_grace;
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing the remaining connections");
    }
    // Connections still in their TLS handshake hold a slot but no watcher: wait for them too.
    let total = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    match tokio::time::timeout_at(deadline, slots.acquire_many(total)).await {
        Ok(_) => Drained { cut: 0 },
        Err(_) => Drained {
            cut: limits.max_connections - slots.available_permits(),
        },
    }
}

struct Connection {
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    limits: ServerConfig,
    peer: SocketAddr,
    /// The peer is one of `server.trusted_proxies` (decided once, at accept).
    proxy: bool,
}

impl Connection {
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
                let handshake =
                    tokio::time::timeout(self.limits.tls_handshake_timeout, acceptor.accept(io));
                match handshake.await {
                    Ok(Ok(Some(tls))) => {
                        let io = IdleIo::plaintext(tls, activity.clone());
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

    async fn serve_io<I>(self, io: I, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let direct = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        // Only a trusted proxy's requests have their forwarding headers read; every
        // other connection's client is its peer, with no per-request work.
        let trusted = self
            .proxy
            .then(|| Arc::new(self.limits.trusted_proxies.clone()));
        let service = self
            .app
            .map_request(move |mut request: http::Request<Incoming>| {
                let client = match &trusted {
                    Some(trusted) => {
                        request.extensions_mut().insert(ForwardedBy(peer));
                        let client = client_address(peer.ip(), request.headers(), trusted);
                        SocketAddr::new(client, peer.port())
                    }
                    None => direct,
                };
                request.extensions_mut().insert(ConnectInfo(client));
                request
            });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service))
            .into_owned();
        let conn = self.watcher.watch(conn);
        tokio::select! {
            result = conn => {
                if let Err(err) = result {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
            }
            () = activity.expired(self.limits.idle_timeout) => {
                tracing::debug!(%peer, "idle connection closed");
            }
            // hyper-util reads the first bytes (to choose HTTP/1 or HTTP/2) with no timer,
            // and hyper's header-read timer starts only after that: a client that opens a
            // connection and sends nothing is bound here instead.
            () = activity.silent_for(self.limits.header_read_timeout) => {
                tracing::debug!(%peer, "connection sent no request in time");
            }
        }
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

/// When bytes last moved on a connection, in milliseconds since it opened.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
    /// Last read of HTTP bytes (after TLS), 0 for never.
    last_request_bytes_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            last_request_bytes_ms: AtomicU64::new(0),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.store(self.elapsed_ms(), Ordering::Relaxed);
    }

    fn touch_request_bytes(&self) {
        let now = self.elapsed_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        // `max(1)`: a read in the first millisecond must still differ from "never".
        self.last_request_bytes_ms
            .store(now.max(1), Ordering::Relaxed);
    }

    /// Resolves if no HTTP byte arrived within `limit` of now; else never.
    async fn silent_for(&self, limit: Duration) {
        tokio::time::sleep(limit).await;
        if self.last_request_bytes_ms.load(Ordering::Relaxed) != 0 {
            std::future::pending::<()>().await;
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
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
