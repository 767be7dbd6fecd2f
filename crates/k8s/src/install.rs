//! `plexus install kubernetes`: one YAML stream with the CRDs, namespace, RBAC, ServiceAccount,
//! Secrets, control-plane Deployment and Service, and the MutatingWebhookConfiguration.
//!
//! Identity material (SPEC §11) lives in an *identity directory* laid out like a control
//! plane's data dir (`plexus identity init --data-dir DIR` makes one too): the trust anchor
//! (`trust-anchor.pem`, its key `trust-anchor-key.pem`), the issuer (`issuer.pem`,
//! `issuer-key.pem`), the admin token (`admin-token`), plus the webhook's serving certificate
//! (`webhook.crt`, chain to the anchor, and `webhook.key`). `--identity-dir DIR` creates what is
//! missing there and reuses what is present, so running the command again renders the same
//! Secrets; without it, everything is generated afresh. The anchor's key never leaves the
//! directory: the cluster gets the anchor certificate, the issuer and its key.
//!
//! In the pod, the Secrets `plexus-identity` (`ca.crt`, `issuer.crt`, `issuer.key`) and
//! `plexus-admin-token` (`token`) are projected into one directory, which
//! `plexus control --identity-dir` imports with [`import_identity`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use plexus_control::identity::{ANCHOR_CERT, ISSUER_CERT, ISSUER_KEY};
use serde_json::{Value, json};

/// The namespace Plexus's control plane runs in.
pub const NAMESPACE: &str = "plexus-system";
/// The control plane's Deployment, Service, ServiceAccount and Lease name.
pub const CONTROL: &str = "plexus-control";
/// Secret: trust anchor `ca.crt`, issuer `issuer.crt` + `issuer.key`.
pub const IDENTITY_SECRET: &str = "plexus-identity";
/// Secret (kubernetes.io/tls): the webhook's serving certificate.
pub const WEBHOOK_SECRET: &str = "plexus-webhook-tls";
/// Secret: the control plane's admin token, key `token`.
pub const ADMIN_TOKEN_SECRET: &str = "plexus-admin-token";
/// The webhook's serving certificate and key in an identity directory.
pub const WEBHOOK_CERT: &str = "webhook.crt";
pub const WEBHOOK_KEY: &str = "webhook.key";
/// The Secret keys, as mounted in the control-plane pod.
pub const SECRET_ANCHOR: &str = "ca.crt";
pub const SECRET_ISSUER: &str = "issuer.crt";
pub const SECRET_ISSUER_KEY: &str = "issuer.key";
pub const SECRET_ADMIN_TOKEN: &str = "admin-token";

/// `plexus control --identity-dir DIR`: copies the trust anchor, issuer and key mounted from the
/// Secret (`ca.crt`, `issuer.crt`, `issuer.key`; validated as a chain) and the admin token
/// (`admin-token`, when present) into the data dir, replacing what is there.
pub fn import_identity(identity_dir: &Path, data_dir: &Path) -> Result<(), String> {
    let read = |name: &str| {
        std::fs::read(identity_dir.join(name))
            .map_err(|e| format!("--identity-dir {}: cannot read {name}: {e}", identity_dir.display()))
    };
    let anchor = read(SECRET_ANCHOR)?;
    let issuer = read(SECRET_ISSUER)?;
    let key = String::from_utf8(read(SECRET_ISSUER_KEY)?)
        .map_err(|_| format!("--identity-dir {}: {SECRET_ISSUER_KEY} is not PEM text", identity_dir.display()))?;
    let ca = plexus_control::identity::ImportedCa::validate(&anchor, &issuer, &key)
        .map_err(|e| format!("--identity-dir {}: {e}", identity_dir.display()))?;
    create_private_dir(data_dir)?;
    ca.write_into(data_dir)?;
    if let Ok(token) = std::fs::read_to_string(identity_dir.join(SECRET_ADMIN_TOKEN)) {
        let token = token.trim();
        if token.is_empty() {
            return Err(format!("--identity-dir {}: {SECRET_ADMIN_TOKEN} is empty", identity_dir.display()));
        }
        write_private(&data_dir.join(plexus_control::datadir::ADMIN_TOKEN), token)?;
    }
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The webhook's DNS names (the Service `plexus-control` in `plexus-system`).
pub const WEBHOOK_DNS_NAMES: [&str; 3] = [
    "plexus-control.plexus-system.svc",
    "plexus-control.plexus-system",
    "plexus-control.plexus-system.svc.cluster.local",
];
/// A reused webhook certificate closer than this to its expiry is issued again.
pub const WEBHOOK_RENEW_BEFORE: Duration = Duration::from_secs(60 * 86_400);
/// The webhook certificate's lifetime (never beyond the issuer's).
const WEBHOOK_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// What `plexus install kubernetes` renders.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// The image every role runs from (`plexus:VERSION`).
    pub image: String,
    /// Reuse (and complete) identity material there; `None`: generate it afresh.
    pub identity_dir: Option<PathBuf>,
    /// Leave the Gateway API CRDs to the cluster's upstream ones.
    pub skip_gateway_api: bool,
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions { image: default_image(), identity_dir: None, skip_gateway_api: false }
    }
}

