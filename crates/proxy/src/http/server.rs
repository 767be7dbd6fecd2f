//! Serving HTTP/1.1 and HTTP/2 (h2c) on an accepted connection, with the proxy's limits, and
//! taking part in graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY).
    idle_timeout: Duration,
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
        HttpServer { builder, idle_timeout: limits.idle_timeout }
    }

    /// Serves requests on `io` with `handler` until the connection ends, or finishes in-flight
    /// requests and closes once `drain` turns true, or closes once no request has been in
    /// flight for the idle timeout. HTTP/1 keep-alive connections already close sooner, when
    /// no request head arrives within the header read timeout; the idle timeout is what
    /// closes an idle HTTP/2 connection (GOAWAY: a stream still sending its response body
    /// finishes first).
    pub async fn serve<I, F, Fut>(&self, io: I, mut drain: watch::Receiver<bool>, handler: F)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let activity = Arc::new(Activity::default());
        let started = Instant::now();
        let counted = activity.clone();
        let service = service_fn(move |req| {
            let fut = handler(req);
            let activity = counted.clone();
            activity.in_flight.fetch_add(1, Ordering::Relaxed);
            async move {
                let resp = fut.await;
                activity.last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                activity.in_flight.fetch_sub(1, Ordering::Relaxed);
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = self.builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let idle = self.idle_timeout;
        let mut check = started + idle;
        let result = loop {
            tokio::select! {
                r = conn.as_mut() => break r,
                _ = crate::proxy::drained(&mut drain) => {
                    // HTTP/1: finish the current request, then close; HTTP/2: GOAWAY.
                    conn.as_mut().graceful_shutdown();
                    break conn.await;
                }
                _ = tokio::time::sleep_until(check.into()), if !idle.is_zero() => {
                    let last = started + Duration::from_millis(activity.last.load(Ordering::Relaxed));
                    if activity.in_flight.load(Ordering::Relaxed) == 0 && last + idle <= Instant::now() {
                        tracing::debug!("closing an idle HTTP connection");
                        conn.as_mut().graceful_shutdown();
                        break conn.await;
                    }
                    check = last.max(Instant::now()) + idle;
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "HTTP connection ended with an error");
        }
    }
}

/// Requests in flight on a connection, and when the last one was answered (milliseconds
/// since the connection started).
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    last: AtomicU64,
}
