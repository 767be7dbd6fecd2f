//! The rolling window of traffic summaries reported by proxies, and the golden metrics
//! computed from it for `plexus stat` (and `top`, the dashboard); the topology graph
//! ([`crate::graph`]) reads the same window through [`TrafficWindow::with_recent`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use plexus_api::discovery::TrafficSummary;
use serde::Serialize;

/// How much history is kept.
pub const RETENTION: Duration = Duration::from_secs(600);

/// Reported summaries, newest last.
pub struct TrafficWindow {
    entries: Mutex<VecDeque<(Instant, TrafficSummary)>>,
    /// When collection started: a window reaching further back than this covers only the
    /// time since, and rates are computed over that (not over the whole window, which would
    /// understate them right after a control-plane start).
    started: Instant,
}

impl Default for TrafficWindow {
    fn default() -> Self {
        TrafficWindow { entries: Mutex::new(VecDeque::new()), started: Instant::now() }
    }
}

/// What `plexus stat` groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    Service,
    Workload,
    Route,
}

impl StatKind {
    /// The row a summary counts in.
    pub(crate) fn name_of(self, s: &TrafficSummary) -> String {
        match self {
            StatKind::Service => s.destination_service.clone(),
            StatKind::Workload => s.destination_workload.clone(),
            StatKind::Route => s.route.clone(),
        }
    }
}

/// The rows some inbound summary measures (where requests arrive): those rows ignore what
/// senders saw, which counts only for destinations with no sidecar of their own.
pub(crate) fn inbound_names(recent: &[&TrafficSummary], kind: StatKind) -> std::collections::BTreeSet<String> {
    recent.iter().filter(|s| s.direction == "inbound").map(|s| kind.name_of(s)).collect()
}

/// Golden metrics of one row.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
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

    /// The seconds of history a `window` actually covers (at least 1).
    pub fn covered_seconds(&self, window: Duration) -> f64 {
        window.min(self.started.elapsed()).as_secs_f64().max(1.0)
    }

    /// Calls `f` with the summaries reported during the last `window` (oldest first) and the
    /// seconds they cover ([`Self::covered_seconds`]). The window stays locked meanwhile, so
    /// `f` should only compute.
    pub fn with_recent<R>(&self, window: Duration, f: impl FnOnce(&[&TrafficSummary], f64) -> R) -> R {
        let now = Instant::now();
        let seconds = self.covered_seconds(window);
        let Ok(entries) = self.entries.lock() else { return f(&[], seconds) };
        let recent: Vec<&TrafficSummary> =
            entries.iter().filter(|(t, _)| now.duration_since(*t) <= window).map(|(_, s)| s).collect();
        f(&recent, seconds)
    }

    /// Golden metrics over the last `window`, grouped by `kind`. Services and workloads are
    /// measured where requests arrive (inbound), falling back to what senders saw (outbound)
    /// for destinations with no sidecar of their own; routes are known to senders only.
    pub fn stat(&self, kind: StatKind, window: Duration) -> Vec<StatRow> {
        self.with_recent(window, |recent, secs| {
            let name_of = |s: &TrafficSummary| kind.name_of(s);
            let inbound_names = inbound_names(recent, kind);
            let mut acc: BTreeMap<String, Totals> = BTreeMap::new();
            for s in recent {
                let name = name_of(s);
                let counts = match kind {
                    StatKind::Route => s.direction == "outbound",
                    _ => s.direction == "inbound" || !inbound_names.contains(&name),
                };
                if !counts || name.is_empty() || name == "unknown" {
                    continue;
                }
                acc.entry(name).or_default().add(s);
            }
            acc.into_iter()
                .map(|(name, a)| StatRow {
                    name,
                    requests: a.requests,
                    requests_per_second: a.requests as f64 / secs,
                    success_rate: a.success_rate(),
                    p50_ms: a.quantile_ms(0.50),
                    p95_ms: a.quantile_ms(0.95),
                    p99_ms: a.quantile_ms(0.99),
                    mtls_share: a.mtls_share(),
                })
                .collect()
        })
    }
}

/// Summed counts and latency histogram of some summaries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub successes: u64,
    pub mtls: u64,
    /// Bucket ([`plexus_core::latency`]) -> count.
    pub latency: BTreeMap<u32, u64>,
}

impl Totals {
    /// Adds one summary.
    pub fn add(&mut self, s: &TrafficSummary) {
        self.requests += s.requests;
        self.successes += s.successes;
        self.mtls += s.mtls;
        for (b, n) in &s.latency {
            *self.latency.entry(*b).or_default() += n;
        }
    }

    /// Adds other totals.
    pub fn merge(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.successes += other.successes;
        self.mtls += other.mtls;
        for (b, n) in &other.latency {
            *self.latency.entry(*b).or_default() += n;
        }
    }

    /// Successes ÷ requests (0 without requests).
    pub fn success_rate(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { self.successes as f64 / self.requests as f64 }
    }

    /// Requests over mutual TLS ÷ requests (0 without requests).
    pub fn mtls_share(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { self.mtls as f64 / self.requests as f64 }
    }

    /// The `q` latency quantile in milliseconds (`None` without requests).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        plexus_core::latency::quantile_ms(&self.latency, q)
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

    #[test]
    fn rates_cover_only_the_time_since_collection_started() {
        let started = Instant::now().checked_sub(Duration::from_secs(30)).expect("uptime over 30 s");
        let w = TrafficWindow { started, ..TrafficWindow::default() };
        w.add(vec![summary("inbound", "echo", 300, 300)]);
        let rps = |window| w.stat(StatKind::Service, window)[0].requests_per_second;
        let over_a_minute = rps(Duration::from_secs(60));
        assert!((9.0..=10.0).contains(&over_a_minute), "300 requests in the 30 s collected: {over_a_minute}");
        assert!((rps(Duration::from_secs(10)) - 30.0).abs() < 1e-9);
    }
}
