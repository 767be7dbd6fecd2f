//! `plexus control`: runs the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use plexus_api::discovery::discovery_server::DiscoveryServer;
use plexus_api::identity::identity_server::IdentityServer;
use plexus_control::api::{ApiState, router};
use plexus_control::certify::CertifyService;
use plexus_control::datadir::DataDir;
use plexus_control::discovery::{DiscoveryService, expire_registrations, maintain_index};
use plexus_control::identity::Ca;
use plexus_control::index::Views;
use plexus_control::proxies::Proxies;
use plexus_control::store::{FileStore, Store};

use crate::Failure;

#[derive(clap::Args)]
pub struct ControlArgs {
    /// Where the store, tokens and certificates live.
    #[arg(long, env = "PLEXUS_DATA_DIR", default_value = "./.plexus")]
    data_dir: PathBuf,
    /// The store: `file` (embedded, in the data dir) or `kubernetes` (the Kubernetes API, with
    /// the in-cluster configuration or KUBECONFIG; proxies may then bootstrap with their pod's
    /// ServiceAccount token).
    #[arg(long, env = "PLEXUS_STORE", default_value = "file")]
    store: String,
    /// Kubernetes: import the trust anchor, issuer and admin token from this directory (the
    /// Secrets `plexus-identity` and `plexus-admin-token` mounted: `ca.crt`, `issuer.crt`,
    /// `issuer.key`, `admin-token`) instead of creating them in the data dir.
    #[arg(long, env = "PLEXUS_IDENTITY_DIR")]
    identity_dir: Option<PathBuf>,
    /// Kubernetes: the leader-election Lease (`plexus-control` in `plexus-system`) is taken over
    /// when its holder has not renewed it for this long. Only the leader writes status.
    #[arg(long, env = "PLEXUS_LEASE_DURATION", default_value = "15s", value_parser = crate::proxy_cmd::positive_duration)]
    lease_duration: Duration,
    /// Kubernetes: how often the leader renews the Lease (and the others look at it).
    #[arg(long, env = "PLEXUS_LEASE_RENEW_INTERVAL", default_value = "5s", value_parser = crate::proxy_cmd::positive_duration)]
    lease_renew_interval: Duration,
    /// HTTP API and dashboard address.
    #[arg(long, env = "PLEXUS_HTTP_ADDR", default_value = "127.0.0.1:7701")]
    http_addr: SocketAddr,
    /// A DNS name the HTTP API and dashboard answer to (e.g. the name of an ingress in front of
    /// the dashboard); repeatable, or comma-separated in the variable. Without it, only requests
    /// whose `Host` is an IP address or `localhost` are answered: a page of another name,
    /// rebound by DNS to this address, is refused (403).
    #[arg(long, env = "PLEXUS_ALLOWED_HOSTS", value_delimiter = ',', value_parser = allowed_host)]
    allowed_host: Vec<String>,
    /// gRPC address for proxies (discovery, certificate signing).
    #[arg(long, env = "PLEXUS_GRPC_ADDR", default_value = "127.0.0.1:7700")]
    grpc_addr: SocketAddr,
    /// How long a workload registered by its sidecar (`plexus run`) stays in the mesh after the
    /// last message from that sidecar; also how long a silent discovery stream is kept, and how
    /// long after a start an anchor rotation waits for proxies to reconnect. Sidecars send a
    /// message at least every `--heartbeat-interval` (5s): keep this a few times longer.
    #[arg(long, env = "PLEXUS_REGISTRATION_TTL", default_value = "15s", value_parser = crate::proxy_cmd::positive_duration)]
    registration_ttl: Duration,
    /// Serve the sidecar-injection webhook (HTTPS, AdmissionReview v1 on `/inject`) here, in
    /// any store mode; needs `--webhook-tls-dir`.
    #[arg(long, env = "PLEXUS_WEBHOOK_ADDR", requires = "webhook_tls_dir")]
    webhook_addr: Option<SocketAddr>,
    /// The webhook's serving certificate and key: `tls.crt` and `tls.key` (the
    /// `plexus-webhook-tls` Secret, mounted).
    #[arg(long, env = "PLEXUS_WEBHOOK_TLS_DIR")]
    webhook_tls_dir: Option<PathBuf>,
    /// The image of the containers the webhook injects.
    #[arg(long, env = "PLEXUS_PROXY_IMAGE", default_value_t = plexus_k8s::install::default_image())]
    proxy_image: String,
    /// The control-plane address injected proxies use (default: `https://<ClusterIP of
    /// plexus-control>:7700`, looked up per injection).
    #[arg(long, env = "PLEXUS_PROXY_CONTROL_PLANE")]
    proxy_control_plane: Option<String>,
}

