//! `plexus control`: runs the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use plexus_api::discovery::discovery_server::DiscoveryServer;
use plexus_control::api::{ApiState, router};
use plexus_control::datadir::DataDir;
use plexus_control::discovery::{DiscoveryService, expire_registrations, maintain_index};
use plexus_control::index::Views;
use plexus_control::proxies::Proxies;
use plexus_control::store::{FileStore, Store};

use crate::Failure;

#[derive(clap::Args)]
pub struct ControlArgs {
    /// Where the store, tokens and certificates live.
    #[arg(long, env = "PLEXUS_DATA_DIR", default_value = "./.plexus")]
    data_dir: PathBuf,
    /// The store: `file` (embedded, in the data dir).
    #[arg(long, env = "PLEXUS_STORE", default_value = "file")]
    store: String,
    /// HTTP API and dashboard address.
    #[arg(long, env = "PLEXUS_HTTP_ADDR", default_value = "127.0.0.1:7701")]
    http_addr: SocketAddr,
    /// gRPC address for proxies (discovery).
    #[arg(long, env = "PLEXUS_GRPC_ADDR", default_value = "127.0.0.1:7700")]
    grpc_addr: SocketAddr,
}

pub async fn run(args: ControlArgs) -> Result<(), Failure> {
    if args.store != "file" {
        return Err(Failure::usage(format!("--store {:?}: this version supports only the embedded `file` store", args.store)));
    }
    let data = DataDir::init(&args.data_dir)
        .map_err(|e| Failure::runtime(format!("cannot initialise the data dir {}: {e}", args.data_dir.display())))?;
    let store: Arc<dyn Store> =
        Arc::new(FileStore::open(&data.store_path()).map_err(|e| Failure::runtime(e.to_string()))?);
    let proxies = Arc::new(Proxies::default());
    let state = Arc::new(ApiState { store: store.clone(), admin_token: data.admin_token.clone(), proxies: proxies.clone() });
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr).await.map_err(|e| Failure::runtime(format!("cannot listen on {addr}: {e}")))
    };
    let listener = bind(args.http_addr).await?;
    let http = listener.local_addr().map_err(|e| Failure::runtime(e.to_string()))?;
    let grpc_listener = bind(args.grpc_addr).await?;
    let grpc = grpc_listener.local_addr().map_err(|e| Failure::runtime(e.to_string()))?;

    let (views_tx, views_rx) = tokio::sync::watch::channel(Arc::new(Views::default()));
    tokio::spawn(maintain_index(store.clone(), views_tx));
    tokio::spawn(expire_registrations(store.clone(), proxies.clone()));
    let discovery = DiscoveryService { views: views_rx, store: store.clone(), proxies, join_token: data.join_token.clone() };
    let grpc_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(DiscoveryServer::new(discovery))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            crate::proxy_cmd::shutdown_signal(),
        );

    tracing::info!(%http, %grpc, data_dir = %args.data_dir.display(), "control plane ready");
    println!(
        "{}",
        serde_json::json!({ "http": http.to_string(), "grpc": grpc.to_string(), "dataDir": args.data_dir.display().to_string() })
    );
    let http_server = axum::serve(listener, router(state)).with_graceful_shutdown(crate::proxy_cmd::shutdown_signal());
    let (h, g) = tokio::join!(http_server, grpc_server);
    h.map_err(|e| Failure::runtime(e.to_string()))?;
    g.map_err(|e| Failure::runtime(e.to_string()))
}
