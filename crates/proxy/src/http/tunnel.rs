//! The client's end of a `CONNECT` tunnel, whichever protocol asked for it: over HTTP/1.1 the
//! connection itself, handed over by hyper once the `200` is written; over HTTP/2 the request's
//! stream (RFC 9113 §8.5), its DATA frames carrying the tunnel's bytes both ways, handed over
//! by the proxy's server ([`super::h2_server`]) once it has sent the `200`'s head.
//!
//! The handler takes the client's end with [`accept`] before it answers, and puts the
//! [`HandOver`] it gets (HTTP/2 only) in its `200`'s extensions: that is what tells the server
//! to leave the stream open after the head and give its sending half to the tunnel.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::{Buf as _, Bytes};
use http::{Request, Response, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use super::body::ReceivedBody;
use crate::BoxError;
use crate::error::ProxyError;

/// The client's end of a tunnel, before the `200` has been sent.
pub enum Accepted {
    Http1(hyper::upgrade::OnUpgrade),
    Http2 { recv: h2::RecvStream, send: oneshot::Receiver<h2::SendStream<Bytes>> },
}

/// Put in the extensions of an HTTP/2 `CONNECT`'s `2xx` response: the server sends the head
/// without ending the stream and passes the stream's sending half on through it. (Extensions
/// are cloneable: the sender is taken out of its slot once.)
#[derive(Clone)]
pub struct HandOver(Arc<Mutex<Option<oneshot::Sender<h2::SendStream<Bytes>>>>>);

impl HandOver {
    /// Gives the tunnel the stream's sending half; false if it is gone (the handler's task
    /// ended before the head was sent).
    pub(super) fn give(&self, send: h2::SendStream<Bytes>) -> bool {
        let sender = self.0.lock().ok().and_then(|mut s| s.take());
        sender.is_some_and(|s| s.send(send).is_ok())
    }
}

/// Takes the client's end of the tunnel `req` asks for, and what its `2xx` must carry
/// ([`opening`]).
pub fn accept(mut req: Request<ReceivedBody>) -> Result<(Accepted, Option<HandOver>), ProxyError> {
    if req.version() != Version::HTTP_2 {
        return Ok((Accepted::Http1(hyper::upgrade::on(&mut req)), None));
    }
    match req.into_body() {
        ReceivedBody::Http2(body) => {
            let (tx, rx) = oneshot::channel();
            let hand_over = HandOver(Arc::new(Mutex::new(Some(tx))));
            Ok((Accepted::Http2 { recv: body.into_recv(), send: rx }, Some(hand_over)))
        }
        _ => Err(ProxyError::BadRequest("CONNECT over HTTP/2 is served by the proxy's own HTTP/2 server only".into())),
    }
}

impl Accepted {
    /// The tunnel's client end, once the `200` has gone out; an error if it never did (the
    /// client went away, or the response was not a success).
    pub async fn established(self) -> Result<ClientEnd, BoxError> {
        match self {
            Accepted::Http1(on) => Ok(ClientEnd::Http1(TokioIo::new(on.await?))),
            Accepted::Http2 { recv, send } => {
                let send = send.await.map_err(|_| "the CONNECT stream was not handed over")?;
                Ok(ClientEnd::Http2(H2Stream { recv, send, unread: Bytes::new(), shut_down: false }))
            }
        }
    }
}

/// The client's end of an established tunnel.
pub enum ClientEnd {
    Http1(TokioIo<hyper::upgrade::Upgraded>),
    Http2(H2Stream),
}

/// An HTTP/2 stream as a byte stream: what is read is its DATA frames' payload (the peer's
/// `END_STREAM` is the end of input), what is written goes out as DATA within the stream's
/// flow-control window, and a shutdown sends `END_STREAM`.
pub struct H2Stream {
    recv: h2::RecvStream,
    send: h2::SendStream<Bytes>,
    /// What is left of the last frame read, when the reader's buffer was smaller.
    unread: Bytes,
    shut_down: bool,
}

/// A stream error as an I/O error: the peer's reset is the connection's (`ConnectionReset`).
fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.unread = data;
                }
                // RST_STREAM(NO_ERROR): the peer needs nothing more; the input has ended.
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        send.reserve_capacity(buf.len());
        loop {
            match ready!(send.poll_capacity(cx)) {
                // Capacity given and taken back before this poll: wait for more (the poll
                // that follows registers the wake-up).
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(io_error)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                // The stream can take no more: reset by the peer, or closed.
                None => {
                    let reason = match send.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => format!("HTTP/2 stream reset: {reason}"),
                        _ => "HTTP/2 stream closed".to_string(),
                    };
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, reason)));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection writes what is sent; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut_down {
            self.shut_down = true;
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ClientEnd {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientEnd::Http1(io) => Pin::new(io).poll_read(cx, buf),
            ClientEnd::Http2(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientEnd {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientEnd::Http1(io) => Pin::new(io).poll_write(cx, buf),
            ClientEnd::Http2(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientEnd::Http1(io) => Pin::new(io).poll_flush(cx),
            ClientEnd::Http2(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientEnd::Http1(io) => Pin::new(io).poll_shutdown(cx),
            ClientEnd::Http2(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Marks the `2xx` answer to an HTTP/2 `CONNECT` as the one that opens its tunnel.
pub fn opening(mut resp: Response<super::body::Body>, hand_over: Option<HandOver>) -> Response<super::body::Body> {
    if let Some(h) = hand_over {
        resp.extensions_mut().insert(h);
    }
    resp
}
