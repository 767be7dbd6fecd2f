//! The live service graph (`GET /api/v1/graph`, the dashboard's topology page), built from
//! the traffic summaries proxies report ([`crate::traffic::TrafficWindow`]).
//!
//! Nodes are services cut by version (or whole services, [`Grouping::Service`]), the ingress
//! and egress gateways, destinations outside the mesh (`external`) and callers nobody could
//! identify (`unknown`). Every connected proxy's node is listed, traffic or not, so a graph
//! shows the whole mesh from the first request.
//!
//! Edges are measured by the caller's sidecar (its `outbound` summaries): requests/s, success
//! rate, latency quantiles and mTLS share as the caller saw them, network and retries
//! included, as Linkerd's and Kiali's edges are. Inbound summaries only add what no caller
//! reported: plaintext requests from outside the mesh, as `unknown → destination` edges.
//!
//! Summaries name workloads, not versions or namespaces, so nodes are placed with a
//! [`Directory`] built from the connected proxies and the Services in the store, and, for a
//! workload whose proxy has gone, with what the summaries themselves say about it (the
//! version its callers saw, the service its own sidecar reported).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use plexus_api::discovery::TrafficSummary;
use serde::Serialize;

use crate::traffic::Totals;

/// The id (and service name) of the node standing for callers or destinations nobody could
/// identify.
pub const UNKNOWN: &str = "unknown";

/// What a node stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A mesh service (one version of it, unless grouped by service).
    Service,
    /// An ingress gateway.
    Ingress,
    /// An egress gateway.
    Egress,
    /// A destination outside the mesh (no Service, no sidecar).
    External,
    /// Callers (or destinations) nobody could identify: plaintext clients from outside the mesh.
    Unknown,
}

impl NodeKind {
    /// The kind of a proxy started in `mode` (`sidecar`, `ingress`, `egress`).
    pub fn of_mode(mode: &str) -> NodeKind {
        match mode {
            "ingress" => NodeKind::Ingress,
            "egress" => NodeKind::Egress,
            _ => NodeKind::Service,
        }
    }
}

/// How finely nodes are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// One node per service version (the default).
    Version,
    /// One node per service; versions merged.
    Service,
}

impl Grouping {
    /// Parses the `group` query parameter.
    pub fn parse(s: &str) -> Option<Grouping> {
        match s {
            "version" | "versions" => Some(Grouping::Version),
            "service" | "services" => Some(Grouping::Service),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Grouping::Version => "version",
            Grouping::Service => "service",
        }
    }
}

/// A node of the graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// `NAMESPACE/SERVICE/VERSION`, `NAMESPACE/SERVICE` without a version (or grouped by
    /// service), `SERVICE` for an external destination, `unknown` for unidentified peers.
    pub id: String,
    pub service: String,
    /// `null` when unknown or grouped by service.
    pub version: Option<String>,
    /// `null` for external and unknown nodes.
    pub namespace: Option<String>,
    pub kind: NodeKind,
}

/// Traffic from one node to another over the window, as the caller measured it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Edge {
    /// The calling node's id.
    pub source: String,
    /// The called node's id.
    pub target: String,
    /// Requests during the window.
    pub requests: u64,
    pub requests_per_second: f64,
    /// Share of requests answered neither 5xx nor, for gRPC, a non-OK status (0..1).
    pub success_rate: f64,
    /// Latency quantiles in milliseconds, within 12% (the histogram's resolution).
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Share of requests over mutual TLS (0..1).
    pub mtls_share: f64,
}

/// The graph as `/api/v1/graph` answers it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Graph {
    /// The window asked for (`1m`).
    pub window: String,
    /// `version` or `service`.
    pub group: &'static str,
    /// Sorted by id.
    pub nodes: Vec<Node>,
    /// Sorted by source, then target.
    pub edges: Vec<Edge>,
}

/// Where a workload belongs, as its proxy told the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub service: String,
    pub version: Option<String>,
    pub namespace: String,
    pub kind: NodeKind,
}

