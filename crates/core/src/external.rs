//! ExternalServices compiled for lookup: the destinations outside the mesh that a sidecar may
//! reach under `outboundTrafficPolicy: registryOnly`, and how (TLS origination).
//!
//! Matching (SPEC §4, docs/ARCHITECTURE.md "Egress"): a host is compared case-insensitively,
//! without a trailing dot. An entry `api.example.com` matches exactly that name; an entry
//! `*.example.com` matches any name under `example.com` (one label or more, never
//! `example.com` itself); an IP entry matches that address (an original destination with no
//! name, or a URL naming the address). The port must be one of the ExternalService's ports.
//! When several ExternalServices match, an exact name wins over a wildcard, a longer wildcard
//! over a shorter one, then `namespace/name` order. ExternalServices apply mesh-wide, whatever
//! their namespace (like an Istio ServiceEntry exported to every namespace).

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::names::ServiceName;
use crate::resource::{ExternalPort, Resource, Spec};

/// The protocol of an ExternalService port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalProtocol {
    Http,
    Https,
    Tls,
    Tcp,
    Grpc,
}

impl ExternalProtocol {
    fn parse(s: Option<&str>) -> ExternalProtocol {
        match s {
            Some("http") => ExternalProtocol::Http,
            Some("https") => ExternalProtocol::Https,
            Some("tls") => ExternalProtocol::Tls,
            Some("grpc") => ExternalProtocol::Grpc,
            _ => ExternalProtocol::Tcp,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExternalProtocol::Http => "http",
            ExternalProtocol::Https => "https",
            ExternalProtocol::Tls => "tls",
            ExternalProtocol::Tcp => "tcp",
            ExternalProtocol::Grpc => "grpc",
        }
    }

    /// Whether the host speaks TLS on such a port (what origination supplies).
    pub fn is_tls(self) -> bool {
        matches!(self, ExternalProtocol::Https | ExternalProtocol::Tls)
    }
}

/// A port of an ExternalService.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalPortInfo {
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub protocol: ExternalProtocol,
}

/// A host entry of an ExternalService.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HostPattern {
    /// A DNS name, lower-case.
    Exact(String),
    /// `*.example.com`, kept as the suffix `.example.com`.
    Wildcard(String),
    Ip(IpAddr),
}

impl HostPattern {
    fn parse(host: &str) -> HostPattern {
        let host = normalize_host(host);
        if let Ok(ip) = host.parse::<IpAddr>() {
            return HostPattern::Ip(ip.to_canonical());
        }
        match host.strip_prefix('*') {
            Some(suffix) => HostPattern::Wildcard(suffix.to_string()),
            None => HostPattern::Exact(host),
        }
    }

    /// How well `host` (normalized) matches: `None` not at all; higher is more specific.
    fn rank(&self, host: &str, ip: Option<IpAddr>) -> Option<usize> {
        match self {
            HostPattern::Exact(h) => (h == host).then_some(usize::MAX),
            HostPattern::Wildcard(suffix) => {
                (host.len() > suffix.len() && host.ends_with(suffix.as_str())).then_some(suffix.len())
            }
            HostPattern::Ip(a) => (ip == Some(*a)).then_some(usize::MAX),
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) => write!(f, "*{s}"),
            HostPattern::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// `spec.tls` with `originate: true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Origination {
    /// PEM CA certificates to verify with instead of the system roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// One ExternalService.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledExternal {
    pub name: ServiceName,
    /// The `destination_service` label of calls to it: its name.
    #[serde(skip)]
    pub label: Arc<str>,
    pub hosts: Vec<HostPattern>,
    pub ports: Vec<ExternalPortInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub originate: Option<Origination>,
    /// The egress gateway's Service (`spec.egressGateway`): sidecars send calls to these
    /// hosts there over mTLS, and only that gateway dials them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_gateway: Option<ServiceName>,
}

impl CompiledExternal {
    pub fn port(&self, port: u16) -> Option<&ExternalPortInfo> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Whether the sidecar opens TLS itself on `port` for a plaintext client.
    pub fn originates_on(&self, port: &ExternalPortInfo) -> Option<&Origination> {
        self.originate.as_ref().filter(|_| port.protocol.is_tls())
    }

    /// Whether a `CONNECT` tunnel to `port` is originated (the tunnel opens before any of the
    /// app's bytes are seen): on `tls` ports only — an `https` port's tunnels carry the app's
    /// own TLS (`curl https://…` through a proxy), its plaintext HTTP requests are originated.
    pub fn originates_tunnels_on(&self, port: &ExternalPortInfo) -> Option<&Origination> {
        self.originates_on(port).filter(|_| port.protocol == ExternalProtocol::Tls)
    }
}

/// The Service `spec.egressGateway` (`NAME` or `NAME.NAMESPACE`) of an ExternalService in
/// `namespace` names.
pub fn egress_gateway_name(gateway: &str, namespace: &str) -> ServiceName {
    match gateway.split_once('.') {
        Some((name, ns)) => ServiceName::new(name, ns),
        None => ServiceName::new(gateway, namespace),
    }
}

/// Every ExternalService of a snapshot, in `namespace/name` order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExternalServices {
    list: Vec<Arc<CompiledExternal>>,
}

