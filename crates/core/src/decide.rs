//! The routing decision for one request to a Service port: which rule matches, whether it
//! redirects, which backend Service port it goes to. Pure, so the proxy and `plexus explain`
//! run exactly the same code.

use crate::external::{CompiledExternal, ExternalPortInfo};
use crate::model::{CompiledPort, CompiledService, MeshSnapshot};
use crate::names::ServiceName;
use crate::resource::OutboundTrafficPolicy;
use std::time::Duration;

use crate::policy::{ClientPolicy, DEFAULT_RETRY, RetryPolicy};
use crate::route::{RequestInfo, RouteEntry};

/// What happens to a request.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// Sent to this backend Service port (the destination itself when no route matched).
    Forward { service: &'a CompiledService, port: &'a CompiledPort },
    /// Answered with a redirect.
    Redirect { status: u16, location: String },
    /// Answered with an error (500 in every case, as the Gateway API asks).
    Fail(RouteFailure),
}

/// Why a matched rule cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteFailure {
    /// Every backend has weight 0 (the route is named).
    NoBackends(String),
    /// The chosen backend Service (or its port) does not exist.
    BackendNotFound(String),
    /// An ExtensionRef names a FaultInjection that does not exist.
    MissingFault(String),
}

/// The decision with the rule that made it.
#[derive(Debug)]
pub struct Decision<'a> {
    pub entry: Option<&'a RouteEntry>,
    pub outcome: Outcome<'a>,
}

/// Where the request was addressed, for redirects: scheme, host and port as the client sent them.
#[derive(Debug, Clone, Copy)]
pub struct Addressed<'a> {
    pub scheme: &'a str,
    pub host: &'a str,
    pub port: Option<u16>,
    pub path_and_query: &'a str,
}

/// Decides what happens to `req` sent to `service:port`; `backend_roll` is a uniformly random
/// number that picks among weighted backends.
pub fn decide<'a>(
    snapshot: &'a MeshSnapshot,
    service: &'a CompiledService,
    port: &'a CompiledPort,
    req: &RequestInfo<'_>,
    addressed: &Addressed<'_>,
    backend_roll: u64,
) -> Decision<'a> {
    let Some(entry) = port.routes.find(req) else {
        return Decision { entry: None, outcome: Outcome::Forward { service, port } };
    };
    let fail = |f| Decision { entry: Some(entry), outcome: Outcome::Fail(f) };
    if let Some(missing) = entry.faults.iter().find(|f| f.fault.is_none()) {
        return fail(RouteFailure::MissingFault(missing.name.clone()));
    }
    if let Some(r) = &entry.redirect {
        let location = r.location(
            addressed.scheme,
            addressed.host,
            addressed.port,
            addressed.path_and_query,
            entry.matcher.prefix(),
        );
        return Decision { entry: Some(entry), outcome: Outcome::Redirect { status: r.status, location } };
    }
    let Some(backend) = entry.pick_backend(backend_roll) else {
        return fail(RouteFailure::NoBackends(entry.route.to_string()));
    };
    match resolve_backend(snapshot, &backend.service, backend.port, port.port) {
        Ok((bs, bp)) => Decision { entry: Some(entry), outcome: Outcome::Forward { service: bs, port: bp } },
        Err(f) => fail(f),
    }
}

/// The Service port a backend reference names: its own `port`, else the destination's port
/// number, else the backend's only port.
pub fn resolve_backend<'a>(
    snapshot: &'a MeshSnapshot,
    service: &ServiceName,
    port: Option<u16>,
    destination_port: u16,
) -> Result<(&'a CompiledService, &'a CompiledPort), RouteFailure> {
    let Some(bs) = snapshot.services.get(service) else {
        return Err(RouteFailure::BackendNotFound(service.to_string()));
    };
    let Some(bp) = bs.port(port.or(Some(destination_port))).or_else(|| bs.port(None)) else {
        return Err(RouteFailure::BackendNotFound(format!("{service}:{}", port.unwrap_or(destination_port))));
    };
    Ok((bs, bp))
}

/// The policy governing calls to `backend`: the backend Service's own ResiliencePolicy when it
/// has one, else the addressed Service's (a policy on `reviews` applies to traffic a route
/// sends on to `reviews-v1`).
pub fn client_policy<'a>(addressed: &'a CompiledPort, backend: &'a CompiledPort) -> &'a ClientPolicy {
    if backend.policy.source.is_some() { &backend.policy } else { &addressed.policy }
}

