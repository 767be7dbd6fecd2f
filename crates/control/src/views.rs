//! Read-only views the dashboard ([`crate::dashboard`]) needs beyond the CLI's API:
//!
//! * `GET /api/v1/findings`: `plexus check`'s configuration analysis
//!   ([`plexus_core::check::analyze`]) over everything in the store.
//! * `GET /api/v1/stat/series?kind=service|workload|route&name=N&window=10m&step=10s`: golden
//!   metrics per time step, for charts.
//! * `GET /api/v1/overview`: what the overview page shows in one answer (revision, counts of
//!   each kind, proxies connected and in sync, findings by severity).
//!
//! No token is needed: they only read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use plexus_api::discovery::TrafficSummary;
use plexus_core::check::{Finding, Severity, analyze};
use plexus_core::{Kind, Resource};
use serde::Serialize;
use serde_json::{Value, json};

use crate::api::ApiState;
use crate::proxies::ProxyRecord;
use crate::store::Store;
use crate::traffic::{RETENTION, StatKind, Totals, TrafficWindow};

/// The most points a series may have (a 10m window at 1s steps).
pub const MAX_POINTS: u64 = 600;

fn bad_request(message: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, Json(crate::api_types::ErrorBody::new(message))).into_response()
}

fn store_failure(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "store failure");
    (StatusCode::INTERNAL_SERVER_ERROR, Json(crate::api_types::ErrorBody::new(e.to_string()))).into_response()
}

// ---------------------------------------------------------------------------------------------
// Findings
// ---------------------------------------------------------------------------------------------

/// One finding as `/api/v1/findings` answers it: the object split into kind, namespace and
/// name, so pages can show it beside the resource it is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FindingView {
    /// `error` (✗ in `plexus check`) or `warning` (‼).
    pub severity: &'static str,
    /// `HTTPRoute default/reviews`, as `plexus check` prints it.
    pub object: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub message: String,
    pub hint: String,
}

impl FindingView {
    fn of(f: Finding) -> FindingView {
        // `analyze` names objects `KIND NAMESPACE/NAME`; anything else keeps the whole text as
        // the kind, so nothing is lost.
        let (kind, key) = f.object.split_once(' ').unwrap_or((f.object.as_str(), ""));
        let (namespace, name) = key.split_once('/').unwrap_or(("", key));
        FindingView {
            severity: match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            },
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            object: f.object,
            message: f.message,
            hint: f.hint,
        }
    }
}

/// `plexus check`'s configuration analysis over `resources`, errors first.
pub fn findings_of(resources: &[Resource]) -> Vec<FindingView> {
    let mut findings = analyze(resources);
    // Stable: within a severity the analysis order (by object) is kept.
    findings.sort_by_key(|f| f.severity);
    findings.into_iter().map(FindingView::of).collect()
}

/// The answer of `/api/v1/findings` for what `store` holds.
pub fn findings_body(store: &dyn Store) -> Result<Value, crate::store::StoreError> {
    let revision = store.revision();
    let resources = store.list(None, None)?;
    let findings = findings_of(&resources);
    let errors = findings.iter().filter(|f| f.severity == "error").count();
    Ok(json!({
        "revision": revision,
        "resources": resources.len(),
        "errors": errors,
        "warnings": findings.len() - errors,
        "findings": findings,
    }))
}

/// `GET /api/v1/findings`: `{revision, resources, errors, warnings, findings: [...]}`.
pub async fn findings(State(s): State<Arc<ApiState>>) -> Response {
    match findings_body(s.store.as_ref()) {
        Ok(body) => Json(body).into_response(),
        Err(e) => store_failure(e),
    }
}

// ---------------------------------------------------------------------------------------------
// Overview
// ---------------------------------------------------------------------------------------------

