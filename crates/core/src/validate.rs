//! Semantic checks that serde's typing cannot express. Each returns `(field path, reason)`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::model::AppProtocol;
use crate::resource::{
    AuthorizationPolicySpec, BackendRef, ExternalServiceSpec, FaultInjectionSpec, FilterType, GatewaySpec,
    GrpcRouteSpec, HttpRouteFilter, HttpRouteGroupSpec, HttpRouteMatch, HttpRouteSpec, HttpRouteTimeouts,
    HttpValueMatch, Kind, MeshConfigSpec, PLEXUS_GROUP, ParentRef, PathMatchType, PathModifier, PathModifierType,
    PolicyTargetRef, RateLimitPolicySpec, ResiliencePolicySpec, Resource, ServiceSpec, Spec, TrafficSplitSpec,
    TrafficTargetSpec, ValueMatchType, WorkloadSpec,
};

type Problems = Vec<(String, String)>;

/// All problems of one resource.
pub(crate) fn resource(r: &Resource) -> Problems {
    let mut p = Problems::new();
    if let Err(reason) = dns_name(&r.metadata.name, 253) {
        p.push(("metadata.name".into(), reason));
    }
    if let Some(ns) = &r.metadata.namespace
        && let Err(reason) = dns_name(ns, 63)
    {
        p.push(("metadata.namespace".into(), reason));
    }
    if !r.kind.namespaced() {
        if r.metadata.namespace.is_some() {
            p.push(("metadata.namespace".into(), format!("{} is mesh-wide: remove the namespace", r.kind)));
        }
        if r.kind == Kind::MeshConfig && r.metadata.name != "default" {
            p.push(("metadata.name".into(), "there is one MeshConfig and it is named \"default\"".into()));
        }
    }
    match &r.spec {
        Spec::MeshConfig(m) => mesh_config(m, &mut p),
        Spec::Service(s) => service(s, &mut p),
        Spec::Workload(w) => workload(w, &mut p),
        Spec::ExternalService(e) => external_service(e, &mut p),
        Spec::HttpRouteGroup(g) => http_route_group(g, &mut p),
        Spec::FaultInjection(f) => fault_injection(f, "spec", &mut p),
        Spec::Gateway(g) => gateway(g, &mut p),
        Spec::HttpRoute(h) => http_route(h, &mut p),
        Spec::GrpcRoute(g) => grpc_route(g, &mut p),
        Spec::TrafficSplit(t) => traffic_split(t, &mut p),
        Spec::TrafficTarget(t) => traffic_target(t, &mut p),
        Spec::AuthorizationPolicy(a) => authorization_policy(a, &mut p),
        Spec::ResiliencePolicy(r) => resilience_policy(r, &mut p),
        Spec::RateLimitPolicy(r) => rate_limit_policy(r, &mut p),
    }
    p
}

/// Objects defined twice in one input: `(document, field, reason)`.
pub(crate) fn duplicates(resources: &[Resource]) -> Vec<(usize, String, String)> {
    let mut seen = HashMap::new();
    let mut out = Vec::new();
    for (i, r) in resources.iter().enumerate() {
        if let Some(first) = seen.insert((r.kind, r.key()), i + 1) {
            out.push((
                i + 1,
                "metadata.name".into(),
                format!("{} {} is also defined in document {first}", r.kind, r.key()),
            ));
        }
    }
    out
}

/// A DNS-1123 name (at most `max` bytes): lowercase letters, digits, `-` and `.`, starting and ending alphanumeric.
pub fn dns_name(name: &str, max: usize) -> Result<(), String> {
    let ok_chars = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ok_ends =
        name.starts_with(|c: char| c.is_ascii_alphanumeric()) && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if name.is_empty() {
        Err("must not be empty".into())
    } else if name.len() > max {
        Err(format!("must be at most {max} characters"))
    } else if !ok_chars || !ok_ends {
        Err(format!(
            "{name:?} is not a valid name: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
        ))
    } else {
        Ok(())
    }
}

fn service(s: &ServiceSpec, p: &mut Problems) {
    if s.ports.is_empty() {
        p.push(("spec.ports".into(), "a Service needs at least one port".into()));
    }
    let mut numbers = HashSet::new();
    let mut names = HashSet::new();
    for (i, port) in s.ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        if port.port == 0 {
            p.push((format!("{at}.port"), "must be between 1 and 65535".into()));
        }
        if !numbers.insert(port.port) {
            p.push((format!("{at}.port"), format!("port {} is listed twice", port.port)));
        }
        if let Some(name) = &port.name
            && !names.insert(name.clone())
        {
            p.push((format!("{at}.name"), format!("port name {name:?} is listed twice")));
        }
        if let Some(proto) = &port.app_protocol
            && AppProtocol::parse(proto).is_none()
        {
            p.push((
                format!("{at}.appProtocol"),
                format!("{proto:?} is not one of http, http2, grpc, tcp, tls, opaque"),
            ));
        }
        if let Some(crate::resource::PortRef::Number(0)) = port.target_port {
            p.push((format!("{at}.targetPort"), "must be between 1 and 65535".into()));
        }
    }
    for (k, v) in &s.selector {
        if k.is_empty() || v.is_empty() {
            p.push(("spec.selector".into(), "selector keys and values must not be empty".into()));
        }
    }
    for (i, sa) in s.service_accounts.iter().enumerate() {
        if let Err(e) = dns_name(sa, 63) {
            p.push((format!("spec.serviceAccounts[{i}]"), e));
        }
    }
}

