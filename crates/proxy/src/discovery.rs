//! The configuration a proxy works from, and the sources that feed it.
//!
//! [`Discovery`] holds the current compiled [`MeshSnapshot`]; every connection and request
//! reads it lock-free and a source swaps in a new one atomically, so open connections keep
//! working across changes. Sources: a resources file ([`FileSource`], `--resources`) and, with
//! the control plane, its gRPC discovery stream — both publish into the same handle.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
}

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
        self.wanted.send_if_modified(|w| {
            let before = w.len();
            w.extend(names.iter().cloned());
            w.len() != before
        });
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
        if !self.lazy.load(Ordering::Relaxed) || names.is_empty() || self.covers_any(names) {
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
            match compile(&self.path, &bytes) {
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
