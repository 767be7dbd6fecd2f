//! The mesh's certificate authority: a long-lived trust anchor, an issuer signed by it (both
//! ECDSA P-256 when generated), and their lifecycle — creation on first start, `plexus identity
//! init` (generated or imported), issuer and anchor rotation, and the trust bundle proxies get.
//!
//! Files in the data dir (keys 0600, written atomically, never logged):
//! - `trust-anchor.pem` (+ `trust-anchor-key.pem`, absent when the CA was imported: the anchor's
//!   key may stay offline);
//! - `issuer.pem`, `issuer-key.pem`: the certificate and key that sign workload certificates;
//! - `previous-trust-anchor.pem`: only while an anchor rotation is in progress, so a restart in
//!   the middle of one continues it;
//! - `previous-issuers.pem`: issuers replaced by a rotation whose certificates may still be held
//!   by proxies, to tell "issued by a previous issuer" from "unknown issuer".
//!
//! An anchor rotation runs without downtime: the bundle becomes [new anchor, old anchor] and is
//! pushed to every proxy (which re-certifies when its bundle changes); once every connected
//! proxy reports a certificate from an issuer under the new anchor, the old anchor leaves the
//! bundle and the data dir.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use plexus_core::{Kind, Spec};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use serde::Serialize;
use tokio::sync::watch;
use x509_parser::certificate::X509Certificate;

use crate::proxies::{Proxies, ProxyStatus};
use crate::store::Store;

pub const ANCHOR_CERT: &str = "trust-anchor.pem";
pub const ANCHOR_KEY: &str = "trust-anchor-key.pem";
pub const ISSUER_CERT: &str = "issuer.pem";
pub const ISSUER_KEY: &str = "issuer-key.pem";
/// The anchor being replaced, kept only while an anchor rotation is in progress.
pub const PREVIOUS_ANCHOR_CERT: &str = "previous-trust-anchor.pem";
/// Issuers replaced by rotations (certificates only), while leaves they signed may be in use.
pub const PREVIOUS_ISSUERS: &str = "previous-issuers.pem";

const ANCHOR_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Issuer lifetime unless MeshConfig `certificates.issuerLifetime` says otherwise.
pub const DEFAULT_ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// Workload certificate lifetime unless MeshConfig `certificates.leafLifetime` says otherwise.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Certificates start being valid a minute early, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(60);
/// An anchor rotation is not finished before the control plane has run this long: after a
/// restart in the middle of one, the proxies connected before must first reconnect and report
/// their certificates (they send a message at least every 5 s by default). The registration
/// TTL ([`crate::proxies::EXPIRY`] by default; [`maintain_rotation`] uses the configured one).
pub const ROTATION_SETTLE: Duration = crate::proxies::EXPIRY;

fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn rfc3339_unix(secs: i64) -> String {
    plexus_core::time::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

/// Lower-case hex SHA-256 of `bytes` (certificate fingerprints, issuer identities).
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Normalises a reported SHA-256 (any case, with or without colons) for comparison.
fn normalise_hex(text: &str) -> String {
    text.chars().filter(|c| *c != ':').map(|c| c.to_ascii_lowercase()).collect()
}

/// Standard base64 with padding (PEM bodies).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// PEM text of a DER certificate.
pub fn certificate_pem(der: &[u8]) -> String {
    let body = base64(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// What `plexus check` and `plexus identity show` need to know about a certificate.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    /// RFC 3339 UTC.
    pub not_before: String,
    pub not_after: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    /// Seconds until expiry (negative when expired).
    pub expires_in_seconds: i64,
    /// Whole days until expiry (negative when expired).
    pub days_left: i64,
    /// SHA-256 fingerprint of the DER certificate, lower-case hex.
    pub sha256: String,
    pub is_ca: bool,
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    Ok(cert)
}

/// One certificate of the CA, parsed once.
#[derive(Debug, Clone)]
pub struct Cert {
    pub der: Vec<u8>,
    pub summary: CertSummary,
}

impl Cert {
    pub fn from_der(der: Vec<u8>) -> Result<Cert, String> {
        let summary = {
            let cert = parse(&der)?;
            let validity = cert.validity();
            let (not_before, not_after) = (validity.not_before.timestamp(), validity.not_after.timestamp());
            let left = not_after - unix_now();
            CertSummary {
                subject: cert.subject().to_string(),
                issuer: cert.issuer().to_string(),
                serial: cert.raw_serial_as_string(),
                not_before: rfc3339_unix(not_before),
                not_after: rfc3339_unix(not_after),
                not_before_unix: not_before,
                not_after_unix: not_after,
                expires_in_seconds: left,
                days_left: left.div_euclid(86_400),
                sha256: sha256_hex(&der),
                is_ca: cert.is_ca(),
            }
        };
        Ok(Cert { der, summary })
    }

    pub fn pem(&self) -> String {
        certificate_pem(&self.der)
    }

    /// Whether `self` carries a valid signature by `signer`'s key.
    pub fn signed_by(&self, signer: &Cert) -> bool {
        match (parse(&self.der), parse(&signer.der)) {
            (Ok(c), Ok(s)) => c.verify_signature(Some(s.public_key())).is_ok(),
            _ => false,
        }
    }

    /// Refreshes the time-dependent fields of the summary.
    fn summary_now(&self) -> CertSummary {
        let mut s = self.summary.clone();
        s.expires_in_seconds = s.not_after_unix - unix_now();
        s.days_left = s.expires_in_seconds.div_euclid(86_400);
        s
    }
}

/// Every certificate (`CERTIFICATE` PEM block) in `text`.
pub fn parse_pem_certs(text: &[u8]) -> Result<Vec<Cert>, String> {
    let mut certs = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(text) {
        let block = block.map_err(|e| format!("invalid PEM: {e}"))?;
        if block.label == "CERTIFICATE" {
            certs.push(Cert::from_der(block.contents)?);
        }
    }
    Ok(certs)
}

fn read_certs(path: &Path) -> Result<Vec<Cert>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_pem_certs(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The first certificate of a PEM file (the one it is about).
fn read_cert(path: &Path) -> Result<Cert, String> {
    read_certs(path)?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it", path.display()))
}

/// Parses a PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`).
pub fn parse_key(text: &str, what: &str) -> Result<KeyPair, String> {
    KeyPair::from_pem(text).map_err(|e| {
        let hint = if text.contains("BEGIN EC PRIVATE KEY") || text.contains("BEGIN RSA PRIVATE KEY") {
            format!("\n  hint: convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in {what} -out key.pem`")
        } else {
            String::new()
        };
        format!("{what}: not a usable unencrypted PKCS#8 private key ({e}){hint}")
    })
}

fn read_key(path: &Path) -> Result<KeyPair, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_key(&text, &path.display().to_string())
}

/// Writes a file atomically (temporary file + rename), owner-only when `private`.
fn write_atomic(path: &Path, text: &str, private: bool) -> Result<(), String> {
    let tmp = path.with_extension("pem.tmp");
    // A leftover from an interrupted write would keep its permissions: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

fn remove_if_present(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
    }
}

// ----- creating certificates -----------------------------------------------------------------

/// Distinct subjects per generation (a random suffix) so an old and a new anchor in one bundle,
/// or an old and a new issuer, are never confused by name-based path building.
fn ca_params(role: &str, trust_domain: &str, lifetime: Duration, path_len: Option<u8>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::OrganizationName, "Plexus");
    p.distinguished_name.push(DnType::CommonName, format!("Plexus {role} {trust_domain} {:08x}", fastrand::u32(..)));
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = path_len.is_some();
    p.serial_number = Some(random_serial());
    let now = SystemTime::now();
    p.not_before = (now - BACKDATE).into();
    p.not_after = (now + lifetime).into();
    p
}

/// 128 random bits from the system's CSPRNG, positive.
fn random_serial() -> SerialNumber {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // The OS random source failing is not expected; fall back rather than refuse to sign.
        bytes = fastrand::u128(..).to_be_bytes();
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn new_key() -> Result<KeyPair, String> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| format!("cannot generate a key: {e}"))
}