fn workload(w: &WorkloadSpec, p: &mut Problems) {
    if w.address.parse::<IpAddr>().is_err() {
        p.push(("spec.address".into(), format!("{:?} is not an IP address", w.address)));
    }
    for (i, port) in w.ports.iter().enumerate() {
        if port.port == 0 {
            p.push((format!("spec.ports[{i}].port"), "must be between 1 and 65535".into()));
        }
        if port.target_port == Some(0) {
            p.push((format!("spec.ports[{i}].targetPort"), "must be between 1 and 65535".into()));
        }
    }
    if let Some(sa) = &w.service_account
        && let Err(reason) = dns_name(sa, 253)
    {
        p.push(("spec.serviceAccount".into(), reason));
    }
}

fn service_ref_group_kind(group: Option<&str>, kind: Option<&str>) -> Result<(), String> {
    match group {
        None | Some("") | Some(PLEXUS_GROUP) => {}
        Some(other) => return Err(format!("group {other:?} is not supported (use \"\" or {PLEXUS_GROUP})")),
    }
    match kind {
        None | Some("Service") => Ok(()),
        Some(other) => Err(format!("kind {other:?} is not supported here (use Service)")),
    }
}

fn parent_ref(r: &ParentRef, at: &str, p: &mut Problems) {
    if crate::route::parent_is_gateway(r) {
        // A Gateway (north-south): `group` gateway.networking.k8s.io or absent.
        match r.group.as_deref() {
            None | Some(crate::resource::GATEWAY_GROUP) => {}
            Some(other) => p.push((
                format!("{at}.group"),
                format!("group {other:?} is not supported for kind Gateway (use {})", crate::resource::GATEWAY_GROUP),
            )),
        }
    } else if let Err(reason) = service_ref_group_kind(r.group.as_deref(), Some(r.kind.as_deref().unwrap_or("Service")))
    {
        p.push((
            at.into(),
            format!(
                "{} (a mesh route attaches to a Service, a gateway route to kind Gateway)",
                reason.replace(" (use Service)", "")
            ),
        ));
    } else if r.section_name.is_some() {
        p.push((format!("{at}.sectionName"), "sectionName selects a Gateway listener: use port for a Service".into()));
    }
    if r.port == Some(0) {
        p.push((format!("{at}.port"), "must be between 1 and 65535".into()));
    }
}

fn backend_ref(r: &BackendRef, at: &str, p: &mut Problems) {
    if let Err(reason) = service_ref_group_kind(r.group.as_deref(), r.kind.as_deref()) {
        p.push((at.into(), reason));
    }
    if r.weight > 1_000_000 {
        p.push((format!("{at}.weight"), "must be between 0 and 1000000".into()));
    }
    if r.port == Some(0) {
        p.push((format!("{at}.port"), "must be between 1 and 65535".into()));
    }
}

fn http_route(h: &HttpRouteSpec, p: &mut Problems) {
    route_parents(&h.parent_refs, p);
    for (ri, rule) in h.rules.iter().enumerate() {
        let at = format!("spec.rules[{ri}]");
        for (mi, m) in rule.matches.iter().enumerate() {
            http_match(m, &format!("{at}.matches[{mi}]"), p);
        }
        let prefix_matches = rule.matches.is_empty()
            || rule.matches.iter().all(|m| m.path.as_ref().is_none_or(|x| x.match_type == PathMatchType::PathPrefix));
        filters(&rule.filters, &at, prefix_matches, true, p);
        for (bi, b) in rule.backend_refs.iter().enumerate() {
            backend_ref(b, &format!("{at}.backendRefs[{bi}]"), p);
        }
        timeouts(rule.timeouts.as_ref(), &at, p);
        if let Some(retry) = &rule.retry {
            for (ci, code) in retry.codes.iter().enumerate() {
                if !(400..=599).contains(code) {
                    p.push((
                        format!("{at}.retry.codes[{ci}]"),
                        format!("{code} is not an HTTP error status (400-599)"),
                    ));
                }
            }
            if retry.attempts.is_some_and(|a| a > 10) {
                p.push((format!("{at}.retry.attempts"), "must be at most 10".into()));
            }
        }
    }
}

fn route_parents(parents: &[ParentRef], p: &mut Problems) {
    if parents.is_empty() {
        p.push((
            "spec.parentRefs".into(),
            "a route needs at least one parentRef (kind: Service for the mesh, kind: Gateway for a gateway)".into(),
        ));
    }
    for (i, r) in parents.iter().enumerate() {
        parent_ref(r, &format!("spec.parentRefs[{i}]"), p);
    }
}

fn timeouts(t: Option<&HttpRouteTimeouts>, at: &str, p: &mut Problems) {
    if let Some(t) = t
        && let (Some(request), Some(backend)) = (t.request, t.backend_request)
        && !request.0.is_zero()
        && backend.0 > request.0
    {
        p.push((format!("{at}.timeouts.backendRequest"), "must not be longer than timeouts.request".into()));
    }
}

