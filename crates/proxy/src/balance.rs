//! Choosing an endpoint for each request or connection.
//!
//! Default: power of two choices (P2C) over peak-EWMA latency × (pending + 1), as Finagle and
//! Linkerd do: two random endpoints are compared and the cheaper wins, so a slow or overloaded
//! endpoint quickly loses traffic. The estimate decays toward zero while an endpoint is not
//! used (time constant [`DEFAULT_DECAY`]), so an endpoint that was slow is probed again and
//! wins its share back within seconds once it recovers.
//!
//! Tower's `p2c::Balance` assumes a `Discover` stream of tower services; Plexus picks among the
//! endpoints of a compiled snapshot per request and shares per-endpoint statistics across
//! config reloads, so the choice is implemented here as small pure functions plus per-endpoint
//! atomics.
//!
//! Outlier detection: an endpoint failing `consecutive_failures` times in a row (connection
//! failures and 502/503/504 answers) is ejected for a base time that grows with each ejection;
//! at most half of a Service's endpoints are ejected at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plexus_core::Endpoint;
use plexus_core::policy::{ClientPolicy, OutlierDetection};
use plexus_core::resource::LbAlgorithm;

use crate::settings::LoadBalancer;

/// Time constant of the latency estimate's decay.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(3);
const CONSECUTIVE_FAILURES: u32 = 7;
const BASE_EJECTION: Duration = Duration::from_secs(1);
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Latency and load statistics of one endpoint, kept across config reloads.
#[derive(Debug)]
pub struct EndpointStats {
    pending: AtomicU32,
    rtt: Mutex<Rtt>,
    failures: AtomicU32,
    ejection: Mutex<Ejection>,
}

#[derive(Debug)]
struct Rtt {
    estimate_ns: f64,
    updated: Instant,
}

#[derive(Debug, Default)]
struct Ejection {
    until: Option<Instant>,
    count: u32,
}

impl EndpointStats {
    fn new() -> Self {
        EndpointStats {
            pending: AtomicU32::new(0),
            rtt: Mutex::new(Rtt { estimate_ns: 0.0, updated: Instant::now() }),
            failures: AtomicU32::new(0),
            ejection: Mutex::new(Ejection::default()),
        }
    }

    /// Peak-EWMA cost: decayed latency estimate × (pending + 1).
    fn cost(&self, now: Instant, decay: Duration) -> f64 {
        let estimate = self
            .rtt
            .lock()
            .map(|r| decayed(r.estimate_ns, now.saturating_duration_since(r.updated), decay))
            .unwrap_or(0.0);
        (estimate + 1_000.0) * f64::from(self.pending.load(Ordering::Relaxed) + 1)
    }

    fn observe_rtt(&self, rtt: Duration, now: Instant, decay: Duration) {
        if let Ok(mut r) = self.rtt.lock() {
            r.estimate_ns =
                next_estimate(r.estimate_ns, now.saturating_duration_since(r.updated), rtt.as_nanos() as f64, decay);
            r.updated = now;
        }
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejection.lock().map(|e| e.until.is_some_and(|u| u > now)).unwrap_or(false)
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }
}

/// The estimate `elapsed` after it was last updated.
fn decayed(estimate: f64, elapsed: Duration, decay: Duration) -> f64 {
    estimate * (-elapsed.as_secs_f64() / decay.as_secs_f64()).exp()
}

/// Peak EWMA update: a sample above the (decayed) estimate replaces it at once; a lower one is
/// blended in with a weight that grows with the time since the last update.
pub fn next_estimate(estimate: f64, elapsed: Duration, sample: f64, decay: Duration) -> f64 {
    let current = decayed(estimate, elapsed, decay);
    if sample > current {
        sample
    } else {
        let w = (-elapsed.as_secs_f64() / decay.as_secs_f64()).exp();
        current * w + sample * (1.0 - w)
    }
}

/// Power of two choices: of two distinct random candidates, the one with the lower cost.
pub fn p2c(n: usize, roll_a: usize, roll_b: usize, cost: impl Fn(usize) -> f64) -> usize {
    if n <= 1 {
        return 0;
    }
    let a = roll_a % n;
    let b = (a + 1 + roll_b % (n - 1)) % n;
    if cost(b) < cost(a) { b } else { a }
}

