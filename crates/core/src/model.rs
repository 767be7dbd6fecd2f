//! The compiled model: resources turned into what a proxy consults per connection and request —
//! services with their ports, each port's endpoints and routing table.
//!
//! Compilation happens once per config change (file reload or control-plane update) and the
//! result is shared immutably; the request path only reads it.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use crate::authz::Authorization;
use crate::names::{DEFAULT_TRUST_DOMAIN, ServiceName, split_authority};
use crate::policy::{ClientPolicy, RateLimit};
use crate::resource::{
    DefaultAuthorization, MeshConfigSpec, MtlsMode, OutboundTrafficPolicy, PolicyTargetRef, PortRef, Resource,
    ServicePort, Spec, WorkloadPort, WorkloadSpec,
};
use crate::route::RouteTable;

/// The protocol a Service port declares (`appProtocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    Http,
    Http2,
    Grpc,
    Tcp,
    Tls,
    Opaque,
}

impl AppProtocol {
    pub fn parse(s: &str) -> Option<AppProtocol> {
        Some(match s {
            "http" => AppProtocol::Http,
            "http2" => AppProtocol::Http2,
            "grpc" => AppProtocol::Grpc,
            "tcp" => AppProtocol::Tcp,
            "tls" => AppProtocol::Tls,
            "opaque" => AppProtocol::Opaque,
            _ => return None,
        })
    }

    /// Ports declared `opaque` (or plain `tcp`) skip protocol detection.
    pub fn skips_detection(self) -> bool {
        matches!(self, AppProtocol::Opaque | AppProtocol::Tcp)
    }

    /// Whether the application itself speaks HTTP/2 on this port.
    pub fn is_http2(self) -> bool {
        matches!(self, AppProtocol::Http2 | AppProtocol::Grpc)
    }
}

/// One instance that serves a Service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Where peers connect: the sidecar's inbound port when `meshed`, the app itself otherwise.
    pub addr: SocketAddr,
    /// Shared strings (like `principal`): the proxy labels every request with them.
    pub workload: Arc<str>,
    pub namespace: String,
    pub version: Option<Arc<str>>,
    pub service_account: String,
    /// The sidecar's SPIFFE ID when `meshed` (from the namespace, service account and the
    /// mesh's trust domain).
    #[serde(skip)]
    pub principal: Option<Arc<str>>,
    /// A Plexus sidecar answers at `addr` (HTTP/2 between sidecars, mTLS later).
    pub meshed: bool,
    /// The application's own port behind the sidecar.
    pub app_port: u16,
}

/// A Service port with everything a proxy needs to send traffic to it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledPort {
    pub port: u16,
    pub name: Option<String>,
    pub protocol: Option<AppProtocol>,
    pub endpoints: Arc<EndpointSet>,
    pub routes: RouteTable,
    /// How clients call this port (ResiliencePolicy, or the defaults).
    pub policy: Arc<ClientPolicy>,
    /// The local rate limit the destination's sidecars enforce (RateLimitPolicy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<Arc<RateLimit>>,
    /// What the destination's sidecars authorize (AuthorizationPolicies, TrafficTargets).
    #[serde(skip_serializing_if = "Authorization::is_empty")]
    pub authorization: Arc<Authorization>,
}

/// The endpoints of a Service port (a slice of [`Endpoint`]), with a slot where a data plane
/// keeps its state about this set (the proxy's balancer: its handles on the endpoints'
/// statistics, its hash ring, its pick counter), built on first use and dropped with the
/// snapshot, so a request finds it without a lookup.
#[derive(Default)]
pub struct EndpointSet {
    list: Vec<Endpoint>,
    cache: std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
}

impl EndpointSet {
    pub fn new(list: Vec<Endpoint>) -> EndpointSet {
        EndpointSet { list, cache: std::sync::OnceLock::new() }
    }

