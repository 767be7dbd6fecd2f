//! `KubeStore`: the Kubernetes API as the control plane's store (`plexus control --store
//! kubernetes`). Watches feed the same in-memory resource list the index reads, so proxies see
//! no difference from the file store.
//!
//! - **Reads**: kube-runtime watchers on core `v1` Services, Pods and every Plexus CRD keep the
//!   objects as the API server has them; after each batch of events the whole list is
//!   translated again ([`crate::translate`]: Services; the Workloads behind them — from
//!   `discovery.k8s.io/v1` EndpointSlices (with the Pods they name) where the server serves
//!   that, else the serving Pods some Service selects: [`translate::EndpointSource`], chosen by
//!   API discovery at start —; the custom resources that plexus-core accepts) and, when it differs, the revision is
//!   bumped and subscribers (the index) notified. A custom resource plexus-core rejects is not
//!   in the mesh; its reason is kept for its status ([`KubeStore::invalid`]).
//! - **Finished workloads**: from the same Pods, the injected pods whose app containers have
//!   all terminated for good ([`translate::workload_finished`]), for the discovery streams of
//!   their proxies, which then exit so the pod (a Job's) completes.
//! - **Writes** (`plexus apply` / `delete` through the control plane's API): custom resources
//!   are written to the API server with server-side apply (field manager `plexus`), one object
//!   at a time (the Kubernetes API has no multi-object transaction: the control plane validates
//!   everything first, so a failure part-way is the API server refusing, and the objects before
//!   it stay written). A write returns once the watch has seen it, so a `get` right after it
//!   reads it. Services and Workloads are refused: in Kubernetes they are core Services and
//!   Pods, managed with `kubectl`.
//! - **Health**: every watch has listed its kind (a CRD that is not installed counts as an
//!   empty list, and is reported), and the last watch error, if any, is shown.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use plexus_control::store::{FinishedWorkloads, ObjectKey, Outcome, Store, StoreError};
use plexus_core::{Kind, Resource};
use tokio::sync::{Notify, watch};

use crate::translate::{self, EndpointSource};

/// The field manager of Plexus's server-side applies.
pub const FIELD_MANAGER: &str = "plexus";
/// How long a write waits for its watch event before returning anyway.
const WRITE_VISIBLE_WAIT: Duration = Duration::from_secs(5);
/// Events arriving this close together are translated once.
const COALESCE: Duration = Duration::from_millis(20);

type Mirror = BTreeMap<String, Arc<Resource>>;

/// What the watches hold: the objects as the API server has them.
#[derive(Default)]
struct Raw {
    /// Where Workloads come from (API discovery at start).
    source: EndpointSource,
    services: BTreeMap<(String, String), Service>,
    pods: BTreeMap<(String, String), Pod>,
    /// EndpointSlices (`discovery.k8s.io/v1`), watched only when they are the source.
    slices: BTreeMap<(String, String), EndpointSlice>,
    custom: BTreeMap<(Kind, String, String), serde_json::Value>,
}

/// The state of one watch.
#[derive(Debug, Clone, Default)]
struct WatchState {
    synced: bool,
    /// The kind's CRD is not installed (the watch keeps retrying).
    absent: bool,
    error: Option<String>,
}

struct Shared {
    raw: Mutex<Raw>,
    mirror: RwLock<Mirror>,
    invalid: RwLock<BTreeMap<String, String>>,
    revision: AtomicU64,
    changes: watch::Sender<u64>,
    /// Pods whose workload has finished ([`translate::workload_finished`]): their proxies exit.
    finished: watch::Sender<Arc<FinishedWorkloads>>,
    dirty: Notify,
    watches: Mutex<BTreeMap<String, WatchState>>,
}

