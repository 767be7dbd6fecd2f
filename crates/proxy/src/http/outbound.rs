//! Outbound HTTP: requests the local application sends into the mesh (or out of it).
//!
//! Destination, in order: the Service of an `--upstream` bind; the Service named by the
//! absolute-form URI, `:authority` or `Host`; the Service owning the original destination of a
//! transparently redirected connection; else the host itself (a plain forward proxy). Mesh
//! destinations go through the Service's routes, a weighted backend, the balancer and a pooled
//! connection — HTTP/2 when the endpoint is another sidecar.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::http::body::ReceivedBody;
use http::{Method, Request, Response, Version};
use plexus_core::decide::{Egress, EgressTarget};
use plexus_core::external::ExternalProtocol;
use plexus_core::model::{CompiledPort, CompiledService};
use plexus_core::names::split_authority;
use plexus_core::{MeshSnapshot, ServiceName};

use super::admit::admit;
use super::body::{self, Body};
use super::client::{self, Proto, SendOptions};
use super::forward::{self, app_protocol, describe_endpoint};
use super::observe::Observation;
use super::{Head, Target, downstream_response, forward_upgrade, headers, tunnel};
use crate::balance::{Choice, TryOutcome};
use crate::error::ProxyError;
use crate::proxy::State;
use crate::settings::Mode;
use crate::transport::tcp;

/// What the outbound listener knows about a connection before reading any request.
#[derive(Debug, Clone)]
pub struct OutboundConn {
    pub peer: SocketAddr,
    /// The original destination of a transparently redirected connection.
    pub orig_dst: Option<SocketAddr>,
    /// The Service port of an `--upstream` bind.
    pub bound: Option<(ServiceName, Option<u16>)>,
}

enum Dest<'a> {
    Service(&'a CompiledService, &'a CompiledPort),
    Direct { authority: String, addr: Option<SocketAddr> },
}

/// Handles one outbound request; never fails (errors become responses).
pub async fn handle(state: Arc<State>, conn: Arc<OutboundConn>, mut req: Request<ReceivedBody>) -> Response<Body> {
    let (mut head, mut obs) = Observation::start(state.clone(), "outbound", &mut req);
    state.fill_source(&mut obs.peers);
    if state.settings.mode == Mode::Egress {
        let why = "an egress gateway's outbound port forwards nothing: sidecars reach it over mTLS";
        return obs.fail(ProxyError::Forbidden(why.into()));
    }
    if state.settings.mode == Mode::Ingress
        && let Err(e) = gateway_allows(&state, &conn, &head)
    {
        return obs.fail(e);
    }
    // The path normalized here is the one routed and forwarded.
    if let Err(e) = admit(&state, &mut head) {
        return obs.fail(e);
    }
    // The rare paths (CONNECT, destinations outside the mesh) are boxed so that their futures
    // are not part of, and copied with, every mesh request's future.
    if req.method() == Method::CONNECT {
        return Box::pin(connect_tunnel(state, req, obs)).await;
    }
    // A bound request goes to its bind's Service whatever it names: no authority to look at.
    let named = if conn.bound.is_none() { head.authority() } else { None };
    let snapshot = match named {
        Some(a) => state.snapshot_for_host(split_authority(a).0).await,
        None => state.discovery.current(),
    };
    let dest = match resolve(&snapshot, &conn, &head) {
        Ok(d) => d,
        Err(e) => return obs.fail(e),
    };
    let (service, port) = match dest {
        Dest::Service(s, p) => (s, p),
        Dest::Direct { authority, addr } => {
            // A Service's virtual IP (netns mode, a ClusterIP) is the Service: its routes,
            // endpoints and mTLS, like every path into the mesh — never a plaintext dial of the
            // address.
            let virtual_ip = |a: &SocketAddr| {
                state.settings.vip_hosts.is_some() || snapshot.by_virtual_ip.contains_key(&a.ip().to_canonical())
            };
            if let Some(orig) = addr.filter(virtual_ip)
                && let Some(vip) = state.service_for_orig_dst(orig).await
            {
                return Box::pin(to_virtual_ip(state, &conn, req, head, obs, vip)).await;
            }
            let proto = app_protocol(None, head.version);
            return Box::pin(direct(state, &snapshot, req, head, obs, (authority, addr, proto), conn.peer)).await;
        }
    };
    let to = forward::MeshRequest {
        snapshot: &snapshot,
        service,
        port,
        peer: conn.peer,
        waited_for_endpoints: false,
        edge: None,
    };
    std::pin::pin!(forward::to_service(state.clone(), to, req, head, obs)).await
}

