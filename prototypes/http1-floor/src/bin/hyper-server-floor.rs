//! `hyper-server-floor LISTEN_PORT UPSTREAM_PORT`: hyper's HTTP/1 server connection, and the
//! upstream side done in the request's own future — the head written from the request's
//! parts into a buffer the connection keeps, the response head parsed there by httparse into
//! an `http::Response` with its `HeaderMap` (what the proxy needs to route, filter and
//! observe). No second task, no channel. Its bodies: a request's streamed up, a response's
//! `Content-Length` body read whole (a measuring stick: no chunked responses, no upgrades).

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http1_floor::Error;
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn main() -> Result<(), Error> {
    http1_floor::run(serve)
}

/// The upstream connection and the buffers it keeps between requests.
struct Upstream {
    stream: TcpStream,
    head: Vec<u8>,
    read: Vec<u8>,
}

async fn serve(client: TcpStream, upstream: u16) -> Result<(), Error> {
    client.set_nodelay(true)?;
    let stream = http1_floor::connect(upstream).await?;
    let upstream = Upstream { stream, head: Vec::with_capacity(1024), read: Vec::with_capacity(4096) };
    // HTTP/1: one request at a time per connection; taken for a request, given back after it.
    let slot = Rc::new(RefCell::new(Some(upstream)));
    let service = service_fn(move |request: Request<Incoming>| {
        let slot = slot.clone();
        async move {
            let mut upstream = slot.borrow_mut().take().ok_or("a request while another is in flight")?;
            let response = upstream.exchange(request).await?;
            *slot.borrow_mut() = Some(upstream);
            Ok::<_, Error>(response)
        }
    });
    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(client), service).await?;
    Ok(())
}

impl Upstream {
    async fn exchange(&mut self, request: Request<Incoming>) -> Result<Response<Whole>, Error> {
        let (parts, mut body) = request.into_parts();
        self.head.clear();
        self.head.extend_from_slice(parts.method.as_str().as_bytes());
        self.head.push(b' ');
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        self.head.extend_from_slice(target.as_bytes());
        self.head.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            self.head.extend_from_slice(name.as_str().as_bytes());
            self.head.extend_from_slice(b": ");
            self.head.extend_from_slice(value.as_bytes());
            self.head.extend_from_slice(b"\r\n");
        }
        self.head.extend_from_slice(b"\r\n");
        self.stream.write_all(&self.head).await?;
        while !body.is_end_stream() {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.stream.write_all(&data).await?;
                    }
                }
                None => break,
            }
        }
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut head = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = head.parse(&self.read)? {
                let status = StatusCode::from_u16(head.code.ok_or("no status")?)?;
                let length = if matches!(status.as_u16(), 100..=199 | 204 | 304) {
                    0
                } else {
                    http1_floor::body_length(head.headers)?
                };
                let mut response = Response::new(Whole(None));
                *response.status_mut() = status;
                let map = response.headers_mut();
                map.reserve(head.headers.len());
                for h in head.headers.iter() {
                    map.append(HeaderName::from_bytes(h.name.as_bytes())?, HeaderValue::from_bytes(h.value)?);
                }
                while self.read.len() < n + length {
                    self.read.reserve(4096);
                    if self.stream.read_buf(&mut self.read).await? == 0 {
                        return Err("the upstream closed within a body".into());
                    }
                }
                *response.body_mut() = Whole(Some(Bytes::copy_from_slice(&self.read[n..n + length])));
                self.read.drain(..n + length);
                return Ok(response);
            }
            if self.read.len() >= 64 * 1024 {
                return Err("response head too large".into());
            }
            self.read.reserve(4096);
            if self.stream.read_buf(&mut self.read).await? == 0 {
                return Err("the upstream closed its connection".into());
            }
        }
    }
}

/// A response body held whole.
struct Whole(Option<Bytes>);

impl Body for Whole {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}