fn regex_ok(pattern: &str, at: String, p: &mut Problems) {
    if let Err(e) = regex::Regex::new(pattern) {
        p.push((at, format!("invalid regular expression: {e}")));
    }
}

fn value_matches(list: &[HttpValueMatch], at: &str, headers: bool, p: &mut Problems) {
    for (vi, v) in list.iter().enumerate() {
        if v.name.is_empty() {
            p.push((format!("{at}[{vi}].name"), "must not be empty".into()));
        }
        if headers && http::HeaderName::from_bytes(v.name.as_bytes()).is_err() {
            p.push((format!("{at}[{vi}].name"), format!("{:?} is not a valid header name", v.name)));
        }
        if v.match_type == ValueMatchType::RegularExpression {
            regex_ok(&v.value, format!("{at}[{vi}].value"), p);
        }
    }
}

const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

fn http_match(m: &HttpRouteMatch, mat: &str, p: &mut Problems) {
    if let Some(path) = &m.path {
        match path.match_type {
            PathMatchType::RegularExpression => regex_ok(&path.value, format!("{mat}.path.value"), p),
            _ if !path.value.starts_with('/') => p.push((format!("{mat}.path.value"), "must start with '/'".into())),
            _ => {}
        }
    }
    value_matches(&m.headers, &format!("{mat}.headers"), true, p);
    value_matches(&m.query_params, &format!("{mat}.queryParams"), false, p);
    if let Some(method) = &m.method
        && !METHODS.contains(&method.as_str())
    {
        p.push((format!("{mat}.method"), format!("{method:?} is not one of {}", METHODS.join(", "))));
    }
}

fn path_modifier(m: &PathModifier, at: &str, prefix_matches: bool, p: &mut Problems) {
    let (field, value) = match m.modifier_type {
        PathModifierType::ReplaceFullPath => ("replaceFullPath", &m.replace_full_path),
        PathModifierType::ReplacePrefixMatch => ("replacePrefixMatch", &m.replace_prefix_match),
    };
    match value {
        None => p.push((format!("{at}.{field}"), format!("required when type is {:?}", m.modifier_type))),
        Some(v) if !v.starts_with('/') => p.push((format!("{at}.{field}"), "must start with '/'".into())),
        Some(_) => {}
    }
    if m.modifier_type == PathModifierType::ReplacePrefixMatch && !prefix_matches {
        p.push((format!("{at}.type"), "ReplacePrefixMatch needs every match of the rule to be a PathPrefix".into()));
    }
}

fn filters(list: &[HttpRouteFilter], at: &str, prefix_matches: bool, http: bool, p: &mut Problems) {
    let mut seen = HashSet::new();
    for (fi, f) in list.iter().enumerate() {
        let fat = format!("{at}.filters[{fi}]");
        if !http && matches!(f.filter_type, FilterType::RequestRedirect | FilterType::UrlRewrite) {
            p.push((format!("{fat}.type"), format!("{:?} is not a GRPCRoute filter", f.filter_type)));
            continue;
        }
        if !f.has_settings() {
            p.push((format!("{fat}.{}", f.filter_type.field()), format!("required when type is {:?}", f.filter_type)));
            continue;
        }
        let others = [
            (f.request_header_modifier.is_some(), FilterType::RequestHeaderModifier),
            (f.response_header_modifier.is_some(), FilterType::ResponseHeaderModifier),
            (f.request_redirect.is_some(), FilterType::RequestRedirect),
            (f.url_rewrite.is_some(), FilterType::UrlRewrite),
            (f.request_mirror.is_some(), FilterType::RequestMirror),
            (f.extension_ref.is_some(), FilterType::ExtensionRef),
        ];
        for (set, t) in others {
            if set && t != f.filter_type {
                p.push((format!("{fat}.{}", t.field()), format!("must not be set when type is {:?}", f.filter_type)));
            }
        }
        let repeatable = matches!(f.filter_type, FilterType::RequestMirror | FilterType::ExtensionRef);
        if !repeatable && !seen.insert(f.filter_type.field()) {
            p.push((format!("{fat}.type"), format!("{:?} may appear only once per rule", f.filter_type)));
        }
        for modifier in [&f.request_header_modifier, &f.response_header_modifier].into_iter().flatten() {
            let names = modifier.set.iter().chain(&modifier.add).map(|h| &h.name).chain(&modifier.remove);
            for name in names {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    p.push((fat.clone(), format!("{name:?} is not a valid header name")));
                }
            }
            for h in modifier.set.iter().chain(&modifier.add) {
                if http::HeaderValue::from_str(&h.value).is_err() {
                    p.push((fat.clone(), format!("value of {:?} is not a valid header value", h.name)));
                }
            }
        }
        if let Some(r) = &f.request_redirect {
            if let Some(scheme) = &r.scheme
                && scheme != "http"
                && scheme != "https"
            {
                p.push((format!("{fat}.requestRedirect.scheme"), format!("{scheme:?} is not http or https")));
            }
            if let Some(code) = r.status_code
                && code != 301
                && code != 302
            {
                p.push((format!("{fat}.requestRedirect.statusCode"), format!("{code} is not 301 or 302")));
            }
            if let Some(h) = &r.hostname
                && let Err(reason) = dns_name(h, 253)
            {
                p.push((format!("{fat}.requestRedirect.hostname"), reason));
            }
            if let Some(m) = &r.path {
                path_modifier(m, &format!("{fat}.requestRedirect.path"), prefix_matches, p);
            }
        }
        if let Some(r) = &f.url_rewrite {
            if let Some(h) = &r.hostname
                && let Err(reason) = dns_name(h, 253)
            {
                p.push((format!("{fat}.urlRewrite.hostname"), reason));
            }
            if let Some(m) = &r.path {
                path_modifier(m, &format!("{fat}.urlRewrite.path"), prefix_matches, p);
            }
        }
        if let Some(m) = &f.request_mirror {
            let b = &m.backend_ref;
            if let Err(reason) = service_ref_group_kind(b.group.as_deref(), b.kind.as_deref()) {
                p.push((format!("{fat}.requestMirror.backendRef"), reason));
            }
            if m.percent.is_some_and(|x| x > 100) {
                p.push((format!("{fat}.requestMirror.percent"), "must be between 0 and 100".into()));
            }
            if m.percent.is_some() && m.fraction.is_some() {
                p.push((format!("{fat}.requestMirror"), "set percent or fraction, not both".into()));
            }
            if let Some(fr) = m.fraction
                && (fr.denominator == 0 || fr.numerator > fr.denominator)
            {
                p.push((
                    format!("{fat}.requestMirror.fraction"),
                    "needs 0 <= numerator <= denominator, denominator > 0".into(),
                ));
            }
        }
        if let Some(e) = &f.extension_ref
            && (e.group != PLEXUS_GROUP || e.kind != "FaultInjection")
        {
            p.push((
                format!("{fat}.extensionRef"),
                format!("{}/{} is not supported (use group: {PLEXUS_GROUP}, kind: FaultInjection)", e.group, e.kind),
            ));
        }
    }
}

