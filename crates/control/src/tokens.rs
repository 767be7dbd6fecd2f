//! Workload tokens: bootstrap credentials bound to one identity
//! (`spiffe://<td>/ns/<namespace>/sa/<service account>`).
//!
//! `plexus token create` (admin token) makes one: `plx1.<id>.<secret>.<anchor sha256>`. The
//! id names it (`plexus token list`, `revoke ID`); the secret (32 random bytes) is never
//! stored, only its SHA-256, compared in constant time; the last part is the trust anchor's
//! fingerprint, which the proxy pins to verify the control plane before it sends the token.
//! A token expires (`--ttl`, default 24h) and can be revoked. It proves one thing: the
//! bearer may get a certificate for that one identity. Certificates it bootstraps carry its
//! id (in the subject, signed by the issuer), so revoking it also ends their renewals.
//!
//! Tokens live in `<data dir>/tokens.json` (0600), rewritten atomically.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// File name inside the data dir.
pub const TOKENS_FILE: &str = "tokens.json";
/// The prefix of every workload token (its format version).
pub const PREFIX: &str = "plx1";
/// Default lifetime of a token.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Prefix of the subject OU that names the token a certificate was bootstrapped with.
pub const CERT_TOKEN_OU_PREFIX: &str = "plexus-token:";

/// One token as stored (no secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub id: String,
    pub namespace: String,
    pub service_account: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub created_unix: i64,
    pub expires_unix: i64,
    #[serde(default)]
    pub revoked: bool,
    /// SHA-256 (hex) of the trust anchor the token pins (empty for tokens made before it was
    /// recorded).
    #[serde(default)]
    pub anchor_sha256: String,
}

/// What `list` shows of a token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub id: String,
    pub identity: String,
    pub namespace: String,
    pub service_account: String,
    pub created_unix: i64,
    pub expires_unix: i64,
    /// `valid`, `expired` or `revoked`.
    pub state: String,
    /// The trust anchor the token pins (what a proxy bootstrapping with it verifies the
    /// control plane against); empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub anchor_sha256: String,
}

/// `GET /api/v1/tokens`: the server writes it and the CLI reads it with this one type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenList {
    pub items: Vec<TokenInfo>,
}

/// A token just created: the only time its secret is seen.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedToken {
    pub id: String,
    pub token: String,
    pub identity: String,
    pub expires_unix: i64,
    pub anchor_sha256: String,
}

/// Why a token was refused (the message is what the caller sees).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed workload token (expected plx1.<id>.<secret>.<anchor>, as `plexus token create` prints)")]
    Malformed,
    #[error("unknown workload token {0}")]
    Unknown(String),
    #[error("workload token {0} has expired; create a new one with `plexus token create`")]
    Expired(String),
    #[error("workload token {0} was revoked")]
    Revoked(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot save the tokens: {0}")]
    Io(String),
}

/// The parts of a token string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToken<'a> {
    pub id: &'a str,
    pub secret: &'a str,
    /// The pinned trust anchor's SHA-256 (hex), lower-case.
    pub anchor_sha256: &'a str,
}

/// Splits a token string (`plx1.<id>.<secret>.<anchor>`).
pub fn parse(token: &str) -> Result<ParsedToken<'_>, TokenError> {
    let mut parts = token.trim().split('.');
    let (Some(PREFIX), Some(id), Some(secret), Some(anchor), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let hex =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex(id, 16) || !hex(secret, 64) || !hex(anchor, 64) {
        return Err(TokenError::Malformed);
    }
    Ok(ParsedToken { id, secret, anchor_sha256: anchor })
}

