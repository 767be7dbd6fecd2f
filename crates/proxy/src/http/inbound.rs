//! Inbound HTTP: requests arriving from other sidecars (or, in permissive mode, from outside
//! the mesh) for the local application.
//!
//! Before a request is forwarded, the rate limit of this sidecar's own Service port
//! (RateLimitPolicy) takes a token; without one the request is answered 429 (gRPC
//! `RESOURCE_EXHAUSTED`) with `retry-after`, and counted in `plexus_rate_limited_total`.
//! Then authorization ([`authorize`]: AuthorizationPolicies, TrafficTargets and the MeshConfig
//! default of the same port, for the peer's verified identity) may answer 403 (gRPC
//! `PERMISSION_DENIED`) with `x-plexus-error: denied by <policy>`, counted in
//! `plexus_authz_denied_total`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use crate::http::body::ReceivedBody;
use http::{HeaderValue, Request, Response, Version};
use plexus_core::authz::{self, Authorization, AuthzRequest};
use plexus_core::resource::DefaultAuthorization;
use plexus_core::route::RequestInfo;

use super::admit::admit;
use super::body::{self, Body};
use super::client::Proto;
use super::observe::Observation;
use super::{Head, Target, deadline, downstream_response, forward_upgrade, headers};
use crate::error::ProxyError;
use crate::metrics::{Label, ServicePolicyLabels, UNKNOWN};
use crate::proxy::State;
use crate::tap::Notes;

/// What the inbound listener knows about a connection.
#[derive(Debug)]
pub struct InboundConn {
    pub peer: SocketAddr,
    /// The application port: `--app-port`, or the original destination port when redirected.
    pub app_port: Option<u16>,
    /// The client's SPIFFE ID, verified by mutual TLS; `None` for plaintext (unauthenticated).
    pub peer_identity: Option<String>,
    /// The peer's identity as a metric label: made once per connection, shared by its requests.
    principal: Option<Label>,
    /// The last `x-plexus-source` seen on this connection with its workload and Service labels:
    /// a peer sidecar sends the same value on every request, so they are made once.
    source: Mutex<Option<(HeaderValue, Label, Label)>>,
}

impl InboundConn {
    pub fn new(peer: SocketAddr, app_port: Option<u16>, peer_identity: Option<String>) -> Self {
        let principal = peer_identity.as_deref().map(Label::from);
        InboundConn { peer, app_port, peer_identity, principal, source: Mutex::new(None) }
    }

    /// The workload and Service labels of a verified peer's `x-plexus-source` value.
    fn source_labels(&self, value: &HeaderValue) -> Option<(Label, Label)> {
        let mut last = self.source.lock().ok()?;
        if let Some((v, workload, service)) = last.as_ref()
            && v == value
        {
            return Some((workload.clone(), service.clone()));
        }
        let (workload, service) = headers::parse_source(value)?;
        let (workload, service) = (Label::from(workload), Label::from(service));
        // A copy of the value, not the request's: a header value shares hyper's read buffer,
        // which it would keep alive (and make hyper allocate a new one) for the connection's life.
        let value = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        *last = Some((value, workload.clone(), service.clone()));
        Some((workload, service))
    }
}

