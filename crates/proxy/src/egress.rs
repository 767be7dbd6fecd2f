//! Traffic leaving the mesh: the `registryOnly` refusal with its counter, and TLS origination
//! to ExternalServices.
//!
//! The decision itself is [`plexus_core::decide::egress`] (shared with `plexus explain`); each
//! outbound path asks it through [`crate::proxy::State::egress`] and answers a refusal as its
//! protocol allows: 502 `destination not in the registry` for HTTP and `CONNECT`, a close for
//! an opaque stream — always counted in `plexus_egress_denied_total{destination}`.
//!
//! Origination: an ExternalService with `tls.originate: true` has its `https`/`tls` ports
//! reached over TLS opened by the sidecar, SNI = the host the application named, the chain
//! verified against the system's roots (rustls-native-certs: the OS bundle, or
//! `SSL_CERT_FILE`) or the ExternalService's `tls.caFile`, and the name against the
//! certificate. A certificate that does not verify fails the request with 502.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use plexus_core::external::Origination;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::error::ProxyError;
use crate::http::client::Proto;

/// TLS opened by the sidecar to a host outside the mesh.
#[derive(Debug)]
pub struct Origin {
    /// SNI, and the name the certificate must carry.
    pub server_name: ServerName<'static>,
    pub config: Arc<rustls::ClientConfig>,
    /// Pools connections apart from plaintext ones and from other hosts' on the same address:
    /// `host|roots`.
    pub key: Arc<str>,
}

impl PartialEq for Origin {
    fn eq(&self, other: &Origin) -> bool {
        self.key == other.key
    }
}

impl Eq for Origin {}

/// CA roots read from a file, with the file's modification time when read.
type FileRoots = (Option<SystemTime>, Arc<RootCertStore>);

/// CA roots by `caFile` (the configuration's, so bounded by it), each reloaded when its file
/// changes; the system's are loaded once.
#[derive(Default)]
pub struct Originator {
    roots: Mutex<HashMap<String, FileRoots>>,
}

/// The system's roots, loaded once.
fn system_roots() -> Result<Arc<RootCertStore>, ProxyError> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    if let Some(r) = ROOTS.get() {
        return Ok(r.clone());
    }
    let loaded = rustls_native_certs::load_native_certs();
    for e in &loaded.errors {
        tracing::warn!(error = %e, "reading the system's CA certificates");
    }
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(loaded.certs);
    if added == 0 {
        return Err(ProxyError::OriginationFailed(
            "no system CA certificates found (set SSL_CERT_FILE or tls.caFile)".into(),
        ));
    }
    Ok(ROOTS.get_or_init(|| Arc::new(store)).clone())
}

fn file_roots(path: &str) -> Result<RootCertStore, ProxyError> {
    let fail = |why: String| ProxyError::OriginationFailed(format!("tls.caFile {path}: {why}"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| fail(e.to_string()))?;
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(fail("no CA certificate in it".into()));
    }
    Ok(store)
}

impl Originator {
    fn roots(&self, ca_file: Option<&str>) -> Result<Arc<RootCertStore>, ProxyError> {
        let Some(path) = ca_file else { return system_roots() };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let key = path.to_string();
        if let Ok(cache) = self.roots.lock()
            && let Some((at, roots)) = cache.get(&key)
            && *at == modified
            && modified.is_some()
        {
            return Ok(roots.clone());
        }
        let roots = Arc::new(file_roots(path)?);
        if let Ok(mut cache) = self.roots.lock() {
            cache.insert(key, (modified, roots.clone()));
        }
        Ok(roots)
    }

    /// How to open TLS to `host` for an ExternalService that originates it, speaking `proto`
    /// over it (offered by ALPN), or, with `None`, an opaque stream (no ALPN).
    pub fn origin(
        &self,
        host: &str,
        origination: &Origination,
        proto: Option<Proto>,
    ) -> Result<Arc<Origin>, ProxyError> {
        let host = plexus_core::external::normalize_host(host);
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| ProxyError::OriginationFailed(format!("{host:?} is not a name TLS can verify")))?;
        let roots = self.roots(origination.ca_file.as_deref())?;
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ProxyError::OriginationFailed(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = match proto {
            Some(Proto::Http1) => vec![b"http/1.1".to_vec()],
            Some(Proto::Http2) => vec![b"h2".to_vec()],
            None => Vec::new(),
        };
        let key = format!("{host}|{}", origination.ca_file.as_deref().unwrap_or("system roots"));
        Ok(Arc::new(Origin { server_name, config: Arc::new(config), key: key.into() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_that_is_missing_or_empty_is_a_clear_error() {
        let o = Originator::default();
        let with = |ca: &str| Origination { ca_file: Some(ca.into()) };
        let err = o.origin("api.example.com", &with("/nonexistent/ca.pem"), Some(Proto::Http1)).expect_err("missing");
        assert!(err.to_string().contains("tls.caFile /nonexistent/ca.pem"), "{err}");
        let dir = std::env::temp_dir().join(format!("plexus-egress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err =
            o.origin("api.example.com", &with(&empty.display().to_string()), Some(Proto::Http1)).expect_err("empty");
        assert!(err.to_string().contains("no CA certificate"), "{err}");
        let ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = ca.self_signed(&key).expect("self-signed");
        let good = dir.join("ca.pem");
        std::fs::write(&good, cert.pem()).expect("write");
        let good = with(&good.display().to_string());
        let origin = o.origin("API.example.com", &good, Some(Proto::Http1)).expect("valid");
        assert_eq!(origin.server_name.to_str(), "api.example.com");
        assert_eq!(origin.config.alpn_protocols, [b"http/1.1".to_vec()]);
        let stream = o.origin("api.example.com", &good, None).expect("valid");
        assert!(stream.config.alpn_protocols.is_empty(), "an opaque stream offers no ALPN");
        let ip = o.origin("10.1.2.3", &good, None).expect("an address is verified against the certificate's IP names");
        assert_eq!(ip.server_name.to_str(), "10.1.2.3");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
