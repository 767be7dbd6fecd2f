//! `plexus proxy`: runs a sidecar or gateway.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use plexus_core::MeshSnapshot;
use plexus_proxy::control_plane::{AppReadiness, ControlPlaneConfig};
use plexus_proxy::discovery::{Discovery, FileError, FileSource};
use plexus_proxy::dns::{DiscoveryNames, DnsServer, DnsSettings};
use plexus_proxy::gateway::certs::CertificateSource;
use plexus_proxy::settings::Limits;
use plexus_proxy::{LoadBalancer, Proxy, Settings, UpstreamBind};

use crate::Failure;

fn parse_mark(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("invalid mark {s:?}: {e}"))
}

/// `--app-probes`: the admin path → app probe table.
#[derive(Clone, Debug)]
pub struct AppProbes(std::collections::BTreeMap<String, plexus_proxy::settings::AppProbe>);

fn parse_app_probes(s: &str) -> Result<AppProbes, String> {
    let table: std::collections::BTreeMap<String, plexus_proxy::settings::AppProbe> =
        serde_json::from_str(s).map_err(|e| format!("invalid probe table (JSON): {e}"))?;
    if let Some(bad) = table.keys().find(|k| !k.starts_with("/app-health/")) {
        return Err(format!("probe path {bad:?} does not start with /app-health/"));
    }
    Ok(AppProbes(table))
}

/// How often `plexus run` (and a sidecar started by it) probes the app before registering it.
pub const APP_READY_INTERVAL: Duration = Duration::from_millis(100);

/// Parses a duration flag (`500ms`, `10s`, `5m`).
pub fn duration(s: &str) -> Result<Duration, String> {
    plexus_core::duration::parse(s)
}

/// A duration over zero (an interval or a TTL).
pub fn positive_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: must be longer than zero")),
        d => Ok(d),
    }
}

/// How often a sidecar talks to the control plane (`plexus proxy`, `plexus run`).
#[derive(clap::Args, Clone, Debug)]
pub struct ControlPlaneTimingArgs {
    /// How often the sidecar sends the control plane a message when nothing changes. The
    /// control plane removes a registered workload whose sidecar is silent for its
    /// `--registration-ttl` (15s): keep this a few times shorter.
    #[arg(long, env = "PLEXUS_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = positive_duration)]
    pub heartbeat_interval: Duration,
    /// The longest wait between attempts to reach the control plane (starts at 100ms and
    /// doubles); meanwhile the proxy serves with the configuration it last received.
    #[arg(long, env = "PLEXUS_CONTROL_PLANE_RETRY_MAX", default_value = "5s", value_parser = positive_duration)]
    pub control_plane_retry_max: Duration,
}

impl ControlPlaneTimingArgs {
    pub fn timing(&self) -> plexus_proxy::control_plane::Timing {
        plexus_proxy::control_plane::Timing {
            heartbeat: self.heartbeat_interval,
            retry_max: self.control_plane_retry_max,
        }
    }

    /// The same settings as `plexus proxy` arguments (for a sidecar started as a process).
    pub fn to_args(&self) -> [String; 4] {
        [
            "--heartbeat-interval".into(),
            plexus_core::duration::format(self.heartbeat_interval),
            "--control-plane-retry-max".into(),
            plexus_core::duration::format(self.control_plane_retry_max),
        ]
    }
}

