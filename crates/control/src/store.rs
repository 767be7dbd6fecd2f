//! Where resources live. One trait, [`Store`], so the embedded file store, etcd and the
//! Kubernetes API can back the same control plane.
//!
//! Every write is one atomic transaction: an `apply` of many documents stores all of them or
//! none. Each change bumps the store's revision, which becomes the objects'
//! `metadata.resourceVersion`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use plexus_core::{Kind, Resource, resource_from_value};
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::watch;

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

/// Identifies one object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn of(r: &Resource) -> ObjectKey {
        ObjectKey { kind: r.kind, namespace: r.metadata.namespace().to_string(), name: r.metadata.name.clone() }
    }

    /// `Kind/namespace/name`, the same as [`Resource::id`]: the store's key, and the id
    /// incremental discovery responses remove by.
    pub fn storage_key(&self) -> String {
        plexus_core::resource::object_id(self.kind, &self.namespace, &self.name)
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// What an apply did to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

/// A store failure (I/O, corruption); never a validation problem.
#[derive(Debug, thiserror::Error)]
#[error("store: {message}")]
pub struct StoreError {
    message: String,
    /// The database reported an I/O failure: it refuses every later write until re-opened.
    io: bool,
}

impl StoreError {
    pub fn new(message: impl Into<String>) -> StoreError {
        StoreError { message: message.into(), io: false }
    }
}

fn err(e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    let io = matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo);
    StoreError { message: e.to_string(), io }
}

fn decode_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(e.to_string())
}

/// Workloads that have finished for good, by `(namespace, name)`, each with the service
/// account it ran as ([`Store::finished_workloads`]).
pub type FinishedWorkloads = std::collections::BTreeMap<(String, String), String>;

/// A backend holding resources.
///
/// Writes (`apply`, `delete`) block on disk I/O: async code calls them through [`write`],
/// which runs them on the blocking pool. Reads are served from memory.
pub trait Store: Send + Sync {
    /// Creates or updates every resource in one transaction.
    fn apply(&self, resources: &[Resource]) -> Result<Vec<(Resource, Outcome)>, StoreError>;
    /// Deletes objects in one transaction; returns which existed.
    fn delete(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, StoreError>;
    fn get(&self, key: &ObjectKey) -> Result<Option<Resource>, StoreError>;
    /// Objects of a kind (all kinds when `None`), in one namespace or all, sorted by key.
    fn list(&self, kind: Option<Kind>, namespace: Option<&str>) -> Result<Vec<Resource>, StoreError>;
    /// Every object, shared rather than copied (the index reads everything on every change).
    fn list_shared(&self) -> Result<Vec<Arc<Resource>>, StoreError> {
        Ok(self.list(None, None)?.into_iter().map(Arc::new).collect())
    }
    /// The revision of the last change.
    fn revision(&self) -> u64;
    /// Notified with the new revision after every change.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// Whether writes currently succeed: the last write's failure, until a write succeeds again.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
    /// The workloads that have finished for good, kept current: in Kubernetes, pods whose
    /// containers other than the proxy have all terminated and will not be restarted (a
    /// completed Job's pod), so their proxies are told to exit. `None` (the default) where a
    /// workload has no such end of its own (universal mode: it leaves with its sidecar).
    fn finished_workloads(&self) -> Option<watch::Receiver<Arc<FinishedWorkloads>>> {
        None
    }
}

/// Runs a store write (or any blocking store call) on the blocking pool, off the async workers.
pub async fn write<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(|e| StoreError::new(format!("store write task failed: {e}")))?
}

type Mirror = std::collections::BTreeMap<String, Arc<Resource>>;

/// What a committed write changes in the mirror.
enum MirrorChange {
    Put(String, Arc<Resource>),
    Remove(String),
}

/// A committed transaction: its result, and the new revision and mirror changes if it changed
/// anything.
struct Committed<T> {
    value: T,
    changed: Option<(u64, Vec<MirrorChange>)>,
}

