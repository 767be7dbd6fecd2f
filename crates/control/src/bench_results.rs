//! Performance runs kept by the control plane (`plexus bench` sends its results when a
//! control plane is running): `POST/GET /api/v1/bench/results`, `GET/DELETE
//! /api/v1/bench/results/{id}`; `plexus bench list` and the dashboard's performance page read
//! them.
//!
//! Each run is one JSON file `<data dir>/bench/<id>.json` holding the SMP
//! `PerformanceTestResult` and Plexus's details (full histogram, errors by kind), written
//! atomically (temporary file, then rename). Runs are not resources: they are not watched by
//! proxies and do not move the store's revision. The newest [`MAX_RUNS`] are kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use plexus_bench::smp::{Details, LatenciesMs, PerformanceTestResult};
use serde::{Deserialize, Serialize};

use crate::api::ApiState;

/// Runs kept; older ones are deleted as new ones arrive.
pub const MAX_RUNS: usize = 500;

/// One stored run: what `plexus bench --out` writes, in one document.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredRun {
    pub result: PerformanceTestResult,
    /// Absent for an SMP result made by another tool.
    #[serde(default)]
    pub details: Option<Details>,
}

/// A run as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    pub id: String,
    /// The profile's name, the `name` label, or the URL.
    pub name: String,
    pub start_time: String,
    pub end_time: String,
    pub url: String,
    pub protocol: String,
    /// `constant-rate` or `closed-loop`.
    pub mode: String,
    #[serde(rename = "actualQPS")]
    pub actual_qps: f64,
    #[serde(rename = "requestedQPS")]
    pub requested_qps: Option<f64>,
    pub latencies_ms: LatenciesMs,
    /// Failed requests, all kinds.
    pub errors: u64,
    pub labels: BTreeMap<String, String>,
}

impl RunSummary {
    fn of(run: &StoredRun) -> RunSummary {
        let r = &run.result;
        let d = run.details.as_ref();
        let url = d.map(|d| d.url.clone()).unwrap_or_default();
        let name = r
            .labels
            .get("plexus.io/profile")
            .or_else(|| r.labels.get("name"))
            .cloned()
            .unwrap_or_else(|| if url.is_empty() { r.id.clone() } else { url.clone() });
        RunSummary {
            id: r.id.clone(),
            name,
            start_time: r.start_time.clone(),
            end_time: r.end_time.clone(),
            url,
            protocol: d.map(|d| d.protocol.clone()).unwrap_or_default(),
            mode: d.map(|d| d.mode.clone()).unwrap_or_default(),
            actual_qps: r.actual_qps,
            requested_qps: d.and_then(|d| d.requested_qps),
            latencies_ms: r.latencies_ms,
            errors: d.map(|d| d.errors.values().sum()).unwrap_or(0),
            labels: r.labels.clone(),
        }
    }
}

/// The runs on disk, with their summaries cached in memory.
pub struct BenchResults {
    dir: PathBuf,
    /// Newest first.
    summaries: Mutex<Vec<RunSummary>>,
}

/// Whether `id` can name a file: letters, digits, `-` and `_`, at most 64 characters.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl BenchResults {
    /// Opens `<data_dir>/bench` (created on first save); unreadable files are skipped with a
    /// warning.
    pub fn open(data_dir: &Path) -> BenchResults {
        let dir = data_dir.join("bench");
        let mut summaries = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_none_or(|x| x != "json") {
                    continue;
                }
                match std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice::<StoredRun>(&b).map_err(|e| e.to_string()))
                {
                    Ok(run) => summaries.push(RunSummary::of(&run)),
                    Err(e) => tracing::warn!(file = %path.display(), error = %e, "skipping an unreadable bench result"),
                }
            }
        }
        sort(&mut summaries);
        BenchResults { dir, summaries: Mutex::new(summaries) }
    }

    /// Every run, newest first.
    pub fn list(&self) -> Vec<RunSummary> {
        self.summaries.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// One run.
    pub fn get(&self, id: &str) -> Result<Option<StoredRun>, String> {
        if !valid_id(id) {
            return Ok(None);
        }
        match std::fs::read(self.file(id)) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| format!("bench result {id}: {e}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("bench result {id}: {e}")),
        }
    }

    /// Stores `run` (replacing a run with the same id), then drops the oldest beyond
    /// [`MAX_RUNS`].
    pub fn save(&self, run: &StoredRun) -> Result<RunSummary, String> {
        let id = &run.result.id;
        if !valid_id(id) {
            return Err(format!("result.id {id:?}: letters, digits, '-' and '_' only (at most 64)"));
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let bytes = serde_json::to_vec(run).map_err(|e| e.to_string())?;
        let tmp = self.dir.join(format!(".{id}.tmp"));
        std::fs::write(&tmp, &bytes)
            .and_then(|_| std::fs::rename(&tmp, self.file(id)))
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let summary = RunSummary::of(run);
        let Ok(mut all) = self.summaries.lock() else { return Ok(summary) };
        all.retain(|s| s.id != *id);
        all.push(summary.clone());
        sort(&mut all);
        let keep = MAX_RUNS.min(all.len());
        for old in all.split_off(keep) {
            let _ = std::fs::remove_file(self.file(&old.id));
        }
        Ok(summary)
    }

    /// Deletes a run; whether it existed.
    pub fn delete(&self, id: &str) -> Result<bool, String> {
        if !valid_id(id) {
            return Ok(false);
        }
        if let Ok(mut all) = self.summaries.lock() {
            all.retain(|s| s.id != id);
        }
        match std::fs::remove_file(self.file(id)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }

    fn file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }
}

/// Newest first (RFC 3339 UTC times sort as text), then by id.
fn sort(s: &mut [RunSummary]) {
    s.sort_by(|a, b| b.start_time.cmp(&a.start_time).then_with(|| a.id.cmp(&b.id)));
}

fn failure(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(crate::api_types::ErrorBody::new(message))).into_response()
}