pub async fn run(args: ControlArgs) -> Result<(), Failure> {
    if let Some(dir) = &args.identity_dir {
        plexus_k8s::install::import_identity(dir, &args.data_dir).map_err(Failure::runtime)?;
    }
    let kubernetes = match args.store.as_str() {
        "file" => None,
        "kubernetes" => {
            let store = plexus_k8s::store::KubeStore::connect().await.map_err(Failure::runtime)?;
            if let Err(e) = store.wait_synced(Duration::from_secs(30)).await {
                tracing::warn!(problem = %e, "serving before every Kubernetes watch has listed its kind");
            }
            for kind in store.absent_kinds() {
                tracing::warn!(%kind, "its CRD is not installed: no such objects are read");
            }
            Some(Arc::new(store))
        }
        other => {
            return Err(Failure::usage(format!("--store {other:?}: use `file` (embedded) or `kubernetes`")));
        }
    };
    let backend = kubernetes.as_ref().map(|k| {
        let store: Arc<dyn Store> = k.clone();
        let authenticator: Arc<dyn plexus_control::certify::Authenticator> =
            Arc::new(plexus_k8s::identity::TokenReviewAuthenticator::new(k.client()));
        (store, authenticator)
    });
    let webhook = match &args.webhook_addr {
        Some(addr) => {
            let options = plexus_k8s::webhook::WebhookOptions {
                addr: *addr,
                tls_dir: args.webhook_tls_dir.clone().unwrap_or_default(),
                data_dir: args.data_dir.clone(),
                image: args.proxy_image.clone(),
                control_plane: args.proxy_control_plane.clone(),
                certificate_poll: plexus_k8s::webhook::CERTIFICATE_POLL,
            };
            let client = kubernetes.as_ref().map(|k| k.client());
            Some(plexus_k8s::webhook::Webhook::bind(options, client).await.map_err(Failure::usage)?)
        }
        None => None,
    };
    let cp = ControlPlane::start_with(&args.data_dir, args.http_addr, args.grpc_addr, backend)
        .await?
        .with_registration_ttl(args.registration_ttl)
        .with_allowed_hosts(args.allowed_host.clone());
    // Kubernetes: every replica serves proxies; the Lease's holder alone writes status.
    let singletons = kubernetes.map(|store| {
        if args.lease_renew_interval >= args.lease_duration {
            tracing::warn!("--lease-renew-interval should be well below --lease-duration");
        }
        let identity = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| format!("plexus-control-{:08x}", fastrand::u32(..)));
        let settings =
            plexus_k8s::leader::LeaderSettings::new(identity, args.lease_duration, args.lease_renew_interval);
        let (leading_tx, leading) = tokio::sync::watch::channel(false);
        let (reports_tx, reports) = tokio::sync::watch::channel(Default::default());
        [
            tokio::spawn(plexus_k8s::leader::run(store.client(), settings, leading_tx)),
            tokio::spawn(plexus_k8s::status::watch_certificate_reports(
                cp.proxies.clone(),
                cp.serving.clone(),
                reports_tx,
            )),
            tokio::spawn(plexus_k8s::status::maintain(store, leading, reports)),
        ]
    });
    let mut ready = serde_json::json!({ "http": cp.http.to_string(), "grpc": cp.grpc.to_string(), "dataDir": args.data_dir.display().to_string() });
    let webhook = webhook.map(|w| {
        if let Ok(addr) = w.local_addr() {
            ready["webhook"] = serde_json::Value::String(addr.to_string());
        }
        tokio::spawn(w.serve())
    });
    println!("{ready}");
    let served = cp.serve(crate::proxy_cmd::shutdown_signal()).await;
    if let Some(w) = webhook {
        w.abort();
    }
    for task in singletons.into_iter().flatten() {
        task.abort();
    }
    served
}

