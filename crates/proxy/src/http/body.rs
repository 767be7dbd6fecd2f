//! The body type used throughout the proxy, and a metering wrapper.
//!
//! Bodies are always streamed frame by frame (never collected), so trailers (gRPC) pass
//! through and memory stays bounded whatever the size of the body.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

use crate::BoxError;

/// A boxed, streaming body.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A client's request body: read by hyper (HTTP/1 upgrades and `CONNECT`) or by the proxy's
/// own servers ([`super::h1_server`], [`super::h2_server`]).
pub enum ReceivedBody {
    Hyper(hyper::body::Incoming),
    Http1(super::h1_server::Http1Body),
    Http2(H2StreamBody),
}

/// A body read from an HTTP/2 stream (a request's at the proxy's server, a response's at its
/// client): each data frame's bytes are given back to flow control as they are handed on,
/// trailers follow. Its size is exact when the message declared a `content-length` (what is
/// left of it) or ended with its head.
pub struct H2StreamBody {
    recv: h2::RecvStream,
    data_done: bool,
    /// What is left of the declared length.
    remaining: Option<u64>,
}

impl H2StreamBody {
    pub fn new(recv: h2::RecvStream, declared_length: Option<u64>) -> Self {
        let remaining = if recv.is_end_stream() { Some(0) } else { declared_length };
        H2StreamBody { recv, data_done: false, remaining }
    }

    /// The stream itself: a `CONNECT` tunnel reads it as bytes ([`super::tunnel`]).
    pub fn into_recv(self) -> h2::RecvStream {
        self.recv
    }

    /// Whether the data has ended (trailers, if any, may follow).
    pub fn data_done(&self) -> bool {
        self.data_done
    }
}

impl http_body::Body for H2StreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = &mut this.remaining {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // RST_STREAM(NO_ERROR): the peer needs no more of this message's reading (RFC
                // 9113 §8.1: it answered without reading the whole request); the body ends
                // without failing.
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    this.data_done = true;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(t) => Poll::Ready(t.map(|t| Ok(Frame::trailers(t)))),
            Err(e) if e.reason() == Some(h2::Reason::NO_ERROR) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl http_body::Body for ReceivedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReceivedBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ReceivedBody::Http1(b) => Pin::new(b).poll_frame(cx),
            ReceivedBody::Http2(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReceivedBody::Hyper(b) => b.is_end_stream(),
            ReceivedBody::Http1(b) => b.is_end_stream(),
            ReceivedBody::Http2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReceivedBody::Hyper(b) => b.size_hint(),
            ReceivedBody::Http1(b) => b.size_hint(),
            ReceivedBody::Http2(b) => b.size_hint(),
        }
    }
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// A body of fixed bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed_unsync()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(b: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

/// `b`, keeping `guard` alive until the body is dropped (e.g. a connection-limit slot held
/// until the response has been streamed). Not boxed: the caller boxes the body once, with
/// whatever else wraps it.
pub fn holding<B, T: Send + Unpin + 'static>(b: B, guard: T) -> Holding<B, T> {
    Holding { inner: b, _guard: guard }
}

pin_project_lite::pin_project! {
    /// A body and a guard that lives as long as it does ([`holding`]).
    pub struct Holding<B, T> {
        #[pin]
        inner: B,
        _guard: T,
    }
}

impl<B: http_body::Body, T> http_body::Body for Holding<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a metered body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// All frames (and trailers, if any) were delivered.
    Complete,
    /// The body failed with an error.
    Error,
    /// The body was dropped before its end (the reader went away).
    Dropped,
}

pin_project_lite::pin_project! {
    /// Counts the bytes of a body and reports once when it ends.
    ///
    /// `on_end` is called once, when the body ends: bytes seen, how it ended, and its
    /// trailers' `grpc-status` if it had one. It is stored inline (a type parameter, not a
    /// box), and so is the body it meters (an upstream's response body as hyper gives it):
    /// the metered body is boxed once, as the response's [`Body`].
    pub struct Metered<B: http_body::Body, F: FnOnce(u64, BodyEnd, Option<u16>)> {
        #[pin]
        inner: B,
        bytes: u64,
        on_end: Option<F>,
    }

    impl<B: http_body::Body, F: FnOnce(u64, BodyEnd, Option<u16>)> PinnedDrop for Metered<B, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // hyper stops polling once a body with a known length has delivered every byte.
            let end = if this.inner.is_end_stream() { BodyEnd::Complete } else { BodyEnd::Dropped };
            if let Some(f) = this.on_end.take() {
                f(*this.bytes, end, None);
            }
        }
    }
}

impl<B: http_body::Body, F: FnOnce(u64, BodyEnd, Option<u16>)> Metered<B, F> {
    pub fn new(inner: B, on_end: F) -> Self {
        let mut m = Metered { inner, bytes: 0, on_end: Some(on_end) };
        if m.inner.is_end_stream()
            && let Some(f) = m.on_end.take()
        {
            f(0, BodyEnd::Complete, None);
        }
        m
    }
}

