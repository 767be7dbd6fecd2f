//! The gRPC `Identity` service: signs workload certificates.
//!
//! A proxy sends a PKCS#10 CSR with its workload token ([`crate::tokens`]). The certificate is
//! for the token's identity only: a request naming another namespace or service account is
//! refused (PERMISSION_DENIED, naming the token's identity). The control plane takes only the
//! public key from the CSR (after checking the CSR's signature: the requester holds the key) and
//! decides everything else: the only SAN is `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, the
//! subject names the token (so revoking it ends renewals), keyUsage digitalSignature +
//! keyEncipherment, extendedKeyUsage serverAuth + clientAuth, not a CA, a random serial, valid
//! from a minute ago for MeshConfig `certificates.leafLifetime` (24h).
//!
//! Signing is rate limited for the whole control plane (a token bucket, 50/s with bursts of
//! 100) so a misbehaving fleet cannot monopolise it; the token is checked first so that
//! requests without a valid one cannot use up the budget.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plexus_api::identity::identity_server::Identity;
use plexus_api::identity::{CertifyRequest, CertifyResponse};
use tonic::{Request, Response, Status};

use crate::identity::{Ca, IdentitySettings, SignError};
use crate::store::Store;

/// Signing rate for the whole control plane.
pub const RATE_PER_SECOND: f64 = 50.0;
/// Requests accepted at once above the rate.
pub const BURST: f64 = 100.0;

/// FOR TESTS ONLY: an environment variable of `plexus control` that overrides the workload
/// certificate lifetime (a duration such as `6s`). MeshConfig validation keeps
/// `certificates.leafLifetime` at 10m or more, which would make renewal at half-life, and
/// rotations under load, take far too long to test end to end. Never set it in production.
pub const TEST_LEAF_LIFETIME_ENV: &str = "PLEXUS_TEST_LEAF_LIFETIME";

/// The [`TEST_LEAF_LIFETIME_ENV`] override, when set to a valid duration (logged loudly).
fn test_leaf_lifetime() -> Option<Duration> {
    let text = std::env::var(TEST_LEAF_LIFETIME_ENV).ok()?;
    match plexus_core::duration::parse(text.trim()) {
        Ok(d) if !d.is_zero() => {
            tracing::warn!(lifetime = %text, "{TEST_LEAF_LIFETIME_ENV} is set: workload certificates get this lifetime (for tests only)");
            Some(d)
        }
        _ => {
            tracing::warn!(value = %text, "ignoring {TEST_LEAF_LIFETIME_ENV}: not a positive duration such as 6s");
            None
        }
    }
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket { rate, burst, tokens: burst, last: now }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A DNS-1123 label (Kubernetes namespace and ServiceAccount names are at least this strict
/// where it matters for SPIFFE IDs): 1–63 of `a-z 0-9 -`, starting and ending alphanumeric.
pub fn is_dns1123_label(s: &str) -> bool {
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|&c| ok(c) || c == b'-')
        && b.first().is_some_and(|&c| ok(c))
        && b.last().is_some_and(|&c| ok(c))
}

/// Checks a CSR's signature and returns its public key. The subject and extensions it asks for
/// are ignored: the control plane decides the certificate's contents.
pub fn csr_public_key(der: &[u8]) -> Result<rcgen::SubjectPublicKeyInfo, String> {
    use x509_parser::prelude::FromDer as _;
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| format!("csr_der is not a PKCS#10 certificate signing request (DER): {e}"))?;
    if !rest.is_empty() {
        return Err("csr_der has trailing bytes after the request".into());
    }
    csr.verify_signature().map_err(|e| format!("the CSR's signature does not verify: {e}"))?;
    let spki = rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| format!("unsupported public key in the CSR: {e}"))?;
    use rcgen::PublicKeyData as _;
    let alg = spki.algorithm();
    if alg != &rcgen::PKCS_ECDSA_P256_SHA256 && alg != &rcgen::PKCS_ECDSA_P384_SHA384 && alg != &rcgen::PKCS_ED25519 {
        return Err("unsupported key type in the CSR: use ECDSA P-256 (or P-384, Ed25519)".into());
    }
    Ok(spki)
}