/// `GET /api/v1/bench/results`: `{"items": [RunSummary...]}`, newest first.
pub async fn list(State(s): State<Arc<ApiState>>) -> Response {
    Json(crate::api_types::RunList { items: s.bench.list() }).into_response()
}

/// `GET /api/v1/bench/results/{id}`: `{"result": ..., "details": ...}`.
pub async fn get(State(s): State<Arc<ApiState>>, UrlPath(id): UrlPath<String>) -> Response {
    match s.bench.get(&id) {
        Ok(Some(run)) => Json(run).into_response(),
        Ok(None) => failure(StatusCode::NOT_FOUND, format!("bench result {id} not found")),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `POST /api/v1/bench/results` with `{"result": SMP result, "details": ...}` (admin token).
pub async fn create(State(s): State<Arc<ApiState>>, headers: HeaderMap, body: bytes::Bytes) -> Response {
    if let Err(e) = crate::api::authorized(&s, &headers) {
        return e.into_response();
    }
    let run: StoredRun = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return failure(StatusCode::UNPROCESSABLE_ENTITY, format!("not a bench result: {e}")),
    };
    if let Some(d) = &run.details
        && d.result_id != run.result.id
    {
        return failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("details.resultId {:?} is not result.id {:?}", d.result_id, run.result.id),
        );
    }
    let bench = s.bench.clone();
    match tokio::task::spawn_blocking(move || bench.save(&run)).await {
        Ok(Ok(summary)) => (StatusCode::CREATED, Json(summary)).into_response(),
        Ok(Err(e)) if e.starts_with("result.id") => failure(StatusCode::UNPROCESSABLE_ENTITY, e),
        Ok(Err(e)) => failure(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `DELETE /api/v1/bench/results/{id}` (admin token).
pub async fn delete(State(s): State<Arc<ApiState>>, headers: HeaderMap, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(e) = crate::api::authorized(&s, &headers) {
        return e.into_response();
    }
    match s.bench.delete(&id) {
        Ok(true) => Json(crate::api_types::Deleted { deleted: true }).into_response(),
        Ok(false) => failure(StatusCode::NOT_FOUND, format!("bench result {id} not found")),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(id: &str, start: &str) -> StoredRun {
        let result: PerformanceTestResult = serde_json::from_value(json!({
            "smpVersion": "v0.0.1", "id": id, "labels": {"name": format!("run {id}")},
            "startTime": start, "endTime": start,
            "latenciesMs": {"min": 1.0, "average": 2.0, "p50": 2.0, "p90": 3.0, "p99": 4.0, "max": 5.0},
            "actualQPS": 100.0, "detailsUri": ""
        }))
        .expect("result");
        StoredRun { result, details: None }
    }

    #[test]
    fn saves_lists_newest_first_reopens_and_deletes() {
        let dir = std::env::temp_dir().join(format!("plexus-bench-results-{}", fastrand::u64(..)));
        let store = BenchResults::open(&dir);
        store.save(&run("a", "2026-01-01T00:00:00Z")).expect("save a");
        store.save(&run("b", "2026-01-02T00:00:00Z")).expect("save b");
        let ids = |s: &BenchResults| s.list().into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(&store), ["b", "a"]);
        assert_eq!(store.list()[0].name, "run b");
        let reopened = BenchResults::open(&dir);
        assert_eq!(ids(&reopened), ["b", "a"]);
        assert_eq!(reopened.get("a").expect("read").map(|r| r.result.id), Some("a".into()));
        assert!(reopened.delete("a").expect("delete"));
        assert!(!reopened.delete("a").expect("delete again"));
        assert_eq!(ids(&reopened), ["b"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ids_that_are_not_file_names_are_refused() {
        let dir = std::env::temp_dir().join(format!("plexus-bench-results-{}", fastrand::u64(..)));
        let store = BenchResults::open(&dir);
        for id in ["../x", "a/b", "", "x y"] {
            assert!(store.save(&run(id, "2026-01-01T00:00:00Z")).is_err(), "{id:?}");
            assert!(store.get(id).expect("no error").is_none());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
