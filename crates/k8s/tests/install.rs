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
