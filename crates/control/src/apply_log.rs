//! Knowable apply outcomes (issue 18 item 8). A client may name each apply with an id
//! (header [`APPLY_ID_HEADER`], client-generated); the control plane remembers the outcome of
//! the most recent ids (bounded: [`CAPACITY`], oldest forgotten first, in memory), so a client
//! whose connection was lost asks `GET /api/v1/apply/{id}` whether it was committed before
//! reporting, instead of guessing. The same id sent again returns the recorded outcome without
//! applying twice.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The request header naming an apply.
pub const APPLY_ID_HEADER: &str = "plexus-apply-id";

/// How many outcomes are remembered.
pub const CAPACITY: usize = 1024;

/// The answer to `POST /api/v1/apply`: one row per resource. The server writes it and the CLI
/// reads it with this one type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    pub results: Vec<ApplyResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    pub kind: plexus_core::Kind,
    pub namespace: String,
    pub name: String,
    pub outcome: crate::store::Outcome,
    pub resource_version: Option<String>,
}

/// What became of an apply (`GET /api/v1/apply/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum ApplyOutcome {
    /// Received, not yet committed.
    Pending,
    /// Committed: the answer the request got (or would have got).
    Committed(ApplyResponse),
    /// Refused or failed: nothing was applied.
    Failed { error: String },
}

/// A fresh apply id for a client: 16 random bytes, hex; `None` if the system random source
/// fails.
pub fn new_id() -> Option<String> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `id` can name an apply: 1–64 of `A-Z a-z 0-9 - _`.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The outcomes of the most recent applies that carried an id.
#[derive(Default)]
pub struct ApplyLog {
    inner: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    by_id: HashMap<String, ApplyOutcome>,
    order: VecDeque<String>,
}

impl ApplyLog {
    pub fn get(&self, id: &str) -> Option<ApplyOutcome> {
        self.lock().by_id.get(id).cloned()
    }

    /// Marks `id` pending unless it is known: `Err` with what is known of it.
    pub fn begin(&self, id: &str) -> Result<(), ApplyOutcome> {
        let mut e = self.lock();
        if let Some(known) = e.by_id.get(id) {
            return Err(known.clone());
        }
        e.by_id.insert(id.to_string(), ApplyOutcome::Pending);
        e.order.push_back(id.to_string());
        while e.order.len() > CAPACITY {
            if let Some(old) = e.order.pop_front() {
                e.by_id.remove(&old);
            }
        }
        Ok(())
    }

    /// Records how `id` ended (if it is still remembered).
    pub fn finish(&self, id: &str, outcome: ApplyOutcome) {
        if let Some(slot) = self.lock().by_id.get_mut(id) {
            *slot = outcome;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_remembered_bounded_and_never_begun_twice() {
        let log = ApplyLog::default();
        assert_eq!(log.get("a"), None);
        assert_eq!(log.begin("a"), Ok(()));
        assert_eq!(log.get("a"), Some(ApplyOutcome::Pending));
        assert_eq!(log.begin("a"), Err(ApplyOutcome::Pending));
        let done = ApplyOutcome::Committed(ApplyResponse { results: Vec::new() });
        log.finish("a", done.clone());
        assert_eq!(log.begin("a"), Err(done.clone()));
        for i in 0..CAPACITY {
            assert_eq!(log.begin(&format!("x{i}")), Ok(()));
        }
        assert_eq!(log.get("a"), None, "the oldest is forgotten past the capacity");
        assert_eq!(log.get("x1"), Some(ApplyOutcome::Pending));
        log.finish("gone", done);
        assert_eq!(log.get("gone"), None);
        assert!(valid_id("0123abcd-EF_9") && !valid_id("") && !valid_id("a/b") && !valid_id(&"a".repeat(65)));
    }
}
