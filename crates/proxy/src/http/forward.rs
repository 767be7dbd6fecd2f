//! Forwarding a request to a mesh Service: the routing decision (shared with `plexus explain`),
//! route filters, fault injection, mirroring, timeouts and deadline propagation, retries within
//! a budget, and endpoint choice.
//!
//! Order per request: decide (match, redirect, backend) → request filters (headers, rewrite) →
//! deadline (client `grpc-timeout` and route timeout, whichever ends first) → faults (delay,
//! then abort) → mirrors → tries (endpoint, send, retry while the policy, the method, the body
//! and the budget allow) → response filters. The whole of it, fault delay included, runs
//! within the deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::http::body::ReceivedBody;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use plexus_core::decide::{Addressed, Outcome, RouteFailure, call_settings, decide};
use plexus_core::model::{CompiledPort, CompiledService, Endpoint};
use plexus_core::names::split_authority;
use plexus_core::policy::{ClientPolicy, FaultAbort, RetryPolicy, happens};
use plexus_core::route::{Mirror, RequestInfo, RouteEntry, change_path};
use plexus_core::{MeshSnapshot, ServiceName};
use tokio::time::Instant;

use super::body::{self, Body};
use super::client::{Proto, SendOptions, UpstreamBody};
use super::observe::Observation;
use super::retry::RequestBody;
use super::{Head, Target, deadline, downstream_response, forward_upgrade, headers};
use crate::balance::{Choice, TryOutcome};
use crate::error::ProxyError;
use crate::metrics::ServiceRouteLabels;
use crate::proxy::State;
use crate::resilience::limits::LimitPermit;
use crate::tap::Notes;

/// A request whose backend has no endpoint: waits for one (bounded by the policy's
/// `endpointWait` and the request timeout), then is decided again on the new config; else 503.
#[allow(clippy::too_many_arguments)]
async fn wait_then_retry(
    state: Arc<State>,
    to: MeshRequest<'_>,
    backend: &CompiledService,
    backend_port: u16,
    entry: Option<&RouteEntry>,
    req: Request<ReceivedBody>,
    head: Head,
    obs: Observation,
) -> Response<Body> {
    let Some(port) = backend.port(Some(backend_port)) else {
        return obs.fail(ProxyError::NoEndpoints(format!("{}:{backend_port}", backend.name)));
    };
    let call = call_settings(entry, to.port, port);
    let wait = match call.request_timeout {
        Some((timeout, _)) => call.policy.endpoint_wait.min(timeout),
        None => call.policy.endpoint_wait,
    };
    let started = Instant::now();
    let fresh = if wait.is_zero() { None } else { wait_for_endpoints(&state, &backend.name, backend_port, wait).await };
    obs.notes.add(|| {
        format!("no endpoint for {}:{backend_port}: waited {} ms", backend.name, started.elapsed().as_millis())
    });
    let Some(snapshot) = fresh else {
        return obs.fail(ProxyError::NoEndpoints(format!("{}:{backend_port}", backend.name)));
    };
    let located = match to.edge {
        Some(edge) => edge.locate(&snapshot),
        None => snapshot.services.get(&to.service.name).and_then(|s| Some((s, s.port(Some(to.port.port))?))),
    };
    let Some((service, port)) = located else {
        return obs.fail(ProxyError::NoEndpoints(format!("{}:{backend_port}", backend.name)));
    };
    let again =
        MeshRequest { snapshot: &snapshot, service, port, peer: to.peer, waited_for_endpoints: true, edge: to.edge };
    to_service(state, again, req, head, obs).await
}

/// How long a mirrored copy may take before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// The request as it arrived at the outbound side, with where it is going.
pub struct MeshRequest<'a> {
    pub snapshot: &'a MeshSnapshot,
    pub service: &'a CompiledService,
    pub port: &'a CompiledPort,
    /// The client's address (ring hash on source IP).
    pub peer: SocketAddr,
    /// Whether this request already waited for an endpoint (it waits once).
    pub waited_for_endpoints: bool,
    /// Set when the request arrived at a gateway listener (`service`/`port` are then the
    /// virtual port of its hostname group).
    pub edge: Option<&'a Edge>,
}