/// Every workload token, persisted in the data dir.
pub struct Tokens {
    path: PathBuf,
    records: Mutex<BTreeMap<String, TokenRecord>>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom as _;
    let mut buf = vec![0u8; bytes];
    if ring::rand::SystemRandom::new().fill(&mut buf).is_err() {
        // Never expected; refuse to make a weak secret rather than fall back.
        return String::new();
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl Tokens {
    /// Loads `<data dir>/tokens.json` (none yet: no tokens).
    pub fn open(data_dir: &Path) -> Result<Tokens, String> {
        let path = data_dir.join(TOKENS_FILE);
        let records = match std::fs::read(&path) {
            Ok(bytes) => {
                let list: Vec<TokenRecord> =
                    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
                list.into_iter().map(|r| (r.id.clone(), r)).collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(Tokens { path, records: Mutex::new(records) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, TokenRecord>> {
        self.records.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn save(&self, records: &BTreeMap<String, TokenRecord>) -> Result<(), TokenError> {
        let list: Vec<&TokenRecord> = records.values().collect();
        let text = serde_json::to_vec_pretty(&list).map_err(|e| TokenError::Io(e.to_string()))?;
        let tmp = self.path.with_extension("json.tmp");
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        result.map_err(|e| TokenError::Io(format!("{}: {e}", self.path.display())))
    }

    /// Creates a token for `namespace`/`service_account`, valid for `ttl`.
    pub fn create(
        &self,
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
        anchor_sha256: &str,
    ) -> Result<CreatedToken, TokenError> {
        for (field, value) in [("namespace", namespace), ("service account", service_account)] {
            if !crate::certify::is_dns1123_label(value) {
                return Err(TokenError::Invalid(format!(
                    "{field} {value:?} is not a DNS-1123 label (1-63 lower-case letters, digits and '-')"
                )));
            }
        }
        if namespace == plexus_core::names::CONTROL_PLANE_NAMESPACE {
            return Err(TokenError::Invalid(format!(
                "namespace {namespace:?} is reserved for the control plane's own identity"
            )));
        }
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(366 * 24 * 3600) {
            return Err(TokenError::Invalid("ttl: between 1s and 366 days".into()));
        }
        let (id, secret) = (random_hex(8), random_hex(32));
        if id.is_empty() || secret.is_empty() {
            return Err(TokenError::Io("the system random source failed".into()));
        }
        let now = unix_now();
        let record = TokenRecord {
            id: id.clone(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            secret_sha256: sha256_hex(secret.as_bytes()),
            created_unix: now,
            expires_unix: now + ttl.as_secs() as i64,
            revoked: false,
            anchor_sha256: anchor_sha256.to_string(),
        };
        let mut records = self.lock();
        // Expired and revoked tokens are kept a day for `list`, then forgotten.
        records.retain(|_, r| r.expires_unix + 86_400 > now);
        records.insert(id.clone(), record.clone());
        self.save(&records)?;
        Ok(CreatedToken {
            token: format!("{PREFIX}.{id}.{secret}.{anchor_sha256}"),
            id,
            identity: plexus_core::names::spiffe_id(trust_domain, namespace, service_account),
            expires_unix: record.expires_unix,
            anchor_sha256: anchor_sha256.to_string(),
        })
    }

    /// The token's record if the token is valid now (known, secret matches, not expired, not
    /// revoked).
    pub fn authenticate(&self, token: &str) -> Result<TokenRecord, TokenError> {
        let parsed = parse(token)?;
        let records = self.lock();
        let record = records.get(parsed.id).ok_or_else(|| TokenError::Unknown(parsed.id.to_string()))?;
        let given = sha256_hex(parsed.secret.as_bytes());
        if !crate::api::constant_time_eq(given.as_bytes(), record.secret_sha256.as_bytes()) {
            return Err(TokenError::Unknown(parsed.id.to_string()));
        }
        if record.revoked {
            return Err(TokenError::Revoked(record.id.clone()));
        }
        if record.expires_unix <= unix_now() {
            return Err(TokenError::Expired(record.id.clone()));
        }
        Ok(record.clone())
    }

    /// Whether certificates bootstrapped with token `id` may still be renewed: the token is
    /// known and not revoked (its expiry ends bootstrap, not renewal).
    pub fn renewable(&self, id: &str) -> Result<(), TokenError> {
        match self.lock().get(id) {
            None => Err(TokenError::Unknown(id.to_string())),
            Some(r) if r.revoked => Err(TokenError::Revoked(id.to_string())),
            Some(_) => Ok(()),
        }
    }

    /// Revokes a token; `Ok(false)` when there is none with that id.
    pub fn revoke(&self, id: &str) -> Result<bool, TokenError> {
        let mut records = self.lock();
        let Some(r) = records.get_mut(id) else { return Ok(false) };
        r.revoked = true;
        self.save(&records)?;
        Ok(true)
    }

    /// Every token, by id.
    pub fn list(&self, trust_domain: &str) -> Vec<TokenInfo> {
        let now = unix_now();
        self.lock()
            .values()
            .map(|r| TokenInfo {
                id: r.id.clone(),
                identity: plexus_core::names::spiffe_id(trust_domain, &r.namespace, &r.service_account),
                namespace: r.namespace.clone(),
                service_account: r.service_account.clone(),
                created_unix: r.created_unix,
                expires_unix: r.expires_unix,
                state: if r.revoked {
                    "revoked"
                } else if r.expires_unix <= now {
                    "expired"
                } else {
                    "valid"
                }
                .to_string(),
                anchor_sha256: r.anchor_sha256.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("plexus-tokens-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    const ANCHOR: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn tokens_are_bound_stored_hashed_and_revocable() {
        let d = dir("bound");
        let tokens = Tokens::open(&d).expect("open");
        let t = tokens.create("plexus.local", "default", "reviews", DEFAULT_TTL, ANCHOR).expect("create");
        assert_eq!(t.identity, "spiffe://plexus.local/ns/default/sa/reviews");
        assert_eq!(parse(&t.token).expect("parse").anchor_sha256, ANCHOR);
        let r = tokens.authenticate(&t.token).expect("valid");
        assert_eq!((r.namespace.as_str(), r.service_account.as_str()), ("default", "reviews"));
        let file = std::fs::read_to_string(d.join(TOKENS_FILE)).expect("file");
        let secret = parse(&t.token).expect("parse").secret.to_string();
        assert!(!file.contains(&secret), "the secret is not stored");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(d.join(TOKENS_FILE)).expect("meta").permissions().mode() & 0o777, 0o600);

        // Another secret with the same id, a malformed token: refused.
        let mut forged = t.token.clone();
        let at = forged.len() - 70;
        forged.replace_range(at..at + 1, if &forged[at..at + 1] == "0" { "1" } else { "0" });
        assert!(matches!(tokens.authenticate(&forged), Err(TokenError::Unknown(_))));
        for bad in ["", "plx1", "plx1.x.y.z", &t.token.replace("plx1", "plx2"), &format!("{}.x", t.token)] {
            assert_eq!(tokens.authenticate(bad), Err(TokenError::Malformed), "{bad}");
        }

        // Survives a restart; revocation is persisted and ends renewals too.
        let again = Tokens::open(&d).expect("reopen");
        assert!(again.authenticate(&t.token).is_ok());
        assert!(again.revoke(&t.id).expect("revoke"));
        assert!(!again.revoke("0000000000000000").expect("unknown id"));
        assert_eq!(again.authenticate(&t.token), Err(TokenError::Revoked(t.id.clone())));
        assert_eq!(again.renewable(&t.id), Err(TokenError::Revoked(t.id.clone())));
        assert_eq!(Tokens::open(&d).expect("reopen").list("plexus.local")[0].state, "revoked");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn expired_tokens_bootstrap_nothing_but_their_certificates_renew() {
        let d = dir("expired");
        let tokens = Tokens::open(&d).expect("open");
        let t = tokens.create("plexus.local", "default", "a", Duration::from_secs(1), ANCHOR).expect("create");
        tokens.lock().get_mut(&t.id).expect("record").expires_unix = unix_now() - 1;
        assert_eq!(tokens.authenticate(&t.token), Err(TokenError::Expired(t.id.clone())));
        assert!(tokens.renewable(&t.id).is_ok());
        assert_eq!(tokens.list("plexus.local")[0].state, "expired");
        assert!(tokens.create("plexus.local", "Default", "a", DEFAULT_TTL, ANCHOR).is_err());
        assert!(tokens.create("plexus.local", "default", "a/b", DEFAULT_TTL, ANCHOR).is_err());
        assert!(tokens.create("plexus.local", "plexus-system", "plexus-control", DEFAULT_TTL, ANCHOR).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
