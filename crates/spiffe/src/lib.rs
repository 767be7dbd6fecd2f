//! SPIFFE identities in X.509 certificates, and the rustls verifiers every TLS connection of
//! the mesh uses (sidecar ↔ sidecar, proxy → control plane, control plane → a proxy's admin
//! server, the control plane's gRPC port). Each verifier checks the chain with webpki against
//! roots its owner supplies (they change with the trust bundle) and then the peer's SPIFFE ID
//! with a check its owner supplies; handshake signatures are checked with the provider's
//! algorithms. One place, so the proxy and the control plane cannot verify differently.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// The handshake-signature methods both verifier traits have, checked with `self.algorithms`.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

/// The SPIFFE ID of a parsed certificate: its URI SAN when it has exactly one and that is a
/// well-formed SPIFFE ID ([`is_spiffe_id`]), as an X.509-SVID must. A certificate naming two
/// URIs, or an identity spelled so that it would compare unequal to the same identity in a
/// policy (upper case, percent-encoding, dot segments), proves no identity.
pub fn spiffe_id_in(cert: &X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) if is_spiffe_id(uri) => Some(uri.to_string()),
        _ => None,
    }
}

/// Whether `uri` is a SPIFFE ID in its one canonical spelling (SPIFFE ID spec §2): `spiffe://`,
/// a trust domain of lower-case letters, digits, `.`, `-`, `_`, then path segments of letters,
/// digits, `.`, `-`, `_` — none empty, `.` or `..`; no port, userinfo, percent-encoding,
/// query or fragment.
pub fn is_spiffe_id(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("spiffe://") else { return false };
    let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
    let domain_ok = !trust_domain.is_empty()
        && trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    domain_ok && (!rest.contains('/') || path.split('/').all(segment_ok))
}

/// The SPIFFE ID of a DER certificate (`None`: unparsable, or no `spiffe://` URI SAN).
pub fn spiffe_id_of(der: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(der).ok()?;
    spiffe_id_in(&parsed)
}