/// Where a request entered the mesh at a gateway: the scheme and port redirects start from,
/// and the hostname group its routes came from (found again in a newer config).
#[derive(Debug, Clone)]
pub struct Edge {
    pub scheme: &'static str,
    pub listener_port: u16,
    pub gateway: ServiceName,
    pub listener: String,
    pub hostname: Option<String>,
}

impl Edge {
    /// The hostname group's virtual Service and port in `snapshot`.
    fn locate<'s>(&self, snapshot: &'s MeshSnapshot) -> Option<(&'s CompiledService, &'s CompiledPort)> {
        let g = snapshot.gateways.get(&self.gateway)?;
        let l = g.listeners.iter().find(|l| l.name == self.listener)?;
        let v = l.hosts.iter().find(|v| v.hostname == self.hostname)?;
        Some((&v.service, v.port()?))
    }
}

/// Requests waiting for an endpoint in this process, at most [`MAX_ENDPOINT_WAITERS`]; beyond
/// that a request without endpoints fails at once (the queue is bounded).
static ENDPOINT_WAITERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const MAX_ENDPOINT_WAITERS: usize = 10_000;

/// Waits up to `wait` for the config to hold an endpoint for `service:port`; returns that
/// config. Linkerd's fail-fast model: while a Service has no endpoint (its one replica
/// restarting), requests queue for a short, bounded time instead of failing at once.
async fn wait_for_endpoints(
    state: &State,
    service: &ServiceName,
    port: u16,
    wait: Duration,
) -> Option<Arc<MeshSnapshot>> {
    struct Waiter;
    impl Drop for Waiter {
        fn drop(&mut self) {
            ENDPOINT_WAITERS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    if ENDPOINT_WAITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= MAX_ENDPOINT_WAITERS {
        ENDPOINT_WAITERS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        return None;
    }
    let _waiter = Waiter;
    let mut changes = state.discovery.subscribe();
    let ready = |s: &MeshSnapshot| {
        s.services.get(service).and_then(|svc| svc.port(Some(port))).is_some_and(|p| !p.endpoints.is_empty())
    };
    tokio::time::timeout(wait, async {
        loop {
            let current = state.discovery.current();
            if ready(&current) {
                return Some(current);
            }
            changes.changed().await.ok()?;
        }
    })
    .await
    .ok()
    .flatten()
}

/// Sends `req` to the mesh Service `to.service:to.port`; never fails (errors become responses).
///
/// Its future is kilobytes (it holds the tries and the upstream exchange): callers pin it where
/// they make it (`std::pin::pin!(to_service(..)).await`), so that it is awaited through a pointer
/// rather than copied into the awaiting future's slot on every request — as it does with the
/// futures it awaits.
pub async fn to_service(
    state: Arc<State>,
    to: MeshRequest<'_>,
    req: Request<ReceivedBody>,
    mut head: Head,
    mut obs: Observation,
) -> Response<Body> {
    // When the request arrived: the observation read the clock then.
    let received = Instant::from_std(obs.started);
    // The authority as received, shared (no new string): the head changes below.
    let received_authority = head.shared_authority();
    let made;
    let authority = match &received_authority {
        Some(a) => a.as_str(),
        None => {
            made = format!("{}:{}", to.service.name.name, to.port.port);
            made.as_str()
        }
    };
    let (host, host_port) = split_authority(authority);
    let info = RequestInfo {
        method: head.method.as_str(),
        path: head.uri.path(),
        query: head.uri.query(),
        headers: &head.headers,
    };
    // At a gateway, a redirect keeps the listener's scheme and port (Gateway API).
    let addressed = match to.edge {
        Some(e) => {
            Addressed { scheme: e.scheme, host, port: Some(e.listener_port), path_and_query: head.path_and_query() }
        }
        None => Addressed { scheme: "http", host, port: host_port, path_and_query: head.path_and_query() },
    };
    let decision = decide(to.snapshot, to.service, to.port, &info, &addressed, fastrand::u64(..));
    let entry = decision.entry;
    if let Some(e) = entry {
        obs.route = e.route.clone();
    }
    let (backend, backend_port) = match decision.outcome {
        Outcome::Forward { service, port } => (service, port),
        Outcome::Redirect { status, location } => {
            obs.notes.add(|| format!("{}: redirect {status} to {location}", matched(entry)));
            return obs.respond(redirect(status, &location), "-");
        }
        Outcome::Fail(f) => {
            let err = route_failure(f);
            obs.notes.add(|| format!("{}: {err}", matched(entry)));
            return obs.fail(err);
        }
    };
    if backend_port.endpoints.is_empty() && !to.waited_for_endpoints {
        // The rare path (a Service with no endpoint): boxed, so every request's future stays small.
        return Box::pin(wait_then_retry(state, to, backend, backend_port.port, entry, req, head, obs)).await;
    }
    obs.notes.add(|| format!("{}: backend {}:{}", matched(entry), backend.name, backend_port.port));
    obs.peers.destination_service = backend.label.clone();
    let authority = match apply_request_filters(entry, &mut head) {
        Ok(rewritten) => rewritten.unwrap_or(authority),
        Err(e) => return obs.fail(e),
    };
    let call = call_settings(entry, to.port, backend_port);
    let policy = call.policy;
    let app_proto = app_protocol(backend_port.protocol, head.version);
    // `name.namespace:port`, for errors (formatted only when one happens).
    let destination = || format!("{}:{}", backend.name, backend_port.port);

    if head.upgrades(&req) {
        let Some((ep, pick)) = state.balancer.pick(&backend_port.endpoints, &Choice::new(policy, None), &[]) else {
            return obs.fail(ProxyError::NoEndpoints(destination()));
        };
        describe_endpoint(&mut obs, ep);
        let peer_identity = ep.principal.clone();
        if state.pool.mtls_to(peer_identity.as_ref()) {
            obs.security = "mutual_tls";
        }
        let target =
            Target { addr: ep.addr, proto: Proto::Http1, authority, app_http1_behind_peer: false, peer_identity };
        // Boxed: upgrades are rare; unboxed, their future would be copied with every request's.
        let result = Box::pin(forward_upgrade(&state, req, &head, &target)).await;
        pick.finish(match &result {
            Ok(resp) => TryOutcome::of_status(resp.status().as_u16()),
            Err(_) => TryOutcome::Failure,
        });
        return match result {
            Ok(resp) => obs.respond(downstream_response(resp, head.version), "-"),
            Err(e) => obs.fail(e),
        };
    }

    let deadline =
        deadline::deadline(obs.grpc.then_some(&head.headers), received, call.request_timeout.map(|(d, _)| d));
    let retry = call.retry;
    let mirrors = entry.map(|e| e.mirrors.as_slice()).unwrap_or_default();
    if let Some(d) = deadline {
        obs.notes.add(|| format!("deadline in {} ms", d.saturating_duration_since(received).as_millis()));
    }
    // A request without a body (most GETs) needs neither the metering wrapper nor a buffer.
    let incoming = req.into_body();
    let incoming = (!http_body::Body::is_end_stream(&incoming)).then(|| obs.request_body(incoming));
    let notes = &obs.notes;
    // Pinned where it is made (and dropped with this block, ending its borrows): awaited
    // through a pointer instead of copied into the awaiting slot.
    let result = {
        let work = std::pin::pin!(async {
            if let Some(e) = entry {
                inject_faults(e, obs.grpc, notes).await?;
            }
            // Read small bodies ahead only when a retry after sending, or a mirror, needs a copy.
            let body = match incoming {
                None => RequestBody::Replayable(bytes::Bytes::new()),
                Some(b) if retries_after_send(retry) || !mirrors.is_empty() => RequestBody::read(b).await,
                Some(b) => RequestBody::Streaming(Some(b)),
            };
            for m in mirrors {
                if happens(m.percent, fastrand::f64())
                    && let Some(copy) = body.copy()
                {
                    spawn_mirror(&state, to.snapshot, m, to.port.port, &head, copy);
                    notes.add(|| format!("mirrored to {}", m.service));
                }
            }
            // Circuit breaking: a slot of the destination's connection limits, held until the
            // response body ends.
            let permit = match &policy.connection_limits {
                Some(l) => state.limits.acquire(&backend.name, backend_port.port, l).await?,
                None => LimitPermit::unlimited(),
            };
            let hash = policy
                .hash_on
                .as_ref()
                .and_then(|k| crate::balance::request_hash(k, &head.headers, head.uri.query(), to.peer.ip()));
            let tries = Tries {
                state: &state,
                backend: &backend.name,
                endpoints: &backend_port.endpoints,
                destination: &destination,
                policy,
                retry,
                route: &obs.route,
                per_try_timeout: call.per_try_timeout.map(|(d, _)| d),
                app_proto,
                grpc: obs.grpc,
                deadline,
                hash,
                notes,
                send: SendOptions {
                    peer_identity: None,
                    max_requests_per_connection: policy.connection_limits.and_then(|l| l.max_requests_per_connection),
                    connect_timeout: policy.connect_timeout,
                    idle_timeout: policy.idle_timeout,
                    origin: None,
                },
            };
            std::pin::pin!(tries.run(&mut head, authority, body)).await.map(|(ep, resp)| (ep, resp, permit))
        });
        match deadline {
            Some(d) => tokio::time::timeout_at(d, work).await.unwrap_or(Err(ProxyError::Timeout)),
            None => work.await,
        }
    };
    match result {
        Ok((ep, resp, permit)) => {
            describe_endpoint(&mut obs, ep);
            if state.pool.mtls_to(ep.principal.as_ref()) {
                obs.security = "mutual_tls";
            }
            // The connection-limit slot, if the destination has limits, is held until the
            // response body ends (an unlimited permit holds nothing; the wrapper is not boxed).
            let mut resp = downstream_response(resp, head.version).map(|b| body::holding(b, permit));
            if let Some(m) = entry.and_then(|e| e.response_headers.as_ref()) {
                headers::apply_modifier(resp.headers_mut(), m);
            }
            obs.respond(resp, "-")
        }
        Err(e) => obs.fail(e),
    }
}

/// Request header modifier and URL rewrite; returns the authority to send instead of the
/// received one, if the rewrite names one.
fn apply_request_filters<'e>(entry: Option<&'e RouteEntry>, head: &mut Head) -> Result<Option<&'e str>, ProxyError> {
    let Some(e) = entry else { return Ok(None) };
    if let Some(m) = &e.request_headers {
        headers::apply_modifier(&mut head.headers, m);
    }
    let Some(rw) = &e.rewrite else { return Ok(None) };
    if let Some(change) = &rw.path {
        let path = change_path(change, head.uri.path(), e.matcher.prefix());
        let pq = match head.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut parts = head.uri.clone().into_parts();
        parts.path_and_query =
            Some(pq.parse().map_err(|_| ProxyError::BadRequest(format!("rewritten path {pq:?} is invalid")))?);
        head.uri = Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("rewritten URI is invalid".into()))?;
    }
    match &rw.hostname {
        Some(h) => {
            // The Host the application sees changes; the URI keeps addressing the Service.
            head.uri = strip_authority(&head.uri)?;
            Ok(Some(h.as_str()))
        }
        None => Ok(None),
    }
}