/// Handles one inbound request; never fails (errors become responses).
pub async fn handle(state: Arc<State>, conn: Arc<InboundConn>, mut req: Request<ReceivedBody>) -> Response<Body> {
    let received = tokio::time::Instant::now();
    let (mut head, mut obs) = Observation::start(state.clone(), "inbound", &mut req);
    state.fill_destination(&mut obs.peers);
    if let Some(id) = &conn.principal {
        obs.security = "mutual_tls";
        obs.peers.source_principal = id.clone();
        // The caller's workload and Service, as its sidecar states them over this verified
        // connection (the principal above is what mTLS proves).
        if let Some((workload, service)) = head.headers.get(headers::SOURCE).and_then(|v| conn.source_labels(v)) {
            obs.peers.source_workload = workload;
            obs.peers.source_service = service;
        }
    }
    // The path normalized here is the one authorized and forwarded.
    if let Err(e) = admit(&state, &mut head) {
        return obs.fail(e);
    }
    let Some(app_port) = conn.app_port else {
        return obs.fail(ProxyError::NoEndpoints("the local application (no --app-port)".into()));
    };
    // Authorization first: a denied request does not spend the rate limit's tokens.
    if let Err(e) = authorize(&state, app_port, conn.peer_identity.as_deref(), &head, &obs.notes) {
        return obs.fail(e);
    }
    if let Err(e) = rate_limit(&state, app_port, conn.peer_identity.as_deref()) {
        obs.notes.add(|| e.to_string());
        return obs.fail(e);
    }
    if state.settings.mode == crate::settings::Mode::Egress {
        return Box::pin(super::outbound::from_egress_gateway(state, req, head, obs, conn.peer)).await;
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, app_port));
    obs.upstream = Some(addr);
    // The peer sidecar says when the app speaks HTTP/1 although the hop was HTTP/2.
    let proto = if head.headers.contains_key(headers::ORIG_PROTO) || head.version != Version::HTTP_2 {
        Proto::Http1
    } else {
        Proto::Http2
    };
    // The authority as received, shared (no new string): the head changes below.
    let received_authority = head.shared_authority();
    let made;
    let authority = match &received_authority {
        Some(a) => a.as_str(),
        None => {
            made = addr.to_string();
            made.as_str()
        }
    };
    let target = Target { addr, proto, authority, app_http1_behind_peer: false, peer_identity: None };
    let result = if head.upgrades(&req) {
        // Boxed: upgrades are rare; unboxed, their future would be copied with every request's.
        Box::pin(forward_upgrade(&state, req, &head, &target)).await
    } else {
        // gRPC deadlines shrink here too: the app sees what is left, and an expired request
        // is answered DEADLINE_EXCEEDED without reaching it.
        let deadline = deadline::deadline(obs.grpc.then_some(&head.headers), received, None);
        // Sent once (no retries inbound): the headers move into the upstream request. A
        // request without a body needs no metering wrapper.
        let incoming = req.into_body();
        let b = if http_body::Body::is_end_stream(&incoming) { body::empty() } else { obs.request_body(incoming) };
        match head.take_upstream_request(&target, b, false) {
            Ok(mut up) => match deadline {
                Some(d) if d <= tokio::time::Instant::now() => Err(ProxyError::Timeout),
                Some(d) => {
                    deadline::propagate(up.headers_mut(), d, tokio::time::Instant::now());
                    tokio::time::timeout_at(d, std::pin::pin!(state.pool.send(addr, proto, up)))
                        .await
                        .unwrap_or(Err(ProxyError::Timeout))
                }
                // Pinned in place: awaited through a pointer, not copied into the awaiting slot.
                None => std::pin::pin!(state.pool.send(addr, proto, up)).await,
            },
            Err(e) => Err(e),
        }
    };
    match result {
        Ok(resp) => obs.respond(downstream_response(resp, head.version), "-"),
        Err(e) => obs.fail(e),
    }
}

/// Takes a token from the rate limit of this sidecar's Service port serving `app_port`, if any.
fn rate_limit(state: &State, app_port: u16, identity: Option<&str>) -> Result<(), ProxyError> {
    let snapshot = state.discovery.current();
    let Some(own) = state.rate_limits.own_limit(&snapshot, &state.settings, Some(app_port)) else {
        return Ok(());
    };
    // The source's identity (the SPIFFE ID of the peer's mTLS client certificate; none for
    // plaintext) selects an override's bucket.
    state.rate_limits.check(&own.limit, identity).map_err(|retry_after| {
        state
            .metrics
            .rate_limited
            .get_or_create(&ServicePolicyLabels { destination_service: own.service, policy: own.limit.policy.clone() })
            .inc();
        ProxyError::RateLimited { policy: own.limit.policy.clone(), retry_after }
    })
}

/// Authorizes a request for the application port `app_port` from the peer whose verified
/// SPIFFE ID is `peer` (`None`: unauthenticated — plaintext, or no mesh certificate), with
/// the policies of this sidecar's own Service port (the port the rate limit uses) and the
/// MeshConfig default. A denial is counted in `plexus_authz_denied_total`; each audit policy
/// that would have denied the request is logged (info), the decision unchanged.
/// The decision is noted for tap.
pub fn authorize(
    state: &State,
    app_port: u16,
    peer: Option<&str>,
    head: &Head,
    notes: &Notes,
) -> Result<(), ProxyError> {
    let parts = (head.method.as_str(), head.uri.path(), head.uri.query());
    authorize_parts(state, app_port, peer, parts, &head.headers, notes)
}