/// `plexus:VERSION` (SPEC §11).
pub fn default_image() -> String {
    format!("plexus:{}", env!("CARGO_PKG_VERSION"))
}

/// The identity material the Secrets carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityMaterial {
    pub anchor_pem: String,
    pub issuer_pem: String,
    pub issuer_key_pem: String,
    /// Leaf, issuer, anchor.
    pub webhook_chain_pem: String,
    pub webhook_key_pem: String,
    pub admin_token: String,
}

fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Reads the identity material from `dir`, creating what is missing there (trust anchor and
/// issuer, admin token, webhook certificate; a webhook certificate expiring within 60 days is
/// issued again).
pub fn identity_material(dir: &Path) -> Result<IdentityMaterial, String> {
    let data =
        plexus_control::datadir::DataDir::init(dir).map_err(|e| format!("--identity-dir {}: {e}", dir.display()))?;
    plexus_control::identity::ensure_ca(dir, plexus_core::names::DEFAULT_TRUST_DOMAIN)?;
    let cert_path = dir.join(WEBHOOK_CERT);
    let key_path = dir.join(WEBHOOK_KEY);
    let reusable = match (std::fs::read_to_string(&cert_path), key_path.exists()) {
        (Ok(pem), true) => {
            webhook_not_after(&pem).is_some_and(|end| end > unix_now() + WEBHOOK_RENEW_BEFORE.as_secs() as i64)
        }
        _ => false,
    };
    if !reusable {
        let ca = plexus_control::identity::Ca::load(dir)?;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let spiffe_id = plexus_core::names::control_plane_spiffe_id(plexus_core::names::DEFAULT_TRUST_DOMAIN);
        let leaf = ca
            .sign_control_plane(&key, &spiffe_id, &[], &WEBHOOK_DNS_NAMES, WEBHOOK_LIFETIME)
            .map_err(|e| format!("cannot sign the webhook certificate: {e:?}"))?;
        write_private(&key_path, &key.serialize_pem())?;
        write_private(&cert_path, &leaf.chain_pem)?;
    }
    Ok(IdentityMaterial {
        anchor_pem: read_text(&dir.join(ANCHOR_CERT))?,
        issuer_pem: read_text(&dir.join(ISSUER_CERT))?,
        issuer_key_pem: read_text(&dir.join(ISSUER_KEY))?,
        webhook_chain_pem: read_text(&cert_path)?,
        webhook_key_pem: read_text(&key_path)?,
        admin_token: data.admin_token,
    })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The `notAfter` (Unix seconds) of the first certificate in a PEM text.
pub fn webhook_not_after(pem: &str) -> Option<i64> {
    let certs = plexus_control::identity::parse_pem_certs(pem.as_bytes()).ok()?;
    Some(certs.first()?.summary.not_after_unix)
}

/// Renders the whole installation as one YAML stream (documents separated by `---`).
pub fn render(options: &InstallOptions) -> Result<String, String> {
    let material = match &options.identity_dir {
        Some(dir) => identity_material(dir)?,
        None => {
            let dir = std::env::temp_dir().join(format!("plexus-install-{:016x}", fastrand::u64(..)));
            let material = identity_material(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            material?
        }
    };
    let mut out = String::new();
    for object in objects(options, &material) {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&object).map_err(|e| format!("cannot render YAML: {e}"))?);
    }
    Ok(out)
}

/// Standard base64, as the API serializes bytes.
fn base64(bytes: &[u8]) -> String {
    match serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec())) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

fn labels() -> Value {
    json!({"app.kubernetes.io/name": "plexus", "app.kubernetes.io/part-of": "plexus", "app.kubernetes.io/component": "control-plane"})
}