/// `plexus proxy` parsed on its own: the arguments a sidecar starts with (also the whole
/// command line of `plexus-proxy`).
#[derive(clap::Parser)]
#[command(name = "plexus proxy", bin_name = "plexus proxy", about = "Run a sidecar or gateway proxy.")]
pub struct ProxyCli {
    /// Log format on stderr.
    #[arg(long, env = "PLEXUS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(flatten)]
    pub args: ProxyArgs,
}

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// Run with no control plane from a file of resources (Service, Workload, HTTPRoute),
    /// re-read whenever it changes.
    #[arg(long, env = "PLEXUS_RESOURCES", conflicts_with = "control_plane")]
    resources: Option<PathBuf>,
    /// The control plane's gRPC address (e.g. http://127.0.0.1:7700): configuration comes from
    /// it, fetched per destination on first use.
    #[arg(long, env = "PLEXUS_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    #[command(flatten)]
    pub control_plane_timing: ControlPlaneTimingArgs,
    /// What this proxy is: a workload's sidecar, or the mesh's ingress or egress gateway.
    #[arg(long, env = "PLEXUS_MODE", default_value = "sidecar", value_parser = ["sidecar", "ingress", "egress"])]
    pub mode: String,
    /// SO_MARK for the proxy's own upstream connections (transparent interception lets marked
    /// packets through; netns mode uses 0x504c).
    #[arg(long, env = "PLEXUS_OUTBOUND_MARK", value_parser = parse_mark)]
    pub outbound_mark: Option<u32>,
    /// A hosts file whose addresses are Service virtual IPs (netns mode: `/etc/hosts`).
    #[arg(long, env = "PLEXUS_VIP_HOSTS")]
    pub vip_hosts: Option<PathBuf>,
    /// A Workload (JSON) to register with the control plane while running (`plexus run --netns`).
    #[arg(long, hide = true)]
    pub register_json: Option<String>,
    /// With `--register-json`: register only once the app accepts connections on
    /// 127.0.0.1:PORT (and answers 2xx on `--app-ready-path`, if given).
    #[arg(long, hide = true)]
    pub register_when_ready: Option<u16>,
    #[arg(long, hide = true)]
    pub app_ready_path: Option<String>,
    /// The workload token (`plexus token create`): bootstraps the certificate, needed to register.
    #[arg(long, env = "PLEXUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file holding the token, re-read at every bootstrap: in a pod, its ServiceAccount
    /// token (`/var/run/secrets/kubernetes.io/serviceaccount/token`), which the control plane
    /// proves with a TokenReview.
    #[arg(long, env = "PLEXUS_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Trust anchor(s), PEM, to verify the control plane with (default: the anchor the
    /// workload token pins; `plexus token create --anchor-out FILE` writes it).
    #[arg(long, visible_alias = "trust-anchor", env = "PLEXUS_ANCHOR")]
    pub anchor: Option<PathBuf>,
    /// Trust anchor(s) as PEM text (how the injection webhook passes them to a pod's proxy).
    #[arg(long, env = "PLEXUS_TRUST_ANCHOR_PEM", hide = true, hide_env_values = true)]
    pub trust_anchor_pem: Option<String>,
    /// FOR BENCHMARKS: use the workload certificate with the control plane only, and talk to
    /// peers in plaintext.
    #[arg(long, hide = true)]
    pub plaintext_peers: bool,
    /// This proxy's workload version (metrics labels, service discovery).
    #[arg(long = "workload-version", env = "PLEXUS_WORKLOAD_VERSION")]
    pub workload_version: Option<String>,
    /// Outbound listener port (0 = pick a free one).
    #[arg(long, env = "PLEXUS_OUTBOUND_PORT", default_value_t = 7710)]
    pub outbound_port: u16,
    /// Inbound listener port (0 = pick a free one).
    #[arg(long, env = "PLEXUS_INBOUND_PORT", default_value_t = 7711)]
    pub inbound_port: u16,
    /// Admin server port (0 = pick a free one).
    #[arg(long, env = "PLEXUS_ADMIN_PORT", default_value_t = 7712)]
    pub admin_port: u16,
    #[arg(long, env = "PLEXUS_OUTBOUND_IP", default_value = "127.0.0.1")]
    outbound_ip: IpAddr,
    #[arg(long, env = "PLEXUS_INBOUND_IP", default_value = "127.0.0.1")]
    inbound_ip: IpAddr,
    #[arg(long, env = "PLEXUS_ADMIN_IP", default_value = "127.0.0.1")]
    admin_ip: IpAddr,
    /// The local application's port: the inbound listener forwards to 127.0.0.1:PORT.
    /// Without it, only transparently redirected inbound traffic (original destination) works.
    #[arg(long, env = "PLEXUS_APP_PORT")]
    pub app_port: Option<u16>,
    /// SERVICE[.NAMESPACE][:PORT]=[IP:]LOCALPORT: a local port whose every connection goes to
    /// that Service port (HTTP is detected and routed; anything else is forwarded as TCP).
    #[arg(long = "upstream", env = "PLEXUS_UPSTREAMS", value_delimiter = ',')]
    pub upstreams: Vec<UpstreamBind>,
    /// Destination ports whose connections skip protocol detection.
    #[arg(long, env = "PLEXUS_OPAQUE_PORTS", value_delimiter = ',')]
    opaque_ports: Vec<u16>,
    /// Endpoint choice: ewma (P2C over peak-EWMA latency), roundRobin or leastRequest.
    #[arg(long, env = "PLEXUS_LOAD_BALANCER", default_value = "ewma")]
    load_balancer: LoadBalancer,
    /// This proxy's workload name (metrics labels).
    #[arg(long, env = "PLEXUS_WORKLOAD")]
    pub workload: Option<String>,
    /// This proxy's service name (metrics labels).
    #[arg(long, env = "PLEXUS_SERVICE")]
    pub service: Option<String>,
    /// The workload's service account: its identity is
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> (default: the service name).
    #[arg(long, env = "PLEXUS_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    #[arg(long, env = "PLEXUS_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Print one JSON access-log line per request on stdout.
    #[arg(long, env = "PLEXUS_ACCESS_LOG")]
    access_log: bool,
    /// Connections accepted at once; more are closed at accept.
    #[arg(long, env = "PLEXUS_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Largest request head accepted (request line + headers); larger gets 431.
    #[arg(long, env = "PLEXUS_MAX_HEADER_BYTES", default_value_t = 65_536)]
    max_header_bytes: usize,
    /// Time allowed to receive a request head.
    #[arg(long, env = "PLEXUS_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
    header_read_timeout: Duration,
    /// Time a request body may go without a byte before the response starts (a stalled
    /// upload is answered 408).
    #[arg(long, env = "PLEXUS_REQUEST_BODY_TIMEOUT", default_value = "30s", value_parser = duration)]
    request_body_timeout: Duration,
    /// Idle time after which a TCP stream, upgraded connection or idle HTTP/2 client
    /// connection is closed.
    #[arg(long, env = "PLEXUS_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    idle_timeout: Duration,
    /// An HTTP/1 keep-alive connection quiet this long gives back its buffers (about 16 KiB)
    /// until its next request; 0s keeps them.
    #[arg(long, env = "PLEXUS_RELEASE_IDLE_BUFFERS_AFTER", default_value = "2s", value_parser = duration)]
    release_idle_buffers_after: Duration,
    #[arg(long, env = "PLEXUS_CONNECT_TIMEOUT", default_value = "1s", value_parser = duration)]
    connect_timeout: Duration,
    /// Threads serving traffic: 1 runs the whole proxy on one thread (no wake-ups across
    /// threads: the least CPU per request), 0 = one per CPU this process may run on. Default:
    /// 1 for a sidecar (one workload's traffic, beside it on the same machine), 0 for the
    /// ingress and egress gateways.
    #[arg(long, env = "PLEXUS_PROXY_WORKERS")]
    pub workers: Option<usize>,
    /// Answer DNS on this address (UDP and TCP; a pod's is 127.0.0.1:7753): mesh Service names
    /// get the Service's virtual address, other names are forwarded to `--dns-resolv-conf`'s
    /// nameservers. Off unless given.
    #[arg(long, env = "PLEXUS_DNS_ADDR")]
    pub dns_addr: Option<SocketAddr>,
    /// Where the upstream nameservers and search domains for `--dns-addr` come from.
    #[arg(long, env = "PLEXUS_DNS_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    pub dns_resolv_conf: PathBuf,
    /// Kubelet probes rewritten to the admin port, as JSON `{"/app-health/C/KIND": {"port": N,
    /// "path": "/healthz"}}` (set by the injection webhook): forwarded to the app.
    #[arg(long, env = "PLEXUS_APP_PROBES", value_parser = parse_app_probes, hide_env_values = true)]
    app_probes: Option<AppProbes>,
    /// Ingress mode: serve the listeners of this Gateway (`NAME[.NAMESPACE]`, namespace
    /// default `--namespace`) and the routes attached to it.
    #[arg(long, env = "PLEXUS_GATEWAY")]
    pub gateway: Option<String>,
    /// Where the Gateway's certificates are: `<DIR>/<namespace>/<name>/tls.crt` and `tls.key`
    /// (default `<data dir>/tls`).
    #[arg(long, env = "PLEXUS_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Where the Gateway's certificates come from: `files` (under `--tls-dir`) or `kubernetes`
    /// (the `kubernetes.io/tls` Secrets its listeners name, read with the pod's
    /// ServiceAccount; `plexus proxy` only, not `plexus-proxy`).
    #[arg(long, env = "PLEXUS_CERTIFICATE_SOURCE", value_enum, default_value = "files")]
    pub certificate_source: CertificateSourceKind,
    /// The address the Gateway's listeners bind.
    #[arg(long, env = "PLEXUS_GATEWAY_IP", default_value = "127.0.0.1")]
    gateway_ip: IpAddr,
    /// How often certificate files are checked for changes.
    #[arg(long, env = "PLEXUS_CERTIFICATE_POLL", default_value = "2s", value_parser = duration)]
    certificate_poll: Duration,
    /// The data dir (default `./.plexus`): certificates are under `<data dir>/tls` unless
    /// `--tls-dir` says otherwise.
    #[arg(long, env = "PLEXUS_DATA_DIR", default_value = ".plexus")]
    data_dir: PathBuf,
    /// How long a drain (SIGTERM, POST /shutdown) waits for in-flight work.
    #[arg(long, env = "PLEXUS_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    drain_timeout: Duration,
}

