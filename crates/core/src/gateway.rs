//! Gateways compiled: each listener of a `Gateway` with the routes attached to it, grouped by
//! the hostnames a request may carry (Gateway API hostname intersection), and the listener
//! conflicts and route attachments that status and `plexus check` report.
//!
//! A listener's routes are compiled by the one route compiler ([`crate::route`]) into a
//! virtual Service port per hostname group, so a request through a gateway is matched,
//! filtered, redirected, timed, retried and balanced by the same code as one between sidecars.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::model::{CompiledPort, CompiledService, EndpointSet};
use crate::names::ServiceName;
use crate::policy::ClientPolicy;
use crate::resource::{GatewayListener, GatewaySpec, GatewayTls, Resource, Spec};
use crate::route::{Parent, RouteTable, build_tables};

/// The protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum ListenerProtocol {
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "HTTPS")]
    Https,
}

/// A certificate a listener presents: `tls.certificateRefs[]` (a Secret in Kubernetes, the
/// files `tls.crt`/`tls.key` in `<tls-dir>/<namespace>/<name>/` in universal mode).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct CertificateName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for CertificateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a listener's `certificateRef` cannot be served, if so: a Secret in another namespace
/// than the Gateway's needs a ReferenceGrant there (Gateway API), which Plexus does not read,
/// so such a reference is refused (status `ResolvedRefs: False, RefNotPermitted`, `plexus
/// check`) and not served.
pub fn certificate_ref_refused(gateway_namespace: &str, c: &crate::resource::CertificateRef) -> Option<String> {
    let ns = c.namespace.as_deref().filter(|ns| *ns != gateway_namespace)?;
    Some(format!(
        "certificateRef {ns}/{} is in another namespace than the Gateway ({gateway_namespace}): that needs a ReferenceGrant, which Plexus does not support",
        c.name
    ))
}

/// The listener `tls.options` key that turns TLS session resumption off (`"off"`) or on
/// (`"on"`, the default): session tickets and the session cache.
pub const SESSION_RESUMPTION_OPTION: &str = "plexus.dev/session-resumption";

/// Whether an HTTPS listener's `tls.options` leave session resumption on; an unknown option
/// or value is the reason it is refused (validation).
pub fn session_resumption(tls: &GatewayTls) -> Result<bool, String> {
    let mut on = true;
    for (key, value) in &tls.options {
        match (key.as_str(), value.as_str()) {
            (SESSION_RESUMPTION_OPTION, "on") => on = true,
            (SESSION_RESUMPTION_OPTION, "off") => on = false,
            (SESSION_RESUMPTION_OPTION, other) => {
                return Err(format!("{SESSION_RESUMPTION_OPTION}: {other:?} is not \"on\" or \"off\""));
            }
            (other, _) => {
                return Err(format!("{other:?} is not a TLS option (supported: {SESSION_RESUMPTION_OPTION})"));
            }
        }
    }
    Ok(on)
}

/// A group of a listener's routes that serve one hostname pattern (the intersection of the
/// listener's hostname and the routes'): a virtual Service port holding their route table.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualHost {
    /// `foo.example.com`, `*.example.com`, or `None` for any host.
    pub hostname: Option<String>,
    /// Named after the Gateway; one port (the listener's) whose routes are this group's.
    #[serde(skip)]
    pub service: CompiledService,
    pub routes: RouteTable,
}

impl VirtualHost {
    /// The virtual port the requests of this group are decided on.
    pub fn port(&self) -> Option<&CompiledPort> {
        self.service.ports.first()
    }
}

/// One listener of a Gateway.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledListener {
    pub name: String,
    pub port: u16,
    pub protocol: ListenerProtocol,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateName>,
    /// HTTPS: whether TLS sessions may be resumed (`tls.options`, [`SESSION_RESUMPTION_OPTION`]).
    pub session_resumption: bool,
    /// Why the listener is not served (it conflicts with an earlier one), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflict: Option<String>,
    /// Most specific hostname first.
    pub hosts: Vec<VirtualHost>,
    /// Routes attached to this listener.
    pub attached_routes: usize,
}

