//! The routing decision for one request to a Service port: which rule matches, whether it
//! redirects, which backend Service port it goes to. Pure, so the proxy and `plexus explain`
//! run exactly the same code.

use crate::model::{CompiledPort, CompiledService, MeshSnapshot};
use crate::names::ServiceName;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::parse_documents;

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
