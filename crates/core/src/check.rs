//! Configuration analysis for `plexus check`: problems a valid set of resources can still have.
//!
//! Errors (✗) are what makes traffic fail or not go where the user meant: routes attached to or
//! sending to missing Services, rules that can only answer 500 (no backends, weights summing to
//! 0, an ExtensionRef to a missing FaultInjection), mirrors to missing Services, SMI resources
//! naming missing Services or HTTPRouteGroups, and policies whose target does not exist.
//! Warnings (‼) are what is probably not meant: rules shadowed by an identical match that comes
//! first, and several policies of one kind on the same Service port, of which only one applies.
//!
//! Everything is computed from the resources alone; where the answer depends on how the
//! configuration compiles (precedence, which policy wins), the compiled snapshot is asked, so
//! `check` agrees with what the proxies do.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::MeshSnapshot;
use crate::names::ServiceName;
use crate::resource::{
    BackendRef, FilterType, HttpRouteFilter, HttpRouteGroupSpec, Kind, ParentRef, PolicyTargetRef, Resource,
    SmiRouteRef, Spec, TrafficSplitSpec, TrafficTargetSpec,
};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Traffic will fail or not go where the user meant (✗).
    Error,
    /// Probably not what was meant (‼).
    Warning,
}

/// One problem, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// `HTTPRoute default/reviews`.
    pub object: String,
    pub message: String,
    pub hint: String,
}

impl Finding {
    fn error(object: &str, message: String, hint: String) -> Finding {
        Finding { severity: Severity::Error, object: object.into(), message, hint }
    }

    fn warning(object: &str, message: String, hint: String) -> Finding {
        Finding { severity: Severity::Warning, object: object.into(), message, hint }
    }
}

/// Analyses resources (see the module documentation for what is found).
pub fn analyze(resources: &[Resource]) -> Vec<Finding> {
    let index = Index::new(resources);
    let mut out = Vec::new();
    for r in resources {
        let object = format!("{} {}", r.kind, r.key());
        let ns = r.metadata.namespace();
        match &r.spec {
            Spec::HttpRoute(h) => {
                let rules: Vec<RuleView<'_>> =
                    h.rules.iter().map(|x| RuleView { backends: &x.backend_refs, filters: &x.filters }).collect();
                route(&index, &object, ns, &h.parent_refs, &rules, &mut out);
                gateway_parents(&index, r, &object, &h.parent_refs, &h.hostnames, &mut out);
            }
            Spec::GrpcRoute(g) => {
                let rules: Vec<RuleView<'_>> =
                    g.rules.iter().map(|x| RuleView { backends: &x.backend_refs, filters: &x.filters }).collect();
                route(&index, &object, ns, &g.parent_refs, &rules, &mut out);
                gateway_parents(&index, r, &object, &g.parent_refs, &g.hostnames, &mut out);
            }
            Spec::Gateway(g) => {
                for (l, conflict) in g.listeners.iter().zip(crate::gateway::listener_conflicts(g)) {
                    if let Some((_, why)) = conflict {
                        out.push(Finding::error(
                            &object,
                            format!("listener {:?} conflicts and is not served: {why}", l.name),
                            "give it another port or hostname (an HTTP and an HTTPS listener cannot share a port)"
                                .into(),
                        ));
                    }
                    for why in l
                        .tls
                        .iter()
                        .flat_map(|t| &t.certificate_refs)
                        .filter_map(|c| crate::gateway::certificate_ref_refused(ns, c))
                    {
                        out.push(Finding::error(
                            &object,
                            format!("listener {:?}: {why}; it is not served", l.name),
                            "keep the certificate in the Gateway's namespace".into(),
                        ));
                    }
                }
            }
            Spec::TrafficSplit(t) => traffic_split(&index, &object, ns, t, &mut out),
            Spec::TrafficTarget(t) => traffic_target(&index, &object, ns, t, &mut out),
            Spec::ResiliencePolicy(p) => policy_target(&index, &object, ns, &p.target_ref, &mut out),
            Spec::RateLimitPolicy(p) => policy_target(&index, &object, ns, &p.target_ref, &mut out),
            Spec::AuthorizationPolicy(p) => policy_target(&index, &object, ns, &p.target_ref, &mut out),
            Spec::ExternalService(e) => {
                let gateway = e.egress_gateway.as_deref().map(|g| crate::external::egress_gateway_name(g, ns));
                if let Some(g) = gateway
                    && index.services.get(&g).is_none_or(|ports| ports.len() != 1)
                {
                    out.push(Finding::error(
                        &object,
                        format!(
                            "egressGateway names Service {g}, which does not exist or has not exactly one port: calls to its hosts are answered 503"
                        ),
                        "apply the Service of the `plexus proxy --mode egress` workloads (one port), or remove egressGateway".into(),
                    ));
                }
            }
            _ => {}
        }
    }
    out.extend(shadowed(resources));
    out.extend(policy_conflicts(resources));
    out
}

