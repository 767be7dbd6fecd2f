//! The certificates a gateway's HTTPS listeners present: read from a [`CertificateSource`]
//! (universal mode: PEM files under `--tls-dir`; Kubernetes: `kubernetes.io/tls` Secrets,
//! `plexus_k8s::secrets`),
//! re-read when they change, chosen per connection by TLS server name.
//!
//! A certificate that changes is swapped in for new handshakes only (open connections keep
//! theirs); one that becomes unreadable or invalid keeps the last good one and says why (log,
//! `/config`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use plexus_core::gateway::CertificateName;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::Serialize;

/// Certificates expiring within this many days are reported.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// A certificate chain and its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemPair {
    pub chain: Vec<u8>,
    pub key: Vec<u8>,
}

/// Where certificates come from.
pub trait CertificateSource: Send + Sync + std::fmt::Debug {
    /// The certificates in use now (called before each refresh reads them): a source that
    /// watches its certificates starts and stops watches here.
    fn want(&self, _names: &BTreeSet<CertificateName>) {}
    /// Reads `name`'s chain and key.
    fn read(&self, name: &CertificateName) -> Result<PemPair, String>;
    /// Where `name` is read from, for messages.
    fn location(&self, name: &CertificateName) -> String;
}

/// Universal mode: `<dir>/<namespace>/<name>/tls.crt` and `tls.key`.
#[derive(Debug)]
pub struct FileCertificates {
    pub dir: PathBuf,
}

impl FileCertificates {
    fn path(&self, name: &CertificateName) -> PathBuf {
        self.dir.join(&name.namespace).join(&name.name)
    }
}

impl CertificateSource for FileCertificates {
    fn read(&self, name: &CertificateName) -> Result<PemPair, String> {
        let dir = self.path(name);
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        Ok(PemPair { chain: read("tls.crt")?, key: read("tls.key")? })
    }

    fn location(&self, name: &CertificateName) -> String {
        self.path(name).display().to_string()
    }
}

/// What is known about one certificate (admin `/config`, status).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    pub name: String,
    pub location: String,
    /// Whether a certificate is being served.
    pub loaded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
    /// Why the files are not (or no longer) what is served: missing, invalid, or the key does
    /// not match; or a warning that the certificate expires within 30 days.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

struct Entry {
    pem: Option<PemPair>,
    key: Option<Arc<CertifiedKey>>,
    status: CertificateStatus,
}

/// The loaded certificates, swapped as a whole.
pub struct CertificateStore {
    source: Arc<dyn CertificateSource>,
    provider: Arc<CryptoProvider>,
    entries: ArcSwap<BTreeMap<CertificateName, Arc<Entry>>>,
}

impl CertificateStore {
    pub fn new(source: Arc<dyn CertificateSource>) -> CertificateStore {
        CertificateStore { source, provider: crate::tls::provider(), entries: ArcSwap::from_pointee(BTreeMap::new()) }
    }

    /// The key to present for `name`, if one is loaded.
    pub fn key(&self, name: &CertificateName) -> Option<Arc<CertifiedKey>> {
        self.entries.load().get(name).and_then(|e| e.key.clone())
    }

    /// The state of every certificate in use.
    pub fn statuses(&self) -> Vec<CertificateStatus> {
        self.entries.load().values().map(|e| e.status.clone()).collect()
    }

    /// Reads `wanted` (dropping the others); an unchanged file is not parsed again, a bad new
    /// one keeps the previous key.
    pub fn refresh(&self, wanted: &BTreeSet<CertificateName>, now_unix: i64) {
        self.source.want(wanted);
        let old = self.entries.load_full();
        let mut next = BTreeMap::new();
        let mut changed = old.len() != wanted.len();
        for name in wanted {
            let previous = old.get(name);
            let read = self.source.read(name);
            if let (Some(p), Ok(pem)) = (previous, &read)
                && p.pem.as_ref() == Some(pem)
            {
                let mut entry = Entry { pem: p.pem.clone(), key: p.key.clone(), status: p.status.clone() };
                entry.status.problem = expiry_problem(entry.status.not_after, now_unix);
                changed |= entry.status.problem != p.status.problem;
                next.insert(name.clone(), Arc::new(entry));
                continue;
            }
            changed = true;
            let location = self.source.location(name);
            let entry = match read.and_then(|pem| self.parse(&pem).map(|(key, status)| (pem, key, status))) {
                Ok((pem, key, mut status)) => {
                    status.name = name.to_string();
                    status.location = location;
                    status.problem = expiry_problem(status.not_after, now_unix);
                    if previous.is_some() {
                        tracing::info!(certificate = %name, "certificate reloaded");
                    }
                    Entry { pem: Some(pem), key: Some(key), status }
                }
                Err(problem) => {
                    let same = previous.is_some_and(|p| p.status.problem.as_deref() == Some(problem.as_str()));
                    if !same {
                        tracing::warn!(certificate = %name, %problem, kept_previous = previous.is_some_and(|p| p.key.is_some()), "certificate cannot be loaded");
                    }
                    match previous {
                        // Keep serving the last good certificate; remember the bad files so
                        // they are not parsed again until they change.
                        Some(p) => {
                            let mut status = p.status.clone();
                            status.problem = Some(problem);
                            Entry { pem: None, key: p.key.clone(), status }
                        }
                        None => Entry {
                            pem: None,
                            key: None,
                            status: CertificateStatus {
                                name: name.to_string(),
                                location,
                                problem: Some(problem),
                                ..CertificateStatus::default()
                            },
                        },
                    }
                }
            };
            next.insert(name.clone(), Arc::new(entry));
        }
        if changed {
            self.entries.store(Arc::new(next));
        }
    }