/// A new self-signed trust anchor.
fn new_anchor(trust_domain: &str) -> Result<(KeyPair, Cert), String> {
    let key = new_key()?;
    let cert = ca_params("trust anchor", trust_domain, ANCHOR_LIFETIME, None)
        .self_signed(&key)
        .map_err(|e| format!("cannot create the trust anchor: {e}"))?;
    Ok((key, Cert::from_der(cert.der().to_vec())?))
}

/// A new issuer signed by the anchor, valid for `lifetime` but never beyond the anchor.
fn new_issuer(
    anchor: &Cert,
    anchor_key: &KeyPair,
    trust_domain: &str,
    lifetime: Duration,
) -> Result<(KeyPair, Cert), String> {
    let key = new_key()?;
    let mut params = ca_params("issuer", trust_domain, lifetime, Some(0));
    let anchor_end = SystemTime::UNIX_EPOCH + Duration::from_secs(anchor.summary.not_after_unix.max(0) as u64);
    if SystemTime::from(params.not_after) > anchor_end {
        params.not_after = anchor_end.into();
    }
    let signer = Issuer::from_ca_cert_der(&anchor.der.clone().into(), anchor_key)
        .map_err(|e| format!("cannot use the trust anchor: {e}"))?;
    let cert = params.signed_by(&key, &signer).map_err(|e| format!("cannot create the issuer: {e}"))?;
    Ok((key, Cert::from_der(cert.der().to_vec())?))
}

/// Checks that `issuer` can serve under `anchor`: both CAs, issuer signed by the anchor, the
/// key (when given) is the issuer's, nothing expired. Every problem, one per line.
pub fn validate_chain(anchor: &Cert, issuer: &Cert, issuer_key: Option<&KeyPair>) -> Result<(), String> {
    let mut problems = Vec::new();
    let now = unix_now();
    for (what, c) in [("trust anchor", anchor), ("issuer", issuer)] {
        if !c.summary.is_ca {
            problems.push(format!("the {what} is not a CA certificate (basicConstraints CA:TRUE)"));
        }
        if c.summary.not_after_unix <= now {
            problems.push(format!("the {what} expired on {}", c.summary.not_after));
        }
        if c.summary.not_before_unix > now + BACKDATE.as_secs() as i64 {
            problems.push(format!("the {what} is not valid before {}", c.summary.not_before));
        }
    }
    if !issuer.signed_by(anchor) {
        problems.push(format!(
            "the issuer ({}) is not signed by the trust anchor ({})",
            issuer.summary.subject, anchor.summary.subject
        ));
    }
    if let Ok(parsed) = parse(&issuer.der)
        && let Ok(Some(ku)) = parsed.key_usage()
        && !ku.value.key_cert_sign()
    {
        problems.push("the issuer's keyUsage does not allow signing certificates (keyCertSign)".into());
    }
    if let Some(key) = issuer_key
        && let Ok(parsed) = parse(&issuer.der)
        && parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes()
    {
        problems.push("the issuer key does not belong to the issuer certificate".into());
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("\n")) }
}

// ----- the data dir (offline: `plexus control` first start, `plexus identity init|show`) -------

/// Whether the data dir holds a certificate authority (any of its files).
pub fn ca_present(data_dir: &Path) -> bool {
    [ANCHOR_CERT, ISSUER_CERT, ISSUER_KEY].iter().any(|f| data_dir.join(f).exists())
}

/// Creates the trust anchor and issuer unless they exist. Keys are written 0600 and never
/// logged. An incomplete set is an error (it would silently change the mesh's trust); the
/// anchor's key alone may be missing (an imported CA keeps it offline).
pub fn ensure_ca(data_dir: &Path, trust_domain: &str) -> Result<bool, String> {
    let files = [ANCHOR_CERT, ISSUER_CERT, ISSUER_KEY];
    let present: Vec<&str> = files.iter().copied().filter(|f| data_dir.join(f).exists()).collect();
    if present.len() == files.len() {
        return Ok(false);
    }
    if !present.is_empty() || data_dir.join(ANCHOR_KEY).exists() {
        let mut found = present;
        if data_dir.join(ANCHOR_KEY).exists() {
            found.push(ANCHOR_KEY);
        }
        return Err(format!(
            "the data dir {} holds only part of the certificate authority ({}); restore the missing files, or remove them all (or run `plexus identity init --force`) to create a new one",
            data_dir.display(),
            found.join(", ")
        ));
    }
    generate_into(data_dir, trust_domain)?;
    Ok(true)
}

