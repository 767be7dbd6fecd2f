//! The proxy's serving of HTTP/2 client connections on the `h2` crate directly: the mesh hop
//! between sidecars (mTLS, ALPN `plexus.h2`), h2c and gRPC apps, and gateways' HTTP/2 clients.
//!
//! Only the connection is a future ([`Connection`]), driven by [`super::server`] like the
//! HTTP/1 server's: each stream's handler, and then its response body, is polled inside it (a
//! [`FuturesUnordered`], so a stream wakes only itself) — no task per stream (the handler's
//! future moved into it), no cross-task wake-ups, no ping recorder per frame, as hyper's server
//! had; the same move as the client's (docs/PERFORMANCE.md, "The HTTP/2 client on h2"). The
//! connection also sends the keep-alive PINGs. A `CONNECT`'s `2xx` that carries a
//! [`HandOver`] leaves its stream open and hands it to the tunnel ([`super::tunnel`]).
//!
//! A stream the peer resets drops its handler (which cancels its upstream request) and its
//! response body at once; a response body that fails resets its stream only.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::{Body, H2StreamBody, ReceivedBody};
use super::h2_client::{KeepAlive, Pinger, Pipe};
use super::tunnel::HandOver;
use crate::BoxError;

/// What the server tells its HTTP/2 clients, and how much it takes from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// `SETTINGS_MAX_HEADER_LIST_SIZE`: the largest request head.
    pub max_header_list_size: u32,
    pub keep_alive: KeepAlive,
}

/// Keep-alive of a client's connection, as hyper's server had it: a PING every 30 s, and its
/// default 20 s for the PONG.
pub const SERVER_KEEP_ALIVE: KeepAlive =
    KeepAlive { interval: Duration::from_secs(30), timeout: Duration::from_secs(20) };

impl Settings {
    /// The handshake's settings: those the proxy gave hyper's server, and hyper's defaults for
    /// the rest, so that a hostile client gets no more from this server than from hyper's:
    /// streams, frames, header lists and the send buffer bounded as they were, at most 1024
    /// streams reset for the client's errors (rapid reset, CVE-2023-44487; h2's defaults
    /// bound the streams it resets before they are accepted), no extended CONNECT, h2's
    /// header table size.
    fn builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.max_concurrent_streams(1024)
            .max_header_list_size(self.max_header_list_size)
            .initial_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024)
            .max_send_buffer_size(256 * 1024)
            .max_frame_size(16 * 1024)
            .max_local_error_reset_streams(Some(1024));
        b
    }
}

/// A client's HTTP/2 connection, served until it closes, or until its streams in flight have
/// finished after [`graceful_shutdown`](Self::graceful_shutdown).
pub struct Connection<I, S, F> {
    state: State<I>,
    service: S,
    /// The streams being answered: their handlers, then their response bodies.
    streams: FuturesUnordered<Exchange<F>>,
    keep_alive: KeepAlive,
    /// `graceful_shutdown` was called (applied once the handshake is done).
    shutting_down: bool,
}

enum State<I> {
    Handshaking(h2::server::Handshake<I, Bytes>),
    Serving(Serving<I>),
    /// The handshake failed or the connection ended (polled again: ends at once).
    Done,
}

struct Serving<I> {
    conn: h2::server::Connection<I, Bytes>,
    pinger: Pinger,
}

impl<I, S, F> Connection<I, S, F>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Fn(Request<ReceivedBody>) -> F,
    F: Future<Output = Response<Body>> + Unpin,
{
    pub fn new(io: I, service: S, settings: &Settings) -> Self {
        Connection {
            state: State::Handshaking(settings.builder().handshake(io)),
            service,
            streams: FuturesUnordered::new(),
            keep_alive: settings.keep_alive,
            shutting_down: false,
        }
    }

    /// Takes no new stream (GOAWAY) and ends once the streams in flight have finished.
    pub fn graceful_shutdown(&mut self) {
        if !self.shutting_down
            && let State::Serving(s) = &mut self.state
        {
            s.conn.graceful_shutdown();
        }
        self.shutting_down = true;
    }

    /// A stream's request: its handler is called and the stream is answered from then on.
    fn start(
        service: &S,
        streams: &FuturesUnordered<Exchange<F>>,
        req: Request<h2::RecvStream>,
        respond: h2::server::SendResponse<Bytes>,
    ) {
        let (parts, recv) = req.into_parts();
        let body = ReceivedBody::Http2(H2StreamBody::new(recv, content_length(&parts.headers)));
        let response = service(Request::from_parts(parts, body));
        streams.push(Exchange::Answering { response, respond });
    }

    fn poll_serve(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let serving = match &mut self.state {
            State::Handshaking(hs) => {
                let conn = match ready!(Pin::new(hs).poll(cx)) {
                    Ok(conn) => conn,
                    Err(e) => {
                        self.state = State::Done;
                        return Poll::Ready(Err(e.into()));
                    }
                };
                self.state = State::Serving(Serving::new(conn, self.keep_alive));
                let State::Serving(s) = &mut self.state else { unreachable!("set above") };
                if self.shutting_down {
                    s.conn.graceful_shutdown();
                }
                s
            }
            State::Serving(s) => s,
            State::Done => return Poll::Ready(Ok(())),
        };
        loop {
            // The streams first: what they send is written by the connection's poll below.
            while let Poll::Ready(Some(())) = self.streams.poll_next_unpin(cx) {}
            match serving.conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, respond)))) => Self::start(&self.service, &self.streams, req, respond),
                Poll::Ready(Some(Err(e))) => {
                    self.state = State::Done;
                    return Poll::Ready(Err(e.into()));
                }
                // Closed: by the peer, or after a GOAWAY once no stream is left. Streams still
                // answering (the peer went away) are dropped with the connection.
                Poll::Ready(None) => {
                    self.state = State::Done;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => break,
            }
        }
        if let Poll::Ready(e) = serving.pinger.poll(cx) {
            // As hyper's server: GOAWAY (NO_ERROR) and the connection ends with an error.
            serving.conn.abrupt_shutdown(h2::Reason::NO_ERROR);
            let _ = serving.conn.poll_accept(cx);
            self.state = State::Done;
            return Poll::Ready(Err(e.into()));
        }
        Poll::Pending
    }
}

