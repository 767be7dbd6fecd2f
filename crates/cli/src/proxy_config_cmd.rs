//! `plexus proxy-config WORKLOAD`: a running proxy's effective configuration, fetched from its
//! admin server (found through the control plane).

use std::time::Duration;

use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::Failure;
use crate::api_client::{ServerArgs, api_error};

#[derive(clap::Args)]
pub struct ProxyConfigArgs {
    /// The workload (or gateway) name, as `plexus get workloads` shows it.
    workload: String,
    #[command(flatten)]
    server: ServerArgs,
}

pub async fn run(args: ProxyConfigArgs) -> Result<(), Failure> {
    let (status, answer) = args.server.call(Method::GET, "/api/v1/proxies", None, false).await?;
    if status != StatusCode::OK {
        return Err(api_error(status, &answer));
    }
    let proxies = answer["proxies"].as_array().cloned().unwrap_or_default();
    let admin = proxies
        .iter()
        .find(|p| p["workload"] == args.workload.as_str())
        .and_then(|p| p["adminAddress"].as_str().map(str::to_string))
        .ok_or_else(|| {
            Failure::runtime(format!(
                "no connected proxy for workload {:?}\n  hint: `plexus get workloads` lists them",
                args.workload
            ))
        })?;
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(&admin).await?;
        s.write_all(format!("GET /config HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| Failure::runtime(format!("the proxy's admin server {admin} did not answer")))?
        .map_err(|e| Failure::runtime(format!("cannot reach the proxy's admin server {admin}: {e}")))?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    print!("{body}");
    Ok(())
}
