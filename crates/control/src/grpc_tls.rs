//! The authenticated gRPC port (7700, SPEC §6): TLS 1.3 with the control plane's own
//! certificate, and client certificates verified when presented.
//!
//! The control plane's certificate is signed by the mesh issuer for
//! `spiffe://<td>/ns/plexus-system/sa/plexus-control` plus the IP addresses and DNS names of
//! its listen address; the chain it serves is leaf, issuer, trust anchor, so a proxy that only
//! knows the anchor's fingerprint (from its workload token) can verify it before it sends the
//! token. It is re-issued at half-life, when the issuer changes and when the trust domain does.
//!
//! Client certificates are optional at the TLS layer (bootstrap is made with a token, before
//! the proxy has one) and verified against the current trust bundle when presented; each
//! connection carries [`Peer`] (its address and, with a verified certificate, the identity)
//! into every request's extensions, and each service decides what a call needs: certificate
//! signing takes a token or a certificate, everything else a certificate.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use plexus_spiffe::{ClientVerifier, CurrentKey, ServerVerifier};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::identity::{Ca, IdentitySettings};
use crate::store::Store;

/// How long the control plane's own certificate lives (re-issued at half-life).
pub const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 1024;
/// A client that does not finish its handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The verified identity of a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub spiffe_id: String,
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
    /// The workload token the certificate descends from (subject OU `plexus-token:<id>`).
    pub token_id: Option<String>,
}

/// What a request knows about its connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// `None`: no client certificate (bootstrap with a token, or an unauthenticated client).
    pub identity: Option<Arc<PeerIdentity>>,
}

impl Peer {
    /// The peer of a request served on the authenticated port (`None` outside it).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Peer> {
        request.extensions().get::<Peer>()
    }
}

/// Reads the identity of a (verified) certificate: its SPIFFE ID and the token OU.
pub fn identity_of(cert: &[u8]) -> Option<PeerIdentity> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let spiffe_id = plexus_spiffe::spiffe_id_in(&parsed)?;
    let rest = spiffe_id.strip_prefix("spiffe://")?;
    let (trust_domain, path) = rest.split_once('/')?;
    let mut parts = path.split('/');
    let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let token_id = parsed
        .subject()
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok())
        .find_map(|ou| ou.strip_prefix(crate::tokens::CERT_TOKEN_OU_PREFIX).map(str::to_string));
    Some(PeerIdentity {
        trust_domain: trust_domain.to_string(),
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        token_id,
        spiffe_id: spiffe_id.clone(),
    })
}

/// The control plane's TLS identity on the gRPC port.
pub struct ServingIdentity {
    ca: Arc<Ca>,
    store: Arc<dyn Store>,
    provider: Arc<CryptoProvider>,
    ips: Vec<IpAddr>,
    current: RwLock<Option<Serving>>,
    /// The client verifier for the current trust bundle (rebuilt when the bundle changes).
    verifier: RwLock<Option<BundleVerifier>>,
}

/// The control plane's serving certificate, as `GET /api/v1/identity` shows it (`controlPlane`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServingCertificate {
    #[serde(flatten)]
    pub certificate: crate::identity::CertSummary,
    pub spiffe_id: String,
    /// SHA-256 (hex) of the last certificate of the chain it presents: the trust anchor.
    pub chain_anchor_sha256: String,
}

/// A client verifier and the trust bundle (PEM) it was built from.
type BundleVerifier = (Arc<str>, Arc<dyn ClientCertVerifier>);

struct Serving {
    key: Arc<CertifiedKey>,
    issued: Instant,
    issuer_sha256: String,
    trust_domain: String,
}

impl std::fmt::Debug for ServingIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingIdentity").field("ips", &self.ips).finish()
    }
}