impl CompiledListener {
    /// The hostname group a request for `host` (lowercase, without port) is routed in: the
    /// most specific pattern that matches; `None` when none does.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        self.hosts.iter().find(|v| v.hostname.as_deref().is_none_or(|p| host_matches(p, host)))
    }

    /// Whether this listener accepts requests (or a TLS server name) for `host`.
    pub fn accepts(&self, host: &str) -> bool {
        self.hostname.as_deref().is_none_or(|p| host_matches(p, host))
    }
}

/// A Gateway with its listeners.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledGateway {
    pub name: ServiceName,
    pub listeners: Vec<CompiledListener>,
}

impl CompiledGateway {
    /// The ports to listen on, each with whether it terminates TLS (the protocol of its first
    /// listener; a later listener of the other protocol is conflicted).
    pub fn ports(&self) -> BTreeMap<u16, ListenerProtocol> {
        let mut out = BTreeMap::new();
        for l in self.listeners.iter().filter(|l| l.conflict.is_none()) {
            out.entry(l.port).or_insert(l.protocol);
        }
        out
    }

    /// Whether TLS sessions may be resumed on HTTPS `port`: one TLS setup serves every
    /// listener of a port, so a listener that turns resumption off turns it off for the port.
    pub fn session_resumption(&self, port: u16) -> bool {
        self.listeners
            .iter()
            .filter(|l| l.port == port && l.conflict.is_none() && l.protocol == ListenerProtocol::Https)
            .all(|l| l.session_resumption)
    }

    /// The listener on `port` that serves `host` (a `Host` header or a TLS server name):
    /// the one with the most specific matching hostname (exact, then the longest wildcard,
    /// then none). Conflicted listeners serve nothing.
    pub fn listener(&self, port: u16, host: &str) -> Option<&CompiledListener> {
        self.listeners
            .iter()
            .filter(|l| l.port == port && l.conflict.is_none() && l.accepts(host))
            .min_by_key(|l| specificity(l.hostname.as_deref()))
    }
}

/// Sort key of a hostname pattern: exact names first, then wildcards (longest first), then
/// none (any host).
fn specificity(pattern: Option<&str>) -> (u8, std::cmp::Reverse<usize>) {
    match pattern {
        Some(p) if p.starts_with("*.") => (1, std::cmp::Reverse(p.len())),
        Some(p) => (0, std::cmp::Reverse(p.len())),
        None => (2, std::cmp::Reverse(0)),
    }
}

/// Whether `host` matches `pattern` (Gateway API): equal ignoring case, or `*.suffix`
/// matching one or more labels before `.suffix` (never `suffix` itself).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            host.len() > suffix.len()
                && host.get(host.len() - suffix.len()..).is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The hostname patterns a route with `route_hostnames` serves on a listener with
/// `listener_hostname` (Gateway API hostname intersection); `None` when they do not
/// intersect (the route does not attach to that listener). A `None` pattern is any host.
pub fn intersect_hostnames(listener: Option<&str>, route_hostnames: &[String]) -> Option<Vec<Option<String>>> {
    let lower = |h: &str| h.to_ascii_lowercase();
    match (listener, route_hostnames) {
        (None, []) => Some(vec![None]),
        (None, hosts) => Some(hosts.iter().map(|h| Some(lower(h))).collect()),
        (Some(l), []) => Some(vec![Some(lower(l))]),
        (Some(l), hosts) => {
            let l = lower(l);
            let mut out = Vec::new();
            for h in hosts.iter().map(|h| lower(h)) {
                let found = if h == l || (l.starts_with("*.") && host_matches(&l, &h)) {
                    // The same, or the route's name (or narrower wildcard) lies within the
                    // listener's wildcard.
                    Some(h)
                } else if h.starts_with("*.") && host_matches(&h, &l) {
                    // The listener's name (or narrower wildcard) lies within the route's.
                    Some(l.clone())
                } else {
                    None
                };
                if let Some(f) = found
                    && !out.contains(&Some(f.clone()))
                {
                    out.push(Some(f));
                }
            }
            if out.is_empty() { None } else { Some(out) }
        }
    }
}

