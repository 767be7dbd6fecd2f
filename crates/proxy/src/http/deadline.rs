//! Deadline propagation: `grpc-timeout` shrinks hop by hop.
//!
//! A request's deadline is the earliest of the client's `grpc-timeout` (measured from when the
//! proxy received the request) and the route's timeout. Each hop forwards what is left, so
//! the next hop sees a smaller timeout, and a request whose time has run out is failed with
//! DEADLINE_EXCEEDED without calling the next hop.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

/// The gRPC deadline header.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a timeout with the finest unit whose value fits in 8 digits (so every hop's
/// decrement shows).
pub fn encode(d: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let candidates = [
        (d.as_nanos(), "n"),
        (d.as_micros(), "u"),
        (d.as_millis(), "m"),
        (u128::from(d.as_secs()), "S"),
        (u128::from(d.as_secs() / 60), "M"),
    ];
    for (value, unit) in candidates {
        if value <= MAX {
            return format!("{value}{unit}");
        }
    }
    format!("{}H", (d.as_secs() / 3600).min(99_999_999))
}

/// The deadline of a request received at `received`: the client's `grpc-timeout` (read from
/// `grpc_headers`, a gRPC request's headers: the field is gRPC's, and looked for on no other
/// request) and the route's timeout, whichever ends first.
pub fn deadline(
    grpc_headers: Option<&HeaderMap>,
    received: Instant,
    route_timeout: Option<Duration>,
) -> Option<Instant> {
    let client = grpc_headers
        .and_then(|h| h.get(GRPC_TIMEOUT))
        .and_then(|v| v.to_str().ok())
        .and_then(parse)
        .map(|t| received + t);
    let route = route_timeout.map(|t| received + t);
    match (client, route) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Rewrites `grpc-timeout` to what is left of `deadline` (gRPC requests only).
pub fn propagate(headers: &mut HeaderMap, deadline: Instant, now: Instant) {
    let left = deadline.saturating_duration_since(now);
    if let Ok(v) = HeaderValue::from_str(&encode(left)) {
        headers.insert(GRPC_TIMEOUT, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_encodes() {
        assert_eq!(parse("500m"), Some(Duration::from_millis(500)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("123456789m"), None, "at most 8 digits");
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("m"), None);
        assert_eq!(encode(Duration::from_micros(499_873)), "499873u");
        assert_eq!(encode(Duration::from_nanos(1_500)), "1500n");
        assert_eq!(encode(Duration::from_secs(5)), "5000000u");
        assert_eq!(encode(Duration::from_secs(86_400)), "86400000m");
        for d in [Duration::from_micros(1), Duration::from_millis(1234), Duration::from_secs(7_000_000)] {
            let back = parse(&encode(d)).expect("round trip");
            assert!(back <= d && d - back < Duration::from_secs(60), "{d:?} -> {back:?}");
        }
    }

    #[test]
    fn earliest_deadline_wins() {
        let now = Instant::now();
        let mut h = HeaderMap::new();
        h.insert(GRPC_TIMEOUT, HeaderValue::from_static("500m"));
        assert_eq!(deadline(Some(&h), now, Some(Duration::from_secs(3))), Some(now + Duration::from_millis(500)));
        assert_eq!(deadline(Some(&h), now, Some(Duration::from_millis(100))), Some(now + Duration::from_millis(100)));
        assert_eq!(deadline(Some(&HeaderMap::new()), now, None), None);
        // Not a gRPC request: its `grpc-timeout` means nothing; the route's timeout still counts.
        assert_eq!(deadline(None, now, None), None);
        assert_eq!(deadline(None, now, Some(Duration::from_secs(3))), Some(now + Duration::from_secs(3)));
    }
}
