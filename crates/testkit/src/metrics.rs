//! Reading samples out of a Prometheus text exposition (a proxy's or an agent's `/metrics`).

/// Sum of the samples of `metric` (exact name) whose labels contain every one of `labels`
/// (`&[]`: every sample of the metric); 0 when there is none.
pub fn metric_sum(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, set) = series.split_once('{').unwrap_or((series, ""));
            (name == metric && labels.iter().all(|want| set.contains(want))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The value of one sample, spelled exactly as exposed: `name` or `name{labels}`.
pub fn metric_sample(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP plexus_requests_total Requests.\n\
        plexus_requests_total{direction=\"outbound\",code=\"200\"} 3\n\
        plexus_requests_total{direction=\"outbound\",code=\"503\"} 2\n\
        plexus_requests_total{direction=\"inbound\",code=\"200\"} 5\n\
        plexus_requests_total_extra 100\n\
        plexus_http_connections_parked 1\n";

    #[test]
    fn sums_the_matching_series_of_exactly_one_metric() {
        assert_eq!(metric_sum(PAGE, "plexus_requests_total", &["direction=\"outbound\""]), 5.0);
        assert_eq!(metric_sum(PAGE, "plexus_requests_total", &["direction=\"outbound\"", "code=\"200\""]), 3.0);
        assert_eq!(metric_sum(PAGE, "plexus_requests_total", &[]), 10.0);
        assert_eq!(metric_sum(PAGE, "plexus_requests_total", &["code=\"404\""]), 0.0);
        assert_eq!(metric_sum(PAGE, "plexus_requests", &[]), 0.0);
    }

    #[test]
    fn finds_one_sample_as_spelled() {
        assert_eq!(metric_sample(PAGE, "plexus_http_connections_parked"), Some(1.0));
        assert_eq!(metric_sample(PAGE, "plexus_requests_total{direction=\"inbound\",code=\"200\"}"), Some(5.0));
        assert_eq!(metric_sample(PAGE, "plexus_requests_total"), None);
        assert_eq!(metric_sample(PAGE, "plexus_http_connections"), None);
    }
}