/// Where an effective call setting comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The matched route rule.
    Route,
    /// The client policy (a ResiliencePolicy, or the built-in defaults when none applies).
    Policy,
    /// The proxy's built-in retry ([`DEFAULT_RETRY`]): neither the rule nor a policy set one.
    Default,
}

/// How one request is sent to its backend port: the rule's timeouts and retry over the
/// client policy. The one place their precedence is written; the proxy applies it and
/// `plexus explain` describes it.
#[derive(Debug, Clone, Copy)]
pub struct CallSettings<'a> {
    /// The backend's client policy ([`client_policy`]).
    pub policy: &'a ClientPolicy,
    /// The whole request, retries included: the rule's `timeouts.request`, else the policy's.
    pub request_timeout: Option<(Duration, Source)>,
    /// The rule's `timeouts.backendRequest`.
    pub backend_request_timeout: Option<Duration>,
    /// The rule's `retry`, else the policy's, else [`DEFAULT_RETRY`].
    pub retry: &'a RetryPolicy,
    pub retry_source: Source,
    /// Each try: the rule's `backendRequest`, else the retry's `perTryTimeout`.
    pub per_try_timeout: Option<(Duration, Source)>,
}

/// The settings a request matched by `entry` (if any) to `addressed`, sent on to `backend`,
/// is called with.
pub fn call_settings<'a>(
    entry: Option<&'a RouteEntry>,
    addressed: &'a CompiledPort,
    backend: &'a CompiledPort,
) -> CallSettings<'a> {
    let policy = client_policy(addressed, backend);
    let request_timeout = entry
        .and_then(|e| e.request_timeout.map(|d| (d, Source::Route)))
        .or(policy.request_timeout.map(|d| (d, Source::Policy)));
    let backend_request_timeout = entry.and_then(|e| e.backend_request_timeout);
    let (retry, retry_source) = match (entry.and_then(|e| e.retry.as_ref()), policy.retry.as_ref()) {
        (Some(r), _) => (r, Source::Route),
        (None, Some(r)) => (r, Source::Policy),
        (None, None) => (&DEFAULT_RETRY, Source::Default),
    };
    let per_try_timeout =
        backend_request_timeout.map(|d| (d, Source::Route)).or(retry.per_try_timeout.map(|d| (d, retry_source)));
    CallSettings { policy, request_timeout, backend_request_timeout, retry, retry_source, per_try_timeout }
}

/// A destination outside the mesh's Services, as a sidecar sees it: the name the client used
/// (absolute-form URI, `Host`/`:authority`, `CONNECT` target, TLS SNI) and/or the address it
/// connected to (a transparently redirected connection's original destination), and the port.
#[derive(Debug, Clone, Copy)]
pub struct EgressTarget<'a> {
    pub host: Option<&'a str>,
    pub addr: Option<std::net::IpAddr>,
    pub port: u16,
}

/// The egress decision ([`egress`]).
#[derive(Debug, Clone, Copy)]
pub enum Egress<'a> {
    /// A listed ExternalService port: allowed whatever the policy, labelled with its name.
    External { service: &'a CompiledExternal, port: &'a ExternalPortInfo },
    /// The address of an endpoint of a mesh Service (transparent traffic to a workload).
    MeshAddress,
    /// In no registry; `outboundTrafficPolicy: allowAny` lets it through as addressed.
    AllowAny,
    /// In no registry; `outboundTrafficPolicy: registryOnly` refuses it (SPEC §5: 502
    /// `destination not in the registry`, a close for opaque streams).
    Denied,
}

impl Egress<'_> {
    pub fn allowed(&self) -> bool {
        !matches!(self, Egress::Denied)
    }

    /// The decision in words (tap notes, `plexus explain`).
    pub fn describe(&self) -> String {
        match self {
            Egress::External { service, port } => {
                let by = if service.egress_gateway.is_some() { "the egress gateway" } else { "the sidecar" };
                let tls = if service.originates_on(port).is_some() {
                    format!(", TLS originated by {by}")
                } else {
                    String::new()
                };
                let via = match &service.egress_gateway {
                    Some(g) => format!(", through egress gateway {}/{} (HTTP only)", g.namespace, g.name),
                    None => String::new(),
                };
                format!(
                    "allowed: ExternalService {}/{} port {} ({}){tls}{via}",
                    service.name.namespace,
                    service.name.name,
                    port.port,
                    port.protocol.as_str()
                )
            }
            Egress::MeshAddress => "allowed: the address of a mesh endpoint".into(),
            Egress::AllowAny => "allowed: not in the registry, outboundTrafficPolicy allowAny".into(),
            Egress::Denied => "denied: destination not in the registry (outboundTrafficPolicy registryOnly)".into(),
        }
    }
}

