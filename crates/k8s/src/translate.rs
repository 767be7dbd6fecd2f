//! Pure translation of Kubernetes objects into Plexus resources (no I/O): core `v1` Services
//! into `Service`, the Pods behind them into `Workload`, and the custom resources (CRDs of
//! [`crate::crd`]) into the same resources universal mode reads, validated by plexus-core.
//!
//! - A **Service** keeps its selector and TCP ports; `targetPort` defaults to `port` (as in
//!   Kubernetes); `appProtocol` is the port's `appProtocol` when Plexus knows it, else read from
//!   the port name's prefix (`http`, `http-web`, `grpc-api`, as Istio and Linkerd users name
//!   them). Its ClusterIP is kept in the annotation [`CLUSTER_IP_ANNOTATION`]. ExternalName
//!   Services are not mesh Services.
//! - A **Pod** is a Workload while it is Running, Ready, has an IP and is not being deleted:
//!   labels as the pod's, address = pod IP, service account = `spec.serviceAccountName`,
//!   `meshed` when it has the injected proxy container ([`PROXY_CONTAINER`]). Its ports are
//!   its containers' TCP ports plus the numeric target ports of the Services selecting it
//!   (Kubernetes does not require declaring a port), each as `{port: P, targetPort: P}`: the
//!   pod's iptables redirect inbound traffic on P to its proxy, as `plexus run --netns` does.
//! - A **custom resource** keeps `name`, `namespace`, `labels`, `annotations` (less kubectl's
//!   last-applied copy), `resourceVersion`, `uid` and `creationTimestamp`; `status` and the
//!   server's other metadata are dropped; the rest is decoded and validated exactly as
//!   `plexus apply` does, and a failure is returned for the object's status.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta as KubeMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use plexus_core::resource::{PortRef, ServicePort, ServiceSpec, WorkloadPort, WorkloadSpec};
use plexus_core::{Kind, ObjectMeta, Resource, Spec};
use serde_json::Value;

/// The name of the proxy container the injector adds (`crate::inject`): a pod with it is
/// `meshed`.
pub const PROXY_CONTAINER: &str = "plexus-proxy";
/// Annotation carrying a Service's ClusterIP (its virtual address) on the translated Service.
pub const CLUSTER_IP_ANNOTATION: &str = plexus_core::model::VIRTUAL_IP_ANNOTATION;
/// kubectl's copy of the applied object: large, and never a setting.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn meta(m: &KubeMeta, namespaced: bool) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: if namespaced { Some(m.namespace.clone().unwrap_or_else(|| "default".into())) } else { None },
        labels: m.labels.clone().unwrap_or_default(),
        annotations: BTreeMap::new(),
        resource_version: m.resource_version.clone(),
        uid: m.uid.clone(),
        creation_timestamp: m.creation_timestamp.as_ref().map(|t| t.0.to_string()),
    }
}

/// The `appProtocol` Plexus reads from a Service port.
fn app_protocol(port: &k8s_openapi::api::core::v1::ServicePort) -> Option<String> {
    let known = |p: &str| plexus_core::AppProtocol::parse(p).map(|_| p.to_string());
    let declared = port.app_protocol.as_deref().map(|p| match p {
        "kubernetes.io/h2c" => "http2".to_string(),
        "kubernetes.io/ws" => "http".to_string(),
        "kubernetes.io/wss" | "https" => "tls".to_string(),
        other => other.to_ascii_lowercase(),
    });
    if let Some(p) = declared.as_deref().and_then(known) {
        return Some(p);
    }
    let name = port.name.as_deref()?;
    let prefix = name.split('-').next().unwrap_or(name);
    match prefix {
        "https" => Some("tls".into()),
        "h2c" => Some("http2".into()),
        p => known(p),
    }
}

