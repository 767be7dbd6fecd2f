//! Compiled policies: what ResiliencePolicy, RateLimitPolicy, FaultInjection and route `retry`
//! fields mean to a proxy, with the mesh defaults filled in (SPEC §4 "Defaults").
//!
//! Policy attachment follows the Gateway API rule for conflicts: a policy naming the port wins
//! over one naming the whole Service; among equals the oldest (then `namespace/name` first) wins.

use std::time::Duration;

use serde::Serialize;

use crate::names::spiffe_id;
use crate::resource::{
    FaultInjectionSpec, GrpcCode, LbAlgorithm, RateLimitPolicySpec, ResiliencePolicySpec, RetrySettings,
};

/// Default retry budget: retries may add 20% to the requests, plus 10 per second.
pub const DEFAULT_BUDGET: RetryBudget = RetryBudget { ratio: 0.2, min_per_second: 10, ttl: Duration::from_secs(10) };

/// Default outlier detection: 7 consecutive gateway failures, 1 s base ejection, at most 50%
/// ejected; `consecutive5xx` off.
pub const DEFAULT_OUTLIER: OutlierDetection = OutlierDetection {
    consecutive_failures: 7,
    consecutive_5xx: 0,
    interval: Duration::from_secs(1),
    base_ejection_time: Duration::from_secs(1),
    max_ejection_percent: 50,
};

/// How a client proxy calls one Service port.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientPolicy {
    /// `namespace/name` of the ResiliencePolicy applied, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", with = "crate::route::opt_duration")]
    pub connect_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", with = "crate::route::opt_duration")]
    pub request_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", with = "crate::route::opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// How long a request waits for an endpoint when the Service has none (Linkerd's
    /// fail-fast: queue, then 503); zero fails at once.
    #[serde(with = "crate::route::duration_str")]
    pub endpoint_wait: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    pub retry_budget: RetryBudget,
    pub outlier_detection: OutlierDetection,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimits>,
    pub load_balancer: LbAlgorithm,
    /// Whether the policy chose the algorithm (otherwise the proxy's own default applies).
    #[serde(skip)]
    pub load_balancer_set: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashKey>,
}

/// How long a request waits for an endpoint of a Service that has none, by default.
pub const DEFAULT_ENDPOINT_WAIT: Duration = Duration::from_secs(3);

impl Default for ClientPolicy {
    fn default() -> Self {
        ClientPolicy {
            source: None,
            connect_timeout: None,
            request_timeout: None,
            idle_timeout: None,
            endpoint_wait: DEFAULT_ENDPOINT_WAIT,
            retry: None,
            retry_budget: DEFAULT_BUDGET,
            outlier_detection: DEFAULT_OUTLIER,
            connection_limits: None,
            load_balancer: LbAlgorithm::Ewma,
            load_balancer_set: false,
            hash_on: None,
        }
    }
}

/// When and how often a request is tried again.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Total tries, the first included.
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none", with = "crate::route::opt_duration")]
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    #[serde(with = "crate::route::duration_str")]
    pub backoff: Duration,
    pub non_idempotent: bool,
}

/// Retry conditions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryOn {
    /// Any 5xx answer.
    pub server_error: bool,
    /// 502, 503, 504.
    pub gateway_error: bool,
    pub connect_failure: bool,
    /// The connection was reset or closed before a response.
    pub reset: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grpc_statuses: Vec<u16>,
}

/// Tries per request when no policy says otherwise: a connection failure (nothing was sent)
/// or a reset of an idempotent request is tried again, on another endpoint when there is one
/// (SPEC §4: "no retries except on connection failure").
pub static DEFAULT_RETRY: RetryPolicy = RetryPolicy {
    attempts: 3,
    per_try_timeout: None,
    on: RetryOn {
        server_error: false,
        gateway_error: false,
        connect_failure: true,
        reset: true,
        statuses: Vec::new(),
        grpc_statuses: Vec::new(),
    },
    backoff: Duration::ZERO,
    non_idempotent: false,
};

/// Default base backoff between tries.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