/// The embedded store: one redb file (ACID, crash-safe: an interrupted write leaves the last
/// committed state), with a decoded in-memory mirror for reads — the index reads everything
/// on every change, and decoding 10,000 objects from disk took longer than the rest of a
/// change's propagation.
///
/// One writer at a time, in order: the writer lock is held across the transaction, the mirror
/// update and the revision announcement, so the mirror always equals the last commit and the
/// announced revision never moves backwards. After an I/O failure (redb then refuses every
/// later write until re-opened) the writer re-opens the file, reloads the mirror from it and
/// retries once; a write that still fails leaves the store unhealthy ([`Store::health`]) and
/// the next write re-opens again.
pub struct FileStore {
    path: PathBuf,
    /// The one writer. `None` after a failed re-open.
    db: Mutex<Option<Database>>,
    changes: watch::Sender<u64>,
    mirror: RwLock<Mirror>,
    /// The last write's failure, until a write succeeds.
    failure: Mutex<Option<String>>,
    #[cfg(test)]
    faults: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl FileStore {
    /// Opens (creating if needed) the store file.
    pub fn open(path: &Path) -> Result<FileStore, StoreError> {
        Self::open_inner(path, None)
    }

    fn open_inner(path: &Path, faults: Option<Arc<std::sync::atomic::AtomicBool>>) -> Result<FileStore, StoreError> {
        let db = Self::open_db(path, faults.as_ref())?;
        let (revision, mirror) = Self::load(&db)?;
        let (changes, _) = watch::channel(revision);
        #[cfg(not(test))]
        let _ = faults;
        Ok(FileStore {
            path: path.to_path_buf(),
            db: Mutex::new(Some(db)),
            changes,
            mirror: RwLock::new(mirror),
            failure: Mutex::new(None),
            #[cfg(test)]
            faults,
        })
    }

    fn open_db(path: &Path, faults: Option<&Arc<std::sync::atomic::AtomicBool>>) -> Result<Database, StoreError> {
        let cannot_open = |e: &dyn std::fmt::Display| StoreError {
            message: format!("cannot open {}: {e}", path.display()),
            io: true,
        };
        let db = match faults {
            #[cfg(test)]
            Some(fail) => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(|e| cannot_open(&e))?;
                let inner = redb::backends::FileBackend::new(file).map_err(|e| cannot_open(&e))?;
                Database::builder()
                    .create_with_backend(tests::Faulty { inner, fail: fail.clone() })
                    .map_err(|e| cannot_open(&e))?
            }
            _ => Database::create(path).map_err(|e| cannot_open(&e))?,
        };
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| cannot_open(&e))?;
        let txn = db.begin_write().map_err(err)?;
        {
            txn.open_table(OBJECTS).map_err(err)?;
            txn.open_table(META).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(db)
    }

    /// The committed revision and every object.
    fn load(db: &Database) -> Result<(u64, Mirror), StoreError> {
        let txn = db.begin_read().map_err(err)?;
        let revision = txn.open_table(META).map_err(err)?.get(REVISION).map_err(err)?.map(|v| v.value()).unwrap_or(0);
        let objects = txn.open_table(OBJECTS).map_err(err)?;
        let mut mirror = Mirror::new();
        for entry in objects.iter().map_err(err)? {
            let (k, v) = entry.map_err(err)?;
            mirror.insert(k.value().to_string(), Arc::new(Self::decode(v.value())?));
        }
        Ok((revision, mirror))
    }

