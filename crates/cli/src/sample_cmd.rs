//! `plexus sample APP`: runs one of the Bookinfo sample services (used by `plexus demo`).

use std::time::Duration;

use crate::Failure;

#[derive(clap::Args)]
pub struct SampleArgs {
    /// productpage, details, reviews or ratings.
    service: String,
    /// Version (reviews: v1, v2 or v3).
    #[arg(long, default_value = "v1")]
    version: String,
    /// Port to listen on (127.0.0.1).
    #[arg(long)]
    port: u16,
    /// On SIGTERM/SIGINT: how long requests in flight get to finish before the app exits.
    #[arg(long, default_value = "5s", value_parser = crate::proxy_cmd::duration)]
    drain_timeout: Duration,
}

pub async fn run(args: SampleArgs) -> Result<(), Failure> {
    let app = plexus_samples::App::from_service(&args.service, Some(&args.version))
        .map_err(|e| Failure::usage(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .map_err(|e| Failure::runtime(format!("cannot listen on 127.0.0.1:{}: {e}", args.port)))?;
    // The drain deadline starts at the signal, not at start-up.
    let (signalled_tx, signalled) = tokio::sync::oneshot::channel::<()>();
    let serve = plexus_samples::serve_until(app, listener, plexus_samples::Upstreams::from_env(), async move {
        crate::proxy_cmd::shutdown_signal().await;
        let _ = signalled_tx.send(());
    });
    let mut serve = std::pin::pin!(serve);
    tokio::select! {
        r = &mut serve => return r.map_err(|e| Failure::runtime(format!("{e:#}"))),
        _ = signalled => {}
    }
    match tokio::time::timeout(args.drain_timeout, serve).await {
        Ok(r) => r.map_err(|e| Failure::runtime(format!("{e:#}"))),
        Err(_) => {
            tracing::warn!(timeout = ?args.drain_timeout, "requests still in flight at the drain deadline; exiting");
            Ok(())
        }
    }
}
