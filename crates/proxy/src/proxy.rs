//! Wiring: the shared state, the listeners (outbound, inbound, `--upstream` binds, admin),
//! per-connection handling up to protocol detection, and graceful drain.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use plexus_core::names::{DEFAULT_TRUST_DOMAIN, spiffe_id};
use plexus_core::{MeshSnapshot, ServiceName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::balance::{Balancer, Choice, TryOutcome};
use crate::discovery::Discovery;
use crate::error::ProxyError;
use crate::http::client::{self, Pool};
use crate::http::inbound::{self, InboundConn};
use crate::http::outbound::{self, OutboundConn};
use crate::http::server::{HttpServer, Known};
use crate::metrics::{Label, Metrics, PeerLabels, ServiceRouteLabels, TcpLabels};
use crate::settings::Settings;
use crate::transport::detect::{Protocol, Sniffed, sniff};
use crate::transport::io::PrefixedIo;
use crate::transport::{listen, original_dst, tcp};
use plexus_core::decide::{Egress, EgressTarget};

/// How long a request waits for the control plane to describe a destination seen for the
/// first time.
const DISCOVERY_WAIT: Duration = Duration::from_secs(3);

/// Everything connections and requests share.
pub struct State {
    /// Settings, with the addresses actually bound (port 0 resolved).
    pub settings: Settings,
    pub discovery: Arc<Discovery>,
    pub balancer: Balancer,
    /// Connection limits (circuit breaking) per destination Service port.
    pub limits: crate::resilience::Limits,
    /// Rate-limit buckets of the policies this sidecar enforces as a destination.
    pub rate_limits: crate::resilience::RateLimiters,
    /// Terminates mesh mTLS on the inbound listener (with a workload identity).
    mesh_tls: Option<Arc<rustls::ServerConfig>>,
    /// Retry budgets per destination Service.
    pub budgets: crate::http::retry::Budgets,
    pub pool: Arc<Pool>,
    /// TLS origination to ExternalServices (their CA roots).
    pub originator: crate::egress::Originator,
    pub metrics: Metrics,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Live request stream for admin `/tap`.
    pub tap: crate::tap::Tap,
    pub http: HttpServer,
    /// This proxy's workload, service and version as labels (built once, shared by every request).
    own: OwnLabels,
    conn_limit: Arc<Semaphore>,
    draining: AtomicBool,
    drain: watch::Sender<bool>,
    own_listeners: Arc<OwnListeners>,
    /// Ingress mode with `--gateway`: the Gateway served, its certificates and ports.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
}

/// This proxy's own workload, service and version labels (when configured).
struct OwnLabels {
    workload: Option<Label>,
    service: Option<Label>,
    version: Option<Label>,
    /// `WORKLOAD/SERVICE` for [`crate::http::headers::SOURCE`], when both are known.
    source: Option<http::HeaderValue>,
    /// The SPIFFE ID `--service` runs as in the default trust domain: the destination
    /// principal of inbound traffic while this proxy has no certificate (made once, not per
    /// request).
    principal: Option<Label>,
}

impl OwnLabels {
    fn of(settings: &Settings) -> OwnLabels {
        let label = |v: &Option<String>| v.as_deref().map(Label::from);
        OwnLabels {
            workload: label(&settings.workload),
            service: label(&settings.service),
            version: label(&settings.version),
            source: settings
                .workload
                .as_deref()
                .zip(settings.service.as_deref())
                .and_then(|(w, s)| http::HeaderValue::from_str(&format!("{w}/{s}")).ok()),
            principal: settings
                .service
                .as_ref()
                .map(|svc| spiffe_id(DEFAULT_TRUST_DOMAIN, &settings.namespace, svc).into()),
        }
    }
}

/// A TCP stream's metrics: opened now, closed by [`TcpGuard::closed`].
pub struct TcpGuard {
    state: Arc<State>,
    labels: TcpLabels,
}

impl TcpGuard {
    pub fn closed(self, moved: tcp::Transferred) {
        let series = self.state.metrics.tcp(&self.labels);
        series.sent.inc_by(moved.sent);
        series.received.inc_by(moved.received);
        series.closed.inc();
    }
}

impl State {
    /// What this proxy tells a peer sidecar about its caller ([`crate::http::headers::SOURCE`]).
    pub fn source_header(&self) -> Option<&http::HeaderValue> {
        self.own.source.as_ref()
    }

    /// Source labels of outbound traffic: this proxy's own workload.
    pub fn fill_source(&self, peers: &mut PeerLabels) {
        let s = &self.settings;
        if let Some(w) = &self.own.workload {
            peers.source_workload = w.clone();
        }
        if let Some(svc) = &self.own.service {
            peers.source_service = svc.clone();
        }
        if let Some(id) = s.identity.as_ref().and_then(|i| i.spiffe_id()) {
            peers.source_principal = id;
        }
    }

    /// Destination labels of inbound traffic: this proxy's own workload.
    pub fn fill_destination(&self, peers: &mut PeerLabels) {
        let s = &self.settings;
        if let Some(w) = &self.own.workload {
            peers.destination_workload = w.clone();
        }
        if let Some(v) = &self.own.version {
            peers.destination_version = v.clone();
        }
        if let (Some(label), Some(principal)) = (&self.own.service, &self.own.principal) {
            peers.destination_service = label.clone();
            peers.destination_principal = match s.identity.as_ref().and_then(|i| i.spiffe_id()) {
                Some(id) => id,
                None => principal.clone(),
            };
        }
    }

    pub fn count_ejection(&self, service: &ServiceName, route: &str) {
        self.metrics
            .outlier_ejections
            .get_or_create(&ServiceRouteLabels { destination_service: service.name.clone(), route: route.into() })
            .inc();
    }

    /// Whether connecting to `addr` would reach one of this proxy's own listeners (outbound,
    /// inbound, admin, `--upstream` binds, a gateway's bound ports): the one check every
    /// forwarding to an address a client named goes through (CONNECT, absolute-form, `Host`,
    /// original destination); endpoints are checked by the pool ([`OwnListeners::loops_back`]).
    /// It compares the resolved socket address, never a spelling: any address of this host
    /// (loopback, unspecified, IPv4-mapped, or assigned to an interface) on a listener's port
    /// counts, since an unspecified listener accepts on every local address — and refusing
    /// another local address on the same port costs nothing legitimate.
    pub fn is_self(&self, addr: SocketAddr) -> bool {
        self.own_listeners.is_self(addr)
    }

    /// Refuses a destination under `outboundTrafficPolicy: registryOnly`: logged and counted
    /// in `plexus_egress_denied_total{destination}` (`host:port` or the address).
    pub fn refuse_egress(&self, destination: &str) {
        tracing::debug!(%destination, "destination not in the registry (outboundTrafficPolicy registryOnly)");
        self.metrics.egress_denied(destination);
    }

    /// Passes on the outcome of TLS this proxy originated to `destination` (`host:port` of
    /// an ExternalService): a failure (certificate not verified, handshake) is logged and
    /// counted in `plexus_egress_origination_failed_total{destination}`, on every path.
    pub fn originated<T>(&self, destination: &str, r: Result<T, ProxyError>) -> Result<T, ProxyError> {
        if let Err(e @ ProxyError::OriginationFailed(_)) = &r {
            tracing::warn!(%destination, error = %e, "refused: the ExternalService's TLS did not verify");
            self.metrics.origination_failed(destination);
        }
        r
    }

    /// An opaque stream to `addr` over TLS this proxy originates (SNI and the verified name:
    /// `host`, an ExternalService's name or address), for the stream paths (`CONNECT`, opaque
    /// and transparent TCP); through [`Pool::connect_origin`], as HTTP requests are.
    pub async fn originate_stream(
        &self,
        host: &str,
        addr: SocketAddr,
        origination: &plexus_core::external::Origination,
    ) -> Result<client::PeerStream, ProxyError> {
        let timeout = Some(self.settings.limits.connect_timeout);
        let r = match self.originator.origin(host, origination, None) {
            Ok(origin) => self.pool.connect_origin(addr, timeout, &origin).await,
            Err(e) => Err(e),
        };
        self.originated(&format!("{host}:{}", addr.port()), r)
    }

    /// Counts a TCP stream as opened.
    pub fn tcp_opened(
        self: &Arc<Self>,
        direction: &'static str,
        peers: PeerLabels,
        security: &'static str,
    ) -> TcpGuard {
        let labels = TcpLabels { direction, peers, connection_security_policy: security };
        self.metrics.tcp(&labels).opened.inc();
        TcpGuard { state: self.clone(), labels }
    }

    /// The snapshot to resolve `host` with: with a control plane, a Service seen for the first
    /// time is asked for and awaited (lazy discovery).
    /// The snapshot once `name` (a Service this proxy sends to by configuration, such as an
    /// egress gateway) is known, or after a short wait.
    pub async fn snapshot_with(&self, name: &ServiceName) -> Arc<MeshSnapshot> {
        self.discovery.ensure(std::slice::from_ref(name), DISCOVERY_WAIT).await
    }

    pub async fn snapshot_for_host(&self, host: &str) -> Arc<MeshSnapshot> {
        let snapshot = self.discovery.current();
        if snapshot.service_by_host(host).is_some() {
            return snapshot;
        }
        self.discovery.ensure(&self.discovery.candidates(host), DISCOVERY_WAIT).await
    }

    /// The Service a redirected connection's original destination names: an endpoint of a
    /// known Service, or a Service virtual IP from the `--vip-hosts` file (netns mode).
    pub async fn service_for_orig_dst(&self, orig: SocketAddr) -> Option<(ServiceName, u16)> {
        let snapshot = self.discovery.current();
        if let Some((s, p)) = snapshot.service_by_endpoint(orig).or_else(|| snapshot.service_by_virtual_ip(orig)) {
            return Some((s.name.clone(), p.port));
        }
        let path = self.settings.vip_hosts.as_ref()?;
        let hosts = tokio::fs::read_to_string(path).await.ok()?;
        let name = hosts.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            let ip: std::net::IpAddr = fields.next()?.parse().ok()?;
            (ip == orig.ip()).then(|| fields.next().map(str::to_string)).flatten()
        })?;
        let candidates = ServiceName::candidates(&name);
        let snapshot = self.discovery.ensure(&candidates, DISCOVERY_WAIT).await;
        let service = candidates.iter().find_map(|c| snapshot.services.get(c))?;
        Some((service.name.clone(), service.port(Some(orig.port()))?.port))
    }

    /// Starts a graceful drain: listeners stop accepting, connections finish their work.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.drain.send_replace(true);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Turns true when a drain starts.
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain.subscribe()
    }

    /// The permits of accepted connections (one each, held until it closes).
    pub fn conn_limit(&self) -> &Arc<Semaphore> {
        &self.conn_limit
    }
}