    /// The state kept for this set, built by `init` on first use. `None` only if a state of
    /// another type was kept first (one data plane per process uses it).
    pub fn cached<T: std::any::Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Option<&T> {
        self.cache.get_or_init(|| Arc::new(init())).downcast_ref::<T>()
    }
}

impl std::ops::Deref for EndpointSet {
    type Target = [Endpoint];
    fn deref(&self) -> &[Endpoint] {
        &self.list
    }
}

impl std::fmt::Debug for EndpointSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.list.iter()).finish()
    }
}

impl Serialize for EndpointSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.list.serialize(serializer)
    }
}

impl From<Vec<Endpoint>> for EndpointSet {
    fn from(list: Vec<Endpoint>) -> EndpointSet {
        EndpointSet::new(list)
    }
}

/// A Service with its compiled ports.
#[derive(Debug, Clone, Serialize)]
pub struct CompiledService {
    pub name: ServiceName,
    /// `name.name` as a shared string: the proxy's `destination_service` label value, set on
    /// every request without copying.
    #[serde(skip)]
    pub label: Arc<str>,
    pub ports: Vec<CompiledPort>,
    /// The Service's virtual addresses (a Kubernetes ClusterIP, annotation
    /// [`VIRTUAL_IP_ANNOTATION`]): the sidecar's DNS answers them for the Service's names, and
    /// transparent traffic to them goes to the Service.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub virtual_ips: Vec<IpAddr>,
}

/// Annotation of a Service holding its virtual address (set from the ClusterIP by the
/// Kubernetes store).
pub const VIRTUAL_IP_ANNOTATION: &str = "plexus.dev/cluster-ip";

impl CompiledService {
    /// The port `port`, or the only port when `port` is `None`.
    pub fn port(&self, port: Option<u16>) -> Option<&CompiledPort> {
        match port {
            Some(p) => self.ports.iter().find(|cp| cp.port == p),
            None if self.ports.len() == 1 => self.ports.first(),
            None => self.ports.iter().find(|cp| cp.port == 80),
        }
    }
}

/// Mesh-wide settings (MeshConfig `default`, with defaults filled in).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSettings {
    pub trust_domain: String,
    pub mtls_mode: MtlsMode,
    pub default_authorization: DefaultAuthorization,
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// `http.allowEncodedSlashes`: `%2F` in a path is forwarded undecoded instead of refused.
    pub allow_encoded_slashes: bool,
    /// The MeshConfig as written, for the parts other modules read (tracing, access logs).
    pub config: MeshConfigSpec,
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings::from_spec(&MeshConfigSpec::default())
    }
}

impl MeshSettings {
    pub fn from_spec(spec: &MeshConfigSpec) -> MeshSettings {
        MeshSettings {
            trust_domain: spec.trust_domain.clone().unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.into()),
            mtls_mode: spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default(),
            default_authorization: spec.default_authorization.unwrap_or_default(),
            outbound_traffic_policy: spec.outbound_traffic_policy.unwrap_or_default(),
            allow_encoded_slashes: spec.http.as_ref().and_then(|h| h.allow_encoded_slashes).unwrap_or(false),
            config: spec.clone(),
        }
    }
}

/// An immutable, compiled view of the mesh.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeshSnapshot {
    /// Changes whenever the configuration changes.
    pub version: String,
    pub mesh: MeshSettings,
    pub services: BTreeMap<ServiceName, CompiledService>,
    /// Which Service port an endpoint address serves (for transparent traffic to a pod IP).
    #[serde(skip)]
    pub by_endpoint: HashMap<SocketAddr, (ServiceName, u16)>,
    /// Which Service a virtual address belongs to.
    #[serde(skip)]
    pub by_virtual_ip: HashMap<IpAddr, ServiceName>,
    /// ExternalServices: where a sidecar may go outside the mesh (`registryOnly`).
    #[serde(skip_serializing_if = "crate::external::ExternalServices::is_empty")]
    pub externals: crate::external::ExternalServices,
    /// Gateways with their listeners and attached routes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub gateways: BTreeMap<ServiceName, crate::gateway::CompiledGateway>,
}

