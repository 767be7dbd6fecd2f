//! The configuration a proxy works from, and the sources that feed it.
//!
//! [`Discovery`] holds the current compiled [`MeshSnapshot`]; every connection and request
//! reads it lock-free and a source swaps in a new one atomically, so open connections keep
//! working across changes. Sources: a resources file ([`FileSource`], `--resources`) and, with
//! the control plane, its gRPC discovery stream — both publish into the same handle.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use plexus_core::{LoadError, MeshSnapshot, ServiceName, parse_documents};
use tokio::sync::watch;

/// The current view of the mesh, shared by every part of the proxy.
pub struct Discovery {
    current: ArcSwap<MeshSnapshot>,
    generation: AtomicU64,
    connected: AtomicBool,
    changed: watch::Sender<u64>,
    /// Fed by the control plane: only the destinations asked for are known ("lazy"
    /// discovery); `false` for a resources file, which holds everything.
    lazy: AtomicBool,
    /// Destinations this proxy needs (sent to the control plane).
    wanted: watch::Sender<BTreeSet<ServiceName>>,
    /// Destinations the current snapshot answers (present or known not to exist).
    covered: Mutex<BTreeSet<ServiceName>>,
    /// When each wanted destination was last asked for (bounds `wanted`).
    asked: Mutex<HashMap<ServiceName, Instant>>,
    /// The mesh's namespaces, as the control plane last sent them (`None`: not known).
    namespaces: arc_swap::ArcSwapOption<BTreeSet<String>>,
    /// The control plane said the workload this proxy serves has finished for good (a
    /// completed Job's pod): the proxy drains and exits.
    finished: watch::Sender<bool>,
}

/// At most this many destinations that do not exist stay wanted (sent in every watch
/// message); the least recently asked go first.
pub const MAX_ABSENT_WANTED: usize = 256;
/// A wanted destination that does not exist is forgotten after this long without a request.
pub const ABSENT_FORGOTTEN_AFTER: Duration = Duration::from_secs(300);

impl Discovery {
    pub fn new(initial: MeshSnapshot) -> Arc<Self> {
        let (changed, _) = watch::channel(1);
        let (wanted, _) = watch::channel(BTreeSet::new());
        Arc::new(Discovery {
            current: ArcSwap::from_pointee(initial),
            generation: AtomicU64::new(1),
            connected: AtomicBool::new(false),
            changed,
            lazy: AtomicBool::new(false),
            wanted,
            covered: Mutex::new(BTreeSet::new()),
            asked: Mutex::new(HashMap::new()),
            namespaces: arc_swap::ArcSwapOption::empty(),
            finished: watch::channel(false).0,
        })
    }

    /// A discovery fed by the control plane, which knows only what it asked for.
    pub fn new_lazy() -> Arc<Self> {
        let d = Discovery::new(MeshSnapshot::default());
        d.lazy.store(true, Ordering::Relaxed);
        d
    }

    /// Publishes a snapshot that answers `covered` destinations.
    pub fn publish_covering(&self, snapshot: MeshSnapshot, covered: BTreeSet<ServiceName>) {
        if let Ok(mut c) = self.covered.lock() {
            *c = covered;
        }
        self.publish(snapshot);
    }

    /// Asks for destinations (no-op for those already wanted).
    pub fn want(&self, names: &[ServiceName]) {
        self.want_at(names, Instant::now());
    }

    fn want_at(&self, names: &[ServiceName], now: Instant) {
        self.touch(names, now);
        self.wanted.send_if_modified(|w| {
            let before = w.len();
            w.extend(names.iter().cloned());
            w.len() != before
        });
        self.forget_unused_at(now);
    }

    fn touch(&self, names: &[ServiceName], now: Instant) {
        if let Ok(mut asked) = self.asked.lock() {
            for n in names {
                asked.insert(n.clone(), now);
            }
        }
    }

    /// Stops asking for destinations that do not exist and were not asked for in
    /// [`ABSENT_FORGOTTEN_AFTER`], and for the least recently asked beyond
    /// [`MAX_ABSENT_WANTED`]. Destinations that exist stay (the mesh bounds them). A forgotten
    /// destination is asked for again on its next request.
    pub fn forget_unused(&self) {
        self.forget_unused_at(Instant::now());
    }

    fn forget_unused_at(&self, now: Instant) {
        let snapshot = self.current();
        let Ok(mut asked) = self.asked.lock() else { return };
        let mut absent: Vec<(Instant, ServiceName)> = self
            .wanted
            .borrow()
            .iter()
            .filter(|n| !snapshot.services.contains_key(*n) && !snapshot.gateways.contains_key(*n))
            .map(|n| (asked.get(n).copied().unwrap_or(now), n.clone()))
            .collect();
        absent.sort_unstable();
        let over = absent.len().saturating_sub(MAX_ABSENT_WANTED);
        let forget: Vec<ServiceName> = absent
            .into_iter()
            .enumerate()
            .filter(|(i, (at, _))| *i < over || now.saturating_duration_since(*at) >= ABSENT_FORGOTTEN_AFTER)
            .map(|(_, (_, n))| n)
            .collect();
        if forget.is_empty() {
            return;
        }
        for n in &forget {
            asked.remove(n);
        }
        drop(asked);
        tracing::debug!(destinations = forget.len(), "no longer asking for destinations that do not exist");
        self.wanted.send_modify(|w| {
            for n in &forget {
                w.remove(n);
            }
        });
    }