/// A core `v1` Service as a Plexus Service (`None`: not a mesh Service — ExternalName, or no
/// TCP port).
pub fn service(svc: &Service) -> Option<Resource> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let target_port = match &p.target_port {
                Some(IntOrString::Int(n)) => PortRef::Number(u16::try_from(*n).ok()?),
                Some(IntOrString::String(name)) => PortRef::Name(name.clone()),
                None => PortRef::Number(port),
            };
            Some(ServicePort {
                name: p.name.clone(),
                port,
                target_port: Some(target_port),
                app_protocol: app_protocol(p),
            })
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    let mut metadata = meta(&svc.metadata, true);
    if let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| ip.parse::<std::net::IpAddr>().is_ok()) {
        metadata.annotations.insert(CLUSTER_IP_ANNOTATION.into(), ip.into());
    }
    Some(Resource {
        api_version: Kind::Service.api_version().into(),
        kind: Kind::Service,
        metadata,
        spec: Spec::Service(ServiceSpec {
            selector: spec.selector.clone().unwrap_or_default(),
            service_accounts: Vec::new(),
            ports,
        }),
    })
}

/// Whether a pod has the injected proxy (a container, or a native-sidecar init container).
pub fn is_meshed(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers.iter().chain(s.init_containers.iter().flatten()).any(|c| c.name == PROXY_CONTAINER)
    })
}