/// `--certificate-source`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateSourceKind {
    Files,
    Kubernetes,
}

impl ProxyArgs {
    /// Runtime threads to start (see `--workers`); 0 = one per CPU.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or(if self.mode == "sidecar" { 1 } else { 0 })
    }

    pub fn settings(self) -> Settings {
        self.settings_with(None)
    }

    /// The settings, the gateway's certificates coming from `certificates` when given.
    fn settings_with(self, certificates: Option<Arc<dyn CertificateSource>>) -> Settings {
        let gateway = self.gateway.as_deref().map(|g| plexus_proxy::settings::GatewaySettings {
            name: match g.split_once('.') {
                Some((name, ns)) => plexus_core::ServiceName::new(name, ns),
                None => plexus_core::ServiceName::new(g, self.namespace.as_str()),
            },
            ip: self.gateway_ip,
            tls_dir: self.tls_dir.clone().unwrap_or_else(|| self.data_dir.join("tls")),
            certificate_poll: self.certificate_poll,
            certificate_source: certificates,
        });
        Settings {
            gateway,
            identity: None,
            mode: self.mode.parse().unwrap_or_default(),
            outbound: SocketAddr::new(self.outbound_ip, self.outbound_port),
            inbound: SocketAddr::new(self.inbound_ip, self.inbound_port),
            admin: SocketAddr::new(self.admin_ip, self.admin_port),
            app_port: self.app_port,
            upstreams: self.upstreams,
            opaque_ports: self.opaque_ports,
            load_balancer: self.load_balancer,
            workload: self.workload,
            service: self.service,
            version: self.workload_version.clone().filter(|v| !v.is_empty()),
            namespace: self.namespace,
            access_log: self.access_log,
            outbound_mark: self.outbound_mark,
            vip_hosts: self.vip_hosts,
            other_listeners: self.dns_addr.into_iter().collect(),
            app_probes: self.app_probes.map(|p| p.0).unwrap_or_default(),
            limits: Limits {
                max_header_bytes: self.max_header_bytes,
                max_connections: self.max_connections,
                header_read_timeout: self.header_read_timeout,
                request_body_timeout: self.request_body_timeout,
                idle_timeout: self.idle_timeout,
                release_idle_buffers_after: self.release_idle_buffers_after,
                connect_timeout: self.connect_timeout,
                drain_timeout: self.drain_timeout,
                ..Limits::default()
            },
        }
    }
}