/// Whether `ip` is an address of this host (in this network namespace): loopback, unspecified
/// (connecting to it reaches the host itself), or one a socket can bind to (an interface's).
pub fn is_local_ip(ip: std::net::IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// This proxy's listeners: outbound, inbound, admin, `--upstream` binds, other servers of the
/// process (DNS), and a gateway's ports as they are bound and closed with its configuration.
pub struct OwnListeners {
    fixed: Vec<SocketAddr>,
    inbound: SocketAddr,
    gateway: Option<Arc<crate::gateway::Gateway>>,
}

impl OwnListeners {
    /// See [`State::is_self`].
    pub fn is_self(&self, addr: SocketAddr) -> bool {
        let port = addr.port();
        let ours = self.fixed.iter().any(|l| l.port() == port) || self.gateway.as_ref().is_some_and(|g| g.serves(port));
        ours && is_local_ip(addr.ip())
    }

    /// Whether an endpoint at `addr` would bring a request back into this proxy other than as
    /// a mesh peer: any of its listeners but the inbound one (a workload calling its own
    /// Service reaches its own sidecar's inbound port, as any peer does).
    pub fn loops_back(&self, addr: SocketAddr) -> bool {
        addr.port() != self.inbound.port() && self.is_self(addr)
    }
}

/// The addresses a running proxy listens on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Addresses {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    /// `--upstream` binds, keyed `name.namespace[:port]`.
    pub upstreams: BTreeMap<String, SocketAddr>,
}

