//! What the mesh does with a request, and the routing table of a Service, as data for
//! `plexus explain` and `plexus routes`.
//!
//! Nothing here matches routes or picks backends itself: [`explain`] asks
//! [`decide::decide`](crate::decide::decide), the decision the proxy runs per request, once per
//! weighted backend (with the roll that selects it), so what it reports is what a proxy holding
//! the same snapshot does. The authorization decision likewise comes from
//! [`authz::decide`](crate::authz::decide), the function the destination sidecar runs.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

use crate::authz::{self, AuthzRequest};
use crate::decide::{self, Addressed, Outcome, RouteFailure};
use crate::duration::format as fmt_duration;
use crate::model::{AppProtocol, CompiledPort, CompiledService, Endpoint, MeshSnapshot};
use crate::names::{ServiceName, split_authority};
use crate::normalize;
use crate::policy::{
    ClientPolicy, ConnectionLimits, FaultAbort, FaultDelay, HashKey, OutlierDetection, RateLimit, RetryBudget,
    RetryPolicy,
};
use crate::resource::{HeaderModifier, LbAlgorithm, Resource, Spec};
use crate::route::{
    Backend, Matcher, PathChange, PathMatcher, Redirect, RequestInfo, Rewrite, RouteEntry, ValuePattern,
};

/// What `plexus explain` says about a request that matches no route.
pub const NO_ROUTE: &str = "no route: sent to the Service itself";

/// The request to explain.
#[derive(Debug, Clone, Default)]
pub struct ExplainRequest {
    pub method: String,
    /// Path, optionally with `?query`.
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// Everything the mesh does with one request.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// The source workload or service, as given (informational).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub destination: Destination,
    pub request: RequestSummary,
    pub route: RouteMatch,
    /// The matched rule's weighted backends (the Service itself when no route matched).
    pub backends: Vec<BackendShare>,
    /// What happens, with the share of requests each possibility gets.
    pub outcomes: Vec<Possibility>,
    /// `name.namespace` of the backend Service when the decision does not depend on chance:
    /// the request is forwarded and exactly one backend has a non-zero weight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_backend: Option<String>,
    pub filters: AppliedFilters,
    /// What the destination's sidecar decides for this client.
    pub authorization: AuthorizationExplanation,
}

/// The client of an explained request as the destination's authorization sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Client {
    /// As given (`--from`).
    pub name: Option<String>,
    /// Its SPIFFE ID; `None`: evaluated as an unauthenticated client.
    pub identity: Option<String>,
    /// How the identity was found, or why there is none.
    pub note: Option<String>,
}

impl Client {
    /// A client whose identity is not looked up: evaluated as unauthenticated.
    pub fn unresolved(name: Option<&str>) -> Client {
        Client {
            name: name.map(str::to_string),
            identity: None,
            note: name.map(|n| format!("the identity of {n} was not looked up: evaluated as unauthenticated")),
        }
    }
}

/// The authorization decision for the explained request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationExplanation {
    pub allowed: bool,
    /// Who decided: `namespace/name` of a policy, or `mesh default (…)`.
    pub policy: String,
    /// The client's SPIFFE ID; absent: unauthenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Audit policies that would have denied the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<String>,
    /// The Service port whose policies were evaluated (`name.namespace:port`).
    pub evaluated_at: String,
    /// The decision in words: `allow by default/reviews`, `deny: 403 denied by default/reviews`.
    pub description: String,
    /// How the client's identity was found, or why the decision may not hold.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The Service port the request is addressed to.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// `name.namespace`.
    pub service: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<AppProtocol>,
}

/// The request as evaluated.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestSummary {
    pub method: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

/// The route entry that matched, if any.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// `namespace/name` of the route; `None` when no route matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    /// The match in words, or [`NO_ROUTE`].
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matcher: Option<Matcher>,
}

/// One weighted backend of a rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendShare {
    /// `name.namespace`.
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub weight: u32,
    /// Share of the rule's requests, in percent.
    pub percent: f64,
    /// Whether the Service (and the port) exists; a missing one answers 500.
    pub exists: bool,
}

/// One thing that can happen to the request, and how often.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Possibility {
    pub percent: f64,
    #[serde(flatten)]
    pub action: Action,
}

/// What the proxy does.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum Action {
    /// Sent to a backend Service port.
    Forward(Box<Target>),
    /// Answered with a redirect.
    Redirect { status: u16, location: String },
    /// Answered by the proxy itself with an error.
    Fail {
        status: u16,
        /// The `x-plexus-error` text.
        error: String,
    },
}

/// A backend Service port a request is forwarded to, with how it is called.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// `name.namespace`.
    pub service: String,
    pub port: u16,
    pub timeouts: Timeouts,
    pub retries: Retries,
    /// `ewma`, `roundRobin`, `leastRequest` or `ringHash`.
    pub load_balancer: LbAlgorithm,
    /// Whether a ResiliencePolicy chose the algorithm (else the proxy's default).
    pub load_balancer_set: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashKey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimits>,
    pub outlier_detection: OutlierDetection,
    /// The rate limit the backend's sidecars enforce (endpoints without a sidecar enforce none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// `namespace/name` of the ResiliencePolicy in force, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub endpoints: Vec<EndpointSummary>,
    /// Set when the request cannot be served although it is routed (no endpoint: 503).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The timeouts that apply, each with where it comes from.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// The whole request, retries included: the rule's `timeouts.request`, else the
    /// ResiliencePolicy's `timeouts.request`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<Sourced>,
    /// The rule's `timeouts.backendRequest`: each try.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<Sourced>,
    /// Each try (`retries.perTryTimeout`), unless `backendRequest` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try: Option<Sourced>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<Sourced>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<Sourced>,
}

/// A duration and the resource it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sourced {
    pub value: String,
    pub source: String,
}

/// The retry settings that apply.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// `route NS/NAME rule N`, `ResiliencePolicy NS/NAME`, or `default`.
    pub source: String,
    /// `None` by default: the proxy then tries another endpoint only after a connection
    /// failure or a reset of an idempotent request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<RetryPolicy>,
    pub budget: RetryBudget,
}

/// An endpoint of the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSummary {
    pub address: String,
    pub workload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub meshed: bool,
}

/// The matched rule's filters as they apply to this request.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedFilters {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<AppliedRewrite>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<MirrorSummary>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<FaultSummary>,
}

/// A URLRewrite applied to this request: the host and path the backend sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedRewrite {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A RequestMirror.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MirrorSummary {
    /// `name.namespace`.
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub percent: f64,
    pub exists: bool,
}

/// A FaultInjection named by an ExtensionRef.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultSummary {
    /// `namespace/name`.
    pub name: String,
    /// A missing FaultInjection makes the rule answer 500.
    pub exists: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// The effective routing table of one Service port, as a proxy holds it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTable {
    /// `name.namespace`.
    pub service: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<AppProtocol>,
    /// In precedence order: the first entry whose match a request satisfies is used.
    pub routes: Vec<TableEntry>,
    pub policy: ClientPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    pub endpoints: Vec<EndpointSummary>,
}

