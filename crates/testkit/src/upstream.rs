//! Upstream applications for tests, each on its own ephemeral 127.0.0.1 port, served on the
//! current tokio runtime and stopped (with all their connections) on drop.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::LOCALHOST;

/// The line [`TcpEcho`] sends after the client's EOF, right before closing.
pub const TCP_ECHO_FINAL_LINE: &[u8] = b"plexus-test: eof\n";

/// Sent first on a connection to [`TcpEcho`], makes it half-close its side first: it answers
/// [`TCP_ECHO_SERVER_BYE`], shuts down its write side and then only reads until the client's
/// EOF, counting bytes in [`TcpEcho::received_after_close`].
pub const TCP_ECHO_SERVER_CLOSES_FIRST: &[u8] = b"SERVER-CLOSES-FIRST\n";

/// [`TcpEcho`]'s answer to [`TCP_ECHO_SERVER_CLOSES_FIRST`], right before its half-close.
pub const TCP_ECHO_SERVER_BYE: &[u8] = b"plexus-test: server closes first\n";

/// The greeting [`ServerFirst`] sends as soon as it accepts a connection.
pub const SERVER_FIRST_GREETING: &[u8] = b"220 plexus-test ready\r\n";

/// Accept loop shared by the servers: every connection runs `handle(stream, conn_number)` in
/// a task owned by the loop; aborting the loop aborts them all.
fn spawn_accept_loop<F, Fut>(listener: TcpListener, connections: Arc<AtomicU64>, handle: F) -> JoinHandle<()>
where
    F: Fn(TcpStream, u64) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _peer)) = accepted else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let n = connections.fetch_add(1, Ordering::SeqCst) + 1;
                    conns.spawn(handle(stream, n));
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}

async fn bind() -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.context("bind 127.0.0.1:0")?;
    let addr = listener.local_addr().context("local_addr")?;
    Ok((listener, addr))
}

type EchoBody = BoxBody<Bytes, hyper::Error>;

