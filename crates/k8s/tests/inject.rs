//! The injection mutation (pure): opt-in rules, the containers added for 1.20 and for native
//! sidecars (≥ 1.29), skip-ports, probe rewriting, and every workload kind's pod template.

use std::collections::BTreeMap;

use plexus_k8s::inject::{Decision, InjectConfig, inject_object};
use serde_json::{Value, json};

fn config(native: bool) -> InjectConfig {
    InjectConfig {
        image: "plexus:0.1.0".into(),
        image_pull_policy: "IfNotPresent".into(),
        control_plane: "https://10.96.0.50:7700".into(),
        trust_anchor_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        native_sidecars: native,
    }
}

fn enabled() -> BTreeMap<String, String> {
    [("plexus.dev/inject".to_string(), "enabled".to_string())].into()
}

fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "reviews-v1-abc", "namespace": "default", "labels": {"app": "reviews"}, "annotations": annotations},
        "spec": {
            "serviceAccountName": "reviews",
            "initContainers": [{"name": "migrate", "image": "app:1"}],
            "containers": [{
                "name": "reviews", "image": "plexus:0.1.0",
                "ports": [{"name": "http", "containerPort": 9080}],
                "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 3},
                "livenessProbe": {"tcpSocket": {"port": 9080}}
            }]
        }
    })
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array().map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect()).unwrap_or_default()
}

fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name)
}