fn grpc_route(g: &GrpcRouteSpec, p: &mut Problems) {
    route_parents(&g.parent_refs, p);
    for (ri, rule) in g.rules.iter().enumerate() {
        let at = format!("spec.rules[{ri}]");
        for (mi, m) in rule.matches.iter().enumerate() {
            let mat = format!("{at}.matches[{mi}]");
            if let Some(method) = &m.method {
                if method.service.is_none() && method.method.is_none() {
                    p.push((format!("{mat}.method"), "needs service, method or both".into()));
                }
                for (field, value) in [("service", &method.service), ("method", &method.method)] {
                    let Some(v) = value else { continue };
                    match method.match_type {
                        ValueMatchType::RegularExpression => regex_ok(v, format!("{mat}.method.{field}"), p),
                        ValueMatchType::Exact if v.is_empty() || v.contains('/') => {
                            p.push((format!("{mat}.method.{field}"), "must be non-empty and contain no '/'".into()))
                        }
                        ValueMatchType::Exact => {}
                    }
                }
            }
            value_matches(&m.headers, &format!("{mat}.headers"), true, p);
        }
        filters(&rule.filters, &at, false, false, p);
        for (bi, b) in rule.backend_refs.iter().enumerate() {
            backend_ref(b, &format!("{at}.backendRefs[{bi}]"), p);
        }
        timeouts(rule.timeouts.as_ref(), &at, p);
        if let Some(retry) = &rule.retry {
            for (ci, code) in retry.codes.iter().enumerate() {
                if code.code().is_none() {
                    p.push((
                        format!("{at}.retry.codes[{ci}]"),
                        format!("{code:?} is not a gRPC status code (0-16 or a name such as unavailable)"),
                    ));
                }
            }
            if retry.attempts.is_some_and(|a| a > 10) {
                p.push((format!("{at}.retry.attempts"), "must be at most 10".into()));
            }
        }
    }
}

