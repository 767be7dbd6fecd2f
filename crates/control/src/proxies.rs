//! Connected proxies and the workloads they registered: liveness (a registered workload whose
//! proxy is silent for the registration TTL, 15 s by default, leaves the mesh), sync state for `plexus check`, and targets for
//! Prometheus service discovery, and the workload certificate each proxy reports (for
//! `plexus check`, `plexus identity show` and anchor rotation).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::store::ObjectKey;

/// How long a registered workload survives without hearing from its proxy, by default
/// (`plexus control --registration-ttl`). Proxies send a message at least every 5 s by default
/// (`plexus proxy --heartbeat-interval`).
pub const EXPIRY: Duration = Duration::from_secs(15);

/// What the control plane knows about one connected proxy.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyRecord {
    pub id: u64,
    pub workload: String,
    pub namespace: String,
    pub service: String,
    pub version: String,
    pub mode: String,
    pub admin_address: String,
    /// The SPIFFE ID the proxy authenticated as (its client certificate): everything it
    /// registers and reports is attributed to it.
    #[serde(default)]
    pub identity: String,
    /// Revision last sent to the proxy.
    pub sent_revision: u64,
    /// Revision the proxy says it applied.
    pub applied_revision: u64,
    #[serde(skip)]
    pub last_seen: Option<Instant>,
    #[serde(skip)]
    pub registered: Option<ObjectKey>,
}

/// The workload certificate a proxy says it holds (`WatchRequest.certificate_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyCertificate {
    /// Serial, hex.
    pub serial: String,
    /// SHA-256 (hex) of the issuer certificate that signed it.
    pub issuer_sha256: String,
    /// notAfter, seconds since the Unix epoch.
    pub not_after_unix: i64,
    pub spiffe_id: String,
}

/// A connected proxy with its certificate, as `/api/v1/proxies` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    #[serde(flatten)]
    pub record: ProxyRecord,
    /// `None` until the proxy reports one.
    pub certificate: Option<ProxyCertificate>,
    /// How long this stream has been connected.
    pub connected_seconds: u64,
}

/// `GET /api/v1/proxies`: the server writes it and the CLI reads it with this one type, so a
/// renamed field fails to compile instead of reading as 0.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ProxiesResponse {
    pub revision: u64,
    pub proxies: Vec<ProxyStatus>,
}

/// `GET /healthz` (200 healthy, 503 while store writes fail).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Health {
    /// `ok` or `unhealthy`.
    pub status: String,
    pub revision: u64,
    /// Why store writes fail, when they do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// The same, as every API error says it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

struct Entry {
    record: ProxyRecord,
    connected_at: Instant,
    certificate: Option<ProxyCertificate>,
}

/// Every connected proxy.
pub struct Proxies {
    /// The registration TTL: a registered workload whose proxy is silent this long is removed,
    /// and a stream silent this long is closed.
    ttl: Duration,
    next_id: AtomicU64,
    connected: Mutex<HashMap<u64, Entry>>,
    /// Registered workloads and when their proxy was last heard from (kept after disconnect
    /// until they expire).
    registered: Mutex<HashMap<ObjectKey, Instant>>,
}

impl Default for Proxies {
    fn default() -> Self {
        Proxies::new(EXPIRY)
    }
}

impl Proxies {
    /// No proxy yet; registrations live `ttl` without a message from their proxy.
    pub fn new(ttl: Duration) -> Self {
        Proxies { ttl, next_id: AtomicU64::new(0), connected: Mutex::default(), registered: Mutex::default() }
    }