impl ServingIdentity {
    /// Issues the control plane's certificate for `listen` (an unspecified address adds the
    /// machine's loopback; the proxies verify the SPIFFE ID, the names are for other clients).
    pub fn new(ca: Arc<Ca>, store: Arc<dyn Store>, listen: SocketAddr) -> Result<Arc<ServingIdentity>, String> {
        let mut ips = vec![listen.ip()];
        if listen.ip().is_unspecified() {
            ips = vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from(std::net::Ipv6Addr::LOCALHOST)];
        }
        let me = Arc::new(ServingIdentity {
            ca,
            store,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            ips,
            current: RwLock::new(None),
            verifier: RwLock::new(None),
        });
        me.reissue()?;
        Ok(me)
    }

    fn reissue(&self) -> Result<(), String> {
        let trust_domain = IdentitySettings::from_store(self.store.as_ref()).trust_domain;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let id = plexus_core::names::control_plane_spiffe_id(&trust_domain);
        let leaf = self
            .ca
            .sign_control_plane(&key, &id, &self.ips, &["localhost"], SERVING_LIFETIME)
            .map_err(|e| format!("cannot sign the control plane's certificate: {e:?}"))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = self.provider.key_provider.load_private_key(der).map_err(|e| e.to_string())?;
        let serving = Serving {
            key: Arc::new(CertifiedKey::new(chain, signing)),
            issued: Instant::now(),
            issuer_sha256: self.ca.state().issuer.summary.sha256.clone(),
            trust_domain,
        };
        tracing::info!(spiffe_id = %id, serial = %leaf.serial, "issued the control plane's serving certificate");
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(serving);
        Ok(())
    }

    /// Re-issues the certificate at half-life, after an issuer rotation and when MeshConfig
    /// changes the trust domain (checked every 10 s).
    pub async fn maintain(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        let mut bundle = self.ca.subscribe_bundle();
        loop {
            // A rotation (new bundle) re-issues at once; the tick catches the rest.
            tokio::select! {
                _ = tick.tick() => {}
                changed = bundle.changed() => if changed.is_err() { return },
            }
            let stale = {
                let current = self.current.read().unwrap_or_else(|p| p.into_inner());
                match current.as_ref() {
                    None => true,
                    Some(s) => {
                        s.issued.elapsed() >= SERVING_LIFETIME / 2
                            || s.issuer_sha256 != self.ca.state().issuer.summary.sha256
                            || s.trust_domain != IdentitySettings::from_store(self.store.as_ref()).trust_domain
                    }
                }
            };
            if stale {
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.reissue()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot renew the control plane's serving certificate"),
                    Err(e) => tracing::error!(error = %e, "renewing the serving certificate failed"),
                }
            }
        }
    }

    /// What the control plane presents on its gRPC port now: its leaf and the trust anchor
    /// at the end of its chain (the one a proxy pinning a token's anchor verifies).
    pub fn certificate(&self) -> Option<ServingCertificate> {
        let (key, trust_domain) = {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            let s = current.as_ref()?;
            (s.key.clone(), s.trust_domain.clone())
        };
        let leaf = crate::identity::Cert::from_der(key.cert.first()?.to_vec()).ok()?;
        let anchor = key.cert.last().map(|c| crate::identity::sha256_hex(c.as_ref())).unwrap_or_default();
        let spiffe_id = plexus_core::names::control_plane_spiffe_id(&trust_domain);
        Some(ServingCertificate { certificate: leaf.summary, spiffe_id, chain_anchor_sha256: anchor })
    }

    /// The current certificate and key (also used by the control plane as a TLS client).
    pub fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|s| s.key.clone())
    }

    fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let bundle = self.ca.bundle_pem();
        if let Some((pem, v)) = self.verifier.read().unwrap_or_else(|p| p.into_inner()).as_ref()
            && Arc::ptr_eq(pem, &bundle)
        {
            return Ok(v.clone());
        }
        let mut roots = RootCertStore::empty();
        for anchor in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
            let anchor = anchor.map_err(|e| rustls::Error::General(format!("trust bundle: {e}")))?;
            roots.add(anchor)?;
        }
        let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
        *self.verifier.write().unwrap_or_else(|p| p.into_inner()) = Some((bundle, v.clone()));
        Ok(v)
    }

    /// The server config of the gRPC port: TLS 1.3, ALPN h2, client certificates optional
    /// and verified against the current bundle.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(self.optional_client_cert()))
            .with_cert_resolver(Arc::new(self.current_key()));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The control plane as a TLS client of a proxy's admin server (`/tap`, `/config`, SPEC §5):
/// presents its own certificate and accepts only a server chained to the current trust bundle
/// whose SPIFFE ID is `expected` (the identity the proxy authenticated as), so an admin address
/// cannot send a tap of one proxy to another.
impl ServingIdentity {
    pub fn admin_client_config(self: &Arc<Self>, expected: &str) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self.proxy_verifier(expected)))
            .with_client_cert_resolver(Arc::new(self.current_key()));
        Ok(Arc::new(config))
    }

    /// A proxy's admin server: chain to the current bundle, and the expected SPIFFE ID.
    fn proxy_verifier(self: &Arc<Self>, expected: &str) -> ServerVerifier {
        let identity = self.clone();
        let roots = Box::new(move |_: &[CertificateDer<'_>]| {
            let mut roots = RootCertStore::empty();
            for anchor in CertificateDer::pem_slice_iter(identity.ca.bundle_pem().as_bytes()) {
                roots.add(anchor.map_err(|e| rustls::Error::General(format!("trust bundle: {e}")))?)?;
            }
            Ok(Arc::new(roots))
        });
        let check = plexus_spiffe::expect_spiffe_id("the admin server", expected.to_string());
        ServerVerifier::new(roots, check, self.provider.signature_verification_algorithms)
    }

    /// Client certificates verified against the current bundle, when there is one; a presented
    /// certificate must name a workload.
    fn optional_client_cert(self: &Arc<Self>) -> ClientVerifier {
        let identity = self.clone();
        let current = Box::new(move || identity.client_verifier());
        let check = Box::new(|der: &[u8]| match identity_of(der) {
            Some(_) => Ok(()),
            None => Err("client certificate has no workload SPIFFE ID".to_string()),
        });
        ClientVerifier::new(current, check, false, self.provider.signature_verification_algorithms)
    }

    /// The control plane's current certificate, on both sides.
    fn current_key(self: &Arc<Self>) -> CurrentKey {
        let identity = self.clone();
        CurrentKey::new(move || identity.certified_key())
    }
}

/// A TLS connection of the gRPC port, with what tonic puts in each request's extensions.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The TLS connections of `listener`: handshakes run concurrently (at most
/// [`MAX_HANDSHAKES`], each within [`HANDSHAKE_TIMEOUT`]); failed ones are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let (tcp, addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a gRPC connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let identity = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| identity_of(c.as_ref()))
                            .map(Arc::new);
                        let peer = Peer { addr: Some(addr), identity };
                        let _ = tx.send(Ok(TlsConn { inner: tls, peer })).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%addr, error = %e, "gRPC TLS handshake failed"),
                    Err(_) => tracing::debug!(%addr, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
