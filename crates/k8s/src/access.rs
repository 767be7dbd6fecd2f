//! The CLI against a cluster (SPEC §11): `--kubeconfig FILE` (or `KUBECONFIG` when no
//! `--server` is given) reaches the control plane through the API server — a port-forward to
//! the control-plane pod's HTTP port 7701, one forwarded stream per request — with the admin
//! token from Secret `plexus-admin-token`; and `plexus check`'s Kubernetes checks.

use std::path::Path;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};

use crate::install::{ADMIN_TOKEN_SECRET, CONTROL, NAMESPACE, WEBHOOK_RENEW_BEFORE, WEBHOOK_SECRET};

/// The control plane's HTTP port in its pod.
pub const HTTP_PORT: u16 = 7701;
/// The control-plane pods' labels (as `plexus install kubernetes` renders them).
const CONTROL_SELECTOR: &str = "app.kubernetes.io/name=plexus,app.kubernetes.io/component=control-plane";

/// A Kubernetes client from a kubeconfig file (its current context).
pub async fn client_from(kubeconfig: &Path) -> Result<kube::Client, String> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| format!("--kubeconfig {}: {e}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| format!("--kubeconfig {}: {e}", kubeconfig.display()))?;
    kube::Client::try_from(config).map_err(|e| format!("--kubeconfig {}: {e}", kubeconfig.display()))
}

/// The control plane of a cluster, reached through the API server.
pub struct ClusterAccess {
    client: kube::Client,
    pod: String,
    admin_token: String,
}

impl std::fmt::Debug for ClusterAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterAccess").field("pod", &self.pod).finish_non_exhaustive()
    }
}

impl ClusterAccess {
    /// Finds a ready control-plane pod and reads the admin token, with the kubeconfig's
    /// credentials.
    pub async fn connect(kubeconfig: &Path) -> Result<ClusterAccess, String> {
        let client = client_from(kubeconfig).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
        let list = pods
            .list(&ListParams::default().labels(CONTROL_SELECTOR))
            .await
            .map_err(|e| format!("cannot list the control-plane pods in {NAMESPACE}: {e}"))?;
        let pod = list
            .items
            .iter()
            .filter(|p| crate::translate::is_serving(p))
            .find_map(|p| p.metadata.name.clone())
            .ok_or_else(|| {
                format!(
                    "no ready control-plane pod in {NAMESPACE}\n  hint: install it with `plexus install kubernetes | kubectl apply -f -`, then `kubectl -n {NAMESPACE} rollout status deployment/{CONTROL}`"
                )
            })?;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
        let secret = secrets
            .get(ADMIN_TOKEN_SECRET)
            .await
            .map_err(|e| format!("cannot read Secret {NAMESPACE}/{ADMIN_TOKEN_SECRET} (the admin token): {e}"))?;
        let token = secret
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("Secret {NAMESPACE}/{ADMIN_TOKEN_SECRET} has no `token`"))?;
        Ok(ClusterAccess { client, pod, admin_token: token })
    }

    /// The admin token (Secret `plexus-admin-token`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The control-plane pod the requests go to.
    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// A new connection to the control plane's HTTP port (a port-forward stream).
    pub async fn connection(&self) -> Result<tokio::io::DuplexStream, String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let mut forward = pods
            .portforward(&self.pod, &[HTTP_PORT])
            .await
            .map_err(|e| format!("cannot port-forward to {NAMESPACE}/{}:{HTTP_PORT}: {e}", self.pod))?;
        let stream = forward
            .take_stream(HTTP_PORT)
            .ok_or_else(|| format!("the port-forward to {NAMESPACE}/{} gave no stream", self.pod))?;
        // The forwarder's task runs until the stream closes.
        tokio::spawn(async move {
            let _ = forward.join().await;
        });
        Ok(stream)
    }
}