/// Proves identities from credentials that are not Plexus workload tokens (`plx1.`): in
/// Kubernetes, a pod's ServiceAccount token (TokenReview). A certificate it bootstraps names
/// [`EXTERNAL_TOKEN_ID`] as its token; renewing one needs the credential again (so a deleted
/// ServiceAccount ends its renewals, as a revoked token does).
#[tonic::async_trait]
pub trait Authenticator: Send + Sync {
    /// The `(namespace, service account)` that `credential` proves, or why it proves none.
    async fn authenticate(&self, credential: &str) -> Result<(String, String), String>;
}

/// The token id in the certificates an [`Authenticator`] bootstrapped.
pub const EXTERNAL_TOKEN_ID: &str = "external";

/// The identity a request is bound to (by its token, or the certificate it renews).
struct Bound {
    id: String,
    namespace: String,
    service_account: String,
}

/// Serves `plexus.identity.v1.Identity`.
pub struct CertifyService {
    pub ca: Arc<Ca>,
    pub store: Arc<dyn Store>,
    pub tokens: Arc<crate::tokens::Tokens>,
    limiter: Mutex<TokenBucket>,
    /// [`TEST_LEAF_LIFETIME_ENV`], read once at start.
    leaf_lifetime_override: Option<Duration>,
    /// Credentials other than workload tokens (Kubernetes mode).
    authenticator: Option<Arc<dyn Authenticator>>,
}

impl CertifyService {
    pub fn new(ca: Arc<Ca>, store: Arc<dyn Store>, tokens: Arc<crate::tokens::Tokens>) -> CertifyService {
        CertifyService {
            ca,
            store,
            tokens,
            limiter: Mutex::new(TokenBucket::new(RATE_PER_SECOND, BURST, Instant::now())),
            leaf_lifetime_override: test_leaf_lifetime(),
            authenticator: None,
        }
    }

    /// Also accepts the credentials `authenticator` proves (a token without the `plx1.` prefix).
    pub fn with_authenticator(mut self, authenticator: Option<Arc<dyn Authenticator>>) -> CertifyService {
        self.authenticator = authenticator;
        self
    }

    /// The identity an external credential proves, when an authenticator is configured and
    /// the credential is not a workload token.
    async fn external(&self, credential: &str) -> Option<Result<(String, String), String>> {
        let authenticator = self.authenticator.as_ref()?;
        if credential.trim().strip_prefix(crate::tokens::PREFIX).is_some_and(|rest| rest.starts_with(".")) {
            return None;
        }
        let proved = authenticator.authenticate(credential.trim()).await;
        // The control plane's own identity is never a workload's (the control plane's pod
        // runs as that ServiceAccount: its token must not make a proxy look like it).
        Some(proved.and_then(|(ns, sa)| {
            if ns == plexus_core::names::CONTROL_PLANE_NAMESPACE
                && sa == plexus_core::names::CONTROL_PLANE_SERVICE_ACCOUNT
            {
                Err(format!("{ns}/{sa} is the control plane's own identity: no workload certificate is issued for it"))
            } else {
                Ok((ns, sa))
            }
        }))
    }

    fn admit(&self) -> bool {
        self.limiter.lock().map(|mut b| b.try_take(Instant::now())).unwrap_or(false)
    }
}