impl MeshSnapshot {
    /// Compiles validated resources into a snapshot.
    pub fn compile(resources: &[Resource], version: impl Into<String>) -> MeshSnapshot {
        let implied = implied_services(resources);
        if !implied.is_empty() {
            let all: Vec<Resource> = resources.iter().cloned().chain(implied).collect();
            return Self::compile_all(&all, version);
        }
        Self::compile_all(resources, version)
    }

    fn compile_all(resources: &[Resource], version: impl Into<String>) -> MeshSnapshot {
        let workloads: Vec<(&Resource, &WorkloadSpec)> = resources
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::Workload(w) => Some((r, w)),
                _ => None,
            })
            .collect();
        let mesh = resources
            .iter()
            .find_map(|r| match &r.spec {
                Spec::MeshConfig(m) => Some(MeshSettings::from_spec(m)),
                _ => None,
            })
            .unwrap_or_default();
        let mut services = BTreeMap::new();
        let mut by_endpoint = HashMap::new();
        let mut by_virtual_ip = HashMap::new();
        for r in resources {
            let Spec::Service(spec) = &r.spec else { continue };
            let name = ServiceName::new(&r.metadata.name, r.metadata.namespace());
            let ports = spec
                .ports
                .iter()
                .map(|sp| {
                    let mut endpoints: Vec<Endpoint> = workloads
                        .iter()
                        .filter(|(w, _)| w.metadata.namespace() == name.namespace)
                        .filter(|(w, _)| {
                            !spec.selector.is_empty()
                                && spec.selector.iter().all(|(k, v)| w.metadata.labels.get(k) == Some(v))
                        })
                        .filter(|(_, ws)| spec.admits(ws.service_account.as_deref()))
                        .filter_map(|(w, ws)| endpoint(w, ws, sp, &mesh.trust_domain))
                        .collect();
                    endpoints.sort_by(|a, b| a.addr.cmp(&b.addr).then(a.workload.cmp(&b.workload)));
                    endpoints.dedup_by(|a, b| a.addr == b.addr);
                    for e in &endpoints {
                        by_endpoint.entry(e.addr).or_insert_with(|| (name.clone(), sp.port));
                    }
                    CompiledPort {
                        port: sp.port,
                        name: sp.name.clone(),
                        protocol: sp.app_protocol.as_deref().and_then(AppProtocol::parse),
                        endpoints: Arc::new(EndpointSet::new(endpoints)),
                        routes: RouteTable::default(),
                        policy: Arc::new(ClientPolicy::default()),
                        rate_limit: None,
                        authorization: Arc::default(),
                    }
                })
                .collect();
            let virtual_ips: Vec<IpAddr> = r
                .metadata
                .annotations
                .get(VIRTUAL_IP_ANNOTATION)
                .into_iter()
                .flat_map(|v| v.split(','))
                .filter_map(|ip| ip.trim().parse().ok())
                .collect();
            for ip in &virtual_ips {
                by_virtual_ip.entry(*ip).or_insert_with(|| name.clone());
            }
            services
                .insert(name.clone(), CompiledService { label: name.name.as_str().into(), name, ports, virtual_ips });
        }
        RouteTable::attach_all(resources, &mut services);
        attach_policies(resources, &mesh, &mut services);
        // After the endpoints are known: TrafficTargets select ports by their workloads'
        // service account.
        crate::authz::attach_all(resources, &mesh, &mut services);
        let externals = crate::external::ExternalServices::compile(resources);
        let gateways = crate::gateway::compile_all(resources);
        MeshSnapshot { version: version.into(), mesh, services, by_endpoint, by_virtual_ip, externals, gateways }
    }

    /// Looks a Service up by a host (`reviews`, `reviews.prod`, `reviews.prod.svc.cluster.local`).
    pub fn service_by_host(&self, host: &str) -> Option<&CompiledService> {
        ServiceName::candidates(host).into_iter().find_map(|n| self.services.get(&n))
    }

    /// Resolves an authority (`reviews:9080`) to a Service port. Without a port, a Service with
    /// a single port (or port 80) is used.
    pub fn resolve_authority(&self, authority: &str) -> Option<(&CompiledService, &CompiledPort)> {
        let (host, port) = split_authority(authority);
        let service = self.service_by_host(host)?;
        Some((service, service.port(port)?))
    }

    /// The Service port a connection to `addr` means when `addr`'s IP is a Service's virtual
    /// address.
    pub fn service_by_virtual_ip(&self, addr: SocketAddr) -> Option<(&CompiledService, &CompiledPort)> {
        let service = self.services.get(self.by_virtual_ip.get(&addr.ip().to_canonical())?)?;
        Some((service, service.port(Some(addr.port()))?))
    }

    /// Whether `ip` is the address of an endpoint, or the virtual address, of a Service in
    /// this snapshot.
    pub fn is_mesh_ip(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.by_virtual_ip.contains_key(&ip) || self.by_endpoint.keys().any(|a| a.ip().to_canonical() == ip)
    }

    /// The Service port served by the endpoint at `addr`, if any.
    pub fn service_by_endpoint(&self, addr: SocketAddr) -> Option<(&CompiledService, &CompiledPort)> {
        let (name, port) = self.by_endpoint.get(&addr)?;
        let service = self.services.get(name)?;
        Some((service, service.port(Some(*port))?))
    }
}

