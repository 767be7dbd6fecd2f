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
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};

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
            .with_client_cert_verifier(Arc::new(MeshClientVerifier { credentials: self.clone() }))
            .with_cert_resolver(Arc::new(Resolver { credentials: self.clone() }));
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
            .with_custom_certificate_verifier(Arc::new(MeshServerVerifier {
                credentials: self.clone(),
                expected: expected.to_string(),
            }))
            .with_client_cert_resolver(Arc::new(Resolver { credentials: self.clone() }));
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }

    /// The name sent as SNI: not used for verification (the SPIFFE ID is), but rustls needs one.
    pub fn server_name() -> ServerName<'static> {
        ServerName::try_from("mesh.plexus.internal")
            .unwrap_or(ServerName::IpAddress(std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST).into()))
    }

    fn algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

/// The SPIFFE ID (URI SAN) of a certificate.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.to_string()),
        _ => None,
    })
}

/// Serves this proxy's current certificate to both sides of a handshake.
#[derive(Debug)]
struct Resolver {
    credentials: Arc<MeshCredentials>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.credentials.key.load_full()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.credentials.key.load_full()
    }

    fn has_certs(&self) -> bool {
        self.credentials.key.load().is_some()
    }
}

/// Verifies a peer sidecar's server certificate: chain to the bundle, and the expected SPIFFE ID.
#[derive(Debug)]
struct MeshServerVerifier {
    credentials: Arc<MeshCredentials>,
    expected: String,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let roots = self.credentials.roots.load_full().ok_or(Error::General("no trust bundle yet".into()))?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots,
            intermediates,
            now,
            self.credentials.algorithms().all,
        )?;
        match spiffe_id_of(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(Error::General(format!("peer is {id}, expected {}", self.expected))),
            None => Err(Error::General("peer certificate has no SPIFFE ID".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, self.credentials.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, self.credentials.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.credentials.algorithms().supported_schemes()
    }
}

/// Requires and verifies client certificates against the current bundle (delegating to a
/// webpki verifier rebuilt whenever the bundle changes).
#[derive(Debug)]
struct MeshClientVerifier {
    credentials: Arc<MeshCredentials>,
}

impl MeshClientVerifier {
    fn inner(&self) -> Result<Arc<Arc<dyn ClientCertVerifier>>, Error> {
        self.credentials.client_verifier.load_full().ok_or(Error::General("no trust bundle yet".into()))
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner()?.verify_client_cert(end_entity, intermediates, now)?;
        if spiffe_id_of(end_entity).is_none() {
            return Err(Error::General("client certificate has no SPIFFE ID".into()));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, self.credentials.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, self.credentials.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.credentials.algorithms().supported_schemes()
    }
}