/// The answer of `/api/v1/overview`.
pub fn overview_body(store: &dyn Store, proxies: &[ProxyRecord]) -> Result<Value, crate::store::StoreError> {
    let revision = store.revision();
    let resources = store.list(None, None)?;
    let mut counts: BTreeMap<&'static str, usize> = Kind::ALL.iter().map(|k| (k.as_str(), 0)).collect();
    for r in &resources {
        *counts.entry(r.kind.as_str()).or_default() += 1;
    }
    let findings = findings_of(&resources);
    let errors = findings.iter().filter(|f| f.severity == "error").count();
    let in_sync = proxies.iter().filter(|p| p.applied_revision == p.sent_revision).count();
    let mut modes: BTreeMap<&str, usize> = BTreeMap::new();
    for p in proxies {
        *modes.entry(p.mode.as_str()).or_default() += 1;
    }
    Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "revision": revision,
        "counts": counts,
        "proxies": { "connected": proxies.len(), "inSync": in_sync, "byMode": modes },
        "findings": { "errors": errors, "warnings": findings.len() - errors },
    }))
}

/// `GET /api/v1/overview`: `{version, revision, counts: {KIND: n}, proxies: {connected, inSync,
/// byMode}, findings: {errors, warnings}}`.
pub async fn overview(State(s): State<Arc<ApiState>>) -> Response {
    match overview_body(s.store.as_ref(), &s.proxies.list()) {
        Ok(body) => Json(body).into_response(),
        Err(e) => store_failure(e),
    }
}

// ---------------------------------------------------------------------------------------------
// Series
// ---------------------------------------------------------------------------------------------

/// Golden metrics of one name per time step, oldest first (columns, so a chart takes one
/// array). A step without requests has `null` rates and latencies.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Series {
    pub name: String,
    pub requests: Vec<u64>,
    /// `null` for steps that ended before the control plane started collecting.
    pub requests_per_second: Vec<Option<f64>>,
    pub success_rate: Vec<Option<f64>>,
    pub p50_ms: Vec<Option<f64>>,
    pub p95_ms: Vec<Option<f64>>,
    pub p99_ms: Vec<Option<f64>>,
    pub mtls_share: Vec<Option<f64>>,
}

/// The answer of `/api/v1/stat/series`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SeriesSet {
    pub kind: &'static str,
    pub window: String,
    pub step: String,
    /// The end of each step (Unix milliseconds), oldest first; the last is now.
    pub times: Vec<u64>,
    /// Sorted by name.
    pub series: Vec<Series>,
}

fn kind_name(kind: StatKind) -> &'static str {
    match kind {
        StatKind::Service => "service",
        StatKind::Workload => "workload",
        StatKind::Route => "route",
    }
}

/// Parses `kind` as `/api/v1/stat` does.
pub fn parse_stat_kind(kind: &str) -> Option<StatKind> {
    match kind {
        "service" | "services" | "svc" => Some(StatKind::Service),
        "workload" | "workloads" => Some(StatKind::Workload),
        "route" | "routes" | "httproute" | "httproutes" => Some(StatKind::Route),
        _ => None,
    }
}