    /// The registration TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

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
            c.insert(id, Entry { record, connected_at: Instant::now(), certificate: None });
        }
        id
    }

    /// Records the certificate the proxy reports in a message (`None`: it has none).
    pub fn report_certificate(&self, id: u64, certificate: Option<ProxyCertificate>) {
        if let Ok(mut c) = self.connected.lock()
            && let Some(e) = c.get_mut(&id)
            && e.certificate != certificate
        {
            e.certificate = certificate;
        }
    }

    /// Records a message from the proxy.
    pub fn heard_from(&self, id: u64, applied_revision: Option<u64>) {
        let Ok(mut c) = self.connected.lock() else { return };
        let Some(rec) = c.get_mut(&id).map(|e| &mut e.record) else { return };
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
            && let Some(e) = c.get_mut(&id)
        {
            e.record.sent_revision = revision;
        }
    }

    /// The proxy leaves for good: forgets it and returns the workload it registered.
    pub fn leave(&self, id: u64) -> Option<ObjectKey> {
        let record = self.connected.lock().ok()?.remove(&id)?.record;
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

    /// Registered workloads not heard from for the TTL: to delete. Forgets them.
    pub fn expired(&self) -> Vec<ObjectKey> {
        let live: Vec<ObjectKey> = self
            .connected
            .lock()
            .map(|c| c.values().filter_map(|e| e.record.registered.clone()).collect())
            .unwrap_or_default();
        let Ok(mut r) = self.registered.lock() else { return Vec::new() };
        let gone: Vec<ObjectKey> = r
            .iter()
            .filter(|(k, seen)| !live.contains(k) && seen.elapsed() >= self.ttl)
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

    /// The connected proxy of `identity` named `workload` in `namespace`, if any.
    pub fn find(&self, identity: &str, namespace: &str, workload: &str) -> Option<ProxyRecord> {
        let c = self.connected.lock().ok()?;
        c.values()
            .map(|e| &e.record)
            .find(|r| r.identity == identity && r.namespace == namespace && r.workload == workload)
            .cloned()
    }

    /// Whether a connected proxy of another identity goes by `workload` in `namespace`.
    pub fn workload_taken(&self, identity: &str, namespace: &str, workload: &str) -> bool {
        self.connected.lock().is_ok_and(|c| {
            c.values().any(|e| {
                e.record.identity != identity && e.record.namespace == namespace && e.record.workload == workload
            })
        })
    }

    /// A copy of every connected proxy, by id.
    pub fn list(&self) -> Vec<ProxyRecord> {
        let mut v: Vec<ProxyRecord> =
            self.connected.lock().map(|c| c.values().map(|e| e.record.clone()).collect()).unwrap_or_default();
        v.sort_by_key(|p| p.id);
        v
    }

    /// Every connected proxy with its certificate, by id.
    pub fn statuses(&self) -> Vec<ProxyStatus> {
        let mut v: Vec<ProxyStatus> = self
            .connected
            .lock()
            .map(|c| {
                c.values()
                    .map(|e| ProxyStatus {
                        record: e.record.clone(),
                        certificate: e.certificate.clone(),
                        connected_seconds: e.connected_at.elapsed().as_secs(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|p| p.record.id);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17 item 13: the CLI reads `/api/v1/proxies` and `/healthz` with the types the
    /// server writes them with.
    #[test]
    fn the_api_rows_read_back_as_written() {
        let proxies = Proxies::default();
        let id = proxies.connect(ProxyRecord {
            id: 0,
            workload: "reviews-v1-abc".into(),
            namespace: "default".into(),
            service: "reviews".into(),
            version: "v1".into(),
            mode: "sidecar".into(),
            admin_address: "127.0.0.1:9901".into(),
            identity: String::new(),
            sent_revision: 7,
            applied_revision: 6,
            last_seen: None,
            registered: None,
        });
        proxies.sent(id, 8);
        let written = serde_json::to_value(ProxiesResponse { revision: 8, proxies: proxies.statuses() }).expect("json");
        assert_eq!(written["proxies"][0]["adminAddress"], "127.0.0.1:9901", "the wire names stay camelCase");
        let read: ProxiesResponse = serde_json::from_value(written).expect("reads back");
        let p = &read.proxies[0];
        assert_eq!(
            (p.record.workload.as_str(), p.record.sent_revision, p.record.applied_revision),
            ("reviews-v1-abc", 8, 6)
        );
        let health = Health { status: "unhealthy".into(), revision: 3, store: Some("disk".into()), error: None };
        let read: Health = serde_json::from_value(serde_json::to_value(&health).expect("json")).expect("reads back");
        assert_eq!((read.status.as_str(), read.revision, read.store.as_deref()), ("unhealthy", 3, Some("disk")));
    }

    fn record(workload: &str) -> ProxyRecord {
        ProxyRecord {
            identity: String::new(),
            id: 0,
            workload: workload.into(),
            namespace: "default".into(),
            service: workload.into(),
            version: String::new(),
            mode: "sidecar".into(),
            admin_address: String::new(),
            sent_revision: 0,
            applied_revision: 0,
            last_seen: None,
            registered: None,
        }
    }

    #[test]
    fn reported_certificates_are_listed_per_proxy() {
        let proxies = Proxies::default();
        let a = proxies.connect(record("a"));
        let b = proxies.connect(record("b"));
        let cert = ProxyCertificate {
            serial: "0a".into(),
            issuer_sha256: "ff".into(),
            not_after_unix: 1_900_000_000,
            spiffe_id: "spiffe://plexus.local/ns/default/sa/a".into(),
        };
        proxies.report_certificate(a, Some(cert.clone()));
        let list = proxies.statuses();
        assert_eq!(list.iter().map(|p| p.record.id).collect::<Vec<_>>(), vec![a, b]);
        assert_eq!(list[0].certificate.as_ref(), Some(&cert));
        assert_eq!(list[1].certificate, None);
        let json = serde_json::to_value(&list[0]).expect("json");
        assert_eq!(json["workload"], "a", "the record's fields stay at the top level");
        assert_eq!(json["certificate"]["issuerSha256"], "ff");
        assert_eq!(json["certificate"]["notAfterUnix"], 1_900_000_000);
        proxies.report_certificate(a, None);
        assert_eq!(proxies.statuses()[0].certificate, None, "each message says what the proxy holds now");
        proxies.disconnect(a);
        assert_eq!(proxies.statuses().len(), 1);
    }
}
