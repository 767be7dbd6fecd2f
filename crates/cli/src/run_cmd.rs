//! `plexus run`: a workload with its sidecar, registered in the mesh while it runs.

use std::path::PathBuf;
use std::time::Duration;

use plexus_proxy::Settings;
use plexus_proxy::control_plane::{AppReadiness, ControlPlaneConfig};
use serde_json::json;

use crate::Failure;
use crate::proxy_cmd::{Sidecar, shutdown_signal};

#[derive(clap::Args)]
pub struct RunArgs {
    /// The control plane's HTTP API (`--netns` reads the Services from it for name resolution).
    #[arg(long, env = "PLEXUS_SERVER", default_value = "http://127.0.0.1:7701")]
    server: String,
    /// The Service this workload serves (its `app` label).
    #[arg(long)]
    service: String,
    /// Its version label.
    #[arg(long, default_value = "v1")]
    version: String,
    /// The application's own port (omit for a pure client).
    #[arg(long)]
    port: Option<u16>,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Defaults to the service name.
    #[arg(long)]
    service_account: Option<String>,
    /// Run the workload in its own network namespace with transparent interception (root).
    #[arg(long)]
    netns: bool,
    /// A workload token for this service account (`plexus token create`). Default: where the
    /// admin token is readable in --data-dir, `plexus run` creates one for itself.
    #[arg(long, env = "PLEXUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[arg(long, env = "PLEXUS_CONTROL_PLANE", default_value = "http://127.0.0.1:7700")]
    control_plane: String,
    #[command(flatten)]
    control_plane_timing: crate::proxy_cmd::ControlPlaneTimingArgs,
    #[arg(long, env = "PLEXUS_DATA_DIR", default_value = "./.plexus")]
    data_dir: PathBuf,
    /// Sidecar ports (0 = pick free ones).
    #[arg(long, default_value_t = 0)]
    outbound_port: u16,
    #[arg(long, default_value_t = 0)]
    inbound_port: u16,
    #[arg(long, default_value_t = 0)]
    admin_port: u16,
    /// The sidecar's keep-alive idle timeout (connections with no request in flight, and idle
    /// TCP streams, are closed after it).
    #[arg(long, default_value = "5m", value_parser = crate::proxy_cmd::duration)]
    idle_timeout: Duration,
    /// How long a request head may take from its first byte (slowloris protection).
    #[arg(long, default_value = "10s", value_parser = crate::proxy_cmd::duration)]
    header_read_timeout: Duration,
    /// An HTTP path on the app's port that must answer 2xx before the workload is registered
    /// (without it, the port accepting connections is enough).
    #[arg(long)]
    ready_path: Option<String>,
    /// On SIGTERM/SIGINT: how long the workload and its sidecar get, together, to finish what
    /// is in flight (the workload leaves the mesh first, then gets SIGTERM, then the sidecar
    /// drains); whatever is left at the deadline is killed.
    #[arg(long, default_value = "9s", value_parser = crate::proxy_cmd::duration)]
    stop_timeout: Duration,
    /// The workload's command.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Makes the child receive SIGTERM if this process dies (even by SIGKILL), so a workload never
/// outlives its sidecar.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe and only affects the child being spawned.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// After leaving the mesh, how long peers get to see the workload gone before it is stopped
/// (so no new request is sent to an app that is stopping), at most a third of the stop budget.
const LEAVE_GRACE: Duration = Duration::from_millis(500);

/// Why `plexus run` stops.
enum Stop {
    /// The workload exited on its own.
    Exited(std::io::Result<std::process::ExitStatus>),
    /// SIGTERM or SIGINT.
    Signal,
    /// The sidecar stopped (admin `POST /shutdown`, or it died): the workload goes with it.
    SidecarStopped,
}

/// SIGTERM to the workload's process group, then waits for it until `deadline` (then SIGKILL).
async fn stop_app(
    child: &mut tokio::process::Child,
    deadline: tokio::time::Instant,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on the process group of a child we spawned (it leads its group).
        unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGTERM) };
    }
    match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            tracing::warn!("the workload did not exit in time; killing it");
            let _ = child.kill().await;
            child.wait().await
        }
    }
}

/// The share of the stop budget that waits for the workload; the rest is the sidecar's drain.
fn app_deadline(started: tokio::time::Instant, budget: Duration) -> tokio::time::Instant {
    started + budget.mul_f64(0.8)
}