fn strip_authority(uri: &Uri) -> Result<Uri, ProxyError> {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    pq.parse().map_err(|_| ProxyError::BadRequest("invalid path".into()))
}

/// Delays and aborts of the rule's FaultInjections, in order.
async fn inject_faults(entry: &RouteEntry, grpc: bool, notes: &Notes) -> Result<(), ProxyError> {
    for f in entry.faults.iter().filter_map(|f| f.fault.as_ref()) {
        if let Some(d) = &f.delay
            && happens(d.percent, fastrand::f64())
        {
            notes.add(|| format!("fault {}: delay {} ms", f.name, d.fixed.as_millis()));
            tokio::time::sleep(d.fixed).await;
        }
        if let Some(a) = &f.abort
            && happens(a.percent, fastrand::f64())
        {
            let (http_status, grpc_status) = abort_statuses(a, grpc);
            notes.add(|| format!("fault {}: abort", f.name));
            return Err(ProxyError::FaultAbort { fault: f.name.clone(), http_status, grpc_status });
        }
    }
    Ok(())
}

/// The statuses an abort answers with: what it names, the other derived from it (gRPC's
/// HTTP-to-status mapping).
fn abort_statuses(a: &FaultAbort, grpc: bool) -> (u16, u16) {
    let from_http = |s: u16| match s {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    };
    match (a.http_status, a.grpc_status) {
        (Some(h), Some(g)) => (h, g),
        (Some(h), None) => (h, from_http(h)),
        (None, Some(g)) => (if grpc { 200 } else { 503 }, g),
        (None, None) => (503, 14),
    }
}