fn gateway(g: &GatewaySpec, p: &mut Problems) {
    if g.listeners.is_empty() {
        p.push(("spec.listeners".into(), "a Gateway needs at least one listener".into()));
    }
    if let Some(class) = &g.gateway_class_name
        && class != "plexus"
    {
        p.push(("spec.gatewayClassName".into(), format!("{class:?} is not a Plexus gateway class (use plexus)")));
    }
    // A gateway proxy binds the address it is started with (`plexus proxy --gateway-ip`): an
    // address requested here would be accepted and not served, so it is refused.
    for (i, a) in g.addresses.iter().enumerate() {
        if a.address_type.as_deref().is_some_and(|t| t != "IPAddress") || a.value.parse::<IpAddr>().is_err() {
            p.push((format!("spec.addresses[{i}]"), format!("{:?} is not an IPAddress", a.value)));
        } else {
            p.push((
                format!("spec.addresses[{i}]"),
                "not supported: a Plexus gateway listens on the address its proxy is started with \
                 (`plexus proxy --gateway-ip`); remove spec.addresses"
                    .into(),
            ));
        }
    }
    let mut names = HashSet::new();
    for (i, l) in g.listeners.iter().enumerate() {
        let at = format!("spec.listeners[{i}]");
        if !names.insert(&l.name) {
            p.push((format!("{at}.name"), format!("listener name {:?} is listed twice", l.name)));
        }
        if let Err(reason) = dns_name(&l.name, 253) {
            p.push((format!("{at}.name"), reason));
        }
        if l.port == 0 {
            p.push((format!("{at}.port"), "must be between 1 and 65535".into()));
        }
        match (l.protocol.as_str(), &l.tls) {
            ("HTTP", None) => {}
            ("HTTP", Some(_)) => p.push((format!("{at}.tls"), "only HTTPS listeners take tls".into())),
            ("HTTPS", Some(tls)) if !tls.certificate_refs.is_empty() => {
                if tls.mode.as_deref().is_some_and(|m| m != "Terminate") {
                    p.push((format!("{at}.tls.mode"), "an HTTPS listener terminates TLS: use Terminate".into()));
                }
                if let Err(reason) = crate::gateway::session_resumption(tls) {
                    p.push((format!("{at}.tls.options"), reason));
                }
                for (ci, c) in tls.certificate_refs.iter().enumerate() {
                    let cat = format!("{at}.tls.certificateRefs[{ci}]");
                    if c.kind.as_deref().is_some_and(|k| k != "Secret")
                        || c.group.as_deref().is_some_and(|g| !g.is_empty())
                    {
                        p.push((cat.clone(), "a certificate is a Secret (group \"\", kind Secret)".into()));
                    }
                    if let Err(reason) = dns_name(&c.name, 253) {
                        p.push((format!("{cat}.name"), reason));
                    }
                    if let Some(ns) = &c.namespace
                        && let Err(reason) = dns_name(ns, 63)
                    {
                        p.push((format!("{cat}.namespace"), reason));
                    }
                }
            }
            ("HTTPS", _) => {
                p.push((format!("{at}.tls.certificateRefs"), "an HTTPS listener needs a certificate".into()))
            }
            (other, _) => p.push((format!("{at}.protocol"), format!("{other:?} is not HTTP or HTTPS"))),
        }
        if let Some(h) = &l.hostname {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            if h.parse::<IpAddr>().is_ok() {
                p.push((format!("{at}.hostname"), format!("{h:?} is an IP address: a hostname is a DNS name")));
            } else if bare.contains('*') {
                p.push((
                    format!("{at}.hostname"),
                    "a wildcard is only allowed as the first label (*.example.com)".into(),
                ));
            } else if let Err(reason) = dns_name(&bare.to_ascii_lowercase(), 253) {
                p.push((format!("{at}.hostname"), reason));
            }
        }
        if let Some(allowed) = &l.allowed_routes {
            if let Some(from) = allowed.namespaces.as_ref().and_then(|n| n.from.as_deref())
                && from != "Same"
                && from != "All"
            {
                let why = if from == "Selector" {
                    "Selector is not supported: Plexus's model has no namespace labels (universal mode has no \
                     Namespace resource), so a selector could match nothing; use Same or All"
                        .to_string()
                } else {
                    format!("{from:?} is not Same or All")
                };
                p.push((format!("{at}.allowedRoutes.namespaces.from"), why));
            }
            for (ki, k) in allowed.kinds.iter().enumerate() {
                if k.kind != "HTTPRoute" && k.kind != "GRPCRoute" {
                    p.push((
                        format!("{at}.allowedRoutes.kinds[{ki}]"),
                        format!("{:?} is not HTTPRoute or GRPCRoute", k.kind),
                    ));
                }
            }
        }
    }
}

fn percent(v: Option<f64>, at: String, p: &mut Problems) {
    if let Some(x) = v
        && !(0.0..=100.0).contains(&x)
    {
        p.push((at, format!("{x} is not between 0 and 100")));
    }
}

fn fault_injection(f: &FaultInjectionSpec, at: &str, p: &mut Problems) {
    if f.delay.is_none() && f.abort.is_none() {
        p.push((at.into(), "set delay, abort or both".into()));
    }
    if let Some(d) = &f.delay {
        percent(d.percent, format!("{at}.delay.percent"), p);
    }
    if let Some(a) = &f.abort {
        percent(a.percent, format!("{at}.abort.percent"), p);
        match (a.http_status, &a.grpc_status) {
            (None, None) => p.push((format!("{at}.abort"), "set httpStatus or grpcStatus".into())),
            (Some(s), _) if !(200..=599).contains(&s) => {
                p.push((format!("{at}.abort.httpStatus"), format!("{s} is not an HTTP status (200-599)")))
            }
            (_, Some(g)) if g.code().is_none_or(|c| c == 0) => p.push((
                format!("{at}.abort.grpcStatus"),
                format!("{g:?} is not a gRPC error status (1-16 or a name such as unavailable)"),
            )),
            _ => {}
        }
    }
}

fn traffic_split(t: &TrafficSplitSpec, p: &mut Problems) {
    if let Err(reason) = dns_name(&t.service, 253) {
        p.push(("spec.service".into(), reason));
    }
    if t.backends.is_empty() {
        p.push(("spec.backends".into(), "a TrafficSplit needs at least one backend".into()));
    }
    for (i, b) in t.backends.iter().enumerate() {
        if let Err(reason) = dns_name(&b.service, 253) {
            p.push((format!("spec.backends[{i}].service"), reason));
        }
        if b.weight > 1_000_000 {
            p.push((format!("spec.backends[{i}].weight"), "must be between 0 and 1000000".into()));
        }
    }
    for (i, m) in t.matches.iter().enumerate() {
        if m.kind != "HTTPRouteGroup" {
            p.push((format!("spec.matches[{i}].kind"), format!("{:?} is not supported (use HTTPRouteGroup)", m.kind)));
        }
    }
}

