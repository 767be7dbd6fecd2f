//! Inbound HTTP: requests arriving from other sidecars (or, in permissive mode, from outside
//! the mesh) for the local application.
//!
//! Before a request is forwarded, the rate limit of this sidecar's own Service port
//! (RateLimitPolicy) takes a token; without one the request is answered 429 (gRPC
//! `RESOURCE_EXHAUSTED`) with `retry-after`, and counted in `plexus_rate_limited_total`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use http::{Request, Response, Version};
use hyper::body::Incoming;

use super::body::{self, Body};
use super::client::Proto;
use super::observe::Observation;
use super::{Head, Target, deadline, downstream_response, forward_upgrade, headers};
use crate::error::ProxyError;
use crate::metrics::ServicePolicyLabels;
use crate::proxy::State;

/// What the inbound listener knows about a connection.
#[derive(Debug, Clone)]
pub struct InboundConn {
    pub peer: SocketAddr,
    /// The application port: `--app-port`, or the original destination port when redirected.
    pub app_port: Option<u16>,
}

/// Handles one inbound request; never fails (errors become responses).
pub async fn handle(state: Arc<State>, conn: Arc<InboundConn>, mut req: Request<Incoming>) -> Response<Body> {
    let received = tokio::time::Instant::now();
    let request_id = headers::ensure_request_id(req.headers_mut());
    let head = Head::of(&req);
    let mut obs = Observation::new(state.clone(), "inbound", &head, request_id);
    state.fill_destination(&mut obs.peers);
    let Some(app_port) = conn.app_port else {
        return obs.fail(ProxyError::NoEndpoints("the local application (no --app-port)".into()));
    };
    if let Err(e) = rate_limit(&state, app_port) {
        return obs.fail(e);
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, app_port));
    obs.upstream = Some(addr);
    // The peer sidecar says when the app speaks HTTP/1 although the hop was HTTP/2.
    let proto = if head.headers.contains_key(headers::ORIG_PROTO) || head.version != Version::HTTP_2 {
        Proto::Http1
    } else {
        Proto::Http2
    };
    let authority = head.authority().unwrap_or_else(|| addr.to_string());
    let target = Target { addr, proto, authority, app_http1_behind_peer: false };
    let result = if head.version != Version::HTTP_2 && headers::is_upgrade(&head.headers) {
        forward_upgrade(&state, req, &head, &target).await
    } else {
        // gRPC deadlines shrink here too: the app sees what is left, and an expired request
        // is answered DEADLINE_EXCEEDED without reaching it.
        let deadline = if obs.grpc { deadline::deadline(&head.headers, received, None) } else { None };
        let b = obs.count_request_body(body::boxed(req.into_body()));
        match head.upstream_request(&target, b, false) {
            Ok(mut up) => match deadline {
                Some(d) if d <= tokio::time::Instant::now() => Err(ProxyError::Timeout),
                Some(d) => {
                    deadline::propagate(up.headers_mut(), d, tokio::time::Instant::now());
                    tokio::time::timeout_at(d, state.pool.send(addr, proto, up))
                        .await
                        .unwrap_or(Err(ProxyError::Timeout))
                }
                None => state.pool.send(addr, proto, up).await,
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
fn rate_limit(state: &State, app_port: u16) -> Result<(), ProxyError> {
    let snapshot = state.discovery.current();
    let Some(own) = state.rate_limits.own_limit(&snapshot, &state.settings, Some(app_port)) else {
        return Ok(());
    };
    // The source's identity selects an override's bucket. It will be the SPIFFE ID of the
    // peer's mTLS client certificate; until mTLS between sidecars exists every source uses
    // the shared bucket.
    let identity: Option<&str> = None;
    state.rate_limits.check(&own.limit, identity).map_err(|retry_after| {
        state
            .metrics
            .rate_limited
            .get_or_create(&ServicePolicyLabels { destination_service: own.service, policy: own.limit.policy.clone() })
            .inc();
        ProxyError::RateLimited { policy: own.limit.policy.clone(), retry_after }
    })
}