/// Whether a policy may retry once the request was sent (so the body must be kept).
fn retries_after_send(r: &RetryPolicy) -> bool {
    r.attempts > 1 && (retries_on_status(r) || (r.on.reset && r.per_try_timeout.is_some()))
}

/// Whether a policy may retry a request after a response (on its status).
fn retries_on_status(r: &RetryPolicy) -> bool {
    r.on.server_error || r.on.gateway_error || !r.on.statuses.is_empty() || !r.on.grpc_statuses.is_empty()
}

/// The tries of one request.
struct Tries<'a, 'e> {
    state: &'a Arc<State>,
    backend: &'a ServiceName,
    /// Borrowed apart from the rest: the endpoint that answered outlives the tries.
    endpoints: &'e plexus_core::EndpointSet,
    /// `name.namespace:port`, for errors.
    destination: &'a (dyn Fn() -> String + Sync),
    policy: &'a ClientPolicy,
    retry: &'a RetryPolicy,
    route: &'a str,
    /// Each try ([`plexus_core::decide::CallSettings::per_try_timeout`]).
    per_try_timeout: Option<Duration>,
    app_proto: Proto,
    grpc: bool,
    deadline: Option<Instant>,
    hash: Option<u64>,
    send: SendOptions,
    /// Retries and budget refusals, for tap.
    notes: &'a Notes,
}

