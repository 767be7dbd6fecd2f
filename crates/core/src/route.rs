//! HTTP routing: compiling HTTPRoutes into per-port tables ordered by Gateway API precedence,
//! and matching a request against them (pure; the proxy and `plexus explain` share it).

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use regex::Regex;
use serde::{Serialize, Serializer};

use crate::model::CompiledService;
use crate::names::ServiceName;
use crate::policy::{Fault, RetryPolicy};
use crate::resource::{
    BackendRef, FilterType, GrpcRouteMatch, HeaderModifier, HttpRouteFilter, HttpRouteMatch, HttpRouteTimeouts,
    HttpValueMatch, PathMatchType, PathModifier, PathModifierType, Resource, Spec, ValueMatchType,
};

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

/// A header's value as header matches see it: a header sent more than once is its values
/// joined with `,` in the order received (RFC 9110 §5.3; what Envoy matches, and what the
/// Gateway API points to), so a match on `x-role: admin` does not match a request carrying
/// `x-role: user` and `x-role: admin`. `None` when absent or not visible ASCII. Borrowed
/// unless repeated.
pub fn header_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<std::borrow::Cow<'h, str>> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?.to_str().ok()?;
    let Some(second) = all.next() else { return Some(std::borrow::Cow::Borrowed(first)) };
    let mut joined = format!("{first},{}", second.to_str().ok()?);
    for v in all {
        joined.push(',');
        joined.push_str(v.to_str().ok()?);
    }
    Some(std::borrow::Cow::Owned(joined))
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
            && self.headers.iter().all(|h| header_value(req.headers, &h.name).is_some_and(|v| h.value.matches(&v)))
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
    fn precedence(&self) -> Precedence {
        let (kind, len) = match &self.path {
            PathMatcher::Exact(p) => (0, p.len()),
            PathMatcher::RegularExpression(r) => (1, r.as_str().len()),
            PathMatcher::PathPrefix(p) => (2, p.len()),
        };
        Precedence::Http(
            kind,
            Reverse(len),
            self.method.is_none(),
            Reverse(self.headers.len()),
            Reverse(self.query_params.len()),
        )
    }
}

/// The sort key of a match (lower first). HTTPRoute and SMI matches rank by [`Matcher`]'s path,
/// method, headers and query params; GRPCRoute matches by the GRPCRoute rules instead: most
/// characters of the service, then of the method, then most header matches — so a
/// service-wide match beats a method-only one (both compile to path matchers, whose HTTP
/// ranking would put the method-only regular expression first). The Gateway API does not
/// merge the two kinds; should both attach to one port, HTTP matches come first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Precedence {
    Http(u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>),
    Grpc(Reverse<usize>, Reverse<usize>, Reverse<usize>),
}

/// A compiled match with its sort key.
type Ranked = (Matcher, Precedence);

fn ranked(m: Matcher) -> Ranked {
    let p = m.precedence();
    (m, p)
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
    /// `namespace/name` of the HTTPRoute, GRPCRoute or TrafficSplit (shared: the proxy's
    /// `route` label value on every request it matches).
    pub route: Arc<str>,
    pub rule: usize,
    pub matcher: Matcher,
    pub backends: Vec<Backend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    /// FaultInjections named by ExtensionRef filters, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<FaultRef>,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub request_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_duration")]
    pub backend_request_timeout: Option<Duration>,
    /// The rule's own `retry`, which replaces the Service's ResiliencePolicy retries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

/// `RequestRedirect`, compiled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathChange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub status: u16,
}

/// `URLRewrite`, compiled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathChange>,
}

/// A path change of a redirect or rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathChange {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

/// `RequestMirror`, compiled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mirror {
    pub service: ServiceName,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub percent: f64,
}

/// An ExtensionRef to a FaultInjection; `fault` is `None` when it does not exist (the rule then
/// answers 500, as the Gateway API asks for invalid filters).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultRef {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

pub(crate) mod opt_duration {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&crate::duration::format(*d)),
            None => s.serialize_none(),
        }
    }
}

