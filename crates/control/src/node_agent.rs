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
//!
//! Its own state is on an admin address (`--admin`): `/live`, `/ready` and `/metrics`
//! (OpenMetrics): open proxy connections, relayed streams, requests by outcome, refused
//! connections and whether the control plane answered the last relayed request.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
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
    metrics: Arc<AgentMetrics>,
}

/// How a relayed request went: `relayed` (the control plane answered) or `unavailable`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The agent's own metrics (names under `plexus_agent_`).
struct AgentMetrics {
    registry: Registry,
    proxy_connections: Gauge,
    open_streams: Gauge,
    requests: Family<OutcomeLabels, Counter>,
    refused_connections: Counter,
    control_plane_reachable: Gauge,
}

impl AgentMetrics {
    fn new() -> AgentMetrics {
        let (proxy_connections, open_streams, control_plane_reachable) =
            (Gauge::default(), Gauge::default(), Gauge::default());
        let (requests, refused_connections) = (Family::default(), Counter::default());
        let mut registry = Registry::default();
        registry.register(
            "plexus_agent_proxy_connections",
            "Connections of local proxies open now",
            proxy_connections.clone(),
        );
        registry.register(
            "plexus_agent_open_streams",
            "Relayed requests whose responses are still streaming (a proxy's discovery watch is one)",
            open_streams.clone(),
        );
        registry.register(
            "plexus_agent_requests",
            "Requests of local proxies, by outcome: relayed, or unavailable (control plane unreachable)",
            requests.clone(),
        );
        registry.register(
            "plexus_agent_refused_connections",
            "Proxy connections closed at once because the connection limit was reached",
            refused_connections.clone(),
        );
        registry.register(
            "plexus_agent_control_plane_reachable",
            "1 if the control plane answered the last relayed request, else 0",
            control_plane_reachable.clone(),
        );
        AgentMetrics {
            registry,
            proxy_connections,
            open_streams,
            requests,
            refused_connections,
            control_plane_reachable,
        }
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Counts one in a gauge while it lives.
struct Held(Gauge);

impl Held {
    fn new(gauge: &Gauge) -> Held {
        gauge.inc();
        Held(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A relayed response body that counts as an open stream until hyper drops it (ended, reset,
/// or its proxy's connection closed).
struct CountedBody {
    body: tonic::body::Body,
    _open: Held,
}

impl hyper::body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
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
        Ok(NodeAgent { upstream, metrics: Arc::new(AgentMetrics::new()) })
    }

    /// The admin endpoints: `/live`, `/ready` (the agent is serving) and `/metrics`.
    pub fn admin_router(&self) -> Router {
        let metrics = self.metrics.clone();
        Router::new().route("/live", get(|| async { "live\n" })).route("/ready", get(|| async { "ready\n" })).route(
            "/metrics",
            get(move || async move {
                let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], metrics.encode()).into_response()
            }),
        )
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
                self.metrics.refused_connections.inc();
                continue;
            };
            let _ = stream.set_nodelay(true);
            let agent = self.clone();
            let open = Held::new(&self.metrics.proxy_connections);
            tokio::spawn(async move {
                let (_slot, _open) = (slot, open);
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
        let open = Held::new(&self.metrics.open_streams);
        let mut upstream = self.upstream;
        let relayed = match std::future::poll_fn(|cx| upstream.poll_ready(cx)).await {
            Ok(()) => upstream.call(request.map(tonic::body::Body::new)).await,
            Err(e) => Err(e),
        };
        let metrics = &self.metrics;
        let outcome = if relayed.is_ok() { "relayed" } else { "unavailable" };
        metrics.requests.get_or_create(&OutcomeLabels { outcome }).inc();
        metrics.control_plane_reachable.set(i64::from(relayed.is_ok()));
        Ok(match relayed {
            Ok(response) => response.map(|body| tonic::body::Body::new(CountedBody { body, _open: open })),
            Err(e) => {
                tracing::debug!(path = uri.path(), error = %e, "control plane unreachable");
                tonic::Status::unavailable(format!("the node agent cannot reach the control plane: {e}")).into_http()
            }
        })
    }
}