/// One entry of a routing table.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableEntry {
    /// `namespace/name` of the route.
    pub route: String,
    pub rule: usize,
    /// The match in words.
    #[serde(rename = "match")]
    pub description: String,
    pub matcher: Matcher,
    pub backends: Vec<BackendShare>,
    pub filters: RuleFilters,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_request_timeout: Option<String>,
    /// The rule's own retry, replacing the ResiliencePolicy's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

/// A rule's filters, independent of any request.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleFilters {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<MirrorSummary>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<FaultSummary>,
}

/// What a sidecar does with a call to a destination that is no mesh Service (`plexus
/// explain --to api.example.com:443`): the egress decision ([`decide::egress`]) in words.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressExplanation {
    /// `host:port` as evaluated.
    pub destination: String,
    pub allowed: bool,
    /// MeshConfig `outboundTrafficPolicy`: `allowAny` or `registryOnly`.
    pub outbound_traffic_policy: &'static str,
    /// `namespace/name` of the ExternalService that lists the destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<crate::external::ExternalProtocol>,
    /// The sidecar opens TLS to the host for a plaintext client.
    pub tls_origination: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// `allowed: ExternalService default/api port 443 (https)…`, `denied: …`.
    pub description: String,
    /// What the application gets when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

/// Explains the egress decision for `to` (`HOST[:PORT]`, port 80 when omitted): the same
/// [`decide::egress`] every outbound path of a sidecar runs.
pub fn explain_egress(snapshot: &MeshSnapshot, to: &str) -> Result<EgressExplanation, String> {
    let (host, port) = split_authority(to);
    if host.is_empty() {
        return Err(format!("{to:?} names no host (HOST[:PORT])"));
    }
    let port = port.unwrap_or(80);
    let addr = crate::external::normalize_host(host).parse::<std::net::IpAddr>().ok();
    let decision = decide::egress(snapshot, decide::EgressTarget { host: Some(host), addr, port });
    let policy = match snapshot.mesh.outbound_traffic_policy {
        crate::resource::OutboundTrafficPolicy::AllowAny => "allowAny",
        crate::resource::OutboundTrafficPolicy::RegistryOnly => "registryOnly",
    };
    let (external_service, protocol, origination) = match decision {
        decide::Egress::External { service, port } => (
            Some(format!("{}/{}", service.name.namespace, service.name.name)),
            Some(port.protocol),
            service.originates_on(port),
        ),
        _ => (None, None, None),
    };
    Ok(EgressExplanation {
        destination: format!("{host}:{port}"),
        allowed: decision.allowed(),
        outbound_traffic_policy: policy,
        external_service,
        protocol,
        tls_origination: origination.is_some(),
        ca_file: origination.and_then(|o| o.ca_file.clone()),
        description: decision.describe(),
        response: (!decision.allowed())
            .then(|| "502 x-plexus-error: destination not in the registry (a close for opaque TCP)".into()),
    })
}

/// Resolves `to` (`NAME[.NAMESPACE][:PORT]`) to a Service port of the snapshot.
pub fn resolve_destination<'a>(
    snapshot: &'a MeshSnapshot,
    to: &str,
) -> Result<(&'a CompiledService, &'a CompiledPort), String> {
    let (host, port) = split_authority(to);
    let name = ServiceName::candidates(host)
        .into_iter()
        .next()
        .ok_or_else(|| format!("{to:?} is not a Service name (NAME[.NAMESPACE][:PORT])"))?;
    let service = find_service(snapshot, &name)?;
    let cp = service.port(port).ok_or_else(|| match port {
        Some(p) => format!("service {}/{} has no port {p} (ports: {})", name.namespace, name.name, ports(service)),
        None => format!(
            "service {}/{} has several ports ({}): give one as NAME:PORT",
            name.namespace,
            name.name,
            ports(service)
        ),
    })?;
    Ok((service, cp))
}

fn find_service<'a>(snapshot: &'a MeshSnapshot, name: &ServiceName) -> Result<&'a CompiledService, String> {
    snapshot.services.get(name).ok_or_else(|| format!("service {}/{} not found", name.namespace, name.name))
}

fn ports(service: &CompiledService) -> String {
    let list: Vec<String> = service.ports.iter().map(|p| p.port.to_string()).collect();
    if list.is_empty() { "none".into() } else { list.join(", ") }
}

/// Explains what the mesh does with `request` sent from `from` to `to`
/// (`NAME[.NAMESPACE][:PORT]`), authorizing it as from an unauthenticated client (use
/// [`explain_as`] with [`client_identity`] to evaluate the client's own identity). Errors:
/// unknown Service or port, malformed header or path.
pub fn explain(
    snapshot: &MeshSnapshot,
    from: Option<&str>,
    to: &str,
    request: &ExplainRequest,
) -> Result<Explanation, String> {
    explain_as(snapshot, &Client::unresolved(from), to, request)
}

/// Explains what the mesh does with `request` sent by `client` to `to`
/// (`NAME[.NAMESPACE][:PORT]`). Errors: unknown Service or port, malformed header or path.
pub fn explain_as(
    snapshot: &MeshSnapshot,
    client: &Client,
    to: &str,
    request: &ExplainRequest,
) -> Result<Explanation, String> {
    let from = client.name.as_deref();
    let (service, port) = resolve_destination(snapshot, to)?;
    let headers = header_map(&request.headers)?;
    let (path, query) = match request.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (request.path.as_str(), None),
    };
    if !path.starts_with('/') {
        return Err(format!("path {:?} must start with /", request.path));
    }
    // What the proxy does first: refuse an ambiguous method or path (400), normalize the path.
    let refused = |r: normalize::Refusal| format!("the proxy answers 400 to this request: {r}");
    normalize::check_method(&request.method).map_err(refused)?;
    let options = normalize::PathOptions { allow_encoded_slashes: snapshot.mesh.allow_encoded_slashes };
    let path = normalize::normalize_path(path, options).map_err(refused)?;
    let path: &str = &path;
    let path_and_query = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let info = RequestInfo { method: &request.method, path, query, headers: &headers };
    // A client addressing the Service as `to` sends `Host: <to>`; redirects keep host and port.
    let (host, host_port) = split_authority(to);
    let addressed = Addressed { scheme: "http", host, port: host_port, path_and_query: &path_and_query };

    let first = decide::decide(snapshot, service, port, &info, &addressed, 0);
    let entry = first.entry;
    let outcomes = match (&first.outcome, entry) {
        // Only forwarding (or failing on the chosen backend) depends on the roll: ask the
        // decision once per weighted backend, with the first roll that selects it.
        (Outcome::Forward { .. } | Outcome::Fail(RouteFailure::BackendNotFound(_)), Some(e)) => {
            let total: u64 = e.backends.iter().map(|b| u64::from(b.weight)).sum();
            let mut roll = 0u64;
            let mut out = Vec::new();
            for b in e.backends.iter().filter(|b| b.weight > 0) {
                let d = decide::decide(snapshot, service, port, &info, &addressed, roll);
                roll += u64::from(b.weight);
                out.push(possibility(percent(b.weight, total), &d.outcome, port, Some(e)));
            }
            out
        }
        (outcome, _) => vec![possibility(100.0, outcome, port, entry)],
    };
    let predicted_backend = match outcomes.as_slice() {
        [Possibility { action: Action::Forward(t), .. }] => Some(t.service.clone()),
        _ => None,
    };
    let backends = match entry {
        Some(e) => shares(snapshot, port, &e.backends),
        None => vec![BackendShare {
            service: service.name.to_string(),
            port: Some(port.port),
            weight: 1,
            percent: 100.0,
            exists: true,
        }],
    };
    let filters = entry.map(|e| applied_filters(snapshot, e, path)).unwrap_or_default();
    let reaches_destination = outcomes.iter().any(|p| matches!(p.action, Action::Forward(_)));
    let authorization = authorize(snapshot, service, port, client, &info, &filters, reaches_destination);
    Ok(Explanation {
        source: from.map(str::to_string),
        destination: Destination {
            service: service.name.to_string(),
            port: port.port,
            port_name: port.name.clone(),
            protocol: port.protocol,
        },
        request: RequestSummary {
            method: request.method.clone(),
            path: path.to_string(),
            query: query.map(str::to_string),
            headers: request.headers.clone(),
        },
        route: match entry {
            Some(e) => RouteMatch {
                name: Some(e.route.to_string()),
                rule: Some(e.rule),
                description: describe_match(&e.matcher),
                matcher: Some(e.matcher.clone()),
            },
            None => RouteMatch { name: None, rule: None, description: NO_ROUTE.into(), matcher: None },
        },
        backends,
        outcomes,
        predicted_backend,
        filters,
        authorization,
    })
}