/// Writes a new anchor and issuer into the data dir, replacing any CA there (and ending any
/// rotation in progress).
pub fn generate_into(data_dir: &Path, trust_domain: &str) -> Result<(Cert, Cert), String> {
    let (anchor_key, anchor) = new_anchor(trust_domain)?;
    let (issuer_key, issuer) = new_issuer(&anchor, &anchor_key, trust_domain, DEFAULT_ISSUER_LIFETIME)?;
    remove_if_present(&data_dir.join(PREVIOUS_ANCHOR_CERT))?;
    remove_if_present(&data_dir.join(PREVIOUS_ISSUERS))?;
    write_atomic(&data_dir.join(ANCHOR_KEY), &anchor_key.serialize_pem(), true)?;
    write_atomic(&data_dir.join(ISSUER_KEY), &issuer_key.serialize_pem(), true)?;
    write_atomic(&data_dir.join(ANCHOR_CERT), &anchor.pem(), false)?;
    write_atomic(&data_dir.join(ISSUER_CERT), &issuer.pem(), false)?;
    Ok((anchor, issuer))
}

/// A CA the user brings, validated and ready to copy into a data dir.
pub struct ImportedCa {
    pub anchor: Cert,
    pub issuer: Cert,
    issuer_key: KeyPair,
}

impl ImportedCa {
    /// Parses and validates the PEM texts: the issuer must be a CA signed by the anchor, the
    /// key must be the issuer's, and neither may be expired. Every problem, one per line.
    pub fn validate(anchor_pem: &[u8], issuer_pem: &[u8], issuer_key_pem: &str) -> Result<ImportedCa, String> {
        let first = |pem: &[u8], what: &str| -> Result<Cert, String> {
            parse_pem_certs(pem)
                .map_err(|e| format!("{what}: {e}"))?
                .into_iter()
                .next()
                .ok_or_else(|| format!("{what}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file"))
        };
        let anchor = first(anchor_pem, "trust anchor")?;
        let issuer = first(issuer_pem, "issuer")?;
        let issuer_key = parse_key(issuer_key_pem, "issuer key")?;
        validate_chain(&anchor, &issuer, Some(&issuer_key))?;
        Ok(ImportedCa { anchor, issuer, issuer_key })
    }

    /// Copies the CA into the data dir (key 0600), replacing any CA there. The anchor's key
    /// stays with the user, so issuer rotation needs a new import; anchor rotation still works
    /// (it creates a new anchor).
    pub fn write_into(&self, data_dir: &Path) -> Result<(), String> {
        remove_if_present(&data_dir.join(PREVIOUS_ANCHOR_CERT))?;
        remove_if_present(&data_dir.join(PREVIOUS_ISSUERS))?;
        // A key left from an earlier CA would not belong to the imported anchor.
        remove_if_present(&data_dir.join(ANCHOR_KEY))?;
        write_atomic(&data_dir.join(ISSUER_KEY), &self.issuer_key.serialize_pem(), true)?;
        write_atomic(&data_dir.join(ANCHOR_CERT), &self.anchor.pem(), false)?;
        write_atomic(&data_dir.join(ISSUER_CERT), &self.issuer.pem(), false)
    }
}

/// The chain as the data dir holds it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainStatus {
    /// The current trust anchor (the one the issuer is signed by).
    pub trust_anchor: CertSummary,
    pub issuer: CertSummary,
    pub issuer_signed_by_anchor: bool,
    /// Every anchor peers accept: the current one, then the previous one during an anchor
    /// rotation.
    pub trust_bundle: Vec<CertSummary>,
    /// The anchor being replaced (anchor rotation in progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_trust_anchor: Option<CertSummary>,
    /// Whether the anchor's key is in the data dir (not for an imported CA).
    pub anchor_key_in_data_dir: bool,
}

/// Reads and checks the chain in the data dir.
pub fn chain_status(data_dir: &Path) -> Result<ChainStatus, String> {
    let anchor = read_cert(&data_dir.join(ANCHOR_CERT))?;
    let issuer = read_cert(&data_dir.join(ISSUER_CERT))?;
    let previous = match data_dir.join(PREVIOUS_ANCHOR_CERT) {
        p if p.exists() => Some(read_cert(&p)?),
        _ => None,
    };
    let signed = issuer.signed_by(&anchor);
    let mut bundle = vec![anchor.summary_now()];
    bundle.extend(previous.iter().map(Cert::summary_now));
    Ok(ChainStatus {
        trust_anchor: anchor.summary_now(),
        issuer: issuer.summary_now(),
        issuer_signed_by_anchor: signed,
        trust_bundle: bundle,
        previous_trust_anchor: previous.map(|p| p.summary_now()),
        anchor_key_in_data_dir: data_dir.join(ANCHOR_KEY).exists(),
    })
}

// ----- mesh settings -----------------------------------------------------------------------

/// What MeshConfig `default` says about identities (defaults filled in).
#[derive(Debug, Clone, PartialEq)]
pub struct IdentitySettings {
    pub trust_domain: String,
    pub leaf_lifetime: Duration,
    pub issuer_lifetime: Duration,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        IdentitySettings {
            trust_domain: plexus_core::names::DEFAULT_TRUST_DOMAIN.into(),
            leaf_lifetime: DEFAULT_LEAF_LIFETIME,
            issuer_lifetime: DEFAULT_ISSUER_LIFETIME,
        }
    }
}

