//! The proxy's own HTTP/1.1 connections to upstreams: a request is written and its response
//! read by the request's own future, and its response body by that body — no connection task,
//! no request channel (docs/PERFORMANCE.md, "What hyper costs on its own", step 1). The wire
//! format is [`super::h1_codec`]'s; pooling is [`super::client::Pool`]'s.
//!
//! Full duplex as HTTP/1.1 allows: a request body still being sent keeps being sent while the
//! response streams back (an echo), and a response that comes first (a `413` to an upload) is
//! read and returned even if the upload then fails. A connection is reused only when its
//! request and response have both ended, cleanly, with nothing more on the wire.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use http::{Method, Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::AsyncWrite;

use super::body::Body;
use super::client::PeerStream;
use super::h1_codec::{self, BodyDecoder, CodecError, Decoded, Framing, Limits, ResponseHead};
use crate::BoxError;
use crate::error::ProxyError;

/// What a response head may be: hyper's client defaults (8 KiB + 100 fields of 4 KiB, 100
/// fields), so what was accepted before is accepted now.
const LIMITS: Limits = Limits { max_head_bytes: 8192 + 4096 * 100, max_headers: 100 };

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 * 1024;

/// An HTTP/1.1 connection to an upstream, between requests or carrying one.
pub struct Conn {
    io: PeerStream,
    read: BytesMut,
    /// The peer closed its side.
    eof: bool,
    /// Request bytes encoded and not yet written (from `written`).
    write: Vec<u8>,
    written: usize,
    /// Everything written has been flushed (TLS keeps records until flushed).
    flushed: bool,
    /// The request body being sent, if it has not ended.
    upload: Option<Upload>,
    /// The request could not be sent whole (the upstream stopped reading or closed).
    upload_failed: Option<String>,
    /// Requests this connection has carried.
    pub served: u32,
    /// The names of the last response head, reused when the next repeats them.
    names: h1_codec::FieldNames,
}

struct Upload {
    body: Body,
    framing: Framing,
}

/// Why a request could not be sent whole.
enum UploadError {
    /// Its body failed (the client's fault).
    Body(String),
    /// The connection would not take it (the upstream stopped reading or closed).
    Write(String),
}

impl Conn {
    pub fn new(io: PeerStream) -> Self {
        Conn {
            io,
            read: BytesMut::new(),
            eof: false,
            write: Vec::new(),
            written: 0,
            flushed: true,
            upload: None,
            upload_failed: None,
            names: h1_codec::FieldNames::default(),
            served: 0,
        }
    }

    /// Whether an idle connection can carry a request: the upstream has neither closed it nor
    /// sent anything unasked (checked without waiting).
    pub fn is_reusable(&mut self) -> bool {
        if self.eof || !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(self.poll_read_more(&mut cx), Poll::Pending)
    }

