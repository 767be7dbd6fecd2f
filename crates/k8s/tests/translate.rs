//! Kubernetes → Plexus translation from API objects as the API server returns them
//! (fixtures/: a ServiceList, a PodList and an HTTPRoute in the shapes of Kubernetes 1.20, and
//! an EndpointSliceList as `discovery.k8s.io/v1` serves it).

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIGroupList;
use plexus_core::resource::PortRef;
use plexus_core::{Kind, MeshSnapshot, ServiceName, Spec};
use plexus_k8s::translate;
use serde_json::Value;

fn items<T: serde::de::DeserializeOwned>(fixture: &str) -> Vec<T> {
    let list: Value = serde_json::from_str(fixture).expect("fixture is JSON");
    let items = list.get("items").and_then(Value::as_array).expect("a List").clone();
    items.into_iter().map(|i| serde_json::from_value(i).expect("a valid object")).collect()
}

#[test]
fn services_keep_selector_tcp_ports_protocols_and_cluster_ip() {
    let services: Vec<Service> = items(include_str!("fixtures/services.json"));
    let translated: Vec<_> = services.iter().filter_map(translate::service).collect();
    assert_eq!(translated.len(), 2, "ExternalName is not a mesh Service");
    let reviews = &translated[0];
    assert_eq!((reviews.kind, reviews.key().as_str()), (Kind::Service, "bookinfo/reviews"));
    assert_eq!(
        reviews.metadata.annotations.get(translate::CLUSTER_IP_ANNOTATION).map(String::as_str),
        Some("10.96.41.7")
    );
    assert!(!reviews.metadata.annotations.contains_key("kubectl.kubernetes.io/last-applied-configuration"));
    let Spec::Service(spec) = &reviews.spec else { panic!("a Service") };
    assert_eq!(spec.selector.get("app").map(String::as_str), Some("reviews"));
    assert_eq!(spec.ports[0].port, 9080);
    assert_eq!(spec.ports[0].target_port, Some(PortRef::Number(9080)));
    assert_eq!(spec.ports[0].app_protocol.as_deref(), Some("http"), "from the port name");

    let echo = &translated[1];
    assert!(echo.metadata.annotations.is_empty(), "headless: no virtual address");
    let Spec::Service(spec) = &echo.spec else { panic!("a Service") };
    assert_eq!(spec.ports.len(), 2, "the UDP port is not meshed");
    assert_eq!(spec.ports[0].target_port, Some(PortRef::Name("grpc".into())));
    assert_eq!(spec.ports[0].app_protocol.as_deref(), Some("grpc"), "grpc-api");
    assert_eq!(spec.ports[1].app_protocol.as_deref(), Some("http2"), "kubernetes.io/h2c");
}

#[test]
fn only_running_ready_pods_are_workloads_meshed_when_injected() {
    let services: Vec<Service> = items(include_str!("fixtures/services.json"));
    let services: Vec<_> = services.iter().filter_map(translate::service).collect();
    let pods: Vec<Pod> = items(include_str!("fixtures/pods.json"));
    let workloads: Vec<_> =
        pods.iter().filter_map(|p| translate::pod(p, &translate::selected_target_ports(p, &services))).collect();
    let names: Vec<&str> = workloads.iter().map(|w| w.metadata.name.as_str()).collect();
    assert_eq!(
        names,
        ["reviews-v2-7d8c9f6b5-x2kqp", "reviews-v1-5c6b7d8e9-abcde"],
        "not Ready, Pending, terminating: out"
    );

    let Spec::Workload(v2) = &workloads[0].spec else { panic!("a Workload") };
    assert_eq!(v2.address, "10.244.0.12");
    assert!(v2.meshed, "has the plexus-proxy container");
    assert_eq!(v2.service_account.as_deref(), Some("bookinfo-reviews"));
    assert_eq!(v2.ports.iter().map(|p| p.port).collect::<Vec<_>>(), [9080], "the proxy's own ports are not the app's");
    assert_eq!(workloads[0].metadata.labels.get("version").map(String::as_str), Some("v2"));

    let Spec::Workload(v1) = &workloads[1].spec else { panic!("a Workload") };
    assert!(!v1.meshed, "no proxy container");
    assert_eq!(v1.service_account.as_deref(), Some("default"));
    assert_eq!(
        v1.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
        [9080],
        "undeclared, from the Service's targetPort"
    );

    // The same compiled mesh as universal mode: reviews:9080 has both pods, the injected one
    // with its SPIFFE identity.
    let all: Vec<_> = services.iter().chain(&workloads).cloned().collect();
    let snapshot = MeshSnapshot::compile(&all, "1");
    let (svc, port) = snapshot.resolve_authority("reviews.bookinfo:9080").expect("resolves");
    assert_eq!(svc.name, ServiceName::new("reviews", "bookinfo"));
    let endpoints: Vec<(String, bool)> = port.endpoints.iter().map(|e| (e.addr.to_string(), e.meshed)).collect();
    assert_eq!(endpoints, [("10.244.0.12:9080".to_string(), true), ("10.244.0.13:9080".to_string(), false)]);
    assert_eq!(port.endpoints[0].principal.as_deref(), Some("spiffe://plexus.local/ns/bookinfo/sa/bookinfo-reviews"));
    // The ClusterIP is the Service's virtual address (transparent traffic, sidecar DNS).
    let cluster_ip: std::net::IpAddr = "10.96.41.7".parse().expect("ip");
    assert_eq!(snapshot.by_virtual_ip.get(&cluster_ip), Some(&ServiceName::new("reviews", "bookinfo")));
}

