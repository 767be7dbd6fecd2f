//! Prometheus metrics exactly as SPEC §5 names them.
//!
//! prometheus-client appends `_total` to counters itself, so counters are registered without
//! it (`plexus_requests` is exposed as `plexus_requests_total`); a test checks the exposed
//! names. Each proxy owns its registry, so many proxies can live in one process (tests).
//!
//! Per-request and per-stream series are reached through [`Metrics::request`] and
//! [`Metrics::tcp`], which remember when each label set was last used; a sweep removes series
//! idle for 10 minutes (SPEC §5), so label cardinality stays bounded by recent traffic.
//! Within those 10 minutes it is bounded too: past [`MAX_REQUEST_SERIES`] label sets (say, a
//! flood of distinct client identities) a new label set has its source labels replaced by
//! [`OVERFLOW`], so totals stay exact while memory stays flat.

use foldhash::HashMap;
use std::hash::Hash;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Buckets of `plexus_request_duration_seconds`, 0.5 ms … 30 s.
pub const DURATION_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0];

/// The value of a label nobody could fill in.
pub const UNKNOWN: &str = "unknown";

/// A label value. Label sets are built for every request and cloned into metrics, telemetry
/// and tap: a shared string makes each clone a reference count instead of a copy.
pub type Label = Arc<str>;

static UNKNOWN_LABEL: LazyLock<Label> = LazyLock::new(|| Label::from(UNKNOWN));
static OVERFLOW_LABEL: LazyLock<Label> = LazyLock::new(|| Label::from(OVERFLOW));

static DEFAULT_ROUTE_LABEL: LazyLock<Label> = LazyLock::new(|| Label::from("default"));

/// The route label of requests no route matched (shared, no allocation).
pub fn default_route() -> Label {
    DEFAULT_ROUTE_LABEL.clone()
}

/// [`UNKNOWN`] as a label (shared, no allocation).
pub fn unknown() -> Label {
    UNKNOWN_LABEL.clone()
}

/// Who sent or received traffic, as labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub source_workload: Label,
    pub source_service: Label,
    pub source_principal: Label,
    pub destination_service: Label,
    pub destination_workload: Label,
    pub destination_version: Label,
    pub destination_principal: Label,
}

impl PeerLabels {
    /// These labels with the source's replaced by [`OVERFLOW`].
    fn overflowed(&self) -> PeerLabels {
        let o = || OVERFLOW_LABEL.clone();
        PeerLabels { source_workload: o(), source_service: o(), source_principal: o(), ..self.clone() }
    }
}

impl Default for PeerLabels {
    fn default() -> Self {
        let u = unknown;
        PeerLabels {
            source_workload: u(),
            source_service: u(),
            source_principal: u(),
            destination_service: u(),
            destination_workload: u(),
            destination_version: u(),
            destination_principal: u(),
        }
    }
}

/// Labels of the per-request series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
///
/// Fields from a fixed vocabulary are static strings and the status a number: building a
/// label set per request allocates nothing but the gRPC status of gRPC requests.
pub struct RequestLabels {
    pub direction: &'static str,
    #[prometheus(flatten)]
    pub peers: PeerLabels,
    pub route: Label,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// Labels of the per-connection series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: &'static str,
    #[prometheus(flatten)]
    pub peers: PeerLabels,
    pub connection_security_policy: &'static str,
}

/// Labels of the per-service resilience counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceRouteLabels {
    pub destination_service: String,
    pub route: String,
}

/// Labels of the per-policy counters (`plexus_rate_limited_total`, `plexus_authz_denied_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServicePolicyLabels {
    pub destination_service: String,
    /// `namespace/name` of the policy.
    pub policy: String,
}

/// Labels of `plexus_egress_denied_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressLabels {
    /// `host:port` as the client named it (or the address it connected to).
    pub destination: String,
}

/// Destinations counted in `plexus_egress_denied_total` before new ones are counted as
/// [`OVERFLOW`] (a client probing many hosts cannot grow the registry without bound).
pub const MAX_EGRESS_SERIES: usize = 1024;

