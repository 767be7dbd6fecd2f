//! The discovery index: per-destination views compiled once per store revision and shared by
//! every proxy watching that destination (a change is compiled once, not per subscriber).
//!
//! The view of a Service holds the resources a proxy needs to route to it with the same code
//! as `--resources` mode: the Service, the HTTPRoutes attached to it, the routes' backend
//! Services, and the Workloads those Services select.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use plexus_core::resource::{HttpRouteFilter, ServiceSpec};
use plexus_core::{Kind, Resource, ServiceName, Spec};

use crate::store::ObjectKey;

/// Hash maps keyed by addresses and short strings, rebuilt on every change: a fast hasher
/// (the keys come from the store, not from the network).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// (namespace, label, value).
type LabelPair<'a> = (&'a str, &'a str, &'a str);

/// One resource, encoded once for every stream that sends it.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub key: ObjectKey,
    pub json: bytes::Bytes,
}

/// Encodings of the objects in the store, by key, with the resource version they encode.
#[derive(Debug, Default)]
pub struct EncodeCache {
    by_key: HashMap<ObjectKey, (Option<String>, Arc<Encoded>)>,
    /// The previous build's encodings by the address of the shared resource they encode: a
    /// store that hands out the same `Arc` for an unchanged object (the file store does) is
    /// found without building its key (11,000 lookups per change must stay cheap).
    by_address: FastMap<usize, (Arc<Resource>, Arc<Encoded>)>,
}

impl EncodeCache {
    /// The encoding of every resource, in order; drops those of deleted objects.
    fn encode_all(&mut self, resources: &[Arc<Resource>]) -> Vec<Arc<Encoded>> {
        let mut by_address = FastMap::with_capacity_and_hasher(resources.len(), Default::default());
        let encoded = resources
            .iter()
            .map(|r| {
                let address = Arc::as_ptr(r) as usize;
                let e = match self.by_address.get(&address) {
                    Some((_, e)) => e.clone(),
                    None => self.encode(r),
                };
                by_address.insert(address, (r.clone(), e.clone()));
                e
            })
            .collect();
        self.by_address = by_address;
        if self.by_key.len() > resources.len() {
            let live: std::collections::HashSet<ObjectKey> = resources.iter().map(|r| ObjectKey::of(r)).collect();
            self.by_key.retain(|k, _| live.contains(k));
        }
        encoded
    }

    fn encode(&mut self, r: &Resource) -> Arc<Encoded> {
        let key = ObjectKey::of(r);
        let version = &r.metadata.resource_version;
        if let Some((v, e)) = self.by_key.get(&key)
            && v == version
            && version.is_some()
        {
            return e.clone();
        }
        // Proxies need neither the uid nor the resource version (the view's revision versions
        // it); leaving them out makes every response, and so every stream's buffers, smaller.
        // The creation time stays: it orders routes and policies that tie.
        let mut sent = r.clone();
        sent.metadata.uid = None;
        sent.metadata.resource_version = None;
        let encoded =
            Arc::new(Encoded { key: key.clone(), json: serde_json::to_vec(&sent).unwrap_or_default().into() });
        self.by_key.insert(key, (version.clone(), encoded.clone()));
        encoded
    }
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
    /// Every namespace that has a Service, sorted.
    pub namespaces: Arc<[String]>,
    /// What every proxy gets whatever it watches: MeshConfig and the ExternalServices (a
    /// sidecar enforces `registryOnly` on destinations that are no Service).
    pub global: Vec<Arc<Encoded>>,
}

