//! `plexus proxy`: runs a sidecar or gateway.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use plexus_core::MeshSnapshot;
use plexus_proxy::discovery::{Discovery, FileError, FileSource};
use plexus_proxy::settings::Limits;
use plexus_proxy::{LoadBalancer, Proxy, Settings, UpstreamBind};

use crate::Failure;

fn duration(s: &str) -> Result<Duration, String> {
    plexus_core::duration::parse(s)
}

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// Run with no control plane from a file of resources (Service, Workload, HTTPRoute),
    /// re-read whenever it changes.
    #[arg(long, env = "PLEXUS_RESOURCES")]
    resources: Option<PathBuf>,
    /// Outbound listener port (0 = pick a free one).
    #[arg(long, env = "PLEXUS_OUTBOUND_PORT", default_value_t = 7710)]
    outbound_port: u16,
    /// Inbound listener port (0 = pick a free one).
    #[arg(long, env = "PLEXUS_INBOUND_PORT", default_value_t = 7711)]
    inbound_port: u16,
    /// Admin server port (0 = pick a free one).
    #[arg(long, env = "PLEXUS_ADMIN_PORT", default_value_t = 7712)]
    admin_port: u16,
    #[arg(long, env = "PLEXUS_OUTBOUND_IP", default_value = "127.0.0.1")]
    outbound_ip: IpAddr,
    #[arg(long, env = "PLEXUS_INBOUND_IP", default_value = "127.0.0.1")]
    inbound_ip: IpAddr,
    #[arg(long, env = "PLEXUS_ADMIN_IP", default_value = "127.0.0.1")]
    admin_ip: IpAddr,
    /// The local application's port: the inbound listener forwards to 127.0.0.1:PORT.
    /// Without it, only transparently redirected inbound traffic (original destination) works.
    #[arg(long, env = "PLEXUS_APP_PORT")]
    app_port: Option<u16>,
    /// SERVICE[.NAMESPACE][:PORT]=[IP:]LOCALPORT: a local port whose every connection goes to
    /// that Service port (HTTP is detected and routed; anything else is forwarded as TCP).
    #[arg(long = "upstream", env = "PLEXUS_UPSTREAMS", value_delimiter = ',')]
    upstreams: Vec<UpstreamBind>,
    /// Destination ports whose connections skip protocol detection.
    #[arg(long, env = "PLEXUS_OPAQUE_PORTS", value_delimiter = ',')]
    opaque_ports: Vec<u16>,
    /// Endpoint choice: ewma (P2C over peak-EWMA latency), roundRobin or leastRequest.
    #[arg(long, env = "PLEXUS_LOAD_BALANCER", default_value = "ewma")]
    load_balancer: LoadBalancer,
    /// This proxy's workload name (metrics labels).
    #[arg(long, env = "PLEXUS_WORKLOAD")]
    workload: Option<String>,
    /// This proxy's service name (metrics labels).
    #[arg(long, env = "PLEXUS_SERVICE")]
    service: Option<String>,
    #[arg(long, env = "PLEXUS_NAMESPACE", default_value = "default")]
    namespace: String,
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
    /// Idle time after which a TCP stream or upgraded connection is closed.
    #[arg(long, env = "PLEXUS_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    idle_timeout: Duration,
    #[arg(long, env = "PLEXUS_CONNECT_TIMEOUT", default_value = "1s", value_parser = duration)]
    connect_timeout: Duration,
    /// How long a drain (SIGTERM, POST /shutdown) waits for in-flight work.
    #[arg(long, env = "PLEXUS_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    drain_timeout: Duration,
}

impl ProxyArgs {
    fn settings(self) -> Settings {
        Settings {
            outbound: SocketAddr::new(self.outbound_ip, self.outbound_port),
            inbound: SocketAddr::new(self.inbound_ip, self.inbound_port),
            admin: SocketAddr::new(self.admin_ip, self.admin_port),
            app_port: self.app_port,
            upstreams: self.upstreams,
            opaque_ports: self.opaque_ports,
            load_balancer: self.load_balancer,
            workload: self.workload,
            service: self.service,
            namespace: self.namespace,
            access_log: self.access_log,
            limits: Limits {
                max_header_bytes: self.max_header_bytes,
                max_connections: self.max_connections,
                header_read_timeout: self.header_read_timeout,
                idle_timeout: self.idle_timeout,
                connect_timeout: self.connect_timeout,
                drain_timeout: self.drain_timeout,
                ..Limits::default()
            },
        }
    }
}

pub async fn run(mut args: ProxyArgs) -> Result<(), Failure> {
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
            tracing::warn!("no --resources file and no control plane: only forwarding to explicit hosts");
            (Discovery::new(MeshSnapshot::default()), None)
        }
    };
    let proxy = Proxy::bind(args.settings(), discovery.clone()).map_err(|e| Failure::runtime(e.to_string()))?;
    let addresses = serde_json::to_string(proxy.addresses()).map_err(|e| Failure::runtime(e.to_string()))?;
    tracing::info!(listening = %addresses, "proxy ready");
    println!("{addresses}");
    if let Some((source, bytes)) = source {
        tokio::spawn(source.watch(Arc::clone(&discovery), bytes));
    }
    proxy.run(shutdown_signal()).await;
    Ok(())
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
