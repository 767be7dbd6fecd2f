//! Pooled upstream connections, per endpoint.
//!
//! HTTP/2 endpoints (other sidecars, h2c and gRPC apps) get ONE shared connection each, on
//! which every request is multiplexed — so any number of HTTP/1 client connections cost one
//! connection between two sidecars. HTTP/1 endpoints get a stack of idle keep-alive
//! connections; a connection goes back to the stack once its response body is fully read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::body::Body;
use crate::error::ProxyError;

/// How to talk to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

/// Idle HTTP/1 connections older than this are closed rather than reused.
const IDLE_TTL: Duration = Duration::from_secs(30);
/// At most this many idle HTTP/1 connections are kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// An idle HTTP/1 connection and when it became idle.
type IdleH1 = (Instant, http1::SendRequest<Body>);

type H2Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

/// Connections to upstream endpoints.
pub struct Pool {
    dialer: Dialer,
    h1_idle: Mutex<HashMap<SocketAddr, Vec<IdleH1>>>,
    h2: Mutex<HashMap<SocketAddr, H2Slot>>,
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
        Arc::new(Pool { dialer, h1_idle: Mutex::new(HashMap::new()), h2: Mutex::new(HashMap::new()) })
    }

    /// Sends a request to `addr` and returns the response head with its streaming body.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        proto: Proto,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ProxyError> {
        match proto {
            Proto::Http2 => self.send_h2(addr, req).await,
            Proto::Http1 => self.send_h1(addr, req).await,
        }
    }

    async fn send_h2(&self, addr: SocketAddr, req: Request<Body>) -> Result<Response<Incoming>, ProxyError> {
        let slot = {
            let mut map = self.h2.lock().map_err(|_| ProxyError::UpstreamReset("pool poisoned".into()))?;
            map.entry(addr).or_default().clone()
        };
        let mut sender = {
            // Holding the slot while connecting makes concurrent first requests share one
            // connection instead of racing to open several.
            let mut guard = slot.lock().await;
            match guard.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = self.connect_h2(addr).await?;
                    *guard = Some(s.clone());
                    s
                }
            }
        };
        sender.ready().await.map_err(upstream_error)?;
        sender.send_request(req).await.map_err(upstream_error)
    }

    async fn connect_h2(&self, addr: SocketAddr) -> Result<http2::SendRequest<Body>, ProxyError> {
        let stream = self.dialer.connect(addr).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024)
            .max_concurrent_reset_streams(1024)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(upstream_error)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(sender)
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut map = self.h1_idle.lock().ok()?;
        let idle = map.get_mut(&addr)?;
        while let Some((since, sender)) = idle.pop() {
            if since.elapsed() < IDLE_TTL && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, addr: SocketAddr, sender: http1::SendRequest<Body>) {
        if let Ok(mut map) = self.h1_idle.lock() {
            let idle = map.entry(addr).or_default();
            idle.retain(|(since, s)| since.elapsed() < IDLE_TTL && !s.is_closed());
            if idle.len() < MAX_IDLE_PER_ENDPOINT {
                idle.push((Instant::now(), sender));
            }
        }
    }

    async fn send_h1(self: &Arc<Self>, addr: SocketAddr, req: Request<Body>) -> Result<Response<Incoming>, ProxyError> {
        let mut req = req;
        // A reused connection may have been closed by the server a moment ago; hyper hands the
        // request back when it was never written, and it is sent on a new connection.
        while let Some(mut sender) = self.take_idle(addr) {
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.recycle(addr, sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(upstream_error(e.into_error())),
                },
            }
        }
        let mut sender = self.connect_h1(addr, false).await?;
        let resp = sender.send_request(req).await.map_err(upstream_error)?;
        self.recycle(addr, sender);
        Ok(resp)
    }

    /// Returns the connection to the idle stack once the response body has been read.
    fn recycle(self: &Arc<Self>, addr: SocketAddr, mut sender: http1::SendRequest<Body>) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if sender.ready().await.is_ok()
                && let Some(pool) = pool.upgrade()
            {
                pool.put_idle(addr, sender);
            }
        });
    }

    async fn connect_h1(&self, addr: SocketAddr, upgrades: bool) -> Result<http1::SendRequest<Body>, ProxyError> {
        let stream = self.dialer.connect(addr).await?;
        let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(upstream_error)?;
        tokio::spawn(async move {
            let result = if upgrades { conn.with_upgrades().await } else { conn.await };
            if let Err(e) = result {
                tracing::debug!(%addr, error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends an Upgrade (e.g. WebSocket) request on a dedicated HTTP/1 connection that can be
    /// taken over after a `101 Switching Protocols`.
    pub async fn send_upgrade(&self, addr: SocketAddr, req: Request<Body>) -> Result<Response<Incoming>, ProxyError> {
        let mut sender = self.connect_h1(addr, true).await?;
        sender.send_request(req).await.map_err(upstream_error)
    }

    /// Drops pooled connections to endpoints that are gone.
    pub fn retain(&self, live: impl Fn(&SocketAddr) -> bool) {
        if let Ok(mut m) = self.h1_idle.lock() {
            m.retain(|a, _| live(a));
        }
        if let Ok(mut m) = self.h2.lock() {
            m.retain(|a, _| live(a));
        }
    }
}
