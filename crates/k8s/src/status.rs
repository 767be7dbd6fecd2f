//! Status write-back: `Accepted` and `ResolvedRefs` conditions on the custom resources, in the
//! Gateway API's shapes and reasons, written by the leader only ([`crate::leader`]).
//!
//! - HTTPRoute / GRPCRoute: `status.parents[]`, one per `parentRef` as written, with
//!   `controllerName` [`CONTROLLER_NAME`] and the conditions `Accepted` (reasons `Accepted`,
//!   `NoMatchingParent` — the Service or Gateway does not exist, or no listener has the
//!   `sectionName` —, `NotAllowedByListeners` — the Gateway's listeners do not admit routes from
//!   the route's namespace —, `UnsupportedValue` — plexus-core rejects the object) and
//!   `ResolvedRefs` (`ResolvedRefs`, `BackendNotFound`, `InvalidKind`).
//! - Every other kind: `status.conditions[]`: `Accepted` (`Accepted` or `Invalid` with
//!   plexus-core's reason) and, for policies with a `targetRef`, `ResolvedRefs`
//!   (`ResolvedRefs` or `TargetNotFound`).
//!
//! `observedGeneration` is the object's `metadata.generation`; a condition keeps its
//! `lastTransitionTime` while its status does not change, so an unchanged mesh writes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use plexus_core::resource::{AuthorizationPolicySpec, ParentRef, PolicyTargetRef};
use plexus_core::{Kind, Resource, Spec};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::store::KubeStore;
use plexus_proxy::gateway::certs::CertificateStatus;

/// The `controllerName` of Plexus's route status entries.
pub const CONTROLLER_NAME: &str = "plexus.dev/control-plane";

/// What exists in the mesh, for reference checks.
pub struct Known {
    services: BTreeSet<(String, String)>,
    gateways: Vec<(String, String, plexus_core::resource::GatewaySpec)>,
    /// Every resource, for a Gateway's listener status ([`plexus_core::gateway::status`]).
    resources: Vec<Resource>,
    /// What the gateway proxies say of the certificates they serve.
    certificates: Arc<CertificateReports>,
}

/// What the gateway proxies report of their certificates (admin `/config`,
/// `gateway.certificates[]`), by Gateway (`NAME.NAMESPACE`) and certificate (`namespace/name`):
/// the control plane never reads Secrets, so whether one is missing or invalid is known from
/// the gateways that read it. Several replicas: a certificate loaded by any counts as loaded.
pub type CertificateReports = BTreeMap<(String, String), CertificateStatus>;

/// How often the gateway proxies' certificate reports are read.
const CERTIFICATE_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Reads every connected ingress proxy's certificate report every
/// [`CERTIFICATE_REPORT_INTERVAL`], publishing it when it changes. Runs until the task is
/// dropped.
pub async fn watch_certificate_reports(
    proxies: Arc<plexus_control::proxies::Proxies>,
    serving: Arc<plexus_control::grpc_tls::ServingIdentity>,
    reports: watch::Sender<Arc<CertificateReports>>,
) {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        gateway: Option<plexus_proxy::gateway::GatewayReport>,
    }
    loop {
        let mut next = CertificateReports::new();
        for p in proxies.list().iter().filter(|p| p.mode == "ingress") {
            let config = match plexus_control::proxy_admin::config_of(&serving, p).await {
                Ok(body) => serde_json::from_slice::<Config>(&body).map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            let report = match config {
                Ok(Config { gateway: Some(g) }) => g,
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(proxy = %p.workload, error = %e, "cannot read a gateway's certificate report");
                    continue;
                }
            };
            for c in report.certificates {
                match next.entry((report.name.clone(), c.name.clone())) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(c);
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        if c.loaded && !o.get().loaded {
                            o.insert(c);
                        }
                    }
                }
            }
        }
        reports.send_if_modified(|current| {
            let changed = current.as_ref() != &next;
            if changed {
                *current = Arc::new(next);
            }
            changed
        });
        tokio::time::sleep(CERTIFICATE_REPORT_INTERVAL).await;
    }
}

