//! The proxy's workload identity: a private key generated here (it never leaves the proxy), a
//! certificate the control plane signs for it, renewed at half-life, and the mesh trust bundle
//! (from every discovery response, so an anchor rotation reaches every proxy).
//!
//! A new bundle triggers an immediate renewal: during an anchor rotation every proxy moves to
//! the new issuer at once, and the control plane drops the old anchor when all have.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use plexus_api::identity::CertifyRequest;
use plexus_api::identity::identity_client::IdentityClient;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::Notify;

use crate::metrics::Label;
use crate::tls::MeshCredentials;

/// What the proxy reports about its certificate (discovery, `/config`, metrics).
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateInfo {
    pub spiffe_id: String,
    /// Hex.
    pub serial: String,
    /// SHA-256 (hex) of the issuer certificate.
    pub issuer_sha256: String,
    pub not_after_unix: i64,
}

/// Where and as whom to ask for certificates.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// `http://HOST:PORT` of the control plane's gRPC port.
    pub address: String,
    /// How the control plane is verified (and, for renewals, how the proxy authenticates).
    pub tls: Arc<crate::cp_tls::ControlPlaneTls>,
    pub token: String,
    /// Re-read at every bootstrap instead of `token` when set (a rotating ServiceAccount token).
    pub token_file: Option<std::path::PathBuf>,
    pub namespace: String,
    pub service_account: String,
}

/// A certificate's details with its SPIFFE ID ready as a label value.
struct Certified {
    info: CertificateInfo,
    spiffe_id: Label,
}

/// The proxy's certificate and trust bundle, kept current.
pub struct WorkloadIdentity {
    pub credentials: Arc<MeshCredentials>,
    current: ArcSwapOption<Certified>,
    bundle_pem: Mutex<String>,
    renew: Notify,
    changed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadIdentity").field("info", &self.info()).finish()
    }
}

impl WorkloadIdentity {
    pub fn new() -> Arc<WorkloadIdentity> {
        Arc::new(WorkloadIdentity {
            credentials: MeshCredentials::new(),
            current: ArcSwapOption::empty(),
            bundle_pem: Mutex::new(String::new()),
            renew: Notify::new(),
            changed: tokio::sync::watch::channel(0).0,
        })
    }

    /// The current certificate, if any.
    pub fn info(&self) -> Option<CertificateInfo> {
        self.current.load().as_ref().map(|c| c.info.clone())
    }

    /// The current certificate's SPIFFE ID, as the label value requests carry (read per
    /// request: a reference count, not a copy of the certificate's details).
    pub fn spiffe_id(&self) -> Option<Label> {
        self.current.load().as_ref().map(|c| c.spiffe_id.clone())
    }

    /// Notified (with a counter) whenever the certificate changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Installs the trust bundle from a discovery response; a changed bundle triggers a
    /// renewal (an anchor rotation moves every proxy to the new issuer at once).
    pub fn update_bundle(&self, pem: &str) {
        if pem.is_empty() {
            return;
        }
        let Ok(mut current) = self.bundle_pem.lock() else { return };
        if *current == pem {
            return;
        }
        match install_bundle(&self.credentials, pem) {
            Ok(()) => {
                let first = current.is_empty();
                *current = pem.to_string();
                if !first {
                    tracing::info!("trust bundle changed; renewing the workload certificate");
                    self.renew.notify_one();
                }
            }
            Err(e) => tracing::warn!(error = %e, "ignoring an invalid trust bundle"),
        }
    }

    /// Gets a certificate, then renews it at half-life (or at once when the bundle changes),
    /// retrying with backoff while the control plane cannot sign. Runs until the task is dropped.
    pub async fn run(self: Arc<Self>, config: IdentityConfig, expiry_gauge: impl Fn(i64) + Send + 'static) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.certify(&config).await {
                Ok(info) => {
                    backoff = Duration::from_millis(200);
                    expiry_gauge(info.not_after_unix);
                    let now = unix_now();
                    let half = ((info.not_after_unix - now).max(2) / 2) as u64;
                    tracing::info!(spiffe_id = %info.spiffe_id, serial = %info.serial, renew_in_s = half, "workload certificate issued");
                    let spiffe_id = Label::from(info.spiffe_id.as_str());
                    self.current.store(Some(Arc::new(Certified { info, spiffe_id })));
                    self.changed.send_modify(|n| *n += 1);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(half)) => {}
                        _ = self.renew.notified() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot get a workload certificate");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn certify(&self, config: &IdentityConfig) -> anyhow::Result<CertificateInfo> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
        // Bootstrap sends the token to a verified control plane; a renewal is authenticated by
        // the current certificate (presented whenever there is one).
        let channel = config
            .tls
            .channel(&config.address, |e| e.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(5)))
            .await?;
        let resp = IdentityClient::new(channel)
            .certify(CertifyRequest {
                token: match &config.token_file {
                    Some(path) => std::fs::read_to_string(path)
                        .map_err(|e| anyhow::anyhow!("cannot read the token file {}: {e}", path.display()))?
                        .trim()
                        .to_string(),
                    None => config.token.clone(),
                },
                namespace: config.namespace.clone(),
                service_account: config.service_account.clone(),
                csr_der: csr.der().to_vec().into(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
            .into_inner();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(resp.certificate_chain_pem.as_bytes()).collect::<Result<_, _>>()?;
        let leaf = chain.first().ok_or_else(|| anyhow::anyhow!("the control plane sent no certificate"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| anyhow::anyhow!("unreadable certificate from the control plane: {e}"))?;
        let info = CertificateInfo {
            spiffe_id: crate::tls::spiffe_id_of(leaf).unwrap_or_default(),
            serial: parsed.raw_serial_as_string().replace(':', ""),
            issuer_sha256: chain
                .get(1)
                .map(|i| hex(ring::digest::digest(&ring::digest::SHA256, i.as_ref()).as_ref()))
                .unwrap_or_default(),
            not_after_unix: parsed.validity().not_after.timestamp(),
        };
        self.update_bundle(&resp.trust_bundle_pem);
        self.credentials.set_certificate(chain, key.serialize_der())?;
        Ok(info)
    }
}

fn install_bundle(credentials: &MeshCredentials, pem: &str) -> anyhow::Result<()> {
    let anchors: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>()?;
    anyhow::ensure!(!anchors.is_empty(), "empty trust bundle");
    credentials.set_trust_bundle(anchors)?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
