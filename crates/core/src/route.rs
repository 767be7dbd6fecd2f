//! HTTP routing: compiling HTTPRoutes into per-port tables ordered by Gateway API precedence,
//! and matching a request against them (pure; the proxy and `plexus explain` share it).

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::time::Duration;

use http::HeaderMap;
use regex::Regex;
use serde::{Serialize, Serializer};

use crate::duration;
use crate::model::CompiledService;
use crate::names::ServiceName;
use crate::resource::{HeaderModifier, HttpRouteMatch, HttpValueMatch, PathMatchType, Resource, Spec, ValueMatchType};

/// The parts of a request routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// A compiled condition set (one `matches[]` entry).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Matcher {
    pub path: PathMatcher,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatcher>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatcher>,
}

/// A compiled path condition.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathMatcher {
    Exact(String),
    PathPrefix(String),
    RegularExpression(#[serde(serialize_with = "ser_regex")] Regex),
}

/// A compiled header or query condition.
#[derive(Debug, Clone, Serialize)]
pub struct ValueMatcher {
    pub name: String,
    pub value: ValuePattern,
}

/// Exact value or anchored regular expression.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum ValuePattern {
    Exact(String),
    RegularExpression(#[serde(serialize_with = "ser_regex")] Regex),
}

fn ser_regex<S: Serializer>(r: &Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(r.as_str())
}

impl ValuePattern {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValuePattern::Exact(e) => e == v,
            ValuePattern::RegularExpression(r) => r.is_match(v),
        }
    }
}

impl Matcher {
    /// Whether the request satisfies every condition.
    pub fn matches(&self, req: &RequestInfo<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatcher::Exact(p) => req.path == p,
            PathMatcher::PathPrefix(p) => {
                p == "/"
                    || req.path == p
                    || (req.path.starts_with(p.as_str()) && req.path.as_bytes().get(p.len()) == Some(&b'/'))
            }
            PathMatcher::RegularExpression(r) => r.is_match(req.path),
        };
        path_ok
            && self.method.as_deref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|h| {
                req.headers.get_all(h.name.as_str()).iter().any(|v| v.to_str().is_ok_and(|v| h.value.matches(v)))
            })
            && self.query_params.iter().all(|q| {
                req.query
                    .unwrap_or("")
                    .split('&')
                    .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                    .any(|(k, v)| k == q.name && q.value.matches(v))
            })
    }

    /// Gateway API precedence: exact path, then regular expression (implementation-specific in
    /// the Gateway API; placed before prefixes as Envoy Gateway does, so a catch-all `/` never
    /// hides a regex), then longest prefix, method, most headers, most query params.
    /// Lower sorts first.
    fn precedence(&self) -> (u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>) {
        let (kind, len) = match &self.path {
            PathMatcher::Exact(p) => (0, p.len()),
            PathMatcher::RegularExpression(r) => (1, r.as_str().len()),
            PathMatcher::PathPrefix(p) => (2, p.len()),
        };
        (kind, Reverse(len), self.method.is_none(), Reverse(self.headers.len()), Reverse(self.query_params.len()))
    }
}

/// A weighted destination of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub service: ServiceName,
    pub port: Option<u16>,
    pub weight: u32,
}

/// One routable entry: a rule's match with what to do with matching requests.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteEntry {
    /// `namespace/name` of the HTTPRoute.
    pub route: String,
    pub rule: usize,
    pub matcher: Matcher,
    pub backends: Vec<Backend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub request_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub backend_request_timeout: Option<Duration>,
}

mod opt_duration {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&crate::duration::format(*d)),
            None => s.serialize_none(),
        }
    }
}

impl RouteEntry {
    /// Picks a backend given `roll`, a uniformly random number; `None` when every weight is 0.
    pub fn pick_backend(&self, roll: u64) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut point = roll % total;
        for b in &self.backends {
            let w = u64::from(b.weight);
            if point < w {
                return Some(b);
            }
            point -= w;
        }
        None
    }
}

/// The routes of one Service port, in precedence order.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct RouteTable {
    pub entries: Vec<RouteEntry>,
}

impl RouteTable {
    /// The first entry (by precedence) whose conditions the request satisfies.
    pub fn find(&self, req: &RequestInfo<'_>) -> Option<&RouteEntry> {
        self.entries.iter().find(|e| e.matcher.matches(req))
    }