    /// The destinations wanted now.
    pub fn wanted_now(&self) -> BTreeSet<ServiceName> {
        self.wanted.borrow().clone()
    }

    /// Records the mesh's namespaces (from the control plane; empty: not known).
    pub fn set_namespaces(&self, namespaces: &[String]) {
        let known = (!namespaces.is_empty()).then(|| Arc::new(namespaces.iter().cloned().collect()));
        self.namespaces.store(known);
    }

    /// The Services `host` may name ([`ServiceName::candidates`]). With a control plane that
    /// sent the mesh's namespaces, `name.ns` only when `ns` is one of them: `example.com` is a
    /// DNS name, not Service `example` in namespace `com`.
    pub fn candidates(&self, host: &str) -> Vec<ServiceName> {
        match self.namespaces.load().as_ref() {
            Some(known) if self.lazy.load(Ordering::Relaxed) => {
                ServiceName::candidates_in(host, |ns| known.contains(ns))
            }
            _ => ServiceName::candidates(host),
        }
    }

    /// Notified when the wanted set grows.
    pub fn wanted(&self) -> watch::Receiver<BTreeSet<ServiceName>> {
        self.wanted.subscribe()
    }

    fn covers_any(&self, names: &[ServiceName]) -> bool {
        self.covered.lock().map(|c| names.iter().any(|n| c.contains(n))).unwrap_or(false)
    }

    /// Makes sure the snapshot answers one of `names` (a host's candidate Services): with a
    /// control plane, asks for them on first use and waits (up to `timeout`) for the answer.
    /// Returns the snapshot to use.
    pub async fn ensure(&self, names: &[ServiceName], timeout: std::time::Duration) -> Arc<MeshSnapshot> {
        if !self.lazy.load(Ordering::Relaxed) || names.is_empty() {
            return self.current();
        }
        if self.covers_any(names) {
            self.touch(names, Instant::now());
            return self.current();
        }
        let mut changed = self.subscribe();
        self.want(names);
        let wait = async {
            while !self.covers_any(names) {
                if changed.changed().await.is_err() {
                    break;
                }
            }
        };
        if tokio::time::timeout(timeout, wait).await.is_err() {
            tracing::warn!(destinations = ?names.iter().map(ToString::to_string).collect::<Vec<_>>(), "no answer from the control plane in time");
        }
        self.current()
    }

    /// The snapshot in force now.
    pub fn current(&self) -> Arc<MeshSnapshot> {
        self.current.load_full()
    }

    /// Replaces the snapshot; readers see the new one from their next lookup.
    pub fn publish(&self, snapshot: MeshSnapshot) {
        self.current.store(Arc::new(snapshot));
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.changed.send_replace(generation);
    }

    /// Increases on every publish (exported as `plexus_config_version`).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Notified on every publish.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether a control plane currently feeds this proxy.
    pub fn control_plane_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Records that the workload this proxy serves has finished (see [`Discovery::workload_finished`]).
    pub fn set_workload_finished(&self) {
        self.finished.send_replace(true);
    }

    /// Turns true once the control plane says the workload this proxy serves has finished for
    /// good (Kubernetes: its pod's app containers exited and will not restart): the proxy then
    /// drains and exits 0, so the pod completes with the app's own outcome.
    pub fn workload_finished(&self) -> watch::Receiver<bool> {
        self.finished.subscribe()
    }

    pub fn set_control_plane_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }
}

/// Error loading a resources file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(#[from] LoadError),
}

/// A resources file (`plexus proxy --resources FILE`), re-read when its content changes.
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileSource { path: path.into() }
    }

    /// Reads, validates and compiles the file.
    pub fn load(&self) -> Result<(MeshSnapshot, Vec<u8>), FileError> {
        let bytes = std::fs::read(&self.path)
            .map_err(|source| FileError::Read { path: self.path.display().to_string(), source })?;
        let snapshot = compile(&self.path, &bytes)?;
        Ok((snapshot, bytes))
    }

    /// Polls the file and publishes each valid new version; an invalid version is reported
    /// (file, document, field) and the previous config kept. Polling (every 250 ms) sees both
    /// in-place writes and atomic renames, on every filesystem, with no extra dependency.
    pub async fn watch(self, discovery: Arc<Discovery>, mut last: Vec<u8>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let bytes = match tokio::fs::read(&self.path).await {
                Ok(b) => b,
                Err(e) => {
                    if last.is_empty() {
                        continue;
                    }
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot read resources file; keeping the previous config");
                    last.clear();
                    continue;
                }
            };
            if bytes == last {
                continue;
            }
            // Off the runtime's thread: a sidecar runs on one, and parsing and compiling a
            // large file there would stall every connection in flight for as long.
            let (path, text) = (self.path.clone(), bytes.clone());
            let compiled = match tokio::task::spawn_blocking(move || compile(&path, &text)).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "compiling the resources file failed");
                    continue;
                }
            };
            match compiled {
                Ok(snapshot) => {
                    tracing::info!(path = %self.path.display(), version = %snapshot.version, "resources file reloaded");
                    discovery.publish(snapshot);
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), "invalid resources file; keeping the previous config:\n{e}");
                }
            }
            last = bytes;
        }
    }
}