/// Labels of `plexus_balancer_endpoints`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointStateLabels {
    pub destination_service: String,
    pub state: String,
}

/// Request label sets kept per proxy before new ones are folded into [`OVERFLOW`] sources.
pub const MAX_REQUEST_SERIES: usize = 4096;

/// TCP label sets kept per proxy, likewise.
pub const MAX_TCP_SERIES: usize = 1024;

/// The source labels of requests counted past the series limit.
pub const OVERFLOW: &str = "overflow";

/// How long a series may go unused before it is removed.
pub const SERIES_IDLE_EXPIRY: Duration = Duration::from_secs(600);

/// Handles on the series of one request label set.
#[derive(Clone)]
pub struct RequestSeries {
    pub requests: Counter,
    pub duration: Histogram,
    pub request_bytes: Counter,
    pub response_bytes: Counter,
}

/// Handles on the series of one TCP label set.
#[derive(Clone)]
pub struct TcpSeries {
    pub opened: Counter,
    pub closed: Counter,
    pub sent: Counter,
    pub received: Counter,
}

/// Label sets remembered beside the map (the last ones looked up there): a request whose label
/// set is one of them (a keep-alive connection's requests mostly share one) is compared with them
/// instead of hashed, and no label set is built for it.
const RECENT: usize = 4;

/// A label set as a caller holds it: compared with the label sets in use without building one
/// ([`RequestKey`]), or a label set itself.
pub trait LabelKey<L> {
    /// Whether `labels` are these.
    fn matches(&self, labels: &L) -> bool;
    /// These as an owned label set (only when the recent ones do not have them).
    fn to_labels(&self) -> L;
}

impl<L: Clone + Eq> LabelKey<L> for L {
    fn matches(&self, labels: &L) -> bool {
        self == labels
    }

    fn to_labels(&self) -> L {
        self.clone()
    }
}

/// The same label value: the same shared string (the common case, one comparison), or equal text.
fn same(a: &Label, b: &Label) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// The same text; `&'static str` labels from one vocabulary are usually the same pointer.
fn same_str(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a == b
}

impl PeerLabels {
    fn same(&self, o: &PeerLabels) -> bool {
        same(&self.destination_workload, &o.destination_workload)
            && same(&self.source_workload, &o.source_workload)
            && same(&self.destination_service, &o.destination_service)
            && same(&self.source_service, &o.source_service)
            && same(&self.source_principal, &o.source_principal)
            && same(&self.destination_version, &o.destination_version)
            && same(&self.destination_principal, &o.destination_principal)
    }
}

/// A request's label set by reference: what [`Metrics::request`] is given per request (the
/// observation's labels are not cloned into a [`RequestLabels`] unless the set is new).
pub struct RequestKey<'a> {
    pub direction: &'static str,
    pub peers: &'a PeerLabels,
    pub route: &'a Label,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: &'a str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

impl LabelKey<RequestLabels> for RequestKey<'_> {
    fn matches(&self, l: &RequestLabels) -> bool {
        self.response_code == l.response_code
            && same_str(self.response_flags, l.response_flags)
            && same_str(self.direction, l.direction)
            && same(self.route, &l.route)
            && self.peers.same(&l.peers)
            && same_str(self.request_protocol, l.request_protocol)
            && same_str(self.connection_security_policy, l.connection_security_policy)
            && self.grpc_response_status == l.grpc_response_status
    }

    fn to_labels(&self) -> RequestLabels {
        RequestLabels {
            direction: self.direction,
            peers: self.peers.clone(),
            route: self.route.clone(),
            request_protocol: self.request_protocol,
            response_code: self.response_code,
            grpc_response_status: self.grpc_response_status.to_string(),
            response_flags: self.response_flags,
            connection_security_policy: self.connection_security_policy,
        }
    }
}

/// Label sets in use, with when each was last used.
struct LastUse<L, H> {
    used: Mutex<Used<L, H>>,
}