/// The decision of the addressed Service port's sidecars for the request as it reaches them
/// (after a URLRewrite of its path): the port they call their own when their workloads run
/// for that Service — `plexus run --service S` serves S, also when a route sends traffic on
/// to a per-version Service selecting the same workloads.
fn authorize(
    snapshot: &MeshSnapshot,
    service: &CompiledService,
    port: &CompiledPort,
    client: &Client,
    info: &RequestInfo<'_>,
    filters: &AppliedFilters,
    reaches_destination: bool,
) -> AuthorizationExplanation {
    let path = filters.rewrite.as_ref().and_then(|r| r.path.as_deref()).unwrap_or(info.path);
    // The destination sidecar normalizes the (rewritten) path again.
    let options = normalize::PathOptions { allow_encoded_slashes: snapshot.mesh.allow_encoded_slashes };
    let path = normalize::normalize_path(path, options).unwrap_or(std::borrow::Cow::Borrowed(path));
    let path: &str = &path;
    let arriving = RequestInfo { path, ..*info };
    let route = port.routes.find(&arriving).map(|e| &*e.route);
    let request = AuthzRequest {
        peer: client.identity.as_deref(),
        method: info.method,
        path,
        port: port.port,
        route,
        headers: info.headers,
    };
    let d = authz::decide(&port.authorization, &request, snapshot.mesh.default_authorization);
    let who = client.identity.as_deref().map_or_else(|| "an unauthenticated client".to_string(), str::to_string);
    let description = match d.denial() {
        None => format!("allow by {} for {who}", d.policy),
        Some(reason) => format!("deny: 403 {reason} for {who}"),
    };
    let mut notes: Vec<String> = client.note.iter().cloned().collect();
    notes.extend(d.audit.iter().map(|a| format!("audit policy {a} would deny this request")));
    if !reaches_destination {
        notes.push("the request does not reach the destination (answered by the client's sidecar)".into());
    }
    AuthorizationExplanation {
        allowed: d.allowed,
        policy: d.policy,
        identity: client.identity.clone(),
        audit: d.audit,
        evaluated_at: format!("{}:{}", service.name, port.port),
        description,
        notes,
    }
}

/// Finds the SPIFFE identity of the workload `from` names, as the destination would see it
/// over mutual TLS: `spiffe://…` as is; else `NAME[.NAMESPACE]` names a Workload, or the
/// Workloads labelled `app: NAME` (what `plexus run --service NAME` registers), whose
/// `spec.serviceAccount` (default `default`) gives the identity in `trust_domain`. Not found:
/// evaluated as unauthenticated, with a note. Error: workloads of several service accounts.
pub fn client_identity(resources: &[Resource], trust_domain: &str, from: Option<&str>) -> Result<Client, String> {
    let Some(from) = from else {
        return Ok(Client {
            note: Some("no --from: evaluated as an unauthenticated client".into()),
            ..Client::default()
        });
    };
    let found = |identity: String, note: String| Client {
        name: Some(from.to_string()),
        identity: Some(identity),
        note: Some(note),
    };
    if from.starts_with("spiffe://") {
        return Ok(Client { name: Some(from.to_string()), identity: Some(from.to_string()), note: None });
    }
    let not_found = || Client {
        name: Some(from.to_string()),
        identity: None,
        note: Some(format!("no workload {from} found: evaluated as an unauthenticated client")),
    };
    let Some(name) = ServiceName::candidates(from).into_iter().next() else { return Ok(not_found()) };
    let workloads = resources.iter().filter_map(|r| match &r.spec {
        Spec::Workload(w) if r.metadata.namespace() == name.namespace => Some((r, w)),
        _ => None,
    });
    let account = |w: &crate::resource::WorkloadSpec| w.service_account.clone().unwrap_or_else(|| "default".into());
    if let Some((r, w)) = workloads.clone().find(|(r, _)| r.metadata.name == name.name) {
        let sa = account(w);
        return Ok(found(
            crate::names::spiffe_id(trust_domain, &name.namespace, &sa),
            format!("workload {} runs as service account {sa}", r.key()),
        ));
    }
    let mut accounts: Vec<String> =
        workloads.filter(|(r, _)| r.metadata.labels.get("app") == Some(&name.name)).map(|(_, w)| account(w)).collect();
    accounts.sort();
    accounts.dedup();
    match accounts.as_slice() {
        [] => Ok(not_found()),
        [sa] => Ok(found(
            crate::names::spiffe_id(trust_domain, &name.namespace, sa),
            format!("workloads labelled app={} in {} run as service account {sa}", name.name, name.namespace),
        )),
        several => Err(format!(
            "workloads labelled app={} in {} run as several service accounts ({}): give one workload's name, or a spiffe:// identity, with --from",
            name.name,
            name.namespace,
            several.join(", ")
        )),
    }
}

