//! Authorization at the destination (SPEC §4): AuthorizationPolicies and SMI TrafficTargets
//! compiled per Service port, and the decision for one request — a pure function that the
//! inbound sidecar and `plexus explain` both run.
//!
//! The rules, in order:
//! 1. A policy applies to the Service (or the one port) its `targetRef` names; with
//!    `targetRef.route`, only to the requests that route matches at the destination.
//! 2. A matching `deny` policy denies.
//! 3. Otherwise, when any `allow` policy applies, the request is allowed only if one of their
//!    rules matches; if none does, it is denied in the name of the first of them (oldest, then
//!    `namespace/name`), so `x-plexus-error: denied by <namespace>/<policy>` names a policy the
//!    operator can look at.
//! 4. Otherwise MeshConfig `defaultAuthorization` decides: `allow`, `authenticated` (any peer
//!    with a verified identity) or `deny`.
//!
//! `audit` policies never change the decision. An audit policy is an allow-list on trial (the
//! way Linkerd's audit mode is used before enforcing): each request it would have denied —
//! one matching none of its rules — is reported, so switching it to `allow` holds no surprise.
//!
//! Matching: a policy without rules matches every request; a rule matches when its `from` and
//! its `to` both match (an absent part matches all). Within `from`, every entry of every list
//! names sources, and any one of them matching is enough: `identities` are exact SPIFFE IDs
//! (`*` = any authenticated peer), `serviceAccounts` are `NAME` (the policy's namespace) or
//! `NS/NAME` turned into SPIFFE IDs of the mesh trust domain, `namespaces` match the peer's
//! `/ns/<namespace>/` segment, and `unauthenticated: true` matches a request without a peer
//! identity. Within `to`, each non-empty list is a condition and all must hold: `paths`
//! (exact, or a prefix with a trailing `*`; `*` alone is any path), `methods` (exact; `GET`
//! also matches `HEAD`, which runs the GET handler) and
//! `ports` (the Service port). Paths are compared as [`crate::normalize`] made them — the
//! path the application receives — so `/public/../admin` cannot slip past a rule about
//! `/admin`, and `/public%2F..%2Fadmin` never gets this far (400). A path with segment
//! parameters (`/admin;x`) is decided under both readings backends give it (see [`decide`]).
//!
//! An SMI TrafficTarget becomes an `allow` policy named `<namespace>/<name>` on every Service
//! port with an endpoint running as its destination service account: only the listed source
//! service accounts may call, and when it has rules, only with requests matching the named
//! HTTPRouteGroup matches (SMI is deny-by-default for a destination with a TrafficTarget).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::HeaderMap;
use regex::Regex;
use serde::Serialize;

use crate::model::{CompiledService, MeshSettings};
use crate::names::{ServiceName, spiffe_id};
use crate::resource::{
    AuthorizationAction, AuthorizationFrom, AuthorizationPolicySpec, AuthorizationTo, DefaultAuthorization,
    HttpRouteGroupSpec, Resource, SmiHttpMatch, Spec, TrafficTargetSpec,
};
use crate::route::{Matcher, PathMatcher, RequestInfo, ValueMatcher, ValuePattern};

/// The authorization policies of one Service port, oldest first (then by `namespace/name`).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct Authorization {
    pub policies: Vec<Arc<AuthzPolicy>>,
}

impl Authorization {
    /// Whether no policy applies to the port (the mesh default decides every request).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Whether some policy is scoped to a route, so the decision needs the route the request
    /// matches at the destination.
    pub fn needs_route(&self) -> bool {
        self.policies.iter().any(|p| !p.routes.is_empty())
    }

    /// The first allow or deny policy with an HTTP-level condition (`to.paths`, `to.methods`,
    /// HTTPRouteGroup matches, or `targetRef.route`), if any. On such a port a connection that
    /// is not HTTP is refused in its name: it carries no method or path such a rule could
    /// judge, while the application may still read HTTP in it (SPEC §5).
    pub fn http_policy(&self) -> Option<&AuthzPolicy> {
        self.policies.iter().find(|p| p.action != AuthorizationAction::Audit && p.is_http_level()).map(|p| &**p)
    }
}

/// The resource a compiled policy comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PolicyKind {
    AuthorizationPolicy,
    TrafficTarget,
}

/// One compiled AuthorizationPolicy or TrafficTarget.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzPolicy {
    /// `namespace/name`.
    pub name: String,
    pub kind: PolicyKind,
    pub action: AuthorizationAction,
    /// With `targetRef.route`: the keys (`namespace/name`) the route may have — in the
    /// policy's namespace or the Service's, as `plexus check` accepts it. The policy applies
    /// only to requests matched by such a route. Empty: every request to the port.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    /// Empty: the policy matches every request.
    pub rules: Vec<AuthzRule>,
}

/// `from` AND `to`; an absent part matches all.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuthzRule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Sources>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<Operations>,
}

/// Who may send the request: any entry matching is enough.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sources {
    /// Exact SPIFFE IDs (`identities`, and `serviceAccounts` turned into IDs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// `identities: ["*"]`: any peer with a verified identity.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub any_authenticated: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// A request without a peer identity (plaintext, or TLS without a mesh certificate).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
}