struct Used<L, H> {
    map: HashMap<L, (H, Instant)>,
    /// Up to [`RECENT`] entries of `map` (never an overflowed one), with their own last use:
    /// written back into `map` before a sweep reads it.
    recent: Vec<(L, H, Instant)>,
    /// The slot of `recent` a new entry replaces once it is full.
    next: usize,
}

impl<L: Clone + Eq + Hash, H: Clone> LastUse<L, H> {
    fn new() -> Self {
        LastUse { used: Mutex::new(Used { map: HashMap::default(), recent: Vec::new(), next: 0 }) }
    }

    /// `count` with the handles of `key`'s label set, created with `create` on first use; past
    /// `max` label sets a new one is replaced by `overflow(labels)` (which is created even past
    /// `max`: one more). `now` is the time of this use.
    fn with<R>(
        &self,
        key: &impl LabelKey<L>,
        now: Instant,
        max: usize,
        overflow: impl FnOnce(&L) -> L,
        create: impl Fn(&L) -> H,
        count: impl FnOnce(&H) -> R,
    ) -> R {
        let Ok(mut used) = self.used.lock() else { return count(&create(&key.to_labels())) };
        let used = &mut *used;
        if let Some((_, h, seen)) = used.recent.iter_mut().find(|(l, _, _)| key.matches(l)) {
            *seen = now;
            return count(h);
        }
        let labels = key.to_labels();
        if let Some((h, seen)) = used.map.get_mut(&labels) {
            *seen = now;
            let h = h.clone();
            used.remember(labels, h.clone(), now);
            return count(&h);
        }
        if used.map.len() >= max {
            let (h, seen) = used.map.entry(overflow(&labels)).or_insert_with_key(|l| (create(l), now));
            *seen = now;
            return count(h);
        }
        let h = create(&labels);
        used.map.insert(labels.clone(), (h.clone(), now));
        used.remember(labels, h.clone(), now);
        count(&h)
    }

    fn len(&self) -> usize {
        self.used.lock().map(|u| u.map.len()).unwrap_or(0)
    }

    /// Forgets label sets idle for `max_idle` and returns them.
    fn expire(&self, max_idle: Duration) -> Vec<L> {
        let Ok(mut used) = self.used.lock() else { return Vec::new() };
        let used = &mut *used;
        for (l, _, seen) in used.recent.drain(..) {
            if let Some((_, last)) = used.map.get_mut(&l) {
                *last = (*last).max(seen);
            }
        }
        used.next = 0;
        let stale: Vec<L> =
            used.map.iter().filter(|(_, (_, seen))| seen.elapsed() >= max_idle).map(|(l, _)| l.clone()).collect();
        for l in &stale {
            used.map.remove(l);
        }
        stale
    }
}

impl<L: Eq + Hash, H> Used<L, H> {
    /// Puts `labels` among the recent ones, replacing the oldest remembered once full (its
    /// last use written back into the map).
    fn remember(&mut self, labels: L, h: H, now: Instant) {
        if self.recent.len() < RECENT {
            self.recent.push((labels, h, now));
            return;
        }
        let (old, _, seen) = std::mem::replace(&mut self.recent[self.next], (labels, h, now));
        self.next = (self.next + 1) % RECENT;
        if let Some((_, last)) = self.map.get_mut(&old) {
            *last = (*last).max(seen);
        }
    }
}

/// Counts one more for `destination` in a per-destination family, past [`MAX_EGRESS_SERIES`]
/// destinations as [`OVERFLOW`].
fn count_destination(
    series: &LastUse<EgressLabels, Counter>,
    family: &Family<EgressLabels, Counter>,
    destination: &str,
) {
    let labels = EgressLabels { destination: destination.to_string() };
    let overflow = |_: &EgressLabels| EgressLabels { destination: OVERFLOW.into() };
    let create = |l: &EgressLabels| family.get_or_create_owned(l);
    series.with(&labels, Instant::now(), MAX_EGRESS_SERIES, overflow, create, Counter::inc);
}