/// What an ingress gateway forwards (SPEC §5 "Not a way around the mesh"): only its
/// configuration — each `--upstream` bind to its Service. Nothing arriving on its outbound
/// port, no `CONNECT`, and no absolute-form request naming a host other than the bound
/// Service (an HTTP/1 request line `GET http://127.0.0.1:7701/… HTTP/1.1`).
fn gateway_allows(state: &State, conn: &OutboundConn, head: &Head) -> Result<(), ProxyError> {
    let Some((bound, _)) = &conn.bound else {
        return Err(ProxyError::Forbidden("a gateway forwards only to its configured routes".into()));
    };
    if head.method == Method::CONNECT {
        return Err(ProxyError::Forbidden("CONNECT is not served by a gateway".into()));
    }
    let absolute_form = head.version != Version::HTTP_2 && head.uri.scheme().is_some();
    if absolute_form {
        let host = head.uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let names_bound = ServiceName::candidates(host).contains(bound);
        let services_port = names_bound
            && state.discovery.current().services.get(bound).is_some_and(|s| s.port(head.uri.port_u16()).is_some());
        if !services_port {
            return Err(ProxyError::Forbidden(format!("a gateway forwards only to {bound}")));
        }
    }
    Ok(())
}

fn resolve<'a>(snapshot: &'a MeshSnapshot, conn: &OutboundConn, head: &Head) -> Result<Dest<'a>, ProxyError> {
    if let Some((name, port)) = &conn.bound {
        let service =
            snapshot.services.get(name).ok_or_else(|| ProxyError::NoEndpoints(format!("{name} (no such Service)")))?;
        let cp = service
            .port(*port)
            .ok_or_else(|| ProxyError::NoEndpoints(format!("{name}:{} (no such port)", port.unwrap_or(0))))?;
        return Ok(Dest::Service(service, cp));
    }
    let authority = head.authority();
    if let Some((s, p)) = authority.and_then(|a| snapshot.resolve_authority(a)) {
        return Ok(Dest::Service(s, p));
    }
    if let Some(orig) = conn.orig_dst {
        if let Some((s, p)) = snapshot.service_by_endpoint(orig) {
            return Ok(Dest::Service(s, p));
        }
        let authority = authority.map_or_else(|| orig.to_string(), str::to_string);
        return Ok(Dest::Direct { authority, addr: Some(orig) });
    }
    match authority {
        Some(a) => Ok(Dest::Direct { authority: a.to_string(), addr: None }),
        None => Err(ProxyError::BadRequest("no Host header or absolute URI to route by".into())),
    }
}

/// Sends a request whose original destination is a Service's virtual IP to that Service.
async fn to_virtual_ip(
    state: Arc<State>,
    conn: &OutboundConn,
    req: Request<ReceivedBody>,
    head: Head,
    obs: Observation,
    (name, port): (ServiceName, u16),
) -> Response<Body> {
    let snapshot = state.discovery.current();
    let Some((service, cp)) = snapshot.services.get(&name).and_then(|s| Some((s, s.port(Some(port))?))) else {
        return obs.fail(ProxyError::NoEndpoints(format!("{name}:{port}")));
    };
    let to = forward::MeshRequest {
        snapshot: &snapshot,
        service,
        port: cp,
        peer: conn.peer,
        waited_for_endpoints: false,
        edge: None,
    };
    std::pin::pin!(forward::to_service(state.clone(), to, req, head, obs)).await
}