/// The Kubernetes-API store.
pub struct KubeStore {
    client: kube::Client,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn key_of(meta: &kube::core::ObjectMeta) -> (String, String) {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

/// Translates the raw objects into the store's resource list, and the invalid custom
/// resources' reasons by id.
fn translate_all(raw: &Raw) -> (Mirror, BTreeMap<String, String>) {
    let mut mirror = Mirror::new();
    let services: Vec<Resource> = raw.services.values().filter_map(translate::service).collect();
    if raw.source == EndpointSource::EndpointSlices {
        for w in translate::slice_workloads(raw.slices.values(), &services, &raw.pods) {
            mirror.insert(w.id(), Arc::new(w));
        }
    }
    for pod in raw.pods.values().filter(|_| raw.source == EndpointSource::Pods) {
        let ports = translate::selected_target_ports(pod, &services);
        let selected = services.iter().any(|s| match &s.spec {
            plexus_core::Spec::Service(spec) => {
                s.metadata.namespace() == pod.metadata.namespace.as_deref().unwrap_or("default")
                    && pod.metadata.labels.as_ref().is_some_and(|l| translate::selects(&spec.selector, l))
            }
            _ => false,
        });
        if !selected {
            continue;
        }
        if let Some(w) = translate::pod(pod, &ports) {
            mirror.insert(w.id(), Arc::new(w));
        }
    }
    for s in services {
        mirror.insert(s.id(), Arc::new(s));
    }
    let mut invalid = BTreeMap::new();
    for ((kind, ns, name), object) in &raw.custom {
        match translate::custom_resource(*kind, object) {
            Ok(r) => {
                mirror.insert(r.id(), Arc::new(r));
            }
            Err(reason) => {
                let ns = if kind.namespaced() { ns.as_str() } else { "default" };
                invalid.insert(plexus_core::resource::object_id(*kind, ns, name), reason);
            }
        }
    }
    (mirror, invalid)
}

/// Whether two resources differ at most in `metadata.resourceVersion`.
fn same_but_version(a: &Resource, b: &Resource) -> bool {
    a.metadata.resource_version != b.metadata.resource_version && {
        let mut a = a.clone();
        a.metadata.resource_version = b.metadata.resource_version.clone();
        a == *b
    }
}

impl Shared {
    fn watch_state(&self, name: &str, f: impl FnOnce(&mut WatchState)) {
        if let Ok(mut w) = self.watches.lock() {
            f(w.entry(name.to_string()).or_default());
        }
    }

    /// Re-translates after changes (coalescing bursts) until the task is dropped.
    async fn maintain(self: Arc<Self>) {
        loop {
            self.dirty.notified().await;
            tokio::time::sleep(COALESCE).await;
            let (mut mirror, invalid) = match self.raw.lock() {
                Ok(raw) => {
                    let finished = translate::finished_workloads(raw.pods.values());
                    self.finished.send_if_modified(|f| {
                        let changed = **f != finished;
                        if changed {
                            *f = Arc::new(finished);
                        }
                        changed
                    });
                    translate_all(&raw)
                }
                Err(_) => return,
            };
            // A change of status alone (a pod's probe, the leader's conditions) gives an object
            // a new resourceVersion and nothing else: the mesh has not changed.
            if let Ok(old) = self.mirror.read() {
                for (id, new) in mirror.iter_mut() {
                    if let Some(o) = old.get(id)
                        && same_but_version(o, new)
                    {
                        *new = o.clone();
                    }
                }
            }
            if let Ok(mut i) = self.invalid.write() {
                *i = invalid;
            }
            let changed = match self.mirror.write() {
                Ok(mut m) if *m != mirror => {
                    *m = mirror;
                    true
                }
                _ => false,
            };
            if changed {
                let revision = self.revision.fetch_add(1, Ordering::SeqCst) + 1;
                self.changes.send_replace(revision);
            }
        }
    }
}

/// Runs one watch, applying its events to `raw` with `apply` / `remove`.
async fn run_watch<K>(
    shared: Arc<Shared>,
    name: String,
    api: Api<K>,
    insert: impl Fn(&mut Raw, K) + Send + 'static,
    remove: impl Fn(&mut Raw, &K) + Send + 'static,
    reset: impl Fn(&mut Raw) + Send + 'static,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures_util::pin_mut!(stream);
    // Objects listed since the last Init, replacing the kind's objects at InitDone.
    let mut listing: Option<Vec<K>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing = Some(Vec::new()),
            Ok(watcher::Event::InitApply(o)) => listing.get_or_insert_with(Vec::new).push(o),
            Ok(watcher::Event::InitDone) => {
                if let Ok(mut raw) = shared.raw.lock() {
                    reset(&mut raw);
                    for o in listing.take().unwrap_or_default() {
                        insert(&mut raw, o);
                    }
                }
                shared.watch_state(&name, |w| *w = WatchState { synced: true, absent: false, error: None });
                shared.dirty.notify_one();
            }
            Ok(watcher::Event::Apply(o)) => {
                if let Ok(mut raw) = shared.raw.lock() {
                    insert(&mut raw, o);
                }
                shared.dirty.notify_one();
                shared.watch_state(&name, |w| w.error = None);
            }
            Ok(watcher::Event::Delete(o)) => {
                if let Ok(mut raw) = shared.raw.lock() {
                    remove(&mut raw, &o);
                }
                shared.dirty.notify_one();
                shared.watch_state(&name, |w| w.error = None);
            }
            Err(e) => {
                let absent = matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404)
                    || matches!(&e, watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 404);
                if absent {
                    tracing::debug!(watch = %name, "not served by the API server (CRD not installed)");
                } else {
                    tracing::warn!(watch = %name, error = %e, "watch failed; retrying");
                }
                let message = e.to_string();
                shared.watch_state(&name, |w| {
                    if absent {
                        w.synced = true;
                        w.absent = true;
                        w.error = None;
                    } else {
                        w.error = Some(message);
                    }
                });
            }
        }
    }
}

