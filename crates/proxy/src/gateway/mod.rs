//! The ingress gateway serving a `Gateway` (`plexus proxy --mode ingress --gateway NAME`):
//! it listens on its listeners' ports (bound and closed as the configuration changes),
//! terminates TLS on HTTPS ports with the certificate of the listener the server name
//! selects, picks the listener and hostname group of each request by `Host`, and sends it
//! through the same route decision and forwarding as every mesh request — to mesh endpoints
//! over mTLS with the gateway's own identity.
//!
//! Per request: CONNECT refused; path normalized ([`crate::http::admit`]); listener on this
//! port for the `Host` (most specific hostname; on HTTPS it must be the listener the TLS
//! server name chose, else 421); hostname group of that listener; a matching rule, else 404;
//! then [`forward::to_service`] on the group's virtual port.

pub mod certs;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::http::body::ReceivedBody;
use arc_swap::ArcSwap;
use bytes::BytesMut;
use http::{Method, Request, Response};
use plexus_core::ServiceName;
use plexus_core::gateway::{CompiledGateway, ListenerProtocol};
use plexus_core::names::split_authority;
use plexus_core::route::RequestInfo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;

use self::certs::{CertificateStatus, CertificateStore};
use crate::discovery::Discovery;
use crate::error::ProxyError;
use crate::http::admit::admit;
use crate::http::body::Body;
use crate::http::forward::{self, Edge};
use crate::http::observe::Observation;
use crate::http::server::Known;
use crate::proxy::State;
use crate::settings::GatewaySettings;
use crate::transport::detect::{Protocol, Sniffed, sniff};
use crate::transport::io::PrefixedIo;
use crate::transport::listen;

/// A gateway's runtime state beside the configuration: its certificates and bound ports.
pub struct Gateway {
    pub settings: GatewaySettings,
    pub certificates: CertificateStore,
    bound: std::sync::Mutex<BTreeMap<u16, PortStatus>>,
}

/// A port as the gateway holds it (admin `/config`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortStatus {
    pub protocol: ListenerProtocol,
    /// `None` when the port could not be bound (with the reason in `error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `/config` shows about the gateway (`plexus check` reads it with this type).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayReport {
    pub name: String,
    pub tls_dir: String,
    pub ports: BTreeMap<u16, PortStatus>,
    pub certificates: Vec<CertificateStatus>,
}