/// The exit of `plexus run`: the workload's status, or a failure when the sidecar stopped
/// first (a supervisor should restart the pair).
fn exit_of(sidecar_stopped: bool, status: std::io::Result<std::process::ExitStatus>) -> Result<(), Failure> {
    let status = status.map_err(|e| Failure::runtime(format!("waiting for the workload: {e}")))?;
    if sidecar_stopped {
        return Err(Failure::runtime(format!(
            "the sidecar stopped, so the workload was stopped with it (workload exit: {status})"
        )));
    }
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(Failure { code: code.clamp(1, 255) as u8, message: String::new() }),
        None => Err(Failure { code: 1, message: String::new() }),
    }
}

pub async fn run(args: RunArgs) -> Result<(), Failure> {
    let service_account = args.service_account.clone().unwrap_or_else(|| args.service.clone());
    let token = match args.token.clone().filter(|t| !t.trim().is_empty()) {
        Some(t) => t,
        None => {
            let servers = crate::api_client::ServerArgs::new(args.server.clone(), args.data_dir.clone());
            crate::token_cmd::create_for(&servers, &args.namespace, &service_account).await.map_err(|e| {
                Failure::usage(format!(
                    "no workload token: {}\n  hint: pass --token (or PLEXUS_TOKEN) from `plexus token create --service-account {service_account} --namespace {}`, or run where the control plane's data dir is (--data-dir)",
                    e.message, args.namespace
                ))
            })?
        }
    };
    let workload = format!("{}-{}-{:05x}", args.service, args.version, fastrand::u32(..) & 0xfffff);
    if args.netns {
        return run_in_netns(&args, token, workload, service_account).await;
    }
    let settings = Settings {
        outbound: ([127, 0, 0, 1], args.outbound_port).into(),
        inbound: ([127, 0, 0, 1], args.inbound_port).into(),
        admin: ([127, 0, 0, 1], args.admin_port).into(),
        app_port: args.port,
        workload: Some(workload.clone()),
        service: Some(args.service.clone()),
        version: Some(args.version.clone()).filter(|v| !v.is_empty()),
        namespace: args.namespace.clone(),
        limits: plexus_proxy::settings::Limits {
            idle_timeout: args.idle_timeout,
            header_read_timeout: args.header_read_timeout,
            ..Default::default()
        },
        ..Settings::default()
    };
    let config = ControlPlaneConfig {
        address: args.control_plane.clone(),
        timing: args.control_plane_timing.timing(),
        workload: workload.clone(),
        namespace: args.namespace.clone(),
        service: args.service.clone(),
        version: args.version.clone(),
        mode: "sidecar".into(),
        admin_address: String::new(),
        token,
        register: None,
        token_file: None,
        service_account: service_account.clone(),
        identity: None,
        // Registered only once the app listens: no peer is sent traffic before that.
        app_readiness: args.port.map(|p| AppReadiness {
            addr: ([127, 0, 0, 1], p).into(),
            http_path: args.ready_path.clone(),
            interval: crate::proxy_cmd::APP_READY_INTERVAL,
        }),
        anchors_pem: None,
        tls: None,
        plaintext_peers: false,
    };
    let (app_port, service, version, namespace) =
        (args.port, args.service.clone(), args.version.clone(), args.namespace.clone());
    let sidecar = Sidecar::start_registering(settings, config, |addrs| {
        let ports: Vec<serde_json::Value> = app_port
            .map(|p| json!({"name": "http", "port": addrs.inbound.port(), "targetPort": p}))
            .into_iter()
            .collect();
        let w = json!({
            "apiVersion": "plexus.dev/v1alpha1",
            "kind": "Workload",
            "metadata": {"name": workload, "namespace": namespace, "labels": {"app": service, "version": version}},
            "spec": {"address": addrs.inbound.ip().to_string(), "ports": ports, "serviceAccount": service_account, "meshed": true},
        });
        serde_json::to_vec(&w).ok()
    })?;
    let outbound = sidecar.proxy.addresses().outbound;
    tracing::info!(workload = %sidecar.proxy.addresses().admin, "sidecar listening; waiting for the control plane");
    if !sidecar.wait_connected(Duration::from_secs(15)).await {
        tracing::warn!(control_plane = %args.control_plane, "control plane not reached yet; starting the workload anyway (the sidecar keeps retrying)");
    }
    let proxy_url = format!("http://{outbound}");
    let mut child = tokio::process::Command::new(&args.command[0]);
    child
        .args(&args.command[1..])
        .env("HTTP_PROXY", &proxy_url)
        .env("http_proxy", &proxy_url)
        .env("PLEXUS_WORKLOAD", sidecar.proxy.addresses().admin.to_string())
        .env_remove("PLEXUS_TOKEN")
        .kill_on_drop(true)
        .process_group(0);
    die_with_parent(&mut child);
    let mut child = child.spawn().map_err(|e| Failure::runtime(format!("cannot start {:?}: {e}", args.command[0])))?;
    sidecar.release_startup_pages_when_connected();
    let leave = sidecar.leave_handle();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut proxy_task = tokio::spawn(sidecar.run(async {
        let _ = stop_rx.await;
    }));

    let stop = tokio::select! {
        status = child.wait() => Stop::Exited(status),
        _ = shutdown_signal() => Stop::Signal,
        _ = &mut proxy_task => Stop::SidecarStopped,
    };
    let started = tokio::time::Instant::now();
    let sidecar_stopped = matches!(stop, Stop::SidecarStopped);
    let status = match stop {
        Stop::Exited(status) => status,
        Stop::Signal => {
            // Leave the mesh first so peers stop sending new requests, then stop the app: it
            // finishes what it is serving while the sidecar still carries its calls.
            leave.send_replace(true);
            tokio::time::sleep(LEAVE_GRACE.min(args.stop_timeout / 3)).await;
            stop_app(&mut child, app_deadline(started, args.stop_timeout)).await
        }
        Stop::SidecarStopped => {
            tracing::error!("the sidecar stopped (admin POST /shutdown or a crash); stopping the workload with it");
            stop_app(&mut child, app_deadline(started, args.stop_timeout)).await
        }
    };
    leave.send_replace(true);
    let _ = stop_tx.send(());
    if !proxy_task.is_finished() && tokio::time::timeout_at(started + args.stop_timeout, &mut proxy_task).await.is_err()
    {
        tracing::warn!("the sidecar did not finish draining within --stop-timeout");
        proxy_task.abort();
    }
    exit_of(sidecar_stopped, status)
}