/// A proxy with its listeners bound, ready to run.
pub struct Proxy {
    state: Arc<State>,
    outbound: TcpListener,
    inbound: TcpListener,
    admin: TcpListener,
    upstreams: Vec<(crate::UpstreamBind, TcpListener)>,
    addresses: Addresses,
}

/// A handle on a running proxy (for embedding: `plexus run`, tests).
#[derive(Clone)]
pub struct ProxyHandle {
    state: Arc<State>,
}

impl ProxyHandle {
    /// The gauge of the workload certificate's expiry (`plexus_identity_cert_expiration_timestamp_seconds`).
    pub fn metrics_gauge_for_identity(&self) -> prometheus_client::metrics::gauge::Gauge {
        self.state.metrics.identity_cert_expiration.clone()
    }

    /// Starts a graceful drain.
    pub fn shutdown(&self) {
        self.state.start_drain();
    }
}

impl Proxy {
    /// Binds every listener (port 0 picks a free port). Fails before serving anything if any
    /// address is taken.
    pub fn bind(mut settings: Settings, discovery: Arc<Discovery>) -> std::io::Result<Proxy> {
        fn bind(what: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
            listen::bind(addr)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({what}): {e}")))
        }
        let outbound = bind("outbound", settings.outbound)?;
        let inbound = bind("inbound", settings.inbound)?;
        let admin = bind("admin", settings.admin)?;
        settings.outbound = outbound.local_addr()?;
        settings.inbound = inbound.local_addr()?;
        settings.admin = admin.local_addr()?;
        let mut upstreams = Vec::new();
        let mut upstream_addrs = BTreeMap::new();
        for up in &mut settings.upstreams {
            let l = bind(&format!("--upstream {}", up.key()), up.listen)?;
            up.listen = l.local_addr()?;
            upstream_addrs.insert(up.key(), up.listen);
            upstreams.push((up.clone(), l));
        }
        let addresses = Addresses {
            outbound: settings.outbound,
            inbound: settings.inbound,
            admin: settings.admin,
            upstreams: upstream_addrs,
        };
        let mut fixed = vec![settings.outbound, settings.inbound, settings.admin];
        fixed.extend(addresses.upstreams.values());
        fixed.extend(&settings.other_listeners);
        let gateway = settings.gateway.clone().map(crate::gateway::Gateway::new);
        let own_listeners = Arc::new(OwnListeners { fixed, inbound: settings.inbound, gateway: gateway.clone() });
        let (drain, _) = watch::channel(false);
        let mut wanted: Vec<ServiceName> = settings.upstreams.iter().map(|u| u.service.clone()).collect();
        // A gateway asks for its Gateway: its view holds the attached routes and their backends.
        if let Some(g) = &settings.gateway {
            wanted.push(g.name.clone());
        }
        // Its own Service too: the view of it carries the policies enforced here as the
        // destination (RateLimitPolicy) — with a control plane, nothing arrives unasked.
        if let Some(own) = &settings.service {
            wanted.push(ServiceName::new(own.as_str(), settings.namespace.as_str()));
        }
        discovery.want(&wanted);
        let metrics = Metrics::new();
        let http = HttpServer::new(&settings.limits, metrics.http_parked.clone());
        let state = Arc::new(State {
            balancer: Balancer::new(settings.load_balancer),
            limits: crate::resilience::Limits::new(),
            rate_limits: crate::resilience::RateLimiters::new(),
            budgets: Default::default(),
            mesh_tls: match &settings.identity {
                Some(identity) => Some(identity.credentials.server_config().map_err(std::io::Error::other)?),
                None => None,
            },
            pool: Pool::with_credentials(
                client::Dialer { timeout: settings.limits.connect_timeout, mark: settings.outbound_mark },
                settings.identity.as_ref().map(|i| i.credentials.clone()),
                OwnLabels::of(&settings).source,
                Some(own_listeners.clone()),
            ),
            originator: Default::default(),
            metrics,
            telemetry: Arc::default(),
            tap: crate::tap::Tap::default(),
            http,
            own: OwnLabels::of(&settings),
            conn_limit: Arc::new(Semaphore::new(settings.limits.max_connections)),
            draining: AtomicBool::new(false),
            drain,
            own_listeners,
            gateway,
            discovery,
            settings,
        });
        Ok(Proxy { state, outbound, inbound, admin, upstreams, addresses })
    }

    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    /// Where finished requests are summarised for the control plane.
    pub fn telemetry(&self) -> Arc<crate::telemetry::Telemetry> {
        self.state.telemetry.clone()
    }

    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle { state: self.state.clone() }
    }

    /// Serves until `shutdown` completes or `POST /shutdown` is received, then drains: stops
    /// accepting, lets in-flight requests and streams finish (up to the drain timeout).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Proxy { state, outbound, inbound, admin, upstreams, .. } = self;
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(crate::admin::serve(state.clone(), admin)));
        tasks.push(tokio::spawn(accept_loop(state.clone(), outbound, Role::Outbound(None))));
        tasks.push(tokio::spawn(accept_loop(state.clone(), inbound, Role::Inbound)));
        for (bind, l) in upstreams {
            tasks.push(tokio::spawn(accept_loop(state.clone(), l, Role::Outbound(Some((bind.service, bind.port))))));
        }
        if let Some(gateway) = state.gateway.clone() {
            tasks.push(tokio::spawn(crate::gateway::run(state.clone(), gateway)));
        }
        tasks.push(tokio::spawn(prune_on_change(state.clone())));
        tasks.push(tokio::spawn(expire_idle_series(state.clone())));
        tasks.push(tokio::spawn(return_memory_after_bursts(state.clone())));
        let mut drain = state.drain.subscribe();
        tokio::select! {
            _ = shutdown => state.start_drain(),
            _ = drained(&mut drain) => {}
        }
        tracing::info!(timeout = ?state.settings.limits.drain_timeout, "draining");
        // HTTP connections see the drain signal and close after their in-flight requests;
        // TCP streams run to their end. Every connection holds a permit until it closes.
        let deadline = tokio::time::Instant::now() + state.settings.limits.drain_timeout;
        let all = state.settings.limits.max_connections as u32;
        let streams_done = async {
            while state.conn_limit.available_permits() < all as usize {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout_at(deadline, streams_done).await.is_err() {
            tracing::warn!("drain deadline reached with connections still open");
        }
        for t in tasks {
            t.abort();
        }
        // Spans of the last requests go out before the process ends.
        crate::trace::flush(Duration::from_secs(2)).await;
        tracing::info!("drained");
    }
}