/// Whether a listener takes routes of `kind` (`allowedRoutes.kinds`; default: HTTPRoute and
/// GRPCRoute) from `route_namespace` (`allowedRoutes.namespaces.from`: `Same` by default, or
/// `All`).
fn allows(listener: &GatewayListener, gateway_ns: &str, route: &Resource) -> bool {
    let kind = route.kind.as_str();
    let allowed = listener.allowed_routes.as_ref();
    let kind_ok = allowed.is_none_or(|a| a.kinds.is_empty() || a.kinds.iter().any(|k| k.kind == kind));
    let from = allowed.and_then(|a| a.namespaces.as_ref()).and_then(|n| n.from.as_deref()).unwrap_or("Same");
    let ns_ok = from == "All" || route.metadata.namespace() == gateway_ns;
    kind_ok && ns_ok
}

/// Why a listener conflicts with an earlier one of the same Gateway, if it does: the same
/// port with another protocol (`ProtocolConflict`), or the same port and hostname
/// (`HostnameConflict`); with a message. The earlier listener is served, the later is not.
pub fn listener_conflicts(spec: &GatewaySpec) -> Vec<Option<(&'static str, String)>> {
    let mut out = Vec::new();
    for (i, l) in spec.listeners.iter().enumerate() {
        let earlier = &spec.listeners[..i];
        let conflict = if let Some(e) = earlier.iter().find(|e| e.port == l.port && e.protocol != l.protocol) {
            Some((
                "ProtocolConflict",
                format!(
                    "port {} is already {} (listener {:?}): one port serves one protocol",
                    l.port, e.protocol, e.name
                ),
            ))
        } else {
            earlier.iter().find(|e| e.port == l.port && same_host(e.hostname.as_deref(), l.hostname.as_deref())).map(
                |e| {
                    (
                        "HostnameConflict",
                        format!(
                            "listener {:?} already serves port {} for {}",
                            e.name,
                            l.port,
                            l.hostname.as_deref().unwrap_or("any hostname")
                        ),
                    )
                },
            )
        };
        out.push(conflict);
    }
    out
}

