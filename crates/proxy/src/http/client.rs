//! Pooled upstream connections, per endpoint.
//!
//! HTTP/2 endpoints (other sidecars, h2c and gRPC apps) get ONE shared connection each, on
//! which every request is multiplexed — so any number of HTTP/1 client connections cost one
//! connection between two sidecars. HTTP/1 endpoints get a stack of idle keep-alive
//! connections (the proxy's own, [`super::h1_client`]); a connection goes back to the stack
//! once its response body is fully read — unless it has served a ResiliencePolicy's
//! `maxRequestsPerConnection` requests ([`SendOptions`]): then it is closed.

use foldhash::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::Body;
use super::h1_client::{self, Conn};
use super::h2_client::{self, KeepAlive, SendFailure};
use crate::error::ProxyError;

/// How to talk to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// A stream to an upstream: plain TCP, mesh mutual TLS to a peer sidecar
/// ([`Pool::connect_peer`]), or TLS originated to a host outside the mesh
/// ([`Pool::connect_origin`]).
pub enum PeerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    External(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl PeerStream {
    /// Whether the stream runs over mesh mutual TLS.
    pub fn is_mtls(&self) -> bool {
        matches!(self, PeerStream::Tls(_))
    }

    /// The TCP socket under the stream.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            PeerStream::Plain(s) => s,
            PeerStream::Tls(s) | PeerStream::External(s) => s.get_ref().0,
        }
    }
}

