//! When each request should be sent.
//!
//! Open model: request `i` is intended for `start + i / rate`, computed from one absolute start
//! instant — never by adding intervals, so timer lateness does not accumulate into a lower rate.
//! Requests are handed out in order from one shared counter to whichever connection is free,
//! so a stalled connection does not hold back the requests others could send; while every
//! connection is busy, the next requests wait and are charged for it (their latency counts
//! from the intended time).
//!
//! Closed loop: a request is intended for the moment a connection asks for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One request to send.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slot {
    /// The intended send time.
    pub intended: Instant,
    /// Inside the measured window (false during warm-up).
    pub measured: bool,
}

/// Tokio's timer fires on the first millisecond tick at or after a deadline, and the reactor
/// parks for whole milliseconds, so a sleep ends 0–2 ms late. Every connection learns how late
/// its sleeps end (a moving average) and wakes that much before a request's intended time,
/// which centres the send-time error on the intended time instead of adding about a
/// millisecond to every latency. A request sent early is measured from when it was really
/// sent, so waking early never flatters a latency.
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    /// Estimated lateness of a timer wake-up, nanoseconds.
    late_ns: f64,
}

/// Never wake more than this early.
const MAX_EARLY_NS: f64 = 2_000_000.0;

impl Default for Pacer {
    fn default() -> Self {
        Pacer { late_ns: 1_000_000.0 }
    }
}

impl Pacer {
    /// When to wake up to send `slot`.
    pub(crate) fn wake_at(&self, slot: &Slot) -> Instant {
        let early = Duration::from_nanos(self.late_ns as u64);
        slot.intended.checked_sub(early).unwrap_or(slot.intended)
    }

    /// A sleep meant to end at `target` ended at `now`.
    pub(crate) fn woke(&mut self, target: Instant, now: Instant) {
        let late = now.saturating_duration_since(target).as_nanos() as f64;
        self.late_ns = (self.late_ns * 0.875 + late * 0.125).min(MAX_EARLY_NS);
    }
}

/// The shared schedule of one run.
#[derive(Debug)]
pub(crate) struct Schedule {
    start: Instant,
    measure_from: Instant,
    end: Instant,
    /// Nanoseconds between intended send times; `None`: closed loop.
    interval_ns: Option<f64>,
    next: AtomicU64,
}

impl Schedule {
    /// A schedule starting at `start`: `warmup`, then the measured `duration`.
    pub(crate) fn new(start: Instant, warmup: Duration, duration: Duration, rate: Option<f64>) -> Schedule {
        let measure_from = start + warmup;
        Schedule {
            start,
            measure_from,
            end: measure_from + duration,
            interval_ns: rate.map(|r| 1e9 / r),
            next: AtomicU64::new(0),
        }
    }

    /// Where the measured window starts.
    pub(crate) fn measure_from(&self) -> Instant {
        self.measure_from
    }

    /// Where the run stops sending.
    pub(crate) fn end(&self) -> Instant {
        self.end
    }

    /// Offset of request `i` from the start.
    fn offset(&self, i: u64, interval_ns: f64) -> Duration {
        // f64 holds every nanosecond count up to 2^53 ns (104 days) exactly.
        Duration::from_nanos((i as f64 * interval_ns) as u64)
    }

    /// The next request to send, or `None` once the run is over: its last intended time has
    /// passed, or `now` is past the end (requests still owed then are never sent, and count as
    /// "not sent": the target or the generator fell behind).
    pub(crate) fn claim(&self, now: Instant) -> Option<Slot> {
        if now >= self.end {
            return None;
        }
        let Some(interval_ns) = self.interval_ns else {
            return Some(Slot { intended: now, measured: now >= self.measure_from });
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let intended = self.start + self.offset(i, interval_ns);
        if intended >= self.end {
            return None;
        }
        Some(Slot { intended, measured: intended >= self.measure_from })
    }

    /// Requests the schedule intends inside the measured window (`None` in closed loop).
    pub(crate) fn planned_in_window(&self) -> Option<u64> {
        let interval_ns = self.interval_ns?;
        // The first index whose intended time is at or after `at`, using the same arithmetic
        // as `claim`.
        let first_at = |at: Instant| {
            let d = at - self.start;
            let mut i = (d.as_nanos() as f64 / interval_ns).floor() as u64;
            while i > 0 && self.start + self.offset(i - 1, interval_ns) >= at {
                i -= 1;
            }
            while self.start + self.offset(i, interval_ns) < at {
                i += 1;
            }
            i
        };
        Some(first_at(self.end) - first_at(self.measure_from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_times_come_from_the_absolute_start() {
        let start = Instant::now() + Duration::from_secs(1);
        let s = Schedule::new(start, Duration::from_secs(1), Duration::from_secs(10), Some(300.0));
        let mut last = None;
        let mut measured = 0;
        let mut n = 0u64;
        // Claim everything "at the start": nothing is past the end yet.
        while let Some(slot) = s.claim(start) {
            if let Some(prev) = last {
                let gap: Duration = slot.intended - prev;
                assert!(gap.as_nanos().abs_diff(3_333_333) <= 1, "gap {gap:?}");
            }
            last = Some(slot.intended);
            measured += u64::from(slot.measured);
            n += 1;
        }
        assert_eq!(n, 3300);
        assert_eq!(measured, 3000);
        assert_eq!(s.planned_in_window(), Some(3000));
        // Request 3299 is at 10.9967 s, not 10.9967 s plus accumulated error.
        let last = last.expect("slots");
        assert_eq!((last - start).as_micros(), 10_996_666);
    }

    #[test]
    fn pacer_learns_the_timer_lateness() {
        let mut p = Pacer::default();
        let t0 = Instant::now();
        let slot = Slot { intended: t0 + Duration::from_millis(10), measured: true };
        for _ in 0..100 {
            let target = p.wake_at(&slot);
            p.woke(target, target + Duration::from_micros(1300));
        }
        let early = slot.intended - p.wake_at(&slot);
        assert!(early.as_micros().abs_diff(1300) < 5, "{early:?}");
        for _ in 0..100 {
            let target = p.wake_at(&slot);
            p.woke(target, target + Duration::from_millis(50));
        }
        assert_eq!(slot.intended - p.wake_at(&slot), Duration::from_millis(2), "bounded");
    }

    #[test]
    fn nothing_after_the_end() {
        let start = Instant::now();
        let s = Schedule::new(start, Duration::ZERO, Duration::from_secs(1), Some(10.0));
        assert!(s.claim(start + Duration::from_secs(1)).is_none(), "late claims are refused");
        let closed = Schedule::new(start, Duration::from_millis(100), Duration::from_secs(1), None);
        let slot = closed.claim(start + Duration::from_millis(50)).expect("slot");
        assert!(!slot.measured, "warm-up");
        let slot = closed.claim(start + Duration::from_millis(150)).expect("slot");
        assert!(slot.measured);
        assert!(closed.claim(start + Duration::from_millis(1100)).is_none());
        assert_eq!(closed.planned_in_window(), None);
    }

    #[test]
    fn planned_counts_fractional_rates() {
        let start = Instant::now();
        let s = Schedule::new(start, Duration::from_millis(250), Duration::from_secs(3), Some(7.0));
        let mut measured = 0;
        while let Some(slot) = s.claim(start) {
            measured += u64::from(slot.measured);
        }
        assert_eq!(s.planned_in_window(), Some(measured));
    }
}