/// What the control plane reads cluster-wide (the watches of [`crate::store`]), writes (the
/// custom resources and their status, from `plexus apply` and [`crate::status`]), and the
/// TokenReviews of [`crate::identity`] (EndpointSlices where served); namespaces are read by the injection webhook (opt-in
/// label). No Secrets: the control plane's own arrive as mounted volumes.
fn cluster_rules(skip_gateway_api: bool) -> Vec<Value> {
    let _ = skip_gateway_api; // the rules name the kinds whether or not Plexus installs their CRDs
    let mut by_group: std::collections::BTreeMap<&str, Vec<String>> = std::collections::BTreeMap::new();
    for kind in crate::crd::crd_kinds(false) {
        by_group.entry(crate::crd::group(kind)).or_default().push(crate::crd::plural(kind));
    }
    let mut rules = vec![
        json!({"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["get", "list", "watch"]}),
        // Servers with discovery.k8s.io/v1 (≥ 1.21): endpoints from EndpointSlices.
        json!({"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}),
        json!({"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}),
    ];
    for (group, plurals) in by_group {
        let status: Vec<String> = plurals.iter().map(|p| format!("{p}/status")).collect();
        rules.push(json!({"apiGroups": [group], "resources": plurals, "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}));
        rules.push(json!({"apiGroups": [group], "resources": status, "verbs": ["get", "update", "patch"]}));
    }
    rules
}

/// Every object of the installation, in apply order.
pub fn objects(options: &InstallOptions, m: &IdentityMaterial) -> Vec<Value> {
    let mut out: Vec<Value> =
        crate::crd::crds(options.skip_gateway_api).into_iter().filter_map(|c| serde_json::to_value(c).ok()).collect();
    let ns = NAMESPACE;
    out.push(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"app.kubernetes.io/part-of": "plexus", "plexus.dev/inject": "disabled"}}
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": CONTROL, "namespace": ns, "labels": labels()}
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": CONTROL, "labels": labels()},
        "rules": cluster_rules(options.skip_gateway_api)
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": CONTROL, "labels": labels()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROL},
        "subjects": [{"kind": "ServiceAccount", "name": CONTROL, "namespace": ns}]
    }));
    // Leader election's Lease and the webhook's own Service, in plexus-system only.
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": CONTROL, "namespace": ns, "labels": labels()},
        "rules": [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [CONTROL], "verbs": ["get", "update", "patch"]},
            {"apiGroups": [""], "resources": ["services"], "resourceNames": [CONTROL], "verbs": ["get"]}
        ]
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": CONTROL, "namespace": ns, "labels": labels()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROL},
        "subjects": [{"kind": "ServiceAccount", "name": CONTROL, "namespace": ns}]
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": IDENTITY_SECRET, "namespace": ns, "labels": labels()},
        "stringData": {SECRET_ANCHOR: m.anchor_pem, SECRET_ISSUER: m.issuer_pem, SECRET_ISSUER_KEY: m.issuer_key_pem}
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": WEBHOOK_SECRET, "namespace": ns, "labels": labels()},
        "stringData": {"tls.crt": m.webhook_chain_pem, "tls.key": m.webhook_key_pem}
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": ADMIN_TOKEN_SECRET, "namespace": ns, "labels": labels()},
        "stringData": {"token": m.admin_token}
    }));
    out.push(deployment(&options.image));
    out.push(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": CONTROL, "namespace": ns, "labels": labels()},
        "spec": {
            "selector": {"app.kubernetes.io/name": "plexus", "app.kubernetes.io/component": "control-plane"},
            "ports": [
                {"name": "grpc", "port": 7700, "targetPort": 7700, "protocol": "TCP", "appProtocol": "grpc"},
                {"name": "http", "port": 7701, "targetPort": 7701, "protocol": "TCP", "appProtocol": "http"},
                {"name": "webhook", "port": 7743, "targetPort": 7743, "protocol": "TCP", "appProtocol": "https"}
            ]
        }
    }));
    out.push(webhook_configuration(&base64(m.anchor_pem.as_bytes())));
    out
}