/// The listener conditions of a Gateway's status with what its proxies report: a listener whose
/// certificate no gateway could load (missing, unreadable, invalid Secret) does not have its
/// references resolved (`ResolvedRefs: False`, `InvalidCertificateRef`, the reason).
fn certificate_conditions(status: &mut Value, gateway: &Resource, reports: &CertificateReports) {
    let Spec::Gateway(spec) = &gateway.spec else { return };
    let ns = gateway.metadata.namespace();
    let gateway_name = plexus_core::ServiceName::new(&gateway.metadata.name, ns).to_string();
    for (i, l) in spec.listeners.iter().enumerate() {
        let problem = l.tls.iter().flat_map(|t| &t.certificate_refs).find_map(|c| {
            if plexus_core::gateway::certificate_ref_refused(ns, c).is_some() {
                return None;
            }
            let name = format!("{}/{}", c.namespace.as_deref().unwrap_or(ns), c.name);
            let report = reports.get(&(gateway_name.clone(), name))?;
            let problem = report.problem.as_deref().filter(|_| !report.loaded)?;
            Some(format!("{}: {problem}", report.location))
        });
        let Some(problem) = problem else { continue };
        let Some(Value::Array(conditions)) = status.pointer_mut(&format!("/listeners/{i}/conditions")) else {
            continue;
        };
        for c in conditions.iter_mut().filter(|c| c["type"] == "ResolvedRefs" && c["status"] == "True") {
            c["status"] = "False".into();
            c["reason"] = "InvalidCertificateRef".into();
            c["message"] = problem.clone().into();
        }
    }
}

impl Known {
    pub fn of(resources: &[Arc<Resource>]) -> Known {
        let mut services = BTreeSet::new();
        let mut gateways = Vec::new();
        for r in resources {
            let key = (r.metadata.namespace().to_string(), r.metadata.name.clone());
            match &r.spec {
                Spec::Service(_) => {
                    services.insert(key);
                }
                Spec::Gateway(g) => gateways.push((key.0, key.1, g.clone())),
                _ => {}
            }
        }
        Known {
            services,
            gateways,
            resources: resources.iter().map(|r| Resource::clone(r)).collect(),
            certificates: Arc::default(),
        }
    }

    /// With the gateway proxies' certificate reports.
    pub fn with_certificates(mut self, reports: Arc<CertificateReports>) -> Known {
        self.certificates = reports;
        self
    }

    fn service(&self, namespace: &str, name: &str) -> bool {
        self.services.contains(&(namespace.to_string(), name.to_string()))
    }
}

fn condition(kind: &str, ok: bool, reason: &str, message: String, generation: Option<i64>) -> Value {
    // Never empty: the 1.20 API server reads `""` there as null, and the schema refuses it.
    let message = if message.is_empty() { format!("{kind}: {reason}") } else { message };
    let mut c = json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
    });
    if let Some(g) = generation {
        c["observedGeneration"] = g.into();
    }
    c
}

/// Whether a reference (`group`, `kind`) names a mesh Service (`kind` defaults to `default_kind`).
fn is_service(group: Option<&str>, kind: Option<&str>, default_kind: &str) -> bool {
    matches!(group.unwrap_or(""), "" | "plexus.dev") && kind.unwrap_or(default_kind) == "Service"
}