#[tonic::async_trait]
impl Identity for CertifyService {
    async fn certify(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let peer = crate::grpc_tls::Peer::of(&request)
            .and_then(|p| p.addr)
            .or_else(|| request.remote_addr())
            .map(|a| a.to_string())
            .unwrap_or_default();
        let peer_identity = crate::grpc_tls::Peer::of(&request).and_then(|p| p.identity.clone());
        let r = request.into_inner();
        let settings = IdentitySettings::from_store(self.store.as_ref());
        // Renewal: over mTLS with the certificate the token bootstrapped (the token may have
        // expired since; a revoked one ends renewals). Bootstrap: with the token.
        let (record_namespace, record_account, token_id) = match peer_identity {
            Some(id) => {
                let Some(token_id) = id.token_id.clone() else {
                    return Err(Status::permission_denied(format!(
                        "{} was not bootstrapped with a workload token: it cannot be renewed here",
                        id.spiffe_id
                    )));
                };
                if token_id == EXTERNAL_TOKEN_ID {
                    // Bootstrapped by the authenticator: renewed only while the credential
                    // still proves this identity.
                    match self.external(&r.token).await {
                        Some(Ok((ns, sa))) if ns == id.namespace && sa == id.service_account => {}
                        Some(Ok((ns, sa))) => {
                            return Err(Status::permission_denied(format!(
                                "renewal of {} refused: the credential is for {ns}/{sa}",
                                id.spiffe_id
                            )));
                        }
                        Some(Err(e)) => {
                            tracing::warn!(%peer, spiffe_id = %id.spiffe_id, error = %e, "certificate renewal refused");
                            return Err(Status::permission_denied(format!("renewal of {} refused: {e}", id.spiffe_id)));
                        }
                        None => {
                            return Err(Status::permission_denied(format!(
                                "renewal of {} refused: it needs its ServiceAccount credential",
                                id.spiffe_id
                            )));
                        }
                    }
                } else if let Err(e) = self.tokens.renewable(&token_id) {
                    tracing::warn!(%peer, spiffe_id = %id.spiffe_id, error = %e, "certificate renewal refused");
                    return Err(Status::permission_denied(format!("renewal of {} refused: {e}", id.spiffe_id)));
                }
                (id.namespace.clone(), id.service_account.clone(), token_id)
            }
            None => match self.external(&r.token).await {
                Some(Ok((namespace, service_account))) => (namespace, service_account, EXTERNAL_TOKEN_ID.to_string()),
                Some(Err(e)) => {
                    tracing::warn!(%peer, namespace = %r.namespace, service_account = %r.service_account, error = %e, "certificate request refused");
                    return Err(Status::unauthenticated(e));
                }
                None => match self.tokens.authenticate(&r.token) {
                    Ok(record) => (record.namespace, record.service_account, record.id),
                    Err(e) => {
                        tracing::warn!(%peer, namespace = %r.namespace, service_account = %r.service_account, error = %e, "certificate request refused");
                        return Err(Status::unauthenticated(e.to_string()));
                    }
                },
            },
        };
        let record = Bound { id: token_id, namespace: record_namespace, service_account: record_account };
        let bound = plexus_core::names::spiffe_id(&settings.trust_domain, &record.namespace, &record.service_account);
        let asked_namespace = if r.namespace.is_empty() { &record.namespace } else { &r.namespace };
        let asked_account = if r.service_account.is_empty() { &record.service_account } else { &r.service_account };
        if *asked_namespace != record.namespace || *asked_account != record.service_account {
            let asked = plexus_core::names::spiffe_id(&settings.trust_domain, asked_namespace, asked_account);
            tracing::warn!(%peer, token = %record.id, %bound, %asked, "certificate request for another identity refused");
            return Err(Status::permission_denied(format!(
                "workload token {} is bound to {bound}; it cannot get a certificate for {asked}",
                record.id
            )));
        }
        if !self.admit() {
            return Err(Status::resource_exhausted(format!(
                "too many certificate requests (the control plane signs at most {RATE_PER_SECOND}/s); retry with backoff"
            )));
        }
        let public_key = csr_public_key(&r.csr_der).map_err(Status::invalid_argument)?;
        let spiffe_id = bound;
        let lifetime = self.leaf_lifetime_override.unwrap_or(settings.leaf_lifetime);
        let leaf = match self.ca.sign_bootstrapped(&public_key, &spiffe_id, lifetime, Some(&record.id)) {
            Ok(leaf) => leaf,
            Err(SignError::IssuerExpired(when)) => {
                return Err(Status::failed_precondition(format!(
                    "the issuer expired on {when}; an operator must rotate it (plexus identity rotate)"
                )));
            }
            Err(SignError::Invalid(e)) => return Err(Status::invalid_argument(e)),
            Err(SignError::Failed(e)) => {
                tracing::error!(error = %e, "cannot sign a workload certificate");
                return Err(Status::internal("cannot sign the certificate"));
            }
        };
        tracing::info!(%peer, spiffe_id = %spiffe_id, token = %record.id, serial = %leaf.serial, not_after = leaf.not_after_unix, "issued a workload certificate");
        Ok(Response::new(CertifyResponse {
            certificate_chain_pem: leaf.chain_pem,
            trust_bundle_pem: self.ca.bundle_pem().to_string(),
            not_after_unix: leaf.not_after_unix,
            spiffe_id,
        }))
    }
}