pub(crate) mod duration_str {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::duration::format(*d))
    }
}

/// Applies a path change: `matched_prefix` is the PathPrefix the rule matched (`/` when none).
pub fn change_path(change: &PathChange, path: &str, matched_prefix: &str) -> String {
    match change {
        PathChange::ReplaceFullPath(p) => p.clone(),
        PathChange::ReplacePrefixMatch(replacement) => {
            // What follows the matched prefix: nothing, or `/…` (prefixes match whole segments).
            let rest = match matched_prefix {
                "/" if path == "/" => "",
                "/" => path,
                p => path.get(p.len()..).unwrap_or(""),
            };
            if rest.is_empty() {
                return if replacement.is_empty() { "/".into() } else { replacement.clone() };
            }
            // A trailing `/` after the prefix is kept (the Gateway API's table: `/foo/` with
            // prefix `/foo` and replacement `/xyz` becomes `/xyz/`).
            format!("{}/{}", replacement.trim_end_matches('/'), rest.trim_start_matches('/'))
        }
    }
}

impl Matcher {
    /// The prefix a PathPrefix matcher matched (for ReplacePrefixMatch), `/` otherwise.
    pub fn prefix(&self) -> &str {
        match &self.path {
            PathMatcher::PathPrefix(p) => p,
            _ => "/",
        }
    }
}

impl Redirect {
    /// The `Location` of the redirect for a request with this scheme, host, port and path
    /// (and query, kept as is). The port is dropped when it is the scheme's default.
    pub fn location(&self, scheme: &str, host: &str, port: Option<u16>, path_and_query: &str, prefix: &str) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(scheme);
        let host = self.hostname.as_deref().unwrap_or(host);
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let path = self.path.as_ref().map(|c| change_path(c, path, prefix)).unwrap_or_else(|| path.to_string());
        // Gateway API: a scheme change without a port drops the port (the new scheme's default).
        let port = match (self.port, &self.scheme) {
            (Some(p), _) => Some(p),
            (None, Some(_)) => None,
            (None, None) => port,
        };
        let default_port = if scheme == "https" { 443 } else { 80 };
        let port = port.filter(|p| *p != default_port).map(|p| format!(":{p}")).unwrap_or_default();
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        format!("{scheme}://{host}{port}{path}{query}")
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

    /// Attaches every HTTPRoute, GRPCRoute and TrafficSplit to the Service ports they name,
    /// ordered by precedence (ties: older route, then `namespace/name`, then rule and match
    /// order). Routes attached to Gateways are left to [`crate::gateway`].
    pub(crate) fn attach_all(resources: &[Resource], services: &mut BTreeMap<ServiceName, CompiledService>) {
        let tables = build_tables(resources, |_, parent, _| {
            let Parent::Service { name, port: parent_port } = parent else { return Vec::new() };
            let Some(service) = services.get(name) else { return Vec::new() };
            service
                .ports
                .iter()
                .filter(|p| parent_port.is_none_or(|pp| pp == p.port))
                .map(|p| (name.clone(), p.port))
                .collect()
        });
        for ((name, port), table) in tables {
            if let Some(p) = services.get_mut(&name).and_then(|s| s.ports.iter_mut().find(|p| p.port == port)) {
                p.routes = table;
            }
        }
    }
}

/// What a route attaches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parent {
    /// A mesh Service (GAMMA), all its ports or one.
    Service { name: ServiceName, port: Option<u16> },
    /// A Gateway's listeners: all of them, or those with this name and/or port.
    Gateway { name: ServiceName, section: Option<String>, port: Option<u16> },
}

/// Whether a `parentRefs` entry names a Gateway (`kind: Gateway`); absent kind means Service.
pub fn parent_is_gateway(p: &crate::resource::ParentRef) -> bool {
    p.kind.as_deref() == Some("Gateway")
}