fn header_map(headers: &[(String, String)]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("invalid header name {k:?}"))?;
        let value = HeaderValue::from_str(v).map_err(|_| format!("invalid value for header {k}: {v:?}"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// `weight` of `total` in percent, to two decimals.
fn percent(weight: u32, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    (f64::from(weight) * 10_000.0 / total as f64).round() / 100.0
}

fn possibility(
    percent: f64,
    outcome: &Outcome<'_>,
    addressed: &CompiledPort,
    entry: Option<&RouteEntry>,
) -> Possibility {
    let action = match outcome {
        Outcome::Forward { service, port } => Action::Forward(Box::new(target(service, port, addressed, entry))),
        Outcome::Redirect { status, location } => Action::Redirect { status: *status, location: location.clone() },
        Outcome::Fail(f) => Action::Fail { status: 500, error: failure_text(f) },
    };
    Possibility { percent, action }
}

/// The `x-plexus-error` text the proxy answers a failed rule with.
fn failure_text(f: &RouteFailure) -> String {
    match f {
        RouteFailure::NoBackends(route) => format!("no backend with non-zero weight in route {route}"),
        RouteFailure::BackendNotFound(b) => format!("backend not found: {b}"),
        RouteFailure::MissingFault(name) => format!("invalid route: FaultInjection {name} does not exist"),
    }
}

/// How the chosen backend port is called: the rule's timeouts and retry over the client
/// policy the proxy applies — the backend Service's ResiliencePolicy, else the addressed
/// Service's (as `plexus proxy` chooses it per request).
fn target(
    service: &CompiledService,
    port: &CompiledPort,
    addressed: &CompiledPort,
    entry: Option<&RouteEntry>,
) -> Target {
    let call = crate::decide::call_settings(entry, addressed, port);
    let policy = call.policy;
    let policy_source = || match &policy.source {
        Some(s) => format!("ResiliencePolicy {s}"),
        None => "default".to_string(),
    };
    let source = |from: crate::decide::Source| match (from, entry) {
        (crate::decide::Source::Route, Some(e)) => format!("route {} rule {}", e.route, e.rule),
        _ => policy_source(),
    };
    let sourced =
        |(d, from): (Duration, crate::decide::Source)| Sourced { value: fmt_duration(d), source: source(from) };
    let request = call.request_timeout.map(sourced);
    let backend_request = call.backend_request_timeout.map(|d| sourced((d, crate::decide::Source::Route)));
    let retries = Retries {
        source: source(call.retry_source),
        policy: (call.retry_source != crate::decide::Source::Default).then(|| call.retry.clone()),
        budget: policy.retry_budget,
    };
    // Shown apart when the rule's backendRequest bounds each try.
    let per_try = call.per_try_timeout.filter(|_| call.backend_request_timeout.is_none()).map(sourced);
    let policy_sourced = |d: Duration| sourced((d, crate::decide::Source::Policy));
    let endpoints = summarize_endpoints(&port.endpoints);
    let problem = endpoints
        .is_empty()
        .then(|| format!("no endpoint: answered 503 no healthy endpoint for {}:{}", service.name, port.port));
    Target {
        service: service.name.to_string(),
        port: port.port,
        timeouts: Timeouts {
            request,
            backend_request,
            per_try,
            connect: policy.connect_timeout.map(policy_sourced),
            idle: policy.idle_timeout.map(policy_sourced),
        },
        retries,
        load_balancer: policy.load_balancer,
        load_balancer_set: policy.load_balancer_set,
        hash_on: policy.hash_on.clone(),
        connection_limits: policy.connection_limits,
        outlier_detection: policy.outlier_detection,
        rate_limit: port.rate_limit.as_deref().cloned(),
        policy: policy.source.clone(),
        endpoints,
        problem,
    }
}

fn summarize_endpoints(endpoints: &[Endpoint]) -> Vec<EndpointSummary> {
    endpoints
        .iter()
        .map(|e| EndpointSummary {
            address: e.addr.to_string(),
            workload: e.workload.to_string(),
            version: e.version.as_deref().map(str::to_string),
            meshed: e.meshed,
        })
        .collect()
}

/// Whether a backend resolves to a Service port: its own port, else the destination's port
/// number, else the Service's only port (as the decision resolves it).
fn backend_exists(snapshot: &MeshSnapshot, dest_port: u16, service: &ServiceName, port: Option<u16>) -> bool {
    crate::decide::resolve_backend(snapshot, service, port, dest_port).is_ok()
}

fn shares(snapshot: &MeshSnapshot, port: &CompiledPort, backends: &[Backend]) -> Vec<BackendShare> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    backends
        .iter()
        .map(|b| BackendShare {
            service: b.service.to_string(),
            port: b.port,
            weight: b.weight,
            percent: percent(b.weight, total),
            exists: backend_exists(snapshot, port.port, &b.service, b.port),
        })
        .collect()
}

fn mirrors(snapshot: &MeshSnapshot, entry: &RouteEntry) -> Vec<MirrorSummary> {
    entry
        .mirrors
        .iter()
        .map(|m| MirrorSummary {
            service: m.service.to_string(),
            port: m.port,
            percent: m.percent,
            exists: snapshot.services.contains_key(&m.service),
        })
        .collect()
}

fn faults(entry: &RouteEntry) -> Vec<FaultSummary> {
    entry
        .faults
        .iter()
        .map(|f| FaultSummary {
            name: f.name.clone(),
            exists: f.fault.is_some(),
            delay: f.fault.as_ref().and_then(|x| x.delay.clone()),
            abort: f.fault.as_ref().and_then(|x| x.abort.clone()),
        })
        .collect()
}

fn applied_filters(snapshot: &MeshSnapshot, entry: &RouteEntry, path: &str) -> AppliedFilters {
    AppliedFilters {
        request_headers: entry.request_headers.clone(),
        response_headers: entry.response_headers.clone(),
        rewrite: entry.rewrite.as_ref().map(|r| AppliedRewrite {
            host: r.hostname.clone(),
            path: r.path.as_ref().map(|c| crate::route::change_path(c, path, entry.matcher.prefix())),
        }),
        mirrors: mirrors(snapshot, entry),
        faults: faults(entry),
    }
}

/// A proposed configuration: `current` with `proposed` applied on top, as `plexus apply` would
/// store it — an object with the same kind, namespace and name is replaced (keeping its
/// creation time, which orders routes and policies), a new one is added as created `now`.
pub fn apply_on_top(current: Vec<Resource>, proposed: Vec<Resource>, now: &str) -> Vec<Resource> {
    let mut out = current;
    for mut p in proposed {
        let same = |r: &Resource| {
            r.kind == p.kind && r.metadata.namespace() == p.metadata.namespace() && r.metadata.name == p.metadata.name
        };
        match out.iter().position(same) {
            Some(i) => {
                p.metadata.creation_timestamp = out[i].metadata.creation_timestamp.clone();
                out[i] = p;
            }
            None => {
                p.metadata.creation_timestamp = Some(now.to_string());
                out.push(p);
            }
        }
    }
    out
}

/// The routing table of every port of `service` (or of `port` only).
pub fn routing_table(
    snapshot: &MeshSnapshot,
    service: &ServiceName,
    port: Option<u16>,
) -> Result<Vec<PortTable>, String> {
    let s = find_service(snapshot, service)?;
    let selected: Vec<&CompiledPort> = s.ports.iter().filter(|p| port.is_none_or(|x| x == p.port)).collect();
    if let (Some(p), true) = (port, selected.is_empty()) {
        return Err(format!("service {}/{} has no port {p} (ports: {})", service.namespace, service.name, ports(s)));
    }
    Ok(selected
        .into_iter()
        .map(|p| PortTable {
            service: s.name.to_string(),
            port: p.port,
            port_name: p.name.clone(),
            protocol: p.protocol,
            routes: p.routes.entries.iter().map(|e| table_entry(snapshot, p, e)).collect(),
            policy: (*p.policy).clone(),
            rate_limit: p.rate_limit.as_deref().cloned(),
            endpoints: summarize_endpoints(&p.endpoints),
        })
        .collect())
}

fn table_entry(snapshot: &MeshSnapshot, port: &CompiledPort, e: &RouteEntry) -> TableEntry {
    TableEntry {
        route: e.route.to_string(),
        rule: e.rule,
        description: describe_match(&e.matcher),
        matcher: e.matcher.clone(),
        backends: shares(snapshot, port, &e.backends),
        filters: RuleFilters {
            request_headers: e.request_headers.clone(),
            response_headers: e.response_headers.clone(),
            redirect: e.redirect.clone(),
            rewrite: e.rewrite.clone(),
            mirrors: mirrors(snapshot, e),
            faults: faults(e),
        },
        request_timeout: e.request_timeout.map(fmt_duration),
        backend_request_timeout: e.backend_request_timeout.map(fmt_duration),
        retry: e.retry.clone(),
    }
}

/// The source of a compiled (anchored) regular expression: `^(?:X)$` → `X`.
fn regex_source(r: &regex::Regex) -> &str {
    let s = r.as_str();
    s.strip_prefix("^(?:").and_then(|s| s.strip_suffix(")$")).unwrap_or(s)
}

fn describe_value(v: &ValuePattern) -> String {
    match v {
        ValuePattern::Exact(x) => format!("= {x}"),
        ValuePattern::RegularExpression(r) => format!("~ {}", regex_source(r)),
    }
}

/// A match in words: `path prefix /api and method POST and header x-user = admin`.
pub fn describe_match(m: &Matcher) -> String {
    let mut parts = Vec::new();
    match &m.path {
        PathMatcher::Exact(p) => parts.push(format!("path = {p}")),
        PathMatcher::PathPrefix(p) if p == "/" => {}
        PathMatcher::PathPrefix(p) => parts.push(format!("path prefix {p}")),
        PathMatcher::RegularExpression(r) => parts.push(format!("path ~ {}", regex_source(r))),
    }
    if let Some(method) = &m.method {
        parts.push(format!("method {method}"));
    }
    for h in &m.headers {
        parts.push(format!("header {} {}", h.name, describe_value(&h.value)));
    }
    for q in &m.query_params {
        parts.push(format!("query {} {}", q.name, describe_value(&q.value)));
    }
    if parts.is_empty() { "any request".into() } else { parts.join(" and ") }
}

fn describe_headers(what: &str, m: &HeaderModifier) -> Vec<String> {
    let mut out = Vec::new();
    out.extend(m.set.iter().map(|h| format!("set {what} header {}: {}", h.name, h.value)));
    out.extend(m.add.iter().map(|h| format!("add {what} header {}: {}", h.name, h.value)));
    out.extend(m.remove.iter().map(|h| format!("remove {what} header {h}")));
    out
}

fn describe_path_change(c: &PathChange) -> String {
    match c {
        PathChange::ReplaceFullPath(p) => format!("path {p}"),
        PathChange::ReplacePrefixMatch(p) => format!("prefix → {p}"),
    }
}

fn describe_mirror(m: &MirrorSummary) -> String {
    let port = m.port.map(|p| format!(":{p}")).unwrap_or_default();
    let missing = if m.exists { "" } else { " (missing)" };
    format!("mirror {}% to {}{port}{missing}", trim_float(m.percent), m.service)
}

fn describe_fault(f: &FaultSummary) -> String {
    if !f.exists {
        return format!("fault {} (missing: the rule answers 500)", f.name);
    }
    let mut parts = Vec::new();
    if let Some(d) = &f.delay {
        parts.push(format!("delay {} {}%", fmt_duration(d.fixed), trim_float(d.percent)));
    }
    if let Some(a) = &f.abort {
        let status = match (a.http_status, a.grpc_status) {
            (Some(h), _) => h.to_string(),
            (None, Some(g)) => format!("grpc {g}"),
            (None, None) => "?".into(),
        };
        parts.push(format!("abort {status} {}%", trim_float(a.percent)));
    }
    format!("fault {}: {}", f.name, if parts.is_empty() { "nothing".into() } else { parts.join(", ") })
}

/// `80.0` → `80`, `33.33` stays.
pub fn trim_float(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl RuleFilters {
    /// Each filter in words.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(m) = &self.request_headers {
            out.extend(describe_headers("request", m));
        }
        if let Some(m) = &self.response_headers {
            out.extend(describe_headers("response", m));
        }
        if let Some(r) = &self.redirect {
            let mut parts = Vec::new();
            if let Some(s) = &r.scheme {
                parts.push(format!("scheme {s}"));
            }
            if let Some(h) = &r.hostname {
                parts.push(format!("host {h}"));
            }
            if let Some(p) = r.port {
                parts.push(format!("port {p}"));
            }
            if let Some(c) = &r.path {
                parts.push(describe_path_change(c));
            }
            out.push(format!("redirect {} {}", r.status, parts.join(" ")).trim_end().to_string());
        }
        if let Some(r) = &self.rewrite {
            let mut parts = Vec::new();
            if let Some(h) = &r.hostname {
                parts.push(format!("host {h}"));
            }
            if let Some(c) = &r.path {
                parts.push(describe_path_change(c));
            }
            out.push(format!("rewrite {}", parts.join(" ")));
        }
        out.extend(self.mirrors.iter().map(describe_mirror));
        out.extend(self.faults.iter().map(describe_fault));
        out
    }
}