impl Views {
    /// Builds every Service's view from the whole store content. Encodings of unchanged
    /// objects are reused from `cache` (which is updated), so a change re-encodes only what
    /// changed and unchanged views keep sharing the same bytes.
    pub fn build(revision: u64, resources: &[Arc<Resource>], cache: &mut EncodeCache) -> Views {
        // Services registered workloads imply (no Service resource yet): viewed as declared ones.
        let implied = plexus_core::model::implied_services(resources.iter().map(|r| &**r));
        let with_implied: Vec<Arc<Resource>>;
        let resources = if implied.is_empty() {
            resources
        } else {
            with_implied = resources.iter().cloned().chain(implied.into_iter().map(Arc::new)).collect();
            &with_implied
        };
        let encoded = cache.encode_all(resources);
        // Services by name: (position in `resources`, spec, ordinal in `selected`).
        let mut services: BTreeMap<ServiceName, (usize, &ServiceSpec)> = BTreeMap::new();
        for (i, r) in resources.iter().enumerate() {
            if let Spec::Service(s) = &r.spec {
                services.insert(ServiceName::new(&r.metadata.name, r.metadata.namespace()), (i, s));
            }
        }
        // The Workloads each Service selects (by the Service's position in `resources`).
        // Services are indexed by (namespace, label, value) of their first selector pair, and
        // each Workload label is looked up there: one pass over the Workloads instead of one
        // per Service (1,000 Services × 10,000 Workloads must stay cheap).
        let mut by_first_pair: FastMap<LabelPair, Vec<(usize, &ServiceSpec)>> = FastMap::default();
        for (name, (i, spec)) in &services {
            if let Some((k, v)) = spec.selector.iter().next() {
                by_first_pair.entry((name.namespace.as_str(), k.as_str(), v.as_str())).or_default().push((*i, spec));
            }
        }
        let mut selected: FastMap<usize, Vec<usize>> = FastMap::default();
        for (i, r) in resources.iter().enumerate() {
            if !matches!(r.spec, Spec::Workload(_)) {
                continue;
            }
            let labels = &r.metadata.labels;
            for (k, v) in labels {
                for (service, spec) in
                    by_first_pair.get(&(r.metadata.namespace(), k.as_str(), v.as_str())).into_iter().flatten()
                {
                    if spec.selector.iter().all(|(sk, sv)| labels.get(sk) == Some(sv)) {
                        selected.entry(*service).or_default().push(i);
                    }
                }
            }
        }
        let selected = |service: usize| selected.get(&service).map(Vec::as_slice).unwrap_or_default();
        let by_key: HashMap<(Kind, String), usize> = resources
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r.kind, Kind::FaultInjection | Kind::HttpRouteGroup))
            .map(|(i, r)| ((r.kind, r.key()), i))
            .collect();
        let mut attached: HashMap<ServiceName, Vec<(usize, Links)>> = HashMap::new();
        let mut attached_to_gateway: HashMap<ServiceName, Vec<(usize, Links)>> = HashMap::new();
        let mut namespace_wide: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut global: Vec<usize> = Vec::new();
        for (i, r) in resources.iter().enumerate() {
            match links(r) {
                Attachment::Services(targets, l) => {
                    for g in &l.gateways {
                        attached_to_gateway.entry(g.clone()).or_default().push((i, l.clone()));
                    }
                    for t in targets {
                        attached.entry(t).or_default().push((i, l.clone()));
                    }
                }
                Attachment::Namespace(refs) => {
                    namespace_wide.entry(r.metadata.namespace()).or_default().push(i);
                    namespace_wide
                        .entry(r.metadata.namespace())
                        .or_default()
                        .extend(refs.iter().filter_map(|k| by_key.get(k).copied()));
                }
                Attachment::Global => global.push(i),
                Attachment::None => {}
            }
        }
        // A Gateway's view: the Gateway, the routes attached to it and what they send to, under
        // the Gateway's name (a gateway proxy asks for it like a destination; a Service of the
        // same name shares the view).
        let gateways: Vec<(ServiceName, usize)> = resources
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r.spec, Spec::Gateway(_)))
            .map(|(i, r)| (ServiceName::new(&r.metadata.name, r.metadata.namespace()), i))
            .collect();
        let mut by_service = HashMap::new();
        let viewed = services
            .iter()
            .map(|(name, (index, _))| (name, *index, false))
            .chain(gateways.iter().map(|(name, index)| (name, *index, true)));
        for (name, index, gateway) in viewed {
            let mut members = vec![index];
            let routes = if gateway {
                attached_to_gateway.get(name)
            } else {
                members.extend(selected(index));
                members.extend(namespace_wide.get(name.namespace.as_str()).map(Vec::as_slice).unwrap_or_default());
                attached.get(name)
            };
            for (ri, l) in routes.map(Vec::as_slice).unwrap_or_default() {
                members.push(*ri);
                members.extend(l.refs.iter().filter_map(|k| by_key.get(k).copied()));
                for backend in &l.backends {
                    if let Some((bi, _)) = services.get(backend) {
                        members.push(*bi);
                        members.extend(selected(*bi));
                        // The backend's own client policies (not its routes: routing is one hop).
                        for (pi, pl) in attached.get(backend).map(Vec::as_slice).unwrap_or_default() {
                            if pl.policy {
                                members.push(*pi);
                            }
                        }
                    }
                }
            }
            if let Some(previous) = by_service.get(name) {
                let previous: &Arc<View> = previous;
                let positions: HashMap<&ObjectKey, usize> =
                    resources.iter().enumerate().map(|(i, _)| (&encoded[i].key, i)).collect();
                members.extend(previous.resources.iter().filter_map(|e| positions.get(&e.key).copied()));
            }
            members.sort_unstable();
            members.dedup();
            let view = View { resources: members.into_iter().map(|i| encoded[i].clone()).collect() };
            by_service.insert(name.clone(), Arc::new(view));
        }
        let namespaces: BTreeSet<&str> = services.keys().map(|s| s.namespace.as_str()).collect();
        let namespaces = namespaces.into_iter().map(str::to_string).collect();
        let global = global.iter().map(|i| encoded[*i].clone()).collect();
        Views { revision, by_service, namespaces, global }
    }

    /// The resources for a set of destinations, plus the global ones, each once, in a stable
    /// order.
    pub fn union<'a>(&self, destinations: impl IntoIterator<Item = &'a ServiceName>) -> Vec<Arc<Encoded>> {
        let mut out: BTreeMap<&ObjectKey, &Arc<Encoded>> = self.global.iter().map(|e| (&e.key, e)).collect();
        for d in destinations {
            if let Some(v) = self.by_service.get(d) {
                for e in &v.resources {
                    out.entry(&e.key).or_insert(e);
                }
            }
        }
        out.into_values().cloned().collect()
    }
}

