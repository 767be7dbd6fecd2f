//! `plexus control`: runs the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use plexus_control::api::{ApiState, router};
use plexus_control::datadir::DataDir;
use plexus_control::store::FileStore;

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
}

pub async fn run(args: ControlArgs) -> Result<(), Failure> {
    if args.store != "file" {
        return Err(Failure::usage(format!(
            "--store {:?}: this version supports only the embedded `file` store",
            args.store
        )));
    }
    let data = DataDir::init(&args.data_dir)
        .map_err(|e| Failure::runtime(format!("cannot initialise the data dir {}: {e}", args.data_dir.display())))?;
    let store = FileStore::open(&data.store_path()).map_err(|e| Failure::runtime(e.to_string()))?;
    let state = Arc::new(ApiState { store: Arc::new(store), admin_token: data.admin_token.clone() });
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .map_err(|e| Failure::runtime(format!("cannot listen on {}: {e}", args.http_addr)))?;
    let addr = listener.local_addr().map_err(|e| Failure::runtime(e.to_string()))?;
    tracing::info!(http = %addr, data_dir = %args.data_dir.display(), "control plane ready");
    println!("{}", serde_json::json!({ "http": addr.to_string(), "dataDir": args.data_dir.display().to_string() }));
    axum::serve(listener, router(state))
        .with_graceful_shutdown(crate::proxy_cmd::shutdown_signal())
        .await
        .map_err(|e| Failure::runtime(e.to_string()))
}
