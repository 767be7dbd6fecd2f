//! Mutual TLS between sidecars (rustls, ring provider, TLS 1.3 only).
//!
//! Both sides present the workload certificate the control plane issued (SPIFFE ID in the
//! only SAN, a URI). The client checks the server's chain against the mesh trust bundle AND
//! that its SPIFFE ID is the one discovery says the endpoint runs as, so an impostor with
//! another mesh identity at a stolen address is refused. The server checks the client's chain
//! and takes its SPIFFE ID as the request's verified source identity.
//!
//! Mesh connections are told apart from application TLS by ALPN: a sidecar offers only
//! `plexus.*` protocols, naming what runs inside the tunnel ([`ALPN_H2`] for HTTP,
//! [`ALPN_HTTP1`] for upgrades such as WebSocket, [`ALPN_TCP`] for opaque streams).
//!
//! Certificates and the trust bundle change at run time (renewal at half-life, issuer and
//! anchor rotation): configs resolve them through [`MeshCredentials`] on every handshake, so
//! rotation never drops a connection and never needs a new config.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use plexus_spiffe::{ClientVerifier, CurrentKey, ServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls::{Error, RootCertStore};

/// ALPN of HTTP (HTTP/2) between sidecars.
pub const ALPN_H2: &[u8] = b"plexus.h2";
/// ALPN of an HTTP/1 connection between sidecars (upgrades: WebSocket…).
pub const ALPN_HTTP1: &[u8] = b"plexus.http1";
/// ALPN of an opaque TCP stream between sidecars.
pub const ALPN_TCP: &[u8] = b"plexus.tcp";

/// Whether a ClientHello's ALPN list is a sidecar's (mesh mTLS, not application TLS).
pub fn is_mesh_alpn(protocols: &[Vec<u8>]) -> bool {
    !protocols.is_empty() && protocols.iter().all(|p| p.starts_with(b"plexus."))
}

/// The ring provider: the only one compiled in (an aws-lc-rs default would panic at run time).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// This proxy's current certificate and the mesh trust bundle, swapped atomically.
pub struct MeshCredentials {
    provider: Arc<CryptoProvider>,
    key: ArcSwapOption<CertifiedKey>,
    roots: ArcSwapOption<RootCertStore>,
    /// Rebuilt with the roots.
    client_verifier: ArcSwapOption<Arc<dyn ClientCertVerifier>>,
}

impl fmt::Debug for MeshCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshCredentials").field("has_certificate", &self.key.load().is_some()).finish()
    }
}

impl MeshCredentials {
    pub fn new() -> Arc<MeshCredentials> {
        Arc::new(MeshCredentials {
            provider: provider(),
            key: ArcSwapOption::empty(),
            roots: ArcSwapOption::empty(),
            client_verifier: ArcSwapOption::empty(),
        })
    }

    /// Whether a certificate and a trust bundle are in place (mTLS can be used).
    pub fn ready(&self) -> bool {
        self.key.load().is_some() && self.roots.load().is_some()
    }

    /// The current certificate and key (`None` before the first).
    pub fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.key.load_full()
    }

    /// The current trust bundle (`None` before the first).
    pub fn trust_roots(&self) -> Option<Arc<RootCertStore>> {
        self.roots.load_full()
    }

    /// Installs a new certificate chain (leaf first) with its private key (PKCS#8 DER).
    pub fn set_certificate(&self, chain: Vec<CertificateDer<'static>>, key_pkcs8: Vec<u8>) -> Result<(), Error> {
        let key =
            self.provider.key_provider.load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(key_pkcs8.into()))?;
        self.key.store(Some(Arc::new(CertifiedKey::new(chain, key))));
        Ok(())
    }

    /// Installs the trust bundle (every anchor peers must accept).
    pub fn set_trust_bundle(&self, anchors: Vec<CertificateDer<'static>>) -> Result<(), Error> {
        let mut roots = RootCertStore::empty();
        for a in anchors {
            roots.add(a)?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| Error::General(format!("client verifier: {e}")))?;
        self.client_verifier.store(Some(Arc::new(verifier)));
        self.roots.store(Some(roots));
        Ok(())
    }

    /// The server side of mesh mTLS: client certificates are required and verified.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(self.client_verifier()))
            .with_cert_resolver(Arc::new(self.current_key()));
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
        // No session tickets: after the handshake only application bytes arrive, so a client
        // sidecar can tell a server-first protocol's greeting from TLS housekeeping.
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// The client side of mesh mTLS towards a peer that must be `expected` (a SPIFFE ID),
    /// speaking `alpn` inside the tunnel.
    pub fn client_config(self: &Arc<Self>, expected: &str, alpn: &[u8]) -> Result<Arc<rustls::ClientConfig>, Error> {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self.server_verifier(expected)))
            .with_client_cert_resolver(Arc::new(self.current_key()));
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }

    /// The name sent as SNI: not used for verification (the SPIFFE ID is), but rustls needs one.
    pub fn server_name() -> ServerName<'static> {
        ServerName::try_from("mesh.plexus.internal")
            .unwrap_or(ServerName::IpAddress(std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST).into()))
    }

    /// The current certificate, presented on both sides.
    fn current_key(self: &Arc<Self>) -> CurrentKey {
        let credentials = self.clone();
        CurrentKey::new(move || credentials.key.load_full())
    }

    /// A peer sidecar's server certificate: chain to the bundle, and the expected SPIFFE ID.
    fn server_verifier(self: &Arc<Self>, expected: &str) -> ServerVerifier {
        let credentials = self.clone();
        let roots = Box::new(move |_: &[CertificateDer<'_>]| {
            credentials.roots.load_full().ok_or(Error::General("no trust bundle yet".into()))
        });
        let algorithms = self.provider.signature_verification_algorithms;
        ServerVerifier::new(roots, plexus_spiffe::expect_spiffe_id("peer", expected.to_string()), algorithms)
    }

    /// Client certificates are required and verified against the current bundle (a webpki
    /// verifier rebuilt whenever the bundle changes), and must carry a SPIFFE ID.
    fn client_verifier(self: &Arc<Self>) -> ClientVerifier {
        let credentials = self.clone();
        let current = Box::new(move || {
            credentials
                .client_verifier
                .load_full()
                .map(|v| Arc::clone(&*v))
                .ok_or(Error::General("no trust bundle yet".into()))
        });
        let algorithms = self.provider.signature_verification_algorithms;
        ClientVerifier::new(current, plexus_spiffe::any_spiffe_id("client"), true, algorithms)
    }
}

/// The SPIFFE ID (URI SAN) of a certificate.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    plexus_spiffe::spiffe_id_of(cert.as_ref())
}