/// Where the analysis looks names up.
struct Index<'a> {
    /// Every Service with its port numbers.
    services: BTreeMap<ServiceName, Vec<u16>>,
    /// FaultInjections by `namespace/name`.
    faults: BTreeSet<String>,
    /// HTTPRouteGroups by `namespace/name`.
    groups: BTreeMap<String, &'a HttpRouteGroupSpec>,
    /// HTTPRoutes and GRPCRoutes by `namespace/name`, with the Services they attach to.
    routes: BTreeMap<String, Vec<ServiceName>>,
    /// Gateways by name.
    gateways: BTreeMap<ServiceName, (&'a Resource, &'a crate::resource::GatewaySpec)>,
}

impl<'a> Index<'a> {
    fn new(resources: &'a [Resource]) -> Self {
        let mut index = Index {
            services: BTreeMap::new(),
            faults: BTreeSet::new(),
            groups: BTreeMap::new(),
            routes: BTreeMap::new(),
            gateways: BTreeMap::new(),
        };
        for r in resources {
            let ns = r.metadata.namespace();
            let parents = |refs: &[ParentRef]| -> Vec<ServiceName> {
                refs.iter()
                    .filter(|p| !crate::route::parent_is_gateway(p))
                    .map(|p| ServiceName::new(&p.name, p.namespace.as_deref().unwrap_or(ns)))
                    .collect()
            };
            match &r.spec {
                Spec::Service(s) => {
                    index.services.insert(service_name(r), s.ports.iter().map(|p| p.port).collect());
                }
                Spec::FaultInjection(_) => {
                    index.faults.insert(r.key());
                }
                Spec::Gateway(g) => {
                    index.gateways.insert(service_name(r), (r, g));
                }
                Spec::HttpRouteGroup(g) => {
                    index.groups.insert(r.key(), g);
                }
                Spec::HttpRoute(h) => index.routes.entry(r.key()).or_default().extend(parents(&h.parent_refs)),
                Spec::GrpcRoute(g) => index.routes.entry(r.key()).or_default().extend(parents(&g.parent_refs)),
                _ => {}
            }
        }
        index
    }
}

fn service_name(r: &Resource) -> ServiceName {
    ServiceName::new(&r.metadata.name, r.metadata.namespace())
}

fn port_list(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
}

// ---------------------------------------------------------------------------------------------
// HTTPRoute and GRPCRoute

/// The parts of an HTTPRoute or GRPCRoute rule the analysis looks at.
struct RuleView<'a> {
    backends: &'a [BackendRef],
    filters: &'a [HttpRouteFilter],
}