/// Decides whether a sidecar may send traffic to a destination that is not a mesh Service
/// (the caller has already looked the name up among Services): THE egress decision, run by
/// every outbound path of the proxy (HTTP by absolute-form or `Host`, `CONNECT`, opaque TCP,
/// transparent by original destination or SNI) and by `plexus explain`. A name is matched
/// first (an ExternalService host, [`crate::external`]), then the address: an ExternalService
/// IP entry, or a mesh endpoint. Anything else follows MeshConfig `outboundTrafficPolicy`.
pub fn egress<'a>(snapshot: &'a MeshSnapshot, target: EgressTarget<'_>) -> Egress<'a> {
    let externals = &snapshot.externals;
    let by_name = target.host.and_then(|h| externals.find(h, target.port));
    let by_addr = || target.addr.and_then(|ip| externals.find(&ip.to_string(), target.port));
    if let Some((service, port)) = by_name.or_else(by_addr) {
        return Egress::External { service, port };
    }
    if target.addr.is_some_and(|ip| snapshot.is_mesh_ip(ip)) {
        return Egress::MeshAddress;
    }
    match snapshot.mesh.outbound_traffic_policy {
        OutboundTrafficPolicy::AllowAny => Egress::AllowAny,
        OutboundTrafficPolicy::RegistryOnly => Egress::Denied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::parse_documents;

    const EGRESS: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {name: api}
spec: {hosts: [api.example.com], ports: [{port: 443, protocol: https}], tls: {originate: true}}
---
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {name: db, namespace: data}
spec: {hosts: [10.1.2.3], ports: [5432]}
---
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 9080}]}
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: reviews-1, labels: {app: reviews}}
spec: {address: 10.0.0.7, ports: [{port: 9080}]}
"#;

    fn egress_of(policy: &str, host: Option<&str>, addr: Option<&str>, port: u16) -> String {
        let yaml = format!(
            "{EGRESS}---\napiVersion: plexus.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default}}\nspec: {{outboundTrafficPolicy: {policy}}}\n"
        );
        let snapshot = MeshSnapshot::compile(&parse_documents("t", &yaml).expect("valid"), "t");
        let addr = addr.map(|a| a.parse().expect("ip"));
        match egress(&snapshot, EgressTarget { host, addr, port }) {
            Egress::External { service, .. } => format!("external {}", service.name),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn registry_only_allows_external_services_and_mesh_addresses_only() {
        let only = |host, addr, port| egress_of("registryOnly", host, addr, port);
        assert_eq!(only(Some("api.example.com"), None, 443), "external api.default");
        assert_eq!(only(Some("API.example.com."), None, 443), "external api.default");
        assert_eq!(only(Some("api.example.com"), None, 80), "Denied", "an unlisted port");
        assert_eq!(only(Some("other.example.com"), None, 443), "Denied");
        assert_eq!(only(Some("other.example.com"), Some("10.1.2.3"), 5432), "external db.data", "by address");
        assert_eq!(only(Some("10.1.2.3"), None, 5432), "external db.data", "an IP literal as the host");
        assert_eq!(only(None, Some("10.1.2.3"), 5433), "Denied", "an unlisted port of a listed address");
        assert_eq!(only(None, Some("10.0.0.7"), 9080), "MeshAddress");
        assert_eq!(only(None, Some("10.0.0.7"), 22), "MeshAddress", "a workload's address on any port");
        assert_eq!(only(None, Some("10.0.0.8"), 9080), "Denied", "an IP that belongs to nothing");
        assert_eq!(only(None, Some("::ffff:10.0.0.8"), 9080), "Denied");
        assert_eq!(only(None, None, 80), "Denied", "nothing known");
    }

    #[test]
    fn allow_any_lets_everything_out_and_still_names_external_services() {
        let any = |host, addr, port| egress_of("allowAny", host, addr, port);
        assert_eq!(any(Some("api.example.com"), None, 443), "external api.default");
        assert_eq!(any(Some("other.example.com"), None, 443), "AllowAny");
        assert_eq!(any(None, Some("192.0.2.1"), 80), "AllowAny");
        let yaml = EGRESS.to_string();
        let snapshot = MeshSnapshot::compile(&parse_documents("t", &yaml).expect("valid"), "t");
        let none = egress(&snapshot, EgressTarget { host: Some("x.test"), addr: None, port: 1 });
        assert!(none.allowed(), "no MeshConfig: allowAny");
        let text = egress(&snapshot, EgressTarget { host: Some("api.example.com"), addr: None, port: 443 }).describe();
        assert_eq!(text, "allowed: ExternalService default/api port 443 (https), TLS originated by the sidecar");
    }

    const MESH: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{port: 9080}]}
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
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /own}}]
    backendRefs: [{name: reviews-v1}]
    timeouts: {request: 3s, backendRequest: 500ms}
    retry: {codes: [503], attempts: 2}
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    backendRefs: [{name: reviews-v1}]
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: reviews-v2}]
---
apiVersion: plexus.dev/v1alpha1
kind: ResiliencePolicy
metadata: {name: reviews}
spec:
  targetRef: {kind: Service, name: reviews}
  timeouts: {request: 10s}
  retries: {attempts: 3, on: [5xx], perTryTimeout: 2s}
