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
    if args.netns {
        return Err(Failure::usage("--netns is not available in this version yet; run without it (explicit mode)"));
    }
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
    let settings = Settings {
        outbound: ([127, 0, 0, 1], args.outbound_port).into(),
        inbound: ([127, 0, 0, 1], args.inbound_port).into(),
        admin: ([127, 0, 0, 1], args.admin_port).into(),
        app_port: args.port,
        workload: Some(workload.clone()),
        service: Some(args.service.clone()),
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