impl<'e> Tries<'_, 'e> {
    /// Whether the method may be sent twice: idempotent, or the policy says so (gRPC requests
    /// count as told when the policy names gRPC status codes).
    fn method_allows(&self, head: &Head) -> bool {
        head.method.is_idempotent()
            || self.retry.non_idempotent
            || (self.grpc && !self.retry.on.grpc_statuses.is_empty())
    }

    /// Tries the request until an answer, a failure that may not be retried, or the end of
    /// the budget. (Not an `async fn`: its `mut` argument would be stored twice in its future.)
    #[allow(clippy::manual_async_fn)] // the reason is above
    fn run(
        &self,
        head: &mut Head,
        authority: &str,
        mut body: RequestBody,
    ) -> impl Future<Output = Result<(&'e Endpoint, Response<UpstreamBody>), ProxyError>> {
        async move {
            // One time for the budget and the first try's pick (a retry takes its own).
            let mut now = crate::clock::now();
            self.state.budgets.deposit(self.backend, self.policy.retry_budget, now);
            let per_try = self.per_try_timeout;
            let mut tried: Vec<SocketAddr> = Vec::new();
            let mut attempt = 1;
            loop {
                if self.deadline.is_some_and(|d| d <= Instant::from_std(crate::clock::now())) {
                    return Err(ProxyError::Timeout);
                }
                // Prefer endpoints not tried yet; when all were, any may be tried again.
                let exclude: &[SocketAddr] = if tried.len() < self.endpoints.len() { &tried } else { &[] };
                let choice = Choice::new(self.policy, self.hash);
                let Some((ep, pick)) = self.state.balancer.pick_at(self.endpoints, &choice, exclude, now) else {
                    return Err(ProxyError::NoEndpoints((self.destination)()));
                };
                let peer = ep.principal.clone();
                let target = Target {
                    addr: ep.addr,
                    proto: if ep.meshed { Proto::Http2 } else { self.app_proto },
                    authority,
                    app_http1_behind_peer: ep.meshed && self.app_proto == Proto::Http1,
                    peer_identity: peer.clone(),
                };
                let Some(b) = body.take() else {
                    return Err(ProxyError::UpstreamReset("the request body was already sent".into()));
                };
                // When another try may follow, its headers are this try's: given back by the pool
                // when this one fails (HTTP/1), else a copy the head keeps — HTTP/2 takes the
                // request whole, a try cut by its timeout is dropped, and a response's fields take
                // the request's map (a retry on a status).
                let may_repeat = body.replayable() && attempt < self.retry.attempts;
                let keep_copy =
                    may_repeat && (target.proto == Proto::Http2 || per_try.is_some() || retries_on_status(self.retry));
                let mut up = head.take_upstream_request(&target, b, keep_copy)?;
                // To a sidecar over mTLS: who calls, for its source labels.
                if let Some(source) = self.state.source_header()
                    && self.state.pool.mtls_to(peer.as_ref())
                {
                    up.headers_mut().insert(headers::SOURCE, source.clone());
                }
                if self.grpc
                    && let Some(d) = self.deadline
                {
                    deadline::propagate(up.headers_mut(), d, Instant::from_std(crate::clock::now()));
                }
                let send = std::pin::pin!(self.state.pool.try_send(
                    ep.addr,
                    target.proto,
                    up,
                    SendOptions { peer_identity: peer, ..self.send.clone() },
                ));
                let result = match per_try {
                    Some(t) => tokio::time::timeout(t, send).await.unwrap_or_else(|_| Err(ProxyError::Timeout.into())),
                    None => send.await,
                };
                let mut can_repeat = may_repeat;
                // A retry happens only when the failure is retriable AND the budget grants it;
                // otherwise the client gets this try's answer.
                let why = match result {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let grpc_status = || {
                            resp.headers().get(headers::GRPC_STATUS).and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
                        };
                        let ejected = pick.finish(TryOutcome::of_status(status));
                        self.count_ejection(ejected);
                        let retriable =
                            can_repeat && self.method_allows(head) && self.retry.retries_status(status, grpc_status);
                        if !retriable || !self.grant_retry() {
                            return Ok((ep, resp));
                        }
                        format!("status {status}")
                    }
                    Err(failed) => {
                        let e = failed.error;
                        if !keep_copy {
                            match failed.headers {
                                Some(h) => head.headers = *h,
                                None => can_repeat = false,
                            }
                        }
                        let ejected = pick.finish(TryOutcome::Failure);
                        self.count_ejection(ejected);
                        let on = &self.retry.on;
                        let retriable = can_repeat
                            && match &e {
                                ProxyError::ConnectFailed(_) => on.connect_failure,
                                ProxyError::UpstreamReset(_) => on.reset && self.method_allows(head),
                                // A try cut by the per-try timeout counts as the 504 (gRPC:
                                // DEADLINE_EXCEEDED) it is answered with, so a route's
                                // `retry.codes: [504]` retries it as a policy's `5xx` does.
                                ProxyError::Timeout => {
                                    (on.reset || self.retry.retries_status(504, || self.grpc.then_some(4)))
                                        && self.method_allows(head)
                                }
                                _ => false,
                            };
                        if !retriable || !self.grant_retry() {
                            return Err(e);
                        }
                        e.to_string()
                    }
                };
                tried.push(ep.addr);
                tracing::debug!(endpoint = %ep.addr, %why, attempt, "retrying");
                self.notes.retry(|| format!("try {attempt} to {}: {why}; retrying", ep.addr));
                attempt += 1;
                let wait = self.retry.backoff_before(attempt, fastrand::f64());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                now = crate::clock::now();
            }
        }
    }

    /// Takes a retry from the budget and counts it.
    fn grant_retry(&self) -> bool {
        if !self.state.budgets.withdraw(self.backend, self.policy.retry_budget) {
            tracing::debug!(backend = %self.backend, "retry budget exhausted");
            self.notes.add(|| "retry budget exhausted: no retry".into());
            return false;
        }
        self.state
            .metrics
            .retries
            .get_or_create(&ServiceRouteLabels {
                destination_service: self.backend.name.clone(),
                route: self.route.to_string(),
            })
            .inc();
        true
    }

    fn count_ejection(&self, ejected: bool) {
        if ejected {
            self.state.count_ejection(self.backend, self.route);
        }
    }
}