impl AppliedFilters {
    /// Each filter in words, as it applies to the request.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(m) = &self.request_headers {
            out.extend(describe_headers("request", m));
        }
        if let Some(m) = &self.response_headers {
            out.extend(describe_headers("response", m));
        }
        if let Some(r) = &self.rewrite {
            let mut parts = Vec::new();
            if let Some(h) = &r.host {
                parts.push(format!("host {h}"));
            }
            if let Some(p) = &r.path {
                parts.push(format!("path {p}"));
            }
            out.push(format!("rewrite to {}", parts.join(" ")));
        }
        out.extend(self.mirrors.iter().map(describe_mirror));
        out.extend(self.faults.iter().map(describe_fault));
        out
    }
}

/// A retry policy in words: `3 tries on 5xx, connect-failure; backoff 25ms`.
pub fn describe_retry(r: &RetryPolicy) -> String {
    let mut on = Vec::new();
    if r.on.server_error {
        on.push("5xx".to_string());
    }
    if r.on.gateway_error {
        on.push("gateway-error".into());
    }
    if r.on.connect_failure {
        on.push("connect-failure".into());
    }
    if r.on.reset {
        on.push("reset".into());
    }
    on.extend(r.on.statuses.iter().map(u16::to_string));
    on.extend(r.on.grpc_statuses.iter().map(|g| format!("grpc {g}")));
    let mut s = format!("{} tries on {}; backoff {}", r.attempts, on.join(", "), fmt_duration(r.backoff));
    if let Some(t) = r.per_try_timeout {
        s.push_str(&format!("; per try {}", fmt_duration(t)));
    }
    if r.non_idempotent {
        s.push_str("; non-idempotent too");
    }
    s
}