/// The Service ports a policy's `targetRef` selects, with its rank: a port-specific policy wins
/// over a Service-wide one, then the oldest, then `namespace/name` (Gateway API conflict rule).
type Rank = (bool, String, String);

fn policy_targets(r: &Resource, target: &PolicyTargetRef) -> (ServiceName, Option<u16>, Rank) {
    let ns = r.metadata.namespace();
    let name = ServiceName::new(&target.name, target.namespace.as_deref().unwrap_or(ns));
    let rank = (target.port.is_none(), r.metadata.creation_timestamp.clone().unwrap_or_default(), r.key());
    (name, target.port, rank)
}

/// Attaches ResiliencePolicies and RateLimitPolicies to the ports they target.
fn attach_policies(resources: &[Resource], mesh: &MeshSettings, services: &mut BTreeMap<ServiceName, CompiledService>) {
    let mut client: HashMap<(ServiceName, u16), (Rank, Arc<ClientPolicy>)> = HashMap::new();
    let mut limits: HashMap<(ServiceName, u16), (Rank, Arc<RateLimit>)> = HashMap::new();
    for r in resources {
        let (target, compiled) = match &r.spec {
            Spec::ResiliencePolicy(p) => (&p.target_ref, Ok(Arc::new(ClientPolicy::from_spec(r.key(), p)))),
            Spec::RateLimitPolicy(p) => (
                &p.target_ref,
                Err(Arc::new(RateLimit::from_spec(r.key(), r.metadata.namespace(), &mesh.trust_domain, p))),
            ),
            _ => continue,
        };
        let (name, port, rank) = policy_targets(r, target);
        let Some(service) = services.get(&name) else { continue };
        for p in service.ports.iter().filter(|p| port.is_none_or(|x| x == p.port)) {
            let key = (name.clone(), p.port);
            match &compiled {
                Ok(c) => {
                    if client.get(&key).is_none_or(|(best, _)| rank < *best) {
                        client.insert(key, (rank.clone(), c.clone()));
                    }
                }
                Err(l) => {
                    if limits.get(&key).is_none_or(|(best, _)| rank < *best) {
                        limits.insert(key, (rank.clone(), l.clone()));
                    }
                }
            }
        }
    }
    for ((name, port), (_, policy)) in client {
        if let Some(p) = services.get_mut(&name).and_then(|s| s.ports.iter_mut().find(|p| p.port == port)) {
            p.policy = policy;
        }
    }
    for ((name, port), (_, limit)) in limits {
        if let Some(p) = services.get_mut(&name).and_then(|s| s.ports.iter_mut().find(|p| p.port == port)) {
            p.rate_limit = Some(limit);
        }
    }
}

