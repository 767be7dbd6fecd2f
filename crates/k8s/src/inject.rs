//! Sidecar injection (SPEC §11): the pod mutation that adds the Plexus proxy and its init
//! step. Pure: on k8s-openapi `PodSpec`s, used by the admission webhook ([`crate::webhook`])
//! and offline by `plexus inject -f`.
//!
//! Opt-in: the namespace labelled `plexus.dev/inject=enabled`, or the pod annotated
//! `plexus.dev/inject: enabled`; the annotation `disabled` opts a pod out; an injected pod
//! (annotation `plexus.dev/injected`) is left as it is; so are host-network pods (their
//! network namespace is the node's).
//!
//! What the pod gets:
//! - init container `plexus-init` (`plexus init`, root with NET_ADMIN + NET_RAW only): the
//!   iptables redirect, the proxy's UID 1337 and `plexus.dev/skip-ports` excluded;
//! - the proxy `plexus-proxy` (UID 1337; `plexus-proxy` with its settings in the environment:
//!   the pod's name, namespace, IP, service account, `app`/`version` labels through the
//!   downward API, the ServiceAccount token's path, the trust anchor as PEM, the control
//!   plane's address; DNS on 127.0.0.1:7753; admin on the pod IP, port 7712) with a readiness
//!   probe on admin `/ready`.
//! - Start-up ordering. Servers ≥ 1.29 (native sidecars): the proxy is an init container with
//!   `restartPolicy: Always` and a startup probe on `/ready`, right after `plexus-init` (the
//!   kubelet starts the next container once it has started). Older servers: the proxy is the
//!   first container, with a `postStart` hook (`plexus wait-ready`) that returns once the
//!   proxy holds its certificate and has reached the control plane — the kubelet starts the
//!   next container only after that (Istio's holdApplicationUntilProxyStarts). There, the
//!   app's own init containers run before `plexus-init` (no proxy runs yet to take their
//!   traffic).
//! - Kubelet's HTTP probes keep working under strict mTLS: each `httpGet` probe of an app
//!   container is rewritten to the proxy's admin port, path `/app-health/<container>/<kind>`
//!   (`liveness`, `readiness`, `startup`); the proxy forwards it to the app's own port on
//!   127.0.0.1 (table in env `PLEXUS_APP_PROBES`), as Istio does. The app's port stays behind
//!   mTLS; no port is exempted for probes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, HTTPGetAction, Lifecycle,
    LifecycleHandler, ObjectFieldSelector, PodSpec, Probe, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Namespace label and pod annotation that opt in (`enabled`) or out (`disabled`).
pub const INJECT_KEY: &str = "plexus.dev/inject";
/// Annotation set on an injected pod.
pub const INJECTED_ANNOTATION: &str = "plexus.dev/injected";
/// Annotation listing ports (comma-separated) the redirect leaves alone, inbound and outbound.
pub const SKIP_PORTS_ANNOTATION: &str = "plexus.dev/skip-ports";
pub const INIT_CONTAINER: &str = "plexus-init";
pub const PROXY_CONTAINER: &str = "plexus-proxy";
pub const PROXY_UID: i64 = 1337;
pub const ADMIN_PORT: i32 = 7712;
/// Where a pod's ServiceAccount token is mounted.
pub const TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// What every injected pod is given.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// The image holding `plexus` and `plexus-proxy` (`plexus:VERSION`).
    pub image: String,
    pub image_pull_policy: String,
    /// The control plane's gRPC address for the proxy (`https://CLUSTER-IP:7700`: no cluster
    /// DNS is assumed).
    pub control_plane: String,
    /// The mesh's trust anchor (PEM): the proxy verifies the control plane with it.
    pub trust_anchor_pem: String,
    /// Render the proxy as a native sidecar (servers ≥ 1.29).
    pub native_sidecars: bool,
}

impl InjectConfig {
    /// Whether a server of this version (`major`, `minor` as `/version` reports them, e.g.
    /// "1", "29+") runs native sidecars.
    pub fn native_sidecars_for(major: &str, minor: &str) -> bool {
        let num = |s: &str| s.trim_end_matches('+').parse::<u32>().ok();
        matches!((num(major), num(minor)), (Some(1), Some(m)) if m >= 29) || num(major).is_some_and(|m| m > 1)
    }

    /// Parses a `--kubernetes-version` (`1.29`, `v1.20.2`).
    pub fn native_sidecars_for_version(version: &str) -> Result<bool, String> {
        let v = version.trim().trim_start_matches('v');
        let mut parts = v.split('.');
        match (parts.next(), parts.next()) {
            (Some(major), Some(minor)) if major.parse::<u32>().is_ok() && minor.parse::<u32>().is_ok() => {
                Ok(Self::native_sidecars_for(major, minor))
            }
            _ => Err(format!("{version:?} is not a Kubernetes version (MAJOR.MINOR, e.g. 1.20)")),
        }
    }
}

/// Whether a pod is to be injected, and why (for the webhook's log and `plexus inject`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Inject,
    Skip(&'static str),
}

