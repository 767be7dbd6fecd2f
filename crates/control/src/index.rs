//! The discovery index: per-destination views compiled once per store revision and shared by
//! every proxy watching that destination (a change is compiled once, not per subscriber).
//!
//! The view of a Service holds the resources a proxy needs to route to it with the same code
//! as `--resources` mode: the Service, the HTTPRoutes attached to it, the routes' backend
//! Services, and the Workloads those Services select.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use plexus_core::resource::ServiceSpec;
use plexus_core::{Resource, ServiceName, Spec};

use crate::store::ObjectKey;

/// One resource, encoded once for every stream that sends it.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub key: ObjectKey,
    pub json: bytes::Bytes,
}

/// What a proxy needs for one destination.
#[derive(Debug, Default)]
pub struct View {
    pub resources: Vec<Arc<Encoded>>,
}

/// Views of every Service at one store revision.
#[derive(Debug, Default)]
pub struct Views {
    pub revision: u64,
    pub by_service: HashMap<ServiceName, Arc<View>>,
}

impl Views {
    /// Builds every Service's view from the whole store content.
    pub fn build(revision: u64, resources: &[Resource]) -> Views {
        let encoded: Vec<Arc<Encoded>> = resources
            .iter()
            .map(|r| {
                Arc::new(Encoded { key: ObjectKey::of(r), json: serde_json::to_vec(r).unwrap_or_default().into() })
            })
            .collect();
        let mut services: BTreeMap<ServiceName, (usize, &ServiceSpec)> = BTreeMap::new();
        for (i, r) in resources.iter().enumerate() {
            if let Spec::Service(s) = &r.spec {
                services.insert(ServiceName::new(&r.metadata.name, r.metadata.namespace()), (i, s));
            }
        }
        // Workloads by (namespace, label, value), so a selector looks at the workloads carrying
        // its first label instead of scanning them all (1,000 Services × 10,000 Workloads must
        // stay cheap).
        let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        for (i, r) in resources.iter().enumerate() {
            if matches!(r.spec, Spec::Workload(_)) {
                for (k, v) in &r.metadata.labels {
                    by_label.entry((r.metadata.namespace(), k.as_str(), v.as_str())).or_default().push(i);
                }
            }
        }
        let selected = |name: &ServiceName, spec: &ServiceSpec| -> Vec<usize> {
            let Some((k0, v0)) = spec.selector.iter().next() else { return Vec::new() };
            by_label
                .get(&(name.namespace.as_str(), k0.as_str(), v0.as_str()))
                .map(|candidates| {
                    candidates
                        .iter()
                        .copied()
                        .filter(|i| spec.selector.iter().all(|(k, v)| resources[*i].metadata.labels.get(k) == Some(v)))
                        .collect()
                })
                .unwrap_or_default()
        };
        // Routes by parent Service.
        let mut routes: HashMap<ServiceName, Vec<usize>> = HashMap::new();
        for (i, r) in resources.iter().enumerate() {
            if let Spec::HttpRoute(h) = &r.spec {
                for p in &h.parent_refs {
                    let parent = ServiceName::new(&p.name, p.namespace.as_deref().unwrap_or(r.metadata.namespace()));
                    routes.entry(parent).or_default().push(i);
                }
            }
        }
        let mut by_service = HashMap::new();
        for (name, (index, spec)) in &services {
            let mut members = vec![*index];
            members.extend(selected(name, spec));
            for &ri in routes.get(name).map(Vec::as_slice).unwrap_or_default() {
                members.push(ri);
                let Spec::HttpRoute(h) = &resources[ri].spec else { continue };
                let ns = resources[ri].metadata.namespace();
                for b in h.rules.iter().flat_map(|rule| &rule.backend_refs) {
                    let backend = ServiceName::new(&b.name, b.namespace.as_deref().unwrap_or(ns));
                    if let Some((bi, bspec)) = services.get(&backend) {
                        members.push(*bi);
                        members.extend(selected(&backend, bspec));
                    }
                }
            }
            members.sort_unstable();
            members.dedup();
            let view = View { resources: members.into_iter().map(|i| encoded[i].clone()).collect() };
            by_service.insert(name.clone(), Arc::new(view));
        }
        Views { revision, by_service }
    }

    /// The resources for a set of destinations, each once, in a stable order.
    pub fn union<'a>(&self, destinations: impl IntoIterator<Item = &'a ServiceName>) -> Vec<Arc<Encoded>> {
        let mut out: BTreeMap<ObjectKey, Arc<Encoded>> = BTreeMap::new();
        for d in destinations {
            if let Some(v) = self.by_service.get(d) {
                for e in &v.resources {
                    out.entry(e.key.clone()).or_insert_with(|| e.clone());
                }
            }
        }
        out.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_holds_routes_backends_and_their_workloads() {
        let yaml = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {selector: {app: reviews}, ports: [{port: 9080}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews-v2}\nspec: {selector: {app: reviews, version: v2}, ports: [{port: 9080}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: ratings}\nspec: {selector: {app: ratings}, ports: [{port: 9080}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {name: r2, labels: {app: reviews, version: v2}}\nspec: {address: 127.0.0.1, ports: [{port: 1}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {name: rt, labels: {app: ratings}}\nspec: {address: 127.0.0.1, ports: [{port: 2}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: to-v2}\nspec: {parentRefs: [{name: reviews}], rules: [{backendRefs: [{name: reviews-v2}]}]}\n";
        let resources = plexus_core::parse_documents("t", yaml).expect("valid");
        let views = Views::build(7, &resources);
        let names = |d: &str| -> Vec<String> {
            views.union([&ServiceName::new(d, "default")]).iter().map(|e| e.key.name.clone()).collect()
        };
        assert_eq!(names("reviews"), ["reviews", "reviews-v2", "r2", "to-v2"]);
        assert_eq!(names("ratings"), ["ratings", "rt"]);
        assert!(names("nope").is_empty());
        let both = views.union([&ServiceName::new("reviews", "default"), &ServiceName::new("reviews-v2", "default")]);
        assert_eq!(both.len(), 4, "shared resources are sent once");
    }
}