/// The DNS server's settings (`--dns-addr`), if it is on.
fn dns_settings(args: &ProxyArgs) -> Result<Option<DnsSettings>, Failure> {
    let Some(listen) = args.dns_addr else { return Ok(None) };
    let path = &args.dns_resolv_conf;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Failure::usage(format!("--dns-resolv-conf {}: {e}", path.display()))),
    };
    let mut settings = DnsSettings::from_resolv_conf(listen, &text);
    settings.mark = args.outbound_mark;
    Ok(Some(settings))
}

/// Binds the DNS server (fails before serving if its address is taken) and serves it.
async fn start_dns(
    settings: Option<DnsSettings>,
    discovery: Arc<Discovery>,
    namespace: String,
) -> Result<Option<tokio::task::JoinHandle<()>>, Failure> {
    let Some(settings) = settings else { return Ok(None) };
    let names = Arc::new(DiscoveryNames { discovery, namespace, wait: Duration::from_secs(3) });
    let server = DnsServer::bind(settings, names).await.map_err(|e| Failure::runtime(e.to_string()))?;
    Ok(Some(tokio::spawn(server.run())))
}

pub async fn run(args: ProxyArgs) -> Result<(), Failure> {
    run_with(args, None).await
}

/// Runs the proxy; a gateway's certificates come from `certificates` when given (the `plexus`
/// binary passes the Kubernetes Secrets source for `--certificate-source kubernetes`; this
/// library does not link the Kubernetes client, so `plexus-proxy` stays small).
pub async fn run_with(mut args: ProxyArgs, certificates: Option<Arc<dyn CertificateSource>>) -> Result<(), Failure> {
    if args.certificate_source == CertificateSourceKind::Kubernetes && certificates.is_none() {
        return Err(Failure::usage(
            "--certificate-source kubernetes: this binary does not read Kubernetes Secrets; run `plexus proxy`"
                .to_string(),
        ));
    }
    let dns = dns_settings(&args)?;
    let namespace = args.namespace.clone();
    if args.gateway.is_some() && args.mode != "ingress" {
        return Err(Failure::usage("--gateway serves a Gateway's listeners: it needs --mode ingress".to_string()));
    }
    if let Some(address) = args.control_plane.take() {
        let mut anchors_pem = match &args.anchor {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| Failure::usage(format!("--anchor {}: {e}", path.display())))?,
            ),
            None => None,
        };
        if let Some(pem) = args.trust_anchor_pem.as_deref().filter(|p| !p.trim().is_empty()) {
            anchors_pem = Some(format!("{}{pem}\n", anchors_pem.unwrap_or_default()));
        }
        if let Some(path) = &args.token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|e| Failure::usage(format!("--token-file {}: {e}", path.display())))?;
            args.token = Some(token.trim().to_string());
        }
        let config = ControlPlaneConfig {
            address,
            timing: args.control_plane_timing.timing(),
            workload: args.workload.clone().unwrap_or_default(),
            namespace: args.namespace.clone(),
            service: args.service.clone().unwrap_or_default(),
            version: args.workload_version.clone().unwrap_or_default(),
            mode: args.mode.clone(),
            admin_address: String::new(),
            token: args.token.clone().unwrap_or_default(),
            register: None,
            token_file: args.token_file.clone(),
            service_account: args
                .service_account
                .clone()
                .or_else(|| args.service.clone())
                .unwrap_or_else(|| "default".into()),
            identity: None,
            app_readiness: args.register_when_ready.map(|port| AppReadiness {
                addr: ([127, 0, 0, 1], port).into(),
                http_path: args.app_ready_path.clone(),
                interval: APP_READY_INTERVAL,
            }),
            anchors_pem,
            tls: None,
            plaintext_peers: args.plaintext_peers,
        };
        let register = args.register_json.take().map(String::into_bytes);
        let sidecar = Sidecar::start_registering(args.settings_with(certificates), config, |_| register)?;
        let dns = start_dns(dns, sidecar.discovery.clone(), namespace).await?;
        println!("{}", sidecar.ready_line());
        sidecar.release_startup_pages_when_connected();
        sidecar.run(shutdown_signal()).await;
        if let Some(dns) = dns {
            dns.abort();
        }
        return Ok(());
    }
    let resources = args.resources.take();
    let (discovery, source) = match resources {
        Some(path) => {
            let source = FileSource::new(&path);
            let (snapshot, bytes) = source.load().map_err(|e| match e {
                FileError::Invalid(e) => Failure::usage(format!("invalid resources file {}\n{e}", path.display())),
                read @ FileError::Read { .. } => Failure::usage(read.to_string()),
            })?;
            (Discovery::new(snapshot), Some((source, bytes)))
        }
        None => {
            tracing::warn!("no --resources file and no --control-plane: only forwarding to explicit hosts");
            (Discovery::new(MeshSnapshot::default()), None)
        }
    };
    let proxy = Proxy::bind(args.settings_with(certificates), discovery.clone())
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let dns = start_dns(dns, discovery.clone(), namespace).await?;
    let addresses = serde_json::to_string(proxy.addresses()).map_err(|e| Failure::runtime(e.to_string()))?;
    tracing::info!(listening = %addresses, "proxy ready");
    println!("{addresses}");
    release_startup_pages();
    if let Some((source, bytes)) = source {
        tokio::spawn(source.watch(Arc::clone(&discovery), bytes));
    }
    proxy.run(shutdown_signal()).await;
    if let Some(dns) = dns {
        dns.abort();
    }
    Ok(())
}