/// A retry budget in words.
pub fn describe_budget(b: &RetryBudget) -> String {
    format!("budget {}% + {}/s over {}", trim_float(b.ratio * 100.0), b.min_per_second, fmt_duration(b.ttl))
}

/// A rate limit in words.
pub fn describe_rate_limit(r: &RateLimit) -> String {
    let mut s = format!("{}/s burst {} ({})", r.requests_per_second, r.burst, r.policy);
    for o in &r.overrides {
        s.push_str(&format!("; {}/s burst {} for {}", o.requests_per_second, o.burst, o.identities.join(", ")));
    }
    s
}

/// Outlier detection in words: `7 consecutive gateway failures or 5 consecutive 5xx, every
/// 1s, eject 1s, at most 50%`.
pub fn describe_outlier(od: &OutlierDetection) -> String {
    let mut what = Vec::new();
    if od.consecutive_failures > 0 {
        what.push(format!("{} consecutive gateway failures", od.consecutive_failures));
    }
    if od.consecutive_5xx > 0 {
        what.push(format!("{} consecutive 5xx", od.consecutive_5xx));
    }
    if what.is_empty() {
        return "off".into();
    }
    format!(
        "{}, every {}, eject {}, at most {}%",
        what.join(" or "),
        crate::duration::format(od.interval),
        crate::duration::format(od.base_ejection_time),
        od.max_ejection_percent
    )
}

/// Connection limits in words.
pub fn describe_limits(c: &ConnectionLimits) -> String {
    let mut parts = Vec::new();
    if let Some(m) = c.max_connections {
        parts.push(format!("max {m} connections"));
    }
    parts.push(format!("max {} pending", c.max_pending_requests));
    if let Some(m) = c.max_requests_per_connection {
        parts.push(format!("max {m} requests per connection"));
    }
    parts.join(", ")
}

/// A load balancer in words: `ewma (default)`, `ringHash on header x-user`.
pub fn describe_lb(algorithm: LbAlgorithm, set: bool, hash_on: Option<&HashKey>) -> String {
    let name = match algorithm {
        LbAlgorithm::Ewma => "ewma",
        LbAlgorithm::RoundRobin => "roundRobin",
        LbAlgorithm::LeastRequest => "leastRequest",
        LbAlgorithm::RingHash => "ringHash",
    };
    let on = match hash_on {
        Some(HashKey::Header(h)) => format!(" on header {h}"),
        Some(HashKey::Cookie(c)) => format!(" on cookie {c}"),
        Some(HashKey::QueryParam(q)) => format!(" on query {q}"),
        Some(HashKey::SourceIp) => " on source IP".into(),
        None => String::new(),
    };
    format!("{name}{on}{}", if set { "" } else { " (default)" })
}

impl Timeouts {
    /// The timeouts in words; `none` when none is set.
    pub fn describe(&self) -> String {
        let items = [
            ("request", &self.request),
            ("backendRequest (per try)", &self.backend_request),
            ("per try", &self.per_try),
            ("connect", &self.connect),
            ("idle", &self.idle),
        ];
        let parts: Vec<String> = items
            .iter()
            .filter_map(|(what, s)| s.as_ref().map(|s| format!("{what} {} ({})", s.value, s.source)))
            .collect();
        if parts.is_empty() { "none".into() } else { parts.join(", ") }
    }
}

impl Retries {
    /// The retries in words.
    pub fn describe(&self) -> String {
        let what = match &self.policy {
            Some(r) => format!("{} ({})", describe_retry(r), self.source),
            None => "default: connection failures and resets only".into(),
        };
        format!("{what}; {}", describe_budget(&self.budget))
    }
}

#[cfg(test)]
mod egress_tests {
    use super::*;
    use crate::load::parse_documents;

    #[test]
    fn explains_the_egress_decision_with_the_code_the_proxy_runs() {
        let yaml = "apiVersion: plexus.dev/v1alpha1\nkind: ExternalService\nmetadata: {name: api, namespace: ops}\nspec: {hosts: [api.example.com], ports: [{port: 443, protocol: https}], tls: {originate: true, caFile: /etc/ca.pem}}\n---\napiVersion: plexus.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {outboundTrafficPolicy: registryOnly}\n";
        let snapshot = MeshSnapshot::compile(&parse_documents("t", yaml).expect("valid"), "t");
        let x = explain_egress(&snapshot, "api.example.com:443").expect("explained");
        assert!(x.allowed && x.tls_origination);
        assert_eq!(x.external_service.as_deref(), Some("ops/api"));
        assert_eq!(x.ca_file.as_deref(), Some("/etc/ca.pem"));
        assert!(x.response.is_none());
        let x = explain_egress(&snapshot, "api.example.com").expect("explained");
        assert!(!x.allowed, "port 80 is not listed");
        assert_eq!(x.destination, "api.example.com:80");
        assert_eq!(x.outbound_traffic_policy, "registryOnly");
        assert!(x.response.as_deref().is_some_and(|r| r.contains("destination not in the registry")));
        assert!(explain_egress(&snapshot, ":443").is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::parse_documents;

    const MESH: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080, appProtocol: http}]}
---
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews-v1}
spec: {selector: {app: reviews, version: v1}, ports: [{port: 9080}]}
---
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews-v2}
spec: {selector: {app: reviews, version: v2}, ports: [{port: 9080}]}
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: reviews-1, labels: {app: reviews, version: v1}}
spec: {address: 127.0.0.1, ports: [{port: 7001}]}
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: reviews-2, labels: {app: reviews, version: v2}}
spec: {address: 127.0.0.2, ports: [{port: 7002}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: reviews-v1, weight: 80}, {name: reviews-v2, weight: 20}]
    timeouts: {request: 3s}
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-User, value: jason}]}]
    backendRefs: [{name: reviews-v2}]
    retry: {codes: [503], attempts: 2}
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /ghost}}]
    backendRefs: [{name: reviews-v1, weight: 50}, {name: reviews-v9, weight: 50}]
  - matches: [{path: {type: RegularExpression, value: "/v[0-9]+/.*"}}]
    backendRefs: [{name: reviews-v2}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /flat}}
---
apiVersion: plexus.dev/v1alpha1
kind: ResiliencePolicy
metadata: {name: reviews-v1}
spec:
  targetRef: {kind: Service, name: reviews-v1}
  timeouts: {request: 10s, connect: 1s}
  retries: {attempts: 3, on: [5xx]}
---
apiVersion: plexus.dev/v1alpha1
kind: ResiliencePolicy
metadata: {name: reviews}
spec:
  targetRef: {kind: Service, name: reviews}
  loadBalancer: {algorithm: roundRobin}