/// Golden metrics of the last `steps` × `step`, per step, per name (only `name` when given).
///
/// Names are counted as `plexus stat` counts them ([`TrafficWindow::stat`]): services and
/// workloads where requests arrive (inbound), falling back to what senders saw for
/// destinations without a sidecar; routes as senders saw them.
///
/// The window keeps summaries in arrival order without exposing their times, so steps are cut
/// by asking how many of the newest summaries each step boundary covers (one cheap count per
/// boundary) and then reading the summaries once. A report arriving between those calls can
/// land one step early; a step is a bucket of 2-second reports anyway.
pub fn series(traffic: &TrafficWindow, kind: StatKind, name: Option<&str>, step: Duration, steps: u32) -> SeriesSet {
    let steps = steps.max(1);
    let mut covered: Vec<usize> = Vec::with_capacity(steps as usize);
    for k in 1..=steps {
        let n = traffic.with_recent(step * k, |recent, _| recent.len());
        covered.push(n.max(covered.last().copied().unwrap_or(0)));
    }
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let step_ms = step.as_millis() as u64;
    let times: Vec<u64> = (0..steps as u64).map(|i| now_ms.saturating_sub((steps as u64 - 1 - i) * step_ms)).collect();
    let per_name = traffic.with_recent(step * steps, |recent, _| bucket(recent, &covered, kind, name));
    let seconds = step.as_secs_f64().max(f64::MIN_POSITIVE);
    // Steps (oldest first) that ended before collection started have no rate: nobody was
    // counting then. The window never reaches further back than the retention.
    let collected = traffic.covered_seconds(RETENTION);
    let before_start = |i: usize| ((steps as usize - 1 - i) as f64) * seconds >= collected;
    let series = per_name
        .into_iter()
        .map(|(name, totals)| {
            let nonzero = |t: &Totals, v: f64| (t.requests > 0).then_some(v);
            Series {
                name,
                requests: totals.iter().map(|t| t.requests).collect(),
                requests_per_second: totals
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (!before_start(i)).then(|| t.requests as f64 / seconds))
                    .collect(),
                success_rate: totals.iter().map(|t| nonzero(t, t.success_rate())).collect(),
                p50_ms: totals.iter().map(|t| t.quantile_ms(0.50)).collect(),
                p95_ms: totals.iter().map(|t| t.quantile_ms(0.95)).collect(),
                p99_ms: totals.iter().map(|t| t.quantile_ms(0.99)).collect(),
                mtls_share: totals.iter().map(|t| nonzero(t, t.mtls_share())).collect(),
            }
        })
        .collect();
    SeriesSet {
        kind: kind_name(kind),
        window: plexus_core::duration::format(step * steps),
        step: plexus_core::duration::format(step),
        times,
        series,
    }
}

/// Sums `recent` (oldest first) per name and step. `covered[k]` is how many of the newest
/// summaries the last `k + 1` steps hold; the result's steps are oldest first.
fn bucket(
    recent: &[&TrafficSummary],
    covered: &[usize],
    kind: StatKind,
    only: Option<&str>,
) -> BTreeMap<String, Vec<Totals>> {
    let steps = covered.len();
    let name_of = |s: &TrafficSummary| kind.name_of(s);
    let inbound_names = crate::traffic::inbound_names(recent, kind);
    let mut acc: BTreeMap<String, Vec<Totals>> = BTreeMap::new();
    for (i, s) in recent.iter().enumerate() {
        // How far from the newest this summary is, and so which step (0 = newest) holds it.
        let from_newest = recent.len() - 1 - i;
        let newest_first = covered.partition_point(|&n| n <= from_newest);
        if newest_first >= steps {
            continue;
        }
        let name = name_of(s);
        let counts = match kind {
            StatKind::Route => s.direction == "outbound",
            _ => s.direction == "inbound" || !inbound_names.contains(&name),
        };
        if !counts || name.is_empty() || name == "unknown" || only.is_some_and(|o| o != name) {
            continue;
        }
        let totals = acc.entry(name).or_insert_with(|| vec![Totals::default(); steps]);
        totals[steps - 1 - newest_first].add(s);
    }
    acc
}

#[derive(serde::Deserialize)]
pub struct SeriesQuery {
    kind: Option<String>,
    name: Option<String>,
    window: Option<String>,
    step: Option<String>,
}

/// Checks a series query: the kind, the step and how many steps cover the window.
pub fn parse_series_query(q: &SeriesQuery) -> Result<(StatKind, Duration, u32), String> {
    let kind = q.kind.as_deref().unwrap_or("service");
    let kind = parse_stat_kind(kind).ok_or_else(|| format!("cannot chart {kind:?}: use service, workload or route"))?;
    let parse = |what: &str, v: Option<&str>, default: u64| -> Result<Duration, String> {
        match v {
            None | Some("") => Ok(Duration::from_secs(default)),
            Some(v) => plexus_core::duration::parse(v).map_err(|e| format!("{what}: {e}")),
        }
    };
    let window = parse("window", q.window.as_deref(), 600)?;
    let step = parse("step", q.step.as_deref(), 10)?;
    if window < Duration::from_secs(1) || window > RETENTION {
        return Err("window: between 1s and 10m (10m of history is kept)".into());
    }
    if step < Duration::from_secs(1) || step > window {
        return Err("step: at least 1s and at most the window".into());
    }
    let steps = window.as_millis().div_ceil(step.as_millis()) as u64;
    if steps > MAX_POINTS {
        return Err(format!("window ÷ step: at most {MAX_POINTS} points, got {steps}"));
    }
    Ok((kind, step, steps as u32))
}