/// The control-plane Deployment (k8s-shared contract: its command line, ports and mounts).
fn deployment(image: &str) -> Value {
    let pod_labels = json!({"app.kubernetes.io/name": "plexus", "app.kubernetes.io/component": "control-plane"});
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": CONTROL, "namespace": NAMESPACE, "labels": labels()},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": pod_labels},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {"plexus.dev/inject": "disabled"}},
                "spec": {
                    "serviceAccountName": CONTROL,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
                    "containers": [{
                        "name": "control",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["/usr/local/bin/plexus"],
                        "args": [
                            "control", "--store", "kubernetes",
                            "--identity-dir", "/etc/plexus/identity",
                            "--data-dir", "/var/lib/plexus",
                            "--http-addr", "0.0.0.0:7701",
                            "--grpc-addr", "0.0.0.0:7700",
                            "--webhook-addr", "0.0.0.0:7743",
                            "--webhook-tls-dir", "/etc/plexus/webhook"
                        ],
                        "env": [
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "RUST_LOG", "value": "info"}
                        ],
                        "ports": [
                            {"name": "grpc", "containerPort": 7700, "protocol": "TCP"},
                            {"name": "http", "containerPort": 7701, "protocol": "TCP"},
                            {"name": "webhook", "containerPort": 7743, "protocol": "TCP"}
                        ],
                        // Ready once the injection webhook accepts connections (it starts last):
                        // `/healthz` answers earlier, and pods created in between would be refused
                        // (labelled namespaces: failurePolicy Fail) or admitted without their
                        // sidecar (annotation opt-in: Ignore).
                        "readinessProbe": {"tcpSocket": {"port": 7743}, "periodSeconds": 2},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 7701}, "initialDelaySeconds": 30, "periodSeconds": 10, "failureThreshold": 6},
                        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [
                            {"name": "identity", "mountPath": "/etc/plexus/identity", "readOnly": true},
                            {"name": "webhook-tls", "mountPath": "/etc/plexus/webhook", "readOnly": true},
                            // The emptyDir's root belongs to root (mode 0777): mounted on the
                            // parent, the control plane creates /var/lib/plexus itself and can
                            // keep it 0700, as the data dir's keys need.
                            {"name": "data", "mountPath": "/var/lib"}
                        ]
                    }],
                    "volumes": [
                        {"name": "identity", "projected": {"defaultMode": 0o440, "sources": [
                            {"secret": {"name": IDENTITY_SECRET}},
                            {"secret": {"name": ADMIN_TOKEN_SECRET, "items": [{"key": "token", "path": SECRET_ADMIN_TOKEN}]}}
                        ]}},
                        {"name": "webhook-tls", "secret": {"secretName": WEBHOOK_SECRET, "defaultMode": 0o440}},
                        {"name": "data", "emptyDir": {}}
                    ]
                }
            }
        }
    })
}

/// The MutatingWebhookConfiguration: two webhooks on the `plexus-control` Service
/// (`crate::webhook`), as Linkerd and Istio split them, so that a pod meant for the mesh
/// never runs outside it:
/// - `namespace.inject.plexus.dev` (path [`crate::webhook::NAMESPACE_PATH`]) for namespaces
///   labelled `plexus.dev/inject=enabled`, `failurePolicy: Fail`: while the webhook is
///   unavailable such pods are not created (their controllers retry), and the webhook itself
///   refuses a pod it cannot inject;
/// - `inject.plexus.dev` (path [`crate::webhook::ANNOTATION_PATH`]) for every other namespace
///   not labelled `disabled`, `failurePolicy: Ignore`: only pods annotated
///   `plexus.dev/inject: enabled` are injected (an annotation cannot be selected on, so the
///   webhook decides), and an outage never blocks pod creation in namespaces that did not
///   opt in.
///
/// `plexus-system` (labelled `disabled` by the install, so the control plane never waits on
/// its own webhook) and `kube-system` are excluded by name where the server sets
/// `kubernetes.io/metadata.name` (1.21+).
pub fn webhook_configuration(ca_bundle_b64: &str) -> Value {
    let webhook = |name: &str, path: &str, failure_policy: &str, inject_label: Value| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure_policy,
            "reinvocationPolicy": "Never",
            "timeoutSeconds": 10,
            "clientConfig": {
                "service": {"name": CONTROL, "namespace": NAMESPACE, "path": path, "port": 7743},
                "caBundle": ca_bundle_b64
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchExpressions": [
                inject_label,
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", NAMESPACE]}
            ]}
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "plexus-injector", "labels": labels()},
        "webhooks": [
            webhook(
                "namespace.inject.plexus.dev",
                crate::webhook::NAMESPACE_PATH,
                "Fail",
                json!({"key": crate::inject::INJECT_KEY, "operator": "In", "values": ["enabled"]}),
            ),
            webhook(
                "inject.plexus.dev",
                crate::webhook::ANNOTATION_PATH,
                "Ignore",
                json!({"key": crate::inject::INJECT_KEY, "operator": "NotIn", "values": ["enabled", "disabled"]}),
            ),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }
}