/// A control plane with its listeners bound (used by `plexus control` and `plexus demo`).
pub struct ControlPlane {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub store: Arc<dyn Store>,
    pub proxies: Arc<Proxies>,
    pub data: DataDir,
    /// The certificate authority (loaded from the data dir).
    pub ca: Arc<Ca>,
    /// Workload tokens (`plexus token`; `plexus demo` creates its own).
    pub tokens: Arc<plexus_control::tokens::Tokens>,
    /// The control plane's own certificate (the TLS of the gRPC port).
    pub serving: Arc<plexus_control::grpc_tls::ServingIdentity>,
    /// Credentials other than workload tokens (Kubernetes: ServiceAccount tokens).
    pub authenticator: Option<Arc<dyn plexus_control::certify::Authenticator>>,
    /// DNS names the HTTP API answers to besides addresses and `localhost` (`--allowed-host`).
    pub allowed_hosts: Vec<String>,
    http_listener: tokio::net::TcpListener,
    grpc_listener: tokio::net::TcpListener,
}

impl ControlPlane {
    /// Initialises the data dir (tokens), opens the store and binds both listeners.
    pub async fn start(
        data_dir: &std::path::Path,
        http_addr: SocketAddr,
        grpc_addr: SocketAddr,
    ) -> Result<ControlPlane, Failure> {
        Self::start_with(data_dir, http_addr, grpc_addr, None).await
    }