#[test]
fn custom_resources_are_validated_like_plexus_apply() {
    let route: Value = serde_json::from_str(include_str!("fixtures/httproute.json")).expect("json");
    let r = translate::custom_resource(Kind::HttpRoute, &route).expect("valid");
    assert_eq!((r.kind, r.key().as_str()), (Kind::HttpRoute, "bookinfo/reviews"));
    assert_eq!(r.metadata.resource_version.as_deref(), Some("2001"));
    assert!(r.metadata.annotations.is_empty(), "kubectl's last-applied copy is dropped");
    let Spec::HttpRoute(spec) = &r.spec else { panic!("an HTTPRoute") };
    assert_eq!(spec.rules.len(), 2);
    assert_eq!(spec.rules[1].backend_refs[0].weight, 80);

    // What the schema cannot say, plexus-core does: the reason names the field.
    let mut bad = route.clone();
    bad["spec"]["rules"][1]["backendRefs"][0]["port"] = Value::from(70000);
    let err = translate::custom_resource(Kind::HttpRoute, &bad).expect_err("port out of range");
    assert!(err.contains("spec.rules[1].backendRefs[0].port"), "{err}");
    let mut regex = route.clone();
    regex["spec"]["rules"][0]["matches"][0]["path"] = serde_json::json!({"type": "RegularExpression", "value": "(["});
    let err = translate::custom_resource(Kind::HttpRoute, &regex).expect_err("bad regex");
    assert!(err.contains("spec.rules[0].matches[0].path"), "{err}");

    // MeshConfig is cluster-scoped.
    let mesh = serde_json::json!({
        "apiVersion": "plexus.dev/v1alpha1", "kind": "MeshConfig",
        "metadata": {"name": "default", "uid": "1", "generation": 1, "resourceVersion": "5"},
        "spec": {"mtls": {"mode": "strict"}}
    });
    let m = translate::custom_resource(Kind::MeshConfig, &mesh).expect("valid");
    assert_eq!(m.metadata.namespace, None);
}

/// A pod as 1.20 reports it, with `restartPolicy` and the app container's state given; the
/// proxy container `plexus-proxy` is running.
fn pod_with(restart_policy: Option<&str>, app_states: &[Value]) -> k8s_openapi::api::core::v1::Pod {
    let mut containers: Vec<Value> = (0..app_states.len())
        .map(|i| serde_json::json!({"name": format!("app{i}"), "image": "plexus:0.1.0"}))
        .collect();
    containers.insert(0, serde_json::json!({"name": "plexus-proxy", "image": "plexus:0.1.0"}));
    let mut statuses: Vec<Value> = app_states
        .iter()
        .enumerate()
        .map(|(i, state)| {
            serde_json::json!({"name": format!("app{i}"), "ready": false, "restartCount": 0,
                "image": "docker.io/library/plexus:0.1.0", "imageID": "sha256:1", "state": state})
        })
        .collect();
    statuses.push(serde_json::json!({"name": "plexus-proxy", "ready": true, "restartCount": 0,
        "image": "docker.io/library/plexus:0.1.0", "imageID": "sha256:1",
        "state": {"running": {"startedAt": "2026-12-07T00:40:00Z"}}}));
    let mut spec = serde_json::json!({"containers": containers, "serviceAccountName": "fetcher"});
    if let Some(p) = restart_policy {
        spec["restartPolicy"] = p.into();
    }
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "fetch-details-x7k2p", "namespace": "bookinfo", "labels": {"job-name": "fetch-details"}},
        "spec": spec,
        "status": {"phase": "Running", "podIP": "10.244.0.31", "containerStatuses": statuses}
    }))
    .expect("a pod")
}

