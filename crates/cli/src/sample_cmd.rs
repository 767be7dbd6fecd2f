//! `plexus sample APP`: runs one of the Bookinfo sample services (used by `plexus demo`).

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
}

pub async fn run(args: SampleArgs) -> Result<(), Failure> {
    let app = plexus_samples::App::from_service(&args.service, Some(&args.version))
        .map_err(|e| Failure::usage(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .map_err(|e| Failure::runtime(format!("cannot listen on 127.0.0.1:{}: {e}", args.port)))?;
    tokio::select! {
        r = plexus_samples::serve(app, listener, plexus_samples::Upstreams::from_env()) => r.map_err(|e| Failure::runtime(format!("{e:#}"))),
        _ = crate::proxy_cmd::shutdown_signal() => Ok(()),
    }
}