/// What a Service port's policy says about choosing its endpoints for one request.
#[derive(Debug, Clone, Copy)]
pub struct Choice {
    /// The port's ResiliencePolicy algorithm; `None` uses the proxy's default.
    pub algorithm: Option<LbAlgorithm>,
    /// The request's ring-hash key, when the algorithm is `ringHash`.
    pub hash: Option<u64>,
    pub outlier: OutlierDetection,
}

impl Choice {
    /// The choice for a port under `policy`, with the request's hash key.
    pub fn new(policy: &ClientPolicy, hash: Option<u64>) -> Choice {
        Choice {
            algorithm: policy.load_balancer_set.then_some(policy.load_balancer),
            hash,
            outlier: policy.outlier_detection,
        }
    }
}

impl Default for Choice {
    fn default() -> Self {
        Choice { algorithm: None, hash: None, outlier: plexus_core::policy::DEFAULT_OUTLIER }
    }
}

/// Picks endpoints and keeps their statistics.
pub struct Balancer {
    algorithm: LoadBalancer,
    decay: Duration,
    stats: Mutex<HashMap<SocketAddr, Arc<EndpointStats>>>,
    round_robin: AtomicUsize,
}

/// An endpoint chosen for one request: report the outcome with [`Pick::finish`]; dropping it
/// without finishing only releases the pending slot.
pub struct Pick {
    stats: Arc<EndpointStats>,
    started: Instant,
    decay: Duration,
    done: bool,
}