/// `GET /api/v1/stat/series?kind=service|workload|route&name=N&window=10m&step=10s`
/// ([`SeriesSet`]); every name when `name` is absent.
pub async fn stat_series(State(s): State<Arc<ApiState>>, Query(q): Query<SeriesQuery>) -> Response {
    let (kind, step, steps) = match parse_series_query(&q) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    let name = q.name.as_deref().filter(|n| !n.is_empty());
    Json(series(&s.traffic, kind, name, step, steps)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(direction: &str, service: &str, requests: u64, successes: u64) -> TrafficSummary {
        TrafficSummary {
            direction: direction.into(),
            destination_service: service.into(),
            destination_workload: format!("{service}-1"),
            route: format!("{service}-route"),
            requests,
            successes,
            mtls: requests,
            latency: [(plexus_core::latency::bucket(5_000), requests)].into_iter().collect(),
            ..Default::default()
        }
    }

    fn query(kind: Option<&str>, window: Option<&str>, step: Option<&str>) -> SeriesQuery {
        SeriesQuery {
            kind: kind.map(str::to_string),
            name: None,
            window: window.map(str::to_string),
            step: step.map(str::to_string),
        }
    }

    #[test]
    fn series_puts_reports_in_the_step_they_arrived_in() {
        let w = TrafficWindow::default();
        w.add(vec![summary("inbound", "reviews", 10, 9), summary("outbound", "reviews", 10, 9)]);
        std::thread::sleep(Duration::from_millis(1_100));
        w.add(vec![summary("inbound", "reviews", 30, 30), summary("outbound", "external", 4, 2)]);
        let set = series(&w, StatKind::Service, None, Duration::from_secs(1), 5);
        assert_eq!(set.times.len(), 5);
        assert!(set.times.windows(2).all(|t| t[1] - t[0] == 1_000), "{:?}", set.times);
        assert_eq!((set.window.as_str(), set.step.as_str(), set.kind), ("5s", "1s", "service"));
        let names: Vec<&str> = set.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["external", "reviews"]);
        let reviews = &set.series[1];
        // Inbound only (not double counted), the older report one step before the newer.
        assert_eq!(reviews.requests, [0, 0, 0, 10, 30]);
        assert_eq!(reviews.success_rate, [None, None, None, Some(0.9), Some(1.0)]);
        assert_eq!(reviews.requests_per_second[4], Some(30.0));
        assert_eq!(reviews.requests_per_second[3], Some(10.0), "collecting for over a second");
        assert_eq!(reviews.requests_per_second[0], None, "before collection started");
        assert!(reviews.p99_ms[4].is_some_and(|p| (5.0..5.7).contains(&p)), "{:?}", reviews.p99_ms);
        assert_eq!(reviews.p99_ms[0], None);
        assert_eq!(reviews.mtls_share[4], Some(1.0));
        // A destination without a sidecar is counted as its callers saw it.
        assert_eq!(set.series[0].requests, [0, 0, 0, 0, 4]);
        assert_eq!(set.series[0].success_rate[4], Some(0.5));
    }

    #[test]
    fn series_of_one_name_and_of_routes() {
        let w = TrafficWindow::default();
        w.add(vec![summary("inbound", "a", 1, 1), summary("inbound", "b", 2, 2), summary("outbound", "b", 2, 2)]);
        let only_b = series(&w, StatKind::Service, Some("b"), Duration::from_secs(10), 3);
        assert_eq!(only_b.series.len(), 1);
        assert_eq!(only_b.series[0].requests, [0, 0, 2]);
        let routes = series(&w, StatKind::Route, None, Duration::from_secs(10), 3);
        assert_eq!(routes.series.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["b-route"]);
        let workloads = series(&w, StatKind::Workload, None, Duration::from_secs(10), 1);
        assert_eq!(workloads.series.iter().map(|s| s.requests[0]).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn series_queries_are_checked() {
        assert_eq!(parse_series_query(&query(None, None, None)), Ok((StatKind::Service, Duration::from_secs(10), 60)));
        assert_eq!(
            parse_series_query(&query(Some("workloads"), Some("1m"), Some("7s"))),
            Ok((StatKind::Workload, Duration::from_secs(7), 9)),
            "a window that is no multiple of the step is rounded up"
        );
        for (q, needle) in [
            (query(Some("pods"), None, None), "cannot chart"),
            (query(None, Some("11m"), None), "window"),
            (query(None, Some("soon"), None), "window"),
            (query(None, Some("1m"), Some("2m")), "step"),
            (query(None, Some("10m"), Some("500ms")), "step"),
        ] {
            let e = parse_series_query(&q).expect_err("invalid");
            assert!(e.contains(needle), "{e:?} should mention {needle}");
        }
    }

    fn resources(yaml: &str) -> Vec<Resource> {
        plexus_core::parse_documents("t", yaml).expect("valid resources")
    }

    const ROUTES: &str = "\
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {ports: [{port: 9080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: good}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 9080}]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: missing, port: 9080}]
  rules: [{backendRefs: [{name: reviews, port: 9080}]}]
";

    #[test]
    fn findings_name_the_object_they_are_about() {
        let findings = findings_of(&resources(ROUTES));
        assert!(!findings.is_empty());
        let f = &findings[0];
        assert_eq!(f.severity, "error");
        assert_eq!((f.kind.as_str(), f.namespace.as_str(), f.name.as_str()), ("HTTPRoute", "shop", "broken"));
        assert_eq!(f.object, "HTTPRoute shop/broken");
        assert!(f.message.contains("missing"), "{}", f.message);
        assert!(!f.hint.is_empty());
        assert!(findings.iter().all(|f| f.name != "good"), "{findings:?}");
    }

    #[test]
    fn findings_and_overview_read_the_store() {
        let path = std::env::temp_dir().join(format!("plexus-views-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let store = crate::store::FileStore::open(&path).expect("open store");
        store.apply(&resources(ROUTES)).expect("apply");
        let body = findings_body(&store).expect("findings");
        assert_eq!(body["resources"], 3);
        assert_eq!(body["revision"], store.revision());
        assert!(body["errors"].as_u64().is_some_and(|n| n >= 1), "{body}");
        assert_eq!(body["findings"][0]["kind"], "HTTPRoute");
        let proxy = |mode: &str, applied_revision| ProxyRecord {
            identity: String::new(),
            id: 1,
            workload: format!("{mode}-1"),
            namespace: "default".into(),
            service: mode.into(),
            version: String::new(),
            mode: mode.into(),
            admin_address: String::new(),
            sent_revision: 3,
            applied_revision,
            last_seen: None,
            registered: None,
        };
        let proxies = [proxy("sidecar", 3), proxy("ingress", 2)];
        let overview = overview_body(&store, &proxies).expect("overview");
        assert_eq!(overview["counts"]["HTTPRoute"], 2);
        assert_eq!(overview["counts"]["Service"], 1);
        assert_eq!(overview["counts"]["Workload"], 0, "every kind is counted");
        assert_eq!(overview["proxies"]["connected"], 2);
        assert_eq!(overview["proxies"]["inSync"], 1);
        assert_eq!(overview["proxies"]["byMode"]["ingress"], 1);
        assert_eq!(overview["findings"]["errors"], body["errors"]);
        drop(store);
        let _ = std::fs::remove_file(&path);
    }
}