/// What the control plane knows about workloads and Services, to place summaries' names.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    workloads: BTreeMap<String, Placement>,
    /// Service name -> namespaces that define it.
    services: HashMap<String, BTreeSet<String>>,
}

impl Directory {
    /// Records a workload (a connected proxy). Nameless workloads are ignored.
    pub fn add_workload(&mut self, workload: &str, placement: Placement) {
        if known(workload).is_none() || known(&placement.service).is_none() {
            return;
        }
        self.services.entry(placement.service.clone()).or_default().insert(placement.namespace.clone());
        self.workloads.insert(workload.to_string(), placement);
    }

    /// Records a Service resource.
    pub fn add_service(&mut self, name: &str, namespace: &str) {
        self.services.entry(name.to_string()).or_default().insert(namespace.to_string());
    }

    /// The namespace of a service named `service`: the caller's own when it has one of that
    /// name, else the only one that does (`default` when several do); `None` when the mesh has
    /// no such service.
    fn namespace_of(&self, service: &str, near: Option<&str>) -> Option<String> {
        let namespaces = self.services.get(service)?;
        if let Some(n) = near.filter(|n| namespaces.contains(*n)) {
            return Some(n.to_string());
        }
        if namespaces.len() == 1 || namespaces.contains("default") {
            return namespaces.iter().find(|n| *n == "default").or(namespaces.iter().next()).cloned();
        }
        None
    }
}

/// A label value, or `None` for the empty string and `unknown`.
fn known(s: &str) -> Option<&str> {
    (!s.is_empty() && s != UNKNOWN).then_some(s)
}

/// A node before it gets its id; the key of the graph's maps.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct NodeKey {
    namespace: Option<String>,
    service: String,
    version: Option<String>,
    kind: NodeKind,
}

impl NodeKey {
    fn unknown() -> NodeKey {
        NodeKey { namespace: None, service: UNKNOWN.into(), version: None, kind: NodeKind::Unknown }
    }

    fn grouped(mut self, grouping: Grouping) -> NodeKey {
        if grouping == Grouping::Service {
            self.version = None;
        }
        self
    }

    fn id(&self) -> String {
        if self.kind == NodeKind::Unknown {
            return UNKNOWN.into();
        }
        let mut id = String::new();
        if let Some(ns) = &self.namespace {
            id.push_str(ns);
            id.push('/');
        }
        id.push_str(&self.service);
        if let Some(v) = &self.version {
            id.push('/');
            id.push_str(v);
        }
        id
    }

    fn node(&self) -> Node {
        Node {
            id: self.id(),
            service: self.service.clone(),
            version: self.version.clone(),
            namespace: self.namespace.clone(),
            kind: self.kind,
        }
    }
}

/// What the summaries say about workloads whose proxies the directory does not know.
#[derive(Default)]
struct Learned {
    /// Workload -> the service its own sidecar reports (inbound `destination_service`).
    own_service: HashMap<String, String>,
    /// Workload -> (service, version) its callers saw.
    seen_by_callers: HashMap<String, (String, Option<String>)>,
}

impl Learned {
    fn from(summaries: &[&TrafficSummary]) -> Learned {
        let mut l = Learned::default();
        for s in summaries {
            let (Some(w), Some(svc)) = (known(&s.destination_workload), known(&s.destination_service)) else {
                continue;
            };
            if s.direction == "inbound" {
                l.own_service.insert(w.to_string(), svc.to_string());
            } else {
                let version = known(&s.destination_version).map(str::to_string);
                let entry = l.seen_by_callers.entry(w.to_string()).or_insert_with(|| (svc.to_string(), None));
                if entry.1.is_none() {
                    entry.1 = version;
                }
            }
        }
        l
    }
}

/// Places summaries' names on nodes.
struct Placer<'a> {
    directory: &'a Directory,
    learned: Learned,
    grouping: Grouping,
}