    /// Sends `req` (its body taken) and returns the response head and its body (a response's
    /// `1xx` heads are skipped; a `101` is refused: upgrades take [`super::client::Pool::send_upgrade`]).
    /// The response's fields go into the allocation of `req`'s header map (written by then),
    /// which is left empty; on an error it is left as it was.
    pub async fn exchange(
        mut self: Box<Self>,
        req: &mut Request<Body>,
    ) -> Result<(ResponseHead, Box<Self>), ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::UpstreamReset("CONNECT is not sent on a pooled connection".into()));
        }
        self.served += 1;
        let body = std::mem::replace(req.body_mut(), super::body::empty());
        let method = req.method().clone();
        let framing = request_framing(&method, &body);
        let absolute;
        let target = match req.uri().scheme() {
            Some(_) => {
                absolute = req.uri().to_string();
                absolute.as_str()
            }
            None => req.uri().path_and_query().map_or("/", |p| p.as_str()),
        };
        self.write.clear();
        self.written = 0;
        h1_codec::encode_request_head(&method, target, req.headers(), framing, &mut self.write);
        if framing != Framing::Empty {
            self.upload = Some(Upload { body, framing });
        }
        let fields = req.headers_mut();
        let head = std::future::poll_fn(|cx| self.poll_response_head(cx, &method, fields)).await?;
        Ok((head, self))
    }

    /// Reads the final response head; its fields go into `fields`' allocation.
    fn poll_response_head(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
        fields: &mut http::HeaderMap,
    ) -> Poll<Result<ResponseHead, ProxyError>> {
        loop {
            if let Err(e) = self.keep_uploading(cx) {
                return Poll::Ready(Err(ProxyError::UpstreamReset(e)));
            }
            match h1_codec::parse_response_head(&mut self.read, method, &LIMITS, fields, &mut self.names) {
                Ok(Some(head)) if head.status == http::StatusCode::SWITCHING_PROTOCOLS => {
                    return Poll::Ready(Err(ProxyError::UpstreamReset(
                        "the upstream switched protocols unasked".into(),
                    )));
                }
                Ok(Some(head)) if head.status.is_informational() => continue,
                Ok(Some(head)) => return Poll::Ready(Ok(head)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(invalid(e))),
            }
            if self.eof {
                let why =
                    self.upload_failed.take().unwrap_or_else(|| "connection closed before message completed".into());
                return Poll::Ready(Err(ProxyError::UpstreamReset(why)));
            }
            if let Err(e) = ready!(self.poll_read_more(cx)) {
                return Poll::Ready(Err(ProxyError::UpstreamReset(format!("reading the response: {e}"))));
            }
        }
    }

    /// Sends what it can of the request. A failure to write stops the upload and is kept in
    /// `upload_failed` (the upstream may have answered before it stopped reading); the request
    /// body's own failure (the client's: malformed, stalled) fails the exchange.
    fn keep_uploading(&mut self, cx: &mut Context<'_>) -> Result<(), String> {
        let done = self.upload.is_none() && self.write.is_empty() && self.flushed;
        if done || self.upload_failed.is_some() {
            return Ok(());
        }
        match self.poll_upload(cx) {
            Poll::Ready(Err(UploadError::Body(e))) => Err(e),
            Poll::Ready(Err(UploadError::Write(e))) => {
                self.upload = None;
                self.write.clear();
                self.written = 0;
                self.upload_failed = Some(e);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Whether the request has been sent whole.
    fn uploaded(&self) -> bool {
        self.upload.is_none() && self.write.is_empty() && self.upload_failed.is_none()
    }

    /// Writes encoded bytes and encodes more of the request body, until all is written and
    /// flushed (Ready) or the socket or the body must be waited for (Pending).
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UploadError>> {
        loop {
            while self.written < self.write.len() {
                match ready!(Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..])) {
                    Ok(0) => {
                        return Poll::Ready(Err(UploadError::Write(
                            "sending the request: the connection closed".into(),
                        )));
                    }
                    Ok(n) => {
                        self.written += n;
                        self.flushed = false;
                    }
                    Err(e) => return Poll::Ready(Err(UploadError::Write(format!("sending the request: {e}")))),
                }
            }
            self.write.clear();
            self.written = 0;
            let Some(upload) = self.upload.as_mut() else {
                ready!(Pin::new(&mut self.io).poll_flush(cx))
                    .map_err(|e| UploadError::Write(format!("sending the request: {e}")))?;
                self.flushed = true;
                return Poll::Ready(Ok(()));
            };
            match Pin::new(&mut upload.body).poll_frame(cx) {
                Poll::Pending => {
                    ready!(Pin::new(&mut self.io).poll_flush(cx))
                        .map_err(|e| UploadError::Write(format!("sending the request: {e}")))?;
                    self.flushed = true;
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(UploadError::Body(format!("the request body failed: {e}"))));
                }
                // Trailers end the body here, unsent: the proxy strips the `Trailer` field
                // that would announce them, and an app need not take a trailer section
                // (hyper's client, which sent only announced ones, sent none).
                Poll::Ready(Some(Ok(frame))) if !frame.is_trailers() => {
                    let data = h1_codec::encode_frame(frame, &mut upload.framing, &mut self.write)
                        .map_err(|e| UploadError::Body(format!("the request body {e}")))?;
                    if let Some(data) = data {
                        self.write.extend_from_slice(&data);
                        self.write.extend_from_slice(upload.framing.after_data());
                    }
                }
                Poll::Ready(_) => {
                    h1_codec::encode_end(upload.framing, &mut self.write)
                        .map_err(|e| UploadError::Body(format!("the request body {e}")))?;
                    self.upload = None;
                }
            }
        }
    }

    /// Reads more from the upstream into the read buffer (`eof` set at its end).
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read.reserve(READ_CHUNK);
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read))?;
        if n == 0 {
            self.eof = true;
        }
        Poll::Ready(Ok(n))
    }
}

/// How a request's body is framed on the wire: by its exact size when known (`0` only for
/// methods that carry content), else chunked.
fn request_framing(method: &Method, body: &Body) -> Framing {
    let carries_content = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
    match body.size_hint().exact() {
        Some(0) if body.is_end_stream() && !carries_content => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::Chunked,
    }
}

fn invalid(e: CodecError) -> ProxyError {
    ProxyError::UpstreamReset(format!("invalid HTTP/1 response from the upstream: {e}"))
}

/// Where a connection goes once its exchange has ended cleanly.
pub trait Home: Send + 'static {
    fn put_back(&self, conn: Box<Conn>);
}

/// A response body read from its connection; at its end the connection goes `home` if it can
/// carry another request, else it is closed. Dropped before its end: the connection is closed.
pub struct ResponseBody<H: Home> {
    conn: Option<Box<Conn>>,
    decoder: BodyDecoder,
    keep_alive: bool,
    home: H,
}

impl<H: Home> ResponseBody<H> {
    /// The body of `head`, read from `conn`; a body already complete hands the connection
    /// back at once.
    pub fn new(head: &ResponseHead, conn: Box<Conn>, home: H) -> Self {
        let mut body = ResponseBody {
            conn: Some(conn),
            decoder: BodyDecoder::new(head.framing, LIMITS),
            keep_alive: head.keep_alive,
            home,
        };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    /// The body has ended: the connection goes home, or is closed.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.uploaded()
            && conn.read.is_empty()
            && !conn.eof
        {
            self.home.put_back(conn);
        }
    }
}

impl<H: Home + Unpin> http_body::Body for ResponseBody<H> {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
        if let Err(e) = conn.keep_uploading(cx) {
            this.conn = None;
            return Poll::Ready(Some(Err(e.into())));
        }
        loop {
            match this.decoder.decode(&mut conn.read, conn.eof) {
                Ok(Decoded::Data(data)) => {
                    // Its last bytes: the connection goes home now, since a reader that knows
                    // the length (hyper's server) stops polling once it has them.
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Trailers(trailers)) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {
                    if let Err(e) = ready!(conn.poll_read_more(cx)) {
                        this.conn = None;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                }
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

/// A response built from `head` with `body`.
pub fn response<B>(head: ResponseHead, body: B) -> Response<B> {
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    *response.headers_mut() = head.headers;
    response
}

#[cfg(test)]
mod tests;
