//! The rolling window of traffic summaries reported by proxies, and the golden metrics
//! computed from it for `plexus stat` (and later `top`, the topology graph, the dashboard).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use plexus_api::discovery::TrafficSummary;
use serde::Serialize;

/// How much history is kept.
pub const RETENTION: Duration = Duration::from_secs(600);

/// Reported summaries, newest last.
#[derive(Default)]
pub struct TrafficWindow {
    entries: Mutex<VecDeque<(Instant, TrafficSummary)>>,
}

/// What `plexus stat` groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    Service,
    Workload,
    Route,
}

/// Golden metrics of one row.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatRow {
    pub name: String,
    pub requests: u64,
    pub requests_per_second: f64,
    pub success_rate: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub mtls_share: f64,
}

#[derive(Default)]
struct Acc {
    requests: u64,
    successes: u64,
    mtls: u64,
    latency: BTreeMap<u32, u64>,
}

impl TrafficWindow {
    /// Adds a proxy's report.
    pub fn add(&self, summaries: Vec<TrafficSummary>) {
        let now = Instant::now();
        let Ok(mut e) = self.entries.lock() else { return };
        while e.front().is_some_and(|(t, _)| now.duration_since(*t) > RETENTION) {
            e.pop_front();
        }
        e.extend(summaries.into_iter().map(|s| (now, s)));
    }

    /// Golden metrics over the last `window`, grouped by `kind`. Services and workloads are
    /// measured where requests arrive (inbound), falling back to what senders saw (outbound)
    /// for destinations with no sidecar of their own; routes are known to senders only.
    pub fn stat(&self, kind: StatKind, window: Duration) -> Vec<StatRow> {
        let now = Instant::now();
        let Ok(entries) = self.entries.lock() else { return Vec::new() };
        let recent: Vec<&TrafficSummary> =
            entries.iter().filter(|(t, _)| now.duration_since(*t) <= window).map(|(_, s)| s).collect();
        let name_of = |s: &TrafficSummary| -> String {
            match kind {
                StatKind::Service => s.destination_service.clone(),
                StatKind::Workload => s.destination_workload.clone(),
                StatKind::Route => s.route.clone(),
            }
        };
        let inbound_names: std::collections::BTreeSet<String> =
            recent.iter().filter(|s| s.direction == "inbound").map(|s| name_of(s)).collect();
        let mut acc: BTreeMap<String, Acc> = BTreeMap::new();
        for s in recent {
            let name = name_of(s);
            let counts = match kind {
                StatKind::Route => s.direction == "outbound",
                _ => s.direction == "inbound" || !inbound_names.contains(&name),
            };
            if !counts || name.is_empty() || name == "unknown" {
                continue;
            }
            let a = acc.entry(name).or_default();
            a.requests += s.requests;
            a.successes += s.successes;
            a.mtls += s.mtls;
            for (b, n) in &s.latency {
                *a.latency.entry(*b).or_default() += n;
            }
        }
        let secs = window.as_secs_f64().max(1.0);
        acc.into_iter()
            .map(|(name, a)| StatRow {
                name,
                requests: a.requests,
                requests_per_second: a.requests as f64 / secs,
                success_rate: if a.requests == 0 { 0.0 } else { a.successes as f64 / a.requests as f64 },
                p50_ms: plexus_core::latency::quantile_ms(&a.latency, 0.50),
                p95_ms: plexus_core::latency::quantile_ms(&a.latency, 0.95),
                p99_ms: plexus_core::latency::quantile_ms(&a.latency, 0.99),
                mtls_share: if a.requests == 0 { 0.0 } else { a.mtls as f64 / a.requests as f64 },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(direction: &str, service: &str, requests: u64, successes: u64) -> TrafficSummary {
        TrafficSummary {
            direction: direction.into(),
            destination_service: service.into(),
            destination_workload: format!("{service}-1"),
            route: "default".into(),
            requests,
            successes,
            latency: [(plexus_core::latency::bucket(2_000), requests)].into_iter().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn inbound_counts_for_meshed_services_outbound_for_the_rest() {
        let w = TrafficWindow::default();
        w.add(vec![
            summary("inbound", "reviews", 900, 810),
            summary("outbound", "reviews", 900, 810),
            summary("outbound", "external", 10, 10),
        ]);
        w.add(vec![summary("inbound", "reviews", 100, 90)]);
        let rows = w.stat(StatKind::Service, Duration::from_secs(60));
        let reviews = rows.iter().find(|r| r.name == "reviews").expect("reviews row");
        assert_eq!(reviews.requests, 1000, "inbound only, not double counted");
        assert!((reviews.success_rate - 0.9).abs() < 1e-9);
        assert!(reviews.p99_ms.is_some_and(|p| (2.0..2.3).contains(&p)));
        assert_eq!(rows.iter().find(|r| r.name == "external").map(|r| r.requests), Some(10));
        let routes = w.stat(StatKind::Route, Duration::from_secs(60));
        assert_eq!(routes[0].requests, 910);
    }
}
