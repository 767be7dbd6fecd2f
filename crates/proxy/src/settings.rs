//! Proxy settings given by flags or `PLEXUS_*` environment variables.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use plexus_core::ServiceName;

/// How a proxy picks an endpoint among a Service's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    /// Power of two choices over peak-EWMA latency × (pending + 1).
    #[default]
    Ewma,
    RoundRobin,
    /// Power of two choices over pending requests.
    LeastRequest,
}

impl FromStr for LoadBalancer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ewma" => Ok(LoadBalancer::Ewma),
            "roundRobin" | "round-robin" => Ok(LoadBalancer::RoundRobin),
            "leastRequest" | "least-request" => Ok(LoadBalancer::LeastRequest),
            other => Err(format!("unknown load balancer {other:?} (use ewma, roundRobin or leastRequest)")),
        }
    }
}

/// What a proxy is (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// A workload's sidecar: its outbound port is also an HTTP proxy into the mesh.
    #[default]
    Sidecar,
    /// The mesh's ingress gateway: forwards only what its configuration defines (its
    /// `--upstream` binds); no CONNECT, no absolute-form requests to other hosts, nothing on
    /// its outbound port.
    Ingress,
    /// The mesh's egress gateway.
    Egress,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sidecar" => Ok(Mode::Sidecar),
            "ingress" => Ok(Mode::Ingress),
            "egress" => Ok(Mode::Egress),
            other => Err(format!("unknown mode {other:?} (use sidecar, ingress or egress)")),
        }
    }
}

/// `--upstream SERVICE[.NAMESPACE][:PORT]=[IP:]LOCALPORT`: a local port whose every connection
/// goes to one Service port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UpstreamBind {
    pub service: ServiceName,
    pub port: Option<u16>,
    pub listen: SocketAddr,
}

impl FromStr for UpstreamBind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (target, local) =
            s.split_once('=').ok_or_else(|| format!("{s:?}: expected SERVICE[.NAMESPACE][:PORT]=[IP:]LOCALPORT"))?;
        let (host, port) = match target.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| format!("{s:?}: invalid service port {p:?}"))?)),
            None => (target, None),
        };
        let service = ServiceName::candidates(host)
            .into_iter()
            .next()
            .ok_or_else(|| format!("{s:?}: invalid service name {host:?}"))?;
        let listen = match local.rsplit_once(':') {
            Some((ip, p)) => SocketAddr::new(
                ip.parse().map_err(|_| format!("{s:?}: invalid IP {ip:?}"))?,
                p.parse().map_err(|_| format!("{s:?}: invalid local port {p:?}"))?,
            ),
            None => SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                local.parse().map_err(|_| format!("{s:?}: invalid local port {local:?}"))?,
            ),
        };
        Ok(UpstreamBind { service, port, listen })
    }
}

impl UpstreamBind {
    /// `name.namespace:port` (or `name.namespace` without a port), as printed at start-up.
    pub fn key(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.service),
            None => self.service.to_string(),
        }
    }
}

/// Everything a proxy needs besides its configuration source.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// The workload identity for mutual TLS between sidecars (with a control plane); `None`:
    /// plaintext (e.g. `--resources` mode).
    #[serde(skip)]
    pub identity: Option<std::sync::Arc<crate::identity::WorkloadIdentity>>,
    pub mode: Mode,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    /// Explicit mode: the inbound listener forwards to `127.0.0.1:app_port`.
    pub app_port: Option<u16>,
    pub upstreams: Vec<UpstreamBind>,
    /// Original-destination ports whose connections skip protocol detection.
    pub opaque_ports: Vec<u16>,
    pub load_balancer: LoadBalancer,
    /// This proxy's own workload (metrics' source labels), when known.
    pub workload: Option<String>,
    pub service: Option<String>,
    /// This proxy's workload version (inbound `destination_version`), when known.
    pub version: Option<String>,
    pub namespace: String,
    /// Print one JSON line per request on stdout.
    pub access_log: bool,
    /// `SO_MARK` on the proxy's upstream connections (netns mode: iptables lets them pass).
    pub outbound_mark: Option<u32>,
    /// A hosts file mapping Service virtual IPs to names (netns mode): a redirected
    /// connection to one of its addresses goes to that Service.
    #[serde(skip)]
    pub vip_hosts: Option<std::path::PathBuf>,
    /// Kubelet probes rewritten to the admin port (`/app-health/<container>/<kind>`, set by the
    /// injection webhook): forwarded to the app on 127.0.0.1.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub app_probes: std::collections::BTreeMap<String, AppProbe>,
    pub limits: Limits,
    /// Other servers of this proxy process (the DNS server, `--dns-addr`): like the proxy's own
    /// listeners, never a destination ([`crate::proxy::OwnListeners`]).
    pub other_listeners: Vec<SocketAddr>,
    /// Ingress mode: the Gateway whose listeners this proxy serves (`--gateway`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySettings>,
}

