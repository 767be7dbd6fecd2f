//! The proxy's own serving of HTTP/1.1 client connections: request heads parsed, handlers
//! called and their responses written by the connection's own future — no hyper dispatcher,
//! no request channel (docs/PERFORMANCE.md, "What hyper costs on its own", step 2). The wire
//! format is [`super::h1_codec`]'s; timeouts, drain and parking are [`super::server`]'s, which
//! drives this future like it drove hyper's.
//!
//! What it does not serve itself it hands back at a message boundary: a request that asks to
//! switch protocols (a WebSocket upgrade, `CONNECT`) ends [`Connection`] with its head unread
//! ([`Connection::handed_off`]), and the caller serves the connection with hyper from there.
//!
//! One request at a time, in order (pipelined requests wait in the read buffer). Full duplex
//! within an exchange: the request body keeps being read while the response streams back (an
//! echo). A connection carries another request only when both the request body and the
//! response have ended cleanly; a request body the handler did not read to its end closes the
//! connection after the response (its rest is never read as a request; the response says
//! `connection: close` when that is known as it starts).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::{Body, ReceivedBody};
use super::h1_codec::{self, BodyDecoder, CodecError, Decoded, Framing, HeadError, Limits, RequestHead};
use super::headers;
use crate::BoxError;
use crate::error::ProxyError;

/// Bytes asked of the socket by a connection's first read: enough for most request heads. A
/// read that fills what it asked for doubles the next one, up to [`READ_MAX`], so an idle
/// keep-alive connection of small requests holds 1 KiB, and an upload is still read in large
/// pieces.
const READ_FIRST: usize = 1024;
const READ_MAX: usize = 64 * 1024;

/// How long a connection closed with the client still sending (an early answer, a refused
/// head) keeps reading and discarding, and how much at most: so that the kernel does not reset
/// the connection, and destroy the answer, while the client has not read it yet.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;

/// Encoded response bytes held before they are written (a body frame larger than this is
/// written from its own buffer, not copied).
const WRITE_HIGH_WATER: usize = 16 * 1024;

/// The limits of a client's request heads.
pub fn limits(max_header_bytes: usize) -> Limits {
    // As hyper's server had them: a head up to the configured size (at least 8 KiB), 100 fields.
    Limits { max_head_bytes: max_header_bytes.max(8192), max_headers: 100 }
}

/// A client's HTTP/1.1 connection, served until it closes, its last exchange ends after
/// [`graceful_shutdown`](Self::graceful_shutdown), or it is handed off.
pub struct Connection<I, S, F> {
    io: I,
    read: BytesMut,
    /// Bytes asked of the socket by the next read.
    read_chunk: usize,
    /// The client closed its sending side.
    eof: bool,
    /// Encoded response bytes not yet written (from `written`).
    write: Vec<u8>,
    written: usize,
    /// A large body frame, written after `write` from its own buffer.
    held: Held,
    limits: Limits,
    service: S,
    phase: Phase<F>,
    /// Serve no request after the current one.
    last: bool,
    /// Ended at a request it does not serve; the request's head is still in the read buffer.
    handed_off: bool,
    /// Closes with input left unread (a refused head, a body not read to its end): after its
    /// answer the connection lingers ([`Phase::Lingering`]) and is never served again.
    unread_input: bool,
    /// The last response's header map, cleared: the next request head is parsed into it.
    spare_headers: http::HeaderMap,
    /// The names of the last request head, reused when the next repeats them.
    names: h1_codec::FieldNames,
}

enum Phase<F> {
    /// Waiting for (or reading) a request head.
    Idle,
    /// The handler is working on a request.
    Serving {
        exchange: Exchange,
        response: F,
    },
    /// The response is being written.
    Responding {
        exchange: Exchange,
        body: Option<Body>,
        framing: Framing,
    },
    /// Writing what is left, then closing.
    Closing,
    /// Closed for sending; what the client still sends is read and discarded until it closes,
    /// [`LINGER_BYTES`] were read or the timer fires.
    Lingering {
        until: Pin<Box<tokio::time::Sleep>>,
        discarded: usize,
    },
    Done,
}