fn terminated(exit_code: i32) -> Value {
    serde_json::json!({"terminated": {"exitCode": exit_code, "reason": if exit_code == 0 { "Completed" } else { "Error" },
        "startedAt": "2026-12-07T00:40:01Z", "finishedAt": "2026-12-07T00:40:03Z", "containerID": "containerd://ab"}})
}

fn running() -> Value {
    serde_json::json!({"running": {"startedAt": "2026-12-07T00:40:01Z"}})
}

/// A Job's app container that exited (either way) under `restartPolicy: Never` has finished:
/// its proxy must exit so the pod completes; its phase then reports the app's outcome.
#[test]
fn a_jobs_pod_whose_app_containers_exited_has_finished() {
    let ok = pod_with(Some("Never"), &[terminated(0)]);
    assert!(translate::workload_finished(&ok));
    assert!(translate::workload_finished(&pod_with(Some("Never"), &[terminated(1)])), "a failure is final too");
    assert!(translate::workload_finished(&pod_with(Some("OnFailure"), &[terminated(0)])));
    assert!(translate::workload_finished(&pod_with(Some("Never"), &[terminated(0), terminated(3)])));
    let finished = translate::finished_workloads([&ok]);
    assert_eq!(
        finished.into_iter().collect::<Vec<_>>(),
        [(("bookinfo".to_string(), "fetch-details-x7k2p".to_string()), "fetcher".to_string())],
        "keyed by pod, with the service account its proxy authenticates as"
    );
}

/// Never for a long-running Deployment's pod (restartPolicy Always: kubelet restarts the app,
/// whose state is `terminated` for a moment), nor while any app container may still run.
#[test]
fn a_pod_whose_app_may_still_run_or_restart_has_not_finished() {
    assert!(!translate::workload_finished(&pod_with(None, &[terminated(0)])), "default Always (Deployment)");
    assert!(!translate::workload_finished(&pod_with(Some("Always"), &[terminated(0)])));
    assert!(!translate::workload_finished(&pod_with(Some("Always"), &[terminated(137)])));
    let waiting = serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}});
    assert!(!translate::workload_finished(&pod_with(Some("Always"), &[waiting])), "restarting");
    assert!(!translate::workload_finished(&pod_with(Some("OnFailure"), &[terminated(1)])), "kubelet restarts it");
    assert!(!translate::workload_finished(&pod_with(Some("Never"), &[running()])));
    assert!(!translate::workload_finished(&pod_with(Some("Never"), &[terminated(0), running()])), "one still runs");
    // No status for the app container yet, no app container, not injected, already complete.
    let mut unknown = pod_with(Some("Never"), &[terminated(0)]);
    if let Some(statuses) = unknown.status.as_mut().and_then(|s| s.container_statuses.as_mut()) {
        statuses.retain(|c| c.name == "plexus-proxy");
    }
    assert!(!translate::workload_finished(&unknown));
    assert!(!translate::workload_finished(&pod_with(Some("Never"), &[])), "only the proxy");
    let mut plain = pod_with(Some("Never"), &[terminated(0)]);
    if let Some(s) = plain.spec.as_mut() {
        s.containers.retain(|c| c.name != "plexus-proxy");
    }
    assert!(!translate::workload_finished(&plain), "not injected: no proxy to tell");
    let mut done = pod_with(Some("Never"), &[terminated(0)]);
    if let Some(s) = done.status.as_mut() {
        s.phase = Some("Succeeded".into());
    }
    assert!(!translate::workload_finished(&done), "complete: its proxy has exited already");
    assert!(translate::finished_workloads([&pod_with(None, &[terminated(0)])]).is_empty());
}

/// The fixture's Pods (and two more for grpc-echo, which declare no container ports), by
/// `(namespace, name)`.
fn pods_by_key() -> std::collections::BTreeMap<(String, String), Pod> {
    let mut pods: Vec<Pod> = items(include_str!("fixtures/pods.json"));
    for name in ["grpc-echo-old", "grpc-echo-stopping"] {
        pods.push(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "default", "labels": {"app": "grpc-echo"},
                             "deletionTimestamp": "2026-12-06T20:10:00Z"},
                "spec": {"serviceAccountName": "grpc-echo", "containers": [{"name": "echo", "image": "plexus:0.1.0"},
                         {"name": "plexus-proxy", "image": "plexus:0.1.0"}]},
                "status": {"phase": "Running", "podIP": "10.244.0.20"}
            }))
            .expect("a Pod"),
        );
    }
    pods.into_iter()
        .map(|p| ((p.metadata.namespace.clone().unwrap_or_default(), p.metadata.name.clone().unwrap_or_default()), p))
        .collect()
}