/// Compiles every route once and files each of its entries in the tables `place` names for
/// each of its parents (given the route, the parent and the route's hostnames); returns the
/// tables, each ordered by precedence (ties: older route, then `namespace/name`, then rule
/// and match order). The one route compiler: mesh Service ports and Gateway listeners alike.
pub(crate) fn build_tables<K: Ord + Clone>(
    resources: &[Resource],
    mut place: impl FnMut(&Resource, &Parent, &[String]) -> Vec<K>,
) -> BTreeMap<K, RouteTable> {
    let lookup = Lookup::new(resources);
    let mut staged: BTreeMap<K, Vec<Staged>> = BTreeMap::new();
    for r in resources {
        let Some(route) = RouteSource::of(r, &lookup) else { continue };
        let keys: Vec<K> = route.parents.iter().flat_map(|p| place(r, p, &route.hostnames)).collect();
        if keys.is_empty() {
            continue;
        }
        let created = r.metadata.creation_timestamp.clone().unwrap_or_default();
        for (ri, rule) in route.rules.into_iter().enumerate() {
            for (mi, (matcher, rank)) in rule.matchers.iter().enumerate() {
                let entry = RouteEntry { matcher: matcher.clone(), rule: ri, ..rule.template.clone() };
                for key in &keys {
                    staged.entry(key.clone()).or_default().push((entry.clone(), rank.clone(), created.clone(), mi));
                }
            }
        }
    }
    staged
        .into_iter()
        .map(|(key, mut entries)| {
            entries.sort_by(|(a, pa, ca, ma), (b, pb, cb, mb)| {
                pa.cmp(pb).then(ca.cmp(cb)).then(a.route.cmp(&b.route)).then(a.rule.cmp(&b.rule)).then(ma.cmp(mb))
            });
            (key, RouteTable { entries: entries.into_iter().map(|(e, _, _, _)| e).collect() })
        })
        .collect()
}

/// A route entry waiting to be ordered: with its match's rank, its route's creation time and
/// its match index.
type Staged = (RouteEntry, Precedence, String, usize);

/// Resources routes refer to by name: FaultInjections and HTTPRouteGroups.
struct Lookup<'a> {
    faults: BTreeMap<String, &'a crate::resource::FaultInjectionSpec>,
    groups: BTreeMap<String, &'a crate::resource::HttpRouteGroupSpec>,
}

impl<'a> Lookup<'a> {
    fn new(resources: &'a [Resource]) -> Self {
        let mut faults = BTreeMap::new();
        let mut groups = BTreeMap::new();
        for r in resources {
            match &r.spec {
                Spec::FaultInjection(f) => {
                    faults.insert(r.key(), f);
                }
                Spec::HttpRouteGroup(g) => {
                    groups.insert(r.key(), g);
                }
                _ => {}
            }
        }
        Lookup { faults, groups }
    }
}

/// Any route kind, reduced to parents and rules of (matchers, what to do).
struct RouteSource {
    parents: Vec<Parent>,
    /// The route's `hostnames` (Gateway listeners intersect them with their own).
    hostnames: Vec<String>,
    rules: Vec<CompiledRule>,
}

struct CompiledRule {
    matchers: Vec<Ranked>,
    template: RouteEntry,
}