/// Whether a pod serves traffic: Running, Ready, with an IP, not being deleted.
pub fn is_serving(pod: &Pod) -> bool {
    let Some(status) = &pod.status else { return false };
    pod.metadata.deletion_timestamp.is_none()
        && status.phase.as_deref() == Some("Running")
        && status.pod_ip.as_deref().is_some_and(|ip| ip.parse::<std::net::IpAddr>().is_ok())
        && status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Whether an injected pod's workload has finished for good, so its proxy (a regular
/// container, servers < 1.29) must exit for the pod to complete: the pod is Running, and every
/// container but [`PROXY_CONTAINER`] has terminated and will not be restarted — under
/// `restartPolicy: Never` whatever its exit code (the pod's phase, which the Job controller
/// reads, then says Failed for a non-zero one: the proxy's own exit 0 does not mask it), under
/// `OnFailure` only with exit code 0 (kubelet restarts a failed one), under `Always` (the
/// default: Deployments) never. A native-sidecar proxy (an init container) is stopped by
/// kubelet itself: never finished here.
pub fn workload_finished(pod: &Pod) -> bool {
    let (Some(spec), Some(status)) = (&pod.spec, &pod.status) else { return false };
    if status.phase.as_deref() != Some("Running") || !spec.containers.iter().any(|c| c.name == PROXY_CONTAINER) {
        return false;
    }
    let policy = spec.restart_policy.as_deref().unwrap_or("Always");
    let mut apps = spec.containers.iter().filter(|c| c.name != PROXY_CONTAINER).peekable();
    apps.peek().is_some()
        && apps.all(|c| {
            let terminated = status
                .container_statuses
                .iter()
                .flatten()
                .find(|s| s.name == c.name)
                .and_then(|s| s.state.as_ref()?.terminated.as_ref());
            match (terminated, policy) {
                (Some(_), "Never") => true,
                (Some(t), "OnFailure") => t.exit_code == 0,
                _ => false,
            }
        })
}

/// The workloads of `pods` that have finished ([`workload_finished`]), by `(namespace, name)`,
/// with the service account each runs as.
pub fn finished_workloads<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> BTreeMap<(String, String), String> {
    pods.into_iter()
        .filter(|p| workload_finished(p))
        .map(|p| {
            let sa = p.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
            (
                (
                    p.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                    p.metadata.name.clone().unwrap_or_default(),
                ),
                sa,
            )
        })
        .collect()
}

/// The numeric target ports of the Services (already translated) that select `pod`.
pub fn selected_target_ports<'a>(pod: &Pod, services: impl IntoIterator<Item = &'a Resource>) -> Vec<u16> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let mut ports: Vec<u16> = services
        .into_iter()
        .filter(|r| r.metadata.namespace() == namespace)
        .filter_map(|r| match &r.spec {
            Spec::Service(s) if selects(&s.selector, labels) => Some(s),
            _ => None,
        })
        .flat_map(|s| s.ports.iter())
        .filter_map(|p| match p.target_port {
            Some(PortRef::Number(n)) => Some(n),
            _ => None,
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Whether a (non-empty) Service selector selects these labels.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A serving pod as a Workload (`None` when it is not serving, see [`is_serving`]).
/// `service_ports`: the numeric target ports of the Services selecting it
/// ([`selected_target_ports`]).
pub fn pod(pod: &Pod, service_ports: &[u16]) -> Option<Resource> {
    if !is_serving(pod) {
        return None;
    }
    let address = pod.status.as_ref()?.pod_ip.clone()?;
    let service_ports: Vec<(Option<String>, u16)> = service_ports.iter().map(|&n| (None, n)).collect();
    workload(pod, address, &service_ports)
}

/// `pod` as a Workload at `address`, with its containers' TCP ports and `service_ports`
/// (named when a Service's `targetPort` names them).
fn workload(pod: &Pod, address: String, service_ports: &[(Option<String>, u16)]) -> Option<Resource> {
    let spec = pod.spec.as_ref()?;
    let mut ports: Vec<WorkloadPort> = Vec::new();
    for c in spec.containers.iter().filter(|c| c.name != PROXY_CONTAINER) {
        for p in c.ports.iter().flatten() {
            if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let Ok(n) = u16::try_from(p.container_port) else { continue };
            if ports.iter().any(|w| w.port == n) {
                continue;
            }
            ports.push(WorkloadPort { name: p.name.clone(), port: n, target_port: Some(n) });
        }
    }
    for (name, n) in service_ports {
        match ports.iter_mut().find(|w| w.port == *n) {
            Some(w) => {
                if w.name.is_none() {
                    w.name = name.clone();
                }
            }
            None => ports.push(WorkloadPort { name: name.clone(), port: *n, target_port: Some(*n) }),
        }
    }
    ports.sort_by_key(|p| p.port);
    let mut metadata = meta(&pod.metadata, true);
    metadata.annotations = BTreeMap::new();
    Some(Resource {
        api_version: Kind::Workload.api_version().into(),
        kind: Kind::Workload,
        metadata,
        spec: Spec::Workload(WorkloadSpec {
            address,
            ports,
            service_account: Some(spec.service_account_name.clone().unwrap_or_else(|| "default".into())),
            meshed: is_meshed(pod),
        }),
    })
}

/// Where the store takes a Service's endpoints from (chosen once at start by API discovery,
/// [`endpoint_source`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointSource {
    /// `discovery.k8s.io/v1` EndpointSlices (servers ≥ 1.21), with the Pods they name for
    /// labels, service account and `meshed` ([`slice_workloads`]).
    EndpointSlices,
    /// The Pods a Service selects, serving by the pod's own status ([`pod`]): servers without
    /// `discovery.k8s.io/v1` (1.20 serves only `v1beta1`, whose shape changed).
    #[default]
    Pods,
}

/// The group/version EndpointSlices are read at.
pub const ENDPOINT_SLICE_GROUP_VERSION: &str = "discovery.k8s.io/v1";

/// EndpointSlices when the server's API groups (`GET /apis`) include
/// [`ENDPOINT_SLICE_GROUP_VERSION`], else Pods.
pub fn endpoint_source(groups: &k8s_openapi::apimachinery::pkg::apis::meta::v1::APIGroupList) -> EndpointSource {
    let served =
        groups.groups.iter().flat_map(|g| &g.versions).any(|v| v.group_version == ENDPOINT_SLICE_GROUP_VERSION);
    if served { EndpointSource::EndpointSlices } else { EndpointSource::Pods }
}

/// The label naming the Service an EndpointSlice belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Workloads the EndpointSlices of the (translated) `services` make, in the model the Pods
/// path gives ([`pod`]): one per Pod an endpoint names (by `targetRef`), named after it, with
/// its labels, service account and `meshed` from the Pod (an endpoint whose Pod the watch has
/// not seen yet waits for it: identity is never guessed), the endpoint's address, and its
/// containers' ports plus the slices' ports (target ports already resolved, named ones
/// included). A Service's endpoints are those `ready` (unset counts as ready) and not
/// `terminating`, from all its slices; when none is, those still `serving` while terminating
/// (as kube-proxy does), so a rollout's last pods keep their traffic until they stop.
pub fn slice_workloads<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    services: &[Resource],
    pods: &BTreeMap<(String, String), Pod>,
) -> Vec<Resource> {
    // A port: the name a Service's targetPort gives it, if any, and its number.
    type Ports = Vec<(Option<String>, u16)>;
    // (namespace, service) → (ready, serving while terminating): (pod name, address, ports).
    type Chosen = Vec<(String, String, Ports)>;
    let mut by_service: BTreeMap<(String, String), (Chosen, Chosen)> = BTreeMap::new();
    for slice in slices {
        let ns = slice.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let Some(service) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else { continue };
        let spec = services.iter().find_map(|s| match &s.spec {
            Spec::Service(spec) if s.metadata.namespace() == ns && s.metadata.name == *service => Some(spec),
            _ => None,
        });
        let Some(spec) = spec else { continue };
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        // A slice port carries the Service port's name and the resolved target port; a
        // target port the Service names keeps that name on the Workload's port.
        let ports: Ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let n = u16::try_from(p.port?).ok()?;
                let target_name = spec.ports.iter().find(|sp| sp.name == p.name).and_then(|sp| match &sp.target_port {
                    Some(PortRef::Name(name)) => Some(name.clone()),
                    _ => None,
                });
                Some((target_name, n))
            })
            .collect();
        let entry = by_service.entry((ns, service.clone())).or_default();
        for e in &slice.endpoints {
            let Some(pod) =
                e.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| r.name.clone())
            else {
                continue;
            };
            let Some(address) = e.addresses.first().filter(|a| a.parse::<std::net::IpAddr>().is_ok()) else { continue };
            let c = e.conditions.as_ref();
            let terminating = c.and_then(|c| c.terminating) == Some(true);
            let ready = c.and_then(|c| c.ready) != Some(false) && !terminating;
            let serving = c.and_then(|c| c.serving.or(c.ready)) != Some(false);
            let item = (pod, address.clone(), ports.clone());
            if ready {
                entry.0.push(item);
            } else if terminating && serving {
                entry.1.push(item);
            }
        }
    }
    // Pod → (address, ports) over every Service that has it.
    let mut endpoints: BTreeMap<(String, String), (String, Ports)> = BTreeMap::new();
    for ((ns, _), (ready, terminating)) in by_service {
        let chosen = if ready.is_empty() { terminating } else { ready };
        for (pod, address, ports) in chosen {
            let e = endpoints.entry((ns.clone(), pod)).or_insert_with(|| (address, Vec::new()));
            e.1.extend(ports);
        }
    }
    endpoints
        .into_iter()
        .filter_map(|(key, (address, mut ports))| {
            let pod = pods.get(&key)?;
            ports.sort_unstable_by_key(|(name, n)| (*n, name.is_none()));
            ports.dedup_by_key(|(_, n)| *n);
            workload(pod, address, &ports)
        })
        .collect()
}