#[test]
fn endpoint_slices_give_the_workloads_the_pods_path_gives() {
    let services: Vec<Service> = items(include_str!("fixtures/services.json"));
    let services: Vec<_> = services.iter().filter_map(translate::service).collect();
    let slices: Vec<EndpointSlice> = items(include_str!("fixtures/endpointslices.json"));
    let pods = pods_by_key();
    let from_slices: Vec<_> = translate::slice_workloads(&slices, &services, &pods)
        .into_iter()
        .filter(|w| w.metadata.namespace() == "bookinfo")
        .collect();
    let mut from_pods: Vec<_> = pods
        .values()
        .filter_map(|p| translate::pod(p, &translate::selected_target_ports(p, &services)))
        .filter(|w| w.metadata.namespace() == "bookinfo")
        .collect();
    from_pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    // Two slices of one Service: the ready endpoints of both; not ready (starting), terminating
    // while others are ready, and a pod the watch has not seen yet: out.
    assert_eq!(
        from_slices.iter().map(|w| w.metadata.name.as_str()).collect::<Vec<_>>(),
        ["reviews-v1-5c6b7d8e9-abcde", "reviews-v2-7d8c9f6b5-x2kqp"]
    );
    assert_eq!(from_slices, from_pods, "the same Workloads (labels, address, ports, service account, meshed)");
    // A slice of a Service that is not in the mesh adds nothing (no port 1234 on reviews-v2).
    let Spec::Workload(v2) = &from_slices[1].spec else { panic!("a Workload") };
    assert_eq!(v2.ports.iter().map(|p| p.port).collect::<Vec<_>>(), [9080]);
}

#[test]
fn a_service_whose_endpoints_all_terminate_keeps_those_still_serving_with_ports_by_name() {
    let services: Vec<Service> = items(include_str!("fixtures/services.json"));
    let services: Vec<_> = services.iter().filter_map(translate::service).collect();
    let slices: Vec<EndpointSlice> = items(include_str!("fixtures/endpointslices.json"));
    let workloads: Vec<_> = translate::slice_workloads(&slices, &services, &pods_by_key())
        .into_iter()
        .filter(|w| w.metadata.namespace() == "default")
        .collect();
    assert_eq!(
        workloads.iter().map(|w| w.metadata.name.as_str()).collect::<Vec<_>>(),
        ["grpc-echo-old"],
        "serving while terminating, as no endpoint is ready; one no longer serving is out"
    );
    let Spec::Workload(w) = &workloads[0].spec else { panic!("a Workload") };
    assert!(w.meshed);
    assert_eq!(w.service_account.as_deref(), Some("grpc-echo"));
    // The slice resolved the named targetPort `grpc` to 50051: the Workload's port keeps the
    // name, so the Service's `targetPort: grpc` finds it; UDP is not meshed.
    let ports: Vec<(Option<&str>, u16)> = w.ports.iter().map(|p| (p.name.as_deref(), p.port)).collect();
    assert_eq!(ports, [(None, 9091), (Some("grpc"), 50051)]);
    let all: Vec<_> = services.iter().chain(&workloads).cloned().collect();
    let snapshot = MeshSnapshot::compile(&all, "1");
    for (authority, endpoint) in
        [("grpc-echo.default:8080", "10.244.0.20:50051"), ("grpc-echo.default:9090", "10.244.0.20:9091")]
    {
        let (_, port) = snapshot.resolve_authority(authority).expect("resolves");
        let endpoints: Vec<String> = port.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(endpoints, [endpoint], "{authority}");
    }
}

#[test]
fn endpoint_slices_are_read_where_discovery_v1_is_served() {
    // `GET /apis` (the discovery.k8s.io entry of each server, trimmed to the groups that matter).
    let groups = |versions: &[&str]| -> APIGroupList {
        serde_json::from_value(serde_json::json!({
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": [
                {"name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
                 "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}},
                {"name": "discovery.k8s.io",
                 "versions": versions.iter().map(|v| serde_json::json!({"groupVersion": format!("discovery.k8s.io/{v}"), "version": v})).collect::<Vec<_>>(),
                 "preferredVersion": {"groupVersion": format!("discovery.k8s.io/{}", versions[0]), "version": versions[0]}}
            ]
        }))
        .expect("an APIGroupList")
    };
    use translate::EndpointSource::{EndpointSlices, Pods};
    assert_eq!(translate::endpoint_source(&groups(&["v1beta1"])), Pods, "1.20 (the lab node)");
    assert_eq!(translate::endpoint_source(&groups(&["v1", "v1beta1"])), EndpointSlices, "1.21 to 1.24");
    assert_eq!(translate::endpoint_source(&groups(&["v1"])), EndpointSlices, "1.25 and later");
    let none: APIGroupList = serde_json::from_value(serde_json::json!({"groups": []})).expect("empty");
    assert_eq!(translate::endpoint_source(&none), Pods);
}
