//! The admin server (SPEC §5): `/ready`, `/live`, `/metrics`, `/config`, `/tap` (JSON lines,
//! see [`crate::tap`]), `POST /shutdown`.
//!
//! Who may ask what ([`Caller`]):
//! - `/ready`, `/live`, `/metrics`: anyone who reaches the port (scrapers, probes).
//! - `/config`, `/tap`: a caller on loopback, or, from anywhere else (a pod address),
//!   only the control plane over mutual TLS: the port also accepts TLS (told apart by its first
//!   byte), requires a client certificate chained to the mesh trust anchor, and these two
//!   endpoints then answer only the identity `control_plane_spiffe_id(trust domain)`. In
//!   plaintext, the `Host` must be an address or `localhost` (DNS rebinding sends a name).
//! - `POST /shutdown`: a plaintext caller on loopback only, with no `Origin` header (a
//!   browser's cross-site form post carries one) and a `Host` naming the admin address itself
//!   (DNS rebinding sends the attacker's name).
//!
//! Everything refused is answered `403` with `x-plexus-error`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::error::ERROR_HEADER;
use crate::http::body::{self, Body};
use crate::proxy::State;

/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// What the admin server knows about who is asking.
#[derive(Debug, Clone, Copy)]
struct Caller {
    /// The peer connected from a loopback address, in plaintext.
    local: bool,
    /// The peer proved the control plane's identity with a mesh client certificate.
    control_plane: bool,
}

/// Serves the admin endpoints until aborted.
pub async fn serve(state: Arc<State>, listener: TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(state, stream, peer).await {
                tracing::debug!(%peer, error = %e, "admin connection ended");
            }
        });
    }
}

async fn serve_conn(state: Arc<State>, stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(state.settings.limits.header_read_timeout, stream.peek(&mut first)).await;
    let Ok(Ok(1)) = peeked else { return Ok(()) };
    let tls = state.settings.identity.as_ref().map(|i| &i.credentials).filter(|c| c.ready());
    if first[0] == TLS_HANDSHAKE
        && let Some(credentials) = tls
    {
        // The workload certificate serves; the client must present one chained to the trust
        // anchor (no ALPN: HTTP/1 inside).
        let mut config = (*credentials.server_config().map_err(std::io::Error::other)?).clone();
        config.alpn_protocols.clear();
        let accept = tokio_rustls::TlsAcceptor::from(Arc::new(config)).accept(stream);
        let tls = tokio::time::timeout(state.settings.limits.header_read_timeout, accept)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let peer_id = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(crate::tls::spiffe_id_of);
        let control_plane = peer_id.is_some_and(|id| control_plane_identity(&state).is_some_and(|cp| cp == id));
        let caller = Caller { local: false, control_plane };
        return serve_http(state, TokioIo::new(tls), caller).await;
    }
    let caller = Caller { local: peer.ip().to_canonical().is_loopback(), control_plane: false };
    serve_http(state, TokioIo::new(stream), caller).await
}

async fn serve_http<I>(state: Arc<State>, io: I, caller: Caller) -> std::io::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        async move {
            if req.method() == Method::GET
                && let Some(probe) = state.settings.app_probes.get(req.uri().path())
            {
                return Ok::<_, Infallible>(app_health(&state, probe).await);
            }
            Ok::<_, Infallible>(route(&state, caller, req))
        }
    });
    hyper::server::conn::http1::Builder::new().serve_connection(io, service).await.map_err(std::io::Error::other)
}

/// A kubelet probe rewritten to the admin port: the same GET to the app on 127.0.0.1, its
/// status passed on (anything but a status line: 503). The app's port stays behind mTLS.
async fn app_health(state: &State, probe: &crate::settings::AppProbe) -> Response<Body> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = SocketAddr::from(([127, 0, 0, 1], probe.port));
    let ask = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let mut head = format!("GET {} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: kube-probe\r\n", probe.path);
        for (name, value) in &probe.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < buf.len() {
            let read = s.read(&mut buf[n..]).await.ok()?;
            if read == 0 {
                break;
            }
            n += read;
            if buf[..n].contains(&b'\n') {
                break;
            }
        }
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        line.strip_prefix("HTTP/1.")?.get(2..5)?.parse::<u16>().ok()
    };
    let timeout = state.settings.limits.connect_timeout.max(std::time::Duration::from_secs(5));
    match tokio::time::timeout(timeout, ask).await.ok().flatten().and_then(|c| StatusCode::from_u16(c).ok()) {
        Some(code) => text(code, "text/plain", format!("app probe: {}\n", code.as_u16())),
        None => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("app probe: no answer on {addr}\n")),
    }
}

/// The control plane's SPIFFE ID in this proxy's trust domain (known once it has a certificate).
fn control_plane_identity(state: &State) -> Option<String> {
    let own = state.settings.identity.as_ref()?.spiffe_id()?;
    let trust_domain = own.strip_prefix("spiffe://")?.split('/').next()?;
    Some(plexus_core::names::control_plane_spiffe_id(trust_domain))
}

