//! The pool's HTTP/2 connections ([`super::client::Pool`]), on the `h2` crate directly: the
//! mesh hop between sidecars (mTLS, ALPN `plexus.h2`), h2c and gRPC apps, and TLS originated
//! to HTTP/2 hosts outside the mesh.
//!
//! Only the connection is a task ([`Connection::handshake`] spawns it; it also sends the
//! keep-alive PINGs). A request is sent from its own task: `ready`, `send_request`, and its
//! response head awaited there while its body is sent alongside — no channel to the
//! connection's task and no task per request, as hyper's client has (docs/PERFORMANCE.md,
//! "The HTTP/2 client on h2"). A request body still streaming when the response head arrives
//! (an upload, bidirectional gRPC) goes on in a task of its own ([`Pipe`]), spawned only then.

use std::error::Error as _;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body::{Body as _, Frame, SizeHint};
use tokio::sync::oneshot;

use super::body::{Body, H2StreamBody};
use super::client::PeerStream;
use super::headers;
use crate::error::ProxyError;

/// Keep-alive of an HTTP/2 connection: a PING every `interval`; no PONG within `timeout`
/// closes the connection, and its requests in flight fail as timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for KeepAlive {
    fn default() -> Self {
        KeepAlive { interval: Duration::from_secs(30), timeout: Duration::from_secs(10) }
    }
}

/// The keep-alive of one HTTP/2 connection, client's or server's: a PING every
/// `keep_alive.interval` (busy or idle), and the connection must end once a PONG is later than
/// `keep_alive.timeout`.
pub(super) struct Pinger {
    /// None when h2 has handed it out already (it does once per connection).
    pings: Option<h2::PingPong>,
    keep_alive: KeepAlive,
    /// When the next PING goes out, or (`awaiting_pong`) when its PONG is late.
    timer: Pin<Box<tokio::time::Sleep>>,
    awaiting_pong: bool,
}

impl Pinger {
    pub(super) fn new(pings: Option<h2::PingPong>, keep_alive: KeepAlive) -> Self {
        let timer = Box::pin(tokio::time::sleep(keep_alive.interval));
        Pinger { pings, keep_alive, timer, awaiting_pong: false }
    }

    /// Sends a PING when one is due; ready only when the connection must end: no PONG in
    /// time ([`TIMED_OUT_TEXT`]), or the PING could not be sent or answered.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<String> {
        let Some(pings) = self.pings.as_mut() else { return Poll::Pending };
        loop {
            if self.awaiting_pong {
                match pings.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.awaiting_pong = false;
                        self.timer.as_mut().reset(tokio::time::Instant::now() + self.keep_alive.interval);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(e.to_string()),
                    Poll::Pending => {}
                }
            }
            ready!(self.timer.as_mut().poll(cx));
            if self.awaiting_pong {
                return Poll::Ready(TIMED_OUT_TEXT.into());
            }
            if let Err(e) = pings.send_ping(h2::Ping::opaque()) {
                return Poll::Ready(e.to_string());
            }
            self.awaiting_pong = true;
            self.timer.as_mut().reset(tokio::time::Instant::now() + self.keep_alive.timeout);
        }
    }
}

/// [`Shared::state`]: serving.
const OPEN: u8 = 0;
/// Ended: closed by either side, GOAWAY, or a connection error.
const CLOSED: u8 = 1;
/// Ended because no PONG came back in time.
const TIMED_OUT: u8 = 2;

/// Every how many requests on a connection the stamped trace fields are sent indexable
/// ([`headers::index_stamped_names`]): their names stay in HPACK's dynamic table, which other
/// fields inserted meanwhile may have evicted.
const NAMES_INDEXED_EVERY: u32 = 1024;

/// An HTTP/2 connection to an upstream, as the pool holds it; a request sends on a clone.
#[derive(Clone)]
pub struct Connection {
    send: h2::client::SendRequest<Bytes>,
    shared: Arc<Shared>,
}

/// What the clones of a connection and its task share.
struct Shared {
    /// Set by the connection's task when it ends.
    state: AtomicU8,
    /// Requests sent on it so far.
    sent: AtomicU32,
}

/// Why [`Connection::send`] failed.
pub enum SendFailure {
    /// The connection takes no new stream (it ended, or the peer sent GOAWAY): nothing was
    /// sent, and the request is given back to be sent on a new connection. (Boxed: rare, and
    /// the result of every request would be as large.)
    NotReady(Box<NotReady>),
    /// The request was sent (at least in part) and failed.
    Failed(ProxyError),
}

/// A request a connection did not take ([`SendFailure::NotReady`]).
pub struct NotReady {
    pub error: ProxyError,
    pub req: Request<Body>,
    /// The connection's state: who it was.
    conn: Arc<Shared>,
}