    fn parse(&self, pem: &PemPair) -> Result<(Arc<CertifiedKey>, CertificateStatus), String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem.chain)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("tls.crt is not PEM: {e}"))?;
        let Some(leaf) = chain.first() else { return Err("tls.crt holds no certificate".into()) };
        let key =
            PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| format!("tls.key is not a PEM private key: {e}"))?;
        let signing = self.provider.key_provider.load_private_key(key).map_err(|e| format!("tls.key: {e}"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| format!("tls.crt is not an X.509 certificate: {e}"))?;
        let certified = CertifiedKey::new(chain.clone(), signing);
        certified.keys_match().map_err(|_| "tls.key does not match the certificate in tls.crt".to_string())?;
        let dns_names = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let status = CertificateStatus {
            loaded: true,
            subject: Some(cert.subject().to_string()),
            dns_names,
            not_after: Some(cert.validity().not_after.timestamp()),
            ..CertificateStatus::default()
        };
        Ok((Arc::new(certified), status))
    }
}

fn expiry_problem(not_after: Option<i64>, now_unix: i64) -> Option<String> {
    let not_after = not_after?;
    let days = (not_after - now_unix).div_euclid(86_400);
    if not_after <= now_unix {
        Some("the certificate has expired".into())
    } else if days < EXPIRY_WARNING_DAYS {
        Some(format!("the certificate expires in {days} days"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Files = Arc<Mutex<BTreeMap<String, PemPair>>>;

    #[derive(Debug)]
    struct Fake(Files);

    impl CertificateSource for Fake {
        fn read(&self, name: &CertificateName) -> Result<PemPair, String> {
            self.0.lock().expect("lock").get(&name.name).cloned().ok_or_else(|| "missing".to_string())
        }
        fn location(&self, name: &CertificateName) -> String {
            name.to_string()
        }
    }

    fn pair(host: &str) -> PemPair {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let cert = params.self_signed(&key).expect("cert");
        PemPair { chain: cert.pem().into_bytes(), key: key.serialize_pem().into_bytes() }
    }

    #[test]
    fn a_bad_replacement_keeps_the_last_good_certificate() {
        let name = CertificateName { namespace: "default".into(), name: "a".into() };
        let files: Files = Arc::new(Mutex::new(BTreeMap::from([("a".to_string(), pair("a.example.com"))])));
        let store = CertificateStore::new(Arc::new(Fake(files.clone())));
        let wanted = BTreeSet::from([name.clone()]);
        let now = 1_577_836_800; // 2020-01-01
        store.refresh(&wanted, now);
        let first = store.key(&name).expect("loaded");
        assert_eq!(store.statuses()[0].dns_names, ["a.example.com"]);
        assert!(store.statuses()[0].problem.is_none());
        store.refresh(&wanted, now);
        assert!(Arc::ptr_eq(&first, &store.key(&name).expect("kept")), "unchanged files are not parsed again");
        // Garbage, a key of another certificate, then no files: the old key stays, each
        // problem is reported.
        let set = |p: PemPair| files.lock().expect("lock").insert("a".into(), p);
        set(PemPair { chain: b"garbage".to_vec(), key: b"garbage".to_vec() });
        store.refresh(&wanted, now);
        assert!(Arc::ptr_eq(&first, &store.key(&name).expect("kept")));
        assert!(
            store.statuses()[0].problem.as_deref().is_some_and(|p| p.contains("tls.crt")),
            "{:?}",
            store.statuses()
        );
        let (b, c) = (pair("b.example.com"), pair("c.example.com"));
        set(PemPair { chain: b.chain, key: c.key });
        store.refresh(&wanted, now);
        assert!(Arc::ptr_eq(&first, &store.key(&name).expect("kept")));
        assert!(store.statuses()[0].problem.as_deref().is_some_and(|p| p.contains("does not match")));
        files.lock().expect("lock").clear();
        store.refresh(&wanted, now);
        assert!(Arc::ptr_eq(&first, &store.key(&name).expect("kept")));
        assert_eq!(store.statuses()[0].problem.as_deref(), Some("missing"));
        // A good new one is served.
        set(pair("new.example.com"));
        store.refresh(&wanted, now);
        assert!(!Arc::ptr_eq(&first, &store.key(&name).expect("new")));
        assert_eq!(store.statuses()[0].dns_names, ["new.example.com"]);
        assert!(store.statuses()[0].problem.is_none());
        // Never loaded: no key, the problem said.
        let other = CertificateName { namespace: "default".into(), name: "nope".into() };
        store.refresh(&BTreeSet::from([other.clone()]), now);
        assert!(store.key(&other).is_none());
        assert!(store.key(&name).is_none(), "no longer wanted");
    }

    #[test]
    fn expiry_is_reported_within_thirty_days() {
        assert_eq!(expiry_problem(Some(100 * 86_400), 0), None);
        assert_eq!(expiry_problem(Some(10 * 86_400), 0).as_deref(), Some("the certificate expires in 10 days"));
        assert_eq!(expiry_problem(Some(0), 10).as_deref(), Some("the certificate has expired"));
    }
}