/// The `Accepted` condition of one parentRef of a route plexus-core accepted (so its group
/// and kind are a Service's or a Gateway's, read as the core route compiler reads them).
fn parent_accepted(parent: &Value, route_ns: &str, known: &Known, generation: Option<i64>) -> Value {
    let Ok(parent) = serde_json::from_value::<ParentRef>(parent.clone()) else {
        return condition("Accepted", false, "NoMatchingParent", "a parentRef needs a name".into(), generation);
    };
    let name = parent.name.as_str();
    let ns = parent.namespace.as_deref().unwrap_or(route_ns);
    if !plexus_core::route::parent_is_gateway(&parent) {
        return if known.service(ns, name) {
            condition("Accepted", true, "Accepted", format!("attached to Service {ns}/{name}"), generation)
        } else {
            condition("Accepted", false, "NoMatchingParent", format!("Service {ns}/{name} not found"), generation)
        };
    }
    let Some((_, _, gateway)) = known.gateways.iter().find(|(gns, gname, _)| gns == ns && gname == name) else {
        return condition("Accepted", false, "NoMatchingParent", format!("Gateway {ns}/{name} not found"), generation);
    };
    let section = parent.section_name.as_deref();
    let listeners: Vec<_> = gateway.listeners.iter().filter(|l| section.is_none_or(|s| l.name == s)).collect();
    if listeners.is_empty() {
        return condition(
            "Accepted",
            false,
            "NoMatchingParent",
            format!("Gateway {ns}/{name} has no listener {:?}", section.unwrap_or_default()),
            generation,
        );
    }
    let admits = |l: &&plexus_core::resource::GatewayListener| {
        let from = l.allowed_routes.as_ref().and_then(|a| a.namespaces.as_ref()).and_then(|n| n.from.as_deref());
        match from.unwrap_or("Same") {
            "Same" => ns == route_ns,
            _ => true,
        }
    };
    if listeners.iter().any(admits) {
        condition("Accepted", true, "Accepted", format!("attached to Gateway {ns}/{name}"), generation)
    } else {
        condition(
            "Accepted",
            false,
            "NotAllowedByListeners",
            format!("Gateway {ns}/{name}'s listeners admit routes from its own namespace only"),
            generation,
        )
    }
}

fn route_refs_resolved(spec: &Value, route_ns: &str, known: &Known, generation: Option<i64>) -> Value {
    let mut missing = Vec::new();
    let mut wrong_kind = Vec::new();
    let refs = spec
        .get("rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|rule| rule.get("backendRefs").and_then(Value::as_array).into_iter().flatten());
    for r in refs {
        let s = |k: &str| r.get(k).and_then(Value::as_str);
        let name = s("name").unwrap_or_default();
        let ns = s("namespace").unwrap_or(route_ns);
        if !is_service(s("group"), s("kind"), "Service") {
            wrong_kind.push(format!("{}/{name}", s("kind").unwrap_or_default()));
        } else if !known.service(ns, name) {
            missing.push(format!("{ns}/{name}"));
        }
    }
    if !wrong_kind.is_empty() {
        condition("ResolvedRefs", false, "InvalidKind", format!("not a Service: {}", wrong_kind.join(", ")), generation)
    } else if !missing.is_empty() {
        missing.dedup();
        condition(
            "ResolvedRefs",
            false,
            "BackendNotFound",
            format!("Service not found: {} (answered 500 until it exists)", missing.join(", ")),
            generation,
        )
    } else {
        condition("ResolvedRefs", true, "ResolvedRefs", "every backend Service exists".into(), generation)
    }
}

fn target_ref(spec: &Spec) -> Option<&PolicyTargetRef> {
    match spec {
        Spec::AuthorizationPolicy(AuthorizationPolicySpec { target_ref, .. }) => Some(target_ref),
        Spec::ResiliencePolicy(p) => Some(&p.target_ref),
        Spec::RateLimitPolicy(p) => Some(&p.target_ref),
        _ => None,
    }
}

/// The status an object should have. `valid`: the object as plexus-core accepted it, or its
/// reason for refusing it. `now`: RFC 3339, for conditions that change.
pub fn desired(kind: Kind, object: &Value, valid: Result<&Resource, &str>, known: &Known, now: &str) -> Value {
    let generation = object.pointer("/metadata/generation").and_then(Value::as_i64);
    let route_ns = object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default");
    let empty = json!({});
    let spec = object.get("spec").unwrap_or(&empty);
    let mut status = match kind {
        Kind::HttpRoute | Kind::GrpcRoute => {
            let parents: Vec<Value> = spec
                .get("parentRefs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|parent| {
                    let accepted = match valid {
                        Ok(_) => parent_accepted(parent, route_ns, known, generation),
                        Err(reason) => condition("Accepted", false, "UnsupportedValue", reason.to_string(), generation),
                    };
                    json!({
                        "parentRef": parent,
                        "controllerName": CONTROLLER_NAME,
                        "conditions": [accepted, route_refs_resolved(spec, route_ns, known, generation)]
                    })
                })
                .collect();
            json!({ "parents": parents })
        }
        // A Gateway: the Gateway API's status (listeners with `Accepted`, `Conflicted`,
        // `ResolvedRefs`, `Programmed`, `attachedRoutes`), as `plexus get gateway` shows it.
        Kind::Gateway if let Ok(r) = valid => {
            let mut s = plexus_core::gateway::status(&known.resources, r);
            certificate_conditions(&mut s, r, &known.certificates);
            if let Some(g) = generation {
                for_each_condition(&mut s, |c| c["observedGeneration"] = g.into());
                s["observedGeneration"] = g.into();
            }
            s
        }
        _ => {
            let mut conditions = vec![match valid {
                Ok(_) => condition("Accepted", true, "Accepted", String::new(), generation),
                Err(reason) => condition("Accepted", false, "Invalid", reason.to_string(), generation),
            }];
            if let Ok(r) = valid
                && let Some(target) = target_ref(&r.spec)
            {
                let ns = target.namespace.as_deref().unwrap_or(r.metadata.namespace());
                conditions.push(if known.service(ns, &target.name) {
                    condition("ResolvedRefs", true, "ResolvedRefs", String::new(), generation)
                } else {
                    condition(
                        "ResolvedRefs",
                        false,
                        "TargetNotFound",
                        format!("Service {ns}/{} not found", target.name),
                        generation,
                    )
                });
            }
            let mut s = json!({ "conditions": conditions });
            if let Some(g) = generation {
                s["observedGeneration"] = g.into();
            }
            s
        }
    };
    carry_transition_times(&mut status, object.get("status"), now);
    status
}