/// A host as compared: lower-case, no trailing dot, no IPv6 brackets.
pub fn normalize_host(host: &str) -> String {
    host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase()
}

impl ExternalServices {
    pub fn compile(resources: &[Resource]) -> ExternalServices {
        let mut list: Vec<Arc<CompiledExternal>> = resources
            .iter()
            .filter_map(|r| {
                let Spec::ExternalService(e) = &r.spec else { return None };
                let originate = e
                    .tls
                    .as_ref()
                    .filter(|t| t.originate == Some(true))
                    .map(|t| Origination { ca_file: t.ca_file.clone() });
                let ports = e
                    .ports
                    .iter()
                    .map(|p| match p {
                        ExternalPort::Number(n) => ExternalPortInfo {
                            port: *n,
                            name: None,
                            protocol: ExternalProtocol::parse(e.protocol.as_deref()),
                        },
                        ExternalPort::Detailed(d) => ExternalPortInfo {
                            port: d.port,
                            name: d.name.clone(),
                            protocol: ExternalProtocol::parse(d.protocol.as_deref().or(e.protocol.as_deref())),
                        },
                    })
                    .collect();
                let egress_gateway =
                    e.egress_gateway.as_deref().map(|g| egress_gateway_name(g, r.metadata.namespace()));
                Some(Arc::new(CompiledExternal {
                    name: ServiceName::new(&r.metadata.name, r.metadata.namespace()),
                    label: r.metadata.name.as_str().into(),
                    hosts: e.hosts.iter().map(|h| HostPattern::parse(h)).collect(),
                    ports,
                    originate,
                    egress_gateway,
                }))
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        ExternalServices { list }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<CompiledExternal>> {
        self.list.iter()
    }

    /// The ExternalService port `host:port` reaches (see the module's matching rules). `host`
    /// may be a DNS name or an IP literal.
    pub fn find(&self, host: &str, port: u16) -> Option<(&Arc<CompiledExternal>, &ExternalPortInfo)> {
        let host = normalize_host(host);
        let ip = host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
        let mut best: Option<(usize, &Arc<CompiledExternal>, &ExternalPortInfo)> = None;
        for e in &self.list {
            let Some(p) = e.port(port) else { continue };
            let Some(rank) = e.hosts.iter().filter_map(|h| h.rank(&host, ip)).max() else { continue };
            // Strictly better only: ties keep the first in namespace/name order.
            if best.as_ref().is_none_or(|(r, _, _)| rank > *r) {
                best = Some((rank, e, p));
            }
        }
        best.map(|(_, e, p)| (e, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::parse_documents;

    const EXTERNALS: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {name: api}
spec:
  hosts: [api.example.com]
  ports: [{port: 443, protocol: https}, {port: 80, protocol: http}]
  tls: {originate: true}
---
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {name: any-example, namespace: ops}
spec: {hosts: ["*.example.com"], ports: [{port: 443, protocol: tls}]}
---
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {name: deep}
spec: {hosts: ["*.eu.example.com"], ports: [443]}
---
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {name: db}
spec: {hosts: [10.1.2.3, "::ffff:10.9.9.9"], ports: [5432]}
"#;

    fn externals() -> ExternalServices {
        ExternalServices::compile(&parse_documents("t", EXTERNALS).expect("valid"))
    }

    fn found(x: &ExternalServices, host: &str, port: u16) -> Option<String> {
        x.find(host, port).map(|(e, _)| e.name.to_string())
    }

    #[test]
    fn exact_names_win_over_wildcards_and_longer_wildcards_over_shorter() {
        let x = externals();
        assert_eq!(found(&x, "api.example.com", 443).as_deref(), Some("api.default"));
        assert_eq!(found(&x, "API.Example.COM.", 443).as_deref(), Some("api.default"), "case and trailing dot");
        assert_eq!(found(&x, "www.example.com", 443).as_deref(), Some("any-example.ops"));
        assert_eq!(found(&x, "a.b.example.com", 443).as_deref(), Some("any-example.ops"), "several labels");
        assert_eq!(found(&x, "x.eu.example.com", 443).as_deref(), Some("deep.default"), "the longer wildcard");
        assert_eq!(found(&x, "example.com", 443), None, "a wildcard never matches its apex");
        assert_eq!(found(&x, "evil-example.com", 443), None, "a suffix is a whole label");
        assert_eq!(found(&x, "example.com.evil.net", 443), None);
        assert_eq!(found(&x, "api.example.com", 8443), None, "an unlisted port");
        assert_eq!(found(&x, "www.example.com", 80), None, "the wildcard lists 443 only");
        assert_eq!(found(&x, "api.example.com", 80).as_deref(), Some("api.default"));
    }

    #[test]
    fn ip_entries_match_addresses_in_any_spelling() {
        let x = externals();
        assert_eq!(found(&x, "10.1.2.3", 5432).as_deref(), Some("db.default"));
        assert_eq!(found(&x, "[::ffff:10.1.2.3]", 5432).as_deref(), Some("db.default"), "IPv4-mapped");
        assert_eq!(found(&x, "10.9.9.9", 5432).as_deref(), Some("db.default"), "an IPv4-mapped entry");
        assert_eq!(found(&x, "10.1.2.4", 5432), None);
    }

    #[test]
    fn origination_applies_to_tls_ports_only() {
        let x = externals();
        let (api, https) = x.find("api.example.com", 443).expect("found");
        assert!(api.originates_on(https).is_some());
        let (_, http) = x.find("api.example.com", 80).expect("found");
        assert!(api.originates_on(http).is_none(), "plaintext port: no TLS");
        let (other, tls) = x.find("www.example.com", 443).expect("found");
        assert!(other.originates_on(tls).is_none(), "not asked for");
        assert!(api.originates_tunnels_on(https).is_none(), "an https port's tunnels carry the app's own TLS");
        let yaml = "apiVersion: plexus.dev/v1alpha1\nkind: ExternalService\nmetadata: {name: redis}\nspec: {hosts: [redis.example.com], ports: [{port: 6380, protocol: tls}, {port: 6379, protocol: tcp}], tls: {originate: true}}\n";
        let x = ExternalServices::compile(&parse_documents("t", yaml).expect("valid"));
        let (redis, tls) = x.find("redis.example.com", 6380).expect("found");
        assert!(redis.originates_tunnels_on(tls).is_some(), "a tls port: tunnels originated");
        let (_, tcp) = x.find("redis.example.com", 6379).expect("found");
        assert!(redis.originates_on(tcp).is_none(), "a tcp port stays plaintext");
    }

    #[test]
    fn invalid_external_services_are_refused_with_the_field() {
        let bad = |spec: &str, field: &str| {
            let yaml = format!(
                "apiVersion: plexus.dev/v1alpha1\nkind: ExternalService\nmetadata: {{name: x}}\nspec: {spec}\n"
            );
            let err = parse_documents("f.yaml", &yaml).expect_err("invalid").to_string();
            assert!(err.contains(field), "{spec}: {err}");
        };
        bad("{hosts: [a.com], ports: [{port: 443, protocol: http}], tls: {originate: true}}", "spec.tls.originate");
        bad("{hosts: [a.com], ports: [{port: 443, protocol: https}], tls: {caFile: /ca.pem}}", "spec.tls.caFile");
        bad(
            "{hosts: ['*.a.com'], ports: [{port: 443, protocol: https}], tls: {originate: true}}",
            "spec.tls.originate",
        );
        bad("{hosts: ['*.*.a.com'], ports: [443]}", "spec.hosts[0]");
        bad("{hosts: ['a.*.com'], ports: [443]}", "spec.hosts[0]");
        bad("{hosts: [a.com], ports: [443, 443]}", "spec.ports[1]");
        bad("{hosts: [a.com], ports: [443], tls: {originate: true, extra: 1}}", "extra");
        bad("{hosts: [a.com], ports: [{port: 80, protocol: http}], egressGateway: Egress}", "spec.egressGateway");
        bad("{hosts: [a.com], ports: [{port: 80, protocol: http}], egressGateway: a.b.c}", "spec.egressGateway");
        bad("{hosts: [a.com], ports: [{port: 5432, protocol: tcp}], egressGateway: egress}", "spec.egressGateway");
        bad("{hosts: [a.com], ports: [{port: 443, protocol: https}], egressGateway: egress}", "spec.egressGateway");
        let bound = "apiVersion: plexus.dev/v1alpha1\nkind: ExternalService\nmetadata: {name: x, namespace: apps}\nspec: {hosts: [a.com], ports: [{port: 443, protocol: https}], tls: {originate: true}, egressGateway: egress}\n---\napiVersion: plexus.dev/v1alpha1\nkind: ExternalService\nmetadata: {name: y, namespace: apps}\nspec: {hosts: [b.com], ports: [80], protocol: http, egressGateway: gw.edge}\n";
        let x = ExternalServices::compile(&parse_documents("f.yaml", bound).expect("valid"));
        let gateway =
            |host| x.find(host, x.find(host, 443).map_or(80, |_| 443)).and_then(|(e, _)| e.egress_gateway.clone());
        assert_eq!(gateway("a.com"), Some(ServiceName::new("egress", "apps")), "the ExternalService's namespace");
        assert_eq!(gateway("b.com"), Some(ServiceName::new("gw", "edge")));
        let ok = "apiVersion: plexus.dev/v1alpha1\nkind: ExternalService\nmetadata: {name: x}\nspec: {hosts: [a.com], protocol: https, ports: [443], tls: {originate: true, caFile: /ca.pem}}\n";
        let x = ExternalServices::compile(&parse_documents("f.yaml", ok).expect("valid"));
        let (e, p) = x.find("a.com", 443).expect("found");
        assert_eq!(e.originates_on(p).and_then(|o| o.ca_file.as_deref()), Some("/ca.pem"), "the spec's protocol");
    }
}