    fn mirror_read(&self) -> Result<std::sync::RwLockReadGuard<'_, Mirror>, StoreError> {
        self.mirror.read().map_err(|_| StoreError::new("store mirror poisoned"))
    }

    fn decode(bytes: &[u8]) -> Result<Resource, StoreError> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(decode_err)?;
        resource_from_value(value).map_err(decode_err)
    }

    /// The one write path: runs `body` as the only writer, then updates the mirror and
    /// announces the revision before letting the next writer in.
    fn write<T>(&self, body: impl Fn(&Database) -> Result<Committed<T>, StoreError>) -> Result<T, StoreError> {
        let mut db = self.db.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            if db.is_none() {
                match self.reopen() {
                    Ok(fresh) => *db = Some(fresh),
                    Err(e) => break Err(e),
                }
            }
            let Some(open) = db.as_ref() else { break Err(StoreError::new("store closed")) };
            match body(open) {
                Err(e) if e.io => {
                    tracing::warn!(error = %e, path = %self.path.display(), "store write failed; re-opening the store");
                    // Closed before re-opening: the file is locked while open.
                    *db = None;
                    if attempt < 2 {
                        continue;
                    }
                    break Err(e);
                }
                other => break other,
            }
        };
        let mut failure = self.failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match result {
            Ok(Committed { value, changed }) => {
                if failure.take().is_some() {
                    tracing::info!(path = %self.path.display(), "store writes succeed again");
                }
                if let Some((revision, changes)) = changed {
                    let mut mirror = self.mirror.write().unwrap_or_else(|poisoned| poisoned.into_inner());
                    for change in changes {
                        match change {
                            MirrorChange::Put(k, r) => mirror.insert(k, r),
                            MirrorChange::Remove(k) => mirror.remove(&k),
                        };
                    }
                    drop(mirror);
                    self.changes.send_replace(revision);
                }
                Ok(value)
            }
            Err(e) => {
                if e.io {
                    tracing::error!(error = %e, path = %self.path.display(), "store write failed after re-opening");
                    *failure = Some(e.to_string());
                }
                Err(e)
            }
        }
    }

    /// Opens the file again and reloads the mirror from it (a write that reported failure may
    /// still have reached the disk), announcing the revision if it moved.
    fn reopen(&self) -> Result<Database, StoreError> {
        #[cfg(test)]
        let faults = self.faults.as_ref();
        #[cfg(not(test))]
        let faults = None;
        let db = Self::open_db(&self.path, faults)?;
        let (revision, fresh) = Self::load(&db)?;
        *self.mirror.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
        if revision != *self.changes.borrow() {
            self.changes.send_replace(revision);
        }
        tracing::info!(path = %self.path.display(), revision, "store re-opened");
        Ok(db)
    }
}

/// Whether an apply changes what the user declared (labels, annotations, spec).
fn same_declaration(a: &Resource, b: &Resource) -> bool {
    a.metadata.labels == b.metadata.labels && a.metadata.annotations == b.metadata.annotations && a.spec == b.spec
}

impl Store for FileStore {
    fn apply(&self, resources: &[Resource]) -> Result<Vec<(Resource, Outcome)>, StoreError> {
        self.write(|db| {
            let txn = db.begin_write().map_err(err)?;
            let mut results = Vec::with_capacity(resources.len());
            let mut changes = Vec::new();
            let next;
            {
                let mut objects = txn.open_table(OBJECTS).map_err(err)?;
                let mut meta = txn.open_table(META).map_err(err)?;
                next = meta.get(REVISION).map_err(err)?.map(|v| v.value()).unwrap_or(0) + 1;
                let now = plexus_core::time::rfc3339(SystemTime::now());
                for r in resources {
                    let key = ObjectKey::of(r).storage_key();
                    let existing = match objects.get(key.as_str()).map_err(err)? {
                        Some(v) => Some(Self::decode(v.value())?),
                        None => None,
                    };
                    let mut stored = r.clone();
                    stored.metadata.namespace = Some(r.metadata.namespace().to_string());
                    let outcome = match &existing {
                        Some(old) if same_declaration(old, r) => {
                            results.push((old.clone(), Outcome::Unchanged));
                            continue;
                        }
                        Some(old) => {
                            stored.metadata.uid = old.metadata.uid.clone();
                            stored.metadata.creation_timestamp = old.metadata.creation_timestamp.clone();
                            Outcome::Configured
                        }
                        None => {
                            stored.metadata.uid = Some(format!("{:032x}", fastrand::u128(..)));
                            stored.metadata.creation_timestamp = Some(now.clone());
                            Outcome::Created
                        }
                    };
                    stored.metadata.resource_version = Some(next.to_string());
                    let bytes = serde_json::to_vec(&stored).map_err(decode_err)?;
                    objects.insert(key.as_str(), bytes.as_slice()).map_err(err)?;
                    changes.push(MirrorChange::Put(key, Arc::new(stored.clone())));
                    results.push((stored, outcome));
                }
                if !changes.is_empty() {
                    meta.insert(REVISION, next).map_err(err)?;
                }
            }
            txn.commit().map_err(err)?;
            let changed = (!changes.is_empty()).then_some((next, changes));
            Ok(Committed { value: results, changed })
        })
    }