/// What an ingress gateway serving a `Gateway` needs besides the configuration.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySettings {
    /// The Gateway (`NAME[.NAMESPACE]`).
    pub name: plexus_core::ServiceName,
    /// The address its listeners bind (a listener's port on it).
    pub ip: std::net::IpAddr,
    /// Where certificates are read: `<tls_dir>/<namespace>/<name>/tls.crt` and `tls.key`,
    /// unless `certificate_source` is given.
    pub tls_dir: std::path::PathBuf,
    /// Where certificates come from instead of `tls_dir` (Kubernetes Secrets).
    #[serde(skip)]
    pub certificate_source: Option<std::sync::Arc<dyn crate::gateway::certs::CertificateSource>>,
    /// How often certificate files are checked for changes.
    #[serde(with = "secs")]
    pub certificate_poll: Duration,
}

/// Where a rewritten kubelet probe goes: the app's port and path on 127.0.0.1.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppProbe {
    pub port: u16,
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

/// Resource limits that keep bad or slow clients from hurting the proxy.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Largest request head (request line + headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Connections beyond this are closed at accept.
    pub max_connections: usize,
    /// Time allowed to receive a complete request head (slowloris protection).
    #[serde(with = "secs")]
    pub header_read_timeout: Duration,
    /// Time a request body may go without a byte before the response starts (a stalled
    /// upload): answered 408.
    #[serde(with = "secs")]
    pub request_body_timeout: Duration,
    /// Idle time after which a connection (HTTP keep-alive or TCP stream) is closed.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// Time allowed to connect to an upstream.
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    /// How long a drain waits for in-flight work.
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
    /// How long detection waits for the client's first bytes before it also tries the server
    /// (server-first protocols).
    #[serde(with = "secs")]
    pub client_first_wait: Duration,
    /// An HTTP/1 keep-alive connection quiet this long gives back its buffers (hyper's, about
    /// 16 KiB) until its next request (zero: never).
    #[serde(with = "secs")]
    pub release_idle_buffers_after: Duration,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&plexus_core::duration::format(*d))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            request_body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            client_first_wait: Duration::from_millis(10),
            release_idle_buffers_after: Duration::from_secs(2),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        let local = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        Settings {
            identity: None,
            mode: Mode::Sidecar,
            outbound: local(7710),
            inbound: local(7711),
            admin: local(7712),
            app_port: None,
            upstreams: Vec::new(),
            opaque_ports: Vec::new(),
            load_balancer: LoadBalancer::Ewma,
            workload: None,
            service: None,
            version: None,
            namespace: "default".into(),
            access_log: false,
            outbound_mark: None,
            vip_hosts: None,
            app_probes: Default::default(),
            limits: Limits::default(),
            other_listeners: Vec::new(),
            gateway: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_binds() {
        let b: UpstreamBind = "reviews.prod:9080=127.0.0.2:5000".parse().expect("valid");
        assert_eq!(b.service, ServiceName::new("reviews", "prod"));
        assert_eq!(b.port, Some(9080));
        assert_eq!(b.listen, "127.0.0.2:5000".parse().expect("addr"));
        let b: UpstreamBind = "db=0".parse().expect("valid");
        assert_eq!((b.key().as_str(), b.listen.port()), ("db.default", 0));
        assert!("db".parse::<UpstreamBind>().is_err());
        assert!("db:x=1".parse::<UpstreamBind>().is_err());
    }
}