/// Sends a copy of the request to a mirror Service in the background; its answer is dropped.
fn spawn_mirror(state: &Arc<State>, snapshot: &MeshSnapshot, m: &Mirror, port: u16, head: &Head, body: Body) {
    let Some(service) = snapshot.services.get(&m.service) else {
        tracing::debug!(mirror = %m.service, "mirror Service not found");
        return;
    };
    let Some(mport) = service.port(m.port.or(Some(port))).or_else(|| service.port(None)) else { return };
    let Some((ep, pick)) = state.balancer.pick(&mport.endpoints, &Choice::new(&mport.policy, None), &[]) else {
        return;
    };
    let app_proto = app_protocol(mport.protocol, head.version);
    let authority = format!("{}:{}", service.name.name, mport.port);
    let target = Target {
        addr: ep.addr,
        proto: if ep.meshed { Proto::Http2 } else { app_proto },
        authority: &authority,
        app_http1_behind_peer: ep.meshed && app_proto == Proto::Http1,
        peer_identity: ep.principal.clone(),
    };
    let Ok(up) = head.upstream_request(&target, body, false) else { return };
    let state = state.clone();
    tokio::spawn(async move {
        let sent = tokio::time::timeout(MIRROR_TIMEOUT, async {
            // Like every path to a peer sidecar: mutual TLS to the endpoint's identity.
            let options = SendOptions { peer_identity: target.peer_identity.clone(), ..SendOptions::default() };
            let resp = state.pool.send_with(target.addr, target.proto, up, options).await?;
            let outcome = TryOutcome::of_status(resp.status().as_u16());
            // Drain the answer so the connection can be reused.
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            Ok::<TryOutcome, ProxyError>(outcome)
        })
        .await;
        pick.finish(match sent {
            Ok(Ok(outcome)) => outcome,
            _ => TryOutcome::Failure,
        });
    });
}

