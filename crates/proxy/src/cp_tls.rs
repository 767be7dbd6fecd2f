//! The proxy's side of the authenticated control-plane port (SPEC §6): every gRPC call to the
//! control plane (certificate signing, discovery, telemetry) goes over TLS 1.3, and the proxy
//! verifies the control plane before it sends anything.
//!
//! Verification: the server's chain must lead to a trust anchor the proxy already trusts, and
//! its SPIFFE ID must be the control plane's (`…/ns/plexus-system/sa/plexus-control`; its IP
//! and DNS names are not used, so the same check works through a node agent and from a network
//! namespace). Before its first certificate a proxy trusts only the anchor pinned by its
//! workload token (its SHA-256, the token's last part; the control plane sends the anchor in
//! its chain) or the anchors of `--anchor FILE`; afterwards also the trust bundle discovery
//! keeps current (so an anchor rotation carries on). Once it holds a workload certificate it
//! presents it: that is what every call but bootstrap is authenticated by.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use plexus_spiffe::{CurrentKey, ServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{Error, RootCertStore};
use tokio::net::TcpStream;

use crate::tls::MeshCredentials;

/// The path every control plane's SPIFFE ID ends with (`plexus_core::names`).
fn is_control_plane(spiffe_id: &str) -> bool {
    let suffix = format!(
        "/ns/{}/sa/{}",
        plexus_core::names::CONTROL_PLANE_NAMESPACE,
        plexus_core::names::CONTROL_PLANE_SERVICE_ACCOUNT
    );
    spiffe_id.strip_prefix("spiffe://").is_some_and(|rest| rest.ends_with(&suffix) && !rest.starts_with('/'))
}

/// The anchor fingerprint a workload token pins (`plx1.<id>.<secret>.<anchor sha256>`).
pub fn pinned_anchor(token: &str) -> Option<String> {
    let last = token.trim().rsplit('.').next()?;
    (last.len() == 64 && last.bytes().all(|b| b.is_ascii_hexdigit())).then(|| last.to_ascii_lowercase())
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// How a proxy trusts and authenticates to the control plane.
pub struct ControlPlaneTls {
    provider: Arc<CryptoProvider>,
    /// SHA-256 (hex) of the anchor pinned by the token.
    pin: Option<String>,
    /// Anchors given as a file (`--anchor`).
    anchors: Vec<CertificateDer<'static>>,
    /// The workload certificate and the mesh bundle, once the proxy has them.
    credentials: Option<Arc<MeshCredentials>>,
}

impl std::fmt::Debug for ControlPlaneTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneTls").field("pin", &self.pin).field("anchors", &self.anchors.len()).finish()
    }
}

impl ControlPlaneTls {
    /// Trusts the anchor `token` pins and the anchors of `anchors_pem`; presents the
    /// certificate of `credentials` once there is one.
    pub fn new(
        token: &str,
        anchors_pem: Option<&str>,
        credentials: Option<Arc<MeshCredentials>>,
    ) -> anyhow::Result<Arc<ControlPlaneTls>> {
        let anchors: Vec<CertificateDer<'static>> = match anchors_pem {
            Some(pem) => CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let pin = pinned_anchor(token);
        anyhow::ensure!(
            pin.is_some() || !anchors.is_empty(),
            "no trust anchor to verify the control plane with: use a workload token from `plexus token create` (it pins the anchor) or --anchor FILE"
        );
        Ok(Arc::new(ControlPlaneTls { provider: crate::tls::provider(), pin, anchors, credentials }))
    }

    /// Whether a workload certificate is in place (needed for every call but bootstrap).
    pub fn has_certificate(&self) -> bool {
        self.credentials.as_ref().is_some_and(|c| c.certified_key().is_some())
    }

