//! The node agent (`plexus agent`): relays the gRPC of the proxies on one machine (discovery
//! watches, certificate requests, telemetry reports) to the control plane over one shared
//! HTTP/2 connection.
//!
//! Why it exists: every HTTP/2 connection costs its server about 29 KiB before a single stream
//! is open (h2's fixed 16 KiB write buffer, 8 KiB read buffer and 4 KiB HPACK table, none of
//! which hyper or tonic let us size). With one connection per proxy that dominates the control
//! plane's memory per proxy; with one connection per machine, what remains per proxy is its
//! stream's own state. The proxies of the machine pay the connection cost to the agent instead,
//! spread over the machines. This is the per-node agent model of Consul's client agents and
//! Istio's ztunnel, reduced to transport: the agent parses no messages, each request of a local
//! proxy becomes one stream on the shared connection with its headers, body and trailers
//! passed through unchanged, so tokens and registrations are checked by the control plane as
//! before and the control plane sees every proxy as its own stream (connect, heartbeat,
//! disconnect).
//!
//! Proxies use it by pointing `--control-plane` (`PLEXUS_CONTROL_PLANE`) at the agent. When the
//! control plane is unreachable the agent answers `UNAVAILABLE`, and the proxies keep their last
//! view and reconnect with backoff as they do without an agent; when a proxy's connection
//! closes, its stream on the shared connection is reset, which the control plane sees as that
//! proxy disconnecting.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tonic::codegen::Service as _;
use tonic::transport::{Channel, Endpoint};

/// How often the idle connection to the control plane is pinged, and how long a ping may go
/// unanswered before the connection counts as dead.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Proxy connections served at once; more are closed at once (a machine runs far fewer
/// proxies, so this only bounds a runaway client).
pub const MAX_CONNECTIONS: usize = 10_000;

/// The relay: local proxies' requests become streams on one connection to the control plane.
#[derive(Clone)]
pub struct NodeAgent {
    upstream: Channel,
}

impl NodeAgent {
    /// An agent relaying to the control plane's gRPC address (e.g. `http://10.0.0.5:7700`).
    /// Connects lazily, and again after a failure, on the next request.
    pub fn new(control_plane: &str) -> anyhow::Result<NodeAgent> {
        let upstream = Endpoint::from_shared(control_plane.to_string())
            .map_err(|e| anyhow::anyhow!("control-plane address {control_plane:?}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(NodeAgent { upstream })
    }

    /// Serves local proxies (HTTP/2 with prior knowledge, as gRPC clients speak) until
    /// `shutdown` completes; open streams end then and their proxies reconnect.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "accepting a proxy connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "{MAX_CONNECTIONS} proxy connections open: closing a new one");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let agent = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |request| agent.clone().relay(request));
                // No keep-alive pings towards the proxies: they are on this machine, so a
                // proxy that dies has its socket closed by the kernel, and they ping the agent
                // themselves. (Per-connection ping timers cost CPU at every wake-up.)
                let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "proxy connection ended");
                }
            });
        }
    }

    /// Sends one request of a local proxy to the control plane as a stream of the shared
    /// connection (the channel sets the control plane's scheme and authority) and streams the
    /// answer back.
    async fn relay(self, request: hyper::Request<Incoming>) -> Result<hyper::Response<tonic::body::Body>, Infallible> {
        let uri = request.uri().clone();
        let mut upstream = self.upstream;
        let relayed = match std::future::poll_fn(|cx| upstream.poll_ready(cx)).await {
            Ok(()) => upstream.call(request.map(tonic::body::Body::new)).await,
            Err(e) => Err(e),
        };
        Ok(relayed.unwrap_or_else(|e| {
            tracing::debug!(path = uri.path(), error = %e, "control plane unreachable");
            tonic::Status::unavailable(format!("the node agent cannot reach the control plane: {e}")).into_http()
        }))
    }
}
