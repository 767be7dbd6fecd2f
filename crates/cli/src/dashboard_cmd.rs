//! `plexus dashboard`: where the web UI is (the control plane serves it at its HTTP address).

use http::Method;

use crate::Failure;
use crate::api_client::ServerArgs;

#[derive(clap::Args)]
pub struct DashboardArgs {
    /// Also open it in the desktop's browser (`xdg-open`).
    #[arg(long)]
    open: bool,
    #[command(flatten)]
    server: ServerArgs,
}

pub async fn run(args: DashboardArgs) -> Result<(), Failure> {
    // Reachable first: a URL that does not answer helps nobody.
    args.server.call(Method::GET, "/healthz", None, false).await?;
    let url = format!("{}/", args.server.server.trim_end_matches('/'));
    println!("Plexus dashboard: {url}");
    if args.open {
        match std::process::Command::new("xdg-open").arg(&url).status() {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("xdg-open exited with {s}; open the URL above by hand"),
            Err(e) => eprintln!("cannot run xdg-open ({e}); open the URL above by hand"),
        }
    }
    Ok(())
}