/// A proxy fed by the control plane (used by `plexus proxy --control-plane` and `plexus run`).
pub struct Sidecar {
    pub proxy: Proxy,
    discovery: Arc<Discovery>,
    leave: tokio::sync::watch::Sender<bool>,
    control: tokio::task::JoinHandle<()>,
    identity: Option<Arc<plexus_proxy::identity::WorkloadIdentity>>,
}

impl Sidecar {
    /// Binds the listeners and starts the control-plane session.
    pub fn start(settings: Settings, config: ControlPlaneConfig) -> Result<Sidecar, Failure> {
        Sidecar::start_registering(settings, config, |_| None)
    }

    /// Like [`Sidecar::start`], registering the workload `register` builds from the bound
    /// addresses (JSON).
    pub fn start_registering(
        settings: Settings,
        mut config: ControlPlaneConfig,
        register: impl FnOnce(&plexus_proxy::proxy::Addresses) -> Option<Vec<u8>>,
    ) -> Result<Sidecar, Failure> {
        let discovery = Discovery::new_lazy();
        let mut settings = settings;
        // With a workload token the proxy gets a workload certificate: mTLS between sidecars
        // and to the control plane (which serves nobody else).
        if !config.token.is_empty() {
            let identity = plexus_proxy::identity::WorkloadIdentity::new();
            let tls = plexus_proxy::cp_tls::ControlPlaneTls::new(
                &config.token,
                config.anchors_pem.as_deref(),
                Some(identity.credentials.clone()),
            )
            .map_err(|e| Failure::usage(format!("{e:#}")))?;
            if !config.plaintext_peers {
                settings.identity = Some(identity.clone());
            }
            config.identity = Some(identity);
            config.tls = Some(tls);
        }
        let proxy = Proxy::bind(settings, discovery.clone()).map_err(|e| Failure::runtime(e.to_string()))?;
        if let (Some(identity), Some(tls)) = (&config.identity, &config.tls) {
            let gauge = proxy.handle().metrics_gauge_for_identity();
            tokio::spawn(identity.clone().run(
                plexus_proxy::identity::IdentityConfig {
                    address: config.address.clone(),
                    tls: tls.clone(),
                    token: config.token.clone(),
                    token_file: config.token_file.clone(),
                    namespace: config.namespace.clone(),
                    service_account: config.service_account.clone(),
                },
                move |not_after| {
                    gauge.set(not_after);
                },
            ));
            tokio::spawn(plexus_proxy::telemetry::report_loop(
                proxy.telemetry(),
                tls.clone(),
                config.address.clone(),
                config.workload.clone(),
                config.namespace.clone(),
                config.service.clone(),
            ));
        } else {
            tracing::warn!("no workload token (--token, PLEXUS_TOKEN): the control plane will not serve this proxy");
        }
        config.admin_address = proxy.addresses().admin.to_string();
        config.register = register(proxy.addresses());
        let (leave, leave_rx) = tokio::sync::watch::channel(false);
        let identity = config.identity.clone();
        let control = tokio::spawn(plexus_proxy::control_plane::run(discovery.clone(), config, leave_rx));
        Ok(Sidecar { proxy, discovery, leave, control, identity })
    }