/// Completes once a drain has started.
pub async fn drained(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|d| *d).await;
}

/// Removes metric series unused for 10 minutes, once a minute.
async fn expire_idle_series(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let n = state.metrics.expire_idle(crate::metrics::SERIES_IDLE_EXPIRY);
        if n > 0 {
            tracing::debug!(series = n, "expired idle metric series");
        }
    }
}

/// Keeps per-endpoint state only for endpoints that still exist after a config change, and
/// closes pooled connections to endpoints that left the mesh. (The pool also holds
/// connections to addresses that never were mesh endpoints, the local app and passthrough
/// destinations: those stay.)
async fn prune_on_change(state: Arc<State>) {
    let endpoints = |snapshot: &plexus_core::MeshSnapshot| -> std::collections::HashSet<SocketAddr> {
        snapshot
            .services
            .values()
            .flat_map(|s| s.ports.iter())
            .flat_map(|p| p.endpoints.iter().map(|e| e.addr))
            .collect()
    };
    let mut changes = state.discovery.subscribe();
    let mut previous = endpoints(&state.discovery.current());
    while changes.changed().await.is_ok() {
        let snapshot = state.discovery.current();
        let live = endpoints(&snapshot);
        state.balancer.retain(|a| live.contains(a));
        if previous.iter().any(|a| !live.contains(a)) {
            state.pool.retain(|a| live.contains(a) || !previous.contains(a));
        }
        previous = live;
        state.budgets.retain(|s| snapshot.services.contains_key(s));
        state.limits.retain(|s, p| snapshot.services.get(s).is_some_and(|svc| svc.port(Some(p)).is_some()));
        state.metrics.config_version.set(state.discovery.generation() as i64);
    }
}

#[derive(Clone)]
enum Role {
    /// The outbound listener, or an `--upstream` bind to one Service port.
    Outbound(Option<(ServiceName, Option<u16>)>),
    Inbound,
}

async fn accept_loop(state: Arc<State>, listener: TcpListener, role: Role) {
    let mut drain = state.drain.subscribe();
    loop {
        tokio::select! {
            (stream, peer, permit) = listen::accept(&listener, &state.conn_limit) => {
                let state = state.clone();
                let watcher = state.drain.subscribe();
                // One task per role, each the size of its own future (a task holding either
                // would be the larger one's size for every connection).
                match role.clone() {
                    Role::Outbound(bound) => tokio::spawn(outbound_conn(state, stream, peer, bound, watcher, permit)),
                    Role::Inbound => tokio::spawn(inbound_conn(state, stream, peer, watcher, permit)),
                };
            }
            _ = drained(&mut drain) => return,
        }
    }
}

/// Where an opaque stream goes.
#[derive(Clone)]
enum TcpDest {
    /// A Service port: balanced over its endpoints.
    Service(ServiceName, u16),
    /// A fixed address (original destination, or the local app).
    Addr(SocketAddr),
    /// A host outside the mesh by name (an ExternalService named by SNI), resolved when dialled.
    Host(String, u16),
    /// A host outside the mesh (`Host` or `Addr`) over TLS this proxy opens, verified as
    /// `name`: an ExternalService port with `tls.originate`, for an app sending plaintext.
    Originated { name: String, to: Box<TcpDest>, origination: plexus_core::external::Origination },
}

impl TcpDest {
    /// Where the app's own TLS goes: as addressed, nothing originated over it.
    fn passthrough(self) -> TcpDest {
        match self {
            TcpDest::Originated { to, .. } => *to,
            other => other,
        }
    }
}

/// The address of a destination outside the mesh (`Host` resolved; never this proxy itself).
async fn external_addr(state: &State, dest: &TcpDest) -> Result<SocketAddr, ProxyError> {
    match dest {
        TcpDest::Host(host, port) => {
            let addr = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| ProxyError::UnknownDestination(format!("{host}:{port}")))?;
            if state.is_self(addr) {
                return Err(ProxyError::Forbidden(format!("{host}:{port} is this proxy itself")));
            }
            Ok(addr)
        }
        TcpDest::Addr(addr) => Ok(*addr),
        TcpDest::Originated { to, .. } => Box::pin(external_addr(state, to)).await,
        TcpDest::Service(name, port) => Err(ProxyError::UnknownDestination(format!("{name}:{port}"))),
    }
}

/// An upstream TCP connection with the labels describing its peer.
struct Dialed {
    stream: Upstream,
    peers: PeerLabels,
    /// `mutual_tls` when the stream runs over mesh mTLS.
    security: &'static str,
}