fn http_route_group(g: &HttpRouteGroupSpec, p: &mut Problems) {
    let mut names = HashSet::new();
    for (i, m) in g.matches.iter().enumerate() {
        let at = format!("spec.matches[{i}]");
        if !names.insert(&m.name) {
            p.push((format!("{at}.name"), format!("match name {:?} is listed twice", m.name)));
        }
        if let Some(r) = &m.path_regex {
            regex_ok(r, format!("{at}.pathRegex"), p);
        }
        for method in &m.methods {
            if method != "*" && !METHODS.contains(&method.as_str()) {
                p.push((format!("{at}.methods"), format!("{method:?} is not one of *, {}", METHODS.join(", "))));
            }
        }
        for (k, v) in &m.headers {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                p.push((format!("{at}.headers"), format!("{k:?} is not a valid header name")));
            }
            regex_ok(v, format!("{at}.headers.{k}"), p);
        }
    }
}

fn traffic_target(t: &TrafficTargetSpec, p: &mut Problems) {
    let bindings = std::iter::once(("spec.destination".to_string(), &t.destination))
        .chain(t.sources.iter().enumerate().map(|(i, s)| (format!("spec.sources[{i}]"), s)));
    for (at, b) in bindings {
        if b.kind != "ServiceAccount" {
            p.push((format!("{at}.kind"), format!("{:?} is not supported (use ServiceAccount)", b.kind)));
        }
        if let Err(reason) = dns_name(&b.name, 253) {
            p.push((format!("{at}.name"), reason));
        }
    }
    if t.sources.is_empty() {
        p.push(("spec.sources".into(), "a TrafficTarget needs at least one source".into()));
    }
    for (i, r) in t.rules.iter().enumerate() {
        if r.kind != "HTTPRouteGroup" {
            p.push((format!("spec.rules[{i}].kind"), format!("{:?} is not supported (use HTTPRouteGroup)", r.kind)));
        }
    }
}

fn target_ref(t: &PolicyTargetRef, route_allowed: bool, p: &mut Problems) {
    if let Err(reason) = service_ref_group_kind(t.group.as_deref(), t.kind.as_deref()) {
        p.push(("spec.targetRef".into(), reason));
    }
    if t.port == Some(0) {
        p.push(("spec.targetRef.port".into(), "must be between 1 and 65535".into()));
    }
    if t.route.is_some() && !route_allowed {
        p.push(("spec.targetRef.route".into(), "only an AuthorizationPolicy targets a route".into()));
    }
}

fn service_account_ref(sa: &str, at: String, p: &mut Problems) {
    let ok = match sa.split_once('/') {
        Some((ns, name)) => dns_name(ns, 63).and(dns_name(name, 253)),
        None => dns_name(sa, 253),
    };
    if let Err(reason) = ok {
        p.push((at, format!("{reason} (write NAME or NAMESPACE/NAME)")));
    }
}

fn authorization_policy(a: &AuthorizationPolicySpec, p: &mut Problems) {
    target_ref(&a.target_ref, true, p);
    for (i, r) in a.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if let Some(from) = &r.from {
            for (j, id) in from.identities.iter().enumerate() {
                if !id.starts_with("spiffe://") && id != "*" {
                    p.push((format!("{at}.from.identities[{j}]"), format!("{id:?} is not a spiffe:// identity")));
                }
            }
            for (j, sa) in from.service_accounts.iter().enumerate() {
                service_account_ref(sa, format!("{at}.from.serviceAccounts[{j}]"), p);
            }
        }
        if let Some(to) = &r.to {
            for (j, path) in to.paths.iter().enumerate() {
                if !path.starts_with('/') && path != "*" {
                    p.push((
                        format!("{at}.to.paths[{j}]"),
                        "must start with '/' (a trailing * matches a prefix)".into(),
                    ));
                    continue;
                }
                // Requests are matched with their normalized path (SPEC §5): a pattern the
                // normalizer would change or refuse could never match.
                let literal = path.strip_suffix('*').unwrap_or(path);
                let lenient = crate::normalize::PathOptions { allow_encoded_slashes: true };
                match crate::normalize::normalize_path(literal, lenient) {
                    Err(reason) => p.push((
                        format!("{at}.to.paths[{j}]"),
                        format!("can never match: {reason} (such requests are refused with 400)"),
                    )),
                    Ok(n) if *n != *literal && path != "*" => p.push((
                        format!("{at}.to.paths[{j}]"),
                        format!(
                            "requests are matched with their normalized path: write {:?}",
                            format!("{n}{}", &path[literal.len()..])
                        ),
                    )),
                    Ok(_) => {}
                }
            }
            for (j, m) in to.methods.iter().enumerate() {
                if !METHODS.contains(&m.as_str()) {
                    p.push((format!("{at}.to.methods[{j}]"), format!("{m:?} is not one of {}", METHODS.join(", "))));
                }
            }
            for (j, port) in to.ports.iter().enumerate() {
                if *port == 0 {
                    p.push((format!("{at}.to.ports[{j}]"), "must be between 1 and 65535".into()));
                }
            }
        }
    }
}