impl Pick {
    /// Records latency (time to response headers) and success; returns `true` when this
    /// failure ejected the endpoint.
    pub fn finish(mut self, success: bool) -> bool {
        self.done = true;
        let now = Instant::now();
        self.stats.pending.fetch_sub(1, Ordering::Relaxed);
        self.stats.observe_rtt(now - self.started, now, self.decay);
        if success {
            self.stats.failures.store(0, Ordering::Relaxed);
            return false;
        }
        let failures = self.stats.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < CONSECUTIVE_FAILURES {
            return false;
        }
        self.stats.failures.store(0, Ordering::Relaxed);
        let Ok(mut e) = self.stats.ejection.lock() else { return false };
        e.count = e.count.saturating_add(1);
        let time = BASE_EJECTION.saturating_mul(e.count).min(MAX_EJECTION);
        e.until = Some(now + time);
        true
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        if !self.done {
            self.stats.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Balancer {
    pub fn new(algorithm: LoadBalancer) -> Self {
        Balancer {
            algorithm,
            decay: DEFAULT_DECAY,
            stats: Mutex::new(HashMap::new()),
            round_robin: AtomicUsize::new(0),
        }
    }

    fn stats_for(&self, endpoints: &[&Endpoint]) -> Vec<Arc<EndpointStats>> {
        let Ok(mut map) = self.stats.lock() else {
            return endpoints.iter().map(|_| Arc::new(EndpointStats::new())).collect();
        };
        endpoints.iter().map(|e| map.entry(e.addr).or_insert_with(|| Arc::new(EndpointStats::new())).clone()).collect()
    }

    /// Forgets endpoints no longer in any Service.
    pub fn retain(&self, live: impl Fn(&SocketAddr) -> bool) {
        if let Ok(mut map) = self.stats.lock() {
            map.retain(|addr, _| live(addr));
        }
    }

    /// Number of ejected endpoints among `endpoints`.
    pub fn ejected_count(&self, endpoints: &[Endpoint]) -> usize {
        let now = Instant::now();
        let Ok(map) = self.stats.lock() else { return 0 };
        endpoints.iter().filter(|e| map.get(&e.addr).is_some_and(|s| s.ejected(now))).count()
    }

    /// Chooses an endpoint, skipping `exclude` (already tried) and ejected endpoints.
    pub fn pick<'a>(
        &self,
        endpoints: &'a [Endpoint],
        choice: &Choice,
        exclude: &[SocketAddr],
    ) -> Option<(&'a Endpoint, Pick)> {
        let _ = choice;
        let now = Instant::now();
        let all: Vec<&Endpoint> = endpoints.iter().filter(|e| !exclude.contains(&e.addr)).collect();
        if all.is_empty() {
            return None;
        }
        let all_stats = self.stats_for(&all);
        let healthy: Vec<usize> = (0..all.len()).filter(|i| !all_stats[*i].ejected(now)).collect();
        // Never eject more than half: past that, ejection is ignored (panic threshold).
        let candidates: Vec<usize> =
            if healthy.len() * 2 >= all.len() && !healthy.is_empty() { healthy } else { (0..all.len()).collect() };
        let n = candidates.len();
        let chosen = match self.algorithm {
            LoadBalancer::RoundRobin => candidates[self.round_robin.fetch_add(1, Ordering::Relaxed) % n],
            LoadBalancer::LeastRequest => {
                candidates[p2c(n, fastrand::usize(..), fastrand::usize(..), |i| {
                    f64::from(all_stats[candidates[i]].pending())
                })]
            }
            LoadBalancer::Ewma => {
                candidates[p2c(n, fastrand::usize(..), fastrand::usize(..), |i| {
                    all_stats[candidates[i]].cost(now, self.decay)
                })]
            }
        };
        let stats = all_stats[chosen].clone();
        stats.pending.fetch_add(1, Ordering::Relaxed);
        Some((all[chosen], Pick { stats, started: now, decay: self.decay, done: false }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p2c_takes_the_cheaper_of_two_distinct() {
        let costs = [5.0, 1.0, 3.0];
        for a in 0..3 {
            for b in 0..2 {
                let chosen = p2c(3, a, b, |i| costs[i]);
                let other = (a + 1 + b) % 3;
                assert_ne!(a, other);
                assert_eq!(chosen, if costs[other] < costs[a] { other } else { a });
            }
        }
        assert_eq!(p2c(1, 7, 9, |_| 0.0), 0);
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let d = DEFAULT_DECAY;
        assert_eq!(next_estimate(1e6, Duration::ZERO, 50e6, d), 50e6, "a slow sample is taken at once");
        let frequent = next_estimate(50e6, Duration::from_millis(1), 1e6, d);
        assert!(frequent > 49e6, "one fast sample barely moves a fresh estimate: {frequent}");
        let after_idle = next_estimate(50e6, Duration::from_secs(6), 1e6, d);
        assert!(after_idle < 2e6, "after idling, the old estimate has mostly decayed: {after_idle}");
    }

    #[test]
    fn ewma_prefers_the_fast_endpoint_and_ejects_failing_ones() {
        let ep = |port| Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            workload: format!("w{port}"),
            namespace: "default".into(),
            version: None,
            service_account: "default".into(),
            meshed: false,
            app_port: port,
        };
        let endpoints = vec![ep(1), ep(2)];
        let b = Balancer::new(LoadBalancer::Ewma);
        let slow = b.stats_for(&[&endpoints[1]]).remove(0);
        slow.observe_rtt(Duration::from_millis(50), Instant::now(), DEFAULT_DECAY);
        let fast = b.stats_for(&[&endpoints[0]]).remove(0);
        fast.observe_rtt(Duration::from_millis(1), Instant::now(), DEFAULT_DECAY);
        let fast_picks = (0..100)
            .filter(|_| b.pick(&endpoints, &Choice::default(), &[]).map(|(e, _)| e.addr.port()) == Some(1))
            .count();
        assert_eq!(fast_picks, 100);
        for _ in 0..CONSECUTIVE_FAILURES {
            let (e, pick) =
                b.pick(&endpoints, &Choice::default(), &[SocketAddr::from(([127, 0, 0, 1], 2))]).expect("endpoint");
            assert_eq!(e.addr.port(), 1);
            pick.finish(false);
        }
        assert_eq!(b.ejected_count(&endpoints), 1);
        let picks: Vec<u16> =
            (0..20).filter_map(|_| b.pick(&endpoints, &Choice::default(), &[]).map(|(e, _)| e.addr.port())).collect();
        assert!(picks.iter().all(|p| *p == 2), "the ejected endpoint gets nothing: {picks:?}");
    }
}