/// The roots a chain must lead to, given the intermediates the peer sent (a proxy before its
/// first certificate picks the pinned anchor among them).
pub type Roots = Box<dyn Fn(&[CertificateDer<'_>]) -> Result<Arc<RootCertStore>, Error> + Send + Sync>;

/// Accepts a verified peer certificate (DER) by its identity, or says why not.
pub type IdentityCheck = Box<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// An [`IdentityCheck`] accepting exactly the SPIFFE ID `expected`; `peer` names the other side
/// in the errors ("peer", "the admin server").
pub fn expect_spiffe_id(peer: &'static str, expected: String) -> IdentityCheck {
    Box::new(move |der| match spiffe_id_of(der) {
        Some(id) if id == expected => Ok(()),
        Some(id) => Err(format!("{peer} is {id}, expected {expected}")),
        None => Err(format!("{peer}'s certificate has no SPIFFE ID")),
    })
}

/// An [`IdentityCheck`] accepting any certificate with a SPIFFE ID.
pub fn any_spiffe_id(peer: &'static str) -> IdentityCheck {
    Box::new(move |der| match spiffe_id_of(der) {
        Some(_) => Ok(()),
        None => Err(format!("{peer}'s certificate has no SPIFFE ID")),
    })
}

/// Verifies a server: its chain leads to [`Roots`], and its identity passes the check. The
/// server name is not used: mesh peers are named by their SPIFFE IDs, whatever address they
/// are reached at.
pub struct ServerVerifier {
    roots: Roots,
    identity: IdentityCheck,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerVerifier {
    pub fn new(roots: Roots, identity: IdentityCheck, algorithms: WebPkiSupportedAlgorithms) -> ServerVerifier {
        ServerVerifier { roots, identity, algorithms }
    }
}

impl fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerVerifier")
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let roots = (self.roots)(intermediates)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&cert, &roots, intermediates, now, self.algorithms.all)?;
        (self.identity)(end_entity.as_ref()).map_err(Error::General)?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// The webpki client verifier for the current trust bundle (its owner rebuilds it when the
/// bundle changes).
pub type CurrentClientVerifier = Box<dyn Fn() -> Result<Arc<dyn ClientCertVerifier>, Error> + Send + Sync>;

/// Verifies client certificates with the current webpki verifier, then their identity.
/// `mandatory: false` lets clients without a certificate in (the control plane's gRPC port,
/// where proxies bootstrap with a token); a certificate that is presented is always verified.
pub struct ClientVerifier {
    current: CurrentClientVerifier,
    identity: IdentityCheck,
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientVerifier {
    pub fn new(
        current: CurrentClientVerifier,
        identity: IdentityCheck,
        mandatory: bool,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> ClientVerifier {
        ClientVerifier { current, identity, mandatory, algorithms }
    }
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientVerifier").field("mandatory", &self.mandatory).finish()
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
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
        (self.current)()?.verify_client_cert(end_entity, intermediates, now)?;
        (self.identity)(end_entity.as_ref()).map_err(Error::General)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// Presents the current certificate (it is renewed and swapped underneath) on both sides of
/// a handshake; none while there is none.
pub struct CurrentKey(Box<dyn Fn() -> Option<Arc<CertifiedKey>> + Send + Sync>);

impl CurrentKey {
    pub fn new(key: impl Fn() -> Option<Arc<CertifiedKey>> + Send + Sync + 'static) -> CurrentKey {
        CurrentKey(Box::new(key))
    }
}

impl fmt::Debug for CurrentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentKey")
    }
}

impl ResolvesServerCert for CurrentKey {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (self.0)()
    }
}

impl ResolvesClientCert for CurrentKey {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        (self.0)()
    }

    fn has_certs(&self) -> bool {
        (self.0)().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(uris: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*u).expect("ia5")))
            .chain([rcgen::SanType::DnsName(rcgen::string::Ia5String::try_from("web.default").expect("ia5"))])
            .collect();
        params.self_signed(&key).expect("sign").der().to_vec()
    }

    #[test]
    fn a_certificate_proves_one_canonical_spiffe_id_or_none() {
        let web = "spiffe://plexus.local/ns/default/sa/web";
        assert_eq!(spiffe_id_of(&cert_with(&[web])).as_deref(), Some(web), "positive control");
        let sa = "spiffe://plexus.local/ns/plexus-system/sa/plexus-control";
        assert_eq!(spiffe_id_of(&cert_with(&[sa])).as_deref(), Some(sa));
        for uris in [
            vec![web, "spiffe://plexus.local/ns/default/sa/admin"],
            vec!["spiffe://plexus.local/ns/default/sa/admin", web],
            vec![web, "https://example.com/"],
            vec!["https://example.com/"],
            vec![],
            vec!["spiffe://PLEXUS.local/ns/default/sa/web"],
            vec!["SPIFFE://plexus.local/ns/default/sa/web"],
            vec!["spiffe://plexus.local/ns/default/sa/w%65b"],
            vec!["spiffe://plexus.local/ns/default/sa/web/../admin"],
            vec!["spiffe://plexus.local/ns/default/sa/./web"],
            vec!["spiffe://plexus.local/ns//default/sa/web"],
            vec!["spiffe://plexus.local/ns/default/sa/web/"],
            vec!["spiffe://plexus.local:443/ns/default/sa/web"],
            vec!["spiffe://user@plexus.local/ns/default/sa/web"],
            vec!["spiffe://plexus.local/ns/default/sa/web?x=1"],
            vec!["spiffe://plexus.local/ns/default/sa/web#x"],
            vec!["spiffe:///ns/default/sa/web"],
        ] {
            assert_eq!(spiffe_id_of(&cert_with(&uris)), None, "{uris:?}");
        }
    }
}