/// Every metric a proxy exports.
pub struct Metrics {
    registry: Registry,
    request_series: LastUse<RequestLabels, RequestSeries>,
    tcp_series: LastUse<TcpLabels, TcpSeries>,
    egress_series: LastUse<EgressLabels, Counter>,
    /// Destinations refused by `outboundTrafficPolicy: registryOnly`.
    pub egress_denied: Family<EgressLabels, Counter>,
    origination_series: LastUse<EgressLabels, Counter>,
    /// Connections to ExternalServices refused because the TLS this proxy originated to them
    /// failed (certificate not verified, handshake), on every path (HTTP and streams).
    pub origination_failed: Family<EgressLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram>,
    pub request_bytes: Family<RequestLabels, Counter>,
    pub response_bytes: Family<RequestLabels, Counter>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub tcp_received: Family<TcpLabels, Counter>,
    pub retries: Family<ServiceRouteLabels, Counter>,
    pub outlier_ejections: Family<ServiceRouteLabels, Counter>,
    pub rate_limited: Family<ServicePolicyLabels, Counter>,
    /// Requests denied by authorization at this (destination) sidecar.
    pub authz_denied: Family<ServicePolicyLabels, Counter>,
    pub balancer_endpoints: Family<EndpointStateLabels, Gauge>,
    pub config_version: Gauge,
    /// notAfter of the workload certificate (Unix seconds); absent without one.
    pub identity_cert_expiration: Gauge,
    pub control_plane_connected: Gauge,
    /// HTTP/1 keep-alive connections parked now (idle, their buffers given back).
    pub http_parked: Gauge,
    /// Trace spans by outcome (`exported`, `dropped`, `failed`), counted by the exporter and
    /// brought here at scrape time.
    pub trace_spans: Family<OutcomeLabels, Counter>,
}