/// What the request asks for: every non-empty condition must hold.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Operations {
    /// Exact paths, prefixes ending in `*`, or `*`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Service ports.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// HTTPRouteGroup matches of a TrafficTarget's rules, one of which must match; `Some` and
    /// empty (every group missing) matches nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<Vec<Matcher>>,
}

/// The parts of a request authorization looks at.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// The peer's verified SPIFFE ID; `None` when unauthenticated.
    pub peer: Option<&'a str>,
    pub method: &'a str,
    /// The normalized path ([`crate::normalize::normalize_path`]), without query: the path
    /// forwarded to the application.
    pub path: &'a str,
    /// The Service port the request is for.
    pub port: u16,
    /// `namespace/name` of the route the request matches at the destination, if any (needed
    /// only when [`Authorization::needs_route`]).
    pub route: Option<&'a str>,
    /// Request headers (HTTPRouteGroup header matches of TrafficTargets).
    pub headers: &'a HeaderMap,
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzDecision {
    pub allowed: bool,
    /// Who decided: the policy's `namespace/name` (AuthorizationPolicy or TrafficTarget), or
    /// `mesh default (allow|authenticated|deny)` (see [`mesh_default`]).
    pub policy: String,
    /// `namespace/name` of each audit policy that would have denied the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<String>,
}

impl AuthzDecision {
    /// The `x-plexus-error` reason of a denial: `denied by <policy>`.
    pub fn denial(&self) -> Option<String> {
        (!self.allowed).then(|| format!("denied by {}", self.policy))
    }
}

/// How a decision by the MeshConfig default is named: `mesh default (deny)`.
pub fn mesh_default(default: DefaultAuthorization) -> String {
    let name = match default {
        DefaultAuthorization::Allow => "allow",
        DefaultAuthorization::Authenticated => "authenticated",
        DefaultAuthorization::Deny => "deny",
    };
    format!("mesh default ({name})")
}

/// Decides whether `req` may reach the destination whose port holds `authz`; `default` is the
/// MeshConfig `defaultAuthorization`.
///
/// A path with segment parameters (`/admin;x`, `/a;v=1/b`, or `;` encoded as `%3B`) has two
/// readings: the path as forwarded (how Flask, Express, Go read it) and the path with each
/// segment's parameters removed (how servlet containers — Tomcat, Jetty, Spring — read it:
/// `/admin;x` is `/admin`). The request is decided under both, and is allowed only if both
/// allow it; otherwise the first denial is the decision. So a deny on `/admin` covers
/// `/admin;x` whichever backend serves it, and an allow-list cannot be entered through a
/// spelling one backend reads differently.
pub fn decide(authz: &Authorization, req: &AuthzRequest<'_>, default: DefaultAuthorization) -> AuthzDecision {
    let forwarded = decide_path(authz, req, req.path, default);
    let Some(stripped) = crate::normalize::without_segment_parameters(req.path) else {
        return forwarded;
    };
    let servlet = decide_path(authz, req, &stripped, default);
    // An audit policy is reported when it would have denied either reading.
    let (mut decision, other) = if forwarded.allowed { (servlet, forwarded) } else { (forwarded, servlet) };
    for a in other.audit {
        if !decision.audit.contains(&a) {
            decision.audit.push(a);
        }
    }
    decision
}

/// [`decide`] for one reading of the path.
fn decide_path(
    authz: &Authorization,
    req: &AuthzRequest<'_>,
    path: &str,
    default: DefaultAuthorization,
) -> AuthzDecision {
    let applicable = || authz.policies.iter().filter(|p| p.applies_to(req.route));
    let matches = |p: &AuthzPolicy| p.matches(req, path);
    let audit: Vec<String> = applicable()
        .filter(|p| p.action == AuthorizationAction::Audit && !matches(p))
        .map(|p| p.name.clone())
        .collect();
    if let Some(p) = applicable().find(|p| p.action == AuthorizationAction::Deny && matches(p)) {
        return AuthzDecision { allowed: false, policy: p.name.clone(), audit };
    }
    let mut allows = applicable().filter(|p| p.action == AuthorizationAction::Allow).peekable();
    if let Some(first) = allows.peek().map(|p| p.name.clone()) {
        return match allows.find(|p| matches(p)) {
            Some(p) => AuthzDecision { allowed: true, policy: p.name.clone(), audit },
            None => AuthzDecision { allowed: false, policy: first, audit },
        };
    }
    let allowed = match default {
        DefaultAuthorization::Allow => true,
        DefaultAuthorization::Authenticated => req.peer.is_some(),
        DefaultAuthorization::Deny => false,
    };
    AuthzDecision { allowed, policy: mesh_default(default), audit }
}

impl AuthzPolicy {
    /// Whether the policy concerns a request that matched `route` at the destination.
    fn applies_to(&self, route: Option<&str>) -> bool {
        self.routes.is_empty() || route.is_some_and(|r| self.routes.iter().any(|k| k == r))
    }

    fn matches(&self, req: &AuthzRequest<'_>, path: &str) -> bool {
        self.rules.is_empty() || self.rules.iter().any(|r| r.matches(req, path))
    }

    fn is_http_level(&self) -> bool {
        !self.routes.is_empty()
            || self
                .rules
                .iter()
                .filter_map(|r| r.to.as_ref())
                .any(|t| !t.paths.is_empty() || !t.methods.is_empty() || t.requests.is_some())
    }

