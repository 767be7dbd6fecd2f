//! Inbound HTTP: requests arriving from other sidecars (or, in permissive mode, from outside
//! the mesh) for the local application.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use http::{Request, Response, Version};
use hyper::body::Incoming;

use super::body::{self, Body};
use super::client::Proto;
use super::observe::Observation;
use super::{Head, Target, downstream_response, forward_upgrade, headers};
use crate::error::ProxyError;
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
    let request_id = headers::ensure_request_id(req.headers_mut());
    let head = Head::of(&req);
    let mut obs = Observation::new(state.clone(), "inbound", &head, request_id);
    state.fill_destination(&mut obs.peers);
    let Some(app_port) = conn.app_port else {
        return obs.fail(ProxyError::NoEndpoints("the local application (no --app-port)".into()));
    };
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
        let b = obs.count_request_body(body::boxed(req.into_body()));
        match head.upstream_request(&target, b, false) {
            Ok(up) => state.pool.send(addr, proto, up).await,
            Err(e) => Err(e),
        }
    };
    match result {
        Ok(resp) => obs.respond(downstream_response(resp, head.version), "-"),
        Err(e) => obs.fail(e),
    }
}