/// The outcome label of [`Metrics::trace_spans`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let request_duration =
            Family::<RequestLabels, Histogram>::new_with_constructor(|| Histogram::new(DURATION_BUCKETS));
        let m = Metrics {
            requests: Family::default(),
            request_duration,
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            retries: Family::default(),
            outlier_ejections: Family::default(),
            rate_limited: Family::default(),
            authz_denied: Family::default(),
            balancer_endpoints: Family::default(),
            config_version: Gauge::default(),
            identity_cert_expiration: Gauge::default(),
            control_plane_connected: Gauge::default(),
            http_parked: Gauge::default(),
            trace_spans: Family::default(),
            registry: Registry::default(),
            request_series: LastUse::new(),
            tcp_series: LastUse::new(),
            egress_series: LastUse::new(),
            egress_denied: Family::default(),
            origination_series: LastUse::new(),
            origination_failed: Family::default(),
        };
        registry.register("plexus_requests", "Requests handled, by direction and peers", m.requests.clone());
        registry.register(
            "plexus_request_duration_seconds",
            "Request duration until the response ends",
            m.request_duration.clone(),
        );
        registry.register("plexus_request_bytes", "Request body bytes", m.request_bytes.clone());
        registry.register("plexus_response_bytes", "Response body bytes", m.response_bytes.clone());
        registry.register("plexus_tcp_connections_opened", "TCP streams opened", m.tcp_opened.clone());
        registry.register("plexus_tcp_connections_closed", "TCP streams closed", m.tcp_closed.clone());
        registry.register("plexus_tcp_sent_bytes", "Bytes sent to the destination on TCP streams", m.tcp_sent.clone());
        registry.register(
            "plexus_tcp_received_bytes",
            "Bytes received from the destination on TCP streams",
            m.tcp_received.clone(),
        );
        registry.register("plexus_retries", "Requests retried", m.retries.clone());
        registry.register(
            "plexus_outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.outlier_ejections.clone(),
        );
        registry.register(
            "plexus_rate_limited",
            "Requests refused by a rate limit at the destination",
            m.rate_limited.clone(),
        );
        registry.register(
            "plexus_authz_denied",
            "Requests denied by authorization at the destination, by the policy that denied them",
            m.authz_denied.clone(),
        );
        registry.register(
            "plexus_egress_denied",
            "Connections and requests refused by outboundTrafficPolicy registryOnly, by destination",
            m.egress_denied.clone(),
        );
        registry.register(
            "plexus_egress_origination_failed",
            "Connections to ExternalServices whose originated TLS failed (certificate not verified, handshake), by destination",
            m.origination_failed.clone(),
        );
        registry.register(
            "plexus_balancer_endpoints",
            "Endpoints known to the balancer, by state",
            m.balancer_endpoints.clone(),
        );
        registry.register(
            "plexus_identity_cert_expiration_timestamp_seconds",
            "When the workload certificate expires (Unix seconds)",
            m.identity_cert_expiration.clone(),
        );
        registry.register(
            "plexus_config_version",
            "Generation of the configuration in force",
            m.config_version.clone(),
        );
        registry.register(
            "plexus_control_plane_connected",
            "1 while a control plane feeds this proxy",
            m.control_plane_connected.clone(),
        );
        registry.register(
            "plexus_http_connections_parked",
            "HTTP/1 keep-alive connections idle with their buffers given back, until their next request",
            m.http_parked.clone(),
        );
        registry.register(
            "plexus_trace_spans",
            "Trace spans by outcome: exported (accepted by the collector), dropped (queue full), failed",
            m.trace_spans.clone(),
        );
        Metrics { registry, ..m }
    }

    /// `count` with the series of a request label set (created on first use; see
    /// [`MAX_REQUEST_SERIES`]), used at `now` (for their expiry).
    pub fn request<R>(
        &self,
        labels: &impl LabelKey<RequestLabels>,
        now: Instant,
        count: impl FnOnce(&RequestSeries) -> R,
    ) -> R {
        let overflow = |l: &RequestLabels| RequestLabels { peers: l.peers.overflowed(), ..l.clone() };
        let create = |l: &RequestLabels| RequestSeries {
            requests: self.requests.get_or_create_owned(l),
            duration: self.request_duration.get_or_create_owned(l),
            request_bytes: self.request_bytes.get_or_create_owned(l),
            response_bytes: self.response_bytes.get_or_create_owned(l),
        };
        self.request_series.with(labels, now, MAX_REQUEST_SERIES, overflow, create, count)
    }

    /// The series of a TCP label set (created on first use; see [`MAX_TCP_SERIES`]).
    pub fn tcp(&self, labels: &TcpLabels) -> TcpSeries {
        let overflow = |l: &TcpLabels| TcpLabels { peers: l.peers.overflowed(), ..l.clone() };
        let create = |l: &TcpLabels| TcpSeries {
            opened: self.tcp_opened.get_or_create_owned(l),
            closed: self.tcp_closed.get_or_create_owned(l),
            sent: self.tcp_sent.get_or_create_owned(l),
            received: self.tcp_received.get_or_create_owned(l),
        };
        self.tcp_series.with(labels, Instant::now(), MAX_TCP_SERIES, overflow, create, TcpSeries::clone)
    }

    /// Counts a destination refused by `registryOnly` (see [`MAX_EGRESS_SERIES`]).
    pub fn egress_denied(&self, destination: &str) {
        count_destination(&self.egress_series, &self.egress_denied, destination);
    }

    /// Counts a connection whose originated TLS failed (bounded like [`Metrics::egress_denied`]).
    pub fn origination_failed(&self, destination: &str) {
        count_destination(&self.origination_series, &self.origination_failed, destination);
    }

    /// Brings the span exporter's counters up to date (`crate::trace::export::stats`).
    pub fn update_trace_spans(&self, stats: crate::trace::export::ExportStats) {
        for (outcome, total) in [("exported", stats.exported), ("dropped", stats.dropped), ("failed", stats.failed)] {
            let c = self.trace_spans.get_or_create(&OutcomeLabels { outcome });
            c.inc_by(total.saturating_sub(c.get()));
        }
    }

    /// Request and TCP label sets in use.
    pub fn series(&self) -> usize {
        self.request_series.len() + self.tcp_series.len()
    }

    /// Removes request and TCP series unused for `max_idle`; returns how many label sets went.
    pub fn expire_idle(&self, max_idle: Duration) -> usize {
        let requests = self.request_series.expire(max_idle);
        for l in &requests {
            self.requests.remove(l);
            self.request_duration.remove(l);
            self.request_bytes.remove(l);
            self.response_bytes.remove(l);
        }
        let streams = self.tcp_series.expire(max_idle);
        for l in &streams {
            self.tcp_opened.remove(l);
            self.tcp_closed.remove(l);
            self.tcp_sent.remove(l);
            self.tcp_received.remove(l);
        }
        let refused = self.egress_series.expire(max_idle);
        for l in &refused {
            self.egress_denied.remove(l);
        }
        let failed = self.origination_series.expire(max_idle);
        for l in &failed {
            self.origination_failed.remove(l);
        }
        requests.len() + streams.len() + refused.len() + failed.len()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// The classic Prometheus text format (0.0.4), for scrapers that do not ask for
    /// OpenMetrics: see [`to_classic`].
    pub fn encode_classic(&self) -> String {
        to_classic(&self.encode())
    }
}