---
apiVersion: plexus.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: reviews-v2}
spec: {targetRef: {kind: Service, name: reviews-v2}, requestsPerSecond: 100, burst: 200}
"#;

    fn snapshot() -> MeshSnapshot {
        MeshSnapshot::compile(&parse_documents("mesh", MESH).expect("valid"), "1")
    }

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> ExplainRequest {
        ExplainRequest {
            method: method.into(),
            path: path.into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn forward(p: &Possibility) -> &Target {
        match &p.action {
            Action::Forward(t) => t,
            other => panic!("expected a forward, got {other:?}"),
        }
    }

    #[test]
    fn more_headers_win_over_an_equal_prefix() {
        let snap = snapshot();
        let x = explain(&snap, Some("productpage"), "reviews:9080", &req("GET", "/api/x", &[("x-user", "jason")]))
            .expect("explains");
        assert_eq!(x.route.name.as_deref(), Some("default/reviews"));
        assert_eq!(x.route.rule, Some(1));
        assert_eq!(x.route.description, "path prefix /api and header x-user = jason");
        assert_eq!(x.predicted_backend.as_deref(), Some("reviews-v2.default"));
        let t = forward(&x.outcomes[0]);
        assert_eq!(t.retries.source, "route default/reviews rule 1");
        assert_eq!(t.retries.policy.as_ref().map(|r| r.attempts), Some(3), "2 retries = 3 tries");
        assert_eq!(t.rate_limit.as_ref().map(|r| (r.requests_per_second, r.burst)), Some((100, 200)));
        assert_eq!(t.endpoints[0].workload, "reviews-2");
        assert!(x.authorization.allowed);
        assert_eq!(x.authorization.policy, "mesh default (allow)");
        assert_eq!(x.authorization.identity, None, "explain() does not look the client up");
        assert_eq!(x.source.as_deref(), Some("productpage"));
    }

    #[test]
    fn weighted_split_lists_each_backend_with_its_share() {
        let snap = snapshot();
        let x = explain(&snap, None, "reviews", &req("GET", "/api/x?page=2", &[])).expect("explains");
        assert_eq!(x.route.rule, Some(0));
        assert_eq!(x.request.query.as_deref(), Some("page=2"));
        let shares: Vec<(String, f64, bool)> =
            x.backends.iter().map(|b| (b.service.clone(), b.percent, b.exists)).collect();
        assert_eq!(
            shares,
            [("reviews-v1.default".to_string(), 80.0, true), ("reviews-v2.default".to_string(), 20.0, true)]
        );
        assert_eq!(x.predicted_backend, None, "a split is not deterministic");
        assert_eq!(x.outcomes.len(), 2);
        let v1 = forward(&x.outcomes[0]);
        assert_eq!((v1.service.as_str(), x.outcomes[0].percent), ("reviews-v1.default", 80.0));
        assert_eq!(
            v1.timeouts.request,
            Some(Sourced { value: "3s".into(), source: "route default/reviews rule 0".into() })
        );
        assert_eq!(
            v1.timeouts.connect.as_ref().map(|s| s.source.as_str()),
            Some("ResiliencePolicy default/reviews-v1")
        );
        assert_eq!(v1.retries.source, "ResiliencePolicy default/reviews-v1");
        let v2 = forward(&x.outcomes[1]);
        assert_eq!((v2.service.as_str(), x.outcomes[1].percent), ("reviews-v2.default", 20.0));
        // Without a policy of its own, a backend is called with the addressed Service's.
        assert_eq!(v2.policy.as_deref(), Some("default/reviews"));
        assert_eq!(v2.load_balancer, LbAlgorithm::RoundRobin);
        assert_eq!(v1.load_balancer, LbAlgorithm::Ewma, "reviews-v1's own policy wins");
        assert_eq!(v2.retries.describe(), "default: connection failures and resets only; budget 20% + 10/s over 10s");
    }

    #[test]
    fn redirect_computes_the_location() {
        let snap = snapshot();
        let x = explain(&snap, None, "reviews:9080", &req("GET", "/old?a=1", &[])).expect("explains");
        assert_eq!(x.route.rule, Some(2));
        assert_eq!(x.route.description, "path = /old");
        assert!(x.backends.is_empty());
        assert_eq!(x.predicted_backend, None);
        match &x.outcomes[..] {
            [Possibility { percent, action: Action::Redirect { status, location } }] => {
                assert_eq!(*percent, 100.0);
                assert_eq!(*status, 301);
                assert_eq!(location, "http://reviews:9080/new?a=1");
            }
            other => panic!("expected one redirect, got {other:?}"),
        }
    }

    #[test]
    fn missing_backend_fails_its_share() {
        let snap = snapshot();
        let x = explain(&snap, None, "reviews", &req("GET", "/ghost", &[])).expect("explains");
        assert_eq!(x.backends.iter().map(|b| b.exists).collect::<Vec<_>>(), [true, false]);
        assert_eq!(forward(&x.outcomes[0]).service, "reviews-v1.default");
        match &x.outcomes[1].action {
            Action::Fail { status, error } => {
                assert_eq!(*status, 500);
                assert_eq!(error, "backend not found: reviews-v9.default");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        assert_eq!(x.outcomes[1].percent, 50.0);
    }

    #[test]
    fn no_route_goes_to_the_service_itself() {
        let snap = snapshot();
        let x = explain(&snap, None, "reviews.default:9080", &req("POST", "/other", &[])).expect("explains");
        assert_eq!(x.route.name, None);
        assert_eq!(x.route.description, NO_ROUTE);
        assert_eq!(x.predicted_backend.as_deref(), Some("reviews.default"));
        let t = forward(&x.outcomes[0]);
        assert_eq!(t.endpoints.len(), 2, "the Service selects both workloads");
        assert_eq!(t.timeouts.describe(), "none");
        assert_eq!(x.destination.protocol, Some(AppProtocol::Http));
    }

    #[test]
    fn regex_and_rewrite() {
        let snap = snapshot();
        let x = explain(&snap, None, "reviews", &req("GET", "/v2/items", &[])).expect("explains");
        assert_eq!(x.route.rule, Some(4));
        assert_eq!(x.route.description, "path ~ /v[0-9]+/.*");
        assert_eq!(x.filters.rewrite, Some(AppliedRewrite { host: None, path: Some("/flat".into()) }));
        assert_eq!(x.filters.describe(), ["rewrite to path /flat"]);
    }

    #[test]
    fn bad_destinations_and_requests_are_errors() {
        let snap = snapshot();
        let r = req("GET", "/", &[]);
        assert_eq!(explain(&snap, None, "nope", &r).expect_err("unknown"), "service default/nope not found");
        assert!(explain(&snap, None, "reviews:1", &r).expect_err("port").contains("has no port 1"));
        assert!(explain(&snap, None, "reviews", &req("GET", "/", &[("bad header", "x")])).is_err());
        assert!(explain(&snap, None, "reviews", &req("GET", "nopath", &[])).is_err());
    }

    #[test]
    fn routing_table_in_precedence_order() {
        let snap = snapshot();
        let t = routing_table(&snap, &ServiceName::new("reviews", "default"), None).expect("table");
        assert_eq!(t.len(), 1);
        let order: Vec<(usize, &str)> = t[0].routes.iter().map(|e| (e.rule, e.description.as_str())).collect();
        assert_eq!(
            order,
            [
                (2, "path = /old"),
                (4, "path ~ /v[0-9]+/.*"),
                (3, "path prefix /ghost"),
                (1, "path prefix /api and header x-user = jason"),
                (0, "path prefix /api"),
            ]
        );
        assert_eq!(t[0].routes[0].filters.describe(), ["redirect 301 path /new"]);
        assert_eq!(t[0].endpoints.len(), 2);
        assert!(routing_table(&snap, &ServiceName::new("reviews", "default"), Some(1)).is_err());
        assert_eq!(
            routing_table(&snap, &ServiceName::new("ghost", "prod"), None).expect_err("missing"),
            "service prod/ghost not found"
        );
    }

    #[test]
    fn proposed_resources_replace_or_join_the_current_ones() {
        let mut current = parse_documents("mesh", MESH).expect("valid");
        for r in &mut current {
            r.metadata.creation_timestamp = Some("2025-01-01T00:00:00.000Z".into());
        }
        let proposed = parse_documents(
            "proposed",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews}\nspec:\n  parentRefs: [{name: reviews}]\n  rules: [{backendRefs: [{name: reviews-v2}]}]\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: extra}\nspec: {ports: [{port: 80}]}\n",
        )
        .expect("valid");
        let n = current.len();
        let merged = apply_on_top(current, proposed, "2026-01-01T00:00:00.000Z");
        assert_eq!(merged.len(), n + 1);
        let route = merged.iter().find(|r| r.kind == crate::Kind::HttpRoute).expect("route");
        assert_eq!(route.metadata.creation_timestamp.as_deref(), Some("2025-01-01T00:00:00.000Z"));
        let snap = MeshSnapshot::compile(&merged, "proposed");
        let x = explain(&snap, None, "reviews", &req("GET", "/api/x", &[])).expect("explains");
        assert_eq!(x.predicted_backend.as_deref(), Some("reviews-v2.default"), "the proposed route replaced the old");
        assert!(snap.services.contains_key(&ServiceName::new("extra", "default")));
    }

    const AUTHZ: &str = r#"
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: productpage-v1-abcde, labels: {app: productpage, version: v1}}
spec: {address: 127.0.0.9, ports: [{port: 7009}], serviceAccount: productpage}
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: intruder, namespace: prod, labels: {app: intruder}}
spec: {address: 127.0.0.10, ports: [{port: 7010}]}
---
apiVersion: plexus.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: reviews}
spec:
  targetRef: {kind: Service, name: reviews, port: 9080}
  action: allow
  rules:
  - from: {serviceAccounts: [productpage]}
  - from: {unauthenticated: true}
    to: {paths: ["/flat"]}