    /// Compiles an AuthorizationPolicy; `serviceAccounts` become SPIFFE IDs of `trust_domain`.
    pub fn from_policy(r: &Resource, spec: &AuthorizationPolicySpec, trust_domain: &str) -> AuthzPolicy {
        let ns = r.metadata.namespace();
        let t = &spec.target_ref;
        let routes = match &t.route {
            None => Vec::new(),
            Some(route) => {
                let mut keys = vec![format!("{ns}/{route}")];
                let service_ns = t.namespace.as_deref().unwrap_or(ns);
                if service_ns != ns {
                    keys.push(format!("{service_ns}/{route}"));
                }
                keys
            }
        };
        let rules = spec
            .rules
            .iter()
            .map(|rule| AuthzRule {
                from: rule.from.as_ref().and_then(|f| Sources::from_spec(f, ns, trust_domain)),
                to: rule.to.as_ref().and_then(Operations::from_spec),
            })
            .collect();
        AuthzPolicy { name: r.key(), kind: PolicyKind::AuthorizationPolicy, action: spec.action, routes, rules }
    }

    /// Compiles a TrafficTarget into an allow policy; `groups` are the HTTPRouteGroups by
    /// `namespace/name`. A rule naming a missing group (or missing matches) allows nothing.
    pub fn from_traffic_target(
        r: &Resource,
        spec: &TrafficTargetSpec,
        groups: &BTreeMap<String, &HttpRouteGroupSpec>,
        trust_domain: &str,
    ) -> AuthzPolicy {
        let ns = r.metadata.namespace();
        let sources = Sources {
            identities: spec
                .sources
                .iter()
                .map(|s| spiffe_id(trust_domain, s.namespace.as_deref().unwrap_or(ns), &s.name))
                .collect(),
            ..Sources::default()
        };
        let to = (!spec.rules.is_empty()).then(|| {
            let mut requests = Vec::new();
            for rule in &spec.rules {
                let Some(group) = groups.get(&format!("{ns}/{}", rule.name)) else { continue };
                for m in group.matches.iter().filter(|m| rule.matches.is_empty() || rule.matches.contains(&m.name)) {
                    requests.extend(smi_matchers(m));
                }
            }
            Operations { requests: Some(requests), ..Operations::default() }
        });
        AuthzPolicy {
            name: r.key(),
            kind: PolicyKind::TrafficTarget,
            action: AuthorizationAction::Allow,
            routes: Vec::new(),
            rules: vec![AuthzRule { from: Some(sources), to }],
        }
    }
}

impl AuthzRule {
    fn matches(&self, req: &AuthzRequest<'_>, path: &str) -> bool {
        self.from.as_ref().is_none_or(|f| f.matches(req.peer)) && self.to.as_ref().is_none_or(|t| t.matches(req, path))
    }
}

impl Sources {
    /// `None` when `from` names no source at all (then it places no condition).
    fn from_spec(from: &AuthorizationFrom, namespace: &str, trust_domain: &str) -> Option<Sources> {
        let mut s = Sources {
            namespaces: from.namespaces.clone(),
            unauthenticated: from.unauthenticated == Some(true),
            ..Sources::default()
        };
        for id in &from.identities {
            if id == "*" {
                s.any_authenticated = true;
            } else {
                s.identities.push(id.clone());
            }
        }
        s.identities.extend(from.service_accounts.iter().map(|sa| match sa.split_once('/') {
            Some((ns, name)) => spiffe_id(trust_domain, ns, name),
            None => spiffe_id(trust_domain, namespace, sa),
        }));
        (s != Sources::default()).then_some(s)
    }

    /// Whether a peer with this verified identity (`None`: unauthenticated) is one of them.
    pub fn matches(&self, peer: Option<&str>) -> bool {
        match peer {
            None => self.unauthenticated,
            Some(id) => {
                self.any_authenticated
                    || self.identities.iter().any(|i| i == id)
                    || spiffe_namespace(id).is_some_and(|ns| self.namespaces.iter().any(|n| n == ns))
            }
        }
    }
}

impl Operations {
    /// `None` when `to` has no condition.
    fn from_spec(to: &AuthorizationTo) -> Option<Operations> {
        let ops = Operations {
            paths: to.paths.clone(),
            methods: to.methods.clone(),
            ports: to.ports.clone(),
            requests: None,
        };
        (!(ops.paths.is_empty() && ops.methods.is_empty() && ops.ports.is_empty())).then_some(ops)
    }

    /// Whether the request satisfies every condition; `path` is already normalized.
    fn matches(&self, req: &AuthzRequest<'_>, path: &str) -> bool {
        (self.paths.is_empty() || self.paths.iter().any(|p| path_matches(p, path)))
            && (self.methods.is_empty() || self.methods.iter().any(|m| method_matches(m, req.method)))
            && (self.ports.is_empty() || self.ports.contains(&req.port))
            && self.requests.as_ref().is_none_or(|ms| {
                let info = RequestInfo { method: req.method, path, query: None, headers: req.headers };
                ms.iter().any(|m| m.matches(&info))
            })
    }
}

