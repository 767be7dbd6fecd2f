//! The gateway's certificates from `kubernetes.io/tls` Secrets (SPEC §4): a
//! [`CertificateSource`] for `plexus proxy --mode ingress --certificate-source kubernetes`.
//!
//! Each Secret a served listener names in `tls.certificateRefs` is watched on its own, with the
//! gateway pod's ServiceAccount, by name (`fieldSelector=metadata.name=NAME`): the API server
//! authorizes such a list/watch against a Role's `resourceNames`, so the gateway needs
//! `get`/`list`/`watch` on exactly the Secrets it serves and on nothing else of its namespace
//! (the example's Role). A Secret no longer named is no longer watched. The gateway's
//! [`plexus_proxy::gateway::certs::CertificateStore`] reads the watched copies like files:
//! a replaced Secret is parsed once and served to new handshakes (open connections keep
//! theirs), an invalid or deleted one keeps the last good certificate, a missing one serves
//! nothing; each problem shows in the gateway's `/config` and so in `plexus check`. Keys go
//! from the API server to the gateway only, never through the control plane.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use plexus_core::gateway::CertificateName;
use plexus_proxy::gateway::certs::{CertificateSource, PemPair};

/// The Secret type a certificate must have.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// What is known of one watched Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    /// The watch has not listed it yet.
    Pending,
    /// Listed: not there.
    Missing,
    /// Its chain and key, or why it is not a usable certificate.
    Present(Result<PemPair, String>),
    /// The watch fails (e.g. 403: the Role does not name this Secret); the store keeps
    /// serving the last good certificate meanwhile.
    Failing(String),
}

struct Watched {
    known: Known,
    task: tokio::task::JoinHandle<()>,
}

type Table = Arc<Mutex<BTreeMap<CertificateName, Watched>>>;

/// Certificates from the Secrets the served listeners name, watched one by one.
pub struct SecretCertificates {
    client: kube::Client,
    runtime: tokio::runtime::Handle,
    table: Table,
}

impl std::fmt::Debug for SecretCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> =
            self.table.lock().map(|t| t.keys().map(ToString::to_string).collect()).unwrap_or_default();
        f.debug_struct("SecretCertificates").field("watched", &names).finish()
    }
}

impl SecretCertificates {
    /// With the in-cluster configuration (the pod's ServiceAccount) or `KUBECONFIG`. Call it
    /// on the runtime that serves the gateway: the watches run there.
    pub async fn connect() -> Result<SecretCertificates, String> {
        let client = kube::Client::try_default().await.map_err(|e| {
            format!("--certificate-source kubernetes: cannot reach the Kubernetes API (in-cluster config or KUBECONFIG): {e}")
        })?;
        Ok(SecretCertificates::new(client))
    }

    /// Must be called within a Tokio runtime.
    pub fn new(client: kube::Client) -> SecretCertificates {
        SecretCertificates {
            client,
            runtime: tokio::runtime::Handle::current(),
            table: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }
}

impl Drop for SecretCertificates {
    fn drop(&mut self) {
        if let Ok(table) = self.table.lock() {
            for w in table.values() {
                w.task.abort();
            }
        }
    }
}

impl CertificateSource for SecretCertificates {
    fn want(&self, names: &BTreeSet<CertificateName>) {
        let Ok(mut table) = self.table.lock() else { return };
        table.retain(|name, w| {
            let keep = names.contains(name);
            if !keep {
                w.task.abort();
                tracing::info!(secret = %name, "certificate Secret no longer served: watch stopped");
            }
            keep
        });
        for name in names {
            if table.contains_key(name) {
                continue;
            }
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &name.namespace);
            let task = self.runtime.spawn(watch_secret(api, name.clone(), self.table.clone()));
            table.insert(name.clone(), Watched { known: Known::Pending, task });
        }
    }

    fn read(&self, name: &CertificateName) -> Result<PemPair, String> {
        let known = self.table.lock().ok().and_then(|t| t.get(name).map(|w| w.known.clone()));
        match known {
            Some(known) => answer(name, &known),
            None => Err(format!("Secret {name} is not watched")),
        }
    }

    fn location(&self, name: &CertificateName) -> String {
        format!("Secret {name}")
    }
}

/// What [`CertificateSource::read`] says for a Secret in state `known`.
fn answer(name: &CertificateName, known: &Known) -> Result<PemPair, String> {
    match known {
        Known::Pending => Err(format!("Secret {name} not read yet")),
        Known::Missing => Err(format!("Secret {name} not found")),
        Known::Present(pem) => pem.clone(),
        Known::Failing(error) => Err(format!("cannot read Secret {name}: {error}")),
    }
}

/// The certificate in a Secret: type `kubernetes.io/tls` with `tls.crt` and `tls.key`.
pub fn pem_pair(secret: &Secret) -> Result<PemPair, String> {
    let kind = secret.type_.as_deref().unwrap_or("Opaque");
    if kind != TLS_SECRET_TYPE {
        return Err(format!("the Secret is of type {kind:?}, not {TLS_SECRET_TYPE:?}"));
    }
    let data = secret.data.as_ref();
    let field = |key: &str| {
        data.and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .filter(|b| !b.is_empty())
            .ok_or_else(|| format!("the Secret has no {key}"))
    };
    Ok(PemPair { chain: field("tls.crt")?, key: field("tls.key")? })
}