/// Rewrites an OpenMetrics exposition in the classic Prometheus text format: a counter family
/// is named with its `_total` suffix in `# HELP`/`# TYPE` (OpenMetrics names the family
/// without it), and `# UNIT` and `# EOF` lines, which the classic format does not have, go.
/// Samples are the same in both formats.
pub fn to_classic(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        open_metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_spec_names() {
        let m = Metrics::new();
        let labels = RequestLabels {
            direction: "outbound",
            peers: PeerLabels::default(),
            route: "default/r".into(),
            request_protocol: "http",
            response_code: 200,
            grpc_response_status: String::new(),
            response_flags: "-",
            connection_security_policy: "none",
        };
        m.request(&labels, Instant::now(), |series| {
            series.requests.inc();
            series.duration.observe(0.002);
        });
        m.tcp(&TcpLabels { direction: "inbound", peers: PeerLabels::default(), connection_security_policy: "none" })
            .opened
            .inc();
        let text = m.encode();
        for name in [
            "plexus_requests_total{direction=\"outbound\",source_workload=\"unknown\"",
            "plexus_request_duration_seconds_bucket{",
            "le=\"0.0005\"",
            "le=\"30.0\"",
            "plexus_tcp_connections_opened_total{",
            "# TYPE plexus_request_bytes counter",
            "plexus_config_version ",
        ] {
            assert!(text.contains(name), "missing {name} in:\n{text}");
        }
        assert_eq!(m.expire_idle(Duration::from_secs(60)), 0, "fresh series stay");
        assert_eq!(m.expire_idle(Duration::ZERO), 2, "idle series go");
        assert!(!m.encode().contains("plexus_requests_total{"), "expired series are no longer exposed");
    }
}

#[cfg(test)]
mod cardinality {
    use super::*;

    fn from(principal: &str) -> RequestLabels {
        RequestLabels {
            direction: "inbound",
            peers: PeerLabels {
                source_principal: principal.into(),
                destination_service: "reviews".into(),
                ..PeerLabels::default()
            },
            route: "default".into(),
            request_protocol: "http",
            response_code: 200,
            grpc_response_status: String::new(),
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        }
    }

