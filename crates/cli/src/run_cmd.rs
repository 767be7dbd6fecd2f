//! `plexus run`: a workload with its sidecar, registered in the mesh while it runs.

use std::path::PathBuf;
use std::time::Duration;

use plexus_proxy::Settings;
use plexus_proxy::control_plane::ControlPlaneConfig;
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
    /// The join token (default: read from the data dir).
    #[arg(long, env = "PLEXUS_TOKEN")]
    token: Option<String>,
    #[arg(long, env = "PLEXUS_CONTROL_PLANE", default_value = "http://127.0.0.1:7700")]
    control_plane: String,
    #[arg(long, env = "PLEXUS_DATA_DIR", default_value = "./.plexus")]
    data_dir: PathBuf,
    /// Sidecar ports (0 = pick free ones).
    #[arg(long, default_value_t = 0)]
    outbound_port: u16,
    #[arg(long, default_value_t = 0)]
    inbound_port: u16,
    #[arg(long, default_value_t = 0)]
    admin_port: u16,
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

/// How long the workload gets to exit after SIGTERM before it is killed.
const APP_STOP_TIMEOUT: Duration = Duration::from_secs(8);

pub async fn run(args: RunArgs) -> Result<(), Failure> {
    let token = match args.token.clone() {
        Some(t) => t,
        None => {
            plexus_control::datadir::read_token(&args.data_dir, plexus_control::datadir::JOIN_TOKEN).map_err(|e| {
                Failure::usage(format!(
                    "no join token: {e} (reading {})\n  hint: pass --token or --data-dir of the control plane",
                    args.data_dir.join(plexus_control::datadir::JOIN_TOKEN).display()
                ))
            })?
        }
    };
    let workload = format!("{}-{}-{:05x}", args.service, args.version, fastrand::u32(..) & 0xfffff);
    let service_account = args.service_account.clone().unwrap_or_else(|| args.service.clone());
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
        ..Settings::default()
    };
    let config = ControlPlaneConfig {
        address: args.control_plane.clone(),
        workload: workload.clone(),
        namespace: args.namespace.clone(),
        service: args.service.clone(),
        version: args.version.clone(),
        mode: "sidecar".into(),
        admin_address: String::new(),
        token,
        register: None,
        service_account: args.service_account.clone().unwrap_or_else(|| args.service.clone()),
        identity: None,
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
        .kill_on_drop(true)
        .process_group(0);
    die_with_parent(&mut child);
    let mut child = child.spawn().map_err(|e| Failure::runtime(format!("cannot start {:?}: {e}", args.command[0])))?;
    let leave = sidecar.leave_handle();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let proxy_task = tokio::spawn(sidecar.run(async {
        let _ = stop_rx.await;
    }));

    let status = tokio::select! {
        status = child.wait() => status,
        _ = shutdown_signal() => {
            // Leave the mesh first so peers stop sending new requests, then stop the app.
            leave.send_replace(true);
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) with a pid we spawned and still own.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
            match tokio::time::timeout(APP_STOP_TIMEOUT, child.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    tracing::warn!("the workload did not exit in time; killing it");
                    let _ = child.kill().await;
                    child.wait().await
                }
            }
        }
    };
    leave.send_replace(true);
    let _ = stop_tx.send(());
    let _ = proxy_task.await;
    let status = status.map_err(|e| Failure::runtime(format!("waiting for the workload: {e}")))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(Failure { code: code.clamp(1, 255) as u8, message: String::new() }),
        None => Err(Failure { code: 1, message: String::new() }),
    }
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
    let servers = crate::api_client::ServerArgs { server: args.server.clone(), data_dir: args.data_dir.clone() };
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
        .args(["--register-json", &registration.to_string(), "--token", &token, "--drain-timeout", "5s"])
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
    app.args(&args.command[1..]).kill_on_drop(true).process_group(0);
    die_with_parent(&mut app);
    let mut app = app.spawn().map_err(|e| Failure::runtime(format!("cannot start {:?}: {e}", args.command[0])))?;
    let status = tokio::select! {
        status = app.wait() => status,
        _ = shutdown_signal() => {
            // The sidecar deregisters first (peers stop sending new requests), then the app stops.
            signal(&sidecar, libc::SIGTERM);
            tokio::time::sleep(Duration::from_millis(500)).await;
            signal(&app, libc::SIGTERM);
            match tokio::time::timeout(APP_STOP_TIMEOUT, app.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    let _ = app.kill().await;
                    app.wait().await
                }
            }
        }
    };
    refresher.abort();
    signal(&sidecar, libc::SIGTERM);
    if tokio::time::timeout(Duration::from_secs(12), sidecar.wait()).await.is_err() {
        let _ = sidecar.kill().await;
    }
    // The namespace is deleted when the last reference (this one, once the refresher is
    // gone) is dropped.
    drop(pod);
    let status = status.map_err(|e| Failure::runtime(format!("waiting for the workload: {e}")))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(Failure { code: code.clamp(1, 255) as u8, message: String::new() }),
        None => Err(Failure { code: 1, message: String::new() }),
    }
}

fn signal(child: &tokio::process::Child, sig: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on a child we spawned.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }
}

/// Rewrites the pod's hosts file from the control plane's Services.
async fn refresh_hosts(pod: &crate::netns::Pod, servers: &crate::api_client::ServerArgs) {
    let Ok((status, body)) =
        servers.call(http::Method::GET, "/api/v1/resources/services?namespace=all", None, false).await
    else {
        return;
    };
    if !status.is_success() {
        return;
    }
    let services: Vec<(String, String)> = body["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|s| {
            Some((
                s["metadata"]["name"].as_str()?.to_string(),
                s["metadata"]["namespace"].as_str().unwrap_or("default").to_string(),
            ))
        })
        .collect();
    if let Err(e) = pod.write_hosts(&services) {
        tracing::warn!(error = %e.message, "cannot update the hosts file");
    }
}

/// Polls the sidecar's admin `/config` until it reports a control-plane connection.
async fn wait_connected(admin: &str, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let probe = async {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
            s.write_all(b"GET /config HTTP/1.0\r\n\r\n").await.ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).await.ok()?;
            // Connected, and holding its workload certificate (mTLS from the first request).
            Some(out.contains("\"controlPlaneConnected\": true") && !out.contains("\"certificate\": null"))
        };
        if tokio::time::timeout(Duration::from_secs(1), probe).await.ok().flatten() == Some(true) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