impl RouteSource {
    fn of(r: &Resource, lookup: &Lookup<'_>) -> Option<RouteSource> {
        let ns = r.metadata.namespace();
        let route = r.key();
        let parents_of = |refs: &[crate::resource::ParentRef]| {
            refs.iter()
                .map(|p| {
                    let name = ServiceName::new(&p.name, p.namespace.as_deref().unwrap_or(ns));
                    if parent_is_gateway(p) {
                        Parent::Gateway { name, section: p.section_name.clone(), port: p.port }
                    } else {
                        Parent::Service { name, port: p.port }
                    }
                })
                .collect::<Vec<_>>()
        };
        match &r.spec {
            Spec::HttpRoute(spec) => Some(RouteSource {
                parents: parents_of(&spec.parent_refs),
                hostnames: spec.hostnames.clone(),
                rules: spec
                    .rules
                    .iter()
                    .map(|rule| {
                        let default_match = [HttpRouteMatch::default()];
                        let matches = if rule.matches.is_empty() { &default_match[..] } else { &rule.matches };
                        let mut template = template(&route, ns, &rule.backend_refs, &rule.filters, lookup);
                        timeouts(&mut template, rule.timeouts.as_ref());
                        template.retry = rule.retry.as_ref().map(|rt| {
                            RetryPolicy::from_route(rt.codes.clone(), Vec::new(), rt.attempts, rt.backoff.map(|d| d.0))
                        });
                        CompiledRule {
                            matchers: matches.iter().filter_map(compile_match).map(ranked).collect(),
                            template,
                        }
                    })
                    .collect(),
            }),
            Spec::GrpcRoute(spec) => Some(RouteSource {
                parents: parents_of(&spec.parent_refs),
                hostnames: spec.hostnames.clone(),
                rules: spec
                    .rules
                    .iter()
                    .map(|rule| {
                        let default_match = [GrpcRouteMatch::default()];
                        let matches = if rule.matches.is_empty() { &default_match[..] } else { &rule.matches };
                        let mut template = template(&route, ns, &rule.backend_refs, &rule.filters, lookup);
                        timeouts(&mut template, rule.timeouts.as_ref());
                        template.retry = rule.retry.as_ref().map(|rt| {
                            let codes = rt.codes.iter().filter_map(|c| c.code()).collect();
                            RetryPolicy::from_route(Vec::new(), codes, rt.attempts, rt.backoff.map(|d| d.0))
                        });
                        let matchers =
                            matches.iter().filter_map(|m| Some((compile_grpc_match(m)?, grpc_precedence(m)))).collect();
                        CompiledRule { matchers, template }
                    })
                    .collect(),
            }),
            Spec::TrafficSplit(spec) => {
                let backends: Vec<BackendRef> = spec
                    .backends
                    .iter()
                    .map(|b| BackendRef { name: b.service.clone(), weight: b.weight, ..BackendRef::default() })
                    .collect();
                let template = template(&route, ns, &backends, &[], lookup);
                let matchers = if spec.matches.is_empty() {
                    vec![ranked(compile_match(&HttpRouteMatch::default())?)]
                } else {
                    let mut out = Vec::new();
                    for m in &spec.matches {
                        // A missing group contributes nothing (reported by `check`).
                        let Some(group) = lookup.groups.get(&format!("{ns}/{}", m.name)) else { continue };
                        for hm in group.matches.iter().filter(|hm| m.matches.is_empty() || m.matches.contains(&hm.name))
                        {
                            out.extend(compile_smi_match(hm).into_iter().map(ranked));
                        }
                    }
                    out
                };
                Some(RouteSource {
                    parents: vec![Parent::Service { name: ServiceName::new(&spec.service, ns), port: None }],
                    hostnames: Vec::new(),
                    rules: vec![CompiledRule { matchers, template }],
                })
            }
            _ => None,
        }
    }
}

fn timeouts(entry: &mut RouteEntry, t: Option<&HttpRouteTimeouts>) {
    let nz = |d: Option<crate::duration::Dur>| d.map(|d| d.0).filter(|d| !d.is_zero());
    entry.request_timeout = nz(t.and_then(|t| t.request));
    entry.backend_request_timeout = nz(t.and_then(|t| t.backend_request));
}

fn path_change(m: &PathModifier) -> Option<PathChange> {
    match m.modifier_type {
        PathModifierType::ReplaceFullPath => m.replace_full_path.clone().map(PathChange::ReplaceFullPath),
        PathModifierType::ReplacePrefixMatch => m.replace_prefix_match.clone().map(PathChange::ReplacePrefixMatch),
    }
}