/// Authorizes a stream that is not HTTP (opaque TCP, TLS passed through, a mesh `plexus.tcp`
/// stream) to the local app. On a port with HTTP-level rules (paths, methods, routes) it is
/// refused in the name of the first such policy: it has no method or path those rules could
/// judge, and the application may still read HTTP in it (SPEC §5). Otherwise it is decided as
/// a request with no method and no path, so only rules without HTTP conditions match it, as
/// Istio does for TCP.
pub fn authorize_stream(state: &State, app_port: u16, peer: Option<&str>) -> Result<(), ProxyError> {
    let snapshot = state.discovery.current();
    if let Some(own) = state.rate_limits.own_port(&snapshot, &state.settings, Some(app_port))
        && let Some(policy) = own.authorization.http_policy()
    {
        return Err(denied(state, &own.service.name, &policy.name));
    }
    authorize_parts(state, app_port, peer, ("", "", None), &http::HeaderMap::new(), &Notes::default())
}

/// Whether only HTTP may reach the application port `app_port` (its Service port has
/// HTTP-level authorization rules): the app is then never dialled before a request is read.
pub fn http_only(state: &State, app_port: u16) -> bool {
    let snapshot = state.discovery.current();
    let own = state.rate_limits.own_port(&snapshot, &state.settings, Some(app_port));
    own.is_some_and(|o| o.authorization.http_policy().is_some())
}

/// Counts a denial in `plexus_authz_denied_total` and makes its error.
fn denied(state: &State, service: &str, policy: &str) -> ProxyError {
    state
        .metrics
        .authz_denied
        .get_or_create(&ServicePolicyLabels { destination_service: service.to_string(), policy: policy.to_string() })
        .inc();
    ProxyError::Denied { policy: policy.to_string() }
}

fn authorize_parts(
    state: &State,
    app_port: u16,
    peer: Option<&str>,
    (method, path, query): (&str, &str, Option<&str>),
    headers: &http::HeaderMap,
    notes: &Notes,
) -> Result<(), ProxyError> {
    let snapshot = state.discovery.current();
    let default = snapshot.mesh.default_authorization;
    let own = state.rate_limits.own_port(&snapshot, &state.settings, Some(app_port));
    // Without a Service port of its own no policy can name this sidecar: the default decides.
    let none = Authorization::default();
    let authorization = own.as_ref().map_or(&none, |o| &*o.authorization);
    if authorization.is_empty() && default == DefaultAuthorization::Allow {
        notes.add(|| "authorization: allowed (no policy; mesh default allow)".into());
        return Ok(());
    }
    let route = match &own {
        Some(o) if authorization.needs_route() && !method.is_empty() => {
            let info = RequestInfo { method, path, query, headers };
            let port = snapshot.services.get(&o.service).and_then(|s| s.port(Some(o.port)));
            port.and_then(|p| p.routes.find(&info)).map(|e| &*e.route)
        }
        _ => None,
    };
    let request = AuthzRequest { peer, method, path, port: own.as_ref().map_or(app_port, |o| o.port), route, headers };
    let decision = authz::decide(authorization, &request, default);
    let service = own.as_ref().map_or(UNKNOWN, |o| o.service.name.as_str());
    for policy in &decision.audit {
        tracing::info!(
            policy = %policy,
            destination = %service,
            method,
            path,
            peer = peer.unwrap_or("unauthenticated"),
            "authorization audit: the policy would deny this request"
        );
    }
    for policy in &decision.audit {
        notes.add(|| format!("authorization audit: {policy} would deny"));
    }
    if decision.allowed {
        notes.add(|| format!("authorization: allowed by {}", decision.policy));
        return Ok(());
    }
    notes.add(|| format!("authorization: denied by {}", decision.policy));
    Err(denied(state, service, &decision.policy))
}
