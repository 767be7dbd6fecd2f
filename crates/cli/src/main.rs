//! `plexus`: every command of the mesh — proxy, control plane, node agent, demo and the
//! management CLI — in one binary. (`plexus-proxy` is the proxy alone: `src/bin/`.)

mod agent_cmd;
mod api_client;
mod bench_cmd;
mod check_cmd;
mod control_cmd;
mod dashboard_cmd;
mod demo_cmd;
mod explain_cmd;
mod identity_cmd;
mod init_cmd;
mod inject_cmd;
mod install_cmd;
mod netns;
mod proxy_config_cmd;
mod redirect;
mod resources_cmd;
mod routes_cmd;
mod run_cmd;
mod sample_cmd;
mod stat_cmd;
mod tap_cmd;
mod token_cmd;
mod version_cmd;
mod wait_ready_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use plexus_cli::proxy_cmd::ProxyCli;
use plexus_cli::{Failure, exit_code, logging, proxy_cmd, runtime};

/// Plexus: a light, fast service mesh.
#[derive(Parser)]
#[command(name = "plexus", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "PLEXUS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a sidecar or gateway proxy.
    Proxy(Box<proxy_cmd::ProxyArgs>),
    /// Run the whole mesh on this machine: control plane, Bookinfo with sidecars, ingress, load.
    Demo(demo_cmd::DemoArgs),
    /// Run the control plane (embedded file store, resource API).
    Control(control_cmd::ControlArgs),
    /// Run the node agent: the proxies of this machine reach the control plane through it,
    /// over one shared connection.
    Agent(agent_cmd::AgentArgs),
    /// Create or update resources from files (validated first; all or nothing).
    Apply(resources_cmd::ApplyArgs),
    /// List resources of a kind, or show one.
    Get(resources_cmd::GetArgs),
    /// Delete a resource, or those named in files.
    Delete(resources_cmd::DeleteArgs),
    /// A running proxy's effective configuration (version, settings, services, endpoints, routes).
    ProxyConfig(proxy_config_cmd::ProxyConfigArgs),
    /// Health checks of the control plane, proxies and configuration.
    Check(check_cmd::CheckArgs),
    /// The effective routing table a proxy holds for a Service (matches, weights, filters, policies).
    Routes(routes_cmd::RoutesArgs),
    /// What would happen to a request: route, backends, filters, timeouts, retries, authorization.
    Explain(Box<explain_cmd::ExplainArgs>),
    /// Golden metrics (requests/s, success rate, latency percentiles) per service, workload, route.
    Stat(stat_cmd::StatArgs),
    /// Live stream of requests through the proxies of a target (route, decisions, outcome).
    Tap(Box<tap_cmd::TapArgs>),
    /// The busiest paths of a target, live, ranked by requests.
    Top(Box<tap_cmd::TopArgs>),
    /// Print (or open) the web dashboard's address.
    Dashboard(dashboard_cmd::DashboardArgs),
    /// Start a workload with its sidecar, registered in the mesh while it runs.
    Run(Box<run_cmd::RunArgs>),
    /// Wait until a sidecar has reached the control plane and holds its certificate (the
    /// injected proxy's postStart hook).
    WaitReady(wait_ready_cmd::WaitReadyArgs),
    /// Add the Plexus proxy to the pods of a YAML stream (for `kubectl apply -f -`).
    Inject(inject_cmd::InjectArgs),
    /// Install a pod's traffic redirect (iptables; the injected init container).
    Init(init_cmd::InitArgs),
    /// Create, show or rotate the mesh's trust anchor and issuer.
    Identity(identity_cmd::IdentityArgs),
    /// Workload tokens: create (bound to one identity), list, revoke.
    Token(token_cmd::TokenArgs),
    /// Print the manifests that install Plexus (`install kubernetes | kubectl apply -f -`).
    Install(install_cmd::InstallArgs),
    /// Run a Bookinfo sample service (used by `plexus demo`).
    #[command(hide = true)]
    Sample(sample_cmd::SampleArgs),
    /// Print CLI, control plane and proxy versions.
    Version(version_cmd::VersionArgs),
    /// Constant-rate load generation with SMP results; `bench compare A B` compares two runs.
    Bench(Box<bench_cmd::BenchArgs>),
}

