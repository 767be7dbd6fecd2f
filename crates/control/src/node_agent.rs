//! The node agent (`plexus agent`): relays the connections of the proxies on one machine to
//! the control plane's authenticated gRPC port.
//!
//! Trust: the agent is a byte relay. Each proxy's TLS session runs end to end, from the proxy
//! to the control plane: the proxy verifies the control plane's certificate through the
//! agent, bootstraps with its own token and then authenticates every call with its own
//! workload certificate. The agent sees only ciphertext, holds no credential, and cannot lend
//! a proxy an identity or act as one; a compromised agent can drop or delay traffic, nothing
//! more (docs/SECURITY.md). The price: the control plane holds one TLS + HTTP/2 connection per
//! proxy again, as without an agent (the agent used to multiplex every proxy's streams on one
//! shared plaintext connection, which could not carry per-proxy authentication); what the agent
//! still gives is one place per machine that reaches the control plane (firewalls, one
//! address to configure) and its metrics.
//!
//! Proxies use it by pointing `--control-plane` (`PLEXUS_CONTROL_PLANE`) at the agent. When the
//! control plane is unreachable the proxy's connection is closed at once, and the proxies keep
//! their last view and reconnect with backoff as they do without an agent; when a proxy's
//! connection closes, its relayed connection is closed too, which the control plane sees as
//! that proxy disconnecting.
//!
//! Its own state is on an admin address (`--admin`): `/live`, `/ready` and `/metrics`
//! (OpenMetrics): open proxy connections, relayed connections, connections by outcome, refused
//! connections and whether the control plane accepted the last connection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

/// How long dialling the control plane may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Proxy connections served at once; more are closed at once (a machine runs far fewer
/// proxies, so this only bounds a runaway client).
pub const MAX_CONNECTIONS: usize = 10_000;

/// The relay: each local proxy's connection is relayed, end to end encrypted, to the control
/// plane.
#[derive(Clone)]
pub struct NodeAgent {
    /// `HOST:PORT` of the control plane's gRPC port.
    upstream: String,
    metrics: Arc<AgentMetrics>,
}

/// How a relayed connection went: `relayed` (the control plane accepted it) or `unavailable`.
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
            "Proxy connections relayed to the control plane open now",
            open_streams.clone(),
        );
        registry.register(
            "plexus_agent_requests",
            "Proxy connections, by outcome: relayed, or unavailable (control plane unreachable)",
            requests.clone(),
        );
        registry.register(
            "plexus_agent_refused_connections",
            "Proxy connections closed at once because the connection limit was reached",
            refused_connections.clone(),
        );
        registry.register(
            "plexus_agent_control_plane_reachable",
            "1 if the control plane accepted the last relayed connection, else 0",
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

impl NodeAgent {
    /// An agent relaying to the control plane's gRPC address (e.g. `http://10.0.0.5:7700`).
    pub fn new(control_plane: &str) -> anyhow::Result<NodeAgent> {
        let uri: http::Uri =
            control_plane.parse().map_err(|e| anyhow::anyhow!("control-plane address {control_plane:?}: {e}"))?;
        let host = uri.host().ok_or_else(|| anyhow::anyhow!("control-plane address {control_plane:?}: no host"))?;
        let upstream = format!("{}:{}", host, uri.port_u16().unwrap_or(7700));
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

    /// Serves local proxies until `shutdown` completes; open connections end then and their
    /// proxies reconnect.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let (stop, _) = tokio::sync::watch::channel(false);
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
                () = &mut shutdown => {
                    stop.send_replace(true);
                    return;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "{MAX_CONNECTIONS} proxy connections open: closing a new one");
                self.metrics.refused_connections.inc();
                continue;
            };
            let _ = stream.set_nodelay(true);
            let agent = self.clone();
            let open = Held::new(&self.metrics.proxy_connections);
            let mut stopped = stop.subscribe();
            tokio::spawn(async move {
                let (_slot, _open) = (slot, open);
                tokio::select! {
                    () = agent.relay(stream) => {}
                    _ = stopped.wait_for(|s| *s) => {}
                }
                tracing::debug!(%peer, "proxy connection ended");
            });
        }
    }

    /// Relays one proxy connection to the control plane, both ways, until either side closes.
    async fn relay(self, mut proxy: TcpStream) {
        let metrics = &self.metrics;
        let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.upstream)).await;
        let mut upstream = match upstream {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => return self.unavailable(&e.to_string()),
            Err(_) => return self.unavailable("connect timed out"),
        };
        let _ = upstream.set_nodelay(true);
        metrics.requests.get_or_create(&OutcomeLabels { outcome: "relayed" }).inc();
        metrics.control_plane_reachable.set(1);
        let _relayed = Held::new(&metrics.open_streams);
        if let Err(e) = tokio::io::copy_bidirectional(&mut proxy, &mut upstream).await {
            tracing::debug!(error = %e, "relayed connection ended with an error");
        }
    }

    fn unavailable(&self, why: &str) {
        tracing::debug!(upstream = %self.upstream, error = %why, "control plane unreachable");
        self.metrics.requests.get_or_create(&OutcomeLabels { outcome: "unavailable" }).inc();
        self.metrics.control_plane_reachable.set(0);
    }
}
