//! `plexus install kubernetes`: prints the manifests that install Plexus on a cluster
//! (SPEC §11), for `kubectl apply -f -`.

use std::io::Write as _;
use std::path::PathBuf;

use plexus_cli::Failure;

#[derive(clap::Args)]
pub struct InstallArgs {
    #[command(subcommand)]
    target: Target,
}

#[derive(clap::Subcommand)]
enum Target {
    /// CRDs, namespace plexus-system, RBAC, Secrets, the control plane and the injection
    /// webhook, as one YAML stream.
    Kubernetes(KubernetesArgs),
}

#[derive(clap::Args)]
struct KubernetesArgs {
    /// The image every role runs from.
    #[arg(long, default_value_t = plexus_k8s::install::default_image())]
    image: String,
    /// Reuse the trust anchor, issuer, admin token and webhook certificate kept in this
    /// directory (created there when missing), so running the command again does not rotate
    /// them. Without it they are generated afresh.
    #[arg(long)]
    identity_dir: Option<PathBuf>,
    /// Leave out the Gateway API CRDs (HTTPRoute, GRPCRoute, Gateway): the cluster has the
    /// upstream ones.
    #[arg(long)]
    skip_gateway_api: bool,
}

pub async fn run(args: InstallArgs) -> Result<(), Failure> {
    let Target::Kubernetes(k) = args.target;
    let options = plexus_k8s::install::InstallOptions {
        image: k.image,
        identity_dir: k.identity_dir,
        skip_gateway_api: k.skip_gateway_api,
    };
    let yaml = tokio::task::spawn_blocking(move || plexus_k8s::install::render(&options))
        .await
        .map_err(|e| Failure::runtime(e.to_string()))?
        .map_err(Failure::runtime)?;
    let mut out = std::io::stdout().lock();
    out.write_all(yaml.as_bytes()).map_err(|e| Failure::runtime(format!("cannot write the manifests: {e}")))
}
