//! The webhook's AdmissionReview handling (pure): the JSONPatch it answers, applied to the
//! request's pod, gives the injected pod; pods not opted in are admitted unchanged; a bad
//! annotation is refused with the reason.

use std::collections::BTreeMap;

use plexus_k8s::inject::{InjectConfig, inject_object};
use plexus_k8s::webhook::{OptIn, review};
use serde_json::{Value, json};

fn config() -> InjectConfig {
    InjectConfig {
        image: "plexus:0.1.0".into(),
        image_pull_policy: "IfNotPresent".into(),
        control_plane: "https://10.96.0.50:7700".into(),
        trust_anchor_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        native_sidecars: false,
    }
}

fn admission(pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "bookinfo", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "dryRun": false
        }
    })
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "ratings-v1-7d4b8c-", "namespace": "bookinfo", "labels": {"app": "ratings", "version": "v1"}},
        "spec": {
            "serviceAccountName": "ratings",
            "containers": [{"name": "ratings", "image": "plexus:0.1.0", "ports": [{"containerPort": 9080}],
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": 9080}}}]
        }
    })
}

fn decode(b64: &str) -> Vec<u8> {
    serde_json::from_value::<k8s_openapi::ByteString>(Value::String(b64.into())).expect("base64").0
}

#[test]
fn the_patch_applied_to_the_pod_is_the_injected_pod() {
    let labels: BTreeMap<String, String> = [("plexus.dev/inject".to_string(), "enabled".to_string())].into();
    let answer = review(&admission(&pod()), &labels, Some(&config()), OptIn::Namespace);
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch: json_patch::Patch =
        serde_json::from_slice(&decode(response["patch"].as_str().expect("patch"))).expect("a JSONPatch");
    let mut patched = pod();
    json_patch::patch(&mut patched, &patch).expect("the patch applies to the request's pod");
    let mut expected = pod();
    inject_object(&mut expected, &labels, &config()).expect("injects");
    // The webhook fills the namespace from the request when the pod lacks it; here it has it.
    assert_eq!(patched, expected);
    let containers: Vec<&str> =
        patched["spec"]["containers"].as_array().expect("list").iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(containers, vec!["plexus-proxy", "ratings"]);
    // Only additions and the rewritten probe: nothing of the app is removed.
    let ops_json = serde_json::to_value(&patch).expect("json");
    let ops: Vec<&str> = ops_json.as_array().expect("ops").iter().filter_map(|o| o["op"].as_str()).collect();
    assert!(ops.iter().all(|op| *op == "add" || *op == "replace"), "{ops:?}");
}

#[test]
fn pods_not_opted_in_are_admitted_unchanged_and_bad_annotations_refused() {
    let none = BTreeMap::new();
    let answer = review(&admission(&pod()), &none, Some(&config()), OptIn::Annotation);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    // Opted in, but the injection settings are unavailable: admitted without a proxy.
    let mut opted = pod();
    opted["metadata"]["annotations"] = json!({"plexus.dev/inject": "enabled"});
    let answer = review(&admission(&opted), &none, None, OptIn::Annotation);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
    // A bad skip-ports annotation: refused, naming it.
    opted["metadata"]["annotations"]["plexus.dev/skip-ports"] = json!("99999");
    let answer = review(&admission(&opted), &none, Some(&config()), OptIn::Annotation);
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().expect("message");
    assert!(message.contains("plexus.dev/skip-ports") && message.contains("99999"), "{message}");
}