    /// The JSON line with the listeners' addresses.
    pub fn ready_line(&self) -> String {
        serde_json::to_string(self.proxy.addresses()).unwrap_or_default()
    }

    /// Waits until the control plane has answered once and, with a workload token, the sidecar
    /// holds its workload certificate (so its first requests already go over mTLS), or
    /// `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.connected()).await.is_ok()
    }

    /// Releases the start-up pages (`resident`) when start-up is over: at the control plane's
    /// first answer and, with a workload token, the workload certificate.
    pub fn release_startup_pages_when_connected(&self) {
        let connected = self.connected();
        tokio::spawn(async move {
            connected.await;
            release_startup_pages();
        });
    }

    /// Completes once the control plane has answered once and, with a workload token, the
    /// sidecar holds its workload certificate (or either side has gone).
    fn connected(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let discovery = self.discovery.clone();
        let identity = self.identity.clone();
        async move {
            let mut changes = discovery.subscribe();
            let connected = async {
                while !discovery.control_plane_connected() {
                    if changes.changed().await.is_err() {
                        return;
                    }
                }
            };
            let certified = async {
                let Some(identity) = &identity else { return };
                let mut certs = identity.subscribe();
                while identity.info().is_none() {
                    if certs.changed().await.is_err() {
                        return;
                    }
                }
            };
            tokio::join!(connected, certified);
        }
    }

    /// A switch that, turned on, makes the sidecar leave the mesh: it deregisters (peers stop
    /// sending new requests) and closes its control-plane stream.
    pub fn leave_handle(&self) -> tokio::sync::watch::Sender<bool> {
        self.leave.clone()
    }

    /// Serves until `shutdown`, or until the control plane says the workload has finished
    /// (a completed Job's pod), then deregisters and drains.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let Sidecar { proxy, leave, control, discovery, .. } = self;
        let mut finished = discovery.workload_finished();
        proxy
            .run(async {
                tokio::select! {
                    _ = shutdown => {}
                    _ = finished.wait_for(|f| *f) => {}
                }
                leave.send_replace(true);
            })
            .await;
        leave.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(3), control).await;
    }
}

/// Start-up is over: its code and read-only data need not stay mapped (`resident`).
fn release_startup_pages() {
    let bytes = crate::resident::release_startup_pages();
    tracing::debug!(bytes, "start-up over: the executable's read-only pages released");
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