/// Methods match exactly (case-sensitive), and a rule naming `GET` also matches `HEAD`: HEAD is
/// GET without the body (RFC 9110 §9.3.2), and frameworks (Flask, Express, Go's mux, Spring)
/// run the GET handler for it, so a deny on GET must cover HEAD and an allow of GET admits it.
fn method_matches(rule: &str, method: &str) -> bool {
    rule == method || (rule == "GET" && method == "HEAD")
}

/// `*` matches any path; `/p/*` any path starting with `/p/`; otherwise the exact path.
fn path_matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => path == pattern,
    }
}

/// The namespace of a SPIFFE ID of the form `spiffe://<trust-domain>/ns/<namespace>/...`.
pub fn spiffe_namespace(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let (_, path) = rest.split_once('/')?;
    let mut segments = path.split('/');
    if segments.next()? != "ns" {
        return None;
    }
    segments.next().filter(|ns| !ns.is_empty())
}

/// An HTTPRouteGroup match as route matchers: one per listed method (`*` or none: any).
fn smi_matchers(m: &SmiHttpMatch) -> Vec<Matcher> {
    let anchored = |pattern: &str| Regex::new(&format!("^(?:{pattern})$")).ok();
    let path = match &m.path_regex {
        Some(r) => match anchored(r) {
            Some(re) => PathMatcher::RegularExpression(re),
            None => return Vec::new(),
        },
        None => PathMatcher::PathPrefix("/".into()),
    };
    let Some(headers) = m
        .headers
        .iter()
        .map(|(k, v)| {
            Some(ValueMatcher { name: k.to_ascii_lowercase(), value: ValuePattern::RegularExpression(anchored(v)?) })
        })
        .collect::<Option<Vec<_>>>()
    else {
        return Vec::new();
    };
    let methods: Vec<Option<String>> = if m.methods.is_empty() || m.methods.iter().any(|x| x == "*") {
        vec![None]
    } else {
        m.methods.iter().cloned().map(Some).collect()
    };
    methods
        .into_iter()
        .map(|method| Matcher { path: path.clone(), method, headers: headers.clone(), query_params: Vec::new() })
        .collect()
}

/// A policy waiting to be ordered on a port: (creation time, `namespace/name`).
type Staged = ((String, String), Arc<AuthzPolicy>);