/// How a request was routed, for tap: the route and rule that matched, or none.
fn matched(entry: Option<&RouteEntry>) -> String {
    match entry {
        Some(e) => format!("route {} rule {}", e.route, e.rule),
        None => "no route matched".into(),
    }
}

fn redirect(status: u16, location: &str) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}

fn route_failure(f: RouteFailure) -> ProxyError {
    match f {
        RouteFailure::NoBackends(route) => ProxyError::NoBackends(route),
        RouteFailure::BackendNotFound(b) => ProxyError::BackendNotFound(b),
        RouteFailure::MissingFault(name) => ProxyError::InvalidRoute(format!("FaultInjection {name} not found")),
    }
}

/// The protocol the destination application speaks: declared by `appProtocol`, else the
/// client's own.
pub fn app_protocol(declared: Option<plexus_core::AppProtocol>, client: Version) -> Proto {
    match declared {
        Some(p) if p.is_http2() => Proto::Http2,
        Some(plexus_core::AppProtocol::Http) => Proto::Http1,
        _ if client == Version::HTTP_2 => Proto::Http2,
        _ => Proto::Http1,
    }
}

/// Fills the destination labels from the endpoint that answered.
pub fn describe_endpoint(obs: &mut Observation, ep: &Endpoint) {
    obs.upstream = Some(ep.addr);
    obs.peers.destination_workload = ep.workload.clone();
    obs.peers.destination_version = ep.version.clone().unwrap_or_else(crate::metrics::unknown);
    if let Some(principal) = &ep.principal {
        obs.peers.destination_principal = principal.clone();
    }
}
