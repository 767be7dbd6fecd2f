//! The mesh's certificate authority files in the data dir: a long-lived trust anchor and an
//! issuer signed by it (ECDSA P-256), created on the control plane's first start so mTLS can
//! be on out of the box. Leaf issuance and rotation build on these (security issue).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use serde::Serialize;

pub const ANCHOR_CERT: &str = "trust-anchor.pem";
pub const ANCHOR_KEY: &str = "trust-anchor-key.pem";
pub const ISSUER_CERT: &str = "issuer.pem";
pub const ISSUER_KEY: &str = "issuer-key.pem";

const ANCHOR_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// Certificates start being valid a minute early, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(60);

fn ca_params(common_name: &str, lifetime: Duration, path_len: Option<u8>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::OrganizationName, "Plexus");
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    p.not_before = (now - BACKDATE).into();
    p.not_after = (now + lifetime).into();
    p
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Creates the trust anchor and issuer unless they exist. Keys are written 0600 and never
/// logged. An incomplete set is an error (it would silently change the mesh's trust).
pub fn ensure_ca(data_dir: &Path, trust_domain: &str) -> Result<bool, String> {
    let files = [ANCHOR_CERT, ANCHOR_KEY, ISSUER_CERT, ISSUER_KEY];
    let present: Vec<&str> = files.iter().copied().filter(|f| data_dir.join(f).exists()).collect();
    if present.len() == files.len() {
        return Ok(false);
    }
    if !present.is_empty() {
        return Err(format!(
            "the data dir {} holds only part of the certificate authority ({}); restore the missing files or remove them all to create a new one",
            data_dir.display(),
            present.join(", ")
        ));
    }
    let err = |e: rcgen::Error| format!("cannot create the certificate authority: {e}");
    let anchor_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let anchor_params = ca_params(&format!("Plexus trust anchor {trust_domain}"), ANCHOR_LIFETIME, None);
    let anchor = anchor_params.self_signed(&anchor_key).map_err(err)?;
    let issuer_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let issuer_params = ca_params(&format!("Plexus issuer {trust_domain}"), ISSUER_LIFETIME, Some(0));
    let issuer = issuer_params.signed_by(&issuer_key, &Issuer::new(anchor_params, &anchor_key)).map_err(err)?;
    let write = |name: &'static str, text: String, private: bool| {
        let path = data_dir.join(name);
        let result = if private { write_private(&path, &text) } else { std::fs::write(&path, text) };
        result.map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(ANCHOR_KEY, anchor_key.serialize_pem(), true)?;
    write(ISSUER_KEY, issuer_key.serialize_pem(), true)?;
    write(ANCHOR_CERT, anchor.pem(), false)?;
    write(ISSUER_CERT, issuer.pem(), false)?;
    Ok(true)
}

/// What `plexus check` and `plexus identity show` need to know about a certificate.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    /// Seconds until expiry (negative when expired).
    pub expires_in_seconds: i64,
    pub is_ca: bool,
}

/// The chain's state: both certificates and whether the issuer is signed by the anchor.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainStatus {
    pub trust_anchor: CertSummary,
    pub issuer: CertSummary,
    pub issuer_signed_by_anchor: bool,
}

fn read_der(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&text)
        .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
    Ok(pem.contents)
}

fn summary(cert: &x509_parser::certificate::X509Certificate<'_>) -> CertSummary {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let validity = cert.validity();
    CertSummary {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: validity.not_before.to_string(),
        not_after: validity.not_after.to_string(),
        expires_in_seconds: validity.not_after.timestamp() - now,
        is_ca: cert.is_ca(),
    }
}

/// Reads and checks the chain in the data dir.
pub fn chain_status(data_dir: &Path) -> Result<ChainStatus, String> {
    let anchor_der = read_der(&data_dir.join(ANCHOR_CERT))?;
    let issuer_der = read_der(&data_dir.join(ISSUER_CERT))?;
    let (_, anchor) = x509_parser::parse_x509_certificate(&anchor_der).map_err(|e| format!("{ANCHOR_CERT}: {e}"))?;
    let (_, issuer) = x509_parser::parse_x509_certificate(&issuer_der).map_err(|e| format!("{ISSUER_CERT}: {e}"))?;
    let signed = issuer.verify_signature(Some(anchor.public_key())).is_ok();
    Ok(ChainStatus { trust_anchor: summary(&anchor), issuer: summary(&issuer), issuer_signed_by_anchor: signed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_a_valid_chain_once_with_private_keys() {
        let dir = std::env::temp_dir().join(format!("plexus-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        assert_eq!(ensure_ca(&dir, "plexus.local"), Ok(true));
        assert_eq!(ensure_ca(&dir, "plexus.local"), Ok(false), "kept on the next start");
        let status = chain_status(&dir).expect("chain");
        assert!(status.issuer_signed_by_anchor);
        assert!(status.trust_anchor.is_ca && status.issuer.is_ca);
        assert!(status.issuer.expires_in_seconds > 300 * 86_400);
        assert!(status.trust_anchor.subject.contains("Plexus trust anchor plexus.local"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(ISSUER_KEY)).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_file(dir.join(ISSUER_KEY)).expect("rm");
        assert!(ensure_ca(&dir, "plexus.local").is_err(), "a partial CA is refused");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