/// What the connection keeps of the request being served.
struct Exchange {
    version: Version,
    head_method: bool,
    keep_alive: bool,
    /// The request body still to be read from the connection, if any.
    upload: Option<Upload>,
}

/// A request body being read from the connection and handed to its reader.
struct Upload {
    decoder: BodyDecoder,
    feed: Arc<Feed>,
    /// `100 Continue` is owed before the first read of the body.
    expect_continue: bool,
    /// The body broke its framing (or the connection failed): nothing more is read.
    failed: bool,
}

impl<I, S, F> Connection<I, S, F>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Fn(Request<ReceivedBody>) -> F,
    F: Future<Output = Response<Body>> + Unpin,
{
    pub fn new(io: I, service: S, limits: Limits) -> Self {
        Connection {
            io,
            read: BytesMut::new(),
            read_chunk: READ_FIRST,
            eof: false,
            write: Vec::new(),
            written: 0,
            held: Held::default(),
            limits,
            service,
            phase: Phase::Idle,
            last: false,
            handed_off: false,
            unread_input: false,
            spare_headers: http::HeaderMap::new(),
            names: h1_codec::FieldNames::default(),
        }
    }

    /// Serves no further request: an idle connection ends at once, a busy one after its
    /// response.
    pub fn graceful_shutdown(&mut self) {
        self.last = true;
    }

    /// Whether the connection ended at a request it does not serve (see the module's doc).
    pub fn handed_off(&self) -> bool {
        self.handed_off
    }

    /// Whether the connection closed with input left unread: its socket must not be served
    /// again (what follows in it is not a request).
    pub fn closed_with_unread_input(&self) -> bool {
        self.unread_input
    }

    /// The connection's I/O, the bytes read and not yet served, and the service.
    pub fn into_parts(self) -> (I, BytesMut, S) {
        (self.io, self.read, self.service)
    }

    fn poll_serve(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.phase {
                Phase::Idle => {
                    if self.last {
                        // Told to end: a request not begun yet (or pipelined behind the last
                        // one) is not served; its client sees the connection close unanswered.
                        self.phase = Phase::Closing;
                        continue;
                    }
                    match h1_codec::parse_request_head(
                        &self.read,
                        &self.limits,
                        &mut self.spare_headers,
                        &mut self.names,
                    ) {
                        Ok(Some(head)) => self.start(head),
                        Ok(None) if self.eof => self.phase = Phase::Closing,
                        Ok(None) => {
                            if ready!(self.poll_read_more(cx))? == 0 && self.read.is_empty() {
                                // The client closed between requests.
                                self.phase = Phase::Closing;
                            }
                        }
                        Err(e) => self.refuse(e),
                    }
                    if self.handed_off {
                        return Poll::Ready(Ok(()));
                    }
                }
                Phase::Serving { exchange, response } => {
                    let response = Pin::new(response).poll(cx);
                    if let Some(upload) = exchange.upload.as_mut() {
                        let started = response.is_ready();
                        let reading = (&mut self.io, &mut self.read, &mut self.read_chunk, &mut self.eof);
                        Self::feed(reading, &mut self.write, upload, started, cx);
                    }
                    match response {
                        Poll::Ready(resp) => {
                            let Phase::Serving { exchange, .. } = std::mem::replace(&mut self.phase, Phase::Done)
                            else {
                                unreachable!("matched above")
                            };
                            self.respond(exchange, resp);
                        }
                        Poll::Pending => {
                            // `100 Continue` may be waiting to go out.
                            ready!(poll_write_out(
                                &mut self.io,
                                &mut self.write,
                                &mut self.written,
                                &mut self.held,
                                cx
                            ))?;
                            if exchange.upload.as_ref().is_none_or(|u| u.decoder.is_done() && !u.failed) {
                                self.watch_client(cx)?;
                            }
                            return Poll::Pending;
                        }
                    }
                }
                Phase::Responding { exchange, body, framing } => {
                    if let Some(upload) = exchange.upload.as_mut() {
                        let reading = (&mut self.io, &mut self.read, &mut self.read_chunk, &mut self.eof);
                        Self::feed(reading, &mut self.write, upload, true, cx);
                    }
                    if let Some(b) = body.as_mut() {
                        let ended = ready!(Self::poll_body(
                            &mut self.io,
                            &mut self.write,
                            &mut self.written,
                            &mut self.held,
                            b,
                            framing,
                            cx
                        ))?;
                        if !ended {
                            return Poll::Pending;
                        }
                        *body = None;
                    }
                    ready!(poll_write_out(&mut self.io, &mut self.write, &mut self.written, &mut self.held, cx))?;
                    // The exchange is over: another one follows if both sides allow it and
                    // the request was read to its end.
                    let read_whole = exchange.upload.as_ref().is_none_or(|u| u.decoder.is_done() && !u.failed);
                    self.unread_input |= !read_whole;
                    let again = exchange.keep_alive && read_whole && !self.last;
                    self.phase = if again { Phase::Idle } else { Phase::Closing };
                }
                Phase::Closing => {
                    ready!(self.poll_write_out(cx))?;
                    ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
                    if !self.unread_input || self.eof {
                        self.phase = Phase::Done;
                        return Poll::Ready(Ok(()));
                    }
                    let until = Box::pin(tokio::time::sleep(LINGER_TIME));
                    self.phase = Phase::Lingering { until, discarded: 0 };
                }
                Phase::Lingering { until, discarded } => {
                    let mut over = until.as_mut().poll(cx).is_ready();
                    while !over {
                        self.read.clear();
                        match poll_read_more(&mut self.io, &mut self.read, &mut self.read_chunk, &mut self.eof, cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(Ok(n)) if n > 0 => {
                                *discarded += n;
                                over = *discarded >= LINGER_BYTES;
                            }
                            Poll::Ready(_) => over = true,
                        }
                    }
                    self.read.clear();
                    self.phase = Phase::Done;
                    return Poll::Ready(Ok(()));
                }
                Phase::Done => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Starts serving the request `head` (its bytes are still at the front of the read buffer).
    fn start(&mut self, head: RequestHead) {
        if head.method == Method::CONNECT || (head.upgrade && headers::is_upgrade(&head.headers)) {
            self.handed_off = true;
            self.phase = Phase::Done;
            return;
        }
        self.read.advance(head.len);
        let RequestHead { method, uri, version, headers, framing, keep_alive, expect_continue, .. } = head;
        let (body, upload) = match framing {
            Framing::Length(n) if n <= self.read.len() as u64 => {
                // The whole body came with its head (usize: it fits in the buffer).
                (Http1Body::Full(Some(self.read.split_to(n as usize).freeze())), None)
            }
            Framing::Length(_) | Framing::Chunked => {
                let decoder = BodyDecoder::new(framing, self.limits);
                let feed = Arc::new(Feed::new(decoder.size_hint()));
                let body = Http1Body::Streaming(feed.clone());
                (body, Some(Upload { decoder, feed, expect_continue, failed: false }))
            }
            Framing::Empty | Framing::UntilClose => (Http1Body::Empty, None),
        };
        let mut request = Request::new(ReceivedBody::Http1(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = version;
        *request.headers_mut() = headers;
        let head_method = request.method() == Method::HEAD;
        let exchange = Exchange { version, head_method, keep_alive, upload };
        let response = (self.service)(request);
        self.phase = Phase::Serving { exchange, response };
    }

    /// Answers a head that cannot be served (400, 431) and closes the connection.
    fn refuse(&mut self, e: HeadError) {
        self.unread_input = true;
        let err = match e {
            HeadError::Malformed(why) => ProxyError::BadRequest(why.into()),
            HeadError::TooLarge => ProxyError::HeadTooLarge,
        };
        tracing::debug!(error = %err, "refused a request head");
        self.last = true;
        let exchange = Exchange { version: Version::HTTP_11, head_method: false, keep_alive: false, upload: None };
        self.respond(exchange, err.into_response(false));
    }

    /// Writes the head of `resp`, the answer to `exchange`; its body follows.
    fn respond(&mut self, exchange: Exchange, resp: Response<Body>) {
        let (parts, body) = resp.into_parts();
        let status = parts.status;
        let bodiless = exchange.head_method
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let exact = body.size_hint().exact();
        let framing = if bodiless {
            Framing::Empty
        } else if let Some(n) = exact {
            Framing::Length(n)
        } else if let Some(n) = declared_length(&parts.headers) {
            Framing::Length(n)
        } else if exchange.version == Version::HTTP_10 {
            Framing::UntilClose
        } else {
            Framing::Chunked
        };
        let mut exchange = exchange;
        exchange.keep_alive &= framing != Framing::UntilClose;
        // A request body that will not be read to its end (its reader is gone, it failed, or
        // its client still waits for `100 Continue`, which no longer comes once the answer
        // has) closes the connection after this answer: the answer says so.
        exchange.keep_alive &= exchange
            .upload
            .as_ref()
            .is_none_or(|u| u.decoder.is_done() || !(u.failed || u.expect_continue || u.feed.lock().reader_gone));
        let connection = match (exchange.keep_alive && !self.last, exchange.version) {
            (false, _) => Some("close"),
            (true, Version::HTTP_10) => Some("keep-alive"),
            (true, _) => None,
        };
        if connection == Some("close") {
            exchange.keep_alive = false;
        }
        crate::clock::with_date(|date| {
            let date = date.as_bytes();
            // The answer to a HEAD request declares the length of the body it does not send,
            // when it is known and the headers do not already say it. An empty body says
            // nothing (a proxied HEAD answer is always empty): no `content-length: 0`, as
            // hyper's server had it.
            let announced = match exact {
                Some(n)
                    if n > 0 && exchange.head_method && !parts.headers.contains_key(http::header::CONTENT_LENGTH) =>
                {
                    Framing::Length(n)
                }
                _ => framing,
            };
            h1_codec::encode_response_head(
                exchange.version,
                status,
                &parts.headers,
                announced,
                connection,
                date,
                &mut self.write,
            );
        });
        // The map's allocation serves the next request's head.
        let mut spare = parts.headers;
        spare.clear();
        self.spare_headers = spare;
        let body = (!bodiless && framing != Framing::Length(0)).then_some(body);
        self.phase = Phase::Responding { exchange, body, framing };
    }

    /// Reads the request body for its reader: when the reader waits for more, decodes what the
    /// read buffer holds or reads more. `responded`: the response has started (no `100
    /// Continue` is sent after that).
    fn feed(
        (io, read, read_chunk, eof): (&mut I, &mut BytesMut, &mut usize, &mut bool),
        write: &mut Vec<u8>,
        upload: &mut Upload,
        responded: bool,
        cx: &mut Context<'_>,
    ) {
        loop {
            if upload.decoder.is_done() || upload.failed {
                return;
            }
            {
                let mut shared = upload.feed.lock();
                if shared.reader_gone {
                    return;
                }
                if !shared.wanted || shared.frame.is_some() {
                    shared.connection = Some(cx.waker().clone());
                    return;
                }
            }
            if std::mem::take(&mut upload.expect_continue) && !responded {
                write.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            let decoded = match upload.decoder.decode(read, *eof) {
                Ok(Decoded::NeedMore) => match poll_read_more(io, read, read_chunk, eof, cx) {
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(error = %e, "reading a request body");
                        Err(CodecError("the connection failed within a body"))
                    }
                    Poll::Pending => {
                        upload.feed.lock().connection = Some(cx.waker().clone());
                        return;
                    }
                },
                Ok(Decoded::Data(data)) => Ok(Some(Frame::data(data))),
                Ok(Decoded::Trailers(trailers)) => Ok(Some(Frame::trailers(trailers))),
                Ok(Decoded::End) => Ok(None),
                Err(e) => Err(e),
            };
            let mut shared = upload.feed.lock();
            match decoded {
                Ok(Some(frame)) => {
                    let pending = frame.data_ref().map_or(0, |d| d.len() as u64);
                    shared.hint = match upload.decoder.size_hint().exact() {
                        Some(left) => SizeHint::with_exact(left + pending),
                        None => SizeHint::default(),
                    };
                    shared.frame = Some(Ok(frame));
                }
                Ok(None) => shared.ended = true,
                Err(e) => {
                    // Nothing more can be read of this connection.
                    shared.frame = Some(Err(e));
                    shared.ended = true;
                    upload.failed = true;
                }
            }
            if upload.decoder.is_done() {
                shared.ended = true;
            }
            shared.wanted = false;
            if let Some(w) = shared.reader.take() {
                w.wake();
            }
        }
    }

    /// Encodes and writes the response body; Ready(true) once it has ended and been encoded
    /// whole, Ready(false) if it has to be waited for.
    fn poll_body(
        io: &mut I,
        write: &mut Vec<u8>,
        written: &mut usize,
        held: &mut Held,
        body: &mut Body,
        framing: &mut Framing,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<bool>> {
        loop {
            if write.len() - *written >= WRITE_HIGH_WATER || !held.is_empty() {
                ready!(poll_write_out(io, write, written, held, cx))?;
            }
            if *framing == Framing::Length(0) {
                // Every byte the length announced is out: hyper's server stops here too.
                return Poll::Ready(Ok(true));
            }
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => {
                    ready!(poll_write_out(io, write, written, held, cx))?;
                    return Poll::Ready(Ok(false));
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(io::Error::other(format!("the response body failed: {e}"))));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let data = h1_codec::encode_frame(frame, framing, write)
                        .map_err(|e| io::Error::other(format!("the response body {e}")))?;
                    let Some(data) = data else { continue };
                    if data.len() > WRITE_HIGH_WATER {
                        // Written from its own buffer after `write`, then its chunk's end.
                        *held = Held { data, tail: framing.after_data() };
                        ready!(poll_write_out(io, write, written, held, cx))?;
                    } else {
                        write.extend_from_slice(&data);
                        write.extend_from_slice(framing.after_data());
                    }
                }
                Poll::Ready(None) => {
                    h1_codec::encode_end(*framing, write)
                        .map_err(|e| io::Error::other(format!("the response body {e}")))?;
                    return Poll::Ready(Ok(true));
                }
            }
        }
    }

    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_write_out(&mut self.io, &mut self.write, &mut self.written, &mut self.held, cx)
    }

    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_read_more(&mut self.io, &mut self.read, &mut self.read_chunk, &mut self.eof, cx)
    }

    /// While a request read whole is being answered: reads what the client sends meanwhile, so
    /// that a client that resets its connection is noticed at once — the error ends the
    /// connection, which drops the handler and with it the upstream request (as a reset HTTP/2
    /// stream does) instead of letting it run to its end for nobody. Bytes a client pipelines
    /// meanwhile are kept for after this exchange, up to a head's worth; its end of input is a
    /// half-close, not a cancellation (it may still read the answer). Costs no system call
    /// while nothing arrives: the last read was short, so the socket is known not ready.
    fn watch_client(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while !self.eof && self.read.len() < self.limits.max_head_bytes {
            match poll_read_more(&mut self.io, &mut self.read, &mut self.read_chunk, &mut self.eof, cx) {
                Poll::Ready(Ok(n)) if n > 0 => {}
                Poll::Ready(Ok(_)) | Poll::Pending => break,
                Poll::Ready(Err(e)) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<I, S, F> Future for Connection<I, S, F>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Fn(Request<ReceivedBody>) -> F + Unpin,
    F: Future<Output = Response<Body>> + Unpin,
{
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // One clock reading for all this poll does (crate::clock).
        let _time = crate::clock::polling();
        self.poll_serve(cx)
    }
}

/// A large body frame waiting to be written from its own buffer, then what ends it (a chunk's
/// CRLF): kept apart so that a write that has to wait never reorders or loses bytes.
#[derive(Default)]
struct Held {
    data: Bytes,
    tail: &'static [u8],
}

impl Held {
    fn is_empty(&self) -> bool {
        self.data.is_empty() && self.tail.is_empty()
    }
}

/// Writes `write` (from `written`), then `held`, and flushes.
fn poll_write_out<I: AsyncWrite + Unpin>(
    io: &mut I,
    write: &mut Vec<u8>,
    written: &mut usize,
    held: &mut Held,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    if *written == write.len() && held.is_empty() {
        return Poll::Ready(Ok(()));
    }
    while *written < write.len() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, &write[*written..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *written += n;
    }
    write.clear();
    *written = 0;
    while !held.data.is_empty() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, &held.data))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        held.data.advance(n);
    }
    while !held.tail.is_empty() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, held.tail))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        held.tail = &held.tail[n..];
    }
    Pin::new(&mut *io).poll_flush(cx)
}

