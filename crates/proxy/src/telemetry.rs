//! Compact traffic summaries pushed to the control plane every few seconds (for `plexus stat`,
//! `top` and the topology graph); Prometheus metrics are the detailed, per-proxy view.

use std::collections::BTreeMap;

use foldhash::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Traffic seen since the last report.
#[derive(Default)]
pub struct Telemetry {
    enabled: AtomicBool,
    current: Mutex<HashMap<Key, Summary>>,
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
        let key = Key {
            direction,
            source_workload: peers.source_workload.clone(),
            source_service: peers.source_service.clone(),
            destination_service: peers.destination_service.clone(),
            destination_workload: peers.destination_workload.clone(),
            destination_version: peers.destination_version.clone(),
            route: route.clone(),
        };
        let Ok(mut current) = self.current.lock() else { return };
        let s = current.entry(key).or_default();
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
            .into_iter()
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
