//! The webhook's AdmissionReview handling (pure): the JSONPatch it answers, applied to the
//! request's pod, gives the injected pod; pods not opted in are admitted unchanged; a bad
//! annotation is refused with the reason.

use std::collections::BTreeMap;

use plexus_k8s::inject::{InjectConfig, inject_object};
use plexus_k8s::webhook::review;
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
    let answer = review(&admission(&pod()), &labels, Some(&config()));
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
    let answer = review(&admission(&pod()), &none, Some(&config()));
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    // Opted in, but the injection settings are unavailable: admitted without a proxy.
    let mut opted = pod();
    opted["metadata"]["annotations"] = json!({"plexus.dev/inject": "enabled"});
    let answer = review(&admission(&opted), &none, None);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
    // A bad skip-ports annotation: refused, naming it.
    opted["metadata"]["annotations"]["plexus.dev/skip-ports"] = json!("99999");
    let answer = review(&admission(&opted), &none, Some(&config()));
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().expect("message");
    assert!(message.contains("plexus.dev/skip-ports") && message.contains("99999"), "{message}");
}
