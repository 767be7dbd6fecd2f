//! Compact traffic summaries pushed to the control plane every few seconds (for `plexus stat`,
//! `top` and the topology graph); Prometheus metrics are the detailed, per-proxy view.

use std::collections::BTreeMap;

use foldhash::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plexus_api::discovery::discovery_client::DiscoveryClient;
use plexus_api::discovery::{TelemetryReport, TrafficSummary};

use crate::metrics::{Label, PeerLabels};

/// How often summaries are sent.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    direction: &'static str,
    source_workload: Label,
    source_service: Label,
    destination_service: Label,
    destination_workload: Label,
    destination_version: Label,
    route: Label,
}

#[derive(Debug, Default)]
struct Summary {
    requests: u64,
    successes: u64,
    mtls: u64,
    latency: BTreeMap<u32, u64>,
}

impl Key {
    fn of(direction: &'static str, peers: &PeerLabels, route: &Label) -> Key {
        Key {
            direction,
            source_workload: peers.source_workload.clone(),
            source_service: peers.source_service.clone(),
            destination_service: peers.destination_service.clone(),
            destination_workload: peers.destination_workload.clone(),
            destination_version: peers.destination_version.clone(),
            route: route.clone(),
        }
    }

    /// Whether this is the key of a request with these labels (the same shared strings,
    /// usually: one comparison each).
    fn is(&self, direction: &'static str, peers: &PeerLabels, route: &Label) -> bool {
        let same = |a: &Label, b: &Label| Arc::ptr_eq(a, b) || a == b;
        same(&self.destination_workload, &peers.destination_workload)
            && same(&self.route, route)
            && (std::ptr::eq(self.direction, direction) || self.direction == direction)
            && same(&self.source_workload, &peers.source_workload)
            && same(&self.destination_service, &peers.destination_service)
            && same(&self.source_service, &peers.source_service)
            && same(&self.destination_version, &peers.destination_version)
    }
}

/// Keys kept beside the window's map: a request with one of them (a keep-alive connection's
/// requests mostly share one) is compared with them, not hashed, and builds no key.
const RECENT: usize = 4;

/// The summaries of one window: the first [`RECENT`] keys in `recent`, later ones in `map`
/// (each key in one of the two).
#[derive(Default)]
struct Window {
    recent: Vec<(Key, Summary)>,
    map: HashMap<Key, Summary>,
}

/// Traffic seen since the last report.
#[derive(Default)]
pub struct Telemetry {
    enabled: AtomicBool,
    current: Mutex<Window>,
}

impl Telemetry {
    /// Starts collecting (once a reporter consumes the summaries).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Counts one finished request.
    pub fn record(
        &self,
        direction: &'static str,
        peers: &PeerLabels,
        route: &Label,
        success: bool,
        mtls: bool,
        latency: Duration,
    ) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut current) = self.current.lock() else { return };
        let window = &mut *current;
        let s = match window.recent.iter().position(|(k, _)| k.is(direction, peers, route)) {
            Some(i) => &mut window.recent[i].1,
            // Not among the recent ones: since the window filled them, every new key went to
            // the map, so it can be only there.
            None if window.recent.len() == RECENT => window.map.entry(Key::of(direction, peers, route)).or_default(),
            None => {
                let i = window.recent.len();
                window.recent.push((Key::of(direction, peers, route), Summary::default()));
                &mut window.recent[i].1
            }
        };
        s.requests += 1;
        s.successes += u64::from(success);
        s.mtls += u64::from(mtls);
        *s.latency.entry(plexus_core::latency::bucket(latency.as_micros() as u64)).or_default() += 1;
    }

    fn take(&self) -> Vec<TrafficSummary> {
        let taken = match self.current.lock() {
            Ok(mut c) => std::mem::take(&mut *c),
            Err(_) => return Vec::new(),
        };
        taken
            .recent
            .into_iter()
            .chain(taken.map)
            .map(|(k, s)| TrafficSummary {
                direction: k.direction.into(),
                source_workload: k.source_workload.to_string(),
                source_service: k.source_service.to_string(),
                destination_service: k.destination_service.to_string(),
                destination_workload: k.destination_workload.to_string(),
                destination_version: k.destination_version.to_string(),
                route: k.route.to_string(),
                requests: s.requests,
                successes: s.successes,
                mtls: s.mtls,
                latency: s.latency.into_iter().collect(),
            })
            .collect()
    }
}

/// Sends a report every [`REPORT_INTERVAL`] (best effort: a report that cannot be sent is
/// dropped; the control plane's window shows the gap).
pub async fn report_loop(
    telemetry: std::sync::Arc<Telemetry>,
    tls: std::sync::Arc<crate::cp_tls::ControlPlaneTls>,
    address: String,
    workload: String,
    namespace: String,
    service: String,
) {
    telemetry.enable();
    let mut client: Option<DiscoveryClient<tonic::transport::Channel>> = None;
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    let mut last = Instant::now();
    loop {
        tick.tick().await;
        let summaries = telemetry.take();
        let interval_ms = last.elapsed().as_millis() as u32;
        last = Instant::now();
        if summaries.is_empty() {
            continue;
        }
        if client.is_none() && tls.has_certificate() {
            client = tls
                .channel(&address, |e| e.connect_timeout(Duration::from_secs(1)))
                .await
                .ok()
                .map(DiscoveryClient::new);
        }
        let Some(c) = client.as_mut() else { continue };
        let report = TelemetryReport {
            workload: workload.clone(),
            namespace: namespace.clone(),
            service: service.clone(),
            interval_ms,
            summaries,
        };
        if let Err(e) = c.report(report).await {
            tracing::debug!(error = %e, "telemetry report failed");
            client = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(workload: &str) -> PeerLabels {
        PeerLabels { destination_workload: workload.into(), ..PeerLabels::default() }
    }

    /// Keys past the recent ones, and label values equal in text but not shared, are summed
    /// into one summary per key, as by a map alone.
    #[test]
    fn each_key_is_summarized_once_whether_recent_or_not() {
        let t = Telemetry::default();
        t.enable();
        let route: Label = "default".into();
        let ms = Duration::from_millis(1);
        for round in 0..3 {
            for w in 0..(RECENT + 3) {
                // A fresh copy of the same text each time: matched by value, not pointer.
                t.record("outbound", &peers(&format!("w{w}")), &route, round != 1, false, ms);
            }
        }
        t.record("inbound", &peers("w0"), &route, true, true, ms);
        let mut got: Vec<(String, String, u64, u64, u64)> = t
            .take()
            .into_iter()
            .map(|s| (s.direction, s.destination_workload, s.requests, s.successes, s.mtls))
            .collect();
        got.sort();
        let mut want: Vec<(String, String, u64, u64, u64)> =
            (0..(RECENT + 3)).map(|w| ("outbound".to_string(), format!("w{w}"), 3, 2, 0)).collect();
        want.push(("inbound".into(), "w0".into(), 1, 1, 1));
        want.sort();
        assert_eq!(got, want);
        assert!(t.take().is_empty(), "a report takes the window");
    }
}