/// `--netns`: the workload and its sidecar in their own network namespace, traffic
/// intercepted transparently, Service names resolved to virtual IPs through the hosts file.
async fn run_in_netns(args: &RunArgs, token: String, workload: String, service_account: String) -> Result<(), Failure> {
    crate::netns::require_root()?;
    // Inside the namespace 127.0.0.1 is the pod's own loopback: reach the control plane on
    // the bridge address instead.
    let control_plane = args.control_plane.replace("127.0.0.1", &crate::netns::GATEWAY.to_string());
    let cp_port = control_plane.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).unwrap_or(7700);
    let pod = std::sync::Arc::new(crate::netns::Pod::create(cp_port)?);
    let servers = crate::api_client::ServerArgs::new(args.server.clone(), args.data_dir.clone());
    refresh_hosts(&pod, &servers).await;
    let ports: Vec<serde_json::Value> =
        args.port.map(|p| json!({"name": "http", "port": p, "targetPort": p})).into_iter().collect();
    let registration = json!({
        "apiVersion": "plexus.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": workload, "namespace": args.namespace, "labels": {"app": args.service, "version": args.version}},
        "spec": {"address": pod.ip.to_string(), "ports": ports, "serviceAccount": service_account, "meshed": true},
    });
    let exe = std::env::current_exe().map_err(|e| Failure::runtime(e.to_string()))?;
    let mut sidecar = pod.exec(&exe.to_string_lossy());
    sidecar
        .args([
            "proxy",
            "--control-plane",
            &control_plane,
            "--inbound-ip",
            "0.0.0.0",
            "--admin-ip",
            &pod.ip.to_string(),
        ])
        .args(["--outbound-mark", crate::netns::MARK, "--vip-hosts", "/etc/hosts"])
        .args([
            "--workload",
            &workload,
            "--service",
            &args.service,
            "--workload-version",
            &args.version,
            "--namespace",
            &args.namespace,
            "--service-account",
            &service_account,
        ])
        .args(["--register-json", &registration.to_string()])
        .args(args.port.map(|p| ["--register-when-ready".to_string(), p.to_string()]).into_iter().flatten())
        .args(args.ready_path.iter().flat_map(|p| ["--app-ready-path", p.as_str()]))
        .args(["--drain-timeout", &format!("{}ms", (args.stop_timeout / 5).as_millis().max(1))])
        .args(args.control_plane_timing.to_args())
        .args(["--idle-timeout", &format!("{}ms", args.idle_timeout.as_millis())])
        .args(["--header-read-timeout", &format!("{}ms", args.header_read_timeout.as_millis())])
        // The token goes through the environment, never the command line (visible to every
        // local user in /proc).
        .env("PLEXUS_TOKEN", &token)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    die_with_parent(&mut sidecar);
    let mut sidecar = sidecar.spawn().map_err(|e| Failure::runtime(format!("cannot start the sidecar: {e}")))?;
    let stdout = sidecar.stdout.take().ok_or_else(|| Failure::runtime("sidecar stdout"))?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    match tokio::time::timeout(Duration::from_secs(15), lines.next_line()).await {
        Ok(Ok(Some(_ready))) => {}
        _ => return Err(Failure::runtime("the sidecar did not start (see its log above)")),
    }
    let admin = format!("{}:7712", pod.ip);
    if !wait_connected(&admin, Duration::from_secs(15)).await {
        tracing::warn!(%control_plane, "the sidecar has not reached the control plane yet; starting the workload anyway");
    }
    let hosts_pod = pod.clone();
    let refresher = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            refresh_hosts(&hosts_pod, &servers).await;
        }
    });
    let mut app = pod.exec(&args.command[0]);
    app.args(&args.command[1..]).env_remove("PLEXUS_TOKEN").kill_on_drop(true).process_group(0);
    die_with_parent(&mut app);
    let mut app = app.spawn().map_err(|e| Failure::runtime(format!("cannot start {:?}: {e}", args.command[0])))?;
    let stop = tokio::select! {
        status = app.wait() => Stop::Exited(status),
        _ = shutdown_signal() => Stop::Signal,
        _ = sidecar.wait() => Stop::SidecarStopped,
    };
    let started = tokio::time::Instant::now();
    let sidecar_stopped = matches!(stop, Stop::SidecarStopped);
    let status = match stop {
        Stop::Exited(status) => status,
        Stop::Signal => {
            // The sidecar deregisters first (peers stop sending new requests), then the app stops.
            signal(&sidecar, libc::SIGTERM);
            tokio::time::sleep(LEAVE_GRACE.min(args.stop_timeout / 3)).await;
            stop_app(&mut app, app_deadline(started, args.stop_timeout)).await
        }
        Stop::SidecarStopped => {
            tracing::error!("the sidecar stopped (admin POST /shutdown or a crash); stopping the workload with it");
            stop_app(&mut app, app_deadline(started, args.stop_timeout)).await
        }
    };
    refresher.abort();
    signal(&sidecar, libc::SIGTERM);
    if tokio::time::timeout_at(started + args.stop_timeout, sidecar.wait()).await.is_err() {
        let _ = sidecar.kill().await;
    }
    // The namespace is deleted when the last reference (this one, once the refresher is
    // gone) is dropped.
    drop(pod);
    exit_of(sidecar_stopped, status)
}