/// Parents and backends that do not exist, rules that can only answer 500, mirrors to missing
/// Services.
fn route(
    index: &Index<'_>,
    object: &str,
    ns: &str,
    parents: &[ParentRef],
    rules: &[RuleView<'_>],
    out: &mut Vec<Finding>,
) {
    for p in parents.iter().filter(|p| !crate::route::parent_is_gateway(p)) {
        let parent = ServiceName::new(&p.name, p.namespace.as_deref().unwrap_or(ns));
        match index.services.get(&parent) {
            None => out.push(Finding::error(
                object,
                format!("attached to Service {parent}, which does not exist"),
                format!("create Service {parent} or fix parentRefs"),
            )),
            Some(ports) => {
                if let Some(port) = p.port
                    && !ports.contains(&port)
                {
                    out.push(Finding::error(
                        object,
                        format!("attached to port {port} of Service {parent}, which has no such port, so the route applies nowhere"),
                        format!("use one of its ports ({}) or omit parentRefs.port", port_list(ports)),
                    ));
                }
            }
        }
    }
    for (ri, rule) in rules.iter().enumerate() {
        for b in rule.backends {
            let backend = ServiceName::new(&b.name, b.namespace.as_deref().unwrap_or(ns));
            if !index.services.contains_key(&backend) {
                out.push(Finding::error(
                    object,
                    format!("rule {ri} sends traffic to Service {backend}, which does not exist (answered with 500 backend not found)"),
                    format!("create Service {backend} or fix backendRefs"),
                ));
            }
        }
        // A redirect answers by itself: its backends are never used.
        let redirects = rule.filters.iter().any(|f| f.filter_type == FilterType::RequestRedirect);
        if rule.backends.is_empty() && !redirects {
            out.push(Finding::error(
                object,
                format!("rule {ri} has no backendRefs, so every matching request gets 500"),
                "add backendRefs (or a RequestRedirect filter)".into(),
            ));
        } else if !redirects && !rule.backends.is_empty() && rule.backends.iter().all(|b| b.weight == 0) {
            out.push(Finding::error(
                object,
                format!("rule {ri}: backend weights sum to 0, so every matching request gets 500"),
                "give at least one backendRef a positive weight".into(),
            ));
        }
        for f in rule.filters {
            if f.filter_type == FilterType::ExtensionRef
                && let Some(e) = &f.extension_ref
            {
                let fault = format!("{ns}/{}", e.name);
                if !index.faults.contains(&fault) {
                    out.push(Finding::error(
                        object,
                        format!("rule {ri} uses FaultInjection {fault}, which does not exist, so every matching request is answered with 500"),
                        format!("create FaultInjection {} in namespace {ns}, or remove the ExtensionRef filter", e.name),
                    ));
                }
            }
            if f.filter_type == FilterType::RequestMirror
                && let Some(m) = &f.request_mirror
            {
                let b = &m.backend_ref;
                let mirror = ServiceName::new(&b.name, b.namespace.as_deref().unwrap_or(ns));
                if !index.services.contains_key(&mirror) {
                    out.push(Finding::error(
                        object,
                        format!(
                            "rule {ri} mirrors requests to Service {mirror}, which does not exist, so no copy is sent"
                        ),
                        format!("create Service {mirror} or fix requestMirror.backendRef"),
                    ));
                }
            }
        }
    }
}

/// Gateway parents that do not exist, or whose listeners the route attaches to none of
/// (sectionName, port, allowedRoutes, hostname intersection).
fn gateway_parents(
    index: &Index<'_>,
    route: &Resource,
    object: &str,
    parents: &[ParentRef],
    hostnames: &[String],
    out: &mut Vec<Finding>,
) {
    let ns = route.metadata.namespace();
    for p in parents.iter().filter(|p| crate::route::parent_is_gateway(p)) {
        let parent = ServiceName::new(&p.name, p.namespace.as_deref().unwrap_or(ns));
        let Some((g, spec)) = index.gateways.get(&parent) else {
            out.push(Finding::error(
                object,
                format!("attached to Gateway {parent}, which does not exist"),
                format!("create Gateway {parent} or fix parentRefs"),
            ));
            continue;
        };
        if crate::gateway::attachments(g, spec, route, p.section_name.as_deref(), p.port, hostnames).is_empty() {
            out.push(Finding::error(
                object,
                format!(
                    "attaches to no listener of Gateway {parent} (sectionName, port, allowedRoutes or hostnames match none), so the route applies nowhere"
                ),
                "fix parentRefs.sectionName/port or the route's hostnames to match a listener".into(),
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SMI

/// A missing root Service (the split applies nowhere), missing backends, weights summing to 0,
/// missing HTTPRouteGroups or matches.
fn traffic_split(index: &Index<'_>, object: &str, ns: &str, t: &TrafficSplitSpec, out: &mut Vec<Finding>) {
    let root = ServiceName::new(&t.service, ns);
    if !index.services.contains_key(&root) {
        out.push(Finding::error(
            object,
            format!("splits the traffic of Service {root}, which does not exist, so the split applies nowhere"),
            format!("create Service {root} or fix spec.service"),
        ));
    }
    for b in &t.backends {
        let backend = ServiceName::new(&b.service, ns);
        if !index.services.contains_key(&backend) {
            out.push(Finding::error(
                object,
                format!(
                    "sends traffic to Service {backend}, which does not exist (answered with 500 backend not found)"
                ),
                format!("create Service {backend} or fix spec.backends"),
            ));
        }
    }
    if !t.backends.is_empty() && t.backends.iter().all(|b| b.weight == 0) {
        out.push(Finding::error(
            object,
            "backend weights sum to 0, so every matching request gets 500".into(),
            "give at least one backend a positive weight".into(),
        ));
    }
    for m in &t.matches {
        group_ref(index, object, ns, m, "spec.matches", "that part of the split matches no request", out);
    }
}

/// Rules naming missing HTTPRouteGroups (or matches): the sources are allowed nothing there.
fn traffic_target(index: &Index<'_>, object: &str, ns: &str, t: &TrafficTargetSpec, out: &mut Vec<Finding>) {
    for r in &t.rules {
        group_ref(index, object, ns, r, "spec.rules", "that rule allows no request", out);
    }
}

/// An SMI reference to an HTTPRouteGroup (in the referrer's namespace) and some of its matches.
fn group_ref(
    index: &Index<'_>,
    object: &str,
    ns: &str,
    r: &SmiRouteRef,
    field: &str,
    consequence: &str,
    out: &mut Vec<Finding>,
) {
    let key = format!("{ns}/{}", r.name);
    match index.groups.get(&key) {
        None => out.push(Finding::error(
            object,
            format!("uses HTTPRouteGroup {key}, which does not exist, so {consequence}"),
            format!("create HTTPRouteGroup {} in namespace {ns} or fix {field}", r.name),
        )),
        Some(group) => {
            for name in r.matches.iter().filter(|n| !group.matches.iter().any(|m| &&m.name == n)) {
                out.push(Finding::error(
                    object,
                    format!(
                        "uses match {name:?} of HTTPRouteGroup {key}, which defines no such match, so {consequence}"
                    ),
                    format!(
                        "use one of its matches ({}) or fix {field}",
                        group.matches.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Policies

/// A `targetRef` naming a Service, port or route that does not exist: the policy selects
/// nothing.
fn policy_target(index: &Index<'_>, object: &str, ns: &str, t: &PolicyTargetRef, out: &mut Vec<Finding>) {
    let target = ServiceName::new(&t.name, t.namespace.as_deref().unwrap_or(ns));
    let Some(ports) = index.services.get(&target) else {
        out.push(Finding::error(
            object,
            format!("targets Service {target}, which does not exist, so it selects nothing"),
            format!("create Service {target} or fix targetRef"),
        ));
        return;
    };
    if let Some(port) = t.port
        && !ports.contains(&port)
    {
        out.push(Finding::error(
            object,
            format!("targets port {port} of Service {target}, which has no such port, so it selects nothing"),
            format!("use one of its ports ({}) or omit targetRef.port", port_list(ports)),
        ));
    }
    if let Some(route) = &t.route {
        // The route may live with the policy or with the Service (GAMMA consumer or producer
        // route); either way it must attach to the target.
        let attached = [ns, target.namespace.as_str()]
            .iter()
            .any(|rns| index.routes.get(&format!("{rns}/{route}")).is_some_and(|parents| parents.contains(&target)));
        if !attached {
            out.push(Finding::error(
                object,
                format!("targets route {route:?} of Service {target}, but no HTTPRoute or GRPCRoute of that name attaches to it, so it selects nothing"),
                format!("fix targetRef.route, or attach route {route} to Service {target}"),
            ));
        }
    }
}

/// How a ResiliencePolicy or RateLimitPolicy ranks among others on the same port (lower
/// wins): Service-wide after port-specific, then the creation time (absent sorts first, as in
/// the compiled model), then `namespace/name`.
type Rank = (bool, String, String);

fn rank(r: &Resource, target: &PolicyTargetRef) -> Rank {
    (target.port.is_none(), r.metadata.creation_timestamp.clone().unwrap_or_default(), r.key())
}

/// A policy that does not apply on a Service because another wins: (kind, loser, winner,
/// Service), mapped to the ports and why the winner wins.
type Lost = (Kind, String, String, ServiceName);

/// Several ResiliencePolicies (or RateLimitPolicies) on one Service port: only one applies
/// there; the others are reported with the one that wins and why. AuthorizationPolicies are not
/// compared: they all apply together.
fn policy_conflicts(resources: &[Resource]) -> Vec<Finding> {
    let snapshot = MeshSnapshot::compile(resources, "check");
    let mut candidates: BTreeMap<(Kind, ServiceName, u16), Vec<(String, Rank)>> = BTreeMap::new();
    for r in resources {
        let target = match &r.spec {
            Spec::ResiliencePolicy(p) => &p.target_ref,
            Spec::RateLimitPolicy(p) => &p.target_ref,
            _ => continue,
        };
        let name = ServiceName::new(&target.name, target.namespace.as_deref().unwrap_or(r.metadata.namespace()));
        let Some(service) = snapshot.services.get(&name) else { continue };
        for port in service.ports.iter().filter(|p| target.port.is_none_or(|x| x == p.port)) {
            candidates.entry((r.kind, name.clone(), port.port)).or_default().push((r.key(), rank(r, target)));
        }
    }
    let mut lost: BTreeMap<Lost, (Vec<u16>, &'static str)> = BTreeMap::new();
    for ((kind, name, port), list) in candidates.into_iter().filter(|(_, l)| l.len() > 1) {
        // The winner is the one the compiled port holds: what the proxies apply.
        let Some(compiled) = snapshot.services.get(&name).and_then(|s| s.port(Some(port))) else { continue };
        let winner = match kind {
            Kind::ResiliencePolicy => compiled.policy.source.clone(),
            _ => compiled.rate_limit.as_ref().map(|l| l.policy.clone()),
        };
        let Some((winner, best)) = winner.and_then(|w| list.iter().find(|(k, _)| *k == w).cloned()) else { continue };
        for (key, r) in list.into_iter().filter(|(k, _)| *k != winner) {
            let why = if !best.0 && r.0 {
                "it names the port, which beats a Service-wide policy"
            } else if best.1 != r.1 {
                "it was created earlier"
            } else {
                "its namespace/name sorts first"
            };
            lost.entry((kind, key, winner.clone(), name.clone())).or_insert((Vec::new(), why)).0.push(port);
        }
    }
    lost.into_iter()
        .map(|((kind, loser, winner, name), (ports, why))| {
            let ports =
                if ports.len() == 1 { format!("port {}", ports[0]) } else { format!("ports {}", port_list(&ports)) };
            Finding::warning(
                &format!("{kind} {loser}"),
                format!("does not apply to Service {name} {ports}: {kind} {winner} targets it too and wins ({why})"),
                format!(
                    "only one {kind} applies per Service port: merge the settings into {winner}, or delete {loser}"
                ),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Shadowed rules

/// Entries whose match is identical to one with higher precedence on the same Service port:
/// they can never be chosen.
///
/// A compiled entry names its route `namespace/name`, without the kind; so a copy of the
/// resources is compiled whose route names carry their kind after a NUL. NUL sorts before
/// every character a name may contain, so entries come in the real order (except between
/// routes of different kinds that share a name, which the real table orders by rule instead).
fn shadowed(resources: &[Resource]) -> Vec<Finding> {
    let tagged: Vec<Resource> = resources
        .iter()
        .cloned()
        .map(|mut r| {
            if matches!(r.kind, Kind::HttpRoute | Kind::GrpcRoute | Kind::TrafficSplit) {
                r.metadata.name = format!("{}\0{}", r.metadata.name, r.kind);
            }
            r
        })
        .collect();
    let snapshot = MeshSnapshot::compile(&tagged, "check");
    // (object, what in it): `HTTPRoute default/a`, `HTTPRoute default/a rule 0`.
    let describe = |route: &str, rule: usize| -> (String, String) {
        let (key, kind) = route.split_once('\0').unwrap_or((route, "HTTPRoute"));
        let object = format!("{kind} {key}");
        // A TrafficSplit is one rule.
        let what = if kind == Kind::TrafficSplit.as_str() { object.clone() } else { format!("{object} rule {rule}") };
        (object, what)
    };
    let mut out = Vec::new();
    let mut reported = BTreeSet::new();
    for service in snapshot.services.values() {
        for port in &service.ports {
            let mut seen: BTreeMap<String, (String, usize)> = BTreeMap::new();
            for e in &port.routes.entries {
                let key = serde_json::to_string(&e.matcher).unwrap_or_default();
                match seen.get(&key) {
                    Some((route, rule)) if !(**route == *e.route && *rule == e.rule) => {
                        if reported.insert((e.route.to_string(), e.rule)) {
                            let (object, what) = describe(&e.route, e.rule);
                            let (_, first) = describe(route, *rule);
                            let subject = what.strip_prefix(&object).unwrap_or_default().trim_start();
                            let subject =
                                if subject.is_empty() { "its match".to_string() } else { subject.to_string() };
                            out.push(Finding::warning(
                                &object,
                                format!("{subject} is shadowed by {first}, which matches the same requests first"),
                                "make the matches differ, or merge the rules".into(),
                            ));
                        }
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(key, (e.route.to_string(), e.rule));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Bookinfo-like Services most tests start from.
    const SERVICES: &str = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{port: 9080}, {port: 9443}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews-v1}\nspec: {ports: [{port: 9080}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews-v2}\nspec: {ports: [{port: 9080}]}\n";

    /// `severity object: message` of every finding for SERVICES plus `yaml`.
    fn findings(yaml: &str) -> Vec<String> {
        let text = format!("{SERVICES}---\n{yaml}");
        let resources = crate::parse_documents("t", &text).expect("valid test input");
        analyze(&resources).iter().map(|f| format!("{:?} {}: {}", f.severity, f.object, f.message)).collect()
    }

    fn assert_one(found: &[String], starts: &str, contains: &str) {
        let hits: Vec<&String> = found.iter().filter(|m| m.starts_with(starts) && m.contains(contains)).collect();
        assert_eq!(hits.len(), 1, "expected one finding starting {starts:?} containing {contains:?} in {found:#?}");
    }

    #[test]
    fn gateway_listener_conflicts_and_routes_attached_to_nothing() {
        let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge}\nspec:\n  listeners:\n  - {name: web, port: 8080, protocol: HTTP, hostname: a.example.com}\n  - {name: web-again, port: 8080, protocol: HTTP, hostname: a.example.com}\n  - {name: tls, port: 8080, protocol: HTTPS, tls: {certificateRefs: [{name: c}]}}\n  - {name: other, port: 9090, protocol: HTTP, hostname: b.example.com}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: ok}\nspec:\n  parentRefs: [{kind: Gateway, name: edge, sectionName: web}]\n  rules: [{backendRefs: [{name: reviews-v1, port: 9080}]}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: no-section}\nspec:\n  parentRefs: [{kind: Gateway, name: edge, sectionName: nope}]\n  rules: [{backendRefs: [{name: reviews-v1, port: 9080}]}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: no-host}\nspec:\n  parentRefs: [{kind: Gateway, name: edge, port: 9090}]\n  hostnames: [c.example.com]\n  rules: [{backendRefs: [{name: reviews-v1, port: 9080}]}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: no-gateway}\nspec:\n  parentRefs: [{kind: Gateway, name: ghost}]\n  rules: [{backendRefs: [{name: reviews-v1, port: 9080}]}]\n";
        let found = findings(yaml);
        assert_one(&found, "Error Gateway default/edge", "listener \"web-again\" conflicts");
        assert_one(&found, "Error Gateway default/edge", "listener \"tls\" conflicts");
        assert_one(&found, "Error HTTPRoute default/no-section", "attaches to no listener of Gateway edge.default");
        assert_one(&found, "Error HTTPRoute default/no-host", "attaches to no listener");
        assert_one(&found, "Error HTTPRoute default/no-gateway", "Gateway ghost.default, which does not exist");
        assert!(!found.iter().any(|f| f.contains("HTTPRoute default/ok")), "{found:#?}");
        assert_eq!(found.iter().filter(|f| f.contains("Gateway default/edge")).count(), 2, "{found:#?}");
    }

    #[test]
    fn finds_missing_services_zero_weights_and_shadowed_rules() {
        let yaml = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{port: 9080}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: a}\nspec:\n  parentRefs: [{name: reviews}, {name: ghost}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /x}}]\n    backendRefs: [{name: reviews}]\n  - backendRefs: [{name: missing}]\n  - matches: [{path: {type: PathPrefix, value: /z}}]\n    backendRefs: [{name: reviews, weight: 0}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: b}\nspec:\n  parentRefs: [{name: reviews}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /x}}]\n    backendRefs: [{name: reviews}]\n";
        let resources = crate::parse_documents("t", yaml).expect("valid");
        let f = analyze(&resources);
        let messages: Vec<String> = f.iter().map(|f| format!("{} {}", f.object, f.message)).collect();
        assert!(messages.iter().any(|m| m.contains("ghost.default, which does not exist")), "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("rule 1 sends traffic to Service missing.default")), "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("rule 2: backend weights sum to 0")), "{messages:?}");
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("HTTPRoute default/b rule 0 is shadowed by HTTPRoute default/a rule 0")),
            "{messages:?}"
        );
        assert_eq!(f.len(), 4, "{messages:?}");
        let clean = crate::parse_documents("t", "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{port: 9080}]}\n").expect("valid");
        assert!(analyze(&clean).is_empty());
    }

    #[test]
    fn routes_attached_to_a_missing_port_or_without_backends() {
        let found = findings(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: reviews, port: 8080}]\n  rules:\n  - matches: [{path: {value: /a}}]\n  - matches: [{path: {value: /b}}]\n    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.com}}]\n  - backendRefs: [{name: reviews-v1}]\n",
        );
        assert_one(
            &found,
            "Error HTTPRoute default/r",
            "attached to port 8080 of Service reviews.default, which has no such port",
        );
        assert_one(
            &found,
            "Error HTTPRoute default/r",
            "rule 0 has no backendRefs, so every matching request gets 500",
        );
        assert_eq!(found.len(), 2, "a redirect rule needs no backends: {found:#?}");
        let ok = findings(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: reviews, port: 9443}]\n  rules:\n  - backendRefs: [{name: reviews-v1}]\n",
        );
        assert!(ok.is_empty(), "{ok:#?}");
    }

    const POLICIES: &str = "apiVersion: plexus.dev/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: res}\nspec:\n  targetRef: {kind: Service, name: ghost}\n  retries: {attempts: 3}\n---\napiVersion: plexus.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: rl}\nspec:\n  targetRef: {kind: Service, name: reviews, port: 1234}\n  requestsPerSecond: 10\n---\napiVersion: plexus.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: authz}\nspec:\n  targetRef: {kind: Service, name: reviews, route: nope}\n  action: deny\n---\napiVersion: plexus.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: authz-ns, namespace: prod}\nspec:\n  targetRef: {kind: Service, name: reviews}\n  action: allow\n";

    #[test]
    fn policies_whose_target_does_not_exist_select_nothing() {
        let found = findings(POLICIES);
        assert_one(
            &found,
            "Error ResiliencePolicy default/res",
            "targets Service ghost.default, which does not exist, so it selects nothing",
        );
        assert_one(
            &found,
            "Error RateLimitPolicy default/rl",
            "targets port 1234 of Service reviews.default, which has no such port, so it selects nothing",
        );
        assert_one(
            &found,
            "Error AuthorizationPolicy default/authz",
            "targets route \"nope\" of Service reviews.default",
        );
        assert_one(
            &found,
            "Error AuthorizationPolicy prod/authz-ns",
            "targets Service reviews.prod, which does not exist",
        );
        assert_eq!(found.len(), 4, "{found:#?}");
    }

    #[test]
    fn policies_on_existing_targets_are_fine() {
        let found = findings(
            "apiVersion: plexus.dev/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: res}\nspec:\n  targetRef: {kind: Service, name: reviews}\n  retries: {attempts: 3}\n---\napiVersion: plexus.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: rl}\nspec:\n  targetRef: {kind: Service, name: reviews, port: 9080}\n  requestsPerSecond: 10\n---\napiVersion: plexus.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: authz-route, namespace: prod}\nspec:\n  targetRef: {kind: Service, name: reviews, namespace: default, route: r}\n  action: deny\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: reviews}]\n  rules: [{backendRefs: [{name: reviews-v1}]}]\n---\napiVersion: plexus.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec:\n  targetRef: {kind: Service, name: reviews}\n  action: allow\n---\napiVersion: plexus.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: b}\nspec:\n  targetRef: {kind: Service, name: reviews}\n  action: deny\n",
        );
        assert!(found.is_empty(), "AuthorizationPolicies combine, they do not conflict: {found:#?}");
    }

    #[test]
    fn extension_ref_to_a_missing_fault_injection() {
        let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: reviews}]\n  rules:\n  - filters: [{type: ExtensionRef, extensionRef: {group: plexus.dev, kind: FaultInjection, name: delay}}]\n    backendRefs: [{name: reviews-v1}]\n";
        let found = findings(route);
        assert_one(
            &found,
            "Error HTTPRoute default/r",
            "rule 0 uses FaultInjection default/delay, which does not exist, so every matching request is answered with 500",
        );
        assert_eq!(found.len(), 1, "{found:#?}");
        let fault = "apiVersion: plexus.dev/v1alpha1\nkind: FaultInjection\nmetadata: {name: delay}\nspec: {delay: {fixed: 1s}}\n---\n";
        assert!(findings(&format!("{fault}{route}")).is_empty());
        let elsewhere = fault.replace("name: delay}", "name: delay, namespace: prod}");
        assert_eq!(
            findings(&format!("{elsewhere}{route}")).len(),
            1,
            "the FaultInjection must be in the route's namespace"
        );
    }

    #[test]
    fn an_egress_gateway_that_is_no_service() {
        let external = |gateway: &str| {
            format!(
                "apiVersion: plexus.dev/v1alpha1\nkind: ExternalService\nmetadata: {{name: api, namespace: apps}}\nspec: {{hosts: [api.example.com], ports: [{{port: 80, protocol: http}}], egressGateway: {gateway}}}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {{name: egress, namespace: edge}}\nspec: {{ports: [{{port: 7443}}]}}\n"
            )
        };
        let found = findings(&external("egress"));
        assert_one(
            &found,
            "Error ExternalService apps/api",
            "egressGateway names Service egress.apps, which does not exist",
        );
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(findings(&external("egress.edge")).is_empty(), "the gateway's Service in its own namespace");
    }

    #[test]
    fn mirror_to_a_missing_service() {
        let route = |to: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: reviews}}]\n  rules:\n  - filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: {to}, port: 9080}}, percent: 100}}}}]\n    backendRefs: [{{name: reviews-v1}}]\n"
            )
        };
        let found = findings(&route("reviews-v9"));
        assert_one(
            &found,
            "Error HTTPRoute default/r",
            "rule 0 mirrors requests to Service reviews-v9.default, which does not exist",
        );
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(findings(&route("reviews-v2")).is_empty());
    }

    const GRPC: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\nspec:\n  parentRefs: [{name: reviews}, {name: ghost}]\n  rules:\n  - matches: [{method: {service: shop.Cart, method: Add}}]\n    backendRefs: [{name: reviews-v1}]\n  - matches: [{method: {service: shop.Cart}}]\n    backendRefs: [{name: reviews-v3}]\n  - matches: [{method: {service: shop.Cart, method: Get}}]\n    backendRefs: [{name: reviews-v1, weight: 0}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: h}\nspec:\n  parentRefs: [{name: reviews}]\n  rules:\n  - matches: [{method: {service: shop.Cart, method: Add}}]\n    backendRefs: [{name: reviews-v2}]\n";

    #[test]
    fn grpc_routes_are_analysed_like_http_routes() {
        let found = findings(GRPC);
        assert_one(&found, "Error GRPCRoute default/g", "attached to Service ghost.default, which does not exist");
        assert_one(
            &found,
            "Error GRPCRoute default/g",
            "rule 1 sends traffic to Service reviews-v3.default, which does not exist",
        );
        assert_one(&found, "Error GRPCRoute default/g", "rule 2: backend weights sum to 0");
        assert_one(
            &found,
            "Warning GRPCRoute default/h",
            "rule 0 is shadowed by GRPCRoute default/g rule 0, which matches the same requests first",
        );
        assert_eq!(found.len(), 4, "{found:#?}");
        let ok =
            GRPC.replace(", {name: ghost}", "").replace("reviews-v3", "reviews-v2").replace(", weight: 0", "").replace(
                "method: Add}}]\n    backendRefs: [{name: reviews-v2}]",
                "method: Remove}}]\n    backendRefs: [{name: reviews-v2}]",
            );
        let found = findings(&ok);
        assert!(found.is_empty(), "{found:#?}");
    }

    #[test]
    fn shadowing_across_kinds_names_each_kind() {
        let found = findings(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: same, creationTimestamp: \"2024-01-01T00:00:00Z\"}\nspec:\n  parentRefs: [{name: reviews, port: 9080}]\n  rules: [{backendRefs: [{name: reviews-v1}]}]\n---\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: same, creationTimestamp: \"2024-02-01T00:00:00Z\"}\nspec:\n  service: reviews\n  backends: [{service: reviews-v1, weight: 50}, {service: reviews-v2, weight: 50}]\n",
        );
        assert_one(
            &found,
            "Warning TrafficSplit default/same",
            "its match is shadowed by HTTPRoute default/same rule 0",
        );
        assert_eq!(found.len(), 1, "{found:#?}");
    }

    const GROUP: &str = "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: api}\nspec:\n  matches:\n  - {name: reads, methods: [GET]}\n---\n";

    #[test]
    fn traffic_split_with_missing_services_or_groups() {
        let found = findings(&format!(
            "{GROUP}apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: s}}\nspec:\n  service: ratings\n  backends: [{{service: reviews-v1, weight: 0}}, {{service: reviews-v7, weight: 0}}]\n  matches:\n  - {{kind: HTTPRouteGroup, name: gone}}\n  - {{kind: HTTPRouteGroup, name: api, matches: [reads, writes]}}\n"
        ));
        assert_one(
            &found,
            "Error TrafficSplit default/s",
            "splits the traffic of Service ratings.default, which does not exist",
        );
        assert_one(
            &found,
            "Error TrafficSplit default/s",
            "sends traffic to Service reviews-v7.default, which does not exist",
        );
        assert_one(&found, "Error TrafficSplit default/s", "backend weights sum to 0");
        assert_one(&found, "Error TrafficSplit default/s", "uses HTTPRouteGroup default/gone, which does not exist");
        assert_one(
            &found,
            "Error TrafficSplit default/s",
            "uses match \"writes\" of HTTPRouteGroup default/api, which defines no such match",
        );
        assert_eq!(found.len(), 5, "{found:#?}");
        let ok = findings(&format!(
            "{GROUP}apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: s}}\nspec:\n  service: reviews\n  backends: [{{service: reviews-v1, weight: 90}}, {{service: reviews-v2, weight: 10}}]\n  matches: [{{kind: HTTPRouteGroup, name: api, matches: [reads]}}]\n"
        ));
        assert!(ok.is_empty(), "{ok:#?}");
    }

    #[test]
    fn traffic_target_with_a_missing_group() {
        let target = |group: &str| {
            format!(
                "{GROUP}apiVersion: access.smi-spec.io/v1alpha4\nkind: TrafficTarget\nmetadata: {{name: t}}\nspec:\n  destination: {{kind: ServiceAccount, name: reviews}}\n  sources: [{{kind: ServiceAccount, name: productpage}}]\n  rules: [{{kind: HTTPRouteGroup, name: {group}}}]\n"
            )
        };
        let found = findings(&target("missing"));
        assert_one(
            &found,
            "Error TrafficTarget default/t",
            "uses HTTPRouteGroup default/missing, which does not exist, so that rule allows no request",
        );
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(findings(&target("api")).is_empty());
    }

    fn resilience(name: &str, port: Option<u16>, created: &str) -> String {
        let port = port.map(|p| format!(", port: {p}")).unwrap_or_default();
        format!(
            "apiVersion: plexus.dev/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: {name}, creationTimestamp: \"{created}\"}}\nspec:\n  targetRef: {{kind: Service, name: reviews{port}}}\n  timeouts: {{request: 1s}}\n---\n"
        )
    }

    #[test]
    fn conflicting_policies_name_the_winner() {
        // Port-specific beats Service-wide, even when newer; the Service-wide one still applies
        // on the other port.
        let found = findings(
            &(resilience("wide", None, "2024-01-01T00:00:00Z")
                + &resilience("port", Some(9080), "2024-06-01T00:00:00Z")),
        );
        assert_eq!(
            found,
            [
                "Warning ResiliencePolicy default/wide: does not apply to Service reviews.default port 9080: ResiliencePolicy default/port targets it too and wins (it names the port, which beats a Service-wide policy)"
            ]
        );
        // Equal specificity: the older wins, on both ports.
        let found = findings(
            &(resilience("new", None, "2024-06-01T00:00:00Z") + &resilience("old", None, "2024-01-01T00:00:00Z")),
        );
        assert_eq!(
            found,
            [
                "Warning ResiliencePolicy default/new: does not apply to Service reviews.default ports 9080, 9443: ResiliencePolicy default/old targets it too and wins (it was created earlier)"
            ]
        );
        // Same age: namespace/name order.
        let found = findings(
            &(resilience("b", Some(9443), "2024-01-01T00:00:00Z")
                + &resilience("a", Some(9443), "2024-01-01T00:00:00Z")),
        );
        assert_one(
            &found,
            "Warning ResiliencePolicy default/b",
            "ResiliencePolicy default/a targets it too and wins (its namespace/name sorts first)",
        );
        assert_eq!(found.len(), 1);
        // RateLimitPolicies the same way.
        let rl = |name: &str, created: &str| {
            format!(
                "apiVersion: plexus.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}, creationTimestamp: \"{created}\"}}\nspec:\n  targetRef: {{kind: Service, name: reviews-v1}}\n  requestsPerSecond: 5\n---\n"
            )
        };
        let found = findings(&(rl("rl-x", "2024-03-01T00:00:00Z") + &rl("rl-y", "2024-02-01T00:00:00Z")));
        assert_eq!(
            found,
            [
                "Warning RateLimitPolicy default/rl-x: does not apply to Service reviews-v1.default port 9080: RateLimitPolicy default/rl-y targets it too and wins (it was created earlier)"
            ]
        );
    }

    #[test]
    fn policies_on_different_ports_or_kinds_do_not_conflict() {
        let rl = "apiVersion: plexus.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: wide}\nspec:\n  targetRef: {kind: Service, name: reviews}\n  requestsPerSecond: 5\n---\n";
        let found = findings(
            &(resilience("a", Some(9080), "2024-01-01T00:00:00Z")
                + &resilience("b", Some(9443), "2024-01-01T00:00:00Z")
                + rl),
        );
        assert!(found.is_empty(), "{found:#?}");
    }
}