impl IdentitySettings {
    /// Reads MeshConfig `default` from the store (defaults when absent or unreadable).
    pub fn from_store(store: &dyn Store) -> IdentitySettings {
        let mut s = IdentitySettings::default();
        let Ok(configs) = store.list(Some(Kind::MeshConfig), None) else { return s };
        let Some(Spec::MeshConfig(m)) = configs.into_iter().find(|r| r.metadata.name == "default").map(|r| r.spec)
        else {
            return s;
        };
        if let Some(td) = m.trust_domain.filter(|t| !t.is_empty()) {
            s.trust_domain = td;
        }
        if let Some(c) = m.certificates {
            if let Some(l) = c.leaf_lifetime {
                s.leaf_lifetime = l.0;
            }
            if let Some(l) = c.issuer_lifetime {
                s.issuer_lifetime = l.0;
            }
        }
        s
    }
}

// ----- the running certificate authority ----------------------------------------------------

/// Where a proxy's certificate comes from, judged by its issuer's SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CertOrigin {
    /// The issuer signing now.
    Current,
    /// An earlier issuer under the current anchor (after an issuer rotation): still trusted.
    PreviousIssuer,
    /// An issuer under the anchor being rotated out.
    PreviousAnchor,
    /// Not an issuer of this CA.
    Unknown,
    /// The proxy reported no certificate.
    None,
}

/// The CA's state at one moment (replaced whole on rotation).
pub struct CaState {
    pub anchor: Cert,
    pub previous_anchor: Option<Cert>,
    pub issuer: Cert,
    pub previous_issuers: Vec<Cert>,
    signer: Arc<Issuer<'static, KeyPair>>,
}

impl CaState {
    /// The trust bundle: the current anchor, then the previous one during a rotation.
    pub fn bundle_pem(&self) -> String {
        let mut pem = self.anchor.pem();
        if let Some(p) = &self.previous_anchor {
            pem.push_str(&p.pem());
        }
        pem
    }

    pub fn origin(&self, issuer_sha256: &str) -> CertOrigin {
        let wanted = normalise_hex(issuer_sha256);
        if wanted.is_empty() {
            return CertOrigin::None;
        }
        if self.issuer.summary.sha256 == wanted {
            return CertOrigin::Current;
        }
        match self.previous_issuers.iter().find(|i| i.summary.sha256 == wanted) {
            Some(i) if i.signed_by(&self.anchor) => CertOrigin::PreviousIssuer,
            Some(i) if self.previous_anchor.as_ref().is_some_and(|a| i.signed_by(a)) => CertOrigin::PreviousAnchor,
            _ => CertOrigin::Unknown,
        }
    }
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Leaf then issuer, PEM.
    pub chain_pem: String,
    pub serial: String,
    pub not_after_unix: i64,
}

/// Why a rotation was refused.
#[derive(Debug)]
pub enum RotateError {
    /// Not possible in the current state (the message says why and what to do).
    Conflict(String),
    /// I/O or crypto failure.
    Failed(String),
}

/// What a rotation did (`POST /api/v1/identity/rotate`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotated {
    /// `issuer` or `anchor`.
    pub rotated: String,
    pub message: String,
    pub issuer: CertSummary,
    pub trust_bundle: Vec<CertSummary>,
}

/// The certificate authority the control plane signs with; shared by the Identity service,
/// the discovery streams (trust bundle) and the HTTP API (status, rotation).
pub struct Ca {
    data_dir: PathBuf,
    state: RwLock<Arc<CaState>>,
    bundle: watch::Sender<Arc<str>>,
    loaded_at: Instant,
    /// Serialises the operations that rewrite the data dir.
    writing: Mutex<()>,
}

impl Ca {
    /// Loads the CA from the data dir: the issuer must be signed by the anchor and its key must
    /// match. A rotation in progress (previous anchor present) continues.
    pub fn load(data_dir: &Path) -> Result<Ca, String> {
        let state = load_state(data_dir)?;
        let (bundle, _) = watch::channel(Arc::<str>::from(state.bundle_pem()));
        Ok(Ca {
            data_dir: data_dir.to_path_buf(),
            state: RwLock::new(Arc::new(state)),
            bundle,
            loaded_at: Instant::now(),
            writing: Mutex::new(()),
        })
    }

