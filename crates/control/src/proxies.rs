//! Connected proxies and the workloads they registered: liveness (a registered workload whose
//! proxy is silent for 15 s leaves the mesh), sync state for `plexus check`, and targets for
//! Prometheus service discovery.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::store::ObjectKey;

/// How long a registered workload survives without hearing from its proxy.
pub const EXPIRY: Duration = Duration::from_secs(15);

/// What the control plane knows about one connected proxy.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyRecord {
    pub id: u64,
    pub workload: String,
    pub namespace: String,
    pub service: String,
    pub version: String,
    pub mode: String,
    pub admin_address: String,
    /// Revision last sent to the proxy.
    pub sent_revision: u64,
    /// Revision the proxy says it applied.
    pub applied_revision: u64,
    #[serde(skip)]
    pub last_seen: Option<Instant>,
    #[serde(skip)]
    pub registered: Option<ObjectKey>,
}

/// Every connected proxy.
#[derive(Default)]
pub struct Proxies {
    next_id: AtomicU64,
    connected: Mutex<HashMap<u64, ProxyRecord>>,
    /// Registered workloads and when their proxy was last heard from (kept after disconnect
    /// until they expire).
    registered: Mutex<HashMap<ObjectKey, Instant>>,
}

impl Proxies {
    /// Adds a proxy; returns its id.
    pub fn connect(&self, mut record: ProxyRecord) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        record.id = id;
        record.last_seen = Some(Instant::now());
        if let Some(k) = &record.registered
            && let Ok(mut r) = self.registered.lock()
        {
            r.insert(k.clone(), Instant::now());
        }
        if let Ok(mut c) = self.connected.lock() {
            c.insert(id, record);
        }
        id
    }

    /// Records a message from the proxy.
    pub fn heard_from(&self, id: u64, applied_revision: Option<u64>) {
        let Ok(mut c) = self.connected.lock() else { return };
        let Some(rec) = c.get_mut(&id) else { return };
        rec.last_seen = Some(Instant::now());
        if let Some(r) = applied_revision {
            rec.applied_revision = r;
        }
        if let Some(k) = &rec.registered
            && let Ok(mut r) = self.registered.lock()
        {
            r.insert(k.clone(), Instant::now());
        }
    }

    pub fn sent(&self, id: u64, revision: u64) {
        if let Ok(mut c) = self.connected.lock()
            && let Some(rec) = c.get_mut(&id)
        {
            rec.sent_revision = revision;
        }
    }

    /// The proxy leaves for good: forgets it and returns the workload it registered.
    pub fn leave(&self, id: u64) -> Option<ObjectKey> {
        let record = self.connected.lock().ok()?.remove(&id)?;
        let key = record.registered?;
        if let Ok(mut r) = self.registered.lock() {
            r.remove(&key);
        }
        Some(key)
    }

    pub fn disconnect(&self, id: u64) {
        if let Ok(mut c) = self.connected.lock() {
            c.remove(&id);
        }
    }

    /// Gives workloads found registered in the store a fresh grace period (after a restart).
    pub fn adopt(&self, keys: impl IntoIterator<Item = ObjectKey>) {
        if let Ok(mut r) = self.registered.lock() {
            for k in keys {
                r.entry(k).or_insert_with(Instant::now);
            }
        }
    }

    /// Registered workloads not heard from for [`EXPIRY`]: to delete. Forgets them.
    pub fn expired(&self) -> Vec<ObjectKey> {
        let live: Vec<ObjectKey> = self
            .connected
            .lock()
            .map(|c| c.values().filter_map(|p| p.registered.clone()).collect())
            .unwrap_or_default();
        let Ok(mut r) = self.registered.lock() else { return Vec::new() };
        let gone: Vec<ObjectKey> = r
            .iter()
            .filter(|(k, seen)| !live.contains(k) && seen.elapsed() >= EXPIRY)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            r.remove(k);
        }
        gone
    }

    /// Whether a registered workload is known (connected or within its grace period).
    pub fn is_registered(&self, key: &ObjectKey) -> bool {
        self.registered.lock().map(|r| r.contains_key(key)).unwrap_or(false)
    }

    /// A copy of every connected proxy, by id.
    pub fn list(&self) -> Vec<ProxyRecord> {
        let mut v: Vec<ProxyRecord> = self.connected.lock().map(|c| c.values().cloned().collect()).unwrap_or_default();
        v.sort_by_key(|p| p.id);
        v
    }
}
