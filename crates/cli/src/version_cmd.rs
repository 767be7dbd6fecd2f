//! `plexus version`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Failure;

#[derive(clap::Args)]
pub struct VersionArgs {
    /// The control plane's HTTP API.
    #[arg(long, env = "PLEXUS_SERVER", default_value = "http://127.0.0.1:7701")]
    server: String,
}

pub async fn run(args: VersionArgs) -> Result<(), Failure> {
    println!("plexus CLI: {}", env!("CARGO_PKG_VERSION"));
    println!("proxy: {}", env!("CARGO_PKG_VERSION"));
    match control_plane_version(&args.server).await {
        Some(v) => println!("control plane: {v}"),
        None => println!("control plane: unreachable ({})", args.server),
    }
    Ok(())
}

/// Asks the control plane for its version (`GET /api/v1/version`), within one second.
async fn control_plane_version(server: &str) -> Option<String> {
    let authority = server.strip_prefix("http://")?.trim_end_matches('/');
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(authority).await.ok()?;
        let req = format!("GET /api/v1/version HTTP/1.0\r\nHost: {authority}\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.ok()?;
        let text = String::from_utf8_lossy(&resp);
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return None;
        }
        let v: plexus_control::api_types::VersionInfo = serde_json::from_str(body).ok()?;
        Some(v.version)
    };
    tokio::time::timeout(Duration::from_secs(1), fetch).await.ok().flatten()
}