/// The `status` of a Gateway as the Gateway API shapes it (conditions `Accepted`,
/// `Programmed`, and per listener `Accepted`, `Conflicted`, `ResolvedRefs`, `Programmed`, with
/// `attachedRoutes`), computed from the resources. Certificate files are checked by the
/// gateway proxy that reads them (its `/config`, `plexus check`), not here.
pub fn status(resources: &[Resource], gateway: &Resource) -> serde_json::Value {
    use serde_json::json;
    let Spec::Gateway(spec) = &gateway.spec else { return serde_json::Value::Null };
    let condition = |kind: &str, ok: bool, reason: &str, message: &str| json!({"type": kind, "status": if ok { "True" } else { "False" }, "reason": reason, "message": message});
    let name = ServiceName::new(&gateway.metadata.name, gateway.metadata.namespace());
    let compiled = compile_all(resources);
    let listeners = compiled.get(&name).map(|g| g.listeners.as_slice()).unwrap_or_default();
    let conflicts = listener_conflicts(spec);
    let class_ok = spec.gateway_class_name.as_deref().is_none_or(|c| c == "plexus");
    let mut served = 0;
    let listener_status: Vec<serde_json::Value> = spec
        .listeners
        .iter()
        .zip(&conflicts)
        .enumerate()
        .map(|(i, (l, conflict))| {
            let attached = listeners.get(i).map_or(0, |c| c.attached_routes);
            let (accepted, conflicted) = match conflict {
                Some((reason, message)) => (
                    condition("Accepted", false, reason, message),
                    condition("Conflicted", true, reason, message),
                ),
                None => {
                    served += 1;
                    (
                        condition("Accepted", true, "Accepted", "listener accepted"),
                        condition("Conflicted", false, "NoConflicts", "no conflicts"),
                    )
                }
            };
            let refs = || l.tls.iter().flat_map(|t| &t.certificate_refs);
            let refs_ok = refs().all(|c| {
                c.kind.as_deref().is_none_or(|k| k == "Secret") && c.group.as_deref().is_none_or(str::is_empty)
            });
            let refused = refs().find_map(|c| certificate_ref_refused(gateway.metadata.namespace(), c));
            json!({
                "name": l.name,
                "attachedRoutes": attached,
                "supportedKinds": [{"group": crate::resource::GATEWAY_GROUP, "kind": "HTTPRoute"}, {"group": crate::resource::GATEWAY_GROUP, "kind": "GRPCRoute"}],
                "conditions": [
                    accepted,
                    conflicted,
                    match (refs_ok, &refused) {
                        (false, _) => condition("ResolvedRefs", false, "InvalidCertificateRef", "certificateRefs name Secrets"),
                        (true, Some(why)) => condition("ResolvedRefs", false, "RefNotPermitted", why),
                        (true, None) => condition("ResolvedRefs", true, "ResolvedRefs", "certificates are read and checked by the gateway proxy (plexus check)"),
                    },
                    condition("Programmed", conflict.is_none(), if conflict.is_none() { "Programmed" } else { "Invalid" }, if conflict.is_none() { "sent to the gateway proxies serving this Gateway" } else { "not served" }),
                ],
            })
        })
        .collect();
    json!({
        "conditions": [
            if class_ok {
                condition("Accepted", true, "Accepted", "gateway class plexus")
            } else {
                condition("Accepted", false, "InvalidParameters", "gatewayClassName is not plexus")
            },
            condition("Programmed", class_ok && served > 0, if served > 0 { "Programmed" } else { "Invalid" }, &format!("{served} of {} listeners served", spec.listeners.len())),
        ],
        "listeners": listener_status,
    })
}

fn same_host(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        (None, None) => true,
        _ => false,
    }
}

/// Where a route's parentRef may attach on `gateway`: the indexes of the listeners it
/// selects (by `sectionName` and `port`), with the hostname patterns it serves on each.
/// Listeners that do not allow the route, or whose hostname does not intersect the route's,
/// are left out.
pub fn attachments(
    gateway: &Resource,
    spec: &GatewaySpec,
    route: &Resource,
    section: Option<&str>,
    port: Option<u16>,
    route_hostnames: &[String],
) -> Vec<(usize, Vec<Option<String>>)> {
    spec.listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| section.is_none_or(|s| s == l.name) && port.is_none_or(|p| p == l.port))
        .filter(|(_, l)| allows(l, gateway.metadata.namespace(), route))
        .filter_map(|(i, l)| Some((i, intersect_hostnames(l.hostname.as_deref(), route_hostnames)?)))
        .collect()
}

