//! Tap: the live stream of requests a proxy sees, one [`TapEvent`] per request, and the
//! [`TapFilter`] that selects them.
//!
//! The same types serve every hop of the stream: a proxy's admin `/tap` filters its events
//! and writes them as JSON lines, the control plane's `/api/v1/tap` merges the streams of the
//! proxies a target names, and `plexus tap` / `plexus top` (and the dashboard) read them.

use serde::{Deserialize, Serialize};

/// One request as a proxy handled it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TapEvent {
    /// When the request arrived (RFC 3339, UTC).
    pub time: String,
    /// The workload whose proxy saw the request.
    pub proxy: String,
    /// `inbound` or `outbound`.
    pub direction: String,
    pub method: String,
    pub authority: String,
    /// The path, without the query.
    pub path: String,
    /// The HTTP status sent to the client.
    pub status: u16,
    /// The gRPC status, for gRPC requests that have one.
    #[serde(default)]
    pub grpc_status: Option<u16>,
    pub latency_ms: f64,
    pub source: TapPeer,
    pub destination: TapPeer,
    /// The route that matched (`default` when none did).
    pub route: String,
    /// Whether the hop was mutual TLS.
    pub tls: bool,
    /// Tries after the first.
    #[serde(default)]
    pub retries: u32,
    /// `-`, or the proxy's response flags (see the access log).
    pub flags: String,
    /// What the proxy decided on the way, in order: route and backend, faults, tries,
    /// authorization, rate limits.
    #[serde(default)]
    pub decisions: Vec<String>,
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub trace_id: String,
}

/// One end of a tapped request; unknown values are `unknown`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TapPeer {
    pub workload: String,
    pub service: String,
    pub principal: String,
    /// Destination only: the version that answered.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Destination only: the endpoint address the request was sent to.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
}

/// Which requests a tap shows. Every condition set must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TapFilter {
    /// Exact method, case-insensitive.
    pub method: Option<String>,
    /// Path prefix.
    pub path: Option<String>,
    pub status: Option<StatusFilter>,
    /// Substring of the source's workload, service or principal.
    pub source: Option<String>,
    /// Substring of the destination's service, workload or principal, or of the authority.
    pub destination: Option<String>,
    /// `inbound` or `outbound`.
    pub direction: Option<String>,
}

/// A status condition: one code (`503`) or a class (`5xx`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StatusFilter {
    Code(u16),
    Class(u16),
}

impl StatusFilter {
    /// Parses `503` or `5xx`.
    pub fn parse(s: &str) -> Result<StatusFilter, String> {
        let s = s.trim();
        let bad = || format!("status: expected a code like 503 or a class like 5xx, got {s:?}");
        if let Some(class) = s.strip_suffix("xx").or_else(|| s.strip_suffix("XX")) {
            return match class.parse::<u16>() {
                Ok(c @ 1..=5) => Ok(StatusFilter::Class(c)),
                _ => Err(bad()),
            };
        }
        match s.parse::<u16>() {
            Ok(c @ 100..=599) => Ok(StatusFilter::Code(c)),
            _ => Err(bad()),
        }
    }

    fn matches(self, status: u16) -> bool {
        match self {
            StatusFilter::Code(c) => status == c,
            StatusFilter::Class(c) => status / 100 == c,
        }
    }

    fn render(self) -> String {
        match self {
            StatusFilter::Code(c) => c.to_string(),
            StatusFilter::Class(c) => format!("{c}xx"),
        }
    }
}

/// The query parameters a [`TapFilter`] is made of, besides the target and `max`.
pub const FILTER_PARAMS: [&str; 6] = ["method", "path", "status", "source", "destination", "direction"];

impl TapFilter {
    /// Builds a filter from query parameters (`method`, `path`, `status`, `source`,
    /// `destination`, `direction`); unknown names are left to the caller. Empty values are
    /// no condition.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<TapFilter, String> {
        let mut f = TapFilter::default();
        for (name, value) in pairs {
            if value.is_empty() {
                continue;
            }
            let value = value.to_string();
            match name {
                "method" => f.method = Some(value.to_ascii_uppercase()),
                "path" => {
                    if !value.starts_with('/') {
                        return Err(format!("path: a prefix starting with '/', got {value:?}"));
                    }
                    f.path = Some(value)
                }
                "status" => f.status = Some(StatusFilter::parse(&value)?),
                "source" => f.source = Some(value),
                "destination" => f.destination = Some(value),
                "direction" => match value.as_str() {
                    "inbound" | "outbound" => f.direction = Some(value),
                    _ => return Err(format!("direction: inbound or outbound, got {value:?}")),
                },
                _ => {}
            }
        }
        Ok(f)
    }

    /// The filter as query parameters (what [`Self::from_pairs`] reads back).
    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut push = |k: &'static str, v: &Option<String>| {
            if let Some(v) = v {
                out.push((k, v.clone()));
            }
        };
        push("method", &self.method);
        push("path", &self.path);
        push("source", &self.source);
        push("destination", &self.destination);
        push("direction", &self.direction);
        if let Some(s) = self.status {
            out.push(("status", s.render()));
        }
        out
    }

    /// Whether `e` passes.
    pub fn matches(&self, e: &TapEvent) -> bool {
        let contains = |haystacks: &[&str], needle: &str| haystacks.iter().any(|h| h.contains(needle));
        self.method.as_deref().is_none_or(|m| e.method.eq_ignore_ascii_case(m))
            && self.path.as_deref().is_none_or(|p| e.path.starts_with(p))
            && self.status.is_none_or(|s| s.matches(e.status))
            && self.direction.as_deref().is_none_or(|d| e.direction == d)
            && self
                .source
                .as_deref()
                .is_none_or(|s| contains(&[&e.source.workload, &e.source.service, &e.source.principal], s))
            && self.destination.as_deref().is_none_or(|d| {
                let t = &e.destination;
                contains(&[&t.service, &t.workload, &t.principal, &e.authority], d)
            })
    }
}

