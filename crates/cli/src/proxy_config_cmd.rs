//! `plexus proxy-config WORKLOAD`: a running proxy's effective configuration, fetched through
//! the control plane (`GET /api/v1/proxies/{workload}/config`), which reads the proxy's admin
//! `/config` over mTLS — the one way that works in every mode, `--netns` included, where a
//! proxy's admin server answers `/config` off loopback only to the control plane.

use http_body_util::BodyExt as _;

use crate::Failure;
use crate::api_client::ServerArgs;

#[derive(clap::Args)]
pub struct ProxyConfigArgs {
    /// The workload (or gateway) name, as `plexus get workloads` shows it.
    workload: String,
    /// Only a proxy of this namespace (when several namespaces have a workload of that name).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
}

pub async fn run(args: ProxyConfigArgs) -> Result<(), Failure> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(ns) = &args.namespace {
        query.append_pair("namespace", ns);
    }
    let query = query.finish();
    // A path segment: every byte but unreserved ones encoded.
    let workload: String = form_urlencoded::byte_serialize(args.workload.as_bytes()).collect();
    let path = format!("/api/v1/proxies/{workload}/config{}{query}", if query.is_empty() { "" } else { "?" });
    let resp = args.server.stream(&path).await.map_err(|e| {
        if e.message.starts_with("no connected proxy") {
            Failure::runtime(format!("{}\n  hint: `plexus get workloads` lists them", e.message))
        } else {
            e
        }
    })?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::runtime(format!("reading the proxy's configuration: {e}")))?
        .to_bytes();
    print!("{}", String::from_utf8_lossy(&body));
    Ok(())
}