fn signal(child: &tokio::process::Child, sig: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on a child we spawned.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }
}

/// Rewrites the pod's hosts file from the control plane's Services.
async fn refresh_hosts(pod: &crate::netns::Pod, servers: &crate::api_client::ServerArgs) {
    let Ok((services, _)) = servers.list_all(plexus_core::Kind::Service).await else {
        return;
    };
    let services: Vec<(String, String)> =
        services.iter().map(|s| (s.metadata.name.clone(), s.metadata.namespace().to_string())).collect();
    if let Err(e) = pod.write_hosts(&services) {
        tracing::warn!(error = %e.message, "cannot update the hosts file");
    }
}

/// Polls the sidecar's admin `/metrics` until it reports a control-plane connection and a
/// workload certificate.
pub(crate) async fn wait_connected(admin: &str, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let probe = async {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
            // `/metrics`: the admin endpoint anyone may read off loopback (`/config` answers
            // only the control plane there, SPEC §5).
            s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes()).await.ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).await.ok()?;
            // Connected, and holding its workload certificate (mTLS from the first request).
            let gauge = |name: &str| {
                out.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            Some(
                gauge("plexus_control_plane_connected") > 0.0
                    && gauge("plexus_identity_cert_expiration_timestamp_seconds") > 0.0,
            )
        };
        if tokio::time::timeout(Duration::from_secs(1), probe).await.ok().flatten() == Some(true) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