impl<I, S, F> Future for Connection<I, S, F>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Fn(Request<ReceivedBody>) -> F + Unpin,
    F: Future<Output = Response<Body>> + Unpin,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // One clock reading for all this poll does (crate::clock).
        let _time = crate::clock::polling();
        self.get_mut().poll_serve(cx)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> Serving<I> {
    fn new(mut conn: h2::server::Connection<I, Bytes>, keep_alive: KeepAlive) -> Self {
        let pinger = Pinger::new(conn.ping_pong(), keep_alive);
        Serving { conn, pinger }
    }
}

/// One stream being answered: its handler, then its response body.
enum Exchange<F> {
    Answering { response: F, respond: h2::server::SendResponse<Bytes> },
    Sending(Pipe),
}

impl<F: Future<Output = Response<Body>> + Unpin> Future for Exchange<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match this {
                Exchange::Answering { response, respond } => {
                    let Poll::Ready(resp) = Pin::new(response).poll(cx) else {
                        // Reset by the peer (or the connection failed): the handler is dropped.
                        if let Poll::Ready(reason) = respond.poll_reset(cx) {
                            tracing::debug!(?reason, "HTTP/2 stream reset before its response");
                            return Poll::Ready(());
                        }
                        return Poll::Pending;
                    };
                    let (mut parts, body) = resp.into_parts();
                    let mut fields = ResponseFields::of(&parts.headers);
                    if fields.connection_specific {
                        // (`Connection` may name `Date` or `Content-Length`: looked at again.)
                        strip_connection_specific(&mut parts.headers);
                        fields = ResponseFields::of(&parts.headers);
                    }
                    if !fields.date {
                        parts.headers.insert(header::DATE, crate::clock::with_date(HeaderValue::clone));
                    }
                    // A `CONNECT`'s `2xx` opens its tunnel: the stream stays open after the
                    // head, its sending half handed to the tunnel (RFC 9113 §8.5).
                    if let Some(hand_over) = parts.extensions.remove::<HandOver>() {
                        match respond.send_response(Response::from_parts(parts, ()), false) {
                            Ok(send) => {
                                if !hand_over.give(send) {
                                    tracing::debug!("CONNECT tunnel gone before its head was sent");
                                }
                            }
                            Err(e) => tracing::debug!(error = %e, "HTTP/2 CONNECT response head not sent"),
                        }
                        return Poll::Ready(());
                    }
                    let eos = body.is_end_stream();
                    if !eos
                        && !fields.content_length
                        && let Some(len) = body.size_hint().exact()
                    {
                        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                    }
                    match respond.send_response(Response::from_parts(parts, ()), eos) {
                        Ok(tx) if !eos => *this = Exchange::Sending(Pipe::new(body, tx)),
                        Ok(_) => return Poll::Ready(()),
                        Err(e) => {
                            tracing::debug!(error = %e, "HTTP/2 response head not sent");
                            respond.send_reset(h2::Reason::INTERNAL_ERROR);
                            return Poll::Ready(());
                        }
                    }
                }
                Exchange::Sending(pipe) => return Pin::new(pipe).poll(cx),
            }
        }
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What a response head holds of the fields the server looks at, found in one pass over its
/// names (a lookup by name hashes it; a standard name compares as a number).
struct ResponseFields {
    date: bool,
    content_length: bool,
    /// A field HTTP/2 forbids ([`strip_connection_specific`]).
    connection_specific: bool,
}

impl ResponseFields {
    fn of(headers: &HeaderMap) -> Self {
        let mut fields = ResponseFields { date: false, content_length: false, connection_specific: false };
        for name in headers.keys() {
            if *name == header::DATE {
                fields.date = true;
            } else if *name == header::CONTENT_LENGTH {
                fields.content_length = true;
            } else if *name == header::CONNECTION
                || *name == header::TRANSFER_ENCODING
                || *name == header::UPGRADE
                || *name == header::TE
                || *name == KEEP_ALIVE
                || *name == PROXY_CONNECTION
            {
                fields.connection_specific = true;
            }
        }
        fields
    }
}

/// Removes what HTTP/2 forbids in a response head (RFC 9113 §8.2.2), as hyper's server did: h2
/// refuses to send a head with any of them.
fn strip_connection_specific(headers: &mut HeaderMap) {
    // What `Connection` names is connection-specific too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [header::CONNECTION, header::TRANSFER_ENCODING, header::UPGRADE, header::TE, KEEP_ALIVE, PROXY_CONNECTION]
    {
        headers.remove(n);
    }
}

/// The `content-length` of a request head when all its values agree (as hyper read it), else
/// none: h2 has already refused a stream whose first value does not parse or whose data does
/// not match it.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut len = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for n in v.to_str().ok()?.split(',') {
            let n: u64 = n.trim().parse().ok()?;
            if len.is_some_and(|l| l != n) {
                return None;
            }
            len = Some(n);
        }
    }
    len
}

#[cfg(test)]
mod tests;