#[test]
fn a_pod_in_an_enabled_namespace_gets_init_and_proxy_first_on_1_20() {
    let mut p = pod(json!({"plexus.dev/skip-ports": "5432, 9090"}));
    assert_eq!(inject_object(&mut p, &enabled(), &config(false)), Ok(Decision::Inject));
    let spec = &p["spec"];
    // The app's own init containers run before the redirect; the proxy starts first.
    assert_eq!(names(&spec["initContainers"]), vec!["migrate", "plexus-init"]);
    assert_eq!(names(&spec["containers"]), vec!["plexus-proxy", "reviews"]);
    let init = &spec["initContainers"][1];
    assert_eq!(
        init["args"],
        json!([
            "init",
            "--proxy-uid",
            "1337",
            "--skip-inbound-ports",
            "5432,9090",
            "--skip-outbound-ports",
            "5432,9090"
        ])
    );
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    assert_eq!(init["securityContext"]["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
    let proxy = &spec["containers"][0];
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(proxy["command"], json!(["/usr/local/bin/plexus-proxy"]));
    assert_eq!(proxy["readinessProbe"]["httpGet"], json!({"path": "/ready", "port": 7712}));
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"],
        json!(["/usr/local/bin/plexus", "wait-ready", "--timeout", "120s"])
    );
    assert!(proxy.get("restartPolicy").is_none());
    assert_eq!(env_of(proxy, "PLEXUS_CONTROL_PLANE").expect("env")["value"], "https://10.96.0.50:7700");
    assert_eq!(
        env_of(proxy, "PLEXUS_TOKEN_FILE").expect("env")["value"],
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    );
    assert!(env_of(proxy, "PLEXUS_TRUST_ANCHOR_PEM").expect("env")["value"].as_str().expect("pem").contains("BEGIN"));
    assert_eq!(env_of(proxy, "PLEXUS_ADMIN_IP").expect("env")["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    assert_eq!(
        env_of(proxy, "PLEXUS_NAMESPACE").expect("env")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env_of(proxy, "PLEXUS_SERVICE_ACCOUNT").expect("env")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.serviceAccountName"
    );
    assert_eq!(env_of(proxy, "PLEXUS_DNS_ADDR").expect("env")["value"], "127.0.0.1:7753");
    // The readiness probe (named port) goes through the proxy's admin port; tcpSocket stays.
    let app = &spec["containers"][1];
    assert_eq!(app["readinessProbe"]["httpGet"], json!({"path": "/app-health/reviews/readiness", "port": 7712}));
    assert_eq!(app["readinessProbe"]["periodSeconds"], 3);
    assert_eq!(app["livenessProbe"], json!({"tcpSocket": {"port": 9080}}));
    let table: Value =
        serde_json::from_str(env_of(proxy, "PLEXUS_APP_PROBES").expect("env")["value"].as_str().expect("json"))
            .expect("JSON");
    assert_eq!(table, json!({"/app-health/reviews/readiness": {"port": 9080, "path": "/health"}}));
    assert_eq!(p["metadata"]["annotations"]["plexus.dev/injected"], "true");

    // Injecting again changes nothing.
    let before = p.clone();
    assert_eq!(inject_object(&mut p, &enabled(), &config(false)), Ok(Decision::Skip("already injected")));
    assert_eq!(p, before);
}

#[test]
fn native_sidecars_on_1_29_and_later() {
    assert!(!InjectConfig::native_sidecars_for_version("1.20").expect("version"));
    assert!(!InjectConfig::native_sidecars_for_version("v1.28.4").expect("version"));
    assert!(InjectConfig::native_sidecars_for_version("1.29").expect("version"));
    assert!(InjectConfig::native_sidecars_for("1", "30+"));
    assert!(InjectConfig::native_sidecars_for_version("one.two").is_err());
    let mut p = pod(json!({}));
    assert_eq!(inject_object(&mut p, &enabled(), &config(true)), Ok(Decision::Inject));
    let spec = &p["spec"];
    assert_eq!(names(&spec["initContainers"]), vec!["plexus-init", "plexus-proxy", "migrate"]);
    assert_eq!(names(&spec["containers"]), vec!["reviews"]);
    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(proxy["startupProbe"]["httpGet"], json!({"path": "/ready", "port": 7712}));
    assert!(proxy.get("lifecycle").is_none(), "no postStart hook with native sidecars");
}

#[test]
fn opt_in_and_opt_out() {
    let none = BTreeMap::new();
    let mut p = pod(json!({}));
    assert!(matches!(inject_object(&mut p, &none, &config(false)), Ok(Decision::Skip(_))));
    assert_eq!(names(&p["spec"]["containers"]), vec!["reviews"], "not opted in: unchanged");
    let mut p = pod(json!({"plexus.dev/inject": "enabled"}));
    assert_eq!(inject_object(&mut p, &none, &config(false)), Ok(Decision::Inject), "pod annotation opts in");
    let mut p = pod(json!({"plexus.dev/inject": "disabled"}));
    assert!(matches!(inject_object(&mut p, &enabled(), &config(false)), Ok(Decision::Skip(_))));
    assert_eq!(names(&p["spec"]["containers"]), vec!["reviews"], "disabled wins over the namespace");
    let mut p = pod(json!({}));
    p["spec"]["hostNetwork"] = json!(true);
    assert!(matches!(inject_object(&mut p, &enabled(), &config(false)), Ok(Decision::Skip(_))));
    // A bad skip-ports annotation is an error naming it.
    let mut p = pod(json!({"plexus.dev/skip-ports": "5432,http"}));
    let err = inject_object(&mut p, &enabled(), &config(false)).expect_err("bad port");
    assert!(err.contains("plexus.dev/skip-ports") && err.contains("http"), "{err}");
}

#[test]
fn every_workload_kind_has_its_template_injected() {
    let template = json!({"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "x", "image": "x"}]}});
    let cases = [
        ("apps/v1", "Deployment", "/spec/template"),
        ("apps/v1", "StatefulSet", "/spec/template"),
        ("apps/v1", "DaemonSet", "/spec/template"),
        ("apps/v1", "ReplicaSet", "/spec/template"),
        ("batch/v1", "Job", "/spec/template"),
        ("batch/v1", "CronJob", "/spec/jobTemplate/spec/template"),
    ];
    for (api, kind, at) in cases {
        let mut object = json!({"apiVersion": api, "kind": kind, "metadata": {"name": "x"}});
        let mut slot = &mut object;
        for key in at.split('/').skip(1) {
            slot = slot.as_object_mut().expect("object").entry(key).or_insert(json!({}));
        }
        *slot = template.clone();
        assert_eq!(inject_object(&mut object, &enabled(), &config(false)), Ok(Decision::Inject), "{kind}");
        let pod_spec = object.pointer(&format!("{at}/spec")).expect("spec");
        assert_eq!(names(&pod_spec["containers"]), vec!["plexus-proxy", "x"], "{kind}");
        assert_eq!(object.pointer(&format!("{at}/metadata/annotations/plexus.dev~1injected")), Some(&json!("true")));
    }
    let mut service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {}});
    let before = service.clone();
    assert!(matches!(inject_object(&mut service, &enabled(), &config(false)), Ok(Decision::Skip(_))));
    assert_eq!(service, before);
}
