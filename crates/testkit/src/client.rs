//! Small HTTP client helpers on plain hyper connections (one connection per call, no
//! connection pool, no proxy environment variables), plus a deterministic body generator and
//! verifier for large streaming transfers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// Which HTTP version to speak to the server (`Http2` is h2c with prior knowledge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 over cleartext, prior knowledge.
    Http2,
}

/// A fully read response.
#[derive(Debug)]
pub struct Collected {
    /// The status code.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The trailers, if any.
    pub trailers: Option<HeaderMap>,
}

impl Collected {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("response body is not JSON: {:?}", self.text()))
    }

    /// A header value as a string (`None` when absent or not UTF-8).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Opens a TCP connection to `addr` (with `TCP_NODELAY`).
pub async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true).context("set TCP_NODELAY")?;
    Ok(stream)
}

/// Sends `req` on a new connection to `addr` and returns the response head; the body is
/// streamed (the connection lives as long as the body is being read).
pub async fn request<B>(addr: SocketAddr, version: Version, req: Request<B>) -> Result<Response<Incoming>>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = TokioIo::new(connect(addr).await?);
    match version {
        Version::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.context("HTTP/1 handshake")?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            sender.send_request(req).await.context("HTTP/1 request")
        }
        Version::Http2 => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.context("HTTP/2 handshake")?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            sender.send_request(req).await.context("HTTP/2 request")
        }
    }
}

/// Reads a whole response (body and trailers).
pub async fn collect(resp: Response<Incoming>) -> Result<Collected> {
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.context("read response body")?;
    let trailers = collected.trailers().cloned();
    Ok(Collected { status: parts.status, headers: parts.headers, body: collected.to_bytes(), trailers })
}

/// `GET path` on a new HTTP/1.1 connection to `addr` with the given `Host` (and extra
/// headers), fully read, within `timeout`.
pub async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Collected> {
    let mut builder = Request::get(path).header(http::header::HOST, host);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder.body(Empty::<Bytes>::new()).context("build request")?;
    send_collect(addr, Version::Http1, req, timeout).await
}

/// `GET path` on `addr` with `Host: addr` (HTTP/1.1, 15 s): a local API.
pub async fn get_api(addr: SocketAddr, path: &str) -> Result<Collected> {
    get(addr, &addr.to_string(), path, &[], Duration::from_secs(15))
        .await
        .with_context(|| format!("GET http://{addr}{path}"))
}

/// [`get_api`] that must answer 200 with JSON.
pub async fn get_api_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let r = get_api(addr, path).await?;
    anyhow::ensure!(r.status == 200, "GET {path}: {} {}", r.status, r.text());
    r.json()
}

/// Sends `req` on a new connection and reads the whole response within `timeout`.
pub async fn send_collect<B>(
    addr: SocketAddr,
    version: Version,
    req: Request<B>,
    timeout: Duration,
) -> Result<Collected>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let what = format!("{} {} to {addr}", req.method(), req.uri());
    tokio::time::timeout(timeout, async {
        let resp = request(addr, version, req).await?;
        collect(resp).await
    })
    .await
    .with_context(|| format!("{what}: no complete response within {timeout:?}"))?
    .with_context(|| what.clone())
}