    /// 10,000 distinct client identities: the series stop growing at the limit, the exposition
    /// stays the same size after it, and every request is still counted.
    #[test]
    fn ten_thousand_client_identities_stay_bounded() {
        let m = Metrics::new();
        let mut size_at_limit = 0;
        for i in 0..10_000 {
            m.request(&from(&format!("spiffe://plexus.local/ns/default/sa/client-{i}")), Instant::now(), |series| {
                series.requests.inc();
                series.duration.observe(0.001);
            });
            if i + 1 == MAX_REQUEST_SERIES + 1 {
                size_at_limit = m.encode().len();
            }
        }
        assert_eq!(m.series(), MAX_REQUEST_SERIES + 1, "the limit plus the overflow series");
        let text = m.encode();
        // Past the limit only the overflow series' numbers grow (a few digits each).
        assert!(text.len() < size_at_limit + 512, "{} bytes at the limit, {} after", size_at_limit, text.len());
        let total: f64 = text
            .lines()
            .filter(|l| l.starts_with("plexus_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(total, 10_000.0);
        let overflow = text
            .lines()
            .find(|l| l.starts_with("plexus_requests_total{") && l.contains("source_principal=\"overflow\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        assert_eq!(overflow, Some((10_000 - MAX_REQUEST_SERIES) as f64));
        // Once idle, they all go.
        assert_eq!(m.expire_idle(Duration::ZERO), MAX_REQUEST_SERIES + 1);
        assert!(!m.encode().contains("plexus_requests_total{"));
    }
}

#[cfg(test)]
mod recent {
    use super::*;

    fn route(i: usize) -> RequestLabels {
        RequestLabels {
            direction: "outbound",
            peers: PeerLabels::default(),
            route: format!("default/r{i}").into(),
            request_protocol: "http",
            response_code: 200,
            grpc_response_status: String::new(),
            response_flags: "-",
            connection_security_policy: "none",
        }
    }

    fn key(l: &RequestLabels) -> RequestKey<'_> {
        RequestKey {
            direction: l.direction,
            peers: &l.peers,
            route: &l.route,
            request_protocol: l.request_protocol,
            response_code: l.response_code,
            grpc_response_status: &l.grpc_response_status,
            response_flags: l.response_flags,
            connection_security_policy: l.connection_security_policy,
        }
    }

    /// A label set found among the recent ones, or found in the map and remembered, counts as
    /// used for the 10-minute expiry like one found by hashing; a remembered one replaced by
    /// another keeps its last use.
    #[test]
    fn series_used_through_the_recent_ones_keep_their_last_use() {
        let m = Metrics::new();
        let now = Instant::now();
        let old = now.checked_sub(Duration::from_secs(10)).expect("the clock is past 10 s");
        let sets: Vec<RequestLabels> = (0..6).map(route).collect();
        for l in &sets {
            m.request(&key(l), old, |s| s.requests.inc());
        }
        // Recent now: 4, 5, 2, 3. Used again: 0 and 2 (from the map, remembered in the slots
        // of 2 and 3), 4 (recent), each one more request; 1, 3, 5 stay idle.
        for i in [0, 2, 4] {
            m.request(&key(&sets[i]), now, |s| s.requests.inc());
        }
        // The owned label set finds the same series.
        m.request(&sets[4], now, |s| assert_eq!(s.requests.get(), 2));
        assert_eq!(m.series(), 6);
        assert_eq!(m.expire_idle(Duration::from_secs(5)), 3, "the idle ones go");
        let text = m.encode();
        for i in 0..6 {
            let line = format!("route=\"default/r{i}\"");
            let count = text.lines().filter(|l| l.starts_with("plexus_requests_total{") && l.contains(&line)).count();
            assert_eq!(count, usize::from(i % 2 == 0), "route {i}:\n{text}");
        }
        assert!(text.contains("route=\"default/r2\",request_protocol=\"http\",response_code=\"200\",grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"none\"} 2"), "{text}");
    }
}

#[cfg(test)]
mod classic {
    use super::*;

    #[test]
    fn counters_are_named_with_total_and_openmetrics_lines_go() {
        let m = Metrics::new();
        m.config_version.set(3);
        let route = ServiceRouteLabels { destination_service: "reviews".into(), route: "default".into() };
        m.retries.get_or_create(&route).inc();
        let classic = m.encode_classic();
        assert!(classic.contains("# TYPE plexus_retries_total counter\nplexus_retries_total{"), "{classic}");
        assert!(classic.contains("# HELP plexus_retries_total Requests retried"), "{classic}");
        assert!(classic.contains("# TYPE plexus_config_version gauge\nplexus_config_version 3\n"), "{classic}");
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"), "{classic}");
        assert!(m.encode().ends_with("# EOF\n"));
    }
}