/// The opt-in rules for a pod of a namespace labelled `namespace_labels`.
pub fn decide(namespace_labels: &BTreeMap<String, String>, meta: &ObjectMeta, spec: &PodSpec) -> Decision {
    let annotation = meta.annotations.as_ref().and_then(|a| a.get(INJECT_KEY)).map(String::as_str);
    if meta.annotations.as_ref().is_some_and(|a| a.contains_key(INJECTED_ANNOTATION))
        || spec.containers.iter().chain(spec.init_containers.iter().flatten()).any(|c| c.name == PROXY_CONTAINER)
    {
        return Decision::Skip("already injected");
    }
    if spec.host_network == Some(true) {
        return Decision::Skip("host network");
    }
    match annotation {
        Some("disabled") => Decision::Skip("annotation plexus.dev/inject: disabled"),
        Some("enabled") => Decision::Inject,
        _ if namespace_labels.get(INJECT_KEY).map(String::as_str) == Some("enabled") => Decision::Inject,
        _ => Decision::Skip("not opted in (namespace label or pod annotation plexus.dev/inject=enabled)"),
    }
}

/// The ports of the `plexus.dev/skip-ports` annotation; an error names the bad entry.
pub fn skip_ports(meta: &ObjectMeta) -> Result<Vec<u16>, String> {
    let Some(text) = meta.annotations.as_ref().and_then(|a| a.get(SKIP_PORTS_ANNOTATION)) else {
        return Ok(Vec::new());
    };
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("annotation {SKIP_PORTS_ANNOTATION}: {p:?} is not a port (1-65535)"))
        })
        .collect()
}

/// One rewritten kubelet probe: where the proxy sends it (the proxy's own type: the table in
/// `PLEXUS_APP_PROBES` is what `plexus-proxy --app-probes` reads).
pub use plexus_proxy::settings::AppProbe;

/// Injects the proxy into a pod (its metadata and spec). Fails only on a bad annotation or a
/// probe whose named port the container does not declare.
pub fn inject(meta: &mut ObjectMeta, spec: &mut PodSpec, config: &InjectConfig) -> Result<(), String> {
    let skip = skip_ports(meta)?;
    let probes = rewrite_probes(spec)?;
    let init = init_container(config, &skip);
    let mut proxy = proxy_container(config, &probes)?;
    if config.native_sidecars {
        proxy.restart_policy = Some("Always".into());
        proxy.startup_probe = Some(Probe {
            http_get: Some(admin_get("/ready")),
            period_seconds: Some(1),
            failure_threshold: Some(600),
            ..Probe::default()
        });
        let inits = spec.init_containers.get_or_insert_with(Vec::new);
        inits.insert(0, proxy);
        inits.insert(0, init);
    } else {
        proxy.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "/usr/local/bin/plexus".into(),
                        "wait-ready".into(),
                        "--timeout".into(),
                        "120s".into(),
                    ]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        });
        spec.init_containers.get_or_insert_with(Vec::new).push(init);
        spec.containers.insert(0, proxy);
    }
    meta.annotations.get_or_insert_with(BTreeMap::new).insert(INJECTED_ANNOTATION.into(), "true".into());
    Ok(())
}

fn admin_get(path: &str) -> HTTPGetAction {
    HTTPGetAction { path: Some(path.into()), port: IntOrString::Int(ADMIN_PORT), ..HTTPGetAction::default() }
}

/// Rewrites every app container's `httpGet` probes to the proxy's admin port; returns the
/// table the proxy forwards them with (admin path → app port and path).
fn rewrite_probes(spec: &mut PodSpec) -> Result<BTreeMap<String, AppProbe>, String> {
    let mut table = BTreeMap::new();
    for c in &mut spec.containers {
        let ports = c.ports.clone().unwrap_or_default();
        let name = c.name.clone();
        for (kind, probe) in [
            ("liveness", &mut c.liveness_probe),
            ("readiness", &mut c.readiness_probe),
            ("startup", &mut c.startup_probe),
        ] {
            let Some(get) = probe.as_mut().and_then(|p| p.http_get.as_mut()) else { continue };
            if get.scheme.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("HTTPS")) {
                continue; // The app terminates TLS itself: left as it is.
            }
            let port = match &get.port {
                IntOrString::Int(n) => u16::try_from(*n).ok(),
                IntOrString::String(named) => ports
                    .iter()
                    .find(|p| p.name.as_deref() == Some(named.as_str()))
                    .and_then(|p| u16::try_from(p.container_port).ok()),
            }
            .ok_or_else(|| format!("container {name}: {kind} probe port {:?} is not a declared port", get.port))?;
            let path = format!("/app-health/{name}/{kind}");
            table.insert(
                path.clone(),
                AppProbe {
                    port,
                    path: get.path.clone().unwrap_or_else(|| "/".into()),
                    headers: get.http_headers.iter().flatten().map(|h| (h.name.clone(), h.value.clone())).collect(),
                },
            );
            *get = HTTPGetAction { path: Some(path), port: IntOrString::Int(ADMIN_PORT), ..HTTPGetAction::default() };
        }
    }
    Ok(table)
}