/// Compiles every AuthorizationPolicy and TrafficTarget and attaches each to the Service ports
/// it applies to (see the module documentation).
pub(crate) fn attach_all(
    resources: &[Resource],
    mesh: &MeshSettings,
    services: &mut BTreeMap<ServiceName, CompiledService>,
) {
    let groups: BTreeMap<String, &HttpRouteGroupSpec> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::HttpRouteGroup(g) => Some((r.key(), g)),
            _ => None,
        })
        .collect();
    let mut staged: HashMap<(ServiceName, u16), Vec<Staged>> = HashMap::new();
    for r in resources {
        let rank = (r.metadata.creation_timestamp.clone().unwrap_or_default(), r.key());
        let ns = r.metadata.namespace();
        match &r.spec {
            Spec::AuthorizationPolicy(spec) => {
                let t = &spec.target_ref;
                let target = ServiceName::new(&t.name, t.namespace.as_deref().unwrap_or(ns));
                let Some(service) = services.get(&target) else { continue };
                let policy = Arc::new(AuthzPolicy::from_policy(r, spec, &mesh.trust_domain));
                for port in service.ports.iter().filter(|p| t.port.is_none_or(|x| x == p.port)) {
                    staged.entry((target.clone(), port.port)).or_default().push((rank.clone(), policy.clone()));
                }
            }
            Spec::TrafficTarget(spec) => {
                let dest_ns = spec.destination.namespace.as_deref().unwrap_or(ns);
                let dest_sa = spec.destination.name.as_str();
                let dest_port = spec.destination.port;
                let policy = Arc::new(AuthzPolicy::from_traffic_target(r, spec, &groups, &mesh.trust_domain));
                for (name, service) in services.iter() {
                    for port in &service.ports {
                        let runs_as_destination = port.endpoints.iter().any(|e| {
                            e.namespace == dest_ns
                                && e.service_account == dest_sa
                                && dest_port.is_none_or(|d| d == port.port || d == e.app_port)
                        });
                        if runs_as_destination {
                            staged.entry((name.clone(), port.port)).or_default().push((rank.clone(), policy.clone()));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    for ((name, port), mut policies) in staged {
        policies.sort_by(|(a, _), (b, _)| a.cmp(b));
        if let Some(p) = services.get_mut(&name).and_then(|s| s.ports.iter_mut().find(|p| p.port == port)) {
            p.authorization = Arc::new(Authorization { policies: policies.into_iter().map(|(_, p)| p).collect() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::parse_documents;
    use crate::model::MeshSnapshot;
    use crate::route::RequestInfo as RouteRequest;

    const PRODUCTPAGE: &str = "spiffe://plexus.local/ns/default/sa/productpage";
    const INTRUDER: &str = "spiffe://plexus.local/ns/default/sa/intruder";
    const PROD_BATCH: &str = "spiffe://plexus.local/ns/prod/sa/batch";

    const SERVICE: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}, {name: admin, port: 9090}]
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: reviews-1, labels: {app: reviews}}
spec: {address: 127.0.0.1, ports: [{name: http, port: 7001, targetPort: 9001}, {name: admin, port: 7001, targetPort: 9002}], serviceAccount: reviews, meshed: true}
"#;

    /// A snapshot of the reviews Service plus `extra` documents.
    fn snapshot(extra: &str) -> MeshSnapshot {
        let text = if extra.is_empty() { SERVICE.to_string() } else { format!("{SERVICE}---\n{extra}") };
        MeshSnapshot::compile(&parse_documents("t", &text).expect("valid resources"), "1")
    }

    fn policy(name: &str, action: &str, target: &str, rules: &str) -> String {
        format!(
            "apiVersion: plexus.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}}}\nspec:\n  targetRef: {{kind: Service, {target}}}\n  action: {action}\n  rules: {rules}\n"
        )
    }

    /// A request for `path` (GET unless `method` says otherwise) to reviews `port`.
    struct Req<'a> {
        peer: Option<&'a str>,
        method: &'a str,
        path: &'a str,
        port: u16,
        headers: HeaderMap,
    }

    fn req<'a>(peer: Option<&'a str>, path: &'a str) -> Req<'a> {
        Req { peer, method: "GET", path, port: 9080, headers: HeaderMap::new() }
    }

    /// Decides as the destination sidecar does: the port's routes give the route.
    fn decide_on(snap: &MeshSnapshot, r: &Req<'_>) -> AuthzDecision {
        let (_, port) = snap.resolve_authority(&format!("reviews:{}", r.port)).expect("port");
        // The proxy normalizes the path first (and answers 400 to what it refuses).
        let path = crate::normalize::normalize_path(r.path, Default::default()).expect("a path the proxy forwards");
        let info = RouteRequest { method: r.method, path: &path, query: None, headers: &r.headers };
        let route = port.routes.find(&info).map(|e| &*e.route);
        let request =
            AuthzRequest { peer: r.peer, method: r.method, path: &path, port: r.port, route, headers: &r.headers };
        decide(&port.authorization, &request, snap.mesh.default_authorization)
    }

    fn allowed(snap: &MeshSnapshot, r: &Req<'_>) -> bool {
        decide_on(snap, r).allowed
    }

    #[test]
    fn mesh_default_decides_without_policies() {
        let snap = snapshot("");
        let d = decide_on(&snap, &req(None, "/"));
        assert_eq!(d, AuthzDecision { allowed: true, policy: "mesh default (allow)".into(), audit: vec![] });
        assert_eq!(d.denial(), None);
        let mesh = |mode: &str| {
            snapshot(&format!(
                "apiVersion: plexus.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default}}\nspec: {{defaultAuthorization: {mode}}}\n"
            ))
        };
        let deny = mesh("deny");
        let d = decide_on(&deny, &req(Some(PRODUCTPAGE), "/"));
        assert!(!d.allowed);
        assert_eq!(d.denial().as_deref(), Some("denied by mesh default (deny)"));
        let authn = mesh("authenticated");
        assert!(allowed(&authn, &req(Some(INTRUDER), "/")), "any identity is authenticated");
        let d = decide_on(&authn, &req(None, "/"));
        assert_eq!(d.denial().as_deref(), Some("denied by mesh default (authenticated)"));
        assert!(allowed(&mesh("allow"), &req(None, "/")));
    }

    #[test]
    fn allow_policies_are_an_allow_list() {
        let snap = snapshot(&policy(
            "public",
            "allow",
            "name: reviews",
            "[{from: {unauthenticated: true}, to: {paths: [\"/public/*\", /health], methods: [GET, HEAD]}}]",
        ));
        assert!(allowed(&snap, &req(None, "/public/x")));
        assert!(allowed(&snap, &req(None, "/public/")));
        assert!(allowed(&snap, &req(None, "/health")));
        assert!(!allowed(&snap, &req(None, "/healthz")), "exact path");
        assert!(!allowed(&snap, &req(None, "/public")), "the prefix is /public/");
        let d = decide_on(&snap, &req(None, "/private"));
        assert_eq!(d.denial().as_deref(), Some("denied by default/public"));
        assert!(!allowed(&snap, &Req { method: "POST", ..req(None, "/public/x") }), "methods ANDed with paths");
        assert!(!allowed(&snap, &req(Some(PRODUCTPAGE), "/public/x")), "only unauthenticated sources");
        assert!(allowed(&snap, &Req { port: 9090, ..req(None, "/public/x") }), "Service-wide: both ports");
        assert!(!allowed(&snap, &Req { port: 9090, ..req(None, "/private") }));

        // A second allow policy widens the list; a denial names the oldest allow policy.
        let both = snapshot(&format!(
            "{}---\n{}",
            policy("public", "allow", "name: reviews", "[{to: {paths: [\"/public/*\"]}}]"),
            policy("callers", "allow", "name: reviews", "[{from: {serviceAccounts: [productpage]}}]"),
        ));
        assert!(allowed(&both, &req(None, "/public/a")));
        let d = decide_on(&both, &req(Some(PRODUCTPAGE), "/private"));
        assert_eq!((d.allowed, d.policy.as_str()), (true, "default/callers"));
        let d = decide_on(&both, &req(Some(INTRUDER), "/private"));
        assert_eq!(d.denial().as_deref(), Some("denied by default/callers"), "default/callers sorts first");
    }

    #[test]
    fn deny_beats_allow() {
        let snap = snapshot(&format!(
            "{}---\n{}",
            policy("everyone", "allow", "name: reviews", "[{}]"),
            policy("no-admin", "deny", "name: reviews", "[{to: {paths: [\"/admin/*\"]}}]"),
        ));
        assert!(allowed(&snap, &req(None, "/x")));
        let d = decide_on(&snap, &req(Some(PRODUCTPAGE), "/admin/users"));
        assert_eq!(d.denial().as_deref(), Some("denied by default/no-admin"));
        // Normalized paths cannot slip past the deny rule.
        for sneaky in ["/public/../admin/users", "//admin/users", "/%61dmin/users", "/./admin/x", "/x/%2e%2e/admin/y"] {
            assert!(!allowed(&snap, &req(None, sneaky)), "{sneaky} must be denied");
        }
        // Ambiguous spellings never reach the decision: the proxy answers 400.
        for refused in ["/admin%2Fusers", "/admin%5Cusers", "/public/..;x/admin/users", "/admin%252Fusers"] {
            assert!(crate::normalize::normalize_path(refused, Default::default()).is_err(), "{refused}");
        }
        // A deny without rules denies everything, even under a mesh default of allow.
        let all = snapshot(&policy("closed", "deny", "name: reviews", "[]"));
        assert_eq!(decide_on(&all, &req(Some(PRODUCTPAGE), "/")).denial().as_deref(), Some("denied by default/closed"));
    }

    /// Issue 16: `/admin;x` is `/admin` to a servlet container; a deny on `/admin` covers every
    /// spelling with segment parameters, and an allow-list is not entered through one.
    #[test]
    fn segment_parameters_are_decided_under_both_readings() {
        let snap = snapshot(&policy(
            "no-admin",
            "deny",
            "name: reviews",
            "[{to: {paths: [/admin, \"/admin/*\", \"/api/internal/*\"]}}]",
        ));
        for sneaky in [
            "/admin;x",
            "/admin;",
            "/admin;jsessionid=0123",
            "/admin%3Bx",
            "/admin%3bx",
            "/;x/admin",
            "/admin;x/users",
            "/admin/users;v=1",
            "/api;x/internal;y/keys",
            "//admin;x",
            "/public/../admin;x",
        ] {
            let d = decide_on(&snap, &req(Some(PRODUCTPAGE), sneaky));
            assert_eq!(d.denial().as_deref(), Some("denied by default/no-admin"), "{sneaky}");
        }
        // Positive controls: parameters elsewhere, and lookalike names, still pass.
        for fine in ["/public;x", "/a/b;c/admin", "/administrator;x", "/x;admin", "/api/public;v=1/keys", "/"] {
            assert!(allowed(&snap, &req(Some(PRODUCTPAGE), fine)), "{fine}");
        }
        // An allow-list: a parameter cannot turn a private path into an allowed one, nor the
        // other way round for an allowed one.
        let list = snapshot(&policy("public", "allow", "name: reviews", "[{to: {paths: [\"/public/*\"]}}]"));
        assert!(allowed(&list, &req(None, "/public/a;v=1")));
        // `/public;x/a` is not under `/public/` for a backend that keeps parameters.
        for denied in ["/private;/public/x", "/private;x", "/public;x", "/;x", "/public;x/a"] {
            assert_eq!(
                decide_on(&list, &req(None, denied)).denial().as_deref(),
                Some("denied by default/public"),
                "{denied}"
            );
        }
    }

    /// Issue 16: a rule naming GET also matches HEAD (GET without a body; frameworks run the GET
    /// handler for it); other methods stay exact.
    #[test]
    fn get_in_a_rule_covers_head() {
        let snap =
            snapshot(&policy("no-get", "deny", "name: reviews", "[{to: {paths: [\"/admin/*\"], methods: [GET]}}]"));
        for method in ["GET", "HEAD"] {
            let d = decide_on(&snap, &Req { method, ..req(None, "/admin/x") });
            assert_eq!(d.denial().as_deref(), Some("denied by default/no-get"), "{method}");
        }
        // Positive controls: other methods and other paths pass.
        for (method, path) in [("POST", "/admin/x"), ("OPTIONS", "/admin/x"), ("HEAD", "/public"), ("GET", "/public")] {
            assert!(allowed(&snap, &Req { method, ..req(None, path) }), "{method} {path}");
        }
        // A deny on HEAD does not deny GET; an allow of GET admits HEAD, not POST.
        let head = snapshot(&policy("no-head", "deny", "name: reviews", "[{to: {methods: [HEAD]}}]"));
        assert!(allowed(&head, &req(None, "/x")));
        assert!(!allowed(&head, &Req { method: "HEAD", ..req(None, "/x") }));
        let reads = snapshot(&policy("reads", "allow", "name: reviews", "[{to: {methods: [GET]}}]"));
        assert!(allowed(&reads, &Req { method: "HEAD", ..req(None, "/x") }));
        assert!(!allowed(&reads, &Req { method: "POST", ..req(None, "/x") }));
    }

    #[test]
    fn sources_identities_service_accounts_and_namespaces() {
        let snap = snapshot(&policy(
            "callers",
            "allow",
            "name: reviews",
            "[{from: {serviceAccounts: [productpage, prod/batch]}}, {from: {identities: [\"spiffe://other.domain/ns/x/sa/y\"]}}, {from: {namespaces: [staging]}}]",
        ));
        assert!(allowed(&snap, &req(Some(PRODUCTPAGE), "/")));
        assert!(allowed(&snap, &req(Some(PROD_BATCH), "/")), "NS/NAME");
        assert!(allowed(&snap, &req(Some("spiffe://other.domain/ns/x/sa/y"), "/")));
        assert!(allowed(&snap, &req(Some("spiffe://plexus.local/ns/staging/sa/anything"), "/")));
        assert!(!allowed(&snap, &req(Some("spiffe://plexus.local/ns/stagingx/sa/a"), "/")));
        assert!(!allowed(&snap, &req(Some(INTRUDER), "/")));
        assert!(!allowed(&snap, &req(Some("spiffe://other.domain/ns/default/sa/productpage"), "/")), "trust domain");
        assert!(!allowed(&snap, &req(None, "/")), "unauthenticated is not listed");

        let any = snapshot(&policy("any", "allow", "name: reviews", "[{from: {identities: [\"*\"]}}]"));
        assert!(allowed(&any, &req(Some(INTRUDER), "/")));
        assert!(!allowed(&any, &req(None, "/")));

        // Within `from` any entry suffices; `from` and `to` are ANDed.
        let mixed = snapshot(&policy(
            "mixed",
            "allow",
            "name: reviews",
            "[{from: {serviceAccounts: [productpage], unauthenticated: true}, to: {paths: [/a]}}]",
        ));
        assert!(allowed(&mixed, &req(None, "/a")));
        assert!(allowed(&mixed, &req(Some(PRODUCTPAGE), "/a")));
        assert!(!allowed(&mixed, &req(Some(PRODUCTPAGE), "/b")));
        assert!(!allowed(&mixed, &req(Some(INTRUDER), "/a")));

        // The trust domain comes from the MeshConfig.
        let td = snapshot(&format!(
            "apiVersion: plexus.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default}}\nspec: {{trustDomain: corp.example}}\n---\n{}",
            policy("callers", "allow", "name: reviews", "[{from: {serviceAccounts: [productpage]}}]")
        ));
        assert!(allowed(&td, &req(Some("spiffe://corp.example/ns/default/sa/productpage"), "/")));
        assert!(!allowed(&td, &req(Some(PRODUCTPAGE), "/")));
    }

    #[test]
    fn audit_never_changes_the_decision() {
        let audit = policy("trial", "audit", "name: reviews", "[{from: {serviceAccounts: [productpage]}}]");
        let snap = snapshot(&audit);
        let d = decide_on(&snap, &req(Some(INTRUDER), "/"));
        assert_eq!(
            d,
            AuthzDecision { allowed: true, policy: "mesh default (allow)".into(), audit: vec!["default/trial".into()] }
        );
        let d = decide_on(&snap, &req(Some(PRODUCTPAGE), "/"));
        assert!(d.allowed && d.audit.is_empty(), "matches the audit policy's rules: nothing to report");
        // Under a deny, the audit is still reported and the decision unchanged.
        let denied = snapshot(&format!("{audit}---\n{}", policy("closed", "deny", "name: reviews", "[]")));
        let d = decide_on(&denied, &req(None, "/"));
        assert_eq!(
            (d.allowed, d.policy.as_str(), d.audit.as_slice()),
            (false, "default/closed", &["default/trial".to_string()][..])
        );
        // An audit policy is not an allow policy: it does not turn the port into an allow-list.
        assert!(allowed(&snap, &req(None, "/anything")));
    }

    #[test]
    fn port_and_route_scoped_policies() {
        let snap = snapshot(&format!(
            "{}---\n{}",
            policy("admin-port", "deny", "name: reviews, port: 9090", "[{from: {unauthenticated: true}}]"),
            policy("to-ports", "deny", "name: reviews", "[{to: {ports: [9080], methods: [DELETE]}}]"),
        ));
        assert!(!allowed(&snap, &Req { port: 9090, ..req(None, "/") }));
        assert!(allowed(&snap, &Req { port: 9090, ..req(Some(PRODUCTPAGE), "/") }));
        assert!(allowed(&snap, &req(None, "/")), "the admin-port policy is on port 9090 only");
        assert!(!allowed(&snap, &Req { method: "DELETE", ..req(None, "/") }));
        assert!(allowed(&snap, &Req { method: "DELETE", port: 9090, ..req(Some(PRODUCTPAGE), "/") }));

        let routed = snapshot(
            &[
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: api}\nspec:\n  parentRefs: [{name: reviews, port: 9080}]\n  rules: [{matches: [{path: {type: PathPrefix, value: /api}}], backendRefs: [{name: reviews}]}]\n",
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: rest}\nspec:\n  parentRefs: [{name: reviews, port: 9080}]\n  rules: [{backendRefs: [{name: reviews}]}]\n",
                &policy("api-callers", "allow", "name: reviews, route: api", "[{from: {serviceAccounts: [productpage]}}]"),
            ]
            .join("---\n"),
        );
        let (_, port) = snap_port(&routed);
        assert!(port.authorization.needs_route());
        assert!(allowed(&routed, &req(Some(PRODUCTPAGE), "/api/x")));
        let d = decide_on(&routed, &req(Some(INTRUDER), "/api/x"));
        assert_eq!(d.denial().as_deref(), Some("denied by default/api-callers"));
        // Requests of another route are not concerned: the mesh default decides.
        let d = decide_on(&routed, &req(Some(INTRUDER), "/other"));
        assert_eq!((d.allowed, d.policy.as_str()), (true, "mesh default (allow)"));
    }

    fn snap_port(snap: &MeshSnapshot) -> (&crate::CompiledService, &crate::CompiledPort) {
        snap.resolve_authority("reviews:9080").expect("port")
    }

    #[test]
    fn traffic_target_is_an_allow_policy_for_its_destination() {
        let tt = |rules: &str| {
            format!(
                "apiVersion: access.smi-spec.io/v1alpha4\nkind: TrafficTarget\nmetadata: {{name: reviews-tt}}\nspec:\n  destination: {{kind: ServiceAccount, name: reviews}}\n  sources: [{{kind: ServiceAccount, name: productpage}}, {{kind: ServiceAccount, name: batch, namespace: prod}}]\n{rules}"
            )
        };
        let snap = snapshot(&tt(""));
        assert!(allowed(&snap, &req(Some(PRODUCTPAGE), "/anything")));
        assert!(allowed(&snap, &req(Some(PROD_BATCH), "/")));
        let d = decide_on(&snap, &req(Some(INTRUDER), "/"));
        assert_eq!(d.denial().as_deref(), Some("denied by default/reviews-tt"));
        assert!(!allowed(&snap, &req(None, "/")));
        let (_, port) = snap_port(&snap);
        assert_eq!(port.authorization.policies[0].kind, PolicyKind::TrafficTarget);

        // With rules: only the HTTPRouteGroup's matches.
        let group = "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: reads}\nspec:\n  matches:\n  - {name: list, pathRegex: \"/reviews/[0-9]+\", methods: [GET]}\n  - {name: flagged, pathRegex: \"/flags\", headers: {x-debug: \"on|yes\"}}\n";
        let snap = snapshot(&format!("{group}---\n{}", tt("  rules: [{kind: HTTPRouteGroup, name: reads}]\n")));
        assert!(allowed(&snap, &req(Some(PRODUCTPAGE), "/reviews/7")));
        assert!(!allowed(&snap, &Req { method: "POST", ..req(Some(PRODUCTPAGE), "/reviews/7") }));
        assert!(!allowed(&snap, &req(Some(PRODUCTPAGE), "/reviews/x")));
        let mut flagged = req(Some(PRODUCTPAGE), "/flags");
        assert!(!allowed(&snap, &flagged));
        flagged.headers.insert("x-debug", http::HeaderValue::from_static("yes"));
        assert!(allowed(&snap, &flagged));
        assert!(!allowed(&snap, &req(Some(INTRUDER), "/reviews/7")));

        // Only the named matches; a missing group allows nothing.
        let snap = snapshot(&format!(
            "{group}---\n{}",
            tt(
                "  rules: [{kind: HTTPRouteGroup, name: reads, matches: [flagged]}, {kind: HTTPRouteGroup, name: ghost}]\n"
            )
        ));
        assert!(!allowed(&snap, &req(Some(PRODUCTPAGE), "/reviews/7")));
        let snap = snapshot(&tt("  rules: [{kind: HTTPRouteGroup, name: ghost}]\n"));
        assert!(!allowed(&snap, &req(Some(PRODUCTPAGE), "/")));

        // Another destination service account: the Service is not concerned.
        let other = snapshot(&tt("").replace("name: reviews}", "name: ratings}"));
        assert!(snap_port(&other).1.authorization.is_empty());
        assert!(allowed(&other, &req(Some(INTRUDER), "/")));
        // A destination port selects the Service port (by number or the app's port).
        let by_port = snapshot(&tt("").replace("name: reviews}", "name: reviews, port: 9002}"));
        assert!(snap_port(&by_port).1.authorization.is_empty());
        assert!(!allowed(&by_port, &Req { port: 9090, ..req(Some(INTRUDER), "/") }));
    }

    #[test]
    fn path_patterns_and_spiffe_namespaces() {
        assert!(path_matches("*", "/x"));
        assert!(path_matches("/p/*", "/p/q/r"));
        assert!(!path_matches("/p/*", "/pq"));
        assert_eq!(spiffe_namespace(PROD_BATCH), Some("prod"));
        assert_eq!(spiffe_namespace("spiffe://td/sa/x"), None);
        assert_eq!(spiffe_namespace("https://td/ns/x"), None);
    }

    #[test]
    fn compiled_policies_show_in_the_snapshot() {
        let snap = snapshot(&policy(
            "callers",
            "allow",
            "name: reviews, port: 9080",
            "[{from: {serviceAccounts: [productpage]}, to: {paths: [\"/r/*\"]}}]",
        ));
        let json = serde_json::to_value(snap_port(&snap).1).expect("serializes");
        let p = &json["authorization"][0];
        assert_eq!(p["name"], "default/callers");
        assert_eq!(p["action"], "allow");
        assert_eq!(p["rules"][0]["from"]["identities"][0], PRODUCTPAGE);
        assert_eq!(p["rules"][0]["to"]["paths"][0], "/r/*");
        let admin = serde_json::to_value(snap.resolve_authority("reviews:9090").expect("port").1).expect("serializes");
        assert!(admin.get("authorization").is_none(), "no policy on the admin port: {admin}");
    }
}