    /// Whether any route is attached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Attaches every HTTPRoute to the Service ports its parentRefs name, ordered by precedence
    /// (ties: older route, then `namespace/name`, then rule and match order).
    pub(crate) fn attach_all(resources: &[Resource], services: &mut BTreeMap<ServiceName, CompiledService>) {
        let mut staged: BTreeMap<(ServiceName, u16), Vec<Staged>> = BTreeMap::new();
        for r in resources {
            let Spec::HttpRoute(spec) = &r.spec else { continue };
            let ns = r.metadata.namespace();
            let route = r.key();
            let created = r.metadata.creation_timestamp.clone().unwrap_or_default();
            for (ri, rule) in spec.rules.iter().enumerate() {
                let backends: Vec<Backend> = rule
                    .backend_refs
                    .iter()
                    .map(|b| Backend {
                        service: ServiceName::new(&b.name, b.namespace.as_deref().unwrap_or(ns)),
                        port: b.port,
                        weight: b.weight,
                    })
                    .collect();
                let timeouts = rule.timeouts.as_ref();
                let parse = |v: Option<&String>| v.and_then(|v| duration::parse(v).ok()).filter(|d| !d.is_zero());
                let header_filter = |t: &str| {
                    rule.filters.iter().filter(|f| f.filter_type == t).find_map(|f| {
                        if t == "RequestHeaderModifier" {
                            f.request_header_modifier.clone()
                        } else {
                            f.response_header_modifier.clone()
                        }
                    })
                };
                let default_match = [HttpRouteMatch::default()];
                let matches: &[HttpRouteMatch] = if rule.matches.is_empty() { &default_match } else { &rule.matches };
                for (mi, m) in matches.iter().enumerate() {
                    let Some(matcher) = compile_match(m) else { continue };
                    let entry = RouteEntry {
                        route: route.clone(),
                        rule: ri,
                        matcher,
                        backends: backends.clone(),
                        request_headers: header_filter("RequestHeaderModifier"),
                        response_headers: header_filter("ResponseHeaderModifier"),
                        request_timeout: parse(timeouts.and_then(|t| t.request.as_ref())),
                        backend_request_timeout: parse(timeouts.and_then(|t| t.backend_request.as_ref())),
                    };
                    for parent in &spec.parent_refs {
                        let parent_name = ServiceName::new(&parent.name, parent.namespace.as_deref().unwrap_or(ns));
                        let Some(service) = services.get(&parent_name) else { continue };
                        for port in service.ports.iter().filter(|p| parent.port.is_none_or(|pp| pp == p.port)) {
                            staged.entry((parent_name.clone(), port.port)).or_default().push((
                                entry.clone(),
                                created.clone(),
                                mi,
                            ));
                        }
                    }
                }
            }
        }
        for ((name, port), mut entries) in staged {
            entries.sort_by(|(a, ca, ma), (b, cb, mb)| {
                a.matcher
                    .precedence()
                    .cmp(&b.matcher.precedence())
                    .then(ca.cmp(cb))
                    .then(a.route.cmp(&b.route))
                    .then(a.rule.cmp(&b.rule))
                    .then(ma.cmp(mb))
            });
            if let Some(p) = services.get_mut(&name).and_then(|s| s.ports.iter_mut().find(|p| p.port == port)) {
                p.routes.entries = entries.into_iter().map(|(e, _, _)| e).collect();
            }
        }
    }
}

/// A route entry waiting to be ordered: with its route's creation time and match index.
type Staged = (RouteEntry, String, usize);

fn anchored(pattern: &str) -> Option<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).ok()
}

fn compile_value(v: &HttpValueMatch, lowercase_name: bool) -> Option<ValueMatcher> {
    let value = match v.match_type {
        ValueMatchType::Exact => ValuePattern::Exact(v.value.clone()),
        ValueMatchType::RegularExpression => ValuePattern::RegularExpression(anchored(&v.value)?),
    };
    let name = if lowercase_name { v.name.to_ascii_lowercase() } else { v.name.clone() };
    Some(ValueMatcher { name, value })
}