use crate::http::client::PeerStream as Upstream;

impl AsRef<TcpStream> for Dialed {
    /// The TCP socket under the stream: server-first detection waits for it to become
    /// readable (mesh TLS servers send no session tickets, so only the app's bytes do that).
    fn as_ref(&self) -> &TcpStream {
        self.stream.tcp()
    }
}

async fn dial(state: &Arc<State>, dest: &TcpDest, peers: PeerLabels) -> Result<Dialed, ProxyError> {
    // Boxed: a connection's task waits on a dial (resolution, TLS handshake) only briefly, and
    // would otherwise be that much larger for its whole life.
    Box::pin(dial_boxed(state, dest, peers)).await
}

async fn dial_boxed(state: &Arc<State>, dest: &TcpDest, mut peers: PeerLabels) -> Result<Dialed, ProxyError> {
    let timeout = state.settings.limits.connect_timeout;
    match dest {
        TcpDest::Host(..) | TcpDest::Addr(_) => {
            let addr = external_addr(state, dest).await?;
            Ok(Dialed {
                stream: Upstream::Plain(client::connect(addr, timeout, state.settings.outbound_mark).await?),
                peers,
                security: "none",
            })
        }
        TcpDest::Originated { name, to, origination } => {
            let addr = external_addr(state, to).await?;
            let stream = state.originate_stream(name, addr, origination).await?;
            Ok(Dialed { stream, peers, security: "none" })
        }
        TcpDest::Service(name, port) => {
            let snapshot = state.discovery.current();
            let compiled = snapshot.services.get(name).and_then(|s| s.port(Some(*port)));
            let endpoints = compiled.map(|p| p.endpoints.clone()).unwrap_or_default();
            let choice = compiled.map(|p| Choice::new(&p.policy, None)).unwrap_or_default();
            let mut tried = Vec::new();
            loop {
                let Some((ep, pick)) = state.balancer.pick(&endpoints, &choice, &tried) else {
                    return Err(ProxyError::NoEndpoints(format!("{name}:{port}")));
                };
                peers.destination_service = name.name.as_str().into();
                peers.destination_workload = ep.workload.clone();
                peers.destination_version = ep.version.clone().unwrap_or_else(crate::metrics::unknown);
                match state.pool.connect_peer(ep.addr, None, ep.principal.as_ref(), crate::tls::ALPN_TCP).await {
                    Ok(stream) => {
                        pick.finish(TryOutcome::Success);
                        let security = if stream.is_mtls() { "mutual_tls" } else { "none" };
                        return Ok(Dialed { stream, peers, security });
                    }
                    Err(e) => {
                        pick.finish(TryOutcome::Failure);
                        tried.push(ep.addr);
                        if tried.len() >= endpoints.len().min(3) {
                            return Err(e);
                        }
                    }
                }
            }
        }
    }
}