/// One line of `plexus check`'s Kubernetes section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Ok(String),
    /// What, hint.
    Warn(String, String),
    /// What, hint.
    Fail(String, String),
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Judges the webhook's serving certificate chain (`tls.crt`) against the webhook
/// configuration's CA bundle, at `now`.
pub fn webhook_certificate(chain_pem: &str, ca_bundle_pem: &str, now: i64) -> Finding {
    let reinstall = format!(
        "re-run `plexus install kubernetes --identity-dir DIR | kubectl apply -f -` (it re-issues a certificate expiring within 60 days), then `kubectl -n {NAMESPACE} rollout restart deployment/{CONTROL}`"
    );
    let chain = match plexus_control::identity::parse_pem_certs(chain_pem.as_bytes()) {
        Ok(c) if !c.is_empty() => c,
        _ => {
            return Finding::Fail(
                format!("webhook certificate: Secret {NAMESPACE}/{WEBHOOK_SECRET} holds no PEM certificate"),
                reinstall,
            );
        }
    };
    let anchors = plexus_control::identity::parse_pem_certs(ca_bundle_pem.as_bytes()).unwrap_or_default();
    let leaf = &chain[0];
    let chained = chain.windows(2).all(|w| w[0].signed_by(&w[1]))
        && chain.last().is_some_and(|top| anchors.iter().any(|a| top.signed_by(a) || top.der == a.der));
    if !chained {
        return Finding::Fail(
            format!(
                "webhook certificate in Secret {NAMESPACE}/{WEBHOOK_SECRET} does not chain to the webhook configuration's CA bundle"
            ),
            reinstall,
        );
    }
    let end = leaf.summary.not_after_unix;
    if end <= now {
        return Finding::Fail(
            format!("webhook certificate in Secret {NAMESPACE}/{WEBHOOK_SECRET} expired on {}", leaf.summary.not_after),
            reinstall,
        );
    }
    if end <= now + WEBHOOK_RENEW_BEFORE.as_secs() as i64 {
        return Finding::Fail(
            format!(
                "webhook certificate in Secret {NAMESPACE}/{WEBHOOK_SECRET} expires within 60 days ({})",
                leaf.summary.not_after
            ),
            reinstall,
        );
    }
    Finding::Ok(format!("webhook certificate valid until {}", leaf.summary.not_after))
}

/// The Kubernetes checks of `plexus check --kubeconfig` (SPEC §11): API reachable, CRDs
/// installed, webhook certificate valid and not expiring within 60 days, the pods that should
/// be injected have the proxy. (Whether every proxy is connected and in sync is the control
/// plane's own check.)
pub async fn checks(kubeconfig: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    let client = match client_from(kubeconfig).await {
        Ok(c) => c,
        Err(e) => return vec![Finding::Fail(e, "pass a readable kubeconfig with --kubeconfig".into())],
    };
    match client.apiserver_version().await {
        Ok(v) => out.push(Finding::Ok(format!("Kubernetes API reachable (server {})", v.git_version))),
        Err(e) => {
            out.push(Finding::Fail(
                format!("Kubernetes API unreachable: {e}"),
                "check the kubeconfig's server and credentials (`kubectl version`)".into(),
            ));
            return out;
        }
    }
    // CRDs.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.list(&ListParams::default()).await {
        Ok(list) => {
            let names: std::collections::BTreeSet<String> =
                list.items.iter().filter_map(|c| c.metadata.name.clone()).collect();
            let missing: Vec<String> = crate::crd::crd_kinds(false)
                .into_iter()
                .map(crate::crd::crd_name)
                .filter(|n| !names.contains(n))
                .collect();
            if missing.is_empty() {
                out.push(Finding::Ok("CRDs installed (plexus.dev, Gateway API, SMI)".into()));
            } else {
                out.push(Finding::Fail(
                    format!("CRDs not installed: {}", missing.join(", ")),
                    "`plexus install kubernetes | kubectl apply -f -` (the Gateway API ones come from upstream with --skip-gateway-api)".into(),
                ));
            }
        }
        Err(e) => out.push(Finding::Fail(
            format!("cannot list CRDs: {e}"),
            "the kubeconfig's user needs to list customresourcedefinitions".into(),
        )),
    }
    // The webhook's certificate, against the CA bundle the API server trusts it with.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let bundle = match hooks.get_opt("plexus-injector").await {
        Ok(Some(h)) => h
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .find_map(|w| w.client_config.ca_bundle.map(|b| String::from_utf8_lossy(&b.0).into_owned())),
        Ok(None) => {
            out.push(Finding::Fail(
                "MutatingWebhookConfiguration plexus-injector not found: no sidecar injection".into(),
                "`plexus install kubernetes | kubectl apply -f -`".into(),
            ));
            None
        }
        Err(e) => {
            out.push(Finding::Fail(
                format!("cannot read the webhook configuration: {e}"),
                "check the kubeconfig's permissions".into(),
            ));
            None
        }
    };
    match secrets.get_opt(WEBHOOK_SECRET).await {
        Ok(Some(s)) => {
            let chain = s.data.as_ref().and_then(|d| d.get("tls.crt")).map(|b| String::from_utf8_lossy(&b.0).into_owned());
            match (chain, bundle) {
                (Some(chain), Some(bundle)) => out.push(webhook_certificate(&chain, &bundle, unix_now())),
                (None, _) => out.push(Finding::Fail(
                    format!("webhook certificate: Secret {NAMESPACE}/{WEBHOOK_SECRET} has no tls.crt"),
                    "`plexus install kubernetes --identity-dir DIR | kubectl apply -f -`".into(),
                )),
                (Some(_), None) => {}
            }
        }
        Ok(None) => out.push(Finding::Fail(
            format!("webhook certificate missing: Secret {NAMESPACE}/{WEBHOOK_SECRET} not found (the injection webhook cannot serve)"),
            "`plexus install kubernetes --identity-dir DIR | kubectl apply -f -`, then restart the control plane".into(),
        )),
        Err(e) => out.push(Finding::Fail(
            format!("cannot read Secret {NAMESPACE}/{WEBHOOK_SECRET}: {e}"),
            "check the kubeconfig's permissions".into(),
        )),
    }
    // Pods that should have the proxy: in namespaces labelled plexus.dev/inject=enabled, or
    // annotated, and not opted out.
    out.push(injection(&client).await);
    out
}