/// Where a status holds condition lists: `conditions`, and those of each of `parents[]`
/// (routes) and `listeners[]` (Gateways), as JSON pointers.
fn condition_paths(status: &Value) -> Vec<String> {
    let mut paths = vec!["/conditions".to_string()];
    for list in ["parents", "listeners"] {
        let n = status.get(list).and_then(Value::as_array).map_or(0, Vec::len);
        paths.extend((0..n).map(|i| format!("/{list}/{i}/conditions")));
    }
    paths
}

/// Calls `f` on every condition of a status.
fn for_each_condition(status: &mut Value, mut f: impl FnMut(&mut Value)) {
    for path in condition_paths(status) {
        if let Some(Value::Array(list)) = status.pointer_mut(&path) {
            list.iter_mut().for_each(&mut f);
        }
    }
}

/// Sets each condition's `lastTransitionTime`: the current one's while its status is the
/// same, else `now`.
fn carry_transition_times(status: &mut Value, current: Option<&Value>, now: &str) {
    for path in condition_paths(status) {
        let previous: Vec<Value> =
            current.and_then(|c| c.pointer(&path)).and_then(Value::as_array).cloned().unwrap_or_default();
        let Some(Value::Array(conditions)) = status.pointer_mut(&path) else { continue };
        for c in conditions {
            let same = previous.iter().find(|p| p.get("type") == c.get("type") && p.get("status") == c.get("status"));
            let time = same.and_then(|p| p.get("lastTransitionTime")).cloned().unwrap_or_else(|| now.into());
            c["lastTransitionTime"] = time;
        }
    }
}

