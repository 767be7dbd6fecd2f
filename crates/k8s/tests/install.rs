//! `plexus install kubernetes` renders a YAML stream `kubectl apply -f -` accepts: every
//! document an object, the Secrets reused from `--identity-dir`.

use plexus_k8s::install::{InstallOptions, render};
use serde_json::Value;

fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml).expect("YAML documents").into_iter().filter(|v| !v.is_null()).collect()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("plexus-k8s-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn secrets(docs: &[Value]) -> Vec<Value> {
    docs.iter().filter(|d| d["kind"] == "Secret").cloned().collect()
}

#[test]
fn every_document_is_an_object_and_identity_dir_keeps_the_secrets() {
    let dir = temp_dir("install");
    let options = InstallOptions { identity_dir: Some(dir.clone()), ..InstallOptions::default() };
    let first = documents(&render(&options).expect("renders"));
    for d in &first {
        assert!(d["apiVersion"].as_str().is_some_and(|s| !s.is_empty()), "apiVersion: {d}");
        assert!(d["kind"].as_str().is_some_and(|s| !s.is_empty()), "kind: {d}");
        assert!(d["metadata"]["name"].as_str().is_some_and(|s| !s.is_empty()), "metadata.name: {d}");
    }
    let kinds: Vec<&str> = first.iter().filter_map(|d| d["kind"].as_str()).collect();
    for wanted in [
        "CustomResourceDefinition",
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Secret",
        "Deployment",
        "Service",
        "MutatingWebhookConfiguration",
    ] {
        assert!(kinds.contains(&wanted), "{wanted} missing from {kinds:?}");
    }
    // The namespace comes before everything in it.
    let ns_at = kinds.iter().position(|k| *k == "Namespace").expect("namespace");
    let first_namespaced =
        first.iter().position(|d| d["metadata"]["namespace"] == "plexus-system").expect("namespaced");
    assert!(ns_at < first_namespaced);

    let again = documents(&render(&options).expect("renders again"));
    assert_eq!(secrets(&first), secrets(&again), "the same identity dir: the same Secrets");
    assert_eq!(secrets(&first).len(), 3);
    let names: Vec<&str> =
        first.iter().filter(|d| d["kind"] == "Secret").filter_map(|d| d["metadata"]["name"].as_str()).collect();
    assert_eq!(names, ["plexus-identity", "plexus-webhook-tls", "plexus-admin-token"]);
    // The anchor's key stays in the directory; the cluster gets the anchor, issuer and its key.
    let identity = &secrets(&first)[0]["stringData"];
    let keys: Vec<&String> = identity.as_object().expect("stringData").keys().collect();
    assert_eq!(keys, ["ca.crt", "issuer.crt", "issuer.key"]);
    assert!(
        !render(&options)
            .expect("renders")
            .contains(&std::fs::read_to_string(dir.join("trust-anchor-key.pem")).expect("key"))
    );

    // The webhook's CA bundle is the trust anchor its certificate chains to.
    let webhook = first.iter().find(|d| d["kind"] == "MutatingWebhookConfiguration").expect("webhook");
    let bundle = webhook["webhooks"][0]["clientConfig"]["caBundle"].as_str().expect("caBundle");
    let anchor: k8s_openapi::ByteString = serde_json::from_value(Value::String(bundle.into())).expect("base64");
    assert_eq!(String::from_utf8(anchor.0).expect("PEM"), identity["ca.crt"].as_str().expect("ca.crt"));
    let chain = secrets(&first)[1]["stringData"]["tls.crt"].as_str().expect("tls.crt").to_string();
    assert!(chain.ends_with(identity["ca.crt"].as_str().expect("ca.crt")), "leaf, issuer, anchor");

    // Without an identity dir, new material every time.
    let fresh = documents(&render(&InstallOptions::default()).expect("renders"));
    assert_ne!(secrets(&fresh), secrets(&first));
    // --skip-gateway-api leaves out the three Gateway API CRDs.
    let skipped = documents(&render(&InstallOptions { skip_gateway_api: true, ..options.clone() }).expect("renders"));
    assert_eq!(first.len() - skipped.len(), 3);
    assert!(!skipped.iter().any(|d| d["metadata"]["name"] == "httproutes.gateway.networking.k8s.io"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rbac_is_least_privilege() {
    let docs = documents(&render(&InstallOptions::default()).expect("renders"));
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").expect("cluster role");
    let text = role["rules"].to_string();
    assert!(!text.contains("secrets"), "no Secrets cluster-wide: {text}");
    assert!(!text.contains('*'), "no wildcards: {text}");
    assert!(!text.contains("leases"), "leases only in plexus-system: {text}");
    assert!(text.contains("tokenreviews"));
    let ns_role = docs.iter().find(|d| d["kind"] == "Role").expect("role");
    assert_eq!(ns_role["metadata"]["namespace"], "plexus-system");
    assert!(ns_role["rules"].to_string().contains("leases"));
}

/// Whether a `namespaceSelector` of `matchExpressions` (In / NotIn, as rendered) selects a
/// namespace with `labels`, as the API server evaluates it (NotIn matches an absent label).
fn selects(selector: &Value, labels: &[(&str, &str)]) -> bool {
    selector["matchExpressions"].as_array().expect("matchExpressions").iter().all(|e| {
        let value = labels.iter().find(|(k, _)| Some(*k) == e["key"].as_str()).map(|(_, v)| *v);
        let listed = value.is_some_and(|v| e["values"].as_array().expect("values").iter().any(|x| x == v));
        match e["operator"].as_str() {
            Some("In") => listed,
            Some("NotIn") => !listed,
            other => panic!("operator {other:?}"),
        }
    })
}

/// Pods of namespaces labelled `plexus.dev/inject=enabled` go to a `failurePolicy: Fail`
/// webhook (never admitted unmeshed while it is down), every other namespace's to an
/// `Ignore` one (annotation opt-in); `plexus-system` and `kube-system` to neither.
#[test]
fn labelled_namespaces_fail_closed_and_the_annotation_path_fails_open() {
    let docs = documents(&render(&InstallOptions::default()).expect("renders"));
    let config = docs.iter().find(|d| d["kind"] == "MutatingWebhookConfiguration").expect("webhook configuration");
    let hooks = config["webhooks"].as_array().expect("webhooks");
    assert_eq!(hooks.len(), 2);
    let chosen = |labels: &[(&str, &str)]| -> Vec<(String, String, String)> {
        hooks
            .iter()
            .filter(|h| selects(&h["namespaceSelector"], labels))
            .map(|h| {
                let s = |v: &Value| v.as_str().expect("string").to_string();
                (s(&h["name"]), s(&h["failurePolicy"]), s(&h["clientConfig"]["service"]["path"]))
            })
            .collect()
    };
    let fail = ("namespace.inject.plexus.dev".to_string(), "Fail".to_string(), "/inject/namespace".to_string());
    let ignore = ("inject.plexus.dev".to_string(), "Ignore".to_string(), "/inject".to_string());
    let name = "kubernetes.io/metadata.name";
    assert_eq!(chosen(&[("plexus.dev/inject", "enabled")]), std::slice::from_ref(&fail), "1.20: no name label");
    assert_eq!(chosen(&[("plexus.dev/inject", "enabled"), (name, "bookinfo")]), [fail]);
    assert_eq!(chosen(&[]), std::slice::from_ref(&ignore));
    assert_eq!(chosen(&[(name, "default"), ("team", "a")]), [ignore]);
    assert!(chosen(&[("plexus.dev/inject", "disabled")]).is_empty());
    // The control plane's own namespace, as rendered: never sent to its own webhook, by its
    // label on 1.20 and by its name as well on 1.21+ (even if someone relabels it).
    let ns = docs.iter().find(|d| d["kind"] == "Namespace").expect("namespace");
    let ns_labels: Vec<(&str, &str)> = ns["metadata"]["labels"]
        .as_object()
        .expect("labels")
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str().expect("label value")))
        .collect();
    assert!(chosen(&ns_labels).is_empty(), "{ns_labels:?}");
    assert!(chosen(&[(name, "plexus-system"), ("plexus.dev/inject", "enabled")]).is_empty());
    assert!(chosen(&[(name, "kube-system"), ("plexus.dev/inject", "enabled")]).is_empty());
    assert!(chosen(&[(name, "kube-system")]).is_empty());
    // Same service, port and CA bundle; only pods are reviewed, on creation.
    for h in hooks {
        assert_eq!(h["clientConfig"]["caBundle"], hooks[0]["clientConfig"]["caBundle"]);
        assert_eq!(h["clientConfig"]["service"]["name"], "plexus-control");
        assert_eq!(h["clientConfig"]["service"]["port"], 7743);
        assert_eq!(h["rules"][0]["resources"], serde_json::json!(["pods"]));
        assert_eq!(h["rules"][0]["operations"], serde_json::json!(["CREATE"]));
    }
}
