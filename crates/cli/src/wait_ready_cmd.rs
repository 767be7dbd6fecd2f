//! `plexus wait-ready`: returns once a sidecar is ready to carry the workload's traffic — it
//! has reached the control plane and holds its workload certificate (what `plexus run --netns`
//! waits for before starting the app). In an injected pod it is the proxy container's
//! `postStart` hook: the kubelet starts the app's containers only after it returns.

use std::net::IpAddr;
use std::time::Duration;

use crate::Failure;

#[derive(clap::Args)]
pub struct WaitReadyArgs {
    /// The proxy's admin address IP (in a pod: the pod IP, which the injected proxy's
    /// environment carries).
    #[arg(long, env = "PLEXUS_ADMIN_IP", default_value = "127.0.0.1")]
    admin_ip: IpAddr,
    #[arg(long, env = "PLEXUS_ADMIN_PORT", default_value_t = 7712)]
    admin_port: u16,
    /// Give up (exit 1) after this long.
    #[arg(long, default_value = "120s", value_parser = plexus_cli::proxy_cmd::positive_duration)]
    timeout: Duration,
}

pub async fn run(args: WaitReadyArgs) -> Result<(), Failure> {
    let admin = std::net::SocketAddr::new(args.admin_ip, args.admin_port).to_string();
    if crate::run_cmd::wait_connected(&admin, args.timeout).await {
        return Ok(());
    }
    Err(Failure::runtime(format!(
        "the proxy at {admin} did not reach the control plane with a certificate within {:?}",
        args.timeout
    )))
}