impl Placer<'_> {
    /// The node of `workload` (falling back to `service`/`version` from the summary), or of
    /// `service` alone when the workload is unknown. `near` is the namespace of the other end.
    fn place(&self, workload: &str, service: &str, version: &str, near: Option<&str>) -> NodeKey {
        let key = self.place_ungrouped(workload, service, version, near);
        key.grouped(self.grouping)
    }

    fn place_ungrouped(&self, workload: &str, service: &str, version: &str, near: Option<&str>) -> NodeKey {
        if let Some(w) = known(workload) {
            if let Some(p) = self.directory.workloads.get(w) {
                return NodeKey {
                    namespace: Some(p.namespace.clone()),
                    service: p.service.clone(),
                    version: p.version.clone(),
                    kind: p.kind,
                };
            }
            let seen = self.learned.seen_by_callers.get(w);
            let service = self
                .learned
                .own_service
                .get(w)
                .map(String::as_str)
                .or(seen.map(|(s, _)| s.as_str()))
                .or(known(service));
            if let Some(service) = service {
                let version = seen.and_then(|(_, v)| v.clone()).or(known(version).map(str::to_string));
                // A named workload is a mesh endpoint, even when its Service is gone.
                return NodeKey {
                    namespace: self.directory.namespace_of(service, near),
                    service: service.to_string(),
                    version,
                    kind: NodeKind::Service,
                };
            }
        }
        let Some(service) = known(service) else { return NodeKey::unknown() };
        let namespace = self.directory.namespace_of(service, near);
        let kind = if self.directory.services.contains_key(service) { NodeKind::Service } else { NodeKind::External };
        NodeKey { namespace, service: service.to_string(), version: known(version).map(str::to_string), kind }
    }
}

/// Plaintext requests arriving at one workload from callers that did not report them.
#[derive(Default)]
struct Unclaimed {
    /// Inbound summaries with plaintext requests and no known source, summed.
    inbound: Totals,
    /// Their plaintext requests.
    plaintext_in: u64,
    /// Plaintext requests meshed callers reported sending to this workload.
    plaintext_out: u64,
    node: Option<NodeKey>,
}