---
apiVersion: plexus.dev/v1alpha1
kind: ResiliencePolicy
metadata: {name: reviews-v1}
spec:
  targetRef: {kind: Service, name: reviews-v1}
  timeouts: {request: 7s}
  retries: {attempts: 4, on: [gateway-error], perTryTimeout: 1s}
"#;

    fn settings_for(snapshot: &MeshSnapshot, path: &str, check: impl FnOnce(CallSettings<'_>)) {
        let name = ServiceName::new("reviews", "default");
        let service = snapshot.services.get(&name).expect("reviews");
        let port = service.port(Some(9080)).expect("port");
        let headers = http::HeaderMap::new();
        let info = RequestInfo { method: "GET", path, query: None, headers: &headers };
        let addressed = Addressed { scheme: "http", host: "reviews", port: Some(9080), path_and_query: path };
        let decision = decide(snapshot, service, port, &info, &addressed, 0);
        let Outcome::Forward { port: backend, .. } = decision.outcome else { panic!("forwarded") };
        check(call_settings(decision.entry, port, backend));
    }

    #[test]
    fn the_rule_wins_over_the_policy_and_backend_request_bounds_each_try() {
        let resources = parse_documents("t", MESH).expect("valid");
        let snapshot = MeshSnapshot::compile(&resources, "t");
        settings_for(&snapshot, "/own", |s| {
            assert_eq!(s.request_timeout, Some((Duration::from_secs(3), Source::Route)));
            assert_eq!(s.backend_request_timeout, Some(Duration::from_millis(500)));
            assert_eq!((s.retry.attempts, s.retry_source), (3, Source::Route), "2 retries = 3 tries");
            assert_eq!(s.per_try_timeout, Some((Duration::from_millis(500), Source::Route)), "backendRequest, not 1s");
            assert_eq!(s.policy.source.as_deref(), Some("default/reviews-v1"), "the backend's own policy");
        });
    }

    #[test]
    fn the_backends_policy_else_the_addressed_ones_else_the_default_retry() {
        let resources = parse_documents("t", MESH).expect("valid");
        let snapshot = MeshSnapshot::compile(&resources, "t");
        settings_for(&snapshot, "/v1", |s| {
            assert_eq!(s.request_timeout, Some((Duration::from_secs(7), Source::Policy)));
            assert_eq!((s.retry.attempts, s.retry_source), (4, Source::Policy));
            assert_eq!(s.per_try_timeout, Some((Duration::from_secs(1), Source::Policy)));
        });
        settings_for(&snapshot, "/v2", |s| {
            assert_eq!(s.policy.source.as_deref(), Some("default/reviews"), "reviews-v2 has none: the addressed one's");
            assert_eq!(s.request_timeout, Some((Duration::from_secs(10), Source::Policy)));
            assert_eq!(s.per_try_timeout, Some((Duration::from_secs(2), Source::Policy)));
        });
        let without_policies: Vec<_> = parse_documents("t", MESH)
            .expect("valid")
            .into_iter()
            .filter(|r| r.kind != crate::Kind::ResiliencePolicy)
            .collect();
        let snapshot = MeshSnapshot::compile(&without_policies, "t");
        settings_for(&snapshot, "/v1", |s| {
            assert_eq!(s.request_timeout, None);
            assert_eq!(s.retry_source, Source::Default);
            assert_eq!(s.retry, &DEFAULT_RETRY);
            assert_eq!(s.per_try_timeout, None);
        });
    }
}
