//! `mesh-floor LISTEN_PORT UPSTREAM_PORT`: the mesh path (a client sidecar and a server
//! sidecar, HTTP/2 over mutual TLS 1.3 between them) with none of the proxy's work, both
//! sides in this one process on one current-thread runtime. Client side: hyper's HTTP/1
//! server on LISTEN_PORT; every request goes, as received, on ONE shared HTTP/2 connection
//! over mTLS (as the proxy's pool shares one per peer). Server side: a TLS listener on an
//! ephemeral port requiring a client certificate, hyper's HTTP/2 server, and a pool of hyper
//! HTTP/1 client connections to the upstream on UPSTREAM_PORT. Certificates: a CA and two
//! leaves made at start (rcgen, ECDSA P-256), verified by webpki as usual.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use http1_floor::Error;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

fn main() -> Result<(), Error> {
    let (listen, upstream) = http1_floor::ports()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let (client_tls, server_tls) = tls_configs()?;
        let inbound = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        let inbound_port = inbound.local_addr()?.port();
        tokio::task::spawn_local(server_side(inbound, server_tls, upstream));
        let peer = connect_peer(inbound_port, client_tls).await?;
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, listen))).await?;
        loop {
            let (client, _) = listener.accept().await?;
            client.set_nodelay(true)?;
            let peer = peer.clone();
            tokio::task::spawn_local(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let mut peer = peer.clone();
                    async move {
                        let (mut parts, body) = request.into_parts();
                        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                        parts.uri = Uri::try_from(format!("http://floor.local{target}"))?;
                        peer.ready().await?;
                        Ok::<_, Error>(peer.send_request(Request::from_parts(parts, body)).await?)
                    }
                });
                let served = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(client), service);
                if let Err(e) = served.await {
                    eprintln!("client connection: {e}");
                }
            });
        }
    })
}

/// The client side's one HTTP/2 connection over mTLS to the server side.
async fn connect_peer(port: u16, tls: Arc<rustls::ClientConfig>) -> Result<http2::SendRequest<Incoming>, Error> {
    let tcp = http1_floor::connect(port).await?;
    let tls = tokio_rustls::TlsConnector::from(tls).connect(ServerName::try_from("floor.local")?, tcp).await?;
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(4 * 1024 * 1024)
        .handshake(TokioIo::new(tls))
        .await?;
    tokio::task::spawn_local(connection);
    Ok(sender)
}

/// The server side: mTLS connections served with HTTP/2, requests sent to the upstream over
/// pooled HTTP/1 connections.
async fn server_side(listener: TcpListener, tls: Arc<rustls::ServerConfig>, upstream: u16) -> Result<(), Error> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let pool: Pool = Arc::default();
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let (acceptor, pool) = (acceptor.clone(), pool.clone());
        tokio::task::spawn_local(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => return eprintln!("mTLS: {e}"),
            };
            let service = service_fn(move |request: Request<Incoming>| send_upstream(pool.clone(), upstream, request));
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(1024 * 1024)
                .initial_connection_window_size(4 * 1024 * 1024)
                .max_concurrent_streams(1024)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = served.await {
                eprintln!("peer connection: {e}");
            }
        });
    }
}

/// The server side's idle HTTP/1 connections to the upstream.
type Pool = Arc<Mutex<Vec<http1::SendRequest<Incoming>>>>;

/// Sends a request on a ready pooled connection (a new one when none is), in origin form; the
/// connection goes back to the pool with the response head, as the proxy's pool does, and
/// is handed out again once hyper says it is ready (its response body read).
async fn send_upstream(pool: Pool, upstream: u16, request: Request<Incoming>) -> Result<Response<Incoming>, Error> {
    let (mut parts, body) = request.into_parts();
    parts.uri = parts.uri.path_and_query().map_or(Ok(Uri::from_static("/")), |p| Uri::try_from(p.as_str()))?;
    parts.headers.insert(hyper::header::HOST, hyper::header::HeaderValue::from_static("floor.local"));
    let ready = {
        let mut idle = pool.lock().map_err(|_| "pool poisoned")?;
        idle.iter().position(|s| s.is_ready()).map(|i| idle.swap_remove(i))
    };
    let mut sender = match ready {
        Some(s) => s,
        None => {
            let tcp: TcpStream = http1_floor::connect(upstream).await?;
            let (sender, connection) = http1::handshake(TokioIo::new(tcp)).await?;
            // On the runtime, not the local set: hyper runs HTTP/2 streams (this future) there.
            tokio::spawn(connection);
            sender
        }
    };
    sender.ready().await?;
    let response = sender.send_request(Request::from_parts(parts, body)).await?;
    pool.lock().map_err(|_| "pool poisoned")?.push(sender);
    Ok(response)
}

/// A CA, a server certificate for `floor.local` and a client certificate, both signed by it;
/// the client trusts the CA for the server, the server requires a client certificate from it.
fn tls_configs() -> Result<(Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>), Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), Error> {
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])?.signed_by(&key, &issuer)?;
        Ok((cert.der().clone(), PrivatePkcs8KeyDer::from(key.serialize_der()).into()))
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone())?;
    let roots = Arc::new(roots);
    let (server_cert, server_key) = leaf("floor.local")?;
    let (client_cert, client_key) = leaf("client.floor.local")?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server_cert], server_key)?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![client_cert], client_key)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(client), Arc::new(server)))
}