/// Builds the graph from the summaries of a window covering `seconds`.
pub fn build(
    summaries: &[&TrafficSummary],
    seconds: f64,
    directory: &Directory,
    grouping: Grouping,
) -> (Vec<Node>, Vec<Edge>) {
    let placer = Placer { directory, learned: Learned::from(summaries), grouping };
    let mut edges: BTreeMap<(NodeKey, NodeKey), Totals> = BTreeMap::new();
    let mut unclaimed: BTreeMap<String, Unclaimed> = BTreeMap::new();
    for s in summaries {
        let plaintext = s.requests.saturating_sub(s.mtls);
        match s.direction.as_str() {
            "outbound" => {
                let source = placer.place(&s.source_workload, &s.source_service, "", None);
                let target = placer.place(
                    &s.destination_workload,
                    &s.destination_service,
                    &s.destination_version,
                    source.namespace.as_deref(),
                );
                edges.entry((source, target)).or_default().add(s);
                if let Some(w) = known(&s.destination_workload) {
                    unclaimed.entry(w.to_string()).or_default().plaintext_out += plaintext;
                }
            }
            "inbound" => {
                // A caller that identified itself reported the request itself (outbound); an
                // anonymous one over mTLS is a meshed sidecar, which did too.
                let anonymous = known(&s.source_workload).is_none() && known(&s.source_service).is_none();
                let Some(w) = known(&s.destination_workload).filter(|_| anonymous && plaintext > 0) else {
                    continue;
                };
                let u = unclaimed.entry(w.to_string()).or_default();
                u.inbound.add(s);
                u.plaintext_in += plaintext;
                if u.node.is_none() {
                    u.node = Some(placer.place(w, &s.destination_service, &s.destination_version, None));
                }
            }
            _ => {}
        }
    }
    for u in unclaimed.into_values() {
        let Some(target) = u.node else { continue };
        let requests = u.plaintext_in.saturating_sub(u.plaintext_out);
        if requests == 0 || u.inbound.requests == 0 {
            continue;
        }
        // Success is known per summary only, so the unclaimed share gets its summaries' rate.
        let successes = (u.inbound.success_rate() * requests as f64).round() as u64;
        let totals = Totals { requests, successes, mtls: 0, latency: u.inbound.latency };
        edges.entry((NodeKey::unknown(), target)).or_default().merge(&totals);
    }

    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for p in directory.workloads.values() {
        let key = NodeKey {
            namespace: Some(p.namespace.clone()),
            service: p.service.clone(),
            version: p.version.clone(),
            kind: p.kind,
        }
        .grouped(grouping);
        nodes.entry(key.id()).or_insert_with(|| key.node());
    }
    let seconds = seconds.max(f64::MIN_POSITIVE);
    let edges: Vec<Edge> = edges
        .into_iter()
        .map(|((source, target), t)| {
            for k in [&source, &target] {
                nodes.entry(k.id()).or_insert_with(|| k.node());
            }
            Edge {
                source: source.id(),
                target: target.id(),
                requests: t.requests,
                requests_per_second: t.requests as f64 / seconds,
                success_rate: t.success_rate(),
                p50_ms: t.quantile_ms(0.50),
                p95_ms: t.quantile_ms(0.95),
                p99_ms: t.quantile_ms(0.99),
                mtls_share: t.mtls_share(),
            }
        })
        .collect();
    (nodes.into_values().collect(), edges)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A summary of `requests` requests, `failures` of them failed, all over mTLS or none,
    /// every one taking `ms` milliseconds.
    fn summary(
        direction: &str,
        (source_workload, source_service): (&str, &str),
        (destination_workload, destination_service, destination_version): (&str, &str, &str),
        requests: u64,
        failures: u64,
        mtls: bool,
        ms: u64,
    ) -> TrafficSummary {
        TrafficSummary {
            direction: direction.into(),
            source_workload: source_workload.into(),
            source_service: source_service.into(),
            destination_service: destination_service.into(),
            destination_workload: destination_workload.into(),
            destination_version: destination_version.into(),
            route: "default".into(),
            requests,
            successes: requests - failures,
            mtls: if mtls { requests } else { 0 },
            latency: [(plexus_core::latency::bucket(ms * 1000), requests)].into_iter().collect(),
        }
    }

    fn placement(service: &str, version: &str, kind: NodeKind) -> Placement {
        Placement { service: service.into(), version: Some(version.into()), namespace: "default".into(), kind }
    }

    /// Bookinfo's proxies.
    fn bookinfo() -> Directory {
        let mut d = Directory::default();
        d.add_workload("ingress-gateway", placement("ingress-gateway", "v1", NodeKind::Ingress));
        d.add_workload("productpage-v1-a", placement("productpage", "v1", NodeKind::Service));
        d.add_workload("details-v1-a", placement("details", "v1", NodeKind::Service));
        for v in ["v1", "v2", "v3"] {
            d.add_workload(&format!("reviews-{v}-a"), placement("reviews", v, NodeKind::Service));
            d.add_service(&format!("reviews-{v}"), "default");
        }
        d.add_workload("ratings-v1-a", placement("ratings", "v1", NodeKind::Service));
        d
    }

    /// Bookinfo traffic as the sidecars report it: every hop once outbound (caller) and once
    /// inbound (destination, which does not know the caller's name).
    fn bookinfo_traffic() -> Vec<TrafficSummary> {
        let pp = ("productpage-v1-a", "productpage");
        let mut v = vec![
            summary(
                "outbound",
                ("ingress-gateway", "ingress-gateway"),
                ("productpage-v1-a", "productpage", "v1"),
                120,
                0,
                true,
                30,
            ),
            summary("outbound", pp, ("details-v1-a", "details", "v1"), 120, 0, true, 2),
            // A route to the per-version Service: the node is still reviews v1.
            summary("outbound", pp, ("reviews-v1-a", "reviews-v1", "v1"), 40, 0, true, 3),
            summary("outbound", pp, ("reviews-v2-a", "reviews", "v2"), 40, 4, true, 8),
            summary("outbound", pp, ("reviews-v3-a", "reviews", "v3"), 40, 0, true, 9),
            summary("outbound", ("reviews-v2-a", "reviews"), ("ratings-v1-a", "ratings", "v1"), 40, 0, true, 1),
            summary("outbound", ("reviews-v3-a", "reviews"), ("ratings-v1-a", "ratings", "v1"), 40, 0, true, 1),
        ];
        let inbound: Vec<TrafficSummary> = v
            .iter()
            .map(|s| TrafficSummary {
                direction: "inbound".into(),
                source_workload: UNKNOWN.into(),
                source_service: UNKNOWN.into(),
                destination_version: UNKNOWN.into(),
                ..s.clone()
            })
            .collect();
        v.extend(inbound);
        v
    }

    fn edge<'a>(edges: &'a [Edge], source: &str, target: &str) -> Option<&'a Edge> {
        edges.iter().find(|e| e.source == source && e.target == target)
    }

    #[test]
    fn bookinfo_graph_has_one_edge_per_hop_measured_by_the_caller() {
        let traffic = bookinfo_traffic();
        let refs: Vec<&TrafficSummary> = traffic.iter().collect();
        let (nodes, edges) = build(&refs, 60.0, &bookinfo(), Grouping::Version);
        let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "default/details/v1",
                "default/ingress-gateway/v1",
                "default/productpage/v1",
                "default/ratings/v1",
                "default/reviews/v1",
                "default/reviews/v2",
                "default/reviews/v3"
            ]
        );
        let ingress = nodes.iter().find(|n| n.service == "ingress-gateway").map(|n| n.kind);
        assert_eq!(ingress, Some(NodeKind::Ingress));
        assert_eq!(edges.len(), 7, "inbound reports add nothing: {edges:#?}");
        let e = edge(&edges, "default/ingress-gateway/v1", "default/productpage/v1").expect("ingress edge");
        assert_eq!(e.requests, 120);
        assert!((e.requests_per_second - 2.0).abs() < 1e-9);
        assert_eq!((e.success_rate, e.mtls_share), (1.0, 1.0));
        assert!(e.p99_ms.is_some_and(|p| (30.0..34.0).contains(&p)), "{e:?}");
        assert!(edge(&edges, "default/productpage/v1", "default/reviews/v1").is_some());
        let v2 = edge(&edges, "default/productpage/v1", "default/reviews/v2").expect("reviews v2 edge");
        assert!((v2.success_rate - 0.9).abs() < 1e-9);
        assert!(edge(&edges, "default/reviews/v2", "default/ratings/v1").is_some());
        assert!(edge(&edges, "default/reviews/v3", "default/ratings/v1").is_some());
        assert!(edge(&edges, "default/reviews/v1", "default/ratings/v1").is_none());
    }

    #[test]
    fn grouping_by_service_merges_versions() {
        let traffic = bookinfo_traffic();
        let refs: Vec<&TrafficSummary> = traffic.iter().collect();
        let (nodes, edges) = build(&refs, 60.0, &bookinfo(), Grouping::Service);
        assert_eq!(nodes.len(), 5, "{nodes:#?}");
        assert!(nodes.iter().all(|n| n.version.is_none()));
        let reviews = edge(&edges, "default/productpage", "default/reviews").expect("productpage -> reviews");
        assert_eq!(reviews.requests, 120);
        assert!((reviews.success_rate - 116.0 / 120.0).abs() < 1e-9);
        let ratings = edge(&edges, "default/reviews", "default/ratings").expect("reviews -> ratings");
        assert_eq!(ratings.requests, 80);
    }

    #[test]
    fn plaintext_callers_outside_the_mesh_show_as_unknown() {
        let mut traffic = bookinfo_traffic();
        // 30 plaintext requests straight to details' sidecar, 3 of them failed, from a client
        // with no sidecar; and 5 plaintext requests a meshed caller did report.
        traffic.push(summary("inbound", (UNKNOWN, UNKNOWN), ("details-v1-a", "details", UNKNOWN), 35, 3, false, 5));
        traffic.push(summary(
            "outbound",
            ("productpage-v1-a", "productpage"),
            ("details-v1-a", "details", "v1"),
            5,
            0,
            false,
            5,
        ));
        let refs: Vec<&TrafficSummary> = traffic.iter().collect();
        let (nodes, edges) = build(&refs, 60.0, &bookinfo(), Grouping::Version);
        let unknown = nodes.iter().find(|n| n.id == UNKNOWN).expect("unknown node");
        assert_eq!(unknown.kind, NodeKind::Unknown);
        let e = edge(&edges, UNKNOWN, "default/details/v1").expect("unknown -> details");
        assert_eq!(e.requests, 30);
        assert_eq!(e.mtls_share, 0.0);
        // The unclaimed share gets its summaries' success rate, rounded to whole requests.
        assert!((e.success_rate - 32.0 / 35.0).abs() < 0.02, "{e:?}");
        let meshed = edge(&edges, "default/productpage/v1", "default/details/v1").expect("meshed edge");
        assert_eq!(meshed.requests, 125);
        assert!((meshed.mtls_share - 120.0 / 125.0).abs() < 1e-9);
    }

    #[test]
    fn destinations_outside_the_mesh_are_external_and_departed_workloads_keep_their_place() {
        let mut d = bookinfo();
        d.add_service("reviews", "default");
        let traffic = [
            summary("outbound", ("productpage-v1-a", "productpage"), ("", "api.example.com", ""), 10, 0, false, 50),
            // reviews-v2-gone has no proxy any more: its version comes from what its callers
            // saw, its service from its own inbound report.
            summary(
                "outbound",
                ("productpage-v1-a", "productpage"),
                ("reviews-v2-gone", "reviews-v2", "v2"),
                10,
                0,
                true,
                5,
            ),
            summary("inbound", (UNKNOWN, UNKNOWN), ("reviews-v2-gone", "reviews", UNKNOWN), 10, 0, true, 5),
            summary("outbound", ("reviews-v2-gone", "reviews"), ("ratings-v1-a", "ratings", "v1"), 10, 0, true, 1),
            // A proxy that never said who it is.
            summary("outbound", (UNKNOWN, UNKNOWN), ("details-v1-a", "details", "v1"), 4, 0, false, 1),
        ];
        let refs: Vec<&TrafficSummary> = traffic.iter().collect();
        let (nodes, edges) = build(&refs, 10.0, &d, Grouping::Version);
        let external = nodes.iter().find(|n| n.id == "api.example.com").expect("external node");
        assert_eq!((external.kind, external.namespace.as_deref()), (NodeKind::External, None));
        let e = edge(&edges, "default/productpage/v1", "api.example.com").expect("external edge");
        assert!((e.requests_per_second - 1.0).abs() < 1e-9);
        assert!(edge(&edges, "default/productpage/v1", "default/reviews/v2").is_some(), "{edges:#?}");
        assert!(edge(&edges, "default/reviews/v2", "default/ratings/v1").is_some(), "{edges:#?}");
        assert!(edge(&edges, UNKNOWN, "default/details/v1").is_some_and(|e| e.requests == 4), "{edges:#?}");
        // Idle proxies are nodes too.
        assert!(nodes.iter().any(|n| n.id == "default/reviews/v1"));
    }

    #[test]
    fn field_names_are_stable() {
        let traffic = bookinfo_traffic();
        let refs: Vec<&TrafficSummary> = traffic.iter().collect();
        let (nodes, edges) = build(&refs, 60.0, &bookinfo(), Grouping::Version);
        let graph = Graph { window: "1m".into(), group: Grouping::Version.as_str(), nodes, edges };
        let v = serde_json::to_value(&graph).expect("serializes");
        let node = &v["nodes"][0];
        for field in ["id", "service", "version", "namespace", "kind"] {
            assert!(node.get(field).is_some(), "node field {field}: {node}");
        }
        let edge = &v["edges"][0];
        for field in
            ["source", "target", "requests", "requestsPerSecond", "successRate", "p50Ms", "p95Ms", "p99Ms", "mtlsShare"]
        {
            assert!(edge.get(field).is_some(), "edge field {field}: {edge}");
        }
        assert_eq!(v["nodes"][1]["kind"], "ingress");
        assert_eq!((v["window"].as_str(), v["group"].as_str()), (Some("1m"), Some("version")));
    }
}