---
apiVersion: plexus.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: trial}
spec:
  targetRef: {kind: Service, name: reviews}
  action: audit
  rules: [{to: {methods: [GET]}}]
"#;

    #[test]
    fn client_identities_come_from_workloads() {
        let resources = parse_documents("mesh", &format!("{MESH}{AUTHZ}")).expect("valid");
        let id = |from: Option<&str>| client_identity(&resources, "plexus.local", from);
        let pp = id(Some("productpage")).expect("found by app label");
        assert_eq!(pp.identity.as_deref(), Some("spiffe://plexus.local/ns/default/sa/productpage"));
        let by_name = id(Some("productpage-v1-abcde")).expect("found by name");
        assert_eq!(by_name.identity, pp.identity);
        assert!(by_name.note.as_deref().is_some_and(|n| n.contains("default/productpage-v1-abcde")), "{by_name:?}");
        let intruder = id(Some("intruder.prod")).expect("found in its namespace");
        assert_eq!(intruder.identity.as_deref(), Some("spiffe://plexus.local/ns/prod/sa/default"));
        assert_eq!(id(Some("intruder")).expect("looked up").identity, None, "not in namespace default");
        let raw = id(Some("spiffe://x/ns/a/sa/b")).expect("as is");
        assert_eq!(raw.identity.as_deref(), Some("spiffe://x/ns/a/sa/b"));
        let none = id(None).expect("unauthenticated");
        assert_eq!((none.name, none.identity), (None, None));
        let ghost = id(Some("ghost")).expect("not an error");
        assert_eq!(ghost.identity, None);
        assert!(ghost.note.as_deref().is_some_and(|n| n.contains("no workload ghost")));
        let two = parse_documents(
            "two",
            &format!("{MESH}---\napiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {{name: r-x, labels: {{app: reviews}}}}\nspec: {{address: 127.0.0.11, serviceAccount: other}}\n"),
        )
        .expect("valid");
        let err = client_identity(&two, "plexus.local", Some("reviews")).expect_err("ambiguous");
        assert!(err.contains("default, other"), "{err}");
    }

    #[test]
    fn authorization_is_the_destination_decision_for_the_client() {
        let resources = parse_documents("mesh", &format!("{MESH}{AUTHZ}")).expect("valid");
        let snap = MeshSnapshot::compile(&resources, "1");
        let client = |from: &str| client_identity(&resources, &snap.mesh.trust_domain, Some(from)).expect("client");
        let x =
            explain_as(&snap, &client("productpage"), "reviews:9080", &req("GET", "/api/x", &[])).expect("explains");
        let a = &x.authorization;
        assert!(a.allowed, "{a:?}");
        assert_eq!(a.policy, "default/reviews");
        assert_eq!(a.evaluated_at, "reviews.default:9080");
        assert_eq!(a.description, "allow by default/reviews for spiffe://plexus.local/ns/default/sa/productpage");
        assert!(a.audit.is_empty(), "GET matches the audit policy's rule");

        let x = explain_as(&snap, &client("intruder.prod"), "reviews", &req("POST", "/api/x", &[])).expect("explains");
        let a = &x.authorization;
        assert!(!a.allowed);
        assert_eq!(a.description, "deny: 403 denied by default/reviews for spiffe://plexus.local/ns/prod/sa/default");
        assert_eq!(a.audit, ["default/trial"]);
        assert!(a.notes.iter().any(|n| n == "audit policy default/trial would deny this request"), "{a:?}");

        // No --from: unauthenticated; the rewrite to /flat happens before the destination.
        let anon = client_identity(&resources, "plexus.local", None).expect("client");
        let x = explain_as(&snap, &anon, "reviews", &req("GET", "/api/x", &[])).expect("explains");
        assert_eq!(x.authorization.description, "deny: 403 denied by default/reviews for an unauthenticated client");
        let x = explain_as(&snap, &anon, "reviews", &req("GET", "/v2/items", &[])).expect("explains");
        assert!(x.authorization.allowed, "rewritten to /flat: {:?}", x.authorization);

        // A redirect never reaches the destination: said so.
        let x = explain_as(&snap, &anon, "reviews", &req("GET", "/old", &[])).expect("explains");
        assert!(x.authorization.notes.iter().any(|n| n.contains("does not reach the destination")));
    }
}