    /// [`ControlPlane::start`] with another store than the data dir's file store, and an
    /// authenticator for credentials other than workload tokens (Kubernetes mode).
    pub async fn start_with(
        data_dir: &std::path::Path,
        http_addr: SocketAddr,
        grpc_addr: SocketAddr,
        backend: Option<(Arc<dyn Store>, Arc<dyn plexus_control::certify::Authenticator>)>,
    ) -> Result<ControlPlane, Failure> {
        let data = DataDir::init(data_dir)
            .map_err(|e| Failure::runtime(format!("cannot initialise the data dir {}: {e}", data_dir.display())))?;
        match plexus_control::identity::ensure_ca(&data.path, plexus_core::names::DEFAULT_TRUST_DOMAIN) {
            Ok(true) => tracing::info!(data_dir = %data.path.display(), "created the trust anchor and issuer"),
            Ok(false) => {}
            Err(e) => return Err(Failure::runtime(e)),
        }
        let ca = Arc::new(Ca::load(&data.path).map_err(Failure::runtime)?);
        if let Some(previous) = &ca.state().previous_anchor {
            tracing::info!(previous_anchor = %previous.summary.serial, "continuing the trust anchor rotation in progress");
        }
        let tokens = Arc::new(plexus_control::tokens::Tokens::open(&data.path).map_err(Failure::runtime)?);
        let (store, authenticator) = match backend {
            Some((store, authenticator)) => (store, Some(authenticator)),
            None => {
                let file = FileStore::open(&data.store_path()).map_err(|e| Failure::runtime(e.to_string()))?;
                (Arc::new(file) as Arc<dyn Store>, None)
            }
        };
        let bind = |addr: SocketAddr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Failure::runtime(format!("cannot listen on {addr}: {e}")))
        };
        let http_listener = bind(http_addr).await?;
        let grpc_listener = bind(grpc_addr).await?;
        let grpc = grpc_listener.local_addr().map_err(|e| Failure::runtime(e.to_string()))?;
        let serving = plexus_control::grpc_tls::ServingIdentity::new(ca.clone(), store.clone(), grpc)
            .map_err(|e| Failure::runtime(format!("the control plane's certificate: {e}")))?;
        Ok(ControlPlane {
            http: http_listener.local_addr().map_err(|e| Failure::runtime(e.to_string()))?,
            grpc,
            store,
            proxies: Arc::new(Proxies::default()),
            data,
            ca,
            tokens,
            serving,
            authenticator,
            allowed_hosts: Vec::new(),
            http_listener,
            grpc_listener,
        })
    }

    /// Registrations (and silent streams) expire after `ttl` instead of
    /// [`plexus_control::proxies::EXPIRY`].
    pub fn with_registration_ttl(mut self, ttl: Duration) -> Self {
        self.proxies = Arc::new(Proxies::new(ttl));
        self
    }

    /// Lets the HTTP API and dashboard answer requests whose `Host` is one of `names` (by
    /// default only addresses and `localhost`: DNS rebinding).
    pub fn with_allowed_hosts(mut self, names: Vec<String>) -> Self {
        self.allowed_hosts = names;
        self
    }

    /// Serves the HTTP API and the discovery and identity gRPC services until `shutdown`
    /// completes.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<(), Failure> {
        let ControlPlane {
            http,
            grpc,
            store,
            proxies,
            data,
            ca,
            tokens,
            serving,
            authenticator,
            allowed_hosts,
            http_listener,
            grpc_listener,
        } = self;
        let traffic = Arc::new(plexus_control::traffic::TrafficWindow::default());
        let state = Arc::new(ApiState {
            store: store.clone(),
            admin_token: data.admin_token.clone(),
            proxies: proxies.clone(),
            traffic: traffic.clone(),
            data_dir: data.path.clone(),
            ca: ca.clone(),
            bench: Arc::new(plexus_control::bench_results::BenchResults::open(&data.path)),
            tokens: tokens.clone(),
            serving: serving.clone(),
            applies: Default::default(),
            allowed_hosts,
        });
        let (views_tx, views_rx) = tokio::sync::watch::channel(Arc::new(Views::default()));
        let index = tokio::spawn(maintain_index(store.clone(), views_tx));
        let expiry = tokio::spawn(expire_registrations(store.clone(), proxies.clone()));
        let rotation = tokio::spawn(plexus_control::identity::maintain_rotation(ca.clone(), proxies.clone()));
        let certify = CertifyService::new(ca.clone(), store.clone(), tokens.clone()).with_authenticator(authenticator);
        let discovery = DiscoveryService { views: views_rx, store: store.clone(), proxies, traffic, ca };
        let tls = serving.server_config().map_err(|e| Failure::runtime(format!("gRPC TLS: {e}")))?;
        let renewal = tokio::spawn(serving.clone().maintain());
        let (stop_tx, _) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let grpc_server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .add_service(DiscoveryServer::new(discovery))
            .add_service(IdentityServer::new(certify))
            .serve_with_incoming_shutdown(
                plexus_control::grpc_tls::incoming(grpc_listener, tls),
                stopped(stop_tx.subscribe()),
            );
        tracing::info!(%http, %grpc, data_dir = %data.path.display(), "control plane ready");
        let http_server =
            axum::serve(http_listener, router(state)).with_graceful_shutdown(stopped(stop_tx.subscribe()));
        let trigger = async move {
            shutdown.await;
            stop_tx.send_replace(true);
        };
        let (h, g, ()) = tokio::join!(http_server, grpc_server, trigger);
        index.abort();
        expiry.abort();
        rotation.abort();
        renewal.abort();
        h.map_err(|e| Failure::runtime(e.to_string()))?;
        g.map_err(|e| Failure::runtime(e.to_string()))
    }
}

/// An `--allowed-host` value: a DNS name (case and a trailing dot ignored). Addresses need no
/// allowing.
fn allowed_host(s: &str) -> Result<String, String> {
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if name.parse::<std::net::IpAddr>().is_ok() || name.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("{s:?} is an address: addresses are always answered; give a DNS name"));
    }
    plexus_core::dns_name(&name, 253).map_err(|reason| format!("{s:?}: {reason}"))?;
    Ok(name)
}