/// How long a proxy may be connected without a certificate before `plexus check` flags it, by
/// default (`plexus check --certificate-grace`).
pub const CERTIFICATE_GRACE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(50.0, 100.0, start);
        assert_eq!((0..150).filter(|_| b.try_take(start)).count(), 100, "the burst");
        assert!(!b.try_take(start));
        let later = start + Duration::from_millis(100);
        assert_eq!((0..20).filter(|_| b.try_take(later)).count(), 5, "50/s refills 5 in 100 ms");
        let much_later = later + Duration::from_secs(60);
        assert_eq!((0..150).filter(|_| b.try_take(much_later)).count(), 100, "never more than the burst");
    }

    #[test]
    fn dns1123_labels() {
        for ok in ["default", "a", "bookinfo-2", "x".repeat(63).as_str()] {
            assert!(is_dns1123_label(ok), "{ok}");
        }
        for bad in ["", "Default", "-a", "a-", "a.b", "a_b", "x".repeat(64).as_str(), "a/b"] {
            assert!(!is_dns1123_label(bad), "{bad}");
        }
    }

    /// Proves `bookinfo/reviews` for `sa-reviews` and `bookinfo/ratings` for `sa-ratings`.
    struct FakeReview;

    #[tonic::async_trait]
    impl Authenticator for FakeReview {
        async fn authenticate(&self, credential: &str) -> Result<(String, String), String> {
            match credential {
                "sa-reviews" => Ok(("bookinfo".into(), "reviews".into())),
                "sa-ratings" => Ok(("bookinfo".into(), "ratings".into())),
                "sa-control" => Ok(("plexus-system".into(), "plexus-control".into())),
                "sa-gateway" => Ok(("plexus-system".into(), "ingress-gateway".into())),
                _ => Err("the API server does not accept the token".into()),
            }
        }
    }

    fn request(token: &str, namespace: &str, account: &str, peer: Option<&[u8]>) -> Request<CertifyRequest> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let csr = rcgen::CertificateParams::default().serialize_request(&key).expect("csr");
        let mut r = Request::new(CertifyRequest {
            token: token.into(),
            namespace: namespace.into(),
            service_account: account.into(),
            csr_der: csr.der().to_vec().into(),
        });
        let identity = peer.map(|der| Arc::new(crate::grpc_tls::identity_of(der).expect("a workload certificate")));
        r.extensions_mut().insert(crate::grpc_tls::Peer { addr: None, identity });
        r
    }

    fn leaf_der(response: &CertifyResponse) -> Vec<u8> {
        use rustls_pki_types::pem::PemObject as _;
        rustls_pki_types::CertificateDer::pem_slice_iter(response.certificate_chain_pem.as_bytes())
            .next()
            .expect("a certificate")
            .expect("PEM")
            .to_vec()
    }

    /// Kubernetes mode: a ServiceAccount credential gets a certificate for exactly its own
    /// identity; renewing it needs the same credential again; workload tokens still work.
    #[tokio::test]
    async fn an_authenticator_proves_service_accounts_and_renewals_need_it_again() {
        let dir = std::env::temp_dir().join(format!("plexus-certify-external-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        crate::identity::ensure_ca(&dir, "plexus.local").expect("ca");
        let ca = Arc::new(Ca::load(&dir).expect("load"));
        let tokens = Arc::new(crate::tokens::Tokens::open(&dir).expect("tokens"));
        let store: Arc<dyn Store> = Arc::new(crate::store::FileStore::open(&dir.join("store.redb")).expect("store"));
        let with = CertifyService::new(ca.clone(), store.clone(), tokens.clone())
            .with_authenticator(Some(Arc::new(FakeReview)));

        let issued = with.certify(request("sa-reviews", "", "", None)).await.expect("bootstrap").into_inner();
        assert_eq!(issued.spiffe_id, "spiffe://plexus.local/ns/bookinfo/sa/reviews");
        let other = with.certify(request("sa-reviews", "bookinfo", "ratings", None)).await.expect_err("another SA");
        assert_eq!(other.code(), tonic::Code::PermissionDenied, "{other:?}");
        let bad = with.certify(request("forged", "", "", None)).await.expect_err("not accepted");
        assert_eq!(bad.code(), tonic::Code::Unauthenticated);
        let control = with.certify(request("sa-control", "", "", None)).await.expect_err("reserved");
        assert_eq!(control.code(), tonic::Code::Unauthenticated);
        assert!(control.message().contains("control plane's own identity"), "{control:?}");
        let gateway = with.certify(request("sa-gateway", "", "", None)).await.expect("plexus-system, another SA");
        assert_eq!(gateway.into_inner().spiffe_id, "spiffe://plexus.local/ns/plexus-system/sa/ingress-gateway");

        // Renewal over mTLS: the same credential renews; none, or another identity's, does not.
        let der = leaf_der(&issued);
        let renewed = with.certify(request("sa-reviews", "", "", Some(&der))).await.expect("renewal").into_inner();
        assert_eq!(renewed.spiffe_id, issued.spiffe_id);
        for credential in ["", "sa-ratings", "forged"] {
            let refused = with.certify(request(credential, "", "", Some(&der))).await.expect_err(credential);
            assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{credential:?}: {refused:?}");
        }

        // Workload tokens go to the token store, with or without an authenticator.
        let anchor = ca.state().anchor.summary.sha256.clone();
        let created = tokens.create("plexus.local", "shop", "cart", Duration::from_secs(60), &anchor).expect("token");
        let by_token = with.certify(request(&created.token, "", "", None)).await.expect("workload token").into_inner();
        assert_eq!(by_token.spiffe_id, "spiffe://plexus.local/ns/shop/sa/cart");
        // Without an authenticator (universal mode) a ServiceAccount credential proves nothing.
        let without = CertifyService::new(ca, store, tokens);
        let refused = without.certify(request("sa-reviews", "", "", None)).await.expect_err("universal mode");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn csrs_are_checked() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let csr = rcgen::CertificateParams::new(vec!["ignored.example".to_string()])
            .expect("params")
            .serialize_request(&key)
            .expect("csr");
        let spki = csr_public_key(csr.der()).expect("valid CSR");
        use rcgen::PublicKeyData as _;
        assert_eq!(spki.der_bytes(), key.der_bytes());
        let mut tampered = csr.der().to_vec();
        let n = tampered.len();
        tampered[n - 3] ^= 0x55;
        assert!(csr_public_key(&tampered).is_err(), "a bad signature is refused");
        assert!(csr_public_key(b"not a csr").is_err());
    }
}
