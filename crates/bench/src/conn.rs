//! Opening connections to the target: TCP, then an HTTP/1.1 or HTTP/2 client connection whose
//! driver runs as a task on the current (per-thread) runtime.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::error::ErrorKind;

/// The request body type of every connection.
pub(crate) type ReqBody = Full<Bytes>;

/// Connects within `timeout`, with Nagle off (requests are small and latency-sensitive).
pub(crate) async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ErrorKind> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(_)) => Err(ErrorKind::Connect),
        Err(_) => Err(ErrorKind::Timeout),
    }
}

/// A new HTTP/1.1 connection.
pub(crate) async fn h1(addr: SocketAddr, timeout: Duration) -> Result<http1::SendRequest<ReqBody>, ErrorKind> {
    let stream = tcp(addr, timeout).await?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|_| ErrorKind::Connect)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A new HTTP/2 connection (prior knowledge), allowing `streams` requests in flight.
pub(crate) async fn h2(
    addr: SocketAddr,
    timeout: Duration,
    streams: usize,
) -> Result<http2::SendRequest<ReqBody>, ErrorKind> {
    let stream = tcp(addr, timeout).await?;
    let handshake = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Large windows so flow control never throttles a benchmark with big bodies.
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_concurrent_reset_streams(streams.max(16))
        .handshake(TokioIo::new(stream));
    let (sender, conn) = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(_)) => return Err(ErrorKind::Connect),
        Err(_) => return Err(ErrorKind::Timeout),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
