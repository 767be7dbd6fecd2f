//! `plexus agent`: the node agent, relaying the proxies of one machine to the control plane
//! over one HTTP/2 connection (see `plexus_control::node_agent`).

use std::net::SocketAddr;

use plexus_control::node_agent::NodeAgent;

use crate::Failure;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Where the machine's proxies connect (point their `--control-plane` /
    /// `PLEXUS_CONTROL_PLANE` here, e.g. http://127.0.0.1:7702).
    #[arg(long, env = "PLEXUS_AGENT_ADDR", default_value = "127.0.0.1:7702")]
    listen: SocketAddr,
    /// The control plane's gRPC address.
    #[arg(long, env = "PLEXUS_CONTROL_PLANE", default_value = "http://127.0.0.1:7700")]
    control_plane: String,
    /// The agent's own admin server: `/live`, `/ready`, `/metrics` (port 0 picks a free one).
    #[arg(long, env = "PLEXUS_AGENT_ADMIN_ADDR", default_value = "127.0.0.1:7703")]
    admin: SocketAddr,
}

pub async fn run(args: AgentArgs) -> Result<(), Failure> {
    let agent = NodeAgent::new(&args.control_plane).map_err(|e| Failure::usage(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| Failure::runtime(format!("cannot listen on {}: {e}", args.listen)))?;
    let address = listener.local_addr().map_err(|e| Failure::runtime(e.to_string()))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin)
        .await
        .map_err(|e| Failure::runtime(format!("cannot listen on {} (--admin): {e}", args.admin)))?;
    let admin = admin_listener.local_addr().map_err(|e| Failure::runtime(e.to_string()))?;
    let router = agent.admin_router();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(admin_listener, router).await {
            tracing::error!(error = %e, "the agent's admin server stopped");
        }
    });
    // One line on stdout with the bound addresses (port 0 picks a free one), as `plexus control` does.
    println!(
        "{}",
        serde_json::json!({ "listen": address.to_string(), "admin": admin.to_string(), "controlPlane": args.control_plane })
    );
    tracing::info!(%address, %admin, control_plane = %args.control_plane, "node agent ready");
    agent.serve(listener, crate::proxy_cmd::shutdown_signal()).await;
    Ok(())
}