/// A pod of a namespace labelled `plexus.dev/inject=enabled` (the `Fail` webhook's path) is
/// never admitted without its proxy: when the injection settings are unavailable it is
/// refused (its controller retries), while the same pod opted in by annotation only is
/// admitted unchanged (the `Ignore` path), and one opted out by annotation is admitted.
#[test]
fn a_pod_of_a_mesh_namespace_that_cannot_be_injected_is_refused() {
    let labelled: BTreeMap<String, String> = [("plexus.dev/inject".to_string(), "enabled".to_string())].into();
    let answer = review(&admission(&pod()), &labelled, None, OptIn::Namespace);
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert_eq!(answer["response"]["status"]["code"], 503);
    let message = answer["response"]["status"]["message"].as_str().expect("message");
    assert!(message.contains("bookinfo") && message.contains("plexus.dev/inject=enabled"), "{message}");
    // Positive control: with the settings, the same pod is admitted with its proxy.
    let answer = review(&admission(&pod()), &labelled, Some(&config()), OptIn::Namespace);
    assert_eq!((&answer["response"]["allowed"], &answer["response"]["patchType"]), (&json!(true), &json!("JSONPatch")));
    // Opted out by annotation in the labelled namespace: admitted unchanged, settings or not.
    let mut out = pod();
    out["metadata"]["annotations"] = json!({"plexus.dev/inject": "disabled"});
    for config in [None, Some(config())] {
        let answer = review(&admission(&out), &labelled, config.as_ref(), OptIn::Namespace);
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        assert!(answer["response"].get("patch").is_none(), "{answer}");
    }
    // Annotation path, settings unavailable: admitted unchanged (failurePolicy Ignore's promise).
    let mut opted = pod();
    opted["metadata"]["annotations"] = json!({"plexus.dev/inject": "enabled"});
    let answer = review(&admission(&opted), &BTreeMap::new(), None, OptIn::Annotation);
    assert_eq!(answer["response"]["allowed"], true);
}

/// A certificate for `host` (CN and SAN) and its key, PEM.
fn certificate(host: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, host);
    let cert = params.self_signed(&key).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

/// What `openssl s_client` (a real TLS client) is served at `addr`: the certificate's subject line.
fn served_subject(addr: std::net::SocketAddr) -> String {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-servername", "plexus-control.plexus-system.svc"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find(|l| l.starts_with("subject=")).unwrap_or_default().to_string()
}

/// The webhook's serving certificate is re-read when its files change (kubelet updates a
/// mounted Secret in place): new connections get the new one, a bad replacement keeps the last
/// good one, and reviews are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_certificate_is_reread_when_its_files_change() {
    use plexus_k8s::webhook::{Webhook, WebhookOptions};
    let dir = std::env::temp_dir().join(format!("plexus-webhook-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let write = |(chain, key): (String, String)| {
        std::fs::write(dir.join("tls.crt"), chain).expect("tls.crt");
        std::fs::write(dir.join("tls.key"), key).expect("tls.key");
    };
    write(certificate("first.plexus-control.plexus-system.svc"));
    let options = WebhookOptions {
        addr: ([127, 0, 0, 1], 0).into(),
        tls_dir: dir.clone(),
        data_dir: dir.join("data"),
        image: "plexus:0.1.0".into(),
        control_plane: Some("https://10.96.0.50:7700".into()),
        certificate_poll: std::time::Duration::from_millis(50),
    };
    let webhook = Webhook::bind(options.clone(), None).await.expect("binds");
    let addr = webhook.local_addr().expect("bound");
    let server = tokio::spawn(webhook.serve());
    let subject = move || tokio::task::spawn_blocking(move || served_subject(addr));
    assert!(subject().await.expect("runs").contains("first."), "the certificate at start");
    // Until the files change, and after they become garbage, the first one is served.
    write(("garbage".into(), "garbage".into()));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(subject().await.expect("runs").contains("first."), "a bad replacement keeps the last good one");
    // Reviews are answered meanwhile (curl, a real HTTPS client).
    let review = serde_json::to_string(&admission(&pod())).expect("json");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sk", "--max-time", "5", "-H", "Content-Type: application/json", "--data", &review])
            .arg(format!("https://{addr}/inject"))
            .output()
            .expect("curl runs")
    })
    .await
    .expect("runs");
    let answer: Value = serde_json::from_slice(&out.stdout).expect("an AdmissionReview");
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    // A new good pair: served to new connections within a few polls.
    write(certificate("second.plexus-control.plexus-system.svc"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let served = subject().await.expect("runs");
        if served.contains("second.") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still served: {served}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Missing files at start: refused with the reason, naming the directory.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    let refused =
        Webhook::bind(WebhookOptions { tls_dir: empty.clone(), ..options }, None).await.err().expect("refused");
    assert!(refused.contains("--webhook-tls-dir") && refused.contains("tls.crt"), "{refused}");
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