/// Watches one Secret by name, keeping `table[name]` current until aborted.
async fn watch_secret(api: Api<Secret>, name: CertificateName, table: Table) {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", name.name));
    let stream = watcher(api, config).default_backoff();
    futures_util::pin_mut!(stream);
    // Listed since the last Init: the Secret, if it was in the list.
    let mut listing: Option<Option<Secret>> = None;
    while let Some(event) = stream.next().await {
        let next = match event {
            Ok(watcher::Event::Init) => {
                listing = Some(None);
                continue;
            }
            Ok(watcher::Event::InitApply(s)) => {
                listing = Some(Some(s));
                continue;
            }
            Ok(watcher::Event::InitDone) => match listing.take().flatten() {
                Some(s) => Known::Present(pem_pair(&s)),
                None => Known::Missing,
            },
            Ok(watcher::Event::Apply(s)) => Known::Present(pem_pair(&s)),
            Ok(watcher::Event::Delete(_)) => Known::Missing,
            Err(e) => {
                let error = match &e {
                    watcher::Error::InitialListFailed(kube::Error::Api(s))
                    | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                        if s.code == 403 =>
                    {
                        "forbidden: the gateway's ServiceAccount needs get, list and watch on it (a Role with resourceNames)"
                            .to_string()
                    }
                    _ => e.to_string(),
                };
                let Ok(mut t) = table.lock() else { return };
                if let Some(w) = t.get_mut(&name) {
                    let next = Known::Failing(error);
                    if w.known != next {
                        tracing::warn!(secret = %name, error = %e, "certificate Secret watch failed; retrying");
                    }
                    w.known = next;
                }
                continue;
            }
        };
        let Ok(mut t) = table.lock() else { return };
        if let Some(w) = t.get_mut(&name) {
            if w.known != next {
                tracing::info!(secret = %name, state = describe(&next), "certificate Secret changed");
            }
            w.known = next;
        }
    }
}

fn describe(known: &Known) -> &'static str {
    match known {
        Known::Pending => "pending",
        Known::Missing => "missing",
        Known::Present(Ok(_)) => "present",
        Known::Present(Err(_)) => "invalid",
        Known::Failing(_) => "failing",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(json: serde_json::Value) -> Secret {
        serde_json::from_value(json).expect("a Secret")
    }

    const CRT: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="; // "-----BEGIN CERTIFICATE-----\n"
    const KEY: &str = "LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCg=="; // "-----BEGIN PRIVATE KEY-----\n"

    #[test]
    fn a_tls_secret_gives_its_chain_and_key() {
        // As `kubectl get secret -o json` shows one made by `kubectl create secret tls`.
        let s = secret(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "ingress-tls", "namespace": "plexus-system", "resourceVersion": "812"},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": CRT, "tls.key": KEY}
        }));
        let pem = pem_pair(&s).expect("usable");
        assert_eq!(pem.chain, b"-----BEGIN CERTIFICATE-----\n");
        assert_eq!(pem.key, b"-----BEGIN PRIVATE KEY-----\n");
    }

    #[test]
    fn other_secrets_are_refused_with_the_reason() {
        let opaque = secret(serde_json::json!({
            "metadata": {"name": "x"}, "type": "Opaque", "data": {"tls.crt": CRT, "tls.key": KEY}
        }));
        assert_eq!(pem_pair(&opaque), Err("the Secret is of type \"Opaque\", not \"kubernetes.io/tls\"".into()));
        let untyped = secret(serde_json::json!({"metadata": {"name": "x"}, "data": {"tls.crt": CRT, "tls.key": KEY}}));
        assert!(pem_pair(&untyped).is_err_and(|e| e.contains("\"Opaque\"")));
        let no_key = secret(
            serde_json::json!({"metadata": {"name": "x"}, "type": "kubernetes.io/tls", "data": {"tls.crt": CRT}}),
        );
        assert_eq!(pem_pair(&no_key), Err("the Secret has no tls.key".into()));
        let empty = secret(serde_json::json!({
            "metadata": {"name": "x"}, "type": "kubernetes.io/tls", "data": {"tls.crt": "", "tls.key": KEY}
        }));
        assert_eq!(pem_pair(&empty), Err("the Secret has no tls.crt".into()));
        let no_data = secret(serde_json::json!({"metadata": {"name": "x"}, "type": "kubernetes.io/tls"}));
        assert_eq!(pem_pair(&no_data), Err("the Secret has no tls.crt".into()));
    }

    #[test]
    fn each_state_reads_as_the_store_needs() {
        let name = CertificateName { namespace: "plexus-system".into(), name: "ingress-tls".into() };
        let pair = PemPair { chain: b"c".to_vec(), key: b"k".to_vec() };
        assert_eq!(answer(&name, &Known::Pending), Err("Secret plexus-system/ingress-tls not read yet".into()));
        assert_eq!(answer(&name, &Known::Missing), Err("Secret plexus-system/ingress-tls not found".into()));
        assert_eq!(
            answer(&name, &Known::Present(Err("the Secret has no tls.key".into()))),
            Err("the Secret has no tls.key".into())
        );
        assert_eq!(answer(&name, &Known::Present(Ok(pair.clone()))), Ok(pair));
        assert_eq!(
            answer(&name, &Known::Failing("forbidden: ...".into())),
            Err("cannot read Secret plexus-system/ingress-tls: forbidden: ...".into())
        );
    }
}