/// The command line. `plexus proxy ...` (how every sidecar starts) is parsed on its own:
/// clap's tree of every subcommand's arguments stays allocated for the process's life, about
/// 150 KiB of each sidecar's private memory (RssAnon 1,160 → 1,012 KiB idle).
fn parse() -> Cli {
    if std::env::args_os().nth(1).is_some_and(|a| a == "proxy") {
        let p = ProxyCli::parse_from(std::env::args_os().skip(1));
        return Cli { log_format: p.log_format, command: Command::Proxy(Box::new(p.args)) };
    }
    Cli::parse()
}

fn main() -> ExitCode {
    let cli = parse();
    logging::init(&cli.log_format);
    let serves = matches!(
        cli.command,
        Command::Proxy(_)
            | Command::Demo(_)
            | Command::Control(_)
            | Command::Agent(_)
            | Command::Run(_)
            | Command::Sample(_)
    );
    if !serves {
        // A short-lived command piped into `head` ends quietly when the pipe closes, as Unix
        // tools do, instead of failing on every later write. Long-running commands keep
        // Rust's default (SIGPIPE ignored: a closed socket is an error, not a signal).
        // SAFETY: restoring a default signal disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // A sidecar (`proxy`, `run`) runs on one thread by default; so does a node agent.
    let workers = match &cli.command {
        Command::Proxy(args) => args.worker_threads(),
        Command::Run(_) | Command::Agent(_) => 1,
        _ => 0,
    };
    let runtime = match runtime(workers) {
        Ok(rt) => rt,
        Err(f) => return exit_code(Err(f)),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Proxy(args) => {
                let certificates: Option<std::sync::Arc<dyn plexus_proxy::gateway::certs::CertificateSource>> =
                    match args.certificate_source {
                        proxy_cmd::CertificateSourceKind::Kubernetes => Some(std::sync::Arc::new(
                            plexus_k8s::secrets::SecretCertificates::connect().await.map_err(Failure::runtime)?,
                        )),
                        proxy_cmd::CertificateSourceKind::Files => None,
                    };
                proxy_cmd::run_with(*args, certificates).await
            }
            Command::Demo(args) => demo_cmd::run(args).await,
            Command::Control(args) => control_cmd::run(args).await,
            Command::Agent(args) => agent_cmd::run(args).await,
            Command::Apply(args) => resources_cmd::apply(args).await,
            Command::Get(args) => resources_cmd::get(args).await,
            Command::Delete(args) => resources_cmd::delete(args).await,
            Command::Check(args) => check_cmd::run(args).await,
            Command::Routes(args) => routes_cmd::run(args).await,
            Command::Explain(args) => explain_cmd::run(*args).await,
            Command::ProxyConfig(args) => proxy_config_cmd::run(args).await,
            Command::Stat(args) => stat_cmd::run(args).await,
            Command::Tap(args) => tap_cmd::tap(*args).await,
            Command::Top(args) => tap_cmd::top(*args).await,
            Command::Dashboard(args) => dashboard_cmd::run(args).await,
            Command::Run(args) => run_cmd::run(*args).await,
            Command::Init(args) => init_cmd::run(args).await,
            Command::Inject(args) => inject_cmd::run(args).await,
            Command::WaitReady(args) => wait_ready_cmd::run(args).await,
            Command::Identity(args) => identity_cmd::run(args).await,
            Command::Token(args) => token_cmd::run(args).await,
            Command::Install(args) => install_cmd::run(args).await,
            Command::Sample(args) => sample_cmd::run(args).await,
            Command::Version(args) => version_cmd::run(args).await,
            Command::Bench(args) => bench_cmd::run(*args).await,
        }
    });
    exit_code(result)
}