fn io_error(e: ProxyError) -> std::io::Error {
    match e {
        ProxyError::ConnectFailed(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

/// Forwards an opaque stream: the bytes read during detection first, then both directions.
async fn forward_opaque(
    state: &Arc<State>,
    direction: &'static str,
    client: TcpStream,
    prefix: &[u8],
    upstream: Result<Dialed, ProxyError>,
) {
    forward_opaque_io(state, direction, client, prefix, upstream, "none").await
}

/// [`forward_opaque`] for any client stream (plain or TLS-terminated).
async fn forward_opaque_io<C: crate::transport::io::Io>(
    state: &Arc<State>,
    direction: &'static str,
    client: C,
    prefix: &[u8],
    upstream: Result<Dialed, ProxyError>,
    security: &'static str,
) {
    // In an allocation of its own, like HTTP's (`HttpServer::serve`): a connection's task is
    // not sized for the branch it does not take.
    Box::pin(forward_opaque_boxed(state, direction, client, prefix, upstream, security)).await
}

async fn forward_opaque_boxed<C: crate::transport::io::Io>(
    state: &Arc<State>,
    direction: &'static str,
    client: C,
    prefix: &[u8],
    upstream: Result<Dialed, ProxyError>,
    security: &'static str,
) {
    let mut up = match upstream {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "cannot open TCP stream");
            return;
        }
    };
    let security = if up.security == "mutual_tls" { up.security } else { security };
    let guard = state.tcp_opened(direction, up.peers.clone(), security);
    if !prefix.is_empty()
        && let Err(e) = up.stream.write_all(prefix).await
    {
        tracing::debug!(error = %e, "upstream write failed");
        guard.closed(tcp::Transferred::default());
        return;
    }
    let (mut moved, end) = tcp::forward(client, up.stream, state.settings.limits.idle_timeout).await;
    if let Err(e) = end {
        tracing::debug!(error = %e, "TCP stream ended");
    }
    moved.sent += prefix.len() as u64;
    guard.closed(moved);
}

async fn outbound_conn(
    state: Arc<State>,
    mut stream: TcpStream,
    peer: SocketAddr,
    bound: Option<(ServiceName, Option<u16>)>,
    watcher: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) {
    let snapshot: Arc<MeshSnapshot> = match &bound {
        Some((name, _)) => state.discovery.ensure(std::slice::from_ref(name), DISCOVERY_WAIT).await,
        None => state.discovery.current(),
    };
    // A gateway's outbound port forwards nothing (SPEC §5): no original destination, no
    // passthrough by SNI — only HTTP, answered 403 (an egress gateway's callers come in over
    // mTLS on its inbound port).
    let gateway = state.settings.mode != crate::settings::Mode::Sidecar;
    let orig_dst = if bound.is_none() && !gateway { original_dst(&stream) } else { None };
    let mut peers = PeerLabels::default();
    state.fill_source(&mut peers);
    let (tcp_dest, declared_opaque) = match (&bound, orig_dst) {
        (Some((name, port)), _) => match snapshot.services.get(name).and_then(|s| s.port(*port)) {
            Some(p) => (Some(TcpDest::Service(name.clone(), p.port)), p.protocol.is_some_and(|p| p.skips_detection())),
            None => (None, false),
        },
        // An endpoint of a Service, or a Service's virtual IP (netns mode): balanced over its
        // endpoints with mTLS like every path into the mesh; anything else as addressed.
        (None, Some(orig)) => match state.service_for_orig_dst(orig).await {
            Some((name, port)) => {
                let snapshot = state.discovery.current();
                let declared = snapshot.services.get(&name).and_then(|s| s.port(Some(port)));
                let opaque = declared.is_some_and(|p| p.protocol.is_some_and(|p| p.skips_detection()));
                (Some(TcpDest::Service(name, port)), opaque)
            }
            None if state.is_self(orig) => (None, false),
            // Outside the mesh's Services: the egress decision, by address for now (the name
            // an HTTP request or a TLS ClientHello carries is looked at once read).
            None => {
                let target = EgressTarget { host: None, addr: Some(orig.ip()), port: orig.port() };
                match plexus_core::decide::egress(&snapshot, target) {
                    Egress::Denied => (None, false),
                    // An ExternalService bound to an egress gateway leaves through it only,
                    // and it carries HTTP: a stream is decided again once HTTP is read.
                    Egress::External { service, .. } if service.egress_gateway.is_some() => (None, false),
                    Egress::External { service, port } => {
                        peers.destination_service = service.label.clone();
                        // Plaintext from the app gets TLS to the listed address (a ClientHello,
                        // once read, passes through instead).
                        let dest = match service.originates_on(port) {
                            Some(o) => TcpDest::Originated {
                                name: orig.ip().to_string(),
                                to: Box::new(TcpDest::Addr(orig)),
                                origination: o.clone(),
                            },
                            None => TcpDest::Addr(orig),
                        };
                        (Some(dest), false)
                    }
                    Egress::MeshAddress | Egress::AllowAny => (Some(TcpDest::Addr(orig)), false),
                }
            }
        },
        (None, None) => (None, false),
    };
    // A transparent connection to an address no registry knows, under registryOnly: only a
    // name read from it (HTTP `Host`, TLS SNI) may still make it an ExternalService's.
    let unregistered =
        orig_dst.filter(|_| tcp_dest.is_none() && bound.is_none() && !gateway).filter(|o| !state.is_self(*o));
    let opaque = declared_opaque || orig_dst.is_some_and(|o| state.settings.opaque_ports.contains(&o.port()));
    if opaque {
        if let Some(dest) = &tcp_dest {
            let up = dial(&state, dest, peers).await;
            forward_opaque(&state, "outbound", stream, &[], up).await;
        } else if let Some(orig) = unregistered {
            state.refuse_egress(&orig.to_string());
        }
        drop(permit);
        return;
    }
    let limits = &state.settings.limits;
    let mut buf = BytesMut::with_capacity(4096);
    let connect = tcp_dest.clone().map(|d| {
        let state = state.clone();
        let peers = peers.clone();
        move || async move { dial(&state, &d, peers).await.map_err(io_error) }
    });
    let sniffed = sniff(&mut stream, &mut buf, limits.client_first_wait, limits.header_read_timeout, connect).await;
    match sniffed {
        Ok(Sniffed::Client(protocol @ (Protocol::Http1 | Protocol::Http2), early)) => {
            drop(early);
            let conn = Arc::new(OutboundConn { peer, orig_dst, bound });
            let handler_state = state.clone();
            let io = PrefixedIo::new(buf.freeze(), stream);
            let handle = move |req| outbound::handle(handler_state.clone(), conn.clone(), req);
            state.http.serve_known(known_http(&protocol), io, watcher, handle).await;
        }
        Ok(Sniffed::Client(protocol, early)) => {
            // The app's own TLS passes through as sent: nothing is originated over it (an
            // upstream dialled early with originated TLS is dropped).
            let own_tls = matches!(protocol, Protocol::Tls { .. });
            let tcp_dest = if own_tls { tcp_dest.map(TcpDest::passthrough) } else { tcp_dest };
            let early = early.filter(|up| !(own_tls && matches!(up.stream, Upstream::External(_))));
            // TLS passes through by SNI when the destination is not otherwise known.
            let dest = tcp_dest.or_else(|| match &protocol {
                Protocol::Tls { sni: Some(host), .. } if !gateway => {
                    snapshot.resolve_authority(host).map(|(s, p)| TcpDest::Service(s.name.clone(), p.port))
                }
                _ => None,
            });
            // Under registryOnly, an unregistered address is reached only as the ExternalService
            // its SNI names — dialled by that name, never at an address the client chose.
            let dest = match (dest, unregistered) {
                (None, Some(orig)) => {
                    let sni = match &protocol {
                        Protocol::Tls { sni: Some(host), .. } => Some(host.as_str()),
                        _ => None,
                    };
                    let target = EgressTarget { host: sni, addr: Some(orig.ip()), port: orig.port() };
                    match (plexus_core::decide::egress(&snapshot, target), sni) {
                        (Egress::External { service, .. }, Some(host)) if service.egress_gateway.is_none() => {
                            peers.destination_service = service.label.clone();
                            Some(TcpDest::Host(host.to_string(), orig.port()))
                        }
                        _ => {
                            let named = sni.map_or_else(|| orig.to_string(), |h| format!("{h}:{}", orig.port()));
                            state.refuse_egress(&named);
                            drop(permit);
                            return;
                        }
                    }
                }
                (dest, _) => dest,
            };
            match (dest, early) {
                (_, Some(up)) => forward_opaque(&state, "outbound", stream, &buf, Ok(up)).await,
                (Some(dest), None) => {
                    let up = dial(&state, &dest, peers).await;
                    forward_opaque(&state, "outbound", stream, &buf, up).await;
                }
                (None, None) => {
                    // The explicit outbound port is an HTTP proxy: say so.
                    let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nx-plexus-error: not an HTTP request and no destination known\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                }
            }
        }
        Ok(Sniffed::ServerFirst(up)) => forward_opaque(&state, "outbound", stream, &[], Ok(up)).await,
        // A client waiting for a server to speak first, at an address no registry knows.
        Ok(Sniffed::TimedOut) if unregistered.is_some() => {
            state.refuse_egress(&unregistered.map(|o| o.to_string()).unwrap_or_default())
        }
        Ok(Sniffed::Closed | Sniffed::TimedOut) => {}
        Err(e) => tracing::debug!(%peer, error = %e, "outbound connection failed during detection"),
    }
    drop(permit);
}

async fn inbound_conn(
    state: Arc<State>,
    mut stream: TcpStream,
    peer: SocketAddr,
    watcher: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) {
    let orig_dst = original_dst(&stream);
    // An egress gateway has no app: its Workload's port is its inbound port.
    let egress_gateway = state.settings.mode == crate::settings::Mode::Egress;
    let app_port = state
        .settings
        .app_port
        .or(orig_dst.map(|o| o.port()))
        .or_else(|| egress_gateway.then(|| state.settings.inbound.port()));
    // The original destination's port is the caller's choice: never one of this proxy's own
    // listeners on 127.0.0.1, where it would be taken for the local app (the outbound port acts
    // for this workload, the admin port trusts loopback) or loop back into the inbound port.
    if !egress_gateway
        && let Some(port) = app_port
        && state.is_self(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    {
        tracing::debug!(%peer, port, "inbound connection for one of this proxy's own listeners refused");
        drop(permit);
        return;
    }
    let mut peers = PeerLabels::default();
    state.fill_destination(&mut peers);
    let app = app_port.map(|p| TcpDest::Addr(SocketAddr::from((Ipv4Addr::LOCALHOST, p))));
    // Declared-opaque ports skip detection, unless peers may come over mesh mTLS (a ClientHello
    // to read first; server-first apps still work through detection's race).
    let skip_detection = state.mesh_tls.is_none() && app_port.is_some_and(|p| state.settings.opaque_ports.contains(&p));
    if let (Some(dest), true) = (&app, skip_detection) {
        if let Some(port) = app_port
            && inbound::authorize_stream(&state, port, None).is_err()
        {
            drop(permit);
            return;
        }
        let up = dial(&state, dest, peers).await;
        forward_opaque(&state, "inbound", stream, &[], up).await;
        drop(permit);
        return;
    }
    let limits = &state.settings.limits;
    let mut buf = BytesMut::with_capacity(4096);
    // Strict mTLS: nothing but mesh TLS reaches the app, so the app is never dialled early.
    // An egress gateway serves callers whose identity mTLS proves, whatever the mesh mode.
    let strict = egress_gateway || state.discovery.current().mesh.mtls_mode == plexus_core::resource::MtlsMode::Strict;
    // Nor when only HTTP may reach it: nothing reaches the app before it is authorized.
    let http_only = app_port.is_some_and(|p| inbound::http_only(&state, p));
    let connect = app.clone().filter(|_| !strict && !http_only).map(|d| {
        let state = state.clone();
        let peers = peers.clone();
        move || async move { dial(&state, &d, peers).await.map_err(io_error) }
    });
    let sniffed = sniff(&mut stream, &mut buf, limits.client_first_wait, limits.header_read_timeout, connect).await;
    let mesh_tls =
        matches!(&sniffed, Ok(Sniffed::Client(Protocol::Tls { alpn, .. }, _)) if crate::tls::is_mesh_alpn(alpn));
    if mesh_tls {
        // Boxed: the TLS session's state is only this branch's.
        Box::pin(serve_mesh_tls(state, stream, buf, peer, app_port, watcher)).await;
        drop(permit);
        return;
    }
    if strict {
        // Plaintext and non-mesh TLS are closed without any response (SPEC §5).
        tracing::debug!(%peer, "strict mTLS: closing a connection that is not mesh TLS");
        drop(permit);
        return;
    }
    let opaque = matches!(&sniffed, Ok(Sniffed::ServerFirst(_)))
        || matches!(&sniffed, Ok(Sniffed::Client(p, _)) if !matches!(p, Protocol::Http1 | Protocol::Http2));
    if opaque
        && let Some(port) = app_port
        && let Err(e) = inbound::authorize_stream(&state, port, None)
    {
        tracing::debug!(%peer, error = %e, "opaque stream refused");
        drop(permit);
        return;
    }
    // A plaintext connection serves only while the mesh is permissive: switching MeshConfig to
    // strict closes it (SPEC §5), however long it has been kept alive.
    let serve = async {
        match sniffed {
            Ok(Sniffed::Client(protocol @ (Protocol::Http1 | Protocol::Http2), early)) => {
                drop(early);
                let conn = Arc::new(InboundConn::new(peer, app_port, None));
                let handler_state = state.clone();
                let io = PrefixedIo::new(buf.freeze(), stream);
                let handle = move |req| inbound::handle(handler_state.clone(), conn.clone(), req);
                state.http.serve_known(known_http(&protocol), io, watcher, handle).await;
            }
            Ok(Sniffed::Client(_, Some(up))) | Ok(Sniffed::ServerFirst(up)) => {
                forward_opaque(&state, "inbound", stream, &buf, Ok(up)).await
            }
            Ok(Sniffed::Client(_, None)) => match &app {
                Some(dest) => {
                    let up = dial(&state, dest, peers).await;
                    forward_opaque(&state, "inbound", stream, &buf, up).await;
                }
                None => tracing::debug!(%peer, "inbound stream with no application port; closing"),
            },
            Ok(Sniffed::Closed | Sniffed::TimedOut) => {}
            Err(e) => tracing::debug!(%peer, error = %e, "inbound connection failed during detection"),
        }
    };
    tokio::select! {
        () = serve => {}
        () = strict_enabled(&state) => tracing::debug!(%peer, "strict mTLS: closing a plaintext inbound connection"),
    }
    drop(permit);
}

/// Returns memory to the system once a burst of connections has closed. glibc's allocator
/// keeps freed memory in its arenas (5,000 idle connections took a sidecar from 30 to 194 MiB,
/// and it stayed there after they closed). The number of open connections, and of those holding
/// buffers (open and not parked: a parked HTTP/1 connection has given its buffers back), are
/// sampled every 250 ms; once either has fallen by at least 64 from its peak since the last
/// trim, `malloc_trim` hands the free pages back — at most every 5 s (scripts/connections
/// measures it). A burst that opens and closes (or goes quiet) between two 5 s looks counts
/// too: the peaks are kept between them. A few milliseconds, only after connections closed or
/// parked, never per request.
async fn return_memory_after_bursts(state: Arc<State>) {
    const SAMPLE: Duration = Duration::from_millis(250);
    const MIN_INTERVAL: Duration = Duration::from_secs(5);
    let all = state.settings.limits.max_connections;
    let mut tick = tokio::time::interval(SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Peaks since the last trim: (open, holding buffers).
    let mut peak = (0usize, 0usize);
    let mut last_trim = Instant::now();
    loop {
        tick.tick().await;
        let parked = usize::try_from(state.metrics.http_parked.get()).unwrap_or(0);
        let open = all.saturating_sub(state.conn_limit.available_permits());
        let holding = open.saturating_sub(parked);
        peak = (peak.0.max(open), peak.1.max(holding));
        if (open + 64 <= peak.0 || holding + 64 <= peak.1) && last_trim.elapsed() >= MIN_INTERVAL {
            trim_heap();
            peak = (open, holding);
            last_trim = Instant::now();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory of the allocator's arenas; it takes no
    // pointer and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// Completes once MeshConfig's mTLS mode is strict (at once if it already is).
async fn strict_enabled(state: &State) {
    let mut changes = state.discovery.subscribe();
    loop {
        if state.discovery.current().mesh.mtls_mode == plexus_core::resource::MtlsMode::Strict {
            return;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Terminates mesh mutual TLS on the inbound listener: the client certificate is required and
/// verified, its SPIFFE ID becomes the requests' source identity, and the negotiated ALPN says
/// what runs inside (HTTP or an opaque stream).
async fn serve_mesh_tls(
    state: Arc<State>,
    stream: TcpStream,
    buf: BytesMut,
    peer: SocketAddr,
    app_port: Option<u16>,
    watcher: watch::Receiver<bool>,
) {
    let Some(config) = state.mesh_tls.clone() else {
        tracing::debug!(%peer, "mesh TLS from a peer, but this proxy has no identity; closing");
        return;
    };
    let io = PrefixedIo::new(buf.freeze(), stream);
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(io);
    let tls = match tokio::time::timeout(state.settings.limits.header_read_timeout, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "mesh TLS handshake refused");
            return;
        }
        Err(_) => return,
    };
    let (_, session) = tls.get_ref();
    let peer_identity = session.peer_certificates().and_then(|c| c.first()).and_then(crate::tls::spiffe_id_of);
    if session.alpn_protocol() == Some(crate::tls::ALPN_TCP) {
        if state.settings.mode == crate::settings::Mode::Egress {
            tracing::debug!(%peer, "an egress gateway carries HTTP requests only; closing an opaque stream");
            return;
        }
        let mut peers = PeerLabels::default();
        state.fill_destination(&mut peers);
        if let Some(id) = &peer_identity {
            peers.source_principal = id.as_str().into();
        }
        // The caller's workload and Service, as its sidecar states them over this verified
        // stream (the principal above is what mTLS proves).
        let mut tls = tls;
        match crate::transport::source::read(&mut tls, state.settings.limits.header_read_timeout).await {
            Ok(Some((workload, service))) => {
                peers.source_workload = workload.as_str().into();
                peers.source_service = service.as_str().into();
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(%peer, error = %e, "mesh opaque stream without a source header; closing");
                return;
            }
        }
        let Some(port) = app_port else { return };
        if let Err(e) = inbound::authorize_stream(&state, port, peer_identity.as_deref()) {
            tracing::debug!(%peer, error = %e, "opaque stream refused");
            // Closed once the peer speaks (or gives up), not at once: a peer sidecar that
            // dialled early for server-first detection would take an immediate close for the
            // server speaking first, and so lose a client that is about to send HTTP.
            let mut first = [0u8; 1];
            let _ = tokio::time::timeout(state.settings.limits.header_read_timeout, tls.read(&mut first)).await;
            return;
        }
        let dest = TcpDest::Addr(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        let up = dial(&state, &dest, peers).await;
        forward_opaque_io(&state, "inbound", tls, &[], up, "mutual_tls").await;
        return;
    }
    // `plexus.http1` is HTTP/1 (upgrades); under `plexus.h2` sidecars speak HTTP/2, but a client
    // that is not a sidecar may speak HTTP/1.1 there: detected.
    let http1 = session.alpn_protocol() == Some(crate::tls::ALPN_HTTP1);
    let conn = Arc::new(InboundConn::new(peer, app_port, peer_identity));
    let handler_state = state.clone();
    let handle = move |req| inbound::handle(handler_state.clone(), conn.clone(), req);
    if http1 {
        state.http.serve_known(Known::Http1, tls, watcher, handle).await;
    } else {
        state.http.serve(tls, watcher, handle).await;
    }
}

/// The protocol detection found, as the HTTP server takes it.
fn known_http(protocol: &Protocol) -> Known {
    if matches!(protocol, Protocol::Http2) { Known::Http2 } else { Known::Http1 }
}