impl Gateway {
    pub fn new(settings: GatewaySettings) -> Arc<Gateway> {
        let source = match &settings.certificate_source {
            Some(source) => source.clone(),
            None => Arc::new(certs::FileCertificates { dir: settings.tls_dir.clone() }),
        };
        Arc::new(Gateway {
            settings,
            certificates: CertificateStore::new(source),
            bound: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    pub fn report(&self) -> GatewayReport {
        GatewayReport {
            name: self.settings.name.to_string(),
            tls_dir: match &self.settings.certificate_source {
                Some(_) => "kubernetes.io/tls Secrets".into(),
                None => self.settings.tls_dir.display().to_string(),
            },
            ports: self.bound.lock().map(|b| b.clone()).unwrap_or_default(),
            certificates: self.certificates.statuses(),
        }
    }

    /// Whether `port` is one of the gateway's bound ports now.
    pub fn serves(&self, port: u16) -> bool {
        self.bound.lock().is_ok_and(|b| b.get(&port).is_some_and(|p| p.address.is_some()))
    }

    /// The addresses bound now.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.bound.lock().map(|b| b.values().filter_map(|p| p.address).collect()).unwrap_or_default()
    }

    fn refresh_certificates(&self, gateway: Option<&CompiledGateway>) {
        let wanted: BTreeSet<_> = gateway
            .into_iter()
            .flat_map(|g| &g.listeners)
            .filter(|l| l.protocol == ListenerProtocol::Https)
            .flat_map(|l| l.certificates.iter().cloned())
            .collect();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        self.certificates.refresh(&wanted, now);
    }
}

/// Serves the Gateway until the proxy drains: binds its listeners' ports as the configuration
/// changes, and re-reads certificates every `certificate_poll`.
pub async fn run(state: Arc<State>, gateway: Arc<Gateway>) {
    let mut changes = state.discovery.subscribe();
    let mut drain = state.drain_signal();
    let mut tick = tokio::time::interval(gateway.settings.certificate_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running: BTreeMap<u16, Running> = BTreeMap::new();
    loop {
        let snapshot = state.discovery.current();
        let compiled = snapshot.gateways.get(&gateway.settings.name);
        gateway.refresh_certificates(compiled);
        let wanted = compiled.map(CompiledGateway::ports).unwrap_or_default();
        let resumption = |port: u16| compiled.is_none_or(|g| g.session_resumption(port));
        running.retain(|port, r| {
            let keep = wanted.get(port) == Some(&r.protocol);
            if !keep {
                r.task.abort();
                if let Ok(mut b) = gateway.bound.lock() {
                    b.remove(port);
                }
                tracing::info!(port, "gateway listener closed");
            }
            keep
        });
        // A changed TLS setting takes effect for new connections, without closing the port.
        for (&port, r) in &mut running {
            if let Some(tls) = &mut r.tls
                && tls.resumption != resumption(port)
            {
                match server_config(&state.discovery, &gateway, port, !tls.resumption) {
                    Ok(config) => {
                        tls.resumption = !tls.resumption;
                        tls.config.store(config);
                        tracing::info!(port, session_resumption = tls.resumption, "gateway TLS settings changed");
                    }
                    Err(e) => tracing::error!(port, error = %e, "cannot change a gateway listener's TLS settings"),
                }
            }
        }
        for (&port, &protocol) in &wanted {
            if running.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(gateway.settings.ip, port);
            let tls = match protocol {
                ListenerProtocol::Http => Ok(None),
                ListenerProtocol::Https => {
                    let resumption = resumption(port);
                    server_config(&state.discovery, &gateway, port, resumption)
                        .map(|c| Some(PortTls { resumption, config: Arc::new(ArcSwap::new(c)) }))
                        .map_err(|e| format!("cannot set up TLS on port {port}: {e}"))
                }
            };
            let status = match tls.and_then(|tls| {
                listen::bind(addr).map(|l| (l, tls)).map_err(|e| format!("cannot listen on {addr}: {e}"))
            }) {
                Ok((listener, tls)) => {
                    let address = listener.local_addr().ok();
                    tracing::info!(%addr, ?protocol, "gateway listener bound");
                    let acceptor = tls.as_ref().map(|t| t.config.clone());
                    let task = tokio::spawn(accept_loop(state.clone(), gateway.clone(), listener, port, acceptor));
                    running.insert(port, Running { protocol, task, tls });
                    PortStatus { protocol, address, error: None }
                }
                Err(error) => {
                    tracing::error!(%addr, %error, "cannot serve a gateway listener; retrying on the next change");
                    PortStatus { protocol, address: None, error: Some(error) }
                }
            };
            if let Ok(mut b) = gateway.bound.lock() {
                b.insert(port, status);
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            _ = tick.tick() => {}
            _ = crate::proxy::drained(&mut drain) => break,
        }
    }
    for r in running.into_values() {
        r.task.abort();
    }
}

/// A bound port and its accept task.
struct Running {
    protocol: ListenerProtocol,
    task: tokio::task::JoinHandle<()>,
    /// HTTPS.
    tls: Option<PortTls>,
}

/// The TLS setup of an HTTPS port: built once per port (and again only when its settings
/// change), shared by every handshake.
struct PortTls {
    resumption: bool,
    config: Arc<ArcSwap<rustls::ServerConfig>>,
}

async fn accept_loop(
    state: Arc<State>,
    gateway: Arc<Gateway>,
    listener: TcpListener,
    port: u16,
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
) {
    let mut drain = state.drain_signal();
    loop {
        tokio::select! {
            (stream, peer, permit) = listen::accept(&listener, state.conn_limit()) => {
                let conn = Conn { state: state.clone(), gateway: gateway.settings.name.clone(), port, peer };
                let acceptor = tls.as_ref().map(|c| tokio_rustls::TlsAcceptor::from(c.load_full()));
                tokio::spawn(conn.serve(stream, acceptor, permit));
            }
            _ = crate::proxy::drained(&mut drain) => return,
        }
    }
}

/// Sessions a port remembers for TLS 1.2 clients that resume by session ID (TLS 1.3 and
/// ticket-capable TLS 1.2 clients resume with tickets, which the gateway does not store).
const SESSION_CACHE_ENTRIES: usize = 4096;

/// The TLS settings of an HTTPS port: TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1 by ALPN, the
/// certificate chosen per handshake by [`ListenerCertificates`]. With `resumption`, sessions
/// are resumed from tickets (keys of this port only, rotated every 6 hours) or the port's
/// session cache; without, every connection makes a full handshake.
fn server_config(
    discovery: &Arc<Discovery>,
    gateway: &Arc<Gateway>,
    port: u16,
    resumption: bool,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let resolver = ListenerCertificates { discovery: discovery.clone(), gateway: gateway.clone(), port };
    let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if resumption {
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    } else {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// Picks the certificate of the listener a TLS server name selects on one port: the most
/// specific listener hostname that matches it (a listener without hostname takes any name,
/// and connections without one). No listener, no certificate: the handshake is refused, so
/// an unknown name never gets another host's certificate.
struct ListenerCertificates {
    discovery: Arc<Discovery>,
    gateway: Arc<Gateway>,
    port: u16,
}

impl std::fmt::Debug for ListenerCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerCertificates")
            .field("gateway", &self.gateway.settings.name)
            .field("port", &self.port)
            .finish()
    }
}

impl ResolvesServerCert for ListenerCertificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snapshot = self.discovery.current();
        let gateway = snapshot.gateways.get(&self.gateway.settings.name)?;
        let name = hello.server_name().unwrap_or("");
        let listener = gateway.listener(self.port, name).filter(|l| l.protocol == ListenerProtocol::Https)?;
        listener.certificates.iter().find_map(|c| self.gateway.certificates.key(c))
    }
}

/// One client connection to a gateway port.
#[derive(Clone)]
struct Conn {
    state: Arc<State>,
    gateway: ServiceName,
    port: u16,
    peer: SocketAddr,
}

/// What requests on a connection share.
struct ConnInfo {
    gateway: ServiceName,
    port: u16,
    peer: SocketAddr,
    /// HTTPS: the TLS server name (empty when the client sent none).
    server_name: Option<String>,
}

impl Conn {
    /// Serves one connection with hyper's HTTP/1 or HTTP/2 directly (no version read of its
    /// own per connection): on HTTPS by the protocol ALPN chose, on plaintext by the first
    /// bytes (the HTTP/2 preface or not), as a sidecar tells them.
    async fn serve(self, mut stream: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>, permit: OwnedSemaphorePermit) {
        let state = self.state.clone();
        let limits = &state.settings.limits;
        match tls {
            None => {
                let mut buf = BytesMut::with_capacity(4096);
                let no_upstream = None::<fn() -> std::future::Ready<std::io::Result<TcpStream>>>;
                let sniffed =
                    sniff(&mut stream, &mut buf, limits.client_first_wait, limits.header_read_timeout, no_upstream)
                        .await;
                let known = match sniffed {
                    Ok(Sniffed::Client(Protocol::Http2, _)) => Known::Http2,
                    // Anything else is HTTP/1's to answer (a malformed head gets its 400).
                    Ok(Sniffed::Client(..)) => Known::Http1,
                    Ok(_) | Err(_) => return,
                };
                self.serve_http(known, PrefixedIo::new(buf.freeze(), stream), None).await;
            }
            Some(acceptor) => {
                let accept = acceptor.accept(stream);
                let tls = match tokio::time::timeout(limits.header_read_timeout, accept).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %self.peer, error = %e, "gateway TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let session = tls.get_ref().1;
                let known = if session.alpn_protocol() == Some(b"h2") { Known::Http2 } else { Known::Http1 };
                let server_name = Some(session.server_name().unwrap_or("").to_ascii_lowercase());
                self.serve_http(known, tls, server_name).await;
            }
        }
        drop(permit);
    }

    async fn serve_http<I>(self, known: Known, io: I, server_name: Option<String>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let state = self.state;
        let watcher = state.drain_signal();
        let info = Arc::new(ConnInfo { gateway: self.gateway, port: self.port, peer: self.peer, server_name });
        let handler_state = state.clone();
        state.http.serve_known(known, io, watcher, move |req| handle(handler_state.clone(), info.clone(), req)).await;
    }
}

/// How long certificate files go unchecked by default.
pub const DEFAULT_CERTIFICATE_POLL: Duration = Duration::from_secs(2);

/// Handles one request on a gateway port; never fails (errors become responses).
async fn handle(state: Arc<State>, conn: Arc<ConnInfo>, mut req: Request<ReceivedBody>) -> Response<Body> {
    let (mut head, mut obs) = Observation::start(state.clone(), "outbound", &mut req);
    state.fill_source(&mut obs.peers);
    if head.method == Method::CONNECT {
        return obs.fail(ProxyError::Forbidden("CONNECT is not served by a gateway".into()));
    }
    if let Err(e) = admit(&state, &mut head) {
        return obs.fail(e);
    }
    let host = head.authority().map(|a| split_authority(a).0.trim_end_matches('.').to_ascii_lowercase());
    let host = host.unwrap_or_default();
    let snapshot = state.discovery.current();
    let Some(gateway) = snapshot.gateways.get(&conn.gateway) else {
        return obs.fail(ProxyError::NoRoute(format!("Gateway {} is not configured", conn.gateway)));
    };
    let tls = conn.server_name.is_some();
    let Some(listener) = gateway.listener(conn.port, &host) else {
        return obs.fail(ProxyError::NoRoute(format!("no listener on port {} for host {host:?}", conn.port)));
    };
    if (listener.protocol == ListenerProtocol::Https) != tls {
        return obs.fail(ProxyError::NoRoute(format!("no listener on port {} for host {host:?}", conn.port)));
    }
    if let Some(sni) = &conn.server_name
        && gateway.listener(conn.port, sni).is_none_or(|l| l.name != listener.name)
    {
        return obs.fail(ProxyError::Misdirected(format!(
            "host {host:?} is not served on this connection (TLS server name {sni:?})"
        )));
    }
    let Some(vhost) = listener.virtual_host(&host) else {
        return obs.fail(ProxyError::NoRoute(format!("no route of listener {:?} serves host {host:?}", listener.name)));
    };
    let info = RequestInfo {
        method: head.method.as_str(),
        path: head.uri.path(),
        query: head.uri.query(),
        headers: &head.headers,
    };
    let (Some(port), Some(_)) = (vhost.port(), vhost.routes.find(&info)) else {
        return obs.fail(ProxyError::NoRoute(format!("no rule of listener {:?} matches", listener.name)));
    };
    let edge = Edge {
        scheme: if tls { "https" } else { "http" },
        listener_port: conn.port,
        gateway: conn.gateway.clone(),
        listener: listener.name.clone(),
        hostname: vhost.hostname.clone(),
    };
    let to = forward::MeshRequest {
        snapshot: &snapshot,
        service: &vhost.service,
        port,
        peer: conn.peer,
        waited_for_endpoints: false,
        edge: Some(&edge),
    };
    std::pin::pin!(forward::to_service(state.clone(), to, req, head, obs)).await
}
