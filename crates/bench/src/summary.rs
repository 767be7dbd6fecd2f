//! The human summary of a run: what was offered, what was achieved, errors by kind, latency
//! percentiles and a latency histogram drawn with text bars.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::config::Load;
use crate::result::{RunResult, ms};

/// Width of the longest histogram bar, in characters.
const BAR_WIDTH: usize = 40;
/// Rows of the histogram.
const ROWS: usize = 12;

/// Renders the summary.
pub fn render(r: &RunResult) -> String {
    let mut s = String::new();
    let how = match r.load {
        Load::ConstantRate(rate) => format!(
            "constant rate {} req/s (open model: latency from each request's intended send time, coordinated omission corrected)",
            num(rate)
        ),
        Load::MaxThroughput => {
            "MAX THROUGHPUT, closed loop (each connection sends when its previous request completes; latencies are service times, NOT corrected for coordinated omission)".to_string()
        }
    };
    let conn = match (r.protocol.multiplexed(), r.keepalive) {
        (true, _) => format!("{} connections × {} streams", r.connections, r.streams),
        (false, true) => format!("{} keep-alive connections", r.connections),
        (false, false) => format!("{} concurrent, a new connection per request", r.connections),
    };
    let _ = writeln!(s, "{}  {}", r.protocol.as_str(), r.url);
    let _ = writeln!(s, "  load       {how}");
    let _ = writeln!(
        s,
        "  setup      {conn}, {} thread(s), {:.1} s measured after {:.1} s warm-up",
        r.threads,
        r.duration.as_secs_f64(),
        r.warmup.as_secs_f64()
    );
    let _ = writeln!(s);
    let requested = r.load.rate().map(|rate| format!(" (requested {})", num(rate))).unwrap_or_default();
    let _ = writeln!(s, "  rate       {:.1} req/s achieved{requested}", r.actual_qps());
    let _ = write!(s, "  requests   {} completed, {} errors", r.completed, r.error_count());
    if r.planned.is_some() {
        let _ = write!(s, ", {} not sent", r.unsent);
    }
    let _ = writeln!(s);
    if r.unsent > 0 {
        let _ = writeln!(
            s,
            "  warning    {} planned requests were never sent: the target (or the generator) could not keep up with the rate",
            r.unsent
        );
    }
    if !r.errors.is_empty() {
        let kinds: Vec<String> = r.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        let _ = writeln!(s, "  errors     {}", kinds.join(", "));
    }
    let _ = writeln!(s);
    let label = if r.corrected() { "latency (corrected)" } else { "latency (service time)" };
    let _ = writeln!(s, "  {label}");
    let _ = writeln!(
        s,
        "    min {}  mean {}  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        msf(r.min_ms()),
        msf(r.mean_ms()),
        msf(r.quantile_ms(0.5)),
        msf(r.quantile_ms(0.9)),
        msf(r.quantile_ms(0.99)),
        msf(r.quantile_ms(0.999)),
        msf(r.max_ms())
    );
    if r.corrected() && !r.service.is_empty() {
        let q = |q: f64| msf(ms(r.service.value_at_quantile(q)));
        let _ = writeln!(
            s,
            "    uncorrected (from actual send): p50 {}  p99 {}  max {}",
            q(0.5),
            q(0.99),
            msf(ms(r.service.max()))
        );
        if !r.lag.is_empty() {
            let _ = writeln!(
                s,
                "    send lag behind schedule: p50 {}  p99 {}  max {}",
                msf(ms(r.lag.value_at_quantile(0.5))),
                msf(ms(r.lag.value_at_quantile(0.99))),
                msf(ms(r.lag.max()))
            );
        }
    }
    if let Some(cpu) = r.generator_cpu {
        let per_10k = if r.sent > 0 { cpu.as_secs_f64() / r.sent as f64 * 10_000.0 } else { 0.0 };
        let _ = writeln!(s, "    generator CPU {:.2} s ({per_10k:.3} s per 10k requests)", cpu.as_secs_f64());
    }
    if !r.latency.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "  latency histogram (ms)");
        s.push_str(&draw(&r.latency));
    }
    s
}

/// A millisecond value with a precision that suits its size.
pub fn msf(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}ms")
    } else if v >= 10.0 {
        format!("{v:.1}ms")
    } else {
        format!("{v:.2}ms")
    }
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 { format!("{}", x as i64) } else { format!("{x:.2}") }
}

/// Text bars for a µs histogram: equal-width rows from min to max, or logarithmic rows when
/// the range spans more than a factor of 10 (a stall's tail would otherwise squeeze the
/// body of the distribution into one row).
pub fn draw(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    if h.is_empty() {
        return out;
    }
    let lo = h.min().max(1) as f64;
    let hi = (h.max() as f64).max(lo + 1.0);
    let log = hi / lo > 10.0;
    let edge = |i: usize| -> f64 {
        let f = i as f64 / ROWS as f64;
        if log { lo * (hi / lo).powf(f) } else { lo + (hi - lo) * f }
    };
    let mut counts = [0u64; ROWS];
    for v in h.iter_recorded() {
        let x = h.median_equivalent(v.value_iterated_to()) as f64;
        let row = (0..ROWS).rev().find(|&i| x >= edge(i)).unwrap_or(0);
        counts[row] += v.count_at_value();
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let total = h.len().max(1);
    for (i, &n) in counts.iter().enumerate() {
        let bar = ((n as f64 / top as f64) * BAR_WIDTH as f64).round() as usize;
        let bar = if n > 0 { bar.max(1) } else { 0 };
        let _ = writeln!(
            out,
            "  {:>9} – {:<9} {:<width$} {:>8} {:>6.2}%",
            msf(edge(i) / 1000.0),
            msf(edge(i + 1) / 1000.0),
            "█".repeat(bar),
            n,
            n as f64 * 100.0 / total as f64,
            width = BAR_WIDTH
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::histogram;

    #[test]
    fn histogram_rows_add_up() {
        let mut h = histogram();
        for i in 0..1000u64 {
            h.record(20_000 + i).expect("record");
        }
        h.record(1_000_000).expect("record");
        let text = draw(&h);
        assert_eq!(text.lines().count(), ROWS);
        let total: u64 = text
            .lines()
            .map(|l| l.split_whitespace().rev().nth(1).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0))
            .sum();
        assert_eq!(total, 1001);
        assert!(text.contains('█'));
    }
}