impl<B, F> http_body::Body for Metered<B, F>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    F: FnOnce(u64, BodyEnd, Option<u16>),
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.len() as u64;
                }
                if let Some(trailers) = frame.trailers_ref() {
                    let grpc = trailers.get(super::headers::GRPC_STATUS).and_then(|v| v.to_str().ok()?.parse().ok());
                    if let Some(f) = this.on_end.take() {
                        f(*this.bytes, BodyEnd::Complete, grpc);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = this.on_end.take() {
                    f(*this.bytes, BodyEnd::Error, None);
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.on_end.take() {
                    f(*this.bytes, BodyEnd::Complete, None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What became of a client's request body: shared by the body ([`ClientBody`]) and the
/// request's observation, which answers for the client's fault instead of the upstream's.
#[derive(Debug, Default)]
pub struct ClientBodyState {
    /// Bytes read so far.
    pub bytes: AtomicU64,
    /// 0 (none), [`MALFORMED`] or [`STALLED`].
    failure: AtomicU8,
    /// Set once the response has started: a stall is then the application's business (a
    /// gRPC stream waiting on its client), no longer an upload to time out.
    responded: AtomicBool,
}

const MALFORMED: u8 = 1;
const STALLED: u8 = 2;

impl ClientBodyState {
    /// The proxy's own error for a body the client broke: malformed (bad chunked encoding, a
    /// length it did not keep, a reset) → 400; stalled → 408.
    pub fn failure(&self) -> Option<crate::error::ProxyError> {
        match self.failure.load(Ordering::Relaxed) {
            MALFORMED => Some(crate::error::ProxyError::BadRequest("malformed request body".into())),
            STALLED => Some(crate::error::ProxyError::RequestBodyTimeout),
            _ => None,
        }
    }

    pub fn responded(&self) {
        self.responded.store(true, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A client's request body as the proxy reads it: bytes counted, a read error recorded as
    /// the client's fault (its text never reaches anyone), its trailers stripped of the fields no
    /// trailer may carry ([`super::headers::may_trail`]), and no frame for `timeout` before
    /// the response starts ends it (a stalled upload). The timer exists only once a read has
    /// had to wait.
    pub struct ClientBody<B> {
        #[pin]
        inner: B,
        state: Arc<ClientBodyState>,
        timeout: Duration,
        stall: Option<Pin<Box<tokio::time::Sleep>>>,
        progressed: bool,
    }
}

impl<B> ClientBody<B> {
    pub fn new(inner: B, state: Arc<ClientBodyState>, timeout: Duration) -> Self {
        ClientBody { inner, state, timeout, stall: None, progressed: false }
    }
}

impl<B> http_body::Body for ClientBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.state.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                *this.progressed = true;
                // The client's trailers reach the next hop only with the fields a trailer may
                // carry, on every path and protocol (HTTP/2 and the mesh hop included).
                let frame = match frame.into_trailers() {
                    Ok(mut trailers) => {
                        super::headers::strip_trailers(&mut trailers);
                        Frame::trailers(trailers)
                    }
                    Err(frame) => frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.failure.store(MALFORMED, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.state.responded.load(Ordering::Relaxed) {
                    *this.stall = None;
                    return Poll::Pending;
                }
                let deadline = tokio::time::Instant::now() + *this.timeout;
                let stall = this.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if std::mem::take(this.progressed) {
                    stall.as_mut().reset(deadline);
                }
                if stall.as_mut().poll(cx).is_ready() {
                    this.state.failure.store(STALLED, Ordering::Relaxed);
                    return Poll::Ready(Some(Err("request body timeout".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A body of the given frames (data and trailers), of no announced size.
    pub(crate) struct Frames(pub(crate) std::collections::VecDeque<Frame<Bytes>>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    /// Every client body the proxy forwards (HTTP/1, HTTP/2, the mesh hop) is read through
    /// `ClientBody`: a forged identity in its trailers is dropped there, its data and the other
    /// trailers go on.
    #[tokio::test]
    async fn a_client_body_forwards_its_data_and_only_the_trailers_allowed() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert(super::super::headers::FORWARDED_CLIENT_CERT, http::HeaderValue::from_static("By=forged"));
        trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
        let frames = Frames(vec![Frame::data(Bytes::from_static(b"hello")), Frame::trailers(trailers)].into());
        let body = ClientBody::new(frames, Arc::default(), Duration::from_secs(5));
        let collected = body.collect().await.expect("body");
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"hello"));
        assert_eq!(trailers.len(), 1, "{trailers:?}");
        assert_eq!(trailers["x-checksum"], "abc");
    }
}
