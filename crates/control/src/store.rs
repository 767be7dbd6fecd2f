//! Where resources live. One trait, [`Store`], so the embedded file store, etcd and the
//! Kubernetes API can back the same control plane.
//!
//! Every write is one atomic transaction: an `apply` of many documents stores all of them or
//! none. Each change bumps the store's revision, which becomes the objects'
//! `metadata.resourceVersion`.

use std::path::Path;
use std::sync::Arc;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

/// A store failure (I/O, corruption); never a validation problem.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// A backend holding resources.
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
}

/// The embedded store: one redb file (ACID, crash-safe: an interrupted write leaves the last
/// committed state), with a decoded in-memory mirror for reads — the index reads everything
/// on every change, and decoding 10,000 objects from disk took longer than the rest of a
/// change's propagation.
pub struct FileStore {
    db: Database,
    changes: watch::Sender<u64>,
    mirror: std::sync::RwLock<std::collections::BTreeMap<String, Arc<Resource>>>,
}

impl FileStore {
    /// Opens (creating if needed) the store file.
    pub fn open(path: &Path) -> Result<FileStore, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        let revision = {
            txn.open_table(OBJECTS).map_err(err)?;
            let meta = txn.open_table(META).map_err(err)?;
            meta.get(REVISION).map_err(err)?.map(|v| v.value()).unwrap_or(0)
        };
        txn.commit().map_err(err)?;
        let mut mirror = std::collections::BTreeMap::new();
        {
            let txn = db.begin_read().map_err(err)?;
            let objects = txn.open_table(OBJECTS).map_err(err)?;
            for entry in objects.iter().map_err(err)? {
                let (k, v) = entry.map_err(err)?;
                mirror.insert(k.value().to_string(), Arc::new(Self::decode(v.value())?));
            }
        }
        let (changes, _) = watch::channel(revision);
        Ok(FileStore { db, changes, mirror: std::sync::RwLock::new(mirror) })
    }

    fn mirror_read(
        &self,
    ) -> Result<std::sync::RwLockReadGuard<'_, std::collections::BTreeMap<String, Arc<Resource>>>, StoreError> {
        self.mirror.read().map_err(|_| StoreError("store mirror poisoned".into()))
    }

    fn decode(bytes: &[u8]) -> Result<Resource, StoreError> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(err)?;
        resource_from_value(value).map_err(err)
    }
}

/// Whether an apply changes what the user declared (labels, annotations, spec).
fn same_declaration(a: &Resource, b: &Resource) -> bool {
    a.metadata.labels == b.metadata.labels && a.metadata.annotations == b.metadata.annotations && a.spec == b.spec
}

impl Store for FileStore {
    fn apply(&self, resources: &[Resource]) -> Result<Vec<(Resource, Outcome)>, StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        let mut results = Vec::with_capacity(resources.len());
        let mut revision;
        {
            let mut objects = txn.open_table(OBJECTS).map_err(err)?;
            let mut meta = txn.open_table(META).map_err(err)?;
            revision = meta.get(REVISION).map_err(err)?.map(|v| v.value()).unwrap_or(0);
            let next = revision + 1;
            let now = plexus_core::time::rfc3339(SystemTime::now());
            let mut changed = false;
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
                let bytes = serde_json::to_vec(&stored).map_err(err)?;
                objects.insert(key.as_str(), bytes.as_slice()).map_err(err)?;
                changed = true;
                results.push((stored, outcome));
            }
            if changed {
                revision = next;
                meta.insert(REVISION, revision).map_err(err)?;
            }
        }
        txn.commit().map_err(err)?;
        if results.iter().any(|(_, o)| *o != Outcome::Unchanged) {
            let mut mirror = self.mirror.write().map_err(|_| StoreError("store mirror poisoned".into()))?;
            for (r, outcome) in &results {
                if *outcome != Outcome::Unchanged {
                    mirror.insert(ObjectKey::of(r).storage_key(), Arc::new(r.clone()));
                }
            }
            drop(mirror);
            self.changes.send_replace(revision);
        }
        Ok(results)
    }

    fn delete(&self, keys: &[ObjectKey]) -> Result<Vec<bool>, StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        let mut existed = Vec::with_capacity(keys.len());
        let mut revision;
        {
            let mut objects = txn.open_table(OBJECTS).map_err(err)?;
            let mut meta = txn.open_table(META).map_err(err)?;
            revision = meta.get(REVISION).map_err(err)?.map(|v| v.value()).unwrap_or(0);
            for k in keys {
                existed.push(objects.remove(k.storage_key().as_str()).map_err(err)?.is_some());
            }
            if existed.iter().any(|e| *e) {
                revision += 1;
                meta.insert(REVISION, revision).map_err(err)?;
            }
        }
        txn.commit().map_err(err)?;
        if existed.iter().any(|e| *e) {
            let mut mirror = self.mirror.write().map_err(|_| StoreError("store mirror poisoned".into()))?;
            for k in keys {
                mirror.remove(&k.storage_key());
            }
            drop(mirror);
            self.changes.send_replace(revision);
        }
        Ok(existed)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(yaml: &str) -> Vec<Resource> {
        plexus_core::parse_documents("t", yaml).expect("valid")
    }

    const TWO: &str = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: b, namespace: prod}\nspec: {ports: [{port: 81}]}\n";

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