/// What a tap target names: the proxies whose requests are shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapTarget {
    /// Every proxy of the mesh.
    All,
    /// The proxies of a Service's workloads (and, with a namespace, only in it).
    Service(String),
    /// One workload's proxy.
    Workload(String),
    /// Every proxy in a namespace.
    Namespace(String),
}

impl TapTarget {
    /// Parses `service/NAME`, `svc/NAME`, `workload/NAME`, `namespace/NAME`, `all`, or a bare
    /// NAME (a Service).
    pub fn parse(s: &str) -> Result<TapTarget, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("target: expected service/NAME, workload/NAME, namespace/NAME or all".into());
        }
        if s == "all" || s == "mesh" {
            return Ok(TapTarget::All);
        }
        let Some((kind, name)) = s.split_once('/') else {
            return Ok(TapTarget::Service(s.to_string()));
        };
        if name.is_empty() {
            return Err(format!("target {s:?}: missing name after '/'"));
        }
        let name = name.to_string();
        match kind.to_ascii_lowercase().as_str() {
            "service" | "services" | "svc" => Ok(TapTarget::Service(name)),
            "workload" | "workloads" | "wl" => Ok(TapTarget::Workload(name)),
            "namespace" | "namespaces" | "ns" => Ok(TapTarget::Namespace(name)),
            other => Err(format!("target {s:?}: unknown kind {other:?}; use service, workload or namespace")),
        }
    }

    /// Whether a proxy (its workload, service and namespace) is one of the target's.
    pub fn selects(&self, workload: &str, service: &str, namespace: &str) -> bool {
        match self {
            TapTarget::All => true,
            TapTarget::Service(s) => service == s,
            TapTarget::Workload(w) => workload == w,
            TapTarget::Namespace(n) => namespace == n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> TapEvent {
        TapEvent {
            time: "2026-01-01T00:00:00Z".into(),
            proxy: "productpage-v1".into(),
            direction: "outbound".into(),
            method: "GET".into(),
            authority: "reviews:9080".into(),
            path: "/reviews/0".into(),
            status: 503,
            grpc_status: None,
            latency_ms: 1.5,
            source: TapPeer { workload: "productpage-v1".into(), service: "productpage".into(), ..Default::default() },
            destination: TapPeer { service: "reviews".into(), workload: "reviews-v2".into(), ..Default::default() },
            route: "default".into(),
            tls: true,
            retries: 0,
            flags: "-".into(),
            decisions: vec![],
            request_id: String::new(),
            trace_id: String::new(),
        }
    }

    fn filter(pairs: &[(&str, &str)]) -> TapFilter {
        TapFilter::from_pairs(pairs.iter().copied()).expect("valid filter")
    }

    #[test]
    fn every_condition_must_hold() {
        let e = event();
        assert!(filter(&[]).matches(&e));
        assert!(filter(&[("method", "get"), ("path", "/reviews"), ("status", "5xx")]).matches(&e));
        assert!(filter(&[("status", "503"), ("source", "productpage"), ("destination", "reviews-v2")]).matches(&e));
        assert!(!filter(&[("method", "POST")]).matches(&e));
        assert!(!filter(&[("path", "/ratings")]).matches(&e));
        assert!(!filter(&[("status", "2xx")]).matches(&e));
        assert!(!filter(&[("direction", "inbound")]).matches(&e));
        assert!(!filter(&[("source", "reviews")]).matches(&e));
    }

    #[test]
    fn bad_filters_say_why() {
        for (pairs, says) in [
            (vec![("status", "6xx")], "status"),
            (vec![("status", "abc")], "status"),
            (vec![("path", "reviews")], "path"),
            (vec![("direction", "sideways")], "direction"),
        ] {
            let e = TapFilter::from_pairs(pairs).expect_err("invalid");
            assert!(e.starts_with(says), "{e}");
        }
    }

    #[test]
    fn filters_round_trip_through_query_pairs() {
        let f = filter(&[("method", "POST"), ("status", "4xx"), ("source", "x"), ("direction", "inbound")]);
        let pairs = f.to_pairs();
        let back = TapFilter::from_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str()))).expect("valid");
        assert_eq!(f, back);
    }

    #[test]
    fn targets() {
        assert_eq!(TapTarget::parse("reviews"), Ok(TapTarget::Service("reviews".into())));
        assert_eq!(TapTarget::parse("svc/reviews"), Ok(TapTarget::Service("reviews".into())));
        assert_eq!(TapTarget::parse("workload/reviews-v1"), Ok(TapTarget::Workload("reviews-v1".into())));
        assert_eq!(TapTarget::parse("ns/default"), Ok(TapTarget::Namespace("default".into())));
        assert_eq!(TapTarget::parse("all"), Ok(TapTarget::All));
        assert!(TapTarget::parse("pod/x").is_err());
        assert!(TapTarget::parse("service/").is_err());
        assert!(TapTarget::Service("reviews".into()).selects("reviews-v1", "reviews", "default"));
        assert!(!TapTarget::Workload("reviews-v1".into()).selects("reviews-v2", "reviews", "default"));
    }
}