/// Reads more from the client into `read` (`eof` set at its end).
fn poll_read_more<I: AsyncRead + Unpin>(
    io: &mut I,
    read: &mut BytesMut,
    chunk: &mut usize,
    eof: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if *eof {
        return Poll::Ready(Ok(0));
    }
    read.reserve(*chunk);
    let room = read.capacity() - read.len();
    let n = ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, read))?;
    if n == 0 {
        *eof = true;
    } else if n == room {
        *chunk = (*chunk * 2).min(READ_MAX);
    }
    Poll::Ready(Ok(n))
}

/// The `Content-Length` a response declares, when its body's size is not known otherwise.
fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()?.trim().parse().ok()
}

/// The request body read by the connection, shared between it and the body's reader.
pub struct Feed {
    shared: Mutex<Shared>,
}

#[derive(Default)]
struct Shared {
    /// The next frame (or the body's failure), read and not yet taken.
    frame: Option<Result<Frame<Bytes>, CodecError>>,
    /// The body has ended (after `frame`, if any).
    ended: bool,
    /// The reader waits for a frame.
    wanted: bool,
    /// The reader was dropped.
    reader_gone: bool,
    reader: Option<Waker>,
    connection: Option<Waker>,
    hint: SizeHint,
}

impl Feed {
    fn new(hint: SizeHint) -> Self {
        Feed { shared: Mutex::new(Shared { hint, ..Shared::default() }) }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding it leaves nothing half-done that matters here.
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A client's HTTP/1 request body as the proxy's own server gives it: none, whole (it came
/// with the head), or read from the connection as its reader asks.
pub enum Http1Body {
    Empty,
    Full(Option<Bytes>),
    Streaming(Arc<Feed>),
}

impl http_body::Body for Http1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            Http1Body::Empty => Poll::Ready(None),
            Http1Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Http1Body::Streaming(feed) => {
                let mut shared = feed.lock();
                if let Some(frame) = shared.frame.take() {
                    return Poll::Ready(Some(frame.map_err(Into::into)));
                }
                if shared.ended {
                    return Poll::Ready(None);
                }
                shared.wanted = true;
                shared.reader = Some(cx.waker().clone());
                if let Some(w) = shared.connection.take() {
                    w.wake();
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Http1Body::Empty => true,
            Http1Body::Full(data) => data.is_none(),
            Http1Body::Streaming(feed) => {
                let shared = feed.lock();
                shared.ended && shared.frame.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Http1Body::Empty => SizeHint::with_exact(0),
            Http1Body::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Http1Body::Streaming(feed) => feed.lock().hint,
        }
    }
}

impl Drop for Http1Body {
    fn drop(&mut self) {
        if let Http1Body::Streaming(feed) = self {
            let mut shared = feed.lock();
            shared.reader_gone = true;
            if let Some(w) = shared.connection.take() {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests;
