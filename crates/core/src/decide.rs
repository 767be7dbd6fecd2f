//! The routing decision for one request to a Service port: which rule matches, whether it
//! redirects, which backend Service port it goes to. Pure, so the proxy and `plexus explain`
//! run exactly the same code.

use crate::model::{CompiledPort, CompiledService, MeshSnapshot};
use crate::names::ServiceName;
use crate::policy::ClientPolicy;
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