/// Whether `req` may shut the proxy down: plaintext from this host, no `Origin`, and a `Host`
/// that is the admin address (its IP, or `localhost` when it listens on loopback; an
/// unspecified admin address accepts any of this host's loopback addresses) with its port.
fn may_shut_down(state: &State, caller: Caller, req: &Request<Incoming>) -> Result<(), &'static str> {
    if !caller.local {
        return Err("POST /shutdown is accepted only on loopback");
    }
    if req.headers().contains_key(header::ORIGIN) {
        return Err("POST /shutdown is refused with an Origin header");
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h.to_str().unwrap_or_default(),
        _ => return Err("POST /shutdown needs exactly one Host header naming the admin address"),
    };
    if req.uri().authority().is_some_and(|a| a.as_str() != host) {
        return Err("POST /shutdown: the request target names another host");
    }
    let admin = state.settings.admin;
    let (name, port) = plexus_core::names::split_authority(host);
    let ip_ok = match name.parse::<IpAddr>() {
        Ok(ip) => ip == admin.ip() || (admin.ip().is_unspecified() && ip.to_canonical().is_loopback()),
        Err(_) => name == "localhost" && (admin.ip().is_loopback() || admin.ip().is_unspecified()),
    };
    if !ip_ok || port != Some(admin.port()) {
        return Err("POST /shutdown: Host is not the admin address");
    }
    Ok(())
}

/// Whether the request names this machine by address or as `localhost` (never a name a
/// DNS-rebinding page sends from loopback).
fn names_this_machine(req: &Request<Incoming>) -> bool {
    let hosts = req.headers().get_all(header::HOST).into_iter().map(|h| h.as_bytes());
    plexus_core::names::names_this_machine(hosts, req.uri().authority().map(|a| a.as_str()), &[])
}

fn forbidden(reason: &'static str) -> Response<Body> {
    let mut r = text(StatusCode::FORBIDDEN, "text/plain", format!("{reason}\n"));
    r.headers_mut().insert(ERROR_HEADER, header::HeaderValue::from_static(reason));
    r
}

fn text(status: StatusCode, content_type: &'static str, body_text: String) -> Response<Body> {
    let mut r = Response::new(body::full(body_text));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

fn route(state: &Arc<State>, caller: Caller, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    if matches!(path, "/config" | "/tap") && !caller.local && !caller.control_plane {
        return forbidden("/config and /tap answer only on loopback or to the control plane over mTLS");
    }
    if matches!(path, "/config" | "/tap") && !caller.control_plane && !names_this_machine(&req) {
        return forbidden("/config and /tap: Host is not an address of this machine or localhost");
    }
    if req.method() == Method::POST
        && path == "/shutdown"
        && let Err(reason) = may_shut_down(state, caller, &req)
    {
        return forbidden(reason);
    }
    match (req.method(), path) {
        (&Method::GET, "/live") => text(StatusCode::OK, "text/plain", "live\n".into()),
        (&Method::GET, "/ready") if state.draining() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n".into())
        }
        (&Method::GET, "/ready") => text(StatusCode::OK, "text/plain", "ready\n".into()),
        (&Method::GET, "/metrics") => {
            refresh_gauges(state);
            // OpenMetrics for scrapers that ask for it (Prometheus does), else the classic format.
            let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
            if accept.contains("application/openmetrics-text") {
                text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    state.metrics.encode(),
                )
            } else {
                text(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", state.metrics.encode_classic())
            }
        }
        (&Method::GET, "/config") => {
            let snapshot = state.discovery.current();
            let config = serde_json::json!({
                "version": snapshot.version,
                "generation": state.discovery.generation(),
                "controlPlaneConnected": state.discovery.control_plane_connected(),
                "settings": state.settings,
                "services": snapshot.services.values().collect::<Vec<_>>(),
                "certificate": state.settings.identity.as_ref().and_then(|i| i.info()),
                "gateways": snapshot.gateways.values().collect::<Vec<_>>(),
                "gateway": state.gateway.as_ref().map(|g| g.report()),
            });
            text(StatusCode::OK, "application/json", format!("{config:#}\n"))
        }
        (&Method::GET, "/tap") => state.tap.serve(req.uri().query()),
        (&Method::POST, "/shutdown") => {
            state.start_drain();
            text(StatusCode::ACCEPTED, "text/plain", "draining\n".into())
        }
        (_, "/live" | "/ready" | "/metrics" | "/config" | "/tap" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n".into())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /ready, /live, /metrics, /config, /tap, POST /shutdown\n".into(),
        ),
    }
}

/// Gauges computed at scrape time from the current snapshot and balancer.
fn refresh_gauges(state: &Arc<State>) {
    let m = &state.metrics;
    m.config_version.set(state.discovery.generation() as i64);
    m.control_plane_connected.set(i64::from(state.discovery.control_plane_connected()));
    m.update_trace_spans(crate::trace::export::stats());
    let snapshot = state.discovery.current();
    m.balancer_endpoints.clear();
    for service in snapshot.services.values() {
        let endpoints: Vec<_> = service.ports.iter().flat_map(|p| p.endpoints.iter().cloned()).collect();
        let ejected = state.balancer.ejected_count(&endpoints);
        let labels = |s: &str| crate::metrics::EndpointStateLabels {
            destination_service: service.name.name.clone(),
            state: s.into(),
        };
        m.balancer_endpoints.get_or_create(&labels("ready")).set((endpoints.len() - ejected) as i64);
        m.balancer_endpoints.get_or_create(&labels("ejected")).set(ejected as i64);
    }
}