/// The workload port serving service port `sp`: by `targetPort` name or number, else by the
/// service port's name, else the workload's only port.
fn workload_port<'a>(ws: &'a WorkloadSpec, sp: &ServicePort) -> Option<&'a WorkloadPort> {
    match &sp.target_port {
        Some(PortRef::Name(n)) => ws.ports.iter().find(|p| p.name.as_deref() == Some(n.as_str())),
        Some(PortRef::Number(n)) => ws.ports.iter().find(|p| p.target_port.unwrap_or(p.port) == *n || p.port == *n),
        None => {
            let by_name = sp.name.as_ref().and_then(|n| ws.ports.iter().find(|p| p.name.as_ref() == Some(n)));
            by_name.or(if ws.ports.len() == 1 { ws.ports.first() } else { None })
        }
    }
}

fn endpoint(w: &Resource, ws: &WorkloadSpec, sp: &ServicePort, trust_domain: &str) -> Option<Endpoint> {
    let ip: IpAddr = ws.address.parse().ok()?;
    let wp = workload_port(ws, sp)?;
    let service_account = ws.service_account.clone().unwrap_or_else(|| "default".into());
    let namespace = w.metadata.namespace();
    Some(Endpoint {
        addr: SocketAddr::new(ip, wp.port),
        workload: w.metadata.name.as_str().into(),
        namespace: namespace.to_string(),
        version: w.metadata.labels.get("version").map(|v| v.as_str().into()),
        principal: ws.meshed.then(|| crate::names::spiffe_id(trust_domain, namespace, &service_account).into()),
        service_account,
        meshed: ws.meshed,
        app_port: wp.target_port.unwrap_or(wp.port),
    })
}

/// Annotation marking a Workload registered by its proxy (`plexus run`), removed with it.
pub const REGISTERED_ANNOTATION: &str = "plexus.dev/registered";
/// Annotation on a Service implied by registered workloads ([`implied_services`]).
pub const IMPLIED_ANNOTATION: &str = "plexus.dev/implied-by";