/// What a rule does, without its matchers.
fn template(
    route: &str,
    ns: &str,
    backend_refs: &[BackendRef],
    filters: &[HttpRouteFilter],
    lookup: &Lookup<'_>,
) -> RouteEntry {
    let mut entry = RouteEntry {
        route: route.into(),
        rule: 0,
        matcher: Matcher {
            path: PathMatcher::PathPrefix("/".into()),
            method: None,
            headers: Vec::new(),
            query_params: Vec::new(),
        },
        backends: backend_refs
            .iter()
            .map(|b| Backend {
                service: ServiceName::new(&b.name, b.namespace.as_deref().unwrap_or(ns)),
                port: b.port,
                weight: b.weight,
            })
            .collect(),
        request_headers: None,
        response_headers: None,
        redirect: None,
        rewrite: None,
        mirrors: Vec::new(),
        faults: Vec::new(),
        request_timeout: None,
        backend_request_timeout: None,
        retry: None,
    };
    for f in filters {
        match f.filter_type {
            FilterType::RequestHeaderModifier => entry.request_headers = f.request_header_modifier.clone(),
            FilterType::ResponseHeaderModifier => entry.response_headers = f.response_header_modifier.clone(),
            FilterType::RequestRedirect => {
                entry.redirect = f.request_redirect.as_ref().map(|r| Redirect {
                    scheme: r.scheme.clone(),
                    hostname: r.hostname.clone(),
                    path: r.path.as_ref().and_then(path_change),
                    port: r.port,
                    status: r.status_code.unwrap_or(302),
                })
            }
            FilterType::UrlRewrite => {
                entry.rewrite = f
                    .url_rewrite
                    .as_ref()
                    .map(|r| Rewrite { hostname: r.hostname.clone(), path: r.path.as_ref().and_then(path_change) })
            }
            FilterType::RequestMirror => {
                if let Some(m) = &f.request_mirror {
                    let percent = match (m.percent, m.fraction) {
                        (Some(p), _) => f64::from(p),
                        (None, Some(fr)) if fr.denominator > 0 => {
                            100.0 * f64::from(fr.numerator) / f64::from(fr.denominator)
                        }
                        _ => 100.0,
                    };
                    entry.mirrors.push(Mirror {
                        service: ServiceName::new(
                            &m.backend_ref.name,
                            m.backend_ref.namespace.as_deref().unwrap_or(ns),
                        ),
                        port: m.backend_ref.port,
                        percent,
                    });
                }
            }
            FilterType::ExtensionRef => {
                if let Some(e) = &f.extension_ref {
                    let name = format!("{ns}/{}", e.name);
                    let fault = lookup.faults.get(&name).map(|spec| Fault::from_spec(name.clone(), spec));
                    entry.faults.push(FaultRef { name, fault });
                }
            }
        }
    }
    entry
}

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

/// The rank of a GRPCRoute match: characters of its service, then of its method, then its
/// header matches (for regular expressions, the pattern's characters).
fn grpc_precedence(m: &GrpcRouteMatch) -> Precedence {
    let chars = |s: Option<&String>| s.map_or(0, String::len);
    let (service, method) =
        m.method.as_ref().map_or((0, 0), |mm| (chars(mm.service.as_ref()), chars(mm.method.as_ref())));
    Precedence::Grpc(Reverse(service), Reverse(method), Reverse(m.headers.len()))
}

/// A GRPCRoute match: the method becomes a path condition on `/SERVICE/METHOD`.
fn compile_grpc_match(m: &GrpcRouteMatch) -> Option<Matcher> {
    let path = match &m.method {
        None => PathMatcher::PathPrefix("/".into()),
        Some(mm) => match mm.match_type {
            ValueMatchType::Exact => match (&mm.service, &mm.method) {
                (Some(s), Some(m)) => PathMatcher::Exact(format!("/{s}/{m}")),
                (Some(s), None) => PathMatcher::PathPrefix(format!("/{s}")),
                (None, Some(m)) => PathMatcher::RegularExpression(anchored(&format!("/[^/]+/{}", regex::escape(m)))?),
                (None, None) => PathMatcher::PathPrefix("/".into()),
            },
            ValueMatchType::RegularExpression => {
                let s = mm.service.as_deref().unwrap_or("[^/]+");
                let m = mm.method.as_deref().unwrap_or("[^/]+");
                PathMatcher::RegularExpression(anchored(&format!("/(?:{s})/(?:{m})"))?)
            }
        },
    };
    Some(Matcher {
        path,
        method: None,
        headers: m.headers.iter().map(|h| compile_value(h, true)).collect::<Option<_>>()?,
        query_params: Vec::new(),
    })
}