    pub fn state(&self) -> Arc<CaState> {
        self.state.read().map(|s| s.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    fn replace(&self, state: CaState) {
        let pem: Arc<str> = Arc::from(state.bundle_pem());
        match self.state.write() {
            Ok(mut s) => *s = Arc::new(state),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(state),
        }
        self.bundle.send_if_modified(|b| {
            if **b == *pem {
                false
            } else {
                *b = pem;
                true
            }
        });
    }

    /// The trust bundle (PEM), current anchor first.
    pub fn bundle_pem(&self) -> Arc<str> {
        self.bundle.borrow().clone()
    }

    /// Notified whenever the trust bundle changes.
    pub fn subscribe_bundle(&self) -> watch::Receiver<Arc<str>> {
        self.bundle.subscribe()
    }

    /// Signs a workload certificate for `public_key` whose only SAN is `spiffe_id`. The leaf
    /// never outlives the issuer.
    pub fn sign(
        &self,
        public_key: &impl PublicKeyData,
        spiffe_id: &str,
        lifetime: Duration,
    ) -> Result<Leaf, SignError> {
        self.sign_bootstrapped(public_key, spiffe_id, lifetime, None)
    }

    /// [`Ca::sign`], naming in the subject (OU `plexus-token:<id>`) the workload token the
    /// certificate descends from, so its renewals end when that token is revoked.
    pub fn sign_bootstrapped(
        &self,
        public_key: &impl PublicKeyData,
        spiffe_id: &str,
        lifetime: Duration,
        token_id: Option<&str>,
    ) -> Result<Leaf, SignError> {
        self.sign_with(public_key, spiffe_id, &[], lifetime, token_id)
    }

    /// The control plane's own serving certificate: its SPIFFE ID
    /// ([`plexus_core::names::control_plane_spiffe_id`]) plus the IP addresses and DNS names it
    /// listens on. The chain returned is leaf, issuer, trust anchor (a proxy pinning the
    /// anchor's fingerprint finds it in the handshake).
    pub fn sign_control_plane(
        &self,
        public_key: &impl PublicKeyData,
        spiffe_id: &str,
        ips: &[std::net::IpAddr],
        dns: &[&str],
        lifetime: Duration,
    ) -> Result<Leaf, SignError> {
        let mut extra: Vec<SanType> = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        for name in dns {
            extra.push(SanType::DnsName(
                (*name).try_into().map_err(|e| SignError::Invalid(format!("DNS name {name:?}: {e}")))?,
            ));
        }
        let mut leaf = self.sign_with(public_key, spiffe_id, &extra, lifetime, None)?;
        leaf.chain_pem.push_str(&self.state().anchor.pem());
        Ok(leaf)
    }

    fn sign_with(
        &self,
        public_key: &impl PublicKeyData,
        spiffe_id: &str,
        extra_sans: &[SanType],
        lifetime: Duration,
        token_id: Option<&str>,
    ) -> Result<Leaf, SignError> {
        let state = self.state();
        let issuer_end = state.issuer.summary.not_after_unix;
        if issuer_end <= unix_now() {
            return Err(SignError::IssuerExpired(state.issuer.summary.not_after.clone()));
        }
        let mut p = CertificateParams::default();
        // The identity is the SPIFFE URI SAN (marked critical by rcgen); the subject holds at
        // most the token the certificate descends from.
        p.distinguished_name = DistinguishedName::new();
        if let Some(id) = token_id {
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, format!("{}{id}", crate::tokens::CERT_TOKEN_OU_PREFIX));
        }
        p.subject_alt_names = vec![SanType::URI(
            spiffe_id.try_into().map_err(|e| SignError::Invalid(format!("SPIFFE ID {spiffe_id:?}: {e}")))?,
        )];
        p.subject_alt_names.extend(extra_sans.iter().cloned());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(random_serial());
        let now = SystemTime::now();
        p.not_before = (now - BACKDATE).into();
        let end = (now + lifetime).min(SystemTime::UNIX_EPOCH + Duration::from_secs(issuer_end.max(0) as u64));
        p.not_after = end.into();
        let cert = p.signed_by(public_key, &state.signer).map_err(|e| SignError::Failed(e.to_string()))?;
        let leaf = Cert::from_der(cert.der().to_vec()).map_err(SignError::Failed)?;
        Ok(Leaf {
            chain_pem: format!("{}{}", leaf.pem(), state.issuer.pem()),
            serial: leaf.summary.serial,
            not_after_unix: leaf.summary.not_after_unix,
        })
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces the issuer (new key and certificate under the same anchor; leaves of the old
    /// one keep verifying), or with `anchor` starts an anchor rotation (new anchor and issuer;
    /// the bundle holds both anchors until every proxy moved to the new issuer).
    pub fn rotate(&self, anchor: bool, settings: &IdentitySettings) -> Result<Rotated, RotateError> {
        let _guard = self.lock_writes();
        let old = self.state();
        let dir = &self.data_dir;
        let failed = RotateError::Failed;
        let mut previous_issuers: Vec<Cert> =
            old.previous_issuers.iter().filter(|c| c.summary.not_after_unix > unix_now()).cloned().collect();
        previous_issuers.push(old.issuer.clone());
        let previous_issuers_pem: String = previous_issuers.iter().map(Cert::pem).collect();
        let (new_anchor_cert, previous_anchor, anchor_key) = if anchor {
            if let Some(p) = &old.previous_anchor {
                return Err(RotateError::Conflict(format!(
                    "an anchor rotation is already in progress (the previous anchor {} is still in the trust bundle); it finishes once every connected proxy has a certificate from the new issuer (see `plexus identity show`)",
                    p.summary.serial
                )));
            }
            let (key, cert) = new_anchor(&settings.trust_domain).map_err(failed)?;
            (cert, Some(old.anchor.clone()), key)
        } else {
            let path = dir.join(ANCHOR_KEY);
            if !path.exists() {
                return Err(RotateError::Conflict(format!(
                    "the trust anchor's key is not in {} (the CA was imported and its anchor key kept elsewhere): import a new issuer with `plexus identity init --force --anchor-cert ... --issuer-cert ... --issuer-key ...` and restart the control plane, or rotate the anchor too with `plexus identity rotate --anchor`",
                    dir.display()
                )));
            }
            let key = read_key(&path).map_err(failed)?;
            (old.anchor.clone(), old.previous_anchor.clone(), key)
        };
        let (issuer_key, issuer) =
            new_issuer(&new_anchor_cert, &anchor_key, &settings.trust_domain, settings.issuer_lifetime)
                .map_err(failed)?;
        let signer = Issuer::from_ca_cert_der(&issuer.der.clone().into(), issuer_key)
            .map_err(|e| RotateError::Failed(format!("cannot use the new issuer: {e}")))?;
        // Order: what a restart needs to continue comes first (previous anchor and issuers),
        // then the new anchor, then the issuer key and certificate.
        write_atomic(&dir.join(PREVIOUS_ISSUERS), &previous_issuers_pem, false).map_err(failed)?;
        if anchor {
            write_atomic(&dir.join(PREVIOUS_ANCHOR_CERT), &old.anchor.pem(), false).map_err(failed)?;
            write_atomic(&dir.join(ANCHOR_KEY), &anchor_key.serialize_pem(), true).map_err(failed)?;
            write_atomic(&dir.join(ANCHOR_CERT), &new_anchor_cert.pem(), false).map_err(failed)?;
        }
        write_atomic(&dir.join(ISSUER_KEY), &signer.key().serialize_pem(), true).map_err(failed)?;
        write_atomic(&dir.join(ISSUER_CERT), &issuer.pem(), false).map_err(failed)?;
        let state = CaState {
            anchor: new_anchor_cert,
            previous_anchor,
            issuer: issuer.clone(),
            previous_issuers,
            signer: Arc::new(signer),
        };
        let bundle: Vec<CertSummary> =
            std::iter::once(&state.anchor).chain(&state.previous_anchor).map(Cert::summary_now).collect();
        self.replace(state);
        let message = if anchor {
            tracing::info!(issuer = %issuer.summary.serial, "trust anchor rotation started: the bundle holds the new and the old anchor");
            "trust anchor rotation started: the trust bundle now holds the new and the old anchor and is pushed to every proxy; proxies re-certify with the new issuer, and the old anchor leaves the bundle once every connected proxy has (see `plexus identity show`)".to_string()
        } else {
            tracing::info!(issuer = %issuer.summary.serial, "issuer rotated");
            format!(
                "issuer rotated: new issuer {} under the same trust anchor; certificates from the old issuer stay valid until they expire, and proxies move to the new one at their next renewal",
                issuer.summary.serial
            )
        };
        Ok(Rotated {
            rotated: if anchor { "anchor" } else { "issuer" }.into(),
            message,
            issuer: issuer.summary_now(),
            trust_bundle: bundle,
        })
    }

    /// Finishes an anchor rotation once nothing needs the old anchor: the control plane has run
    /// for `settle` (the registration TTL, [`ROTATION_SETTLE`] by default) and every connected
    /// proxy holds a certificate from an issuer under the new anchor. Returns whether it
    /// finished now.
    pub fn finish_anchor_rotation_if_done(&self, proxies: &[ProxyStatus], settle: Duration) -> Result<bool, String> {
        if self.state().previous_anchor.is_none() || self.loaded_at.elapsed() < settle {
            return Ok(false);
        }
        let _guard = self.lock_writes();
        let old = self.state();
        let Some(previous) = &old.previous_anchor else { return Ok(false) };
        let waiting = proxies
            .iter()
            .filter(|p| {
                let issuer = p.certificate.as_ref().map(|c| c.issuer_sha256.as_str()).unwrap_or("");
                !matches!(old.origin(issuer), CertOrigin::Current | CertOrigin::PreviousIssuer)
            })
            .count();
        if waiting > 0 {
            return Ok(false);
        }
        let previous_issuers: Vec<Cert> = old
            .previous_issuers
            .iter()
            .filter(|c| c.summary.not_after_unix > unix_now() && c.signed_by(&old.anchor))
            .cloned()
            .collect();
        let pem: String = previous_issuers.iter().map(Cert::pem).collect();
        write_atomic(&self.data_dir.join(PREVIOUS_ISSUERS), &pem, false)?;
        remove_if_present(&self.data_dir.join(PREVIOUS_ANCHOR_CERT))?;
        tracing::info!(
            previous_anchor = %previous.summary.serial,
            proxies = proxies.len(),
            "trust anchor rotation finished: every proxy has a certificate from the new issuer; the old anchor left the bundle"
        );
        self.replace(CaState {
            anchor: old.anchor.clone(),
            previous_anchor: None,
            issuer: old.issuer.clone(),
            previous_issuers,
            signer: old.signer.clone(),
        });
        Ok(true)
    }

    /// The CA's state for `/api/v1/identity`: the chain in the data dir plus what the control
    /// plane uses, the rotation in progress and each connected proxy's certificate.
    pub fn status(&self, settings: &IdentitySettings, proxies: Vec<ProxyStatus>) -> Result<IdentityStatus, String> {
        // The chain in the data dir and the state in use, read under the writers' lock: a
        // rotation finishing between the two reads would otherwise report no rotation in
        // progress beside a bundle that still holds the old anchor.
        let (chain, state) = {
            let _guard = self.lock_writes();
            (chain_status(&self.data_dir)?, self.state())
        };
        let now = unix_now();
        let proxies: Vec<ProxyCertStatus> = proxies
            .into_iter()
            .map(|p| {
                let cert = p.certificate.unwrap_or_default();
                let origin = state.origin(&cert.issuer_sha256);
                ProxyCertStatus {
                    id: p.record.id,
                    workload: p.record.workload,
                    namespace: p.record.namespace,
                    service: p.record.service,
                    mode: p.record.mode,
                    connected_seconds: p.connected_seconds,
                    spiffe_id: cert.spiffe_id,
                    serial: cert.serial,
                    not_after: (cert.not_after_unix > 0).then(|| rfc3339_unix(cert.not_after_unix)),
                    not_after_unix: cert.not_after_unix,
                    expires_in_seconds: (cert.not_after_unix > 0).then(|| cert.not_after_unix - now),
                    issuer_sha256: normalise_hex(&cert.issuer_sha256),
                    issued_by: origin,
                }
            })
            .collect();
        let rotation = state.previous_anchor.as_ref().map(|previous| {
            let count = |f: &dyn Fn(CertOrigin) -> bool| proxies.iter().filter(|p| f(p.issued_by)).count();
            RotationStatus {
                kind: "anchor".into(),
                since: rfc3339_unix(state.anchor.summary.not_before_unix + BACKDATE.as_secs() as i64),
                previous_trust_anchor: previous.summary_now(),
                proxies_on_new_issuer: count(&|o| matches!(o, CertOrigin::Current | CertOrigin::PreviousIssuer)),
                proxies_on_old_issuer: count(&|o| !matches!(o, CertOrigin::Current | CertOrigin::PreviousIssuer)),
            }
        });
        Ok(IdentityStatus {
            chain,
            issuer_in_use_sha256: state.issuer.summary.sha256.clone(),
            trust_domain: settings.trust_domain.clone(),
            leaf_lifetime: plexus_core::duration::format(settings.leaf_lifetime),
            rotation,
            proxies,
            control_plane: None,
        })
    }
}

fn load_state(dir: &Path) -> Result<CaState, String> {
    let anchor = read_cert(&dir.join(ANCHOR_CERT))?;
    let issuer = read_cert(&dir.join(ISSUER_CERT))?;
    let key = read_key(&dir.join(ISSUER_KEY))?;
    let previous_anchor = match dir.join(PREVIOUS_ANCHOR_CERT) {
        p if p.exists() => Some(read_cert(&p)?),
        _ => None,
    };
    if !issuer.signed_by(&anchor) {
        return Err(format!(
            "{}: the issuer is not signed by the trust anchor in {}; restore the matching pair or run `plexus identity init --force`",
            dir.join(ISSUER_CERT).display(),
            dir.join(ANCHOR_CERT).display()
        ));
    }
    let matches = parse(&issuer.der).is_ok_and(|c| c.public_key().subject_public_key.data.as_ref() == key.der_bytes());
    if !matches {
        return Err(format!(
            "{} does not belong to {}; restore the matching pair or run `plexus identity init --force`",
            dir.join(ISSUER_KEY).display(),
            dir.join(ISSUER_CERT).display()
        ));
    }
    let previous_issuers = match dir.join(PREVIOUS_ISSUERS) {
        p if p.exists() => read_certs(&p)?
            .into_iter()
            .filter(|c| c.signed_by(&anchor) || previous_anchor.as_ref().is_some_and(|a| c.signed_by(a)))
            .collect(),
        _ => Vec::new(),
    };
    if issuer.summary.not_after_unix <= unix_now() {
        tracing::error!(not_after = %issuer.summary.not_after, "the issuer has expired: no workload certificate can be signed until it is rotated (plexus identity rotate)");
    }
    let signer = Issuer::from_ca_cert_der(&issuer.der.clone().into(), key)
        .map_err(|e| format!("{}: {e}", dir.join(ISSUER_CERT).display()))?;
    Ok(CaState { anchor, previous_anchor, issuer, previous_issuers, signer: Arc::new(signer) })
}

/// Why a certificate was not signed.
#[derive(Debug)]
pub enum SignError {
    IssuerExpired(String),
    Invalid(String),
    Failed(String),
}

/// `/api/v1/identity`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityStatus {
    /// The chain as the data dir holds it.
    #[serde(flatten)]
    pub chain: ChainStatus,
    /// SHA-256 of the issuer the control plane signs with (differs from `issuer.sha256` when
    /// the data dir was changed under a running control plane: restart it).
    pub issuer_in_use_sha256: String,
    pub trust_domain: String,
    pub leaf_lifetime: String,
    /// The anchor rotation in progress, if any.
    pub rotation: Option<RotationStatus>,
    pub proxies: Vec<ProxyCertStatus>,
    /// The control plane's own serving certificate (filled in by the API).
    pub control_plane: Option<crate::grpc_tls::ServingCertificate>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    pub kind: String,
    /// When the new anchor was made (RFC 3339).
    pub since: String,
    pub previous_trust_anchor: CertSummary,
    pub proxies_on_new_issuer: usize,
    /// Connected proxies without a certificate from an issuer under the new anchor.
    pub proxies_on_old_issuer: usize,
}

/// One connected proxy's certificate as it reported it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyCertStatus {
    pub id: u64,
    pub workload: String,
    pub namespace: String,
    pub service: String,
    pub mode: String,
    pub connected_seconds: u64,
    pub spiffe_id: String,
    pub serial: String,
    pub not_after: Option<String>,
    pub not_after_unix: i64,
    pub expires_in_seconds: Option<i64>,
    pub issuer_sha256: String,
    pub issued_by: CertOrigin,
}

/// Finishes anchor rotations when their time comes (checked every second, or more often with a
/// registration TTL under 4 s).
pub async fn maintain_rotation(ca: Arc<Ca>, proxies: Arc<Proxies>) {
    let settle = proxies.ttl();
    let mut tick = tokio::time::interval(crate::discovery::check_interval(settle));
    loop {
        tick.tick().await;
        if ca.state().previous_anchor.is_none() {
            continue;
        }
        let (ca, list) = (ca.clone(), proxies.statuses());
        match tokio::task::spawn_blocking(move || ca.finish_anchor_rotation_if_done(&list, settle)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot finish the trust anchor rotation"),
            Err(e) => tracing::error!(error = %e, "trust anchor rotation check failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxies::{ProxyCertificate, ProxyRecord};

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("plexus-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn creates_a_valid_chain_once_with_private_keys() {
        let dir = temp_dir("create");
        assert_eq!(ensure_ca(&dir, "plexus.local"), Ok(true));
        assert_eq!(ensure_ca(&dir, "plexus.local"), Ok(false), "kept on the next start");
        let status = chain_status(&dir).expect("chain");
        assert!(status.issuer_signed_by_anchor);
        assert!(status.trust_anchor.is_ca && status.issuer.is_ca);
        assert!(status.issuer.expires_in_seconds > 300 * 86_400);
        assert!(status.trust_anchor.subject.contains("Plexus trust anchor plexus.local"));
        assert_eq!(status.trust_bundle.len(), 1);
        use std::os::unix::fs::PermissionsExt as _;
        for key in [ISSUER_KEY, ANCHOR_KEY] {
            let mode = std::fs::metadata(dir.join(key)).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        std::fs::remove_file(dir.join(ISSUER_KEY)).expect("rm");
        assert!(ensure_ca(&dir, "plexus.local").is_err(), "a partial CA is refused");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn base64_matches_the_standard_vectors() {
        for (input, expected) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE=")]
        {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn pem_round_trips() {
        let (_, anchor) = new_anchor("plexus.local").expect("anchor");
        let parsed = parse_pem_certs(anchor.pem().as_bytes()).expect("parse");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].der, anchor.der);
    }

    #[test]
    fn validation_names_every_problem() {
        let (anchor_key, anchor) = new_anchor("a").expect("anchor");
        let (issuer_key, issuer) = new_issuer(&anchor, &anchor_key, "a", DEFAULT_ISSUER_LIFETIME).expect("issuer");
        assert_eq!(validate_chain(&anchor, &issuer, Some(&issuer_key)), Ok(()));
        let (_, other_anchor) = new_anchor("b").expect("anchor");
        let err = validate_chain(&other_anchor, &issuer, Some(&anchor_key)).expect_err("mismatch");
        assert!(err.contains("not signed by the trust anchor"), "{err}");
        assert!(err.contains("does not belong to the issuer certificate"), "{err}");

        // Expired, and not a CA.
        let mut params = ca_params("issuer", "a", DEFAULT_ISSUER_LIFETIME, Some(0));
        params.not_before = (SystemTime::now() - Duration::from_secs(7200)).into();
        params.not_after = (SystemTime::now() - Duration::from_secs(3600)).into();
        params.is_ca = IsCa::ExplicitNoCa;
        let signer = Issuer::from_ca_cert_der(&anchor.der.clone().into(), &anchor_key).expect("signer");
        let expired =
            Cert::from_der(params.signed_by(&issuer_key, &signer).expect("sign").der().to_vec()).expect("cert");
        let err = validate_chain(&anchor, &expired, Some(&issuer_key)).expect_err("expired");
        assert!(err.contains("the issuer expired on"), "{err}");
        assert!(err.contains("the issuer is not a CA certificate"), "{err}");
    }

    #[test]
    fn leaves_carry_only_the_spiffe_id_and_client_and_server_usages() {
        let dir = temp_dir("leaf");
        ensure_ca(&dir, "plexus.local").expect("ca");
        let ca = Ca::load(&dir).expect("load");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let id = "spiffe://plexus.local/ns/default/sa/reviews";
        let leaf = ca.sign(&key, id, Duration::from_secs(3600)).expect("sign");
        let certs = parse_pem_certs(leaf.chain_pem.as_bytes()).expect("chain");
        assert_eq!(certs.len(), 2, "leaf then issuer");
        assert_eq!(certs[1].der, ca.state().issuer.der);
        assert!(certs[0].signed_by(&certs[1]));
        let parsed = parse(&certs[0].der).expect("parse");
        assert!(!parsed.is_ca());
        let san = parsed.subject_alternative_name().expect("san").expect("present");
        assert!(san.critical, "empty subject: the SAN is critical");
        assert_eq!(san.value.general_names, vec![x509_parser::extensions::GeneralName::URI(id)], "exactly one URI SAN");
        let eku = parsed.extended_key_usage().expect("eku").expect("present").value;
        assert!(eku.server_auth && eku.client_auth && !eku.any);
        let ku = parsed.key_usage().expect("ku").expect("present").value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let now = unix_now();
        assert!((leaf.not_after_unix - now - 3600).abs() <= 5, "lifetime");
        assert!((now - certs[0].summary.not_before_unix - 60).abs() <= 5, "backdated a minute");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn proxy(issuer_sha256: &str) -> ProxyStatus {
        ProxyStatus {
            record: ProxyRecord {
                identity: String::new(),
                id: 1,
                workload: "w".into(),
                namespace: "default".into(),
                service: "s".into(),
                version: String::new(),
                mode: "sidecar".into(),
                admin_address: String::new(),
                sent_revision: 0,
                applied_revision: 0,
                last_seen: None,
                registered: None,
            },
            certificate: (!issuer_sha256.is_empty()).then(|| ProxyCertificate {
                serial: "01".into(),
                issuer_sha256: issuer_sha256.into(),
                not_after_unix: unix_now() + 3600,
                spiffe_id: "spiffe://plexus.local/ns/default/sa/w".into(),
            }),
            connected_seconds: 30,
        }
    }

    #[test]
    fn rotations_keep_old_leaves_verifiable_and_anchor_rotation_waits_for_proxies() {
        let dir = temp_dir("rotate");
        ensure_ca(&dir, "plexus.local").expect("ca");
        let mut ca = Ca::load(&dir).expect("load");
        let settings = IdentitySettings::default();
        let first_issuer = ca.state().issuer.clone();
        let first_anchor = ca.state().anchor.clone();

        // Issuer rotation: same anchor, the old issuer is remembered.
        let r = ca.rotate(false, &settings).expect("rotate issuer");
        assert_eq!(r.rotated, "issuer");
        let s = ca.state();
        assert_ne!(s.issuer.der, first_issuer.der);
        assert_eq!(s.anchor.der, first_anchor.der);
        assert!(s.issuer.signed_by(&first_anchor));
        assert_eq!(s.origin(&first_issuer.summary.sha256), CertOrigin::PreviousIssuer);
        assert_eq!(s.origin(&s.issuer.summary.sha256.to_uppercase()), CertOrigin::Current);
        assert_eq!(s.origin("00"), CertOrigin::Unknown);
        assert_eq!(s.origin(""), CertOrigin::None);

        // Anchor rotation: two anchors until every proxy moved.
        let bundle = ca.subscribe_bundle();
        let old_issuer = s.issuer.clone();
        ca.rotate(true, &settings).expect("rotate anchor");
        assert!(bundle.has_changed().expect("bundle"));
        let s = ca.state();
        assert_eq!(parse_pem_certs(ca.bundle_pem().as_bytes()).expect("bundle").len(), 2);
        assert_eq!(s.origin(&old_issuer.summary.sha256), CertOrigin::PreviousAnchor);
        assert!(dir.join(PREVIOUS_ANCHOR_CERT).exists());
        assert!(matches!(ca.rotate(true, &settings), Err(RotateError::Conflict(_))), "one anchor rotation at a time");

        // A restart in the middle continues the rotation.
        let reloaded = Ca::load(&dir).expect("reload");
        assert_eq!(reloaded.state().previous_anchor.as_ref().map(|a| &a.der), Some(&first_anchor.der));
        assert_eq!(reloaded.state().origin(&old_issuer.summary.sha256), CertOrigin::PreviousAnchor);

        ca.loaded_at = Instant::now() - ROTATION_SETTLE;
        let on_old = [proxy(&old_issuer.summary.sha256)];
        assert_eq!(ca.finish_anchor_rotation_if_done(&on_old, ROTATION_SETTLE), Ok(false));
        assert_eq!(
            ca.finish_anchor_rotation_if_done(&[proxy("")], ROTATION_SETTLE),
            Ok(false),
            "a proxy without a certificate"
        );
        let on_new = [proxy(&s.issuer.summary.sha256)];
        assert_eq!(ca.finish_anchor_rotation_if_done(&on_new, ROTATION_SETTLE), Ok(true));
        assert_eq!(parse_pem_certs(ca.bundle_pem().as_bytes()).expect("bundle").len(), 1);
        assert!(!dir.join(PREVIOUS_ANCHOR_CERT).exists());
        assert_eq!(ca.state().origin(&old_issuer.summary.sha256), CertOrigin::Unknown);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_restarted_control_plane_waits_before_finishing_a_rotation() {
        let dir = temp_dir("settle");
        ensure_ca(&dir, "plexus.local").expect("ca");
        let ca = Ca::load(&dir).expect("load");
        ca.rotate(true, &IdentitySettings::default()).expect("rotate");
        assert_eq!(ca.finish_anchor_rotation_if_done(&[], ROTATION_SETTLE), Ok(false), "no proxy has reconnected yet");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