/// The Services registered workloads imply (SPEC §3): a Workload registered by `plexus run`
/// for Service `S` (its `app` label) in a namespace where no Service `S` exists makes `S`
/// reachable as `S:PORT` at each of its application ports, until a Service resource is
/// applied. The control plane's index and [`MeshSnapshot::compile`] both add them, so a proxy
/// and `plexus explain` see the same mesh. Each one's `resourceVersion` follows its
/// workloads', so an unchanged one encodes to the same bytes.
pub fn implied_services<'a>(resources: impl IntoIterator<Item = &'a Resource> + Clone) -> Vec<Resource> {
    let declared: std::collections::HashSet<(&str, &str)> = resources
        .clone()
        .into_iter()
        .filter(|r| matches!(r.spec, Spec::Service(_)))
        .map(|r| (r.metadata.namespace(), r.metadata.name.as_str()))
        .collect();
    // (namespace, service) → (ports, service accounts, workload versions).
    type Implied<'a> = (std::collections::BTreeSet<u16>, std::collections::BTreeSet<String>, Vec<&'a str>);
    let mut implied: BTreeMap<(&str, &str), Implied<'_>> = BTreeMap::new();
    for r in resources {
        let Spec::Workload(w) = &r.spec else { continue };
        let Some(service) = r.metadata.labels.get("app") else { continue };
        let namespace = r.metadata.namespace();
        if !r.metadata.annotations.contains_key(REGISTERED_ANNOTATION) || declared.contains(&(namespace, service)) {
            continue;
        }
        let entry = implied.entry((namespace, service.as_str())).or_default();
        entry.0.extend(w.ports.iter().map(|p| p.target_port.unwrap_or(p.port)));
        entry.1.insert(w.service_account.clone().unwrap_or_else(|| "default".into()));
        entry.2.push(r.metadata.resource_version.as_deref().unwrap_or("0"));
    }
    implied
        .into_iter()
        .filter(|(_, (ports, _, _))| !ports.is_empty())
        .map(|((namespace, name), (ports, accounts, mut versions))| {
            versions.sort_unstable();
            let spec = crate::resource::ServiceSpec {
                selector: [("app".to_string(), name.to_string())].into_iter().collect(),
                service_accounts: accounts.into_iter().collect(),
                ports: ports
                    .into_iter()
                    .map(|p| ServicePort {
                        name: None,
                        port: p,
                        target_port: Some(PortRef::Number(p)),
                        app_protocol: None,
                    })
                    .collect(),
            };
            Resource {
                api_version: crate::Kind::Service.api_version().to_string(),
                kind: crate::Kind::Service,
                metadata: crate::ObjectMeta {
                    name: name.to_string(),
                    namespace: Some(namespace.to_string()),
                    annotations: [(IMPLIED_ANNOTATION.to_string(), "registered workloads".to_string())]
                        .into_iter()
                        .collect(),
                    resource_version: Some(format!("implied-{}", versions.join("-"))),
                    ..Default::default()
                },
                spec: Spec::Service(spec),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::parse_documents;

    /// A Service's virtual address (annotation `plexus.dev/cluster-ip`) maps back to it, on
    /// its ports only; a Service without one has none.
    #[test]
    fn virtual_ips_map_to_their_service() {
        let text = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews, namespace: prod, annotations: {plexus.dev/cluster-ip: 10.96.0.12}}\nspec: {ports: [{port: 9080}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: ratings, namespace: prod, annotations: {plexus.dev/cluster-ip: not-an-ip}}\nspec: {ports: [{port: 9080}]}\n";
        let snapshot = MeshSnapshot::compile(&parse_documents("t.yaml", text).expect("valid"), "1");
        let (service, port) = snapshot.service_by_virtual_ip("10.96.0.12:9080".parse().expect("addr")).expect("mapped");
        assert_eq!((service.name.to_string(), port.port), ("reviews.prod".to_string(), 9080));
        assert!(snapshot.service_by_virtual_ip("10.96.0.12:80".parse().expect("addr")).is_none(), "not a port of it");
        assert!(snapshot.service_by_virtual_ip("10.96.0.13:9080".parse().expect("addr")).is_none());
        let ratings = snapshot.services.get(&ServiceName::new("ratings", "prod")).expect("ratings");
        assert!(ratings.virtual_ips.is_empty(), "an unparsable address is ignored");
    }

    /// SPEC §3: a registered workload with no Service resource is a Service at its app ports;
    /// a declared Service, or an unregistered workload, implies nothing.
    #[test]
    fn registered_workloads_without_a_service_imply_one() {
        let workload = |name: &str, ns: &str, app: &str, port: u16, registered: bool| {
            let annotations = if registered { "annotations: {plexus.dev/registered: \"true\"}, " } else { "" };
            format!(
                "apiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: {ns}, {annotations}labels: {{app: {app}}}}}\nspec: {{address: 127.0.0.1, meshed: true, serviceAccount: {app}, ports: [{{name: http, port: 4{port}, targetPort: {port}}}]}}\n"
            )
        };
        let yaml = [
            workload("echo-1", "default", "echo", 1810, true),
            workload("echo-2", "default", "echo", 1811, true),
            workload("api-1", "prod", "api", 1812, true),
            workload("manual-1", "default", "manual", 1813, false),
            workload("declared-1", "default", "declared", 1814, true),
            "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: declared}\nspec: {selector: {app: declared}, ports: [{port: 80, targetPort: 1814}]}\n".to_string(),
        ]
        .join("---\n");
        let resources = parse_documents("t", &yaml).expect("valid");
        let snapshot = MeshSnapshot::compile(&resources, "t");
        let echo = snapshot.services.get(&ServiceName::new("echo", "default")).expect("echo implied");
        assert_eq!(echo.ports.iter().map(|p| p.port).collect::<Vec<_>>(), [1810, 1811]);
        let p = echo.port(Some(1810)).expect("port");
        assert_eq!(p.endpoints.iter().map(|e| e.addr.port()).collect::<Vec<_>>(), [41810], "via its sidecar");
        assert!(snapshot.services.contains_key(&ServiceName::new("api", "prod")), "in its own namespace");
        assert!(!snapshot.services.contains_key(&ServiceName::new("manual", "default")), "not registered");
        let declared = snapshot.services.get(&ServiceName::new("declared", "default")).expect("declared");
        assert_eq!(declared.ports.iter().map(|p| p.port).collect::<Vec<_>>(), [80], "the declared Service wins");
        // The same bytes for the same workloads (the index reuses their encoding).
        assert_eq!(implied_services(&resources), implied_services(&resources));
    }

    const MESH: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: reviews-v1, labels: {app: reviews, version: v1}}
spec: {address: 127.0.0.1, ports: [{name: http, port: 7001, targetPort: 9001}], meshed: true, serviceAccount: reviews}
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: reviews-v2, labels: {app: reviews, version: v2}}
spec: {address: 127.0.0.2, ports: [{port: 9002}]}
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: other, namespace: prod, labels: {app: reviews}}
spec: {address: 127.0.0.3, ports: [{port: 9003}]}
"#;

    #[test]
    fn selects_endpoints_by_labels_namespace_and_port() {
        let snap = MeshSnapshot::compile(&parse_documents("m", MESH).expect("valid"), "1");
        let (svc, port) = snap.resolve_authority("reviews:9080").expect("resolves");
        assert_eq!(svc.name.to_string(), "reviews.default");
        let addrs: Vec<String> = port.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:7001", "127.0.0.2:9002"]);
        assert!(port.endpoints[0].meshed);
        assert_eq!(port.endpoints[0].app_port, 9001);
        assert_eq!(port.endpoints[0].version.as_deref(), Some("v1"));
        assert!(snap.resolve_authority("reviews").is_some(), "single-port service needs no port");
        assert!(snap.resolve_authority("reviews:1234").is_none());
        let by_ep = snap.service_by_endpoint("127.0.0.2:9002".parse().expect("addr"));
        assert_eq!(by_ep.map(|(s, _)| s.name.name.as_str()), Some("reviews"));
    }

    #[test]
    fn service_accounts_limit_who_backs_a_service() {
        let limited =
            MESH.replacen("selector: {app: reviews}", "selector: {app: reviews}\n  serviceAccounts: [reviews]", 1);
        let snap = MeshSnapshot::compile(&parse_documents("m", &limited).expect("valid"), "1");
        let (_, port) = snap.resolve_authority("reviews:9080").expect("resolves");
        let addrs: Vec<String> = port.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:7001"], "reviews-v2 runs as `default`: not admitted");
        let other =
            MESH.replacen("selector: {app: reviews}", "selector: {app: reviews}\n  serviceAccounts: [default]", 1);
        let snap = MeshSnapshot::compile(&parse_documents("m", &other).expect("valid"), "1");
        let (_, port) = snap.resolve_authority("reviews:9080").expect("resolves");
        let addrs: Vec<String> = port.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.2:9002"], "no serviceAccount is `default`");
        let bad =
            MESH.replacen("selector: {app: reviews}", "selector: {app: reviews}\n  serviceAccounts: [Bad_Name]", 1);
        let err = parse_documents("m", &bad).expect_err("invalid");
        assert!(err.to_string().contains("spec.serviceAccounts[0]"), "{err}");
    }
}