/// How a resource reaches Service views.
enum Attachment {
    /// Attached to these Services (routes by parent, policies by target).
    Services(Vec<ServiceName>, Links),
    /// Concerns every Service of its namespace (SMI TrafficTarget), with what it references.
    Namespace(Vec<(Kind, String)>),
    /// Sent to every proxy (MeshConfig, ExternalServices).
    Global,
    /// Only reached through references (workloads, groups, faults) or not sent to proxies.
    None,
}

/// What an attached resource needs alongside it.
#[derive(Debug, Clone, Default)]
struct Links {
    /// Services it sends traffic to (backends, mirrors).
    backends: Vec<ServiceName>,
    /// Named resources it uses (FaultInjections, HTTPRouteGroups).
    refs: Vec<(Kind, String)>,
    /// A policy (also sent to clients that reach the Service as a route backend).
    policy: bool,
    /// Gateways a route attaches to (`parentRefs` of kind Gateway).
    gateways: Vec<ServiceName>,
}

fn links(r: &Resource) -> Attachment {
    let ns = r.metadata.namespace();
    let svc = |name: &str, namespace: Option<&String>| ServiceName::new(name, namespace.map_or(ns, String::as_str));
    let route_links = |rules: Vec<(&[plexus_core::resource::BackendRef], &[HttpRouteFilter])>| {
        let mut l = Links::default();
        for (backends, filters) in rules {
            l.backends.extend(backends.iter().map(|b| svc(&b.name, b.namespace.as_ref())));
            for f in filters {
                if let Some(m) = &f.request_mirror {
                    l.backends.push(svc(&m.backend_ref.name, m.backend_ref.namespace.as_ref()));
                }
                if let Some(e) = &f.extension_ref {
                    l.refs.push((Kind::FaultInjection, format!("{ns}/{}", e.name)));
                }
            }
        }
        l
    };
    let policy = |t: &plexus_core::resource::PolicyTargetRef| {
        Attachment::Services(vec![svc(&t.name, t.namespace.as_ref())], Links { policy: true, ..Links::default() })
    };
    // Parents: mesh Services, and Gateways (their views are built apart).
    let parents = |refs: &[plexus_core::resource::ParentRef], mut l: Links| {
        let (gateways, services): (Vec<_>, Vec<_>) =
            refs.iter().partition(|p| plexus_core::route::parent_is_gateway(p));
        l.gateways = gateways.iter().map(|p| svc(&p.name, p.namespace.as_ref())).collect();
        Attachment::Services(services.iter().map(|p| svc(&p.name, p.namespace.as_ref())).collect(), l)
    };
    match &r.spec {
        Spec::HttpRoute(h) => parents(
            &h.parent_refs,
            route_links(h.rules.iter().map(|r| (r.backend_refs.as_slice(), r.filters.as_slice())).collect()),
        ),
        Spec::GrpcRoute(g) => parents(
            &g.parent_refs,
            route_links(g.rules.iter().map(|r| (r.backend_refs.as_slice(), r.filters.as_slice())).collect()),
        ),
        Spec::TrafficSplit(t) => Attachment::Services(
            vec![svc(&t.service, None)],
            Links {
                backends: t.backends.iter().map(|b| svc(&b.service, None)).collect(),
                refs: t.matches.iter().map(|m| (Kind::HttpRouteGroup, format!("{ns}/{}", m.name))).collect(),
                policy: false,
                gateways: Vec::new(),
            },
        ),
        Spec::ResiliencePolicy(p) => policy(&p.target_ref),
        Spec::RateLimitPolicy(p) => policy(&p.target_ref),
        Spec::AuthorizationPolicy(p) => policy(&p.target_ref),
        Spec::TrafficTarget(t) => {
            Attachment::Namespace(t.rules.iter().map(|m| (Kind::HttpRouteGroup, format!("{ns}/{}", m.name))).collect())
        }
        Spec::MeshConfig(_) | Spec::ExternalService(_) => Attachment::Global,
        _ => Attachment::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_holds_routes_backends_and_their_workloads() {
        let yaml = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {selector: {app: reviews}, ports: [{port: 9080}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews-v2}\nspec: {selector: {app: reviews, version: v2}, ports: [{port: 9080}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: ratings}\nspec: {selector: {app: ratings}, ports: [{port: 9080}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {name: r2, labels: {app: reviews, version: v2}}\nspec: {address: 127.0.0.1, ports: [{port: 1}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {name: rt, labels: {app: ratings}}\nspec: {address: 127.0.0.1, ports: [{port: 2}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: to-v2}\nspec: {parentRefs: [{name: reviews}], rules: [{backendRefs: [{name: reviews-v2}]}]}\n";
        let resources: Vec<Arc<Resource>> =
            plexus_core::parse_documents("t", yaml).expect("valid").into_iter().map(Arc::new).collect();
        let views = Views::build(7, &resources, &mut EncodeCache::default());
        let names = |d: &str| -> Vec<String> {
            views.union([&ServiceName::new(d, "default")]).iter().map(|e| e.key.name.clone()).collect()
        };
        assert_eq!(names("reviews"), ["reviews", "reviews-v2", "r2", "to-v2"]);
        assert_eq!(names("ratings"), ["ratings", "rt"]);
        assert!(names("nope").is_empty());
        let both = views.union([&ServiceName::new("reviews", "default"), &ServiceName::new("reviews-v2", "default")]);
        assert_eq!(both.len(), 4, "shared resources are sent once");
        // MeshConfig and ExternalServices reach every proxy, whatever it watches.
        let global = "apiVersion: plexus.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {outboundTrafficPolicy: registryOnly}\n---\napiVersion: plexus.dev/v1alpha1\nkind: ExternalService\nmetadata: {name: api, namespace: ops}\nspec: {hosts: [api.example.com], ports: [443]}\n";
        let with_global: Vec<Arc<Resource>> = resources
            .iter()
            .cloned()
            .chain(plexus_core::parse_documents("g", global).expect("valid").into_iter().map(Arc::new))
            .collect();
        let views = Views::build(8, &with_global, &mut EncodeCache::default());
        let kinds = |d: &[ServiceName]| -> Vec<String> {
            views
                .union(d)
                .iter()
                .filter(|e| e.key.name == "default" || e.key.name == "api")
                .map(|e| e.key.to_string())
                .collect()
        };
        assert_eq!(kinds(&[]).len(), 2, "a proxy watching nothing gets both");
        assert_eq!(kinds(&[ServiceName::new("reviews", "default")]).len(), 2, "once each");
    }

    #[test]
    fn a_gateway_view_holds_its_routes_backends_and_their_workloads() {
        let yaml = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}, ports: [{port: 9080}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {name: w1, labels: {app: web}}\nspec: {address: 127.0.0.1, ports: [{port: 1}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge}\nspec: {listeners: [{name: http, port: 8080, protocol: HTTP}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: to-web}\nspec: {parentRefs: [{kind: Gateway, name: edge}], rules: [{backendRefs: [{name: web, port: 9080}]}]}\n";
        let resources: Vec<Arc<Resource>> =
            plexus_core::parse_documents("t", yaml).expect("valid").into_iter().map(Arc::new).collect();
        let views = Views::build(1, &resources, &mut EncodeCache::default());
        let names = |d: &str| -> Vec<String> {
            views.union([&ServiceName::new(d, "default")]).iter().map(|e| e.key.name.clone()).collect()
        };
        assert_eq!(names("edge"), ["web", "w1", "edge", "to-web"]);
        assert_eq!(names("web"), ["web", "w1"], "a gateway route is not a mesh route of its backend");
    }
}