/// Writes every custom resource's status that differs from [`desired`] (the leader's duty).
pub async fn reconcile(store: &KubeStore, certificates: Arc<CertificateReports>) -> Result<usize, String> {
    let resources = plexus_control::store::Store::list_shared(store).map_err(|e| e.to_string())?;
    let known = Known::of(&resources).with_certificates(certificates);
    let by_id: std::collections::HashMap<String, &Arc<Resource>> = resources.iter().map(|r| (r.id(), r)).collect();
    let invalid = store.invalid();
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let mut written = 0;
    let mut failure = None;
    for (kind, object) in store.custom_objects() {
        let name = object.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
        let ns = object.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default").to_string();
        let id = plexus_core::resource::object_id(kind, if kind.namespaced() { &ns } else { "default" }, &name);
        let valid = match (by_id.get(&id), invalid.get(&id)) {
            (_, Some(reason)) => Err(reason.as_str()),
            (Some(r), None) => Ok(r.as_ref()),
            (None, None) => continue,
        };
        let status = desired(kind, &object, valid, &known, &now);
        if object.get("status") == Some(&status) {
            continue;
        }
        let ar = crate::crd::api_resource(kind);
        let api: Api<kube::api::DynamicObject> = if kind.namespaced() {
            Api::namespaced_with(store.client(), &ns, &ar)
        } else {
            Api::all_with(store.client(), &ar)
        };
        match api.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await {
            Ok(_) => written += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                failure.get_or_insert(format!("writing the status of {kind} {ns}/{name}: {e}"));
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(written),
    }
}

/// Keeps the statuses current while this replica leads: after every store change, and when
/// it becomes the leader. Runs until the task is dropped.
pub async fn maintain(
    store: Arc<KubeStore>,
    mut leading: watch::Receiver<bool>,
    mut certificates: watch::Receiver<Arc<CertificateReports>>,
) {
    let mut changes = plexus_control::store::Store::subscribe(store.as_ref());
    loop {
        if *leading.borrow_and_update() {
            let reports = certificates.borrow_and_update().clone();
            match reconcile(&store, reports).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(written = n, "status conditions written"),
                Err(e) => tracing::warn!(error = %e, "cannot write status conditions; retrying"),
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            r = leading.changed() => if r.is_err() { return },
            r = certificates.changed() => if r.is_err() { return },
            // Objects the watch saw before their Services, and failed writes, are retried.
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        // Coalesce a burst of changes.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {selector: {app: reviews}, ports: [{port: 9080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: plexus-system}
spec:
  gatewayClassName: plexus
  listeners:
  - {name: http, port: 9080, protocol: HTTP}
  - {name: shared, port: 9081, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
"#;

    fn known() -> Known {
        let resources = plexus_core::parse_documents("mesh", MESH).expect("valid");
        Known::of(&resources.into_iter().map(Arc::new).collect::<Vec<_>>())
    }

    fn route(parents: Value, backends: Value) -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "bookinfo", "generation": 4},
            "spec": {"parentRefs": parents, "rules": [{"backendRefs": backends}]}
        })
    }

    fn conditions(status: &Value, parent: usize) -> Vec<(String, String, String)> {
        status["parents"][parent]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                (s("type"), s("status"), s("reason"))
            })
            .collect()
    }

    fn t(a: &str, b: &str, c: &str) -> (String, String, String) {
        (a.into(), b.into(), c.into())
    }

    fn status_of(object: &Value, now: &str) -> Value {
        let resource = crate::translate::custom_resource(Kind::HttpRoute, object);
        let valid = resource.as_ref().map_err(String::as_str);
        desired(Kind::HttpRoute, object, valid, &known(), now)
    }

    #[test]
    fn route_conditions_name_missing_parents_backends_and_listeners() {
        let ok = route(
            json!([{"kind": "Service", "name": "reviews", "port": 9080}]),
            json!([{"name": "reviews", "port": 9080}]),
        );
        let s = status_of(&ok, "2026-12-06T20:00:00Z");
        assert_eq!(conditions(&s, 0), [t("Accepted", "True", "Accepted"), t("ResolvedRefs", "True", "ResolvedRefs")]);
        assert_eq!(s["parents"][0]["controllerName"], CONTROLLER_NAME);
        assert_eq!(s["parents"][0]["parentRef"]["name"], "reviews");
        assert_eq!(s["parents"][0]["conditions"][0]["observedGeneration"], 4);

        let missing = route(
            json!([{"kind": "Service", "name": "nothing"}, {"kind": "Gateway", "name": "ingress", "namespace": "plexus-system", "sectionName": "http"},
                   {"kind": "Gateway", "name": "ingress", "namespace": "plexus-system", "sectionName": "shared"},
                   {"kind": "Gateway", "name": "ingress", "namespace": "plexus-system", "sectionName": "nope"}]),
            json!([{"name": "reviews", "port": 9080}, {"name": "reviews-v9", "port": 9080}]),
        );
        let s = status_of(&missing, "2026-12-06T20:00:00Z");
        assert_eq!(conditions(&s, 0)[0], t("Accepted", "False", "NoMatchingParent"));
        assert_eq!(
            conditions(&s, 1)[0],
            t("Accepted", "False", "NotAllowedByListeners"),
            "from: Same (default), another namespace"
        );
        assert_eq!(conditions(&s, 2)[0], t("Accepted", "True", "Accepted"), "from: All");
        assert_eq!(conditions(&s, 3)[0], t("Accepted", "False", "NoMatchingParent"), "no such sectionName");
        assert_eq!(conditions(&s, 0)[1], t("ResolvedRefs", "False", "BackendNotFound"));
        let message = s["parents"][0]["conditions"][1]["message"].as_str().expect("message");
        assert!(message.contains("bookinfo/reviews-v9") && !message.contains("bookinfo/reviews,"), "{message}");

        // Invalid for plexus-core: every parent says why.
        let invalid = route(json!([{"kind": "Service", "name": "reviews"}]), json!([{"name": "reviews", "port": 0}]));
        let s = status_of(&invalid, "2026-12-06T20:00:00Z");
        assert_eq!(conditions(&s, 0)[0], t("Accepted", "False", "UnsupportedValue"));
        assert!(s["parents"][0]["conditions"][0]["message"].as_str().expect("message").contains("port"));
    }

    #[test]
    fn transition_times_move_only_when_a_condition_changes() {
        let mut object =
            route(json!([{"kind": "Service", "name": "reviews"}]), json!([{"name": "reviews-v9", "port": 9080}]));
        let first = status_of(&object, "2026-12-06T20:00:00Z");
        object["status"] = first.clone();
        let again = status_of(&object, "2026-12-06T21:00:00Z");
        assert_eq!(again, first, "nothing changed: the same status, nothing to write");
        object["spec"]["rules"][0]["backendRefs"][0]["name"] = "reviews".into();
        let changed = status_of(&object, "2026-12-06T22:00:00Z");
        let times: Vec<&str> = changed["parents"][0]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .filter_map(|c| c["lastTransitionTime"].as_str())
            .collect();
        assert_eq!(times, ["2026-12-06T20:00:00Z", "2026-12-06T22:00:00Z"], "Accepted kept, ResolvedRefs moved");
    }

    #[test]
    fn a_gateway_gets_listener_conditions_and_keeps_their_transition_times() {
        let object = json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "edge", "namespace": "plexus-system", "generation": 2},
            "spec": {"gatewayClassName": "plexus", "listeners": [
                {"name": "https", "port": 8443, "protocol": "HTTPS", "hostname": "a.example",
                 "tls": {"certificateRefs": [{"name": "a-tls"}]}},
                {"name": "elsewhere", "port": 8443, "protocol": "HTTPS", "hostname": "b.example",
                 "tls": {"certificateRefs": [{"name": "b-tls", "namespace": "bookinfo"}]}}
            ]}
        });
        let resource = crate::translate::custom_resource(Kind::Gateway, &object).expect("valid");
        let mut resources: Vec<Arc<Resource>> =
            plexus_core::parse_documents("mesh", MESH).expect("valid").into_iter().map(Arc::new).collect();
        resources.push(Arc::new(resource.clone()));
        let known = Known::of(&resources);
        let first = desired(Kind::Gateway, &object, Ok(&resource), &known, "2026-12-06T20:00:00Z");
        let listener = |s: &Value, i: usize, t: &str| {
            s["listeners"][i]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == t).cloned())
        };
        let resolved = listener(&first, 1, "ResolvedRefs").expect("ResolvedRefs");
        assert_eq!(
            (resolved["status"].as_str(), resolved["reason"].as_str()),
            (Some("False"), Some("RefNotPermitted"))
        );
        assert_eq!(resolved["observedGeneration"], 2);
        assert_eq!(resolved["lastTransitionTime"], "2026-12-06T20:00:00Z");
        assert_eq!(listener(&first, 0, "ResolvedRefs").expect("ResolvedRefs")["status"], "True");
        assert_eq!(first["conditions"][0]["type"], "Accepted");
        let mut object = object;
        object["status"] = first.clone();
        let again = desired(Kind::Gateway, &object, Ok(&resource), &known, "2026-12-06T21:00:00Z");
        assert_eq!(again, first, "nothing changed: nothing to write");
        // The gateway proxy reports the Secret missing: that listener's refs are not resolved.
        let report = |loaded: bool, problem: &str| CertificateStatus {
            name: "plexus-system/a-tls".into(),
            location: "Secret plexus-system/a-tls".into(),
            loaded,
            problem: Some(problem.into()),
            ..CertificateStatus::default()
        };
        let key = ("edge.plexus-system".to_string(), "plexus-system/a-tls".to_string());
        let missing = Known::of(&resources).with_certificates(Arc::new(BTreeMap::from([(
            key.clone(),
            report(false, "Secret plexus-system/a-tls not found"),
        )])));
        let s = desired(Kind::Gateway, &object, Ok(&resource), &missing, "2026-12-06T22:00:00Z");
        let resolved = listener(&s, 0, "ResolvedRefs").expect("ResolvedRefs");
        assert_eq!(
            (resolved["status"].as_str(), resolved["reason"].as_str()),
            (Some("False"), Some("InvalidCertificateRef"))
        );
        assert!(resolved["message"].as_str().is_some_and(|m| m.contains("not found")), "{resolved}");
        assert_eq!(resolved["lastTransitionTime"], "2026-12-06T22:00:00Z");
        // Still serving the last good one (a bad replacement): resolved.
        let kept = Known::of(&resources)
            .with_certificates(Arc::new(BTreeMap::from([(key, report(true, "tls.key does not match"))])));
        let s = desired(Kind::Gateway, &object, Ok(&resource), &kept, "2026-12-06T22:00:00Z");
        assert_eq!(listener(&s, 0, "ResolvedRefs").expect("ResolvedRefs")["status"], "True");
    }

    #[test]
    fn policies_report_their_target() {
        let policy = |target: &str| {
            json!({
                "apiVersion": "plexus.dev/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "p", "namespace": "bookinfo", "generation": 1},
                "spec": {"targetRef": {"kind": "Service", "name": target}, "action": "deny", "rules": [{"from": {"serviceAccounts": ["ratings"]}}]}
            })
        };
        for (target, ok, reason) in [("reviews", "True", "ResolvedRefs"), ("nothing", "False", "TargetNotFound")] {
            let object = policy(target);
            let r = crate::translate::custom_resource(Kind::AuthorizationPolicy, &object).expect("valid");
            let s = desired(Kind::AuthorizationPolicy, &object, Ok(&r), &known(), "2026-12-06T20:00:00Z");
            assert_eq!(s["conditions"][0]["status"], "True", "{s}");
            assert_eq!(
                (s["conditions"][1]["status"].as_str(), s["conditions"][1]["reason"].as_str()),
                (Some(ok), Some(reason))
            );
            assert_eq!(s["observedGeneration"], 1);
        }
        let bad = json!({"apiVersion": "plexus.dev/v1alpha1", "kind": "FaultInjection", "metadata": {"name": "f", "namespace": "bookinfo"}, "spec": {"abort": {"httpStatus": 503, "percent": 150}}});
        let reason = crate::translate::custom_resource(Kind::FaultInjection, &bad).expect_err("percent > 100");
        let s = desired(Kind::FaultInjection, &bad, Err(&reason), &known(), "2026-12-06T20:00:00Z");
        assert_eq!(
            (s["conditions"][0]["status"].as_str(), s["conditions"][0]["reason"].as_str()),
            (Some("False"), Some("Invalid"))
        );
    }
}