/// Compiles every Gateway with the routes attached to it.
pub(crate) fn compile_all(resources: &[Resource]) -> BTreeMap<ServiceName, CompiledGateway> {
    let gateways: BTreeMap<ServiceName, (&Resource, &GatewaySpec)> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::Gateway(g) => Some((ServiceName::new(&r.metadata.name, r.metadata.namespace()), (r, g))),
            _ => None,
        })
        .collect();
    if gateways.is_empty() {
        return BTreeMap::new();
    }
    // Tables keyed (gateway, listener index, hostname pattern); attached routes counted per
    // listener.
    let mut attached: BTreeMap<(ServiceName, usize), std::collections::BTreeSet<String>> = BTreeMap::new();
    let tables = build_tables(resources, |route, parent, hostnames| {
        let Parent::Gateway { name, section, port } = parent else { return Vec::new() };
        let Some((g, spec)) = gateways.get(name) else { return Vec::new() };
        let mut keys = Vec::new();
        for (li, hosts) in attachments(g, spec, route, section.as_deref(), *port, hostnames) {
            attached.entry((name.clone(), li)).or_default().insert(route.key());
            keys.extend(hosts.into_iter().map(|h| (name.clone(), li, h)));
        }
        keys
    });
    type Groups = Vec<(Option<String>, RouteTable)>;
    let mut by_listener: BTreeMap<(ServiceName, usize), Groups> = BTreeMap::new();
    for ((name, li, host), table) in tables {
        by_listener.entry((name, li)).or_default().push((host, table));
    }
    gateways
        .into_iter()
        .map(|(name, (_, spec))| {
            let conflicts = listener_conflicts(spec).into_iter().map(|c| c.map(|(_, message)| message));
            let listeners = spec
                .listeners
                .iter()
                .zip(conflicts)
                .enumerate()
                .map(|(li, (l, conflict))| {
                    let mut hosts: Vec<VirtualHost> = by_listener
                        .remove(&(name.clone(), li))
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(hostname, routes)| virtual_host(&name, l.port, hostname, routes))
                        .collect();
                    hosts.sort_by_key(|v| specificity(v.hostname.as_deref()));
                    CompiledListener {
                        name: l.name.clone(),
                        port: l.port,
                        protocol: if l.protocol == "HTTPS" { ListenerProtocol::Https } else { ListenerProtocol::Http },
                        hostname: l.hostname.as_ref().map(|h| h.to_ascii_lowercase()),
                        certificates: l
                            .tls
                            .iter()
                            .flat_map(|t| &t.certificate_refs)
                            .filter(|c| certificate_ref_refused(&name.namespace, c).is_none())
                            .map(|c| CertificateName {
                                namespace: c.namespace.clone().unwrap_or_else(|| name.namespace.clone()),
                                name: c.name.clone(),
                            })
                            .collect(),
                        session_resumption: l.tls.as_ref().is_none_or(|t| session_resumption(t).unwrap_or(true)),
                        conflict,
                        hosts,
                        attached_routes: attached.get(&(name.clone(), li)).map_or(0, |s| s.len()),
                    }
                })
                .collect();
            (name.clone(), CompiledGateway { name, listeners })
        })
        .collect()
}