/// An SMI HTTPRouteGroup match: one matcher per listed method (`*` or none: any method).
fn compile_smi_match(m: &crate::resource::SmiHttpMatch) -> Vec<Matcher> {
    let path = match &m.path_regex {
        Some(r) => match anchored(r) {
            Some(re) => PathMatcher::RegularExpression(re),
            None => return Vec::new(),
        },
        None => PathMatcher::PathPrefix("/".into()),
    };
    let Some(headers) = m
        .headers
        .iter()
        .map(|(k, v)| {
            Some(ValueMatcher { name: k.to_ascii_lowercase(), value: ValuePattern::RegularExpression(anchored(v)?) })
        })
        .collect::<Option<Vec<_>>>()
    else {
        return Vec::new();
    };
    let methods: Vec<Option<String>> = if m.methods.is_empty() || m.methods.iter().any(|x| x == "*") {
        vec![None]
    } else {
        m.methods.iter().cloned().map(Some).collect()
    };
    methods
        .into_iter()
        .map(|method| Matcher { path: path.clone(), method, headers: headers.clone(), query_params: Vec::new() })
        .collect()
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
        (e.route.to_string(), e.rule)
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

    #[test]
    fn replace_prefix_match_follows_the_gateway_api_table() {
        let change = |path: &str, prefix: &str, replacement: &str| {
            change_path(&PathChange::ReplacePrefixMatch(replacement.into()), path, prefix)
        };
        // (request path, matched prefix as compiled, replacement, modified path)
        for (path, prefix, replacement, want) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/prefix/one/two", "/prefix/one", "/one", "/one/two"),
            ("/a/b", "/", "/xyz", "/xyz/a/b"),
            ("/", "/", "/xyz", "/xyz"),
        ] {
            assert_eq!(change(path, prefix, replacement), want, "{path} with prefix {prefix} → {replacement:?}");
        }
    }

    #[test]
    fn grpc_matches_rank_by_service_then_method_characters() {
        let snap = MeshSnapshot::compile(
            &parse_documents(
                "r",
                r#"
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: cart}
spec: {ports: [{port: 9090, appProtocol: grpc}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: cart}
spec:
  parentRefs: [{name: cart}]
  rules:
  - matches: [{method: {method: Ping}}]
    backendRefs: [{name: any-ping}]
  - matches: [{method: {service: shop.Cart}}]
    backendRefs: [{name: service-wide}]
  - matches: [{method: {service: shop.Cart, method: Ping}}]
    backendRefs: [{name: exact}]
  - backendRefs: [{name: catch-all}]
"#,
            )
            .expect("valid"),
            "1",
        );
        let t = &snap.resolve_authority("cart:9090").expect("service").1.routes;
        let to = |path: &str| {
            let headers = HeaderMap::new();
            let req = RequestInfo { method: "POST", path, query: None, headers: &headers };
            t.find(&req).map(|e| e.backends[0].service.name.clone()).unwrap_or_default()
        };
        assert_eq!(to("/shop.Cart/Ping"), "exact");
        assert_eq!(to("/shop.Cart/Pong"), "service-wide");
        assert_eq!(to("/shop.Basket/Ping"), "any-ping");
        assert_eq!(to("/shop.Basket/Pong"), "catch-all");
        let order: Vec<&str> = t.entries.iter().map(|e| e.backends[0].service.name.as_str()).collect();
        assert_eq!(
            order,
            ["exact", "service-wide", "any-ping", "catch-all"],
            "a service-wide match beats a method-only one"
        );
    }
}