fn compile_match(m: &HttpRouteMatch) -> Option<Matcher> {
    let path = match &m.path {
        None => PathMatcher::PathPrefix("/".into()),
        Some(p) => match p.match_type {
            PathMatchType::Exact => PathMatcher::Exact(p.value.clone()),
            PathMatchType::PathPrefix => {
                let trimmed = p.value.trim_end_matches('/');
                PathMatcher::PathPrefix(if trimmed.is_empty() { "/".into() } else { trimmed.into() })
            }
            PathMatchType::RegularExpression => PathMatcher::RegularExpression(anchored(&p.value)?),
        },
    };
    Some(Matcher {
        path,
        method: m.method.clone(),
        headers: m.headers.iter().map(|h| compile_value(h, true)).collect::<Option<_>>()?,
        query_params: m.query_params.iter().map(|q| compile_value(q, false)).collect::<Option<_>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::parse_documents;
    use crate::model::MeshSnapshot;

    const ROUTES: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {ports: [{port: 9080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-route}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api/}}]
    backendRefs: [{name: reviews-v2, weight: 80}, {name: reviews-v3, weight: 20}]
  - matches: [{headers: [{name: End-User, value: jason}]}]
    backendRefs: [{name: reviews-v3}]
    timeouts: {request: 3s}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-route}
spec:
  parentRefs: [{name: reviews}]
  rules:
  - matches: [{path: {type: Exact, value: /api/health}}, {path: {type: RegularExpression, value: "/v[0-9]+/.*"}, method: POST}]
    backendRefs: [{name: health}]
  - matches: [{queryParams: [{name: debug, value: "1"}]}]
    backendRefs: [{name: debug, weight: 0}]
"#;

    fn table() -> RouteTable {
        let snap = MeshSnapshot::compile(&parse_documents("r", ROUTES).expect("valid"), "1");
        snap.resolve_authority("reviews:9080").expect("service").1.routes.clone()
    }

    fn find(
        t: &RouteTable,
        method: &str,
        path: &str,
        query: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (String, usize) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(http::HeaderName::from_bytes(k.as_bytes()).expect("name"), v.parse().expect("value"));
        }
        let e = t.find(&RequestInfo { method, path, query, headers: &map }).expect("a route matches");
        (e.route.clone(), e.rule)
    }

    #[test]
    fn precedence_follows_the_gateway_api() {
        let t = table();
        assert_eq!(find(&t, "GET", "/api/health", None, &[]), ("default/a-route".into(), 0), "exact wins");
        assert_eq!(
            find(&t, "GET", "/api/x", None, &[("end-user", "jason")]),
            ("default/b-route".into(), 1),
            "longer prefix wins over headers"
        );
        assert_eq!(
            find(&t, "GET", "/x", None, &[("end-user", "jason")]),
            ("default/b-route".into(), 2),
            "headers beat a bare prefix"
        );
        assert_eq!(
            find(&t, "GET", "/x", Some("a=2&debug=1"), &[]),
            ("default/a-route".into(), 1),
            "query params beat a bare prefix"
        );
        assert_eq!(find(&t, "GET", "/x", None, &[]), ("default/b-route".into(), 0));
        assert_eq!(
            find(&t, "GET", "/apix", None, &[]),
            ("default/b-route".into(), 0),
            "prefix matches whole segments only"
        );
        assert_eq!(find(&t, "POST", "/v2/a", None, &[]), ("default/a-route".into(), 0), "regex + method");
        assert_eq!(find(&t, "GET", "/v2/a", None, &[]), ("default/b-route".into(), 0), "method must match");
    }

    #[test]
    fn weighted_pick_and_timeouts() {
        let t = table();
        let entry = t.entries.iter().find(|e| e.backends.len() == 2).expect("split rule");
        let picks: Vec<&str> =
            (0..100).map(|roll| entry.pick_backend(roll).expect("backend").service.name.as_str()).collect();
        assert_eq!(picks.iter().filter(|n| **n == "reviews-v2").count(), 80);
        let zero =
            t.entries.iter().find(|e| e.backends.first().is_some_and(|b| b.weight == 0)).expect("zero-weight rule");
        assert!(zero.pick_backend(7).is_none());
        let jason = t.entries.iter().find(|e| !e.matcher.headers.is_empty()).expect("header rule");
        assert_eq!(jason.request_timeout, Some(Duration::from_secs(3)));
    }
}
