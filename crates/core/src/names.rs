//! Names: services (`name.namespace`), authorities and SPIFFE identities.

use std::fmt;

use serde::Serialize;

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "plexus.local";

/// A Service's name and namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceName {
    pub name: String,
    pub namespace: String,
}

impl ServiceName {
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        ServiceName { name: name.into(), namespace: namespace.into() }
    }

    /// The names a host may mean, most specific first: `reviews` → `reviews.default`;
    /// `reviews.prod`, `reviews.prod.svc` and `reviews.prod.svc.cluster.local` → `reviews.prod`.
    pub fn candidates(host: &str) -> Vec<ServiceName> {
        Self::candidates_in(host, |_| true)
    }

    /// [`ServiceName::candidates`] of a host that names a mesh Service: `name.ns` only when
    /// `namespace_known(ns)` (`example.com` is not Service `example` in namespace `com` unless
    /// that namespace exists); the explicit `name.ns.svc[.cluster.local]` and a single label
    /// always.
    pub fn candidates_in(host: &str, namespace_known: impl Fn(&str) -> bool) -> Vec<ServiceName> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let explicit = host.strip_suffix(".svc.cluster.local").or_else(|| host.strip_suffix(".svc"));
        let name = explicit.unwrap_or(&host);
        let mut parts = name.splitn(3, '.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) if !name.is_empty() => vec![ServiceName::new(name, "default")],
            (Some(name), Some(ns), None)
                if !name.is_empty() && !ns.is_empty() && (explicit.is_some() || namespace_known(ns)) =>
            {
                vec![ServiceName::new(name, ns)]
            }
            _ => Vec::new(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// Splits an authority (`host`, `host:port`, `[v6]:port`) into host and optional port.
pub fn split_authority(authority: &str) -> (&str, Option<u16>) {
    // One byte scan (an authority is short, and every routed request splits one): where the
    // host starts (after the last `@`), and the colons after it.
    let bytes = authority.as_bytes();
    let (mut start, mut colons, mut last_colon) = (0, 0usize, 0);
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'@' {
            (start, colons) = (i + 1, 0);
        } else if b == b':' {
            colons += 1;
            last_colon = i;
        }
    }
    let authority = &authority[start..];
    if let Some(rest) = authority.strip_prefix('[')
        && let Some((host, tail)) = rest.split_once(']')
    {
        let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
        return (host, port);
    }
    // One colon: `host:port`; none, or several (an IPv6 address without brackets): no port.
    if colons != 1 {
        return (authority, None);
    }
    let colon = last_colon - start;
    match authority[colon + 1..].parse() {
        Ok(p) => (&authority[..colon], Some(p)),
        Err(_) => (authority, None),
    }
}

/// Whether a request's `Host` (or absolute-form authority) names this machine in a way a
/// DNS-rebinding page cannot send: an IP address, or `localhost` and `*.localhost` (resolved to
/// loopback without DNS, RFC 6761), with any port. A web page of a name its author controls,
/// whose address is then switched to 127.0.0.1 (or a pod's), sends requests that arrive from
/// loopback but carry that name: such a request must not read a proxy's configuration, tap
/// traffic or read the control plane's API with the page's origin. Userinfo is refused.
pub fn is_local_authority(authority: &str) -> bool {
    if authority.contains('@') {
        return false;
    }
    let (host, _) = split_authority(authority);
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    host.parse::<std::net::IpAddr>().is_ok() || host == "localhost" || host.ends_with(".localhost")
}

/// Whether `authority` names one of `allowed` (DNS names the operator chose to serve under,
/// e.g. `plexus control --allowed-host`): compared without port, case or a trailing dot.
/// Userinfo is refused.
pub fn is_allowed_name(authority: &str, allowed: &[String]) -> bool {
    if authority.contains('@') || allowed.is_empty() {
        return false;
    }
    let (host, _) = split_authority(authority);
    let host = host.strip_suffix('.').unwrap_or(host);
    allowed.iter().any(|a| a.strip_suffix('.').unwrap_or(a).eq_ignore_ascii_case(host))
}

/// Whether a request's `Host` headers (`hosts`) and absolute-form target authority each pass
/// [`is_local_authority`] or name one of `allowed` ([`is_allowed_name`]). Without a `Host`
/// (HTTP/1.0 tools) there is no name to doubt: browsers always send one.
pub fn names_this_machine<'a>(
    hosts: impl IntoIterator<Item = &'a [u8]>,
    target: Option<&str>,
    allowed: &[String],
) -> bool {
    let ok = |a: &str| is_local_authority(a) || is_allowed_name(a, allowed);
    hosts.into_iter().all(|h| std::str::from_utf8(h).is_ok_and(ok)) && target.is_none_or(ok)
}

/// The namespace and service account of the control plane's own identity: the certificate it
/// serves the authenticated discovery port (7700) with and presents when it calls a proxy's
/// admin `/tap` and `/config` over mTLS (SPEC §5, §6).
pub const CONTROL_PLANE_NAMESPACE: &str = "plexus-system";
/// See [`CONTROL_PLANE_NAMESPACE`].
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "plexus-control";

/// The control plane's SPIFFE identity in `trust_domain`.
pub fn control_plane_spiffe_id(trust_domain: &str) -> String {
    spiffe_id(trust_domain, CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE_ACCOUNT)
}