    fn client_config(self: &Arc<Self>) -> Result<Arc<rustls::ClientConfig>, Error> {
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self.verifier()))
            .with_client_cert_resolver(Arc::new(self.current_key()));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A gRPC channel to the control plane at `address` (`http://HOST:PORT`, or a node agent)
    /// over TLS; `configure` sets timeouts and keep-alives.
    pub async fn channel(
        self: &Arc<Self>,
        address: &str,
        configure: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
    ) -> anyhow::Result<tonic::transport::Channel> {
        let plain = address.replacen("https://", "http://", 1);
        let endpoint = configure(tonic::transport::Endpoint::from_shared(plain)?);
        let connector = Connector { config: self.client_config()? };
        Ok(endpoint.connect_with_connector(connector).await?)
    }

    /// Verifies the control plane: chain to a trusted anchor, and its SPIFFE ID.
    fn verifier(self: &Arc<Self>) -> ServerVerifier {
        let tls = self.clone();
        let roots = Box::new(move |presented: &[CertificateDer<'_>]| {
            let roots = tls.roots(presented);
            if roots.is_empty() {
                return Err(Error::General(format!(
                    "the control plane's certificate does not lead to the pinned trust anchor {}",
                    tls.pin.as_deref().unwrap_or("(none)")
                )));
            }
            Ok(Arc::new(roots))
        });
        let identity = Box::new(|der: &[u8]| match plexus_spiffe::spiffe_id_of(der) {
            Some(id) if is_control_plane(&id) => Ok(()),
            Some(id) => Err(format!("the server is {id}, not the control plane")),
            None => Err("the server's certificate has no SPIFFE ID".to_string()),
        });
        ServerVerifier::new(roots, identity, self.provider.signature_verification_algorithms)
    }

    /// Presents the workload certificate, once there is one.
    fn current_key(self: &Arc<Self>) -> CurrentKey {
        let tls = self.clone();
        CurrentKey::new(move || tls.credentials.as_ref().and_then(|c| c.certified_key()))
    }

    fn roots(&self, presented: &[CertificateDer<'_>]) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        if let Some(bundle) = self.credentials.as_ref().and_then(|c| c.trust_roots()) {
            roots.roots.extend(bundle.roots.iter().cloned());
        }
        for a in &self.anchors {
            let _ = roots.add(a.clone());
        }
        if let Some(pin) = &self.pin
            && let Some(anchor) = presented.iter().find(|c| sha256_hex(c.as_ref()) == *pin)
        {
            let _ = roots.add(anchor.clone().into_owned());
        }
        roots
    }
}

/// Bootstraps a workload certificate with `token` from the control plane at `address` (as a
/// proxy's identity does; for tools, benchmarks and tests): the credentials (certificate, key,
/// trust bundle) and the TLS to make authenticated calls with.
pub async fn enroll(
    address: &str,
    token: &str,
) -> anyhow::Result<(Arc<MeshCredentials>, Arc<ControlPlaneTls>, plexus_api::identity::CertifyResponse)> {
    let credentials = MeshCredentials::new();
    let tls = ControlPlaneTls::new(token, None, Some(credentials.clone()))?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let channel = tls.channel(address, |e| e.connect_timeout(Duration::from_secs(5))).await?;
    let response = plexus_api::identity::identity_client::IdentityClient::new(channel)
        .certify(plexus_api::identity::CertifyRequest {
            token: token.to_string(),
            csr_der: csr.der().to_vec().into(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(response.certificate_chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    credentials.set_certificate(chain, key.serialize_der())?;
    let anchors: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(response.trust_bundle_pem.as_bytes()).collect::<Result<_, _>>()?;
    credentials.set_trust_bundle(anchors)?;
    Ok((credentials, tls, response))
}

/// Dials the control plane (or a node agent) and runs the TLS handshake.
#[derive(Clone)]
struct Connector {
    config: Arc<rustls::ClientConfig>,
}

type Connecting =
    Pin<Box<dyn Future<Output = std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send>>;

impl tonic::codegen::Service<http::Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
            let host = uri.host().ok_or_else(|| invalid("the control-plane address has no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(7700);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from("control-plane.plexus.internal").map_err(|_| invalid("server name"))?;
            let tls = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake with the control plane timed out")
            })??;
            Ok(TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_plane_ids_and_pins() {
        assert!(is_control_plane("spiffe://plexus.local/ns/plexus-system/sa/plexus-control"));
        assert!(is_control_plane("spiffe://corp.example/ns/plexus-system/sa/plexus-control"));
        for other in [
            "spiffe://plexus.local/ns/default/sa/plexus-control",
            "spiffe://plexus.local/ns/plexus-system/sa/reviews",
            "spiffe:///ns/plexus-system/sa/plexus-control",
            "https://plexus.local/ns/plexus-system/sa/plexus-control",
        ] {
            assert!(!is_control_plane(other), "{other}");
        }
        let anchor = "ab".repeat(32);
        assert_eq!(pinned_anchor(&format!("plx1.{}.{}.{anchor}", "0".repeat(16), "1".repeat(64))), Some(anchor));
        assert_eq!(pinned_anchor("not-a-token"), None);
        assert!(ControlPlaneTls::new("not-a-token", None, None).is_err(), "nothing to trust");
    }
}