impl RetryPolicy {
    /// From a ResiliencePolicy's `retries`. With no `on`, `connect-failure`, `reset` and
    /// `gateway-error` (and gRPC `unavailable`) are retried.
    pub fn from_settings(r: &RetrySettings) -> RetryPolicy {
        let mut on = RetryOn::default();
        let conditions: Vec<&str> = if r.on.is_empty() {
            vec!["connect-failure", "reset", "gateway-error", "unavailable"]
        } else {
            r.on.iter().map(String::as_str).collect()
        };
        for c in conditions {
            match c {
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "connect-failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                other => {
                    if let Ok(code) = other.parse::<u16>() {
                        on.statuses.push(code);
                    } else if let Some(code) = GrpcCode::Name(other.into()).code() {
                        on.grpc_statuses.push(code);
                    }
                }
            }
        }
        RetryPolicy {
            attempts: r.attempts.max(1),
            per_try_timeout: r.per_try_timeout.map(|d| d.0).filter(|d| !d.is_zero()),
            on,
            backoff: r.backoff.map(|d| d.0).unwrap_or(DEFAULT_BACKOFF),
            non_idempotent: r.retry_non_idempotent.unwrap_or(false),
        }
    }

    /// From a route's `retry` (Gateway API): `attempts` counts retries, so tries = attempts + 1;
    /// connection failures are always retried.
    pub fn from_route(codes: Vec<u16>, grpc_codes: Vec<u16>, attempts: Option<u32>, backoff: Option<Duration>) -> Self {
        RetryPolicy {
            attempts: attempts.unwrap_or(1) + 1,
            per_try_timeout: None,
            on: RetryOn { connect_failure: true, statuses: codes, grpc_statuses: grpc_codes, ..RetryOn::default() },
            backoff: backoff.unwrap_or(DEFAULT_BACKOFF),
            non_idempotent: false,
        }
    }

    /// Whether an HTTP status (and gRPC status, when the answer is gRPC) is worth another try.
    /// The gRPC status is asked for only when this policy retries on one (reading it is a
    /// header lookup per response).
    pub fn retries_status(&self, status: u16, grpc_status: impl FnOnce() -> Option<u16>) -> bool {
        (self.on.server_error && (500..=599).contains(&status))
            || (self.on.gateway_error && matches!(status, 502..=504))
            || self.on.statuses.contains(&status)
            || (!self.on.grpc_statuses.is_empty() && grpc_status().is_some_and(|g| self.on.grpc_statuses.contains(&g)))
    }

    /// The wait before try `n` (n ≥ 2): exponential from `backoff`, capped at 10×, full jitter
    /// (`roll` in [0, 1)).
    pub fn backoff_before(&self, n: u32, roll: f64) -> Duration {
        let exp = self.backoff.saturating_mul(1u32 << (n.saturating_sub(2)).min(16));
        let cap = exp.min(self.backoff.saturating_mul(10));
        cap.mul_f64(roll.clamp(0.0, 1.0))
    }
}

/// Retries allowed over a sliding `ttl`: `ratio` × requests + `min_per_second` × ttl.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    pub ratio: f64,
    pub min_per_second: u32,
    #[serde(with = "crate::route::duration_str")]
    pub ttl: Duration,
}

/// Passive health checking parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive gateway failures (connection failures, 502, 503, 504) that eject; 0: off.
    pub consecutive_failures: u32,
    /// Consecutive 5xx answers (and connection failures) that eject; 0: off (the default).
    #[serde(rename = "consecutive5xx")]
    pub consecutive_5xx: u32,
    #[serde(with = "crate::route::duration_str")]
    pub interval: Duration,
    #[serde(with = "crate::route::duration_str")]
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

/// Circuit-breaking limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    pub max_pending_requests: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

/// Where a ring-hash key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    Header(String),
    Cookie(String),
    QueryParam(String),
    SourceIp,
}

impl ClientPolicy {
    /// Compiles a ResiliencePolicy's settings over the defaults.
    pub fn from_spec(source: String, spec: &ResiliencePolicySpec) -> ClientPolicy {
        let mut p = ClientPolicy { source: Some(source), ..ClientPolicy::default() };
        if let Some(t) = &spec.timeouts {
            let nz = |d: Option<crate::duration::Dur>| d.map(|d| d.0).filter(|d| !d.is_zero());
            p.connect_timeout = nz(t.connect);
            p.request_timeout = nz(t.request);
            p.idle_timeout = nz(t.idle);
            if let Some(w) = t.endpoint_wait {
                p.endpoint_wait = w.0;
            }
        }
        p.retry = spec.retries.as_ref().map(RetryPolicy::from_settings);
        if let Some(b) = &spec.retry_budget {
            p.retry_budget = RetryBudget {
                ratio: b.ratio.unwrap_or(DEFAULT_BUDGET.ratio),
                min_per_second: b.min_per_second.unwrap_or(DEFAULT_BUDGET.min_per_second),
                ttl: b.ttl.map(|d| d.0).unwrap_or(DEFAULT_BUDGET.ttl),
            };
        }
        if let Some(o) = &spec.outlier_detection {
            p.outlier_detection = OutlierDetection {
                consecutive_failures: o.consecutive_failures.unwrap_or(DEFAULT_OUTLIER.consecutive_failures),
                consecutive_5xx: o.consecutive_5xx.unwrap_or(DEFAULT_OUTLIER.consecutive_5xx),
                interval: o.interval.map(|d| d.0).unwrap_or(DEFAULT_OUTLIER.interval),
                base_ejection_time: o.base_ejection_time.map(|d| d.0).unwrap_or(DEFAULT_OUTLIER.base_ejection_time),
                max_ejection_percent: o.max_ejection_percent.unwrap_or(DEFAULT_OUTLIER.max_ejection_percent),
            };
        }
        if let Some(c) = &spec.connection_limits {
            p.connection_limits = Some(ConnectionLimits {
                max_connections: c.max_connections,
                max_pending_requests: c.max_pending_requests.unwrap_or(1024),
                max_requests_per_connection: c.max_requests_per_connection,
            });
        }
        if let Some(lb) = &spec.load_balancer {
            p.load_balancer = lb.algorithm;
            p.load_balancer_set = true;
            p.hash_on = lb.hash_on.as_ref().and_then(|h| {
                if let Some(name) = &h.header {
                    Some(HashKey::Header(name.to_ascii_lowercase()))
                } else if let Some(name) = &h.cookie {
                    Some(HashKey::Cookie(name.clone()))
                } else if let Some(name) = &h.query_param {
                    Some(HashKey::QueryParam(name.clone()))
                } else if h.source_ip == Some(true) {
                    Some(HashKey::SourceIp)
                } else {
                    None
                }
            });
        }
        p
    }
}