/// `POST path` with a fixed body on a new connection, fully read, within `timeout`.
pub async fn post(
    addr: SocketAddr,
    version: Version,
    host: &str,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<Collected> {
    let uri = match version {
        Version::Http1 => path.to_string(),
        Version::Http2 => format!("http://{host}{path}"),
    };
    let mut builder = Request::post(uri);
    if version == Version::Http1 {
        builder = builder.header(http::header::HOST, host);
    }
    let req = builder.body(Full::new(body)).context("build request")?;
    send_collect(addr, version, req, timeout).await
}

/// Word `index` (bytes `8*index..8*index+8`) of the deterministic test pattern.
fn pattern_word(index: u64) -> [u8; 8] {
    // splitmix64
    let mut z = index.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Fills `buf` with the deterministic pattern starting at stream offset `offset`.
pub fn fill_pattern(offset: u64, buf: &mut [u8]) {
    let mut pos = 0usize;
    while pos < buf.len() {
        let abs = offset + pos as u64;
        let word = pattern_word(abs / 8);
        let start = (abs % 8) as usize;
        let n = (8 - start).min(buf.len() - pos);
        buf[pos..pos + n].copy_from_slice(&word[start..start + n]);
        pos += n;
    }
}

/// `len` bytes of the deterministic pattern starting at `offset`.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    fill_pattern(offset, &mut v);
    v
}

/// A request body of `total` bytes of the deterministic pattern, generated in 64 KiB chunks
/// as the connection asks for them (never buffered whole). With `known_length` its size hint
/// is exact (HTTP/1 `Content-Length`), otherwise unknown (HTTP/1 chunked encoding).
#[derive(Debug)]
pub struct PatternBody {
    offset: u64,
    total: u64,
    known_length: bool,
    progress: Option<Arc<AtomicU64>>,
}

impl PatternBody {
    /// A body of `total` pattern bytes.
    pub fn new(total: u64, known_length: bool) -> PatternBody {
        PatternBody { offset: 0, total, known_length, progress: None }
    }

    /// Also count the bytes handed to the connection in `progress`.
    pub fn with_progress(mut self, progress: Arc<AtomicU64>) -> PatternBody {
        self.progress = Some(progress);
        self
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let left = self.total - self.offset;
        if left == 0 {
            return Poll::Ready(None);
        }
        let n = left.min(64 * 1024) as usize;
        let chunk = pattern(self.offset, n);
        self.offset += n as u64;
        if let Some(p) = &self.progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset == self.total
    }

    fn size_hint(&self) -> SizeHint {
        if self.known_length { SizeHint::with_exact(self.total - self.offset) } else { SizeHint::default() }
    }
}

/// Checks a byte stream against the deterministic pattern, chunk by chunk.
#[derive(Debug, Default)]
pub struct PatternVerifier {
    offset: u64,
    scratch: Vec<u8>,
}

impl PatternVerifier {
    /// A verifier expecting the pattern from offset 0.
    pub fn new() -> PatternVerifier {
        PatternVerifier::default()
    }

    /// Checks the next `data`; fails at the first differing byte.
    pub fn update(&mut self, data: &[u8]) -> Result<()> {
        self.scratch.resize(data.len(), 0);
        fill_pattern(self.offset, &mut self.scratch);
        if let Some(i) = data.iter().zip(&self.scratch).position(|(a, b)| a != b) {
            bail!(
                "byte {} differs from what was sent (got {:#04x}, expected {:#04x})",
                self.offset + i as u64,
                data[i],
                self.scratch[i]
            );
        }
        self.offset += data.len() as u64;
        Ok(())
    }

    /// Bytes verified so far.
    pub fn verified(&self) -> u64 {
        self.offset
    }
}

/// Reads `body` to the end, verifying it against the pattern; returns the byte count.
/// `progress`, if given, counts the bytes verified so far.
pub async fn verify_pattern_body(mut body: Incoming, progress: Option<Arc<AtomicU64>>) -> Result<u64> {
    let mut verifier = PatternVerifier::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.with_context(|| format!("response body failed after {} bytes", verifier.verified()))?;
        if let Some(data) = frame.data_ref() {
            verifier.update(data)?;
            if let Some(p) = &progress {
                p.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
    }
    Ok(verifier.verified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_offset_consistent() {
        let whole = pattern(0, 1000);
        assert_eq!(pattern(13, 100), whole[13..113].to_vec());
        let mut v = PatternVerifier::new();
        v.update(&whole[..7]).expect("first part");
        v.update(&whole[7..]).expect("second part");
        assert_eq!(v.verified(), 1000);
        let mut bad = whole.clone();
        bad[500] ^= 1;
        let err = PatternVerifier::new().update(&bad).expect_err("mismatch");
        assert!(err.to_string().contains("byte 500"), "{err}");
    }
}
