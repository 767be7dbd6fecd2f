//! Latency histograms shared by proxies (which fill them) and the control plane (which merges
//! them for `plexus stat`): 20 logarithmic buckets per decade from 10 µs to 1000 s, so any
//! percentile is known within 12%.

/// Number of buckets.
pub const BUCKETS: u32 = 160;
const PER_DECADE: f64 = 20.0;
const FLOOR_US: f64 = 10.0;

/// The bucket of a latency in microseconds.
pub fn bucket(micros: u64) -> u32 {
    let us = (micros as f64).max(FLOOR_US);
    let i = ((us / FLOOR_US).log10() * PER_DECADE).floor();
    (i as u32).min(BUCKETS - 1)
}

/// The upper bound of a bucket, in milliseconds.
pub fn upper_ms(bucket: u32) -> f64 {
    FLOOR_US * 10f64.powf(f64::from(bucket + 1) / PER_DECADE) / 1000.0
}

/// The `q` quantile (0..1) of a histogram given as (bucket, count) pairs, in milliseconds.
pub fn quantile_ms(buckets: &std::collections::BTreeMap<u32, u64>, q: f64) -> Option<f64> {
    let total: u64 = buckets.values().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (b, n) in buckets {
        seen += n;
        if seen >= rank {
            return Some(upper_ms(*b));
        }
    }
    buckets.keys().last().map(|b| upper_ms(*b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_latencies_within_12_percent() {
        for us in [10u64, 95, 1_000, 20_000, 3_000_000] {
            let upper = upper_ms(bucket(us)) * 1000.0;
            assert!(upper >= us as f64 && upper <= us as f64 * 1.13, "{us} µs -> {upper}");
        }
        let mut h = std::collections::BTreeMap::new();
        for us in 1..=100u64 {
            *h.entry(bucket(us * 1000)).or_insert(0) += 1;
        }
        let p50 = quantile_ms(&h, 0.5).unwrap_or(0.0);
        assert!((50.0..=56.5).contains(&p50), "{p50}");
        let p99 = quantile_ms(&h, 0.99).unwrap_or(0.0);
        assert!((99.0..=112.0).contains(&p99), "{p99}");
    }
}