fn init_container(config: &InjectConfig, skip: &[u16]) -> Container {
    let mut args = vec!["init".to_string(), "--proxy-uid".into(), PROXY_UID.to_string()];
    if !skip.is_empty() {
        let list = skip.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        args.extend(["--skip-inbound-ports".into(), list.clone(), "--skip-outbound-ports".into(), list]);
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(config.image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        command: Some(vec!["/usr/local/bin/plexus".into()]),
        args: Some(args),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..EnvVar::default() }
}

fn field_env(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: field.into(), ..ObjectFieldSelector::default() }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn proxy_container(config: &InjectConfig, probes: &BTreeMap<String, AppProbe>) -> Result<Container, String> {
    let mut env = vec![
        field_env("PLEXUS_WORKLOAD", "metadata.name"),
        field_env("PLEXUS_NAMESPACE", "metadata.namespace"),
        field_env("PLEXUS_SERVICE", "metadata.labels['app']"),
        field_env("PLEXUS_WORKLOAD_VERSION", "metadata.labels['version']"),
        field_env("PLEXUS_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        // Admin (probes, Prometheus, the control plane) on the pod IP; inbound on every
        // address (the redirect delivers to the pod IP); outbound and DNS on loopback.
        field_env("PLEXUS_ADMIN_IP", "status.podIP"),
        env("PLEXUS_INBOUND_IP", "0.0.0.0"),
        env("PLEXUS_DNS_ADDR", "127.0.0.1:7753"),
        env("PLEXUS_CONTROL_PLANE", config.control_plane.clone()),
        env("PLEXUS_TOKEN_FILE", TOKEN_PATH),
        env("PLEXUS_TRUST_ANCHOR_PEM", config.trust_anchor_pem.clone()),
    ];
    if !probes.is_empty() {
        let table = serde_json::to_string(probes).map_err(|e| e.to_string())?;
        env.push(self::env("PLEXUS_APP_PROBES", table));
    }
    Ok(Container {
        name: PROXY_CONTAINER.into(),
        image: Some(config.image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        command: Some(vec!["/usr/local/bin/plexus-proxy".into()]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("plexus-admin".into()),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(admin_get("/ready")),
            period_seconds: Some(2),
            ..Probe::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    })
}

/// Where a kind keeps its pod: `(metadata pointer, spec pointer)` (JSON pointers), or `None`
/// for kinds without one.
pub fn pod_pointers(api_version: &str, kind: &str) -> Option<(&'static str, &'static str)> {
    match (api_version, kind) {
        ("v1", "Pod") => Some(("/metadata", "/spec")),
        ("v1", "PodTemplate") => Some(("/template/metadata", "/template/spec")),
        ("v1", "ReplicationController")
        | ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch/v1", "Job") => Some(("/spec/template/metadata", "/spec/template/spec")),
        ("batch/v1" | "batch/v1beta1", "CronJob") => {
            Some(("/spec/jobTemplate/spec/template/metadata", "/spec/jobTemplate/spec/template/spec"))
        }
        _ => None,
    }
}

/// Injects the pod of a Kubernetes object (a Pod, or a workload's pod template) in place, when
/// `decide` (with `namespace_labels`) says so. Returns the decision; other kinds are
/// `Skip("not a pod or pod template")`.
pub fn inject_object(
    object: &mut serde_json::Value,
    namespace_labels: &BTreeMap<String, String>,
    config: &InjectConfig,
) -> Result<Decision, String> {
    let api_version = object.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let kind = object.get("kind").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let Some((meta_at, spec_at)) = pod_pointers(&api_version, &kind) else {
        return Ok(Decision::Skip("not a pod or pod template"));
    };
    let what = |e: serde_json::Error, at: &str| format!("{kind} {at}: {e}");
    let meta: ObjectMeta = match object.pointer(meta_at) {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| what(e, meta_at))?,
        None => ObjectMeta::default(),
    };
    let spec_value = object.pointer(spec_at).ok_or_else(|| format!("{kind}: no {spec_at}"))?;
    let mut spec: PodSpec = serde_json::from_value(spec_value.clone()).map_err(|e| what(e, spec_at))?;
    let mut meta = meta;
    let decision = decide(namespace_labels, &meta, &spec);
    if decision != Decision::Inject {
        return Ok(decision);
    }
    inject(&mut meta, &mut spec, config)?;
    let meta = serde_json::to_value(&meta).map_err(|e| e.to_string())?;
    let spec = serde_json::to_value(&spec).map_err(|e| e.to_string())?;
    set_pointer(object, meta_at, meta);
    set_pointer(object, spec_at, spec);
    Ok(Decision::Inject)
}

/// Sets the value at a JSON pointer, creating objects on the way.
fn set_pointer(root: &mut serde_json::Value, pointer: &str, value: serde_json::Value) {
    let mut at = root;
    for key in pointer.split('/').skip(1) {
        if !at.is_object() {
            *at = serde_json::Value::Object(serde_json::Map::new());
        }
        let Some(map) = at.as_object_mut() else { return };
        at = map.entry(key.to_string()).or_insert(serde_json::Value::Null);
    }
    *at = value;
}