/// A local rate limit at the destination sidecar.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// `namespace/name` of the RateLimitPolicy.
    pub policy: String,
    pub requests_per_second: u32,
    pub burst: u32,
    /// Separate buckets for sources, by SPIFFE identity.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateLimitOverride>,
}

/// A separate bucket for some sources.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitOverride {
    pub identities: Vec<String>,
    pub requests_per_second: u32,
    pub burst: u32,
}

impl RateLimit {
    pub fn from_spec(policy: String, namespace: &str, trust_domain: &str, spec: &RateLimitPolicySpec) -> RateLimit {
        let overrides = spec
            .overrides
            .iter()
            .map(|o| {
                let mut identities = o.identities.clone();
                identities.extend(o.service_accounts.iter().map(|sa| match sa.split_once('/') {
                    Some((ns, name)) => spiffe_id(trust_domain, ns, name),
                    None => spiffe_id(trust_domain, namespace, sa),
                }));
                RateLimitOverride {
                    identities,
                    requests_per_second: o.requests_per_second,
                    burst: o.burst.unwrap_or(o.requests_per_second),
                }
            })
            .collect();
        RateLimit {
            policy,
            requests_per_second: spec.requests_per_second,
            burst: spec.burst.unwrap_or(spec.requests_per_second),
            overrides,
        }
    }

    /// The bucket index for a source: `Some(i)` for override `i`, `None` for the shared one.
    pub fn override_for(&self, identity: Option<&str>) -> Option<usize> {
        let id = identity?;
        self.overrides.iter().position(|o| o.identities.iter().any(|i| i == id))
    }
}

/// A compiled FaultInjection.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// `namespace/name`.
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Delay `percent` of requests by `fixed`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultDelay {
    #[serde(with = "crate::route::duration_str")]
    pub fixed: Duration,
    pub percent: f64,
}

/// Answer `percent` of requests with an HTTP status or (for gRPC requests) a gRPC status.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u16>,
    pub percent: f64,
}

impl Fault {
    pub fn from_spec(name: String, spec: &FaultInjectionSpec) -> Fault {
        Fault {
            name,
            delay: spec.delay.as_ref().map(|d| FaultDelay { fixed: d.fixed.0, percent: d.percent.unwrap_or(100.0) }),
            abort: spec.abort.as_ref().map(|a| FaultAbort {
                http_status: a.http_status,
                grpc_status: a.grpc_status.as_ref().and_then(GrpcCode::code),
                percent: a.percent.unwrap_or(100.0),
            }),
        }
    }
}

/// Whether an event with probability `percent` happens, given `roll` uniform in [0, 1).
pub fn happens(percent: f64, roll: f64) -> bool {
    roll * 100.0 < percent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = RetryPolicy::from_route(vec![503], vec![], Some(5), Some(Duration::from_millis(100)));
        assert_eq!(r.attempts, 6);
        assert_eq!(r.backoff_before(2, 0.999_999).as_millis(), 99);
        assert_eq!(r.backoff_before(4, 0.999_999).as_millis(), 399);
        assert_eq!(r.backoff_before(12, 0.999_999).as_millis(), 999, "capped at 10x");
        assert!(r.retries_status(503, || None));
        assert!(!r.retries_status(500, || None));
    }

    #[test]
    fn percent_rolls() {
        assert!(happens(50.0, 0.49));
        assert!(!happens(50.0, 0.5));
        assert!(!happens(0.0, 0.0));
        assert!(happens(100.0, 0.999));
    }
}