impl Connection {
    /// Opens HTTP/2 on `stream` (settings as the proxy's other HTTP/2 peers expect: windows of
    /// 1 MiB per stream and 4 MiB per connection) and spawns the connection's task.
    pub async fn handshake(stream: PeerStream, keep_alive: KeepAlive, addr: SocketAddr) -> Result<Self, ProxyError> {
        let (send, conn) = h2::client::Builder::new()
            // As hyper's client set them, which this replaces.
            .initial_max_send_streams(100)
            .initial_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024)
            .max_frame_size(16 * 1024)
            .max_header_list_size(16 * 1024)
            .max_send_buffer_size(1024 * 1024)
            .max_concurrent_reset_streams(1024)
            .max_local_error_reset_streams(Some(1024))
            .enable_push(false)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| error(&e, false))?;
        let shared = Arc::new(Shared { state: AtomicU8::new(OPEN), sent: AtomicU32::new(0) });
        tokio::spawn(drive(conn, shared.clone(), keep_alive, addr));
        Ok(Connection { send, shared })
    }

    /// Whether the connection is still serving (its task has not ended).
    pub fn is_open(&self) -> bool {
        self.shared.state.load(Ordering::Relaxed) == OPEN
    }

    /// Whether the connection would take a new stream now (no GOAWAY or error seen).
    #[cfg(test)]
    pub(crate) fn takes_streams(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(self.send.clone().poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    /// Whether `self` is the connection that did not take `failed`.
    pub fn refused(&self, failed: &NotReady) -> bool {
        Arc::ptr_eq(&self.shared, &failed.conn)
    }

    /// Sends `req` and returns the response head with its streaming body.
    pub async fn send(self, req: Request<Body>) -> Result<Response<ResponseBody>, SendFailure> {
        let Connection { send, shared } = self;
        // An error of the connection or of the stream.
        let failed = |e: &h2::Error| error(e, shared.state.load(Ordering::Relaxed) == TIMED_OUT);
        let mut send = match send.ready().await {
            Ok(send) => send,
            Err(e) => {
                let error = failed(&e);
                return Err(SendFailure::NotReady(Box::new(NotReady { error, req, conn: shared })));
            }
        };
        let (mut parts, body) = req.into_parts();
        set_content_length(&parts.method, &mut parts.headers, &body);
        if shared.sent.fetch_add(1, Ordering::Relaxed).is_multiple_of(NAMES_INDEXED_EVERY) {
            headers::index_stamped_names(&mut parts.headers);
        }
        let head = Request::from_parts(parts, ());
        let eos = body.is_end_stream();
        let (mut response, tx) = send.send_request(head, eos).map_err(|e| SendFailure::Failed(failed(&e)))?;
        // The body is sent alongside the wait for the response head: a whole body (or a
        // streaming one that ends) needs no task of its own.
        let mut pipe = (!eos).then(|| Pipe::new(body, tx));
        let head = poll_fn(|cx| {
            if let Some(p) = &mut pipe
                && Pin::new(p).poll(cx).is_ready()
            {
                pipe = None;
            }
            Pin::new(&mut response).poll(cx)
        })
        .await
        .map_err(|e| SendFailure::Failed(failed(&e)))?;
        // Still streaming (an upload answered early, bidirectional gRPC): on in a task, until
        // the body ends or the response body is dropped before its end.
        let cancel = pipe.map(|mut p| {
            let (cancel, on_cancel) = oneshot::channel();
            p.cancel = Some(on_cancel);
            tokio::spawn(p);
            cancel
        });
        let remaining = content_length(head.headers());
        Ok(head.map(|recv| ResponseBody { body: H2StreamBody::new(recv, remaining), cancel }))
    }
}

/// The connection's task: drives `conn` and its keep-alive until it ends, then records why.
async fn drive(
    mut conn: h2::client::Connection<PeerStream, Bytes>,
    shared: Arc<Shared>,
    keep_alive: KeepAlive,
    addr: SocketAddr,
) {
    let mut pinger = Pinger::new(conn.ping_pong(), keep_alive);
    let ended = poll_fn(|cx| {
        if let Poll::Ready(r) = Pin::new(&mut conn).poll(cx) {
            return Poll::Ready(r.map_err(|e| e.to_string()));
        }
        pinger.poll(cx).map(Err)
    })
    .await;
    // Recorded before the connection is dropped, which fails its streams in flight: their
    // requests read it to tell a keep-alive timeout.
    let timed_out = ended.as_ref().is_err_and(|e| e == TIMED_OUT_TEXT);
    shared.state.store(if timed_out { TIMED_OUT } else { CLOSED }, Ordering::Relaxed);
    drop(conn);
    if let Err(e) = ended {
        tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
    }
}

pub(super) const TIMED_OUT_TEXT: &str = "keep-alive timed out: no PONG";

/// Maps an HTTP/2 error to the proxy's error: a stream or connection that failed is an
/// upstream reset (retried as a policy's `reset` says: a REFUSED_STREAM or a GOAWAY before
/// processing is one), unless the connection had ended for want of a PONG: a timeout.
fn error(e: &h2::Error, keep_alive_timed_out: bool) -> ProxyError {
    if keep_alive_timed_out {
        return ProxyError::Timeout;
    }
    let mut msg = format!("http2 error: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    ProxyError::UpstreamReset(msg)
}

/// What hyper's client did to a request head before h2 that the proxy's request paths do not
/// already: a body of known size gets its `content-length` when it has none (a zero length
/// only for methods whose requests carry a payload), so the upstream knows the length before
/// the end of the stream. Connection-specific fields (RFC 9113 §8.2.2) are not looked at
/// here: every upstream request is built by [`super::Head::upstream_request`], which removes
/// them ([`super::headers::strip_hop_by_hop`]), and h2 refuses a head that still has one.
pub fn set_content_length(method: &Method, headers: &mut HeaderMap, body: &Body) {
    let Some(len) = body.size_hint().exact() else { return };
    let payload = !matches!(*method, Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT);
    if (len != 0 || payload) && !headers.contains_key(header::CONTENT_LENGTH) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

/// The `content-length` of a response head, when it has one valid value.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse().ok())
}

/// The reset reason an HTTP/2 error in `e`'s chain carries (a client's stream reset is passed
/// on as it came), else INTERNAL_ERROR.
fn reset_reason(e: &(dyn std::error::Error + 'static)) -> h2::Reason {
    let mut at = Some(e);
    while let Some(e) = at {
        if let Some(reason) = e.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return reason;
        }
        at = e.source();
    }
    h2::Reason::INTERNAL_ERROR
}

/// A request body on its way to the upstream, within the stream's flow control: a chunk is
/// sent once the stream has some capacity (h2 sends it as the window allows), trailers end it,
/// and a body error resets the stream. It ends when the body does, when the peer resets the
/// stream, or when `cancel` fires (the response body was dropped before its end). The HTTP/2
/// server ([`super::h2_server`]) sends its response bodies with it too.
pub(super) struct Pipe {
    body: Body,
    tx: h2::SendStream<Bytes>,
    /// A chunk polled from the body, waiting for capacity, and whether it is the last.
    pending: Option<(Bytes, bool)>,
    cancel: Option<oneshot::Receiver<()>>,
}

impl Pipe {
    /// Sends `body` on `tx` (a stream whose head is sent), without a cancel.
    pub(super) fn new(body: Body, tx: h2::SendStream<Bytes>) -> Self {
        Pipe { body, tx, pending: None, cancel: None }
    }
}

impl Future for Pipe {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(cancel) = &mut this.cancel {
            match Pin::new(cancel).poll(cx) {
                Poll::Ready(Ok(())) => {
                    this.tx.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                // The response body ended: the request body goes on as long as it does.
                Poll::Ready(Err(_)) => this.cancel = None,
                Poll::Pending => {}
            }
        }
        loop {
            // Registered while waiting for the body or for capacity: a reset by the peer ends it.
            if let Poll::Ready(reason) = this.tx.poll_reset(cx) {
                tracing::debug!(?reason, "upstream stream reset while sending the request body");
                return Poll::Ready(());
            }
            if this.pending.is_some() {
                while this.tx.capacity() == 0 {
                    match ready!(this.tx.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(_)) | None => return Poll::Ready(()),
                    }
                }
                let Some((data, eos)) = this.pending.take() else { continue };
                if this.tx.send_data(data, eos).is_err() || eos {
                    return Poll::Ready(());
                }
                continue;
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = this.body.is_end_stream();
                        if data.is_empty() {
                            if this.tx.send_data(data, eos).is_err() || eos {
                                return Poll::Ready(());
                            }
                        } else {
                            // A claim of one byte, not the chunk's length: h2 raises it to what
                            // is buffered, and a stream waiting here pins no window (as hyper).
                            this.tx.reserve_capacity(1);
                            this.pending = Some((data, eos));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.tx.reserve_capacity(0);
                            let _ = this.tx.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "request body failed: resetting the upstream stream");
                    this.tx.send_reset(reset_reason(&*e));
                    return Poll::Ready(());
                }
                None => {
                    let _ = this.tx.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// A response body read from an HTTP/2 stream: each data frame's bytes are given back to flow
/// control as they are handed on, trailers follow. Dropped before its end, it resets the
/// stream (h2 does once no handle of the stream is left; a request body still being sent is
/// stopped through `cancel`).
pub struct ResponseBody {
    body: H2StreamBody,
    cancel: Option<oneshot::Sender<()>>,
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(cancel) = self.cancel.take()
            && !self.body.is_end_stream()
        {
            let _ = cancel.send(());
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, crate::BoxError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if frame.is_none() || this.body.data_done() {
            // Ended (trailers or their failure come once the data has): a request body still
            // being sent goes on; dropping the sender only says so.
            this.cancel = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests;