/// The SPIFFE identity of a service account.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dns_name_is_a_mesh_name_only_in_a_known_namespace() {
        let known = |ns: &str| ["default", "prod"].contains(&ns);
        assert!(ServiceName::candidates_in("example.com", known).is_empty(), "com is no namespace");
        assert!(ServiceName::candidates_in("api.example.com", known).is_empty());
        assert!(ServiceName::candidates_in("EXAMPLE.COM.", known).is_empty());
        assert_eq!(ServiceName::candidates_in("reviews.prod", known), vec![ServiceName::new("reviews", "prod")]);
        assert_eq!(ServiceName::candidates_in("reviews", known), vec![ServiceName::new("reviews", "default")]);
        // The explicit forms name a namespace even before it is known.
        assert_eq!(ServiceName::candidates_in("a.new.svc", known), vec![ServiceName::new("a", "new")]);
        assert_eq!(ServiceName::candidates_in("a.new.svc.cluster.local", known), vec![ServiceName::new("a", "new")]);
    }

    #[test]
    fn host_candidates() {
        assert_eq!(ServiceName::candidates("reviews"), vec![ServiceName::new("reviews", "default")]);
        assert_eq!(
            ServiceName::candidates("Reviews.prod.svc.cluster.local."),
            vec![ServiceName::new("reviews", "prod")]
        );
        assert_eq!(ServiceName::candidates("reviews.prod.svc"), vec![ServiceName::new("reviews", "prod")]);
        assert!(ServiceName::candidates("www.example.com").is_empty());
    }

    #[test]
    fn local_authorities_are_addresses_and_localhost_only() {
        for local in [
            "127.0.0.1:7712",
            "127.0.0.1",
            "[::1]:7701",
            "10.251.0.2:7712",
            "[::ffff:127.0.0.1]:1",
            "localhost:7701",
            "LOCALHOST",
            "localhost.:80",
            "app.localhost:8080",
        ] {
            assert!(is_local_authority(local), "{local}");
        }
        for rebound in [
            "evil.example:7712",
            "evil.example",
            "127.0.0.1.nip.io:7712",
            "localhost.evil.example:7701",
            "user@127.0.0.1:7712",
            "127.0.0.1@evil.example",
            "reviews:9080",
            "",
            "127.1:7712",
        ] {
            assert!(!is_local_authority(rebound), "{rebound}");
        }
    }

    #[test]
    fn allowed_names_match_without_port_case_or_trailing_dot() {
        let allowed = vec!["dashboard.example".to_string(), "plexus.internal.".to_string()];
        for ok in ["dashboard.example", "Dashboard.Example.:8443", "dashboard.example:7701", "plexus.internal"] {
            assert!(is_allowed_name(ok, &allowed), "{ok}");
        }
        for refused in [
            "evil.example",
            "dashboard.example.evil",
            "x.dashboard.example",
            "user@dashboard.example",
            "dashboard.example@evil.example",
            "",
        ] {
            assert!(!is_allowed_name(refused, &allowed), "{refused}");
        }
        assert!(!is_allowed_name("dashboard.example", &[]));
        assert!(names_this_machine([b"dashboard.example:1".as_slice()], None, &allowed));
        assert!(!names_this_machine([b"dashboard.example".as_slice(), b"evil.example"], None, &allowed));
        assert!(!names_this_machine([b"127.0.0.1".as_slice()], Some("evil.example"), &allowed));
    }

    #[test]
    fn authorities() {
        assert_eq!(split_authority("reviews:9080"), ("reviews", Some(9080)));
        assert_eq!(split_authority("reviews"), ("reviews", None));
        assert_eq!(split_authority("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_authority("user@host:1"), ("host", Some(1)));
        assert_eq!(split_authority("a@b@c:5"), ("c", Some(5)));
        assert_eq!(split_authority("host:notaport"), ("host:notaport", None));
        assert_eq!(split_authority("host:"), ("host:", None));
        assert_eq!(split_authority("::1"), ("::1", None));
        assert_eq!(split_authority("[::1]"), ("::1", None));
        assert_eq!(split_authority(""), ("", None));
        assert_eq!(split_authority("u:p@host:8080"), ("host", Some(8080)));
        assert_eq!(split_authority("u:p@[::1]:7"), ("::1", Some(7)));
        assert_eq!(split_authority("h:1:2"), ("h:1:2", None));
        assert_eq!(split_authority("@:9"), ("", Some(9)));
        assert_eq!(split_authority("host:70000"), ("host:70000", None));
    }

    /// The scan agrees with splitting by the last `@` and then the only `:` (the definition).
    #[test]
    fn authorities_split_as_defined() {
        fn defined(a: &str) -> (&str, Option<u16>) {
            let a = a.rsplit_once('@').map_or(a, |(_, h)| h);
            if let Some(rest) = a.strip_prefix('[')
                && let Some((host, tail)) = rest.split_once(']')
            {
                return (host, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
            }
            match a.split_once(':') {
                Some((h, p)) if !p.contains(':') => p.parse().map_or((a, None), |p| (h, Some(p))),
                _ => (a, None),
            }
        }
        proptest::proptest!(|(a in "[a-z0-9@:\\[\\]+]{0,16}")| {
            proptest::prop_assert_eq!(split_authority(&a), defined(&a));
        });
    }
}
