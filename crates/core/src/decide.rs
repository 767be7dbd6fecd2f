//! The routing decision for one request to a Service port: which rule matches, whether it
//! redirects, which backend Service port it goes to. Pure, so the proxy and `plexus explain`
//! run exactly the same code.

use crate::model::{CompiledPort, CompiledService, MeshSnapshot};
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
        return fail(RouteFailure::NoBackends(entry.route.clone()));
    };
    let Some(bs) = snapshot.services.get(&backend.service) else {
        return fail(RouteFailure::BackendNotFound(backend.service.to_string()));
    };
    // A backend without a port uses the destination's port number, else its only port.
    let Some(bp) = bs.port(backend.port.or(Some(port.port))).or_else(|| bs.port(None)) else {
        return fail(RouteFailure::BackendNotFound(format!(
            "{}:{}",
            backend.service,
            backend.port.unwrap_or(port.port)
        )));
    };
    Decision { entry: Some(entry), outcome: Outcome::Forward { service: bs, port: bp } }
}