/// Resolves `host:port` to one address.
async fn lookup(host: &str, port: u16) -> Result<SocketAddr, ProxyError> {
    let unknown = || ProxyError::UnknownDestination(format!("{host}:{port}"));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut addrs = tokio::net::lookup_host((host, port)).await.map_err(|_| unknown())?;
    addrs.next().ok_or_else(unknown)
}

/// The egress decision for `host:port` (and the original destination `addr`), counted and
/// noted for tap; a refusal is the error to answer with.
fn decide_egress<'s>(
    state: &State,
    snapshot: &'s MeshSnapshot,
    obs: &mut Observation,
    host: &str,
    addr: Option<SocketAddr>,
    port: u16,
) -> Result<Egress<'s>, ProxyError> {
    let decision =
        plexus_core::decide::egress(snapshot, EgressTarget { host: Some(host), addr: addr.map(|a| a.ip()), port });
    obs.notes.add(|| format!("egress to {host}:{port}: {}", decision.describe()));
    match decision {
        Egress::Denied => {
            let destination = format!("{host}:{port}");
            state.refuse_egress(&destination);
            Err(ProxyError::EgressDenied(destination))
        }
        Egress::External { service, .. } => {
            obs.peers.destination_service = service.label.clone();
            Ok(decision)
        }
        Egress::MeshAddress | Egress::AllowAny => {
            obs.peers.destination_service = host.into();
            Ok(decision)
        }
    }
}

/// The name to look up for an allowed destination: an ExternalService's as listed (lower-case,
/// no trailing dot), else as the client spelled it.
fn dial_name<'h>(decision: &Egress<'_>, host: &'h str) -> std::borrow::Cow<'h, str> {
    match decision {
        Egress::External { .. } => plexus_core::external::normalize_host(host).into(),
        _ => host.into(),
    }
}

/// Forwards a request to a destination outside the mesh's Services, as the egress decision
/// allows: an ExternalService named by the request is dialled by that name (so a `Host` header
/// cannot lend its permission to another address), with TLS when it originates it; one bound
/// to an egress gateway is sent there instead (from a sidecar), over mTLS like any Service.
/// `to`: the authority, a redirected connection's original destination, the app's protocol.
async fn direct(
    state: Arc<State>,
    snapshot: &MeshSnapshot,
    req: Request<ReceivedBody>,
    mut head: Head,
    mut obs: Observation,
    (authority, addr, mut proto): (String, Option<SocketAddr>, Proto),
    peer: SocketAddr,
) -> Response<Body> {
    let (host, named_port) = split_authority(&authority);
    // A redirected connection's port is where it was going, whatever `Host` says.
    let port = addr.map(|a| a.port()).or(named_port).unwrap_or(80);
    let decision = match decide_egress(&state, snapshot, &mut obs, host, addr, port) {
        Ok(d) => d,
        Err(e) => return obs.fail(e),
    };
    if let Egress::External { service, .. } = decision
        && let Some(gateway) = &service.egress_gateway
        && state.settings.mode != Mode::Egress
    {
        return Box::pin(via_egress_gateway(state, gateway.clone(), req, head, obs, peer)).await;
    }
    let upgrade = head.upgrades(&req);
    let mut origin = None;
    let mut dial = addr;
    let name = dial_name(&decision, host);
    if let Egress::External { service, port: ext_port } = decision {
        // Matched by name: that name is dialled, never an address the client connected to.
        if snapshot.externals.find(host, port).is_some() {
            dial = None;
        }
        if let Some(o) = service.originates_on(ext_port) {
            // Over originated TLS: HTTP/1.1, or HTTP/2 for a gRPC port (ALPN says which).
            proto = if ext_port.protocol == ExternalProtocol::Grpc { Proto::Http2 } else { Proto::Http1 };
            if upgrade {
                let why = format!("{host}:{port}: upgrades are not originated (connect with TLS yourself)");
                return obs.fail(ProxyError::OriginationFailed(why));
            }
            match state.originator.origin(host, o, Some(proto)) {
                Ok(o) => origin = Some(o),
                Err(e) => return obs.fail(e),
            }
        }
    }
    let addr = match dial {
        Some(a) => a,
        None => match lookup(&name, port).await {
            Ok(a) => a,
            Err(e) => return obs.fail(e),
        },
    };
    if state.is_self(addr) {
        return obs.fail(ProxyError::Forbidden(format!("{authority} is this proxy itself")));
    }
    obs.upstream = Some(addr);
    // Where originated TLS goes, for its failure counter.
    let destination = origin.as_ref().map(|_| format!("{name}:{port}"));
    let target = Target { addr, proto, authority: &authority, app_http1_behind_peer: false, peer_identity: None };
    let result = if upgrade {
        forward_upgrade(&state, req, &head, &target).await
    } else {
        let b = obs.request_body(req.into_body());
        // Sent once (outside the mesh: no retries): the headers move into it.
        match head.take_upstream_request(&target, b, false) {
            Ok(up) => {
                let options = SendOptions { origin, ..SendOptions::default() };
                let r = state.pool.send_with(addr, target.proto, up, options).await;
                match &destination {
                    Some(d) => state.originated(d, r),
                    None => r,
                }
            }
            Err(e) => Err(e),
        }
    };
    match result {
        Ok(resp) => obs.respond(downstream_response(resp, head.version), "-"),
        Err(e) => obs.fail(e),
    }
}