/// Retry conditions `on[]` accepts besides status codes.
pub(crate) const RETRY_CONDITIONS: [&str; 9] = [
    "5xx",
    "gateway-error",
    "connect-failure",
    "reset",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn resilience_policy(r: &ResiliencePolicySpec, p: &mut Problems) {
    target_ref(&r.target_ref, false, p);
    if let Some(retries) = &r.retries {
        if retries.attempts == 0 || retries.attempts > 10 {
            p.push(("spec.retries.attempts".into(), "must be between 1 and 10 (tries, the first included)".into()));
        }
        for (i, cond) in retries.on.iter().enumerate() {
            let status_ok = cond.parse::<u16>().is_ok_and(|c| (400..=599).contains(&c));
            if !status_ok && !RETRY_CONDITIONS.contains(&cond.as_str()) {
                p.push((
                    format!("spec.retries.on[{i}]"),
                    format!("{cond:?} is not a status code (400-599) or one of {}", RETRY_CONDITIONS.join(", ")),
                ));
            }
        }
    }
    if let Some(b) = &r.retry_budget {
        if let Some(ratio) = b.ratio
            && !(0.0..=1000.0).contains(&ratio)
        {
            p.push(("spec.retryBudget.ratio".into(), "must be between 0 and 1000".into()));
        }
        if b.ttl.is_some_and(|t| t.0 < std::time::Duration::from_secs(1) || t.0 > std::time::Duration::from_secs(60)) {
            p.push(("spec.retryBudget.ttl".into(), "must be between 1s and 60s".into()));
        }
    }
    if let Some(o) = &r.outlier_detection {
        if o.consecutive_failures == Some(0) {
            p.push(("spec.outlierDetection.consecutiveFailures".into(), "must be at least 1".into()));
        }
        if o.consecutive_5xx == Some(0) {
            p.push((
                "spec.outlierDetection.consecutive5xx".into(),
                "must be at least 1 (leave it out to count only gateway failures)".into(),
            ));
        }
        if o.max_ejection_percent.is_some_and(|x| x > 100) {
            p.push(("spec.outlierDetection.maxEjectionPercent".into(), "must be between 0 and 100".into()));
        }
    }
    if let Some(c) = &r.connection_limits {
        for (field, v) in
            [("maxConnections", c.max_connections), ("maxRequestsPerConnection", c.max_requests_per_connection)]
        {
            if v == Some(0) {
                p.push((format!("spec.connectionLimits.{field}"), "must be at least 1".into()));
            }
        }
    }
    if let Some(lb) = &r.load_balancer {
        use crate::resource::LbAlgorithm;
        match (&lb.algorithm, &lb.hash_on) {
            (LbAlgorithm::RingHash, None) => {
                p.push(("spec.loadBalancer.hashOn".into(), "required for ringHash".into()));
            }
            (LbAlgorithm::RingHash, Some(h)) => {
                let set = [h.header.is_some(), h.cookie.is_some(), h.query_param.is_some(), h.source_ip == Some(true)];
                if set.iter().filter(|x| **x).count() != 1 {
                    p.push((
                        "spec.loadBalancer.hashOn".into(),
                        "set exactly one of header, cookie, queryParam, sourceIP: true".into(),
                    ));
                }
                if let Some(name) = &h.header
                    && http::HeaderName::from_bytes(name.as_bytes()).is_err()
                {
                    p.push(("spec.loadBalancer.hashOn.header".into(), format!("{name:?} is not a valid header name")));
                }
            }
            (_, Some(_)) => p.push(("spec.loadBalancer.hashOn".into(), "only ringHash hashes".into())),
            _ => {}
        }
    }
}

fn rate_limit_policy(r: &RateLimitPolicySpec, p: &mut Problems) {
    target_ref(&r.target_ref, false, p);
    if r.requests_per_second == 0 {
        p.push(("spec.requestsPerSecond".into(), "must be at least 1".into()));
    }
    if r.burst == Some(0) {
        p.push(("spec.burst".into(), "must be at least 1".into()));
    }
    for (i, o) in r.overrides.iter().enumerate() {
        let at = format!("spec.overrides[{i}]");
        if o.identities.is_empty() && o.service_accounts.is_empty() {
            p.push((at.clone(), "name the sources: identities or serviceAccounts".into()));
        }
        // Sources are matched by exact SPIFFE identity: anything else would never match.
        for (j, id) in o.identities.iter().enumerate() {
            if !id.starts_with("spiffe://") {
                p.push((format!("{at}.identities[{j}]"), format!("{id:?} is not a spiffe:// identity")));
            }
        }
        for (j, sa) in o.service_accounts.iter().enumerate() {
            service_account_ref(sa, format!("{at}.serviceAccounts[{j}]"), p);
        }
        if o.requests_per_second == 0 {
            p.push((format!("{at}.requestsPerSecond"), "must be at least 1".into()));
        }
        if o.burst == Some(0) {
            p.push((format!("{at}.burst"), "must be at least 1".into()));
        }
    }
}

fn mesh_config(m: &MeshConfigSpec, p: &mut Problems) {
    if let Some(td) = &m.trust_domain
        && let Err(reason) = dns_name(td, 253)
    {
        p.push(("spec.trustDomain".into(), reason));
    }
    if let Some(c) = &m.certificates
        && let Some(leaf) = c.leaf_lifetime
        && (leaf.0 < std::time::Duration::from_secs(600) || leaf.0 > std::time::Duration::from_secs(90 * 86400))
    {
        p.push(("spec.certificates.leafLifetime".into(), "must be between 10m and 2160h (90 days)".into()));
    }
    if let Some(t) = &m.tracing {
        percent(t.sampling, "spec.tracing.sampling".into(), p);
    }
    if let Some(a) = &m.access_log
        && let Some(f) = &a.format
        && !["json", "text", "off"].contains(&f.as_str())
    {
        p.push(("spec.accessLog.format".into(), format!("{f:?} is not json, text or off")));
    }
}

fn external_service(e: &ExternalServiceSpec, p: &mut Problems) {
    const PROTOCOLS: [&str; 5] = ["http", "https", "tls", "tcp", "grpc"];
    if e.hosts.is_empty() {
        p.push(("spec.hosts".into(), "an ExternalService needs at least one host".into()));
    }
    for (i, h) in e.hosts.iter().enumerate() {
        let host = h.trim_start_matches("*.");
        if host.parse::<IpAddr>().is_err()
            && let Err(reason) = dns_name(host, 253)
        {
            p.push((format!("spec.hosts[{i}]"), reason));
        }
    }
    if e.ports.is_empty() {
        p.push(("spec.ports".into(), "an ExternalService needs at least one port".into()));
    }
    for (i, port) in e.ports.iter().enumerate() {
        if port.number() == 0 {
            p.push((format!("spec.ports[{i}]"), "must be between 1 and 65535".into()));
        }
        if let crate::resource::ExternalPort::Detailed(d) = port
            && let Some(proto) = &d.protocol
            && !PROTOCOLS.contains(&proto.as_str())
        {
            p.push((format!("spec.ports[{i}].protocol"), format!("{proto:?} is not one of {}", PROTOCOLS.join(", "))));
        }
    }
    if let Some(proto) = &e.protocol
        && !PROTOCOLS.contains(&proto.as_str())
    {
        p.push(("spec.protocol".into(), format!("{proto:?} is not one of {}", PROTOCOLS.join(", "))));
    }
    if let Some(gateway) = &e.egress_gateway {
        let (name, namespace) = gateway.split_once('.').unwrap_or((gateway, "default"));
        let one_label = |n: &str| if n.contains('.') { Err(format!("{n:?} has a dot")) } else { dns_name(n, 63) };
        if let Err(reason) = one_label(name).and_then(|_| one_label(namespace)) {
            p.push((
                "spec.egressGateway".into(),
                format!("{gateway:?} is not NAME or NAME.NAMESPACE of a Service: {reason}"),
            ));
        }
        // The gateway carries HTTP requests: plaintext HTTP/gRPC ports, or TLS ports it originates.
        let originates = e.tls.as_ref().is_some_and(|t| t.originate == Some(true));
        let carried = e.ports.iter().any(|port| {
            let proto = match port {
                crate::resource::ExternalPort::Detailed(d) => d.protocol.as_deref(),
                crate::resource::ExternalPort::Number(_) => None,
            };
            match proto.or(e.protocol.as_deref()) {
                Some("http" | "grpc") => true,
                Some("https" | "tls") => originates,
                _ => false,
            }
        });
        if !carried {
            p.push((
                "spec.egressGateway".into(),
                "an egress gateway carries HTTP requests (ports http or grpc, or https/tls with tls.originate), and this ExternalService has no such port".into(),
            ));
        }
    }
    if let Some(tls) = &e.tls {
        let originates = tls.originate == Some(true);
        let tls_port = e.ports.iter().any(|port| {
            let proto = match port {
                crate::resource::ExternalPort::Detailed(d) => d.protocol.as_deref(),
                crate::resource::ExternalPort::Number(_) => None,
            };
            matches!(proto.or(e.protocol.as_deref()), Some("https" | "tls"))
        });
        if originates && !tls_port {
            p.push((
                "spec.tls.originate".into(),
                "TLS is originated on ports with protocol https (HTTP requests) or tls (TCP streams), and this ExternalService has none: its tcp, http and grpc ports reach the host in plaintext".into(),
            ));
        }
        if let Some(ca) = &tls.ca_file {
            if !originates {
                p.push(("spec.tls.caFile".into(), "only used with tls.originate: true".into()));
            }
            if ca.trim().is_empty() {
                p.push(("spec.tls.caFile".into(), "must be a path".into()));
            }
        }
        if originates && e.hosts.iter().any(|h| h.starts_with("*.")) {
            p.push((
                "spec.tls.originate".into(),
                "TLS is originated to a named host (its SNI and certificate name): a wildcard host cannot be one"
                    .into(),
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, port) in e.ports.iter().enumerate() {
        if !seen.insert(port.number()) {
            p.push((format!("spec.ports[{i}]"), format!("port {} is listed twice", port.number())));
        }
    }
    for (i, h) in e.hosts.iter().enumerate() {
        let misplaced = match h.strip_prefix("*.") {
            Some(rest) => rest.contains('*'),
            None => h.contains('*'),
        };
        if misplaced {
            p.push((
                format!("spec.hosts[{i}]"),
                "a wildcard is only allowed as the whole first label (*.example.com)".into(),
            ));
        }
    }
}