/// A custom resource (as the API server returns it) as a validated Plexus resource, or the
/// reason it is not one (for its status).
pub fn custom_resource(kind: Kind, object: &Value) -> Result<Resource, String> {
    let mut object = object.clone();
    let Some(map) = object.as_object_mut() else { return Err("not an object".into()) };
    map.remove("status");
    map.insert("apiVersion".into(), kind.api_version().into());
    map.insert("kind".into(), kind.as_str().into());
    if let Some(Value::Object(m)) = map.get_mut("metadata") {
        m.retain(|k, _| {
            matches!(
                k.as_str(),
                "name" | "namespace" | "labels" | "annotations" | "resourceVersion" | "uid" | "creationTimestamp"
            )
        });
        if let Some(Value::Object(a)) = m.get_mut("annotations") {
            a.remove(LAST_APPLIED);
            if a.is_empty() {
                m.remove("annotations");
            }
        }
        if !kind.namespaced() {
            m.remove("namespace");
        }
    }
    let text = object.to_string();
    match plexus_core::parse_documents("kubernetes", &text) {
        Ok(mut resources) if resources.len() == 1 => Ok(resources.remove(0)),
        Ok(_) => Err("expected one object".into()),
        Err(e) => Err(e
            .errors
            .iter()
            .map(|e| if e.field.is_empty() { e.reason.clone() } else { format!("{}: {}", e.field, e.reason) })
            .collect::<Vec<_>>()
            .join("; ")),
    }
}