fn virtual_host(gateway: &ServiceName, port: u16, hostname: Option<String>, routes: RouteTable) -> VirtualHost {
    let service = CompiledService {
        name: gateway.clone(),
        label: gateway.name.as_str().into(),
        virtual_ips: Vec::new(),
        ports: vec![CompiledPort {
            port,
            name: None,
            protocol: None,
            endpoints: Arc::new(EndpointSet::default()),
            routes: routes.clone(),
            policy: Arc::new(ClientPolicy::default()),
            rate_limit: None,
            authorization: Arc::default(),
        }],
    };
    VirtualHost { hostname, service, routes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::parse_documents;
    use crate::model::MeshSnapshot;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// Gateway API "Hostname intersection" table (HTTPRoute hostnames vs listener hostname).
    #[test]
    fn hostname_intersection_follows_the_gateway_api() {
        let some = |v: &[&str]| Some(v.iter().map(|x| Some(x.to_string())).collect::<Vec<_>>());
        assert_eq!(intersect_hostnames(None, &[]), Some(vec![None]));
        assert_eq!(intersect_hostnames(Some("foo.com"), &[]), some(&["foo.com"]));
        assert_eq!(intersect_hostnames(None, &s(&["a.com"])), some(&["a.com"]));
        assert_eq!(intersect_hostnames(Some("*.example.com"), &s(&["foo.example.com"])), some(&["foo.example.com"]));
        assert_eq!(intersect_hostnames(Some("foo.example.com"), &s(&["*.example.com"])), some(&["foo.example.com"]));
        assert_eq!(intersect_hostnames(Some("*.example.com"), &s(&["*.example.com"])), some(&["*.example.com"]));
        assert_eq!(
            intersect_hostnames(Some("*.example.com"), &s(&["*.foo.example.com"])),
            some(&["*.foo.example.com"])
        );
        assert_eq!(
            intersect_hostnames(Some("*.foo.example.com"), &s(&["*.example.com"])),
            some(&["*.foo.example.com"])
        );
        assert_eq!(intersect_hostnames(Some("*.example.com"), &s(&["example.com"])), None, "needs a label");
        assert_eq!(intersect_hostnames(Some("foo.com"), &s(&["bar.com"])), None);
        assert_eq!(
            intersect_hostnames(Some("*.example.com"), &s(&["bar.com", "a.example.com", "b.a.example.com"])),
            some(&["a.example.com", "b.a.example.com"])
        );
        assert!(host_matches("*.example.com", "A.b.EXAMPLE.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "xexample.com"));
    }

    const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  gatewayClassName: plexus
  listeners:
  - {name: any, port: 8080, protocol: HTTP}
  - {name: wild, port: 8080, protocol: HTTP, hostname: "*.example.com"}
  - {name: exact, port: 8080, protocol: HTTP, hostname: "foo.example.com"}
  - {name: again, port: 8080, protocol: HTTP, hostname: "foo.example.com"}
  - name: tls
    port: 8080
    protocol: HTTPS
    tls: {certificateRefs: [{name: foo}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: all}
spec:
  parentRefs: [{kind: Gateway, name: edge}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bar}
spec:
  parentRefs: [{kind: Gateway, name: edge, sectionName: wild}]
  hostnames: [bar.example.com, other.org]
  rules: [{matches: [{path: {type: PathPrefix, value: /bar}}], backendRefs: [{name: web, port: 80}]}]
"#;

    #[test]
    fn listeners_are_isolated_most_specific_first_and_conflicts_not_served() {
        let snap = MeshSnapshot::compile(&parse_documents("g", GATEWAY).expect("valid"), "1");
        let g = snap.gateways.get(&ServiceName::new("edge", "default")).expect("compiled");
        let names = |host: &str| g.listener(8080, host).map(|l| l.name.clone());
        assert_eq!(names("foo.example.com").as_deref(), Some("exact"));
        assert_eq!(names("bar.example.com").as_deref(), Some("wild"));
        assert_eq!(names("example.org").as_deref(), Some("any"));
        assert!(g.listeners[3].conflict.as_deref().is_some_and(|c| c.contains("exact")), "{:?}", g.listeners[3]);
        assert!(g.listeners[4].conflict.as_deref().is_some_and(|c| c.contains("one protocol")));
        assert_eq!(g.ports().into_iter().collect::<Vec<_>>(), [(8080, ListenerProtocol::Http)]);
        // Route `bar` attaches to `wild` only, for bar.example.com only (other.org does not
        // intersect); route `all` to every listener.
        let wild = &g.listeners[1];
        assert_eq!(wild.attached_routes, 2);
        assert_eq!(g.listeners[0].attached_routes, 1);
        let vh = wild.virtual_host("bar.example.com").expect("bar group");
        assert_eq!(vh.hostname.as_deref(), Some("bar.example.com"));
        assert_eq!(vh.routes.entries.len(), 1, "only route bar's rule: isolation by hostname group");
        let other = wild.virtual_host("baz.example.com").expect("the listener's own group");
        assert_eq!(&*other.routes.entries[0].route, "default/all");
    }

    #[test]
    fn a_listener_turning_session_resumption_off_turns_it_off_for_its_port() {
        let yaml = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  listeners:
  - {name: a, port: 8443, protocol: HTTPS, hostname: a.example.com, tls: {certificateRefs: [{name: a}]}}
  - name: b
    port: 8443
    protocol: HTTPS
    hostname: b.example.com
    tls: {certificateRefs: [{name: b}], options: {plexus.dev/session-resumption: "off"}}
  - name: c
    port: 9443
    protocol: HTTPS
    tls: {certificateRefs: [{name: c}], options: {plexus.dev/session-resumption: "on"}}
  - {name: d, port: 9443, protocol: HTTPS, hostname: d.example.com, tls: {certificateRefs: [{name: d}]}}
  gatewayClassName: plexus
"#;
        let snap = MeshSnapshot::compile(&parse_documents("g", yaml).expect("valid"), "1");
        let g = snap.gateways.get(&ServiceName::new("edge", "default")).expect("compiled");
        let on: Vec<bool> = g.listeners.iter().map(|l| l.session_resumption).collect();
        assert_eq!(on, [true, false, true, true]);
        assert!(!g.session_resumption(8443));
        assert!(g.session_resumption(9443));
    }

    #[test]
    fn status_has_gateway_api_conditions_per_listener() {
        let resources = parse_documents("g", GATEWAY).expect("valid");
        let g = resources.iter().find(|r| r.kind == crate::Kind::Gateway).expect("gateway");
        let st = status(&resources, g);
        let cond = |l: usize, t: &str| {
            st["listeners"][l]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == t).cloned())
                .unwrap_or_default()
        };
        assert_eq!(st["listeners"][1]["attachedRoutes"], 2);
        assert_eq!(cond(0, "Accepted")["status"], "True");
        assert_eq!(cond(0, "Programmed")["status"], "True");
        assert_eq!(cond(3, "Conflicted")["reason"], "HostnameConflict");
        assert_eq!(cond(3, "Accepted")["status"], "False");
        assert_eq!(cond(4, "Conflicted")["reason"], "ProtocolConflict");
        assert_eq!(cond(4, "Programmed")["status"], "False");
        assert_eq!(st["conditions"][0]["type"], "Accepted");
        assert_eq!(st["conditions"][1]["message"], "3 of 5 listeners served");
    }

    #[test]
    fn certificates_in_another_namespace_are_refused_without_a_reference_grant() {
        let yaml = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: web}
spec:
  listeners:
  - {name: own, port: 8443, protocol: HTTPS, hostname: a.example.com, tls: {certificateRefs: [{name: a}]}}
  - {name: named, port: 8443, protocol: HTTPS, hostname: b.example.com, tls: {certificateRefs: [{name: b, namespace: web}]}}
  - {name: other, port: 8443, protocol: HTTPS, hostname: c.example.com, tls: {certificateRefs: [{name: c, namespace: plexus-system}]}}
"#;
        let resources = parse_documents("g", yaml).expect("valid");
        let snap = MeshSnapshot::compile(&resources, "1");
        let g = snap.gateways.get(&ServiceName::new("edge", "web")).expect("compiled");
        let names = |i: usize| g.listeners[i].certificates.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(names(0), ["web/a"]);
        assert_eq!(names(1), ["web/b"], "the Gateway's own namespace, spelled out");
        assert!(names(2).is_empty(), "another namespace's Secret is never read: {:?}", names(2));
        let st = status(&resources, resources.iter().find(|r| r.kind == crate::Kind::Gateway).expect("gateway"));
        let resolved = |l: usize| {
            st["listeners"][l]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "ResolvedRefs").cloned())
                .unwrap_or_default()
        };
        assert_eq!(resolved(0)["status"], "True");
        assert_eq!(resolved(1)["status"], "True");
        assert_eq!(resolved(2)["status"], "False");
        assert_eq!(resolved(2)["reason"], "RefNotPermitted");
        assert!(
            resolved(2)["message"]
                .as_str()
                .is_some_and(|m| m.contains("plexus-system/c") && m.contains("ReferenceGrant"))
        );
        let found: Vec<String> = crate::check::analyze(&resources).into_iter().map(|f| f.message).collect();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("\"other\"") && found[0].contains("ReferenceGrant"), "{found:?}");
    }
}