async fn injection(client: &kube::Client) -> Finding {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let enabled: std::collections::BTreeSet<String> = match namespaces
        .list(&ListParams::default().labels("plexus.dev/inject=enabled"))
        .await
    {
        Ok(l) => l.items.into_iter().filter_map(|n| n.metadata.name).collect(),
        Err(e) => {
            return Finding::Fail(format!("cannot list namespaces: {e}"), "check the kubeconfig's permissions".into());
        }
    };
    let pods: Api<Pod> = Api::all(client.clone());
    let list = match pods.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(e) => return Finding::Fail(format!("cannot list pods: {e}"), "check the kubeconfig's permissions".into()),
    };
    let mut wanted = 0;
    let mut missing = Vec::new();
    for p in &list {
        let annotation = p.metadata.annotations.as_ref().and_then(|a| a.get("plexus.dev/inject")).map(String::as_str);
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let should = match annotation {
            Some("disabled") => false,
            Some("enabled") => true,
            _ => enabled.contains(&ns),
        };
        let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if !should || !running {
            continue;
        }
        wanted += 1;
        if !crate::translate::is_meshed(p) {
            missing.push(format!("{ns}/{}", p.metadata.name.clone().unwrap_or_default()));
        }
    }
    if missing.is_empty() {
        Finding::Ok(format!("{wanted} pod(s) to be injected have the proxy"))
    } else {
        Finding::Fail(
            format!("pods without the proxy although injection is enabled for them: {}", missing.join(", ")),
            "they started before injection was enabled (or while the webhook was down): `kubectl rollout restart` their deployments".into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webhook_certificate_must_chain_to_the_bundle_and_outlive_60_days() {
        let dir = std::env::temp_dir().join(format!("plexus-access-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let m = crate::install::identity_material(&dir).expect("material");
        let end = crate::install::webhook_not_after(&m.webhook_chain_pem).expect("notAfter");
        let day = 86_400;
        assert!(matches!(webhook_certificate(&m.webhook_chain_pem, &m.anchor_pem, end - 90 * day), Finding::Ok(_)));
        let soon = webhook_certificate(&m.webhook_chain_pem, &m.anchor_pem, end - 30 * day);
        assert!(matches!(&soon, Finding::Fail(w, _) if w.contains("within 60 days")), "{soon:?}");
        let expired = webhook_certificate(&m.webhook_chain_pem, &m.anchor_pem, end + day);
        assert!(matches!(&expired, Finding::Fail(w, _) if w.contains("expired")), "{expired:?}");
        // Another mesh's anchor does not vouch for it; nor does garbage.
        let other = std::env::temp_dir().join(format!("plexus-access-other-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&other);
        let stranger = crate::install::identity_material(&other).expect("material");
        let foreign = webhook_certificate(&m.webhook_chain_pem, &stranger.anchor_pem, end - 90 * day);
        assert!(matches!(&foreign, Finding::Fail(w, _) if w.contains("does not chain")), "{foreign:?}");
        let garbage = webhook_certificate("not PEM", &m.anchor_pem, end - 90 * day);
        assert!(matches!(&garbage, Finding::Fail(w, _) if w.contains(WEBHOOK_SECRET)), "{garbage:?}");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&other);
    }
}