impl tokio::io::AsyncRead for PeerStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            PeerStream::Tls(s) | PeerStream::External(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for PeerStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            PeerStream::Tls(s) | PeerStream::External(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            PeerStream::Tls(s) | PeerStream::External(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            PeerStream::Tls(s) | PeerStream::External(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Pooled HTTP/1 connections returned longer ago than this are closed rather than reused.
const IDLE_TTL: Duration = Duration::from_secs(30);
/// At most this many HTTP/1 connections are pooled per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// An idle pooled HTTP/1 connection. It comes back to the pool when its response body has
/// been read to its end (by [`h1_client::ResponseBody`]), so the TTL counts idle time only: a
/// long streaming response does not age its connection out.
struct IdleH1 {
    /// When it was returned to the pool.
    since: Instant,
    conn: Box<Conn>,
}

/// A response body from the pool: read from one of its own HTTP/1 connections, from an
/// HTTP/2 stream ([`h2_client`]), or hyper's (the HTTP/1 connections of upgrades).
pub enum UpstreamBody {
    Http1(h1_client::ResponseBody<PoolHome>),
    Http2(h2_client::ResponseBody),
    Hyper(Incoming),
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, crate::BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Http1(b) => std::pin::Pin::new(b).poll_frame(cx),
            UpstreamBody::Http2(b) => std::pin::Pin::new(b).poll_frame(cx),
            UpstreamBody::Hyper(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Http1(b) => b.is_end_stream(),
            UpstreamBody::Http2(b) => b.is_end_stream(),
            UpstreamBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::Http1(b) => b.size_hint(),
            UpstreamBody::Http2(b) => b.size_hint(),
            UpstreamBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// Where a connection goes when its response has ended: back to its pool, unless it has
/// carried the most requests it may.
pub struct PoolHome {
    pool: Arc<Pool>,
    key: H1Key,
    max: Option<u32>,
}

impl h1_client::Home for PoolHome {
    fn put_back(&self, conn: Box<Conn>) {
        if self.max.is_none_or(|m| conn.served < m) {
            self.pool.put_idle(self.key.clone(), conn);
        }
    }
}

/// Why [`Pool::try_send`] failed, with the request's header map when the pool gives it back
/// (HTTP/1: the head is written from a borrow; HTTP/2 takes the request whole).
#[derive(Debug)]
pub struct SendError {
    pub error: ProxyError,
    /// (Boxed: failures are rare, and a `Result` carrying a whole map would be large.)
    pub headers: Option<Box<http::HeaderMap>>,
}

impl SendError {
    /// `error`, with the header map of `req` given back.
    fn giving_back(error: ProxyError, req: &mut Request<Body>) -> Self {
        SendError { error, headers: Some(Box::new(std::mem::take(req.headers_mut()))) }
    }
}

impl From<ProxyError> for SendError {
    fn from(error: ProxyError) -> Self {
        SendError { error, headers: None }
    }
}

/// Per-request options of [`Pool::send_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOptions {
    /// The peer is a sidecar running as this SPIFFE ID: connect with mutual TLS (when this
    /// proxy has a certificate) and refuse any other identity.
    pub peer_identity: Option<Arc<str>>,
    /// Close an HTTP/1 connection once it has carried this many requests (ResiliencePolicy
    /// `connectionLimits.maxRequestsPerConnection`); `None`: reuse it as long as it lives.
    /// HTTP/2 connections are shared by all requests and not affected.
    pub max_requests_per_connection: Option<u32>,
    /// Connect timeout for new connections (ResiliencePolicy `timeouts.connect`); `None`: the
    /// proxy's own.
    pub connect_timeout: Option<Duration>,
    /// An idle HTTP/1 connection older than this is not reused (ResiliencePolicy
    /// `timeouts.idle`); `None`: the pool's default.
    pub idle_timeout: Option<Duration>,
    /// TLS originated by this proxy to a host outside the mesh (an ExternalService with
    /// `tls.originate`); such connections are pooled apart.
    pub origin: Option<Arc<crate::egress::Origin>>,
}

/// An HTTP/2 connection of the pool: its handle, which requests clone under the pool's lock
/// (no `await`), and the lock held by whoever connects, so that concurrent first requests
/// share one new connection instead of racing to open several.
#[derive(Default)]
struct H2Slot {
    conn: Option<h2_client::Connection>,
    connecting: Arc<tokio::sync::Mutex<()>>,
}

impl H2Slot {
    /// The connection, while it is open.
    fn open(&self) -> Option<h2_client::Connection> {
        self.conn.as_ref().filter(|c| c.is_open()).cloned()
    }
}

/// An HTTP/2 connection's identity: the endpoint and, over mTLS, who must answer there; or,
/// for TLS originated to an external host, that origination's key ([`crate::egress::Origin`]).
type H2Key = (SocketAddr, Option<Arc<str>>, Option<Arc<str>>);

/// An HTTP/1 connection's identity: the endpoint and the origination's key, if any.
type H1Key = (SocketAddr, Option<Arc<str>>);

/// The lock of an [`H2Slot`] taken to connect.
type ConnectingLock = Arc<tokio::sync::Mutex<()>>;

fn poisoned() -> ProxyError {
    ProxyError::UpstreamReset("pool poisoned".into())
}

/// Connections to upstream endpoints.
pub struct Pool {
    dialer: Dialer,
    h1_idle: Mutex<HashMap<H1Key, Vec<IdleH1>>>,
    h2: Mutex<HashMap<H2Key, H2Slot>>,
    /// This proxy's certificate and trust bundle, when it has a mesh identity.
    credentials: Option<Arc<crate::tls::MeshCredentials>>,
    /// `WORKLOAD/SERVICE` of this proxy, sent at the start of mesh opaque streams
    /// ([`crate::transport::source`]).
    source: Option<http::HeaderValue>,
    /// This proxy's listeners: an endpoint at one of them (but the inbound) is refused.
    own: Option<Arc<crate::proxy::OwnListeners>>,
    /// Keep-alive of the HTTP/2 connections.
    keep_alive: KeepAlive,
}

/// How the proxy dials upstreams.
#[derive(Debug, Clone, Copy)]
pub struct Dialer {
    pub timeout: Duration,
    /// `SO_MARK` for the proxy's own connections, so transparent-interception rules can let
    /// them through (netns mode) instead of redirecting them back to the proxy.
    pub mark: Option<u32>,
}

impl Dialer {
    /// Opens a TCP connection within the timeout.
    pub async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, ProxyError> {
        connect(addr, self.timeout, self.mark).await
    }

    /// Opens a TCP connection within `timeout`, else the dialer's own timeout.
    pub async fn connect_within(&self, addr: SocketAddr, timeout: Option<Duration>) -> Result<TcpStream, ProxyError> {
        connect(addr, timeout.unwrap_or(self.timeout), self.mark).await
    }
}

/// Opens a TCP connection within `timeout`, with `SO_MARK` `mark` when given.
pub async fn connect(addr: SocketAddr, timeout: Duration, mark: Option<u32>) -> Result<TcpStream, ProxyError> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .map_err(ProxyError::ConnectFailed)?;
    if let Some(mark) = mark {
        socket2::SockRef::from(&socket).set_mark(mark).map_err(ProxyError::ConnectFailed)?;
    }
    let stream = match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ProxyError::ConnectFailed(e)),
        Err(_) => {
            return Err(ProxyError::ConnectFailed(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out"),
            )));
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Maps a hyper client error to the proxy's error.
pub fn upstream_error(e: hyper::Error) -> ProxyError {
    if e.is_timeout() {
        return ProxyError::Timeout;
    }
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    ProxyError::UpstreamReset(msg)
}

impl Pool {
    pub fn new(dialer: Dialer) -> Arc<Self> {
        Pool::with_credentials(dialer, None, None, None)
    }

    /// A pool that speaks mutual TLS to sidecars once `credentials` hold a certificate, and
    /// names `source` (`WORKLOAD/SERVICE`) at the start of the opaque streams it opens;
    /// it never dials back into `own` listeners ([`crate::proxy::OwnListeners::loops_back`]).
    pub fn with_credentials(
        dialer: Dialer,
        credentials: Option<Arc<crate::tls::MeshCredentials>>,
        source: Option<http::HeaderValue>,
        own: Option<Arc<crate::proxy::OwnListeners>>,
    ) -> Arc<Self> {
        Arc::new(Pool {
            dialer,
            h1_idle: Mutex::new(HashMap::default()),
            h2: Mutex::new(HashMap::default()),
            credentials,
            source,
            own,
            keep_alive: KeepAlive::default(),
        })
    }

    /// A pool without mesh credentials whose HTTP/2 connections keep alive as `keep_alive` says.
    pub fn with_keep_alive(dialer: Dialer, keep_alive: KeepAlive) -> Arc<Self> {
        let mut pool = Pool::with_credentials(dialer, None, None, None);
        if let Some(p) = Arc::get_mut(&mut pool) {
            p.keep_alive = keep_alive;
        }
        pool
    }

    /// Every upstream connection of the pool starts here: an endpoint that is one of this
    /// proxy's own listeners (a Workload registered at a gateway's port, its admin or outbound
    /// port) is refused, so a request can never loop through the proxy or reach its admin server.
    async fn dial(&self, addr: SocketAddr, timeout: Option<Duration>) -> Result<TcpStream, ProxyError> {
        if self.own.as_ref().is_some_and(|own| own.loops_back(addr)) {
            return Err(ProxyError::Forbidden(format!("{addr} is this proxy's own listener")));
        }
        self.dialer.connect_within(addr, timeout).await
    }

    /// Whether requests to a sidecar running as `peer` go over mutual TLS.
    pub fn mtls_to(&self, peer: Option<&Arc<str>>) -> bool {
        peer.is_some() && self.credentials.as_ref().is_some_and(|c| c.ready())
    }

    /// Connects to an upstream: THE one way to reach a meshed endpoint (SPEC §5). Every path
    /// to a peer sidecar — routes and their retries, mirrors, upgrades, CONNECT to a Service,
    /// opaque TCP in explicit, `--upstream` and transparent modes — dials through here with the
    /// endpoint's expected SPIFFE ID `peer`: when this proxy has a certificate, the stream is
    /// mutual TLS (ALPN `alpn` says what runs inside) and the handshake fails unless the server
    /// proves exactly that identity. `peer` `None` (an endpoint outside the mesh) dials plain TCP.
    pub async fn connect_peer(
        &self,
        addr: SocketAddr,
        timeout: Option<Duration>,
        peer: Option<&Arc<str>>,
        alpn: &[u8],
    ) -> Result<PeerStream, ProxyError> {
        let stream = self.dial(addr, timeout).await?;
        match (peer, &self.credentials) {
            (Some(id), Some(creds)) if creds.ready() => {
                let config = creds
                    .client_config(id, alpn)
                    .map_err(|e| ProxyError::ConnectFailed(std::io::Error::other(e.to_string())))?;
                let handshake = tokio_rustls::TlsConnector::from(config)
                    .connect(crate::tls::MeshCredentials::server_name(), stream);
                // The handshake is part of connecting: a peer that accepts TCP but never answers
                // (hung, or registered before it serves) is a connection failure within the
                // connect timeout — retried elsewhere — not a request that hangs.
                let limit = timeout.unwrap_or(self.dialer.timeout);
                let mut tls = match tokio::time::timeout(limit, handshake).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        let e = std::io::Error::other(format!("mTLS to {id} at {addr}: {e}"));
                        return Err(ProxyError::ConnectFailed(e));
                    }
                    Err(_) => {
                        let e = std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("mTLS to {id} at {addr}: no TLS handshake within {limit:?}"),
                        );
                        return Err(ProxyError::ConnectFailed(e));
                    }
                };
                // An opaque stream starts with who is calling (HTTP carries it in a header).
                if alpn == crate::tls::ALPN_TCP {
                    crate::transport::source::write(&mut tls, self.source.as_ref().map(|v| v.as_bytes()))
                        .await
                        .map_err(ProxyError::ConnectFailed)?;
                }
                Ok(PeerStream::Tls(Box::new(tls)))
            }
            _ => Ok(PeerStream::Plain(stream)),
        }
    }

    /// Connects to a host outside the mesh with TLS opened by this proxy (SNI and the verified
    /// name: the origin's host). A certificate that does not verify fails the connection.
    pub async fn connect_origin(
        &self,
        addr: SocketAddr,
        timeout: Option<Duration>,
        origin: &crate::egress::Origin,
    ) -> Result<PeerStream, ProxyError> {
        let stream = self.dial(addr, timeout).await?;
        let handshake =
            tokio_rustls::TlsConnector::from(origin.config.clone()).connect(origin.server_name.clone(), stream);
        let limit = timeout.unwrap_or(self.dialer.timeout);
        let host = origin.server_name.to_str();
        match tokio::time::timeout(limit, handshake).await {
            Ok(Ok(tls)) => Ok(PeerStream::External(Box::new(tls))),
            Ok(Err(e)) => Err(ProxyError::OriginationFailed(format!("{host} at {addr}: {e}"))),
            Err(_) => {
                Err(ProxyError::OriginationFailed(format!("{host} at {addr}: no TLS handshake within {limit:?}")))
            }
        }
    }

    /// Sends a request to `addr` and returns the response head with its streaming body.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        proto: Proto,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        self.try_send(addr, proto, req, SendOptions::default()).await.map_err(|e| e.error)
    }

    /// [`Pool::send`] with per-request options.
    pub async fn send_with(
        self: &Arc<Self>,
        addr: SocketAddr,
        proto: Proto,
        req: Request<Body>,
        options: SendOptions,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        self.try_send(addr, proto, req, options).await.map_err(|e| e.error)
    }

    /// [`Pool::send_with`] for a request that may be tried again: a failed HTTP/1 request
    /// gives its header map back ([`SendError::headers`]), so the caller need not keep a copy
    /// of it for another try.
    ///
    /// HTTP/1 goes on a pooled connection (or a new one), its head written from a borrow of
    /// `req`: on a failure its header map is given back, and on success its allocation holds
    /// the response's fields. (Not an `async fn`, and HTTP/1 not a function of its own: the
    /// request would be stored in every level's future, a `mut` argument twice, and each
    /// level's future copied into its caller's on every request.)
    #[allow(clippy::manual_async_fn)] // the reason is above
    pub fn try_send(
        self: &Arc<Self>,
        addr: SocketAddr,
        proto: Proto,
        mut req: Request<Body>,
        options: SendOptions,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> {
        async move {
            if proto == Proto::Http2 {
                return Ok(self.send_h2(addr, req, options).await?.map(UpstreamBody::Http2));
            }
            let key: H1Key = (addr, options.origin.as_ref().map(|o| o.key.clone()));
            let conn = match self.take_idle(&key, &options) {
                Some(conn) => conn,
                // Boxed: a new connection is the rare case, and its future would otherwise be
                // part of (and copied with) every request's future.
                None => match Box::pin(self.connect_stream(
                    addr,
                    options.connect_timeout,
                    options.peer_identity.as_ref(),
                    options.origin.as_deref(),
                ))
                .await
                {
                    Ok(stream) => Box::new(Conn::new(stream)),
                    Err(error) => return Err(SendError::giving_back(error, &mut req)),
                },
            };
            match conn.exchange(&mut req).await {
                Ok((head, conn)) => {
                    let home = PoolHome { pool: self.clone(), key, max: options.max_requests_per_connection };
                    let body = h1_client::ResponseBody::new(&head, conn, home);
                    Ok(h1_client::response(head, UpstreamBody::Http1(body)))
                }
                Err(error) => Err(SendError::giving_back(error, &mut req)),
            }
        }
    }

    async fn send_h2(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
        options: SendOptions,
    ) -> Result<Response<h2_client::ResponseBody>, ProxyError> {
        // The pool key says whether the connection is mTLS: a plaintext connection opened
        // before this proxy had its certificate is never reused (or labelled) as mTLS after.
        let tls_peer = options.peer_identity.clone().filter(|_| self.mtls_to(options.peer_identity.as_ref()));
        let origin_key = options.origin.as_ref().map(|o| o.key.clone());
        let key = (addr, tls_peer, origin_key);
        // Most requests find the connection open: a clone of its handle under the pool's lock.
        let conn = match self.open_h2(&key)? {
            Ok(conn) => conn,
            // Boxed, as in `send_h1`: connecting is rare, requests are not.
            Err(connecting) => Box::pin(self.connect_h2_once(&key, &connecting, &options)).await?,
        };
        match conn.send(req).await {
            Ok(resp) => Ok(resp),
            Err(SendFailure::Failed(e)) => Err(e),
            // The connection takes no new stream (GOAWAY, or it ended since it was taken):
            // nothing was sent, so the request goes on a new connection.
            Err(SendFailure::NotReady(failed)) => Box::pin(self.resend_h2(&key, *failed, &options)).await,
        }
    }

    /// The open HTTP/2 connection of `key`, else the lock to take to open one.
    fn open_h2(&self, key: &H2Key) -> Result<Result<h2_client::Connection, ConnectingLock>, ProxyError> {
        let mut map = self.h2.lock().map_err(|_| poisoned())?;
        Ok(match map.get(key).and_then(H2Slot::open) {
            Some(conn) => Ok(conn),
            None => Err(map.entry(key.clone()).or_default().connecting.clone()),
        })
    }

    /// Sends the request a connection of `key` did not take on a new one; that connection
    /// leaves the pool.
    async fn resend_h2(
        &self,
        key: &H2Key,
        failed: h2_client::NotReady,
        options: &SendOptions,
    ) -> Result<Response<h2_client::ResponseBody>, ProxyError> {
        tracing::debug!(addr = %key.0, error = %failed.error, "upstream HTTP/2 connection closed: reconnecting");
        if let Ok(mut map) = self.h2.lock()
            && let Some(slot) = map.get_mut(key)
            && slot.conn.as_ref().is_some_and(|c| c.refused(&failed))
        {
            slot.conn = None;
        }
        let req = failed.req;
        let conn = match self.open_h2(key)? {
            Ok(conn) => conn,
            Err(connecting) => self.connect_h2_once(key, &connecting, options).await?,
        };
        conn.send(req).await.map_err(|failed| match failed {
            SendFailure::NotReady(n) => n.error,
            SendFailure::Failed(e) => e,
        })
    }

    /// Opens the HTTP/2 connection of `key` (endpoint, mTLS peer, origination) unless a
    /// request that held `connecting` before this one did, and stores it in the pool.
    async fn connect_h2_once(
        &self,
        key: &H2Key,
        connecting: &tokio::sync::Mutex<()>,
        options: &SendOptions,
    ) -> Result<h2_client::Connection, ProxyError> {
        let _connecting = connecting.lock().await;
        if let Some(conn) = self.h2.lock().map_err(|_| poisoned())?.get(key).and_then(H2Slot::open) {
            return Ok(conn);
        }
        let (addr, tls_peer, _) = key;
        let stream = match options.origin.as_deref() {
            Some(o) => self.connect_origin(*addr, options.connect_timeout, o).await?,
            None => self.connect_peer(*addr, options.connect_timeout, tls_peer.as_ref(), crate::tls::ALPN_H2).await?,
        };
        let conn = h2_client::Connection::handshake(stream, self.keep_alive, *addr).await?;
        self.h2.lock().map_err(|_| poisoned())?.entry(key.clone()).or_default().conn = Some(conn.clone());
        Ok(conn)
    }

    /// An idle connection that may carry one more request, with the requests it carried.
    fn take_idle(&self, key: &H1Key, options: &SendOptions) -> Option<Box<Conn>> {
        let mut map = self.h1_idle.lock().ok()?;
        let pooled = map.get_mut(key)?;
        let max = options.max_requests_per_connection;
        let ttl = options.idle_timeout.unwrap_or(IDLE_TTL).min(IDLE_TTL);
        // Most recently returned first; those closed by the upstream, used up or idle too long
        // are dropped (closed) on the way.
        let now = crate::clock::now();
        while let Some(mut c) = pooled.pop() {
            if now.saturating_duration_since(c.since) < ttl
                && max.is_none_or(|m| c.conn.served < m)
                && c.conn.is_reusable()
            {
                return Some(c.conn);
            }
        }
        None
    }

    fn put_idle(&self, key: H1Key, conn: Box<Conn>) {
        if let Ok(mut map) = self.h1_idle.lock() {
            let idle = map.entry(key).or_default();
            // One time (every request passes here). The list is in the order connections came
            // back (taken from its end): only a prefix can have expired.
            let now = crate::clock::now();
            let expired = idle.iter().take_while(|c| now.saturating_duration_since(c.since) >= IDLE_TTL).count();
            idle.drain(..expired);
            if idle.len() < MAX_IDLE_PER_ENDPOINT {
                idle.push(IdleH1 { since: now, conn });
            }
        }
    }

    /// A stream for an HTTP/1 connection: mesh mTLS to a peer sidecar, TLS originated to an
    /// external host, or plain TCP.
    async fn connect_stream(
        &self,
        addr: SocketAddr,
        timeout: Option<Duration>,
        peer: Option<&Arc<str>>,
        origin: Option<&crate::egress::Origin>,
    ) -> Result<PeerStream, ProxyError> {
        match origin {
            Some(o) => self.connect_origin(addr, timeout, o).await,
            None => self.connect_peer(addr, timeout, peer, crate::tls::ALPN_HTTP1).await,
        }
    }

    /// A hyper HTTP/1 connection, for upgrades: after a `101` hyper hands over the stream.
    async fn connect_h1(
        &self,
        addr: SocketAddr,
        peer: Option<&Arc<str>>,
    ) -> Result<http1::SendRequest<Body>, ProxyError> {
        let stream = self.connect_stream(addr, None, peer, None).await?;
        let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(upstream_error)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends an Upgrade (e.g. WebSocket) request on a dedicated HTTP/1 connection that can be
    /// taken over after a `101 Switching Protocols`.
    pub async fn send_upgrade(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
        peer: Option<&Arc<str>>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut sender = self.connect_h1(addr, peer).await?;
        sender.send_request(req).await.map_err(upstream_error)
    }

    /// The pool's HTTP/2 connections.
    #[cfg(test)]
    pub(crate) fn h2_connections(&self) -> Vec<h2_client::Connection> {
        self.h2.lock().map_or(Vec::new(), |m| m.values().filter_map(|slot| slot.conn.clone()).collect())
    }

    /// How many of the pool's HTTP/2 connections are open.
    #[cfg(test)]
    pub(crate) fn open_h2_count(&self) -> usize {
        self.h2.lock().map_or(0, |m| m.values().filter(|slot| slot.open().is_some()).count())
    }

    /// Drops pooled connections to endpoints that are gone.
    pub fn retain(&self, live: impl Fn(&SocketAddr) -> bool) {
        if let Ok(mut m) = self.h1_idle.lock() {
            m.retain(|(a, _), _| live(a));
        }
        if let Ok(mut m) = self.h2.lock() {
            m.retain(|(a, _, _), _| live(a));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use http_body_util::BodyExt as _;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use super::*;
    use crate::http::body;

    /// An HTTP/1 server answering "ok", counting connections opened and closed.
    async fn server() -> (SocketAddr, Arc<AtomicU32>, Arc<AtomicU32>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (opened, closed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (o, c) = (opened.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                o.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(|_req| async { Ok::<_, std::convert::Infallible>(Response::new(body::full("ok"))) });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, opened, closed)
    }

    /// Polls `cond` every 5 ms until it holds; panics after 5 s naming `what`.
    pub(crate) async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("not reached in 5 s: {what}");
    }

    fn idle(pool: &Pool, addr: SocketAddr) -> usize {
        pool.h1_idle.lock().expect("idle").get(&(addr, None)).map_or(0, Vec::len)
    }

    async fn get(pool: &Arc<Pool>, addr: SocketAddr, options: SendOptions) {
        let req = Request::get("/").header(http::header::HOST, "test").body(body::empty()).expect("request");
        let resp = pool.send_with(addr, Proto::Http1, req, options).await.expect("response");
        let text = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&text[..], b"ok");
    }

    #[tokio::test]
    async fn http1_connections_close_after_max_requests() {
        let (addr, opened, closed) = server().await;
        let pool = Pool::new(Dialer { timeout: Duration::from_secs(2), mark: None });
        let limited = SendOptions { max_requests_per_connection: Some(2), ..SendOptions::default() };
        for i in 1..=6u32 {
            get(&pool, addr, limited.clone()).await;
            if i % 2 == 0 {
                until("the connection closed after its second request", || closed.load(Ordering::SeqCst) == i / 2)
                    .await;
                assert_eq!(idle(&pool, addr), 0);
            } else {
                until("the connection back in the pool", || idle(&pool, addr) == 1).await;
            }
        }
        assert_eq!(opened.load(Ordering::SeqCst), 3, "6 requests, 2 per connection");

        let (addr, opened, closed) = server().await;
        for _ in 0..6 {
            get(&pool, addr, SendOptions::default()).await;
            until("the connection back in the pool", || idle(&pool, addr) == 1).await;
        }
        assert_eq!((opened.load(Ordering::SeqCst), closed.load(Ordering::SeqCst)), (1, 0), "no limit: one connection");
    }

    /// A raw HTTP/1 server answering `ok` (keep-alive); its very first response stops after
    /// the first body byte until `release` is notified. Counts connections opened.
    async fn server_holding_first_body() -> (SocketAddr, Arc<AtomicU32>, Arc<tokio::sync::Notify>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (opened, release) = (Arc::new(AtomicU32::new(0)), Arc::new(tokio::sync::Notify::new()));
        let (o, r) = (opened.clone(), release.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let first = o.fetch_add(1, Ordering::SeqCst) == 0;
                let r = r.clone();
                tokio::spawn(async move {
                    let mut hold = first;
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut chunk).await {
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\no";
                            if stream.write_all(head).await.is_err() {
                                return;
                            }
                            if std::mem::take(&mut hold) {
                                r.notified().await;
                            }
                            if stream.write_all(b"k").await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, opened, release)
    }

    #[tokio::test]
    async fn a_connection_is_reused_only_after_its_response_body_ends() {
        let (addr, opened, release) = server_holding_first_body().await;
        let pool = Pool::new(Dialer { timeout: Duration::from_secs(2), mark: None });
        let req = || Request::get("/").header(http::header::HOST, "test").body(body::empty()).expect("request");
        // The first response's body has not ended: its connection is not back in the pool.
        let held = pool.send(addr, Proto::Http1, req()).await.expect("response");
        assert_eq!(idle(&pool, addr), 0, "busy until its body ends");
        get(&pool, addr, SendOptions::default()).await;
        assert_eq!(opened.load(Ordering::SeqCst), 2, "a busy connection is not handed out");
        assert_eq!(idle(&pool, addr), 1, "the second is back once its body was read");
        // Once its body ends, the first connection is back too: both are reused.
        release.notify_one();
        let text = held.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&text[..], b"ok");
        for _ in 0..4 {
            get(&pool, addr, SendOptions::default()).await;
        }
        assert_eq!(opened.load(Ordering::SeqCst), 2, "no third connection");
        assert_eq!(idle(&pool, addr), 2);
    }

    /// The idle TTL counts time without a request in flight: a connection whose response
    /// streamed for longer than the TTL is reused once that response ends.
    #[tokio::test]
    async fn a_long_response_does_not_age_its_connection_out() {
        let (addr, opened, release) = server_holding_first_body().await;
        let pool = Pool::new(Dialer { timeout: Duration::from_secs(2), mark: None });
        let ttl = SendOptions { idle_timeout: Some(Duration::from_millis(200)), ..SendOptions::default() };
        let req = || Request::get("/").header(http::header::HOST, "test").body(body::empty()).expect("request");
        let held = pool.send_with(addr, Proto::Http1, req(), ttl.clone()).await.expect("response");
        // Streaming for three TTLs, while other requests look through the pool.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(pool.take_idle(&(addr, None), &ttl).is_none(), "busy: not handed out");
        }
        release.notify_one();
        let text = held.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&text[..], b"ok");
        get(&pool, addr, ttl.clone()).await;
        assert_eq!(opened.load(Ordering::SeqCst), 1, "the streaming connection was reused");
        // Truly idle for longer than the TTL: closed, not reused.
        tokio::time::sleep(Duration::from_millis(300)).await;
        get(&pool, addr, ttl).await;
        assert_eq!(opened.load(Ordering::SeqCst), 2, "idle past the TTL: a new connection");
    }
}