fn compile(path: &Path, bytes: &[u8]) -> Result<MeshSnapshot, LoadError> {
    let file = path.display().to_string();
    let text = String::from_utf8_lossy(bytes);
    let resources = parse_documents(&file, &text)?;
    Ok(MeshSnapshot::compile(&resources, content_version(bytes)))
}

/// A short, stable version string for file content (FNV-1a).
fn content_version(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str, n: usize) -> Vec<ServiceName> {
        (0..n).map(|i| ServiceName::new(format!("{prefix}{i}"), "default")).collect()
    }

    fn with_service_a() -> Arc<Discovery> {
        let d = Discovery::new_lazy();
        let yaml = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n";
        let resources = parse_documents("t", yaml).expect("valid");
        d.publish(MeshSnapshot::compile(&resources, "t"));
        d
    }

    #[test]
    fn dns_names_outside_the_meshs_namespaces_are_not_services() {
        let d = Discovery::new_lazy();
        // Before the control plane said which namespaces exist: read as before.
        assert_eq!(d.candidates("example.com"), vec![ServiceName::new("example", "com")]);
        d.set_namespaces(&["default".into(), "prod".into()]);
        assert!(d.candidates("example.com").is_empty(), "com is no namespace of the mesh");
        assert!(d.candidates("www.example.com").is_empty());
        assert_eq!(d.candidates("reviews.prod"), vec![ServiceName::new("reviews", "prod")]);
        assert_eq!(d.candidates("reviews"), vec![ServiceName::new("reviews", "default")]);
        assert_eq!(d.candidates("x.new.svc.cluster.local"), vec![ServiceName::new("x", "new")]);
        // A resources file holds everything: nothing is asked for, candidates read as always.
        let file = Discovery::new(MeshSnapshot::default());
        file.set_namespaces(&["default".into()]);
        assert_eq!(file.candidates("reviews.prod"), vec![ServiceName::new("reviews", "prod")]);
    }

    #[test]
    fn destinations_that_do_not_exist_are_bounded_and_the_ones_that_exist_stay() {
        let d = with_service_a();
        let t0 = Instant::now();
        d.want_at(&[ServiceName::new("a", "default")], t0);
        for (i, n) in names("absent", 1_000).iter().enumerate() {
            d.want_at(std::slice::from_ref(n), t0 + Duration::from_millis(i as u64));
        }
        let wanted = d.wanted_now();
        assert_eq!(wanted.len(), MAX_ABSENT_WANTED + 1, "the existing one plus the bound");
        assert!(wanted.contains(&ServiceName::new("a", "default")), "a Service that exists stays wanted");
        assert!(wanted.contains(&ServiceName::new("absent999", "default")), "the most recent stay");
        assert!(!wanted.contains(&ServiceName::new("absent0", "default")), "the least recently asked go");
        assert!(d.asked.lock().expect("lock").len() <= MAX_ABSENT_WANTED + 1, "their timestamps go too");
    }

    #[test]
    fn a_destination_that_does_not_exist_is_forgotten_when_unused() {
        let d = with_service_a();
        let t0 = Instant::now();
        d.want_at(&[ServiceName::new("a", "default"), ServiceName::new("gone", "default")], t0);
        d.want_at(&[ServiceName::new("recent", "default")], t0 + Duration::from_secs(200));
        d.forget_unused_at(t0 + Duration::from_secs(299));
        assert_eq!(d.wanted_now().len(), 3, "nothing is forgotten early");
        d.forget_unused_at(t0 + ABSENT_FORGOTTEN_AFTER + Duration::from_secs(1));
        let wanted = d.wanted_now();
        assert!(!wanted.contains(&ServiceName::new("gone", "default")), "unused for 5 minutes and absent");
        assert!(wanted.contains(&ServiceName::new("recent", "default")));
        assert!(wanted.contains(&ServiceName::new("a", "default")), "exists: stays however long unused");
        // Asked for again, it is wanted again.
        d.want(&[ServiceName::new("gone", "default")]);
        assert!(d.wanted_now().contains(&ServiceName::new("gone", "default")));
    }
}