impl KubeStore {
    /// Connects with the in-cluster configuration or `KUBECONFIG` (kube's inference) and starts
    /// the watches. Call [`KubeStore::wait_synced`] before serving.
    pub async fn connect() -> Result<KubeStore, String> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG): {e}"))?;
        let groups = client.list_api_groups().await.map_err(|e| format!("API discovery (GET /apis): {e}"))?;
        let source = translate::endpoint_source(&groups);
        tracing::info!(
            ?source,
            "endpoints from {}",
            match source {
                EndpointSource::EndpointSlices => "EndpointSlices (discovery.k8s.io/v1 is served)",
                EndpointSource::Pods => "Pods (discovery.k8s.io/v1 is not served)",
            }
        );
        Ok(KubeStore::start(client, source))
    }

    /// Starts the watches with `client`, taking Workloads from `source`.
    pub fn start(client: kube::Client, source: EndpointSource) -> KubeStore {
        let (changes, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            raw: Mutex::new(Raw { source, ..Raw::default() }),
            mirror: RwLock::new(Mirror::new()),
            invalid: RwLock::new(BTreeMap::new()),
            revision: AtomicU64::new(0),
            changes,
            finished: watch::channel(Arc::default()).0,
            dirty: Notify::new(),
            watches: Mutex::new(BTreeMap::new()),
        });
        let mut tasks = vec![tokio::spawn(shared.clone().maintain())];
        shared.watch_state("Service", |_| {});
        tasks.push(tokio::spawn(run_watch(
            shared.clone(),
            "Service".into(),
            Api::<Service>::all(client.clone()),
            |raw, s: Service| {
                raw.services.insert(key_of(&s.metadata), s);
            },
            |raw, s| {
                raw.services.remove(&key_of(&s.metadata));
            },
            |raw| raw.services.clear(),
        )));
        shared.watch_state("Pod", |_| {});
        tasks.push(tokio::spawn(run_watch(
            shared.clone(),
            "Pod".into(),
            Api::<Pod>::all(client.clone()),
            |raw, p: Pod| {
                raw.pods.insert(key_of(&p.metadata), p);
            },
            |raw, p| {
                raw.pods.remove(&key_of(&p.metadata));
            },
            |raw| raw.pods.clear(),
        )));
        if source == EndpointSource::EndpointSlices {
            shared.watch_state("EndpointSlice", |_| {});
            tasks.push(tokio::spawn(run_watch(
                shared.clone(),
                "EndpointSlice".into(),
                Api::<EndpointSlice>::all(client.clone()),
                |raw, e: EndpointSlice| {
                    raw.slices.insert(key_of(&e.metadata), e);
                },
                |raw, e| {
                    raw.slices.remove(&key_of(&e.metadata));
                },
                |raw| raw.slices.clear(),
            )));
        }
        for kind in crate::crd::crd_kinds(false) {
            let ar = crate::crd::api_resource(kind);
            let name = kind.as_str().to_string();
            shared.watch_state(&name, |_| {});
            let to_entry = move |o: &DynamicObject| {
                let (ns, name) = key_of(&o.metadata);
                (kind, ns, name)
            };
            tasks.push(tokio::spawn(run_watch(
                shared.clone(),
                name,
                Api::<DynamicObject>::all_with(client.clone(), &ar),
                move |raw, o: DynamicObject| {
                    if let Ok(v) = serde_json::to_value(&o) {
                        raw.custom.insert(to_entry(&o), v);
                    }
                },
                move |raw, o| {
                    raw.custom.remove(&to_entry(o));
                },
                move |raw| raw.custom.retain(|(k, _, _), _| *k != kind),
            )));
        }
        KubeStore { client, shared, runtime: tokio::runtime::Handle::current(), tasks }
    }

    /// The client this store uses (status writing, leader election, TokenReview).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Waits until every watch has listed its kind, or `timeout`; the health problem if not.
    pub async fn wait_synced(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let health = self.health();
            if health.is_ok() || tokio::time::Instant::now() >= deadline {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The custom resources plexus-core rejected, by `Kind/namespace/name`, with the reason.
    pub fn invalid(&self) -> BTreeMap<String, String> {
        self.shared.invalid.read().map(|i| i.clone()).unwrap_or_default()
    }

    /// The custom resources as the API server has them (status included), with their kind.
    pub fn custom_objects(&self) -> Vec<(Kind, serde_json::Value)> {
        self.shared
            .raw
            .lock()
            .map(|raw| raw.custom.iter().map(|((k, _, _), v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }

    /// The kinds whose CRD is not installed.
    pub fn absent_kinds(&self) -> Vec<String> {
        self.shared
            .watches
            .lock()
            .map(|w| w.iter().filter(|(_, s)| s.absent).map(|(k, _)| k.clone()).collect())
            .unwrap_or_default()
    }

    /// Waits until the mirror holds `id` at `resource_version` (`None`: until it is gone).
    async fn wait_visible(&self, wanted: &[(String, Option<String>)]) {
        let mut changes = self.shared.changes.subscribe();
        let deadline = tokio::time::Instant::now() + WRITE_VISIBLE_WAIT;
        loop {
            let seen = {
                let Ok(mirror) = self.shared.mirror.read() else { return };
                let invalid = self.invalid();
                wanted.iter().all(|(id, rv)| match rv {
                    Some(rv) => {
                        mirror.get(id).is_some_and(|r| r.metadata.resource_version.as_deref() == Some(rv.as_str()))
                            || invalid.contains_key(id)
                    }
                    None => !mirror.contains_key(id),
                })
            };
            if seen {
                return;
            }
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                tracing::debug!("a write was not seen by the watch within {WRITE_VISIBLE_WAIT:?}");
                return;
            }
        }
    }

    async fn apply_async(&self, resources: &[Resource]) -> Result<Vec<(Resource, Outcome)>, StoreError> {
        let out = apply_objects(&self.client, resources).await?;
        let wanted: Vec<_> = out.iter().map(|(r, _)| (r.id(), r.metadata.resource_version.clone())).collect();
        self.wait_visible(&wanted).await;
        Ok(out)
    }

    async fn delete_async(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, StoreError> {
        let out = delete_objects(&self.client, keys).await?;
        let wanted: Vec<_> =
            keys.iter().zip(&out).filter(|(_, deleted)| **deleted).map(|(k, _)| (k.storage_key(), None)).collect();
        self.wait_visible(&wanted).await;
        Ok(out)
    }
}

/// The API of a kind's objects in `namespace` (Services and Workloads are refused: they are
/// core Services and Pods in Kubernetes).
fn api_for(client: &kube::Client, kind: Kind, namespace: &str) -> Result<Api<DynamicObject>, StoreError> {
    if matches!(kind, Kind::Service | Kind::Workload) {
        return Err(StoreError::new(format!(
            "in Kubernetes mode a {kind} is a core v1 {}: manage it with kubectl, not plexus apply/delete",
            if kind == Kind::Service { "Service" } else { "Pod (a Workload is a pod a Service selects)" }
        )));
    }
    let ar = crate::crd::api_resource(kind);
    Ok(if kind.namespaced() {
        Api::namespaced_with(client.clone(), namespace, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    })
}

/// Writes resources as custom resources with server-side apply (field manager
/// [`FIELD_MANAGER`]), in order, with `client`'s credentials; each with its outcome and the
/// `resourceVersion` the API server gave it.
pub async fn apply_objects(
    client: &kube::Client,
    resources: &[Resource],
) -> Result<Vec<(Resource, Outcome)>, StoreError> {
    let mut out = Vec::new();
    for r in resources {
        let api = api_for(client, r.kind, r.metadata.namespace())?;
        let name = &r.metadata.name;
        let before = api
            .get_opt(name)
            .await
            .map_err(|e| StoreError::new(format!("reading {} {}: {}", r.kind, r.key(), api_message(&e))))?;
        let mut object = serde_json::to_value(r).map_err(|e| StoreError::new(e.to_string()))?;
        if let Some(serde_json::Value::Object(m)) = object.get_mut("metadata") {
            m.remove("resourceVersion");
            m.remove("uid");
            m.remove("creationTimestamp");
            if !r.kind.namespaced() {
                m.remove("namespace");
            }
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let after = api
            .patch(name, &params, &Patch::Apply(&object))
            .await
            .map_err(|e| StoreError::new(format!("writing {} {}: {}", r.kind, r.key(), api_message(&e))))?;
        let rv = after.metadata.resource_version.clone();
        let outcome = match &before {
            None => Outcome::Created,
            Some(b) if b.metadata.resource_version == rv => Outcome::Unchanged,
            Some(_) => Outcome::Configured,
        };
        let mut stored = r.clone();
        stored.metadata.resource_version = rv;
        stored.metadata.uid = after.metadata.uid.clone();
        out.push((stored, outcome));
    }
    Ok(out)
}

/// Deletes custom resources with `client`'s credentials; whether each existed.
pub async fn delete_objects(client: &kube::Client, keys: &[ObjectKey]) -> Result<Vec<bool>, StoreError> {
    let mut out = Vec::new();
    for k in keys {
        let api = api_for(client, k.kind, &k.namespace)?;
        match api.delete(&k.name, &DeleteParams::default()).await {
            Ok(_) => out.push(true),
            Err(kube::Error::Api(s)) if s.code == 404 => out.push(false),
            Err(e) => return Err(StoreError::new(format!("deleting {k}: {}", api_message(&e)))),
        }
    }
    Ok(out)
}

/// The API server's own message for a refused request (what a user needs to read).
fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.reason),
        other => other.to_string(),
    }
}

impl Store for KubeStore {
    fn apply(&self, resources: &[Resource]) -> Result<Vec<(Resource, Outcome)>, StoreError> {
        self.runtime.block_on(self.apply_async(resources))
    }

    fn delete(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, StoreError> {
        self.runtime.block_on(self.delete_async(keys))
    }

    fn get(&self, key: &ObjectKey) -> Result<Option<Resource>, StoreError> {
        let mirror = self.shared.mirror.read().map_err(|_| StoreError::new("store lock poisoned"))?;
        Ok(mirror.get(&key.storage_key()).map(|r| (**r).clone()))
    }

    fn list(&self, kind: Option<Kind>, namespace: Option<&str>) -> Result<Vec<Resource>, StoreError> {
        let mirror = self.shared.mirror.read().map_err(|_| StoreError::new("store lock poisoned"))?;
        Ok(mirror
            .values()
            .filter(|r| kind.is_none_or(|k| r.kind == k))
            .filter(|r| namespace.is_none_or(|ns| r.metadata.namespace() == ns))
            .map(|r| (**r).clone())
            .collect())
    }

    fn list_shared(&self) -> Result<Vec<Arc<Resource>>, StoreError> {
        let mirror = self.shared.mirror.read().map_err(|_| StoreError::new("store lock poisoned"))?;
        Ok(mirror.values().cloned().collect())
    }

    fn revision(&self) -> u64 {
        self.shared.revision.load(Ordering::SeqCst)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    fn finished_workloads(&self) -> Option<watch::Receiver<Arc<FinishedWorkloads>>> {
        Some(self.shared.finished.subscribe())
    }

    fn health(&self) -> Result<(), String> {
        let watches = self.shared.watches.lock().map_err(|_| "store lock poisoned".to_string())?;
        let unsynced: BTreeSet<&str> = watches.iter().filter(|(_, w)| !w.synced).map(|(k, _)| k.as_str()).collect();
        let errors: Vec<String> =
            watches.iter().filter_map(|(k, w)| w.error.as_ref().map(|e| format!("{k}: {e}"))).collect();
        if unsynced.is_empty() && errors.is_empty() {
            return Ok(());
        }
        let mut problem = String::from("Kubernetes API");
        if !unsynced.is_empty() {
            problem.push_str(&format!(": not yet listed: {}", unsynced.into_iter().collect::<Vec<_>>().join(", ")));
        }
        if !errors.is_empty() {
            problem.push_str(&format!("; watch errors: {}", errors.join("; ")));
        }
        Err(problem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> Raw {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "reviews", "namespace": "bookinfo", "resourceVersion": "1"},
            "spec": {"selector": {"app": "reviews"}, "ports": [{"port": 9080}], "clusterIP": "10.96.0.9"}
        }))
        .expect("service");
        let pod = |name: &str, app: &str, rv: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "bookinfo", "resourceVersion": rv, "labels": {"app": app}},
                "spec": {"containers": [{"name": "app"}, {"name": "plexus-proxy"}]},
                "status": {"phase": "Running", "podIP": "10.244.0.9", "conditions": [{"type": "Ready", "status": "True"}]}
            }))
            .expect("pod")
        };
        let mut raw = Raw::default();
        raw.services.insert(("bookinfo".into(), "reviews".into()), svc);
        raw.pods.insert(("bookinfo".into(), "reviews-1".into()), pod("reviews-1", "reviews", "10"));
        raw.pods.insert(("bookinfo".into(), "loner".into()), pod("loner", "loner", "11"));
        raw.custom.insert(
            (Kind::FaultInjection, "bookinfo".into(), "bad".into()),
            serde_json::json!({"metadata": {"name": "bad", "namespace": "bookinfo"}, "spec": {"abort": {"httpStatus": 503, "percent": 150}}}),
        );
        raw
    }

    #[test]
    fn only_selected_pods_become_workloads_and_invalid_objects_are_kept_aside() {
        let (mirror, invalid) = translate_all(&raw());
        let ids: Vec<&str> = mirror.keys().map(String::as_str).collect();
        assert_eq!(ids, ["Service/bookinfo/reviews", "Workload/bookinfo/reviews-1"], "no Service selects `loner`");
        assert!(invalid.get("FaultInjection/bookinfo/bad").is_some_and(|r| r.contains("percent")), "{invalid:?}");
    }

    #[test]
    fn a_new_resource_version_alone_is_not_a_change() {
        let (before, _) = translate_all(&raw());
        let mut changed = raw();
        if let Some(p) = changed.pods.get_mut(&("bookinfo".into(), "reviews-1".into())) {
            p.metadata.resource_version = Some("12".into());
        }
        let (after, _) = translate_all(&changed);
        let (a, b) = (&before["Workload/bookinfo/reviews-1"], &after["Workload/bookinfo/reviews-1"]);
        assert!(same_but_version(a, b), "a status update (probe, condition) changes nothing");
        assert!(!same_but_version(a, a), "the same version is not a version change");
        if let Some(p) = changed.pods.get_mut(&("bookinfo".into(), "reviews-1".into())) {
            p.metadata.labels =
                Some([("app".to_string(), "reviews".to_string()), ("version".into(), "v2".into())].into());
        }
        let (relabelled, _) = translate_all(&changed);
        assert!(!same_but_version(a, &relabelled["Workload/bookinfo/reviews-1"]), "a new label is a change");
    }
}