/// Sends a request for an ExternalService bound to an egress gateway to that gateway's Service:
/// its endpoints over mTLS (the gateway authorizes this sidecar's identity), the request's
/// authority kept for the gateway to decide on and dial.
async fn via_egress_gateway(
    state: Arc<State>,
    gateway: ServiceName,
    req: Request<ReceivedBody>,
    head: Head,
    obs: Observation,
    peer: SocketAddr,
) -> Response<Body> {
    let snapshot = state.snapshot_with(&gateway).await;
    let Some((service, port)) = snapshot.services.get(&gateway).and_then(|s| Some((s, s.port(None)?))) else {
        return obs
            .fail(ProxyError::NoEndpoints(format!("egress gateway {gateway} (no such Service, or not one port)")));
    };
    obs.notes.add(|| format!("through egress gateway {}/{}", gateway.namespace, gateway.name));
    let to = forward::MeshRequest { snapshot: &snapshot, service, port, peer, waited_for_endpoints: false, edge: None };
    std::pin::pin!(forward::to_service(state.clone(), to, req, head, obs)).await
}

/// An egress gateway (`--mode egress`) forwarding a request a sidecar sent it over mTLS, once
/// authorized for that sidecar's identity: out to the host its authority names, only if that
/// host's ExternalService names this gateway's Service in `egressGateway`; dialled and (TLS)
/// originated here, as a sidecar would.
pub async fn from_egress_gateway(
    state: Arc<State>,
    req: Request<ReceivedBody>,
    head: Head,
    obs: Observation,
    peer: SocketAddr,
) -> Response<Body> {
    let Some(authority) = head.authority().map(str::to_string) else {
        return obs.fail(ProxyError::BadRequest("no Host header or absolute URI to route by".into()));
    };
    let snapshot = state.discovery.current();
    let own = crate::resilience::ratelimit::own_port(&snapshot, &state.settings, None).map(|(s, _)| &s.name);
    let (host, port) = split_authority(&authority);
    let port = port.unwrap_or(80);
    let bound =
        snapshot.externals.find(host, port).is_some_and(|(e, _)| own.is_some() && e.egress_gateway.as_ref() == own);
    if !bound || head.method == Method::CONNECT {
        let gateway = own.map_or_else(
            || "this egress gateway".to_string(),
            |g| format!("egress gateway {}/{}", g.namespace, g.name),
        );
        let why = format!("{gateway} does not serve {host}:{port} (no ExternalService names it in egressGateway)");
        return obs.fail(ProxyError::Forbidden(if bound {
            format!("{gateway} carries HTTP requests, not CONNECT")
        } else {
            why
        }));
    }
    // The caller's sidecar says when its app spoke HTTP/1 although the hop was HTTP/2.
    let proto = if head.headers.contains_key(headers::ORIG_PROTO) || head.version != Version::HTTP_2 {
        Proto::Http1
    } else {
        Proto::Http2
    };
    Box::pin(direct(state, &snapshot, req, head, obs, (authority, None, proto), peer)).await
}

