//! Semantic checks that serde's typing cannot express. Each returns `(field path, reason)`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::duration;
use crate::model::AppProtocol;
use crate::resource::{
    BackendRef, HttpRouteSpec, PLEXUS_GROUP, ParentRef, PathMatchType, Resource, ServiceSpec, Spec, ValueMatchType,
    WorkloadSpec,
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
    match &r.spec {
        Spec::Service(s) => service(s, &mut p),
        Spec::Workload(w) => workload(w, &mut p),
        Spec::HttpRoute(h) => http_route(h, &mut p),
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

/// A DNS-1123 name: lowercase letters, digits, `-` and `.`, starting and ending alphanumeric.
fn dns_name(name: &str, max: usize) -> Result<(), String> {
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
    if let Err(reason) = service_ref_group_kind(r.group.as_deref(), Some(r.kind.as_deref().unwrap_or("Service"))) {
        p.push((at.into(), reason));
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
    if h.parent_refs.is_empty() {
        p.push(("spec.parentRefs".into(), "a mesh route needs at least one parentRef (kind: Service)".into()));
    }
    for (i, r) in h.parent_refs.iter().enumerate() {
        parent_ref(r, &format!("spec.parentRefs[{i}]"), p);
    }
    for (ri, rule) in h.rules.iter().enumerate() {
        let at = format!("spec.rules[{ri}]");
        for (mi, m) in rule.matches.iter().enumerate() {
            let mat = format!("{at}.matches[{mi}]");
            if let Some(path) = &m.path {
                match path.match_type {
                    PathMatchType::RegularExpression => {
                        if let Err(e) = regex::Regex::new(&path.value) {
                            p.push((format!("{mat}.path.value"), format!("invalid regular expression: {e}")));
                        }
                    }
                    _ if !path.value.starts_with('/') => {
                        p.push((format!("{mat}.path.value"), "must start with '/'".into()))
                    }
                    _ => {}
                }
            }
            for (kind, list) in [("headers", &m.headers), ("queryParams", &m.query_params)] {
                for (vi, v) in list.iter().enumerate() {
                    if v.name.is_empty() {
                        p.push((format!("{mat}.{kind}[{vi}].name"), "must not be empty".into()));
                    }
                    if kind == "headers" && http::HeaderName::from_bytes(v.name.as_bytes()).is_err() {
                        p.push((
                            format!("{mat}.{kind}[{vi}].name"),
                            format!("{:?} is not a valid header name", v.name),
                        ));
                    }
                    if v.match_type == ValueMatchType::RegularExpression
                        && let Err(e) = regex::Regex::new(&v.value)
                    {
                        p.push((format!("{mat}.{kind}[{vi}].value"), format!("invalid regular expression: {e}")));
                    }
                }
            }
            if let Some(method) = &m.method {
                const METHODS: [&str; 9] =
                    ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
                if !METHODS.contains(&method.as_str()) {
                    p.push((format!("{mat}.method"), format!("{method:?} is not one of {}", METHODS.join(", "))));
                }
            }
        }
        for (fi, f) in rule.filters.iter().enumerate() {
            let fat = format!("{at}.filters[{fi}]");
            let modifier = match f.filter_type.as_str() {
                "RequestHeaderModifier" => &f.request_header_modifier,
                "ResponseHeaderModifier" => &f.response_header_modifier,
                other => {
                    p.push((format!("{fat}.type"), format!("filter type {other:?} is not supported by this version (supported: RequestHeaderModifier, ResponseHeaderModifier)")));
                    continue;
                }
            };
            let Some(modifier) = modifier else {
                let field = f.filter_type[..1].to_ascii_lowercase() + &f.filter_type[1..];
                p.push((format!("{fat}.{field}"), format!("required when type is {}", f.filter_type)));
                continue;
            };
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
        for (bi, b) in rule.backend_refs.iter().enumerate() {
            backend_ref(b, &format!("{at}.backendRefs[{bi}]"), p);
        }
        if let Some(t) = &rule.timeouts {
            for (field, value) in [("request", &t.request), ("backendRequest", &t.backend_request)] {
                if let Some(v) = value
                    && let Err(reason) = duration::parse(v)
                {
                    p.push((format!("{at}.timeouts.{field}"), reason));
                }
            }
        }
    }
}