    fn delete(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, StoreError> {
        self.write(|db| {
            let txn = db.begin_write().map_err(err)?;
            let mut existed = Vec::with_capacity(keys.len());
            let mut changes = Vec::new();
            let next;
            {
                let mut objects = txn.open_table(OBJECTS).map_err(err)?;
                let mut meta = txn.open_table(META).map_err(err)?;
                next = meta.get(REVISION).map_err(err)?.map(|v| v.value()).unwrap_or(0) + 1;
                for k in keys {
                    let key = k.storage_key();
                    let removed = objects.remove(key.as_str()).map_err(err)?.is_some();
                    if removed {
                        changes.push(MirrorChange::Remove(key));
                    }
                    existed.push(removed);
                }
                if !changes.is_empty() {
                    meta.insert(REVISION, next).map_err(err)?;
                }
            }
            txn.commit().map_err(err)?;
            let changed = (!changes.is_empty()).then_some((next, changes));
            Ok(Committed { value: existed, changed })
        })
    }

    fn get(&self, key: &ObjectKey) -> Result<Option<Resource>, StoreError> {
        Ok(self.mirror_read()?.get(&key.storage_key()).map(|r| Resource::clone(r)))
    }

    fn list(&self, kind: Option<Kind>, namespace: Option<&str>) -> Result<Vec<Resource>, StoreError> {
        let prefix = match (kind, namespace) {
            (Some(k), Some(ns)) => format!("{}/{ns}/", k.as_str()),
            (Some(k), None) => format!("{}/", k.as_str()),
            (None, _) => String::new(),
        };
        let mirror = self.mirror_read()?;
        Ok(mirror
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, r)| r)
            .filter(|r| namespace.is_none_or(|ns| r.metadata.namespace() == ns))
            .map(|r| Resource::clone(r))
            .collect())
    }

    fn list_shared(&self) -> Result<Vec<Arc<Resource>>, StoreError> {
        Ok(self.mirror_read()?.values().cloned().collect())
    }

    fn revision(&self) -> u64 {
        *self.changes.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn health(&self) -> Result<(), String> {
        match self.failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref() {
            Some(f) => Err(f.clone()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(yaml: &str) -> Vec<Resource> {
        plexus_core::parse_documents("t", yaml).expect("valid")
    }

    const TWO: &str = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: b, namespace: prod}\nspec: {ports: [{port: 81}]}\n";

    /// A file backend whose writes and syncs fail while `fail` is set, as a full or
    /// read-only disk does.
    #[derive(Debug)]
    pub(super) struct Faulty {
        pub(super) inner: redb::backends::FileBackend,
        pub(super) fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Faulty {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::other("injected: disk not writable"));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for Faulty {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
            self.inner.read(offset, len)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    fn temp_path(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("plexus-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    fn service(name: &str, port: u32) -> Vec<Resource> {
        resources(&format!(
            "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: {port}}}]}}\n"
        ))
    }

    /// Concurrent writers (registration, expiry, the API) each see their own commit in the
    /// mirror, announced revisions only move forward, and the mirror ends equal to the disk.
    #[test]
    fn concurrent_writers_keep_the_mirror_and_revision_in_order() {
        let path = temp_path("concurrent");
        let store = Arc::new(FileStore::open(&path).expect("open"));
        let mut seen = store.subscribe();
        let announced = std::sync::Arc::new(Mutex::new(Vec::new()));
        let watcher = {
            let announced = announced.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
                rt.block_on(async {
                    while seen.changed().await.is_ok() {
                        let r = *seen.borrow_and_update();
                        announced.lock().expect("lock").push(r);
                    }
                });
            })
        };
        let writers: Vec<_> = (0..16u32)
            .map(|w| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..40u32 {
                        let port = 1000 + w * 100 + i;
                        if i % 5 == 4 {
                            let key =
                                ObjectKey { kind: Kind::Service, namespace: "default".into(), name: "shared".into() };
                            store.delete(&[key]).expect("delete");
                        } else {
                            store.apply(&service("shared", port)).expect("apply");
                        }
                        store.apply(&service(&format!("own{w}"), port)).expect("apply");
                        let own =
                            ObjectKey { kind: Kind::Service, namespace: "default".into(), name: format!("own{w}") };
                        let mine = store.get(&own).expect("get").expect("own service present");
                        assert_eq!(
                            mine.spec,
                            service(&format!("own{w}"), port)[0].spec,
                            "a writer reads its own write"
                        );
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        let final_revision = store.revision();
        let mirror: Vec<_> = store.list(None, None).expect("list");
        drop(store);
        watcher.join().expect("watcher");
        let announced = announced.lock().expect("lock").clone();
        assert!(announced.windows(2).all(|w| w[0] < w[1]), "announced revisions move forward: {announced:?}");
        assert_eq!(announced.last(), Some(&final_revision));
        let reopened = FileStore::open(&path).expect("reopen");
        assert_eq!(reopened.revision(), final_revision, "the announced revision is the committed one");
        assert_eq!(reopened.list(None, None).expect("list"), mirror, "the mirror equals the disk");
        let _ = std::fs::remove_file(&path);
    }

    /// One failed write (the disk briefly not writable) does not brick the store: once the
    /// disk is fine, the next write re-opens it and succeeds, and health says the truth
    /// meanwhile.
    #[test]
    fn a_failed_write_recovers_once_the_disk_is_fine_and_health_tells_the_truth() {
        let path = temp_path("faulty");
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let store = FileStore::open_inner(&path, Some(fail.clone())).expect("open");
        store.apply(&service("a", 80)).expect("a healthy write");
        assert_eq!(store.health(), Ok(()));

        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let failed = store.apply(&service("b", 81));
        assert!(failed.is_err(), "the write fails while the disk does");
        let health = store.health().expect_err("unhealthy while writes fail");
        assert!(health.contains("injected"), "{health}");
        assert!(store.apply(&service("c", 82)).is_err(), "still failing");
        let key = |n: &str| ObjectKey { kind: Kind::Service, namespace: "default".into(), name: n.into() };
        assert!(store.get(&key("b")).expect("get").is_none(), "a failed write is not in the mirror");
        assert_eq!(store.revision(), 1);

        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        let out = store.apply(&service("d", 83)).expect("writes succeed again once the disk does");
        assert_eq!(out[0].1, Outcome::Created);
        assert_eq!(store.health(), Ok(()));
        assert!(store.delete(&[key("a")]).expect("delete")[0]);
        assert_eq!(store.list(None, None).expect("list").len(), 1);
        let revision = store.revision();
        drop(store);
        let reopened = FileStore::open(&path).expect("reopen");
        assert_eq!(reopened.revision(), revision);
        assert_eq!(reopened.list(None, None).expect("list").len(), 1);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn apply_get_list_delete_and_reopen() {
        let dir = std::env::temp_dir().join(format!("plexus-store-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        {
            let store = FileStore::open(&dir).expect("open");
            let out = store.apply(&resources(TWO)).expect("apply");
            assert_eq!(out.iter().map(|(_, o)| *o).collect::<Vec<_>>(), [Outcome::Created, Outcome::Created]);
            assert_eq!(store.revision(), 1);
            let again = store.apply(&resources(TWO)).expect("apply");
            assert!(again.iter().all(|(_, o)| *o == Outcome::Unchanged));
            assert_eq!(store.revision(), 1, "no change, no new revision");
            let changed = store.apply(&resources(&TWO.replace("port: 80", "port: 8080"))).expect("apply");
            assert_eq!(changed[0].1, Outcome::Configured);
            assert_eq!(changed[0].0.metadata.resource_version.as_deref(), Some("2"));
            assert_eq!(changed[0].0.metadata.uid, out[0].0.metadata.uid, "uid kept");
            assert_eq!(store.list(Some(Kind::Service), None).expect("list").len(), 2);
            assert_eq!(store.list(Some(Kind::Service), Some("prod")).expect("list").len(), 1);
            let key = ObjectKey { kind: Kind::Service, namespace: "default".into(), name: "a".into() };
            assert_eq!(store.delete(std::slice::from_ref(&key)).expect("delete"), [true]);
            assert_eq!(store.delete(std::slice::from_ref(&key)).expect("delete"), [false]);
            assert!(store.get(&key).expect("get").is_none());
        }
        let store = FileStore::open(&dir).expect("reopen");
        assert_eq!(store.revision(), 3);
        assert_eq!(store.list(None, None).expect("list").len(), 1);
        let _ = std::fs::remove_file(&dir);
    }
}