/// `CONNECT host:port`: opens a TCP stream to the Service (balanced) or host and splices it to
/// the client once the `200` is sent.
async fn connect_tunnel(state: Arc<State>, req: Request<ReceivedBody>, mut obs: Observation) -> Response<Body> {
    let Some(authority) = req.uri().authority().map(|a| a.to_string()) else {
        return obs.fail(ProxyError::BadRequest("CONNECT needs host:port".into()));
    };
    let snapshot = state.snapshot_for_host(split_authority(&authority).0).await;
    let timeout = state.settings.limits.connect_timeout;
    let upstream = if let Some((service, port)) = snapshot.resolve_authority(&authority) {
        obs.peers.destination_service = service.label.clone();
        match state.balancer.pick(&port.endpoints, &Choice::new(&port.policy, None), &[]) {
            None => Err(ProxyError::NoEndpoints(format!("{}:{}", service.name, port.port))),
            Some((ep, pick)) => {
                describe_endpoint(&mut obs, ep);
                // A meshed endpoint is reached like on every other path: mTLS to its identity.
                let r = state.pool.connect_peer(ep.addr, None, ep.principal.as_ref(), crate::tls::ALPN_TCP).await;
                pick.finish(TryOutcome::of(r.is_ok()));
                r
            }
        }
    } else {
        // Outside the mesh's Services: the egress decision. A tunnel to an ExternalService's
        // `tls` port with `tls.originate` gets TLS from this proxy (before the 200, so a
        // certificate that does not verify is a 502); any other carries the client's bytes.
        let (host, port) = split_authority(&authority);
        let port = port.unwrap_or(443);
        match decide_egress(&state, &snapshot, &mut obs, host, None, port) {
            Err(e) => Err(e),
            Ok(Egress::External { service, .. }) if let Some(gateway) = &service.egress_gateway => {
                Err(ProxyError::Forbidden(format!(
                    "{host}:{port} leaves through egress gateway {}/{}, which carries HTTP requests only",
                    gateway.namespace, gateway.name
                )))
            }
            Ok(decision) => {
                let name = dial_name(&decision, host);
                match lookup(&name, port).await {
                    Ok(addr) if state.is_self(addr) => {
                        Err(ProxyError::Forbidden(format!("{authority} is this proxy itself")))
                    }
                    Ok(addr) => {
                        obs.upstream = Some(addr);
                        match decision {
                            Egress::External { service, port } if let Some(o) = service.originates_tunnels_on(port) => {
                                state.originate_stream(&name, addr, o).await
                            }
                            _ => client::connect(addr, timeout, state.settings.outbound_mark)
                                .await
                                .map(client::PeerStream::Plain),
                        }
                    }
                    Err(e) => Err(e),
                }
            }
        }
    };
    let upstream = match upstream {
        Ok(s) => s,
        Err(e) => return obs.fail(e),
    };
    let peers = obs.peers.clone();
    let idle = state.settings.limits.idle_timeout;
    let tunnel_state = state.clone();
    let security = if upstream.is_mtls() { "mutual_tls" } else { "none" };
    obs.security = security;
    // The tunnel's client end: the HTTP/1.1 connection, or the HTTP/2 stream.
    let (client, hand_over) = match tunnel::accept(req) {
        Ok(accepted) => accepted,
        Err(e) => return obs.fail(e),
    };
    tokio::spawn(async move {
        match client.established().await {
            Ok(client) => {
                let guard = tunnel_state.tcp_opened("outbound", peers, security);
                let (moved, end) = tcp::forward(client, upstream, idle).await;
                if let Err(e) = end {
                    tracing::debug!(error = %e, "CONNECT tunnel ended");
                }
                guard.closed(moved);
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    obs.respond(tunnel::opening(Response::new(body::empty()), hand_over), "-")
}