/// An HTTP/1.1 + h2c (prior knowledge) echo server built on `hyper_util::server::conn::auto`.
///
/// Every response carries `x-served-by: <name>`. By path:
/// * `/echo…` streams the request body back as the response body (request trailers too),
///   with the request's `content-type` (default `application/octet-stream`);
/// * `/status/NNN` answers status NNN with the JSON description below;
/// * anything else reads the request body (without keeping it) and answers 200 with a JSON
///   description of the request: `{"served_by", "method", "path" (with query), "authority"
///   (the URI authority, else the `Host` header), "version"
///   ("HTTP/1.1" / "HTTP/2.0"), "headers": {lowercase name: value, repeated values joined
///   with ", "}, "body_len", "connection" (1-based number of the connection on this server)}`.
///
/// Responses wait for the current [`HttpEcho::delay`] first.
#[derive(Debug)]
pub struct HttpEcho {
    addr: SocketAddr,
    name: String,
    delay_ms: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl HttpEcho {
    /// Starts the server on an ephemeral 127.0.0.1 port.
    pub async fn start(name: &str) -> Result<HttpEcho> {
        let (listener, addr) = bind().await?;
        let delay_ms = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let shared =
            Arc::new(EchoShared { name: name.to_string(), delay_ms: delay_ms.clone(), requests: requests.clone() });
        let task = spawn_accept_loop(listener, connections.clone(), move |stream, conn| {
            let shared = shared.clone();
            async move {
                let service = service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(shared.handle(req, conn).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            }
        });
        Ok(HttpEcho { addr, name: name.to_string(), delay_ms, requests, connections, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The name it puts in `x-served-by`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests received so far (counted when the head arrives).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// The response delay in milliseconds; store into it to change the delay at run time.
    pub fn delay(&self) -> Arc<AtomicU64> {
        self.delay_ms.clone()
    }

    /// Sets the response delay.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for HttpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct EchoShared {
    name: String,
    delay_ms: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

impl EchoShared {
    async fn handle(&self, req: Request<Incoming>, conn: u64) -> Response<EchoBody> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".to_string());
        if path.starts_with("/echo") {
            let content_type = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .cloned()
                .unwrap_or_else(|| http::HeaderValue::from_static("application/octet-stream"));
            let mut resp = Response::new(req.into_body().boxed());
            resp.headers_mut().insert(http::header::CONTENT_TYPE, content_type);
            self.served_by(&mut resp);
            return resp;
        }
        let status = path
            .strip_prefix("/status/")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse::<u16>().ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK);
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in req.headers() {
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            headers
                .entry(k.as_str().to_string())
                .and_modify(|e| {
                    e.push_str(", ");
                    e.push_str(&v)
                })
                .or_insert(v);
        }
        let authority = req.uri().authority().map(|a| a.as_str().to_string()).or_else(|| headers.get("host").cloned());
        let method = req.method().to_string();
        let version = format!("{:?}", req.version());
        let mut body = req.into_body();
        let mut body_len = 0u64;
        let mut body_error = None;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => body_len += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
                Err(e) => {
                    body_error = Some(e.to_string());
                    break;
                }
            }
        }
        let json = serde_json::json!({
            "served_by": self.name,
            "method": method,
            "path": path,
            "authority": authority,
            "version": version,
            "headers": headers,
            "body_len": body_len,
            "body_error": body_error,
            "connection": conn,
        });
        let mut resp =
            Response::new(Full::new(Bytes::from(json.to_string() + "\n")).map_err(|never| match never {}).boxed());
        *resp.status_mut() = status;
        resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        self.served_by(&mut resp);
        resp
    }

    fn served_by(&self, resp: &mut Response<EchoBody>) {
        if let Ok(v) = http::HeaderValue::from_str(&self.name) {
            resp.headers_mut().insert("x-served-by", v);
        }
    }
}

/// A raw TCP echo server. When the client half-closes (EOF), it sends
/// [`TCP_ECHO_FINAL_LINE`] and then closes. A connection that starts with
/// [`TCP_ECHO_SERVER_CLOSES_FIRST`] tests the other direction: the server half-closes first.
#[derive(Debug)]
pub struct TcpEcho {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    received_after_close: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TcpEcho {
    /// Starts the server on an ephemeral 127.0.0.1 port.
    pub async fn start() -> Result<TcpEcho> {
        let (listener, addr) = bind().await?;
        let connections = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let received_after_close = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let after = received_after_close.clone();
        let task = spawn_accept_loop(listener, connections.clone(), move |stream, _| {
            let counter = counter.clone();
            let after = after.clone();
            async move {
                let _ = tcp_echo(stream, &counter, &after).await;
            }
        });
        Ok(TcpEcho { addr, connections, received, received_after_close, task })
    }

    /// Bytes received, over all connections, after the server half-closed first (see
    /// [`TCP_ECHO_SERVER_CLOSES_FIRST`]).
    pub fn received_after_close(&self) -> u64 {
        self.received_after_close.load(Ordering::SeqCst)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Bytes received so far over all connections.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server-first TCP server (like SMTP or MySQL): it sends [`SERVER_FIRST_GREETING`] as
/// soon as it accepts a connection, then echoes what it receives and closes after the
/// client's EOF.
#[derive(Debug)]
pub struct ServerFirst {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl ServerFirst {
    /// Starts the server on an ephemeral 127.0.0.1 port.
    pub async fn start() -> Result<ServerFirst> {
        let (listener, addr) = bind().await?;
        let connections = Arc::new(AtomicU64::new(0));
        let counter = Arc::new(AtomicU64::new(0));
        let task = spawn_accept_loop(listener, connections.clone(), move |stream, _| {
            let counter = counter.clone();
            async move {
                let _ = echo(stream, &counter, Some(SERVER_FIRST_GREETING), None).await;
            }
        });
        Ok(ServerFirst { addr, connections, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for ServerFirst {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tcp_echo(
    mut stream: TcpStream,
    received: &AtomicU64,
    received_after_close: &AtomicU64,
) -> std::io::Result<()> {
    // Read until the first bytes are known to be, or not to be, the magic command.
    let mut start = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while start.len() < TCP_ECHO_SERVER_CLOSES_FIRST.len() && TCP_ECHO_SERVER_CLOSES_FIRST.starts_with(&start) {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        received.fetch_add(n as u64, Ordering::SeqCst);
        start.extend_from_slice(&buf[..n]);
    }
    if let Some(rest) = start.strip_prefix(TCP_ECHO_SERVER_CLOSES_FIRST) {
        received_after_close.fetch_add(rest.len() as u64, Ordering::SeqCst);
        stream.write_all(TCP_ECHO_SERVER_BYE).await?;
        stream.shutdown().await?;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            received.fetch_add(n as u64, Ordering::SeqCst);
            received_after_close.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
    if start.is_empty() {
        // EOF straight away.
        stream.write_all(TCP_ECHO_FINAL_LINE).await?;
        return stream.shutdown().await;
    }
    stream.write_all(&start).await?;
    echo(stream, received, None, Some(TCP_ECHO_FINAL_LINE)).await
}

async fn echo(
    mut stream: TcpStream,
    received: &AtomicU64,
    greeting: Option<&[u8]>,
    final_line: Option<&[u8]>,
) -> std::io::Result<()> {
    if let Some(g) = greeting {
        stream.write_all(g).await?;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        received.fetch_add(n as u64, Ordering::SeqCst);
        stream.write_all(&buf[..n]).await?;
    }
    if let Some(line) = final_line {
        stream.write_all(line).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_echo_json_and_body() {
        let echo = HttpEcho::start("e1").await.expect("start");
        let t = Duration::from_secs(10);
        let r = client::get(echo.addr(), "svc:80", "/a?b=1", &[("x-test", "1")], t).await.expect("get");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-served-by"), Some("e1"));
        let j = r.json().expect("json");
        assert_eq!(j["path"], "/a?b=1");
        assert_eq!(j["headers"]["x-test"], "1");
        assert_eq!(j["headers"]["host"], "svc:80");
        for v in [client::Version::Http1, client::Version::Http2] {
            let body = Bytes::from_static(b"hello body");
            let r = client::post(echo.addr(), v, "svc:80", "/echo", body.clone(), t).await.expect("post");
            assert_eq!(r.body, body);
            let r = client::get(echo.addr(), "svc", "/status/418", &[], t).await.expect("status");
            assert_eq!(r.status, 418);
        }
        assert_eq!(echo.requests(), 5);
        echo.set_delay(Duration::from_millis(300));
        let start = std::time::Instant::now();
        client::get(echo.addr(), "svc", "/", &[], t).await.expect("delayed");
        assert!(start.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_echo_half_close_and_server_first() {
        let echo = TcpEcho::start().await.expect("start");
        let mut s = TcpStream::connect(echo.addr()).await.expect("connect");
        s.write_all(b"ping\n").await.expect("write");
        s.shutdown().await.expect("shutdown");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        assert_eq!(out, [&b"ping\n"[..], TCP_ECHO_FINAL_LINE].concat());

        let mut s = TcpStream::connect(echo.addr()).await.expect("connect");
        s.write_all(TCP_ECHO_SERVER_CLOSES_FIRST).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        assert_eq!(out, TCP_ECHO_SERVER_BYE);
        s.write_all(&[7u8; 5000]).await.expect("write after server close");
        s.shutdown().await.expect("shutdown");
        drop(s);
        crate::eventually(Duration::from_secs(5), || async {
            anyhow::ensure!(echo.received_after_close() == 5000, "{}", echo.received_after_close());
            Ok(())
        })
        .await
        .expect("bytes after the server's half-close");

        let sf = ServerFirst::start().await.expect("start");
        let mut s = TcpStream::connect(sf.addr()).await.expect("connect");
        let mut g = vec![0u8; SERVER_FIRST_GREETING.len()];
        s.read_exact(&mut g).await.expect("greeting");
        assert_eq!(g, SERVER_FIRST_GREETING);
    }
}
