//! What one connection saw, recorded without locks; merged into the run's result at the end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::error::ErrorKind;
use crate::run::Progress;
use crate::schedule::Slot;

/// Significant digits of every histogram: 0.1% resolution (20 µs at 20 ms).
pub(crate) const SIGFIGS: u8 = 3;

/// A latency histogram in microseconds that grows as larger values arrive.
pub(crate) fn histogram() -> Histogram<u64> {
    // Only precisions above 5 are refused; SIGFIGS is a constant 3.
    Histogram::new(SIGFIGS).expect("3 significant digits is a valid HDR histogram precision")
}

/// A µs histogram sized up front for latencies up to a minute (≈150 KiB), so recording
/// never reallocates on the request path; longer values still fit (it grows).
pub(crate) fn sized_histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_max(60_000_000, SIGFIGS).unwrap_or_else(|_| histogram());
    h.auto(true);
    h
}

/// How one request ended.
pub(crate) enum Outcome {
    /// A whole response; `error` when its status says failure.
    Response { error: Option<ErrorKind> },
    /// No (complete) response.
    Failed(ErrorKind),
}

/// Per-connection results.
pub(crate) struct Recorder {
    /// Latency from the intended send time (or the actual one when that was earlier): the
    /// coordinated-omission-corrected latency. Microseconds.
    pub latency: Histogram<u64>,
    /// Latency from the actual send time (what a closed-loop tool reports). Microseconds.
    pub service: Histogram<u64>,
    /// How late requests were sent relative to their intended time. Microseconds.
    pub lag: Histogram<u64>,
    /// Measured requests that got a whole response.
    pub completed: u64,
    /// Measured requests sent (or attempted).
    pub sent: u64,
    /// Failures by kind (measured requests only).
    pub errors: BTreeMap<ErrorKind, u64>,
    progress: Arc<Progress>,
}

impl Recorder {
    pub(crate) fn new(progress: Arc<Progress>) -> Recorder {
        Recorder {
            latency: sized_histogram(),
            service: sized_histogram(),
            lag: sized_histogram(),
            completed: 0,
            sent: 0,
            errors: BTreeMap::new(),
            progress,
        }
    }

    /// Records one finished request.
    pub(crate) fn record(&mut self, slot: Slot, sent: Instant, done: Instant, outcome: Outcome) {
        if !slot.measured {
            self.progress.warmup.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.sent += 1;
        let from = slot.intended.min(sent);
        let _ = self.lag.record(micros(sent.saturating_duration_since(slot.intended)));
        match outcome {
            Outcome::Response { error } => {
                self.completed += 1;
                let _ = self.latency.record(micros(done.saturating_duration_since(from)).max(1));
                let _ = self.service.record(micros(done.saturating_duration_since(sent)).max(1));
                self.progress.completed.fetch_add(1, Ordering::Relaxed);
                if let Some(kind) = error {
                    *self.errors.entry(kind).or_insert(0) += 1;
                    self.progress.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Outcome::Failed(kind) => {
                *self.errors.entry(kind).or_insert(0) += 1;
                self.progress.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Adds `other` into `self`.
    pub(crate) fn merge(&mut self, other: Recorder) {
        merge_into(&mut self.latency, &other.latency);
        merge_into(&mut self.service, &other.service);
        merge_into(&mut self.lag, &other.lag);
        self.completed += other.completed;
        self.sent += other.sent;
        for (k, n) in other.errors {
            *self.errors.entry(k).or_insert(0) += n;
        }
    }
}

/// Adds `from` into `into` (auto-resizing histograms cannot overflow their range).
pub(crate) fn merge_into(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    if into.add(from).is_err() {
        for v in from.iter_recorded() {
            let _ = into.record_n(v.value_iterated_to(), v.count_at_value());
        }
    }
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn corrected_latency_counts_from_the_intended_time() {
        let progress = Arc::new(Progress::default());
        let mut r = Recorder::new(progress.clone());
        let t0 = Instant::now();
        // Sent 100 ms late (a busy connection), answered 20 ms after sending.
        let slot = Slot { intended: t0, measured: true };
        r.record(
            slot,
            t0 + Duration::from_millis(100),
            t0 + Duration::from_millis(120),
            Outcome::Response { error: None },
        );
        // Sent 0.3 ms early (timer wake-up): measured from the real send.
        let slot = Slot { intended: t0 + Duration::from_millis(200), measured: true };
        let sent = t0 + Duration::from_micros(199_700);
        r.record(
            slot,
            sent,
            sent + Duration::from_millis(20),
            Outcome::Response { error: Some(ErrorKind::Status(503)) },
        );
        // Warm-up: not recorded.
        let slot = Slot { intended: t0, measured: false };
        r.record(slot, t0, t0, Outcome::Failed(ErrorKind::Reset));
        r.record(Slot { intended: t0, measured: true }, t0, t0, Outcome::Failed(ErrorKind::Timeout));

        assert_eq!(r.completed, 2);
        assert_eq!(r.sent, 3);
        assert_eq!(r.latency.max(), r.latency.highest_equivalent(120_000));
        assert!(r.latency.equivalent(r.latency.min(), 20_000));
        assert!(r.service.equivalent(r.service.max(), 20_000));
        assert_eq!(r.errors.get(&ErrorKind::Status(503)), Some(&1));
        assert_eq!(r.errors.get(&ErrorKind::Timeout), Some(&1));
        assert_eq!(progress.completed.load(Ordering::Relaxed), 2);
        assert_eq!(progress.errors.load(Ordering::Relaxed), 2);
        assert_eq!(progress.warmup.load(Ordering::Relaxed), 1);

        let mut total = Recorder::new(progress);
        total.merge(r);
        assert_eq!(total.latency.len(), 2);
        assert_eq!(total.errors.len(), 2);
    }
}
