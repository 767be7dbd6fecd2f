//! Serving HTTP/1.1 and HTTP/2 (h2c) on an accepted connection, with the proxy's limits, and
//! taking part in graceful drain.

use std::convert::Infallible;
use std::future::Future;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::body::Body;
use crate::settings::Limits;

/// A configured HTTP server (HTTP/1.1 with keep-alive and upgrades, HTTP/2 prior knowledge).
#[derive(Clone)]
pub struct HttpServer {
    builder: auto::Builder<TokioExecutor>,
}

impl HttpServer {
    pub fn new(limits: &Limits) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(1024)
            .max_header_list_size(limits.max_header_bytes as u32)
            .initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024)
            .max_send_buf_size(256 * 1024)
            .keep_alive_interval(std::time::Duration::from_secs(30));
        HttpServer { builder }
    }

    /// Serves requests on `io` with `handler` until the connection ends, or finishes in-flight
    /// requests and closes once `drain` turns true.
    pub async fn serve<I, F, Fut>(&self, io: I, mut drain: watch::Receiver<bool>, handler: F)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let service = service_fn(move |req| {
            let fut = handler(req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = self.builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = crate::proxy::drained(&mut drain) => {
                // HTTP/1: finish the current request, then close; HTTP/2: GOAWAY.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "HTTP connection ended with an error");
        }
    }
}
