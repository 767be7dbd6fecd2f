//! The outcome of one run and the numbers derived from it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;

use crate::config::{Load, Protocol};
use crate::error::ErrorKind;
use crate::recorder::merge_into;

/// Everything one run measured (the measured window only; warm-up excluded).
#[derive(Debug, Clone)]
pub struct RunResult {
    pub url: String,
    pub protocol: Protocol,
    pub load: Load,
    pub keepalive: bool,
    pub connections: usize,
    /// Requests in flight per connection at most.
    pub streams: usize,
    pub threads: usize,
    /// The measured window's length.
    pub duration: Duration,
    pub warmup: Duration,
    /// Wall-clock start of the measured window (after the warm-up).
    pub start_time: SystemTime,
    /// Wall-clock end of the measured window (`start_time + duration`).
    pub end_time: SystemTime,
    /// How long requests in flight at the end took to finish.
    pub drained_after: Duration,
    /// Requests the schedule intended in the window (open model only).
    pub planned: Option<u64>,
    /// Planned requests never sent because the run ended first (the target or the generator
    /// fell behind).
    pub unsent: u64,
    /// Requests sent in the window.
    pub sent: u64,
    /// Requests that got a whole response (any status).
    pub completed: u64,
    /// Failures by kind.
    pub errors: BTreeMap<ErrorKind, u64>,
    /// Latency from the intended send time, µs (coordinated omission corrected; in closed
    /// loop the same as `service`).
    pub latency: Histogram<u64>,
    /// Latency from the actual send time, µs (uncorrected).
    pub service: Histogram<u64>,
    /// Send time minus intended time, µs: how well the generator kept to the schedule.
    pub lag: Histogram<u64>,
    /// CPU time the generator's process used during the run.
    pub generator_cpu: Option<Duration>,
}

/// Microseconds to milliseconds.
pub(crate) fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl RunResult {
    /// Completed requests ÷ measured seconds (warm-up excluded): SMP's `actualQPS`. Every
    /// counted request was sent inside the window, so the window's length is the divisor
    /// (requests still in flight at its end are counted when they complete).
    pub fn actual_qps(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 { self.completed as f64 / secs } else { 0.0 }
    }

    /// All failed requests.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The latency at `quantile` (0..=1) in milliseconds, 0 when nothing completed.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        if self.latency.is_empty() { 0.0 } else { ms(self.latency.value_at_quantile(quantile)) }
    }

    /// Smallest latency, ms.
    pub fn min_ms(&self) -> f64 {
        if self.latency.is_empty() { 0.0 } else { ms(self.latency.min()) }
    }

    /// Largest latency, ms.
    pub fn max_ms(&self) -> f64 {
        if self.latency.is_empty() { 0.0 } else { ms(self.latency.max()) }
    }

    /// Mean latency, ms.
    pub fn mean_ms(&self) -> f64 {
        if self.latency.is_empty() { 0.0 } else { self.latency.mean() / 1000.0 }
    }

    /// Standard deviation of the latency, ms.
    pub fn stdev_ms(&self) -> f64 {
        if self.latency.is_empty() { 0.0 } else { self.latency.stdev() / 1000.0 }
    }

    /// Whether latencies are corrected for coordinated omission (open model).
    pub fn corrected(&self) -> bool {
        matches!(self.load, Load::ConstantRate(_))
    }

    /// Combines results of generators that ran at the same time (an SMP profile with several
    /// clients or endpoints): counts and histograms add up, the window is the union.
    pub fn merge(&mut self, other: &RunResult) {
        merge_into(&mut self.latency, &other.latency);
        merge_into(&mut self.service, &other.service);
        merge_into(&mut self.lag, &other.lag);
        self.completed += other.completed;
        self.sent += other.sent;
        self.unsent += other.unsent;
        self.planned = match (self.planned, other.planned) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        for (k, n) in &other.errors {
            *self.errors.entry(*k).or_insert(0) += n;
        }
        self.load = match (self.load, other.load) {
            (Load::ConstantRate(a), Load::ConstantRate(b)) => Load::ConstantRate(a + b),
            _ => Load::MaxThroughput,
        };
        self.connections += other.connections;
        self.threads += other.threads;
        self.start_time = self.start_time.min(other.start_time);
        self.end_time = self.end_time.max(other.end_time);
        self.duration = self.end_time.duration_since(self.start_time).unwrap_or(self.duration.max(other.duration));
        self.drained_after = self.drained_after.max(other.drained_after);
        if self.url != other.url {
            self.url = format!("{} {}", self.url, other.url);
        }
        // Concurrent generators run in one process: its CPU time covers all of them already.
        self.generator_cpu = self.generator_cpu.max(other.generator_cpu);
    }
}
