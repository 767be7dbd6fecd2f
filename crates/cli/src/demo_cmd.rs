//! `plexus demo`: the whole mesh on one machine — a control plane, the Bookinfo sample with a
//! sidecar per workload (`plexus run`), an ingress gateway on 127.0.0.1:9080 and a light load.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use plexus_core::{Kind, parse_documents};
use plexus_proxy::Settings;
use plexus_proxy::control_plane::ControlPlaneConfig;
use plexus_proxy::settings::GatewaySettings;

use crate::Failure;
use crate::control_cmd::ControlPlane;
use crate::proxy_cmd::{Sidecar, shutdown_signal};

/// SIGINT/SIGTERM to exit (SPEC §3: within 10 s): the edge drains first, then the workloads,
/// then the control plane, all inside this one budget.
const STOP_BUDGET: Duration = Duration::from_millis(9_500);
/// The ingress's share of [`STOP_BUDGET`]: requests already accepted at the edge finish while
/// every workload behind it still runs.
const EDGE_DRAIN: Duration = Duration::from_secs(3);
/// Each workload's share (`plexus run --stop-timeout`): leave the mesh, the app finishes its
/// requests in flight (`plexus sample --drain-timeout`, less), the sidecar drains.
const WORKLOAD_STOP: Duration = Duration::from_secs(5);

/// The Bookinfo Services (SPEC §9).
const BOOKINFO: &str = include_str!("../../../examples/bookinfo/bookinfo.yaml");
/// The ingress: Gateway `ingress` and the HTTPRoute sending Bookinfo's pages to productpage.
const GATEWAY: &str = include_str!("../../../examples/bookinfo/gateway.yaml");
/// The Bookinfo workloads: service and version.
const WORKLOADS: [(&str, &str); 6] = [
    ("details", "v1"),
    ("ratings", "v1"),
    ("reviews", "v1"),
    ("reviews", "v2"),
    ("reviews", "v3"),
    ("productpage", "v1"),
];

#[derive(clap::Args)]
pub struct DemoArgs {
    #[arg(long, env = "PLEXUS_DATA_DIR", default_value = "./.plexus")]
    data_dir: PathBuf,
    /// Skip the light background load.
    #[arg(long)]
    no_load: bool,
    /// Run each workload in its own network namespace with transparent interception (root);
    /// namespaces `plx-*` on bridge `plx0`, 10.251.0.0/24.
    #[arg(long)]
    netns: bool,
    #[arg(long, default_value = "127.0.0.1:7701")]
    http_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:7700")]
    grpc_addr: SocketAddr,
    /// Keep-alive idle timeout of every sidecar and of the ingress.
    #[arg(long, default_value = "5m", value_parser = crate::proxy_cmd::duration)]
    idle_timeout: Duration,
    /// How long a request head may take from its first byte, on every sidecar and the ingress.
    #[arg(long, default_value = "10s", value_parser = crate::proxy_cmd::duration)]
    header_read_timeout: Duration,
    /// Where the ingress gateway listens.
    #[arg(long, default_value = "127.0.0.1:9080")]
    ingress_addr: SocketAddr,
}

/// Child processes, stopped (SIGTERM, then SIGKILL) on drop.
struct Children(Vec<tokio::process::Child>);

impl Children {
    async fn stop(&mut self, timeout: Duration) {
        for c in &self.0 {
            if let Some(pid) = c.id() {
                // SAFETY: kill(2) on a child we spawned.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        for c in &mut self.0 {
            if tokio::time::timeout_at(deadline, c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }
}

/// A free port for a sample app, chosen below the kernel's ephemeral range: a port taken from
/// that range (by binding port 0) is free again once released, and the sidecars binding port 0
/// and every outgoing connection may be handed it before the app binds it.
fn free_port() -> Result<u16, Failure> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 20_000 { (10_000, low) } else { (1_024, low.max(1_025)) };
    for _ in 0..200 {
        let port = fastrand::u16(from..to);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Failure::runtime(e.to_string()))?;
    Ok(l.local_addr().map_err(|e| Failure::runtime(e.to_string()))?.port())
}

pub async fn run(args: DemoArgs) -> Result<(), Failure> {
    let mut grpc_addr = args.grpc_addr;
    if args.netns {
        crate::netns::require_root()?;
        crate::netns::remove_stale();
        crate::netns::ensure_bridge()?;
        // Sidecars in the workloads' namespaces reach the control plane on the bridge.
        grpc_addr = SocketAddr::new(crate::netns::GATEWAY.into(), args.grpc_addr.port());
    }
    let exe = std::env::current_exe().map_err(|e| Failure::runtime(format!("cannot find the plexus binary: {e}")))?;
    let cp = ControlPlane::start(&args.data_dir, args.http_addr, grpc_addr).await?;
    let (store, proxies) = (cp.store.clone(), cp.proxies.clone());
    // The ingress gateway's own workload token (the Bookinfo workloads' `plexus run` create
    // theirs with the admin token of the data dir).
    let ingress_token = cp
        .tokens
        .create(
            &plexus_control::identity::IdentitySettings::from_store(store.as_ref()).trust_domain,
            "default",
            "ingress-gateway",
            plexus_control::tokens::DEFAULT_TTL,
            &cp.ca.state().anchor.summary.sha256,
        )
        .map_err(|e| Failure::runtime(format!("cannot create the ingress gateway's token: {e}")))?
        .token;
    let grpc = format!("http://{}", cp.grpc);
    let http = cp.http;
    let (stop_cp, stop_cp_rx) = tokio::sync::oneshot::channel::<()>();
    let control = tokio::spawn(cp.serve(async {
        let _ = stop_cp_rx.await;
    }));

    // Workloads registered by an earlier demo that did not stop cleanly belong to dead processes.
    let stale: Vec<_> = store
        .list(Some(Kind::Workload), None)
        .map_err(|e| Failure::runtime(e.to_string()))?
        .iter()
        .filter(|w| w.metadata.annotations.contains_key(plexus_control::discovery::REGISTERED_ANNOTATION))
        .map(plexus_control::store::ObjectKey::of)
        .collect();
    let mut services =
        parse_documents("examples/bookinfo/bookinfo.yaml", BOOKINFO).map_err(|e| Failure::runtime(e.to_string()))?;
    let mut gateway =
        parse_documents("examples/bookinfo/gateway.yaml", GATEWAY).map_err(|e| Failure::runtime(e.to_string()))?;
    // The Gateway listens where `--ingress-addr` says.
    for r in &mut gateway {
        if let plexus_core::Spec::Gateway(g) = &mut r.spec {
            for l in &mut g.listeners {
                l.port = args.ingress_addr.port();
            }
        }
    }
    services.extend(gateway);
    plexus_control::store::write(&store, move |store| {
        store.delete(&stale)?;
        store.apply(&services)
    })
    .await
    .map_err(|e| Failure::runtime(e.to_string()))?;

    let logs = args.data_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| Failure::runtime(format!("cannot create {}: {e}", logs.display())))?;
    let mut children = Children(Vec::new());
    for (service, version) in WORKLOADS {
        let port = free_port()?.to_string();
        let log = std::fs::File::create(logs.join(format!("{service}-{version}.log")))
            .map_err(|e| Failure::runtime(e.to_string()))?;
        let log2 = log.try_clone().map_err(|e| Failure::runtime(e.to_string()))?;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args([
            "run",
            "--service",
            service,
            "--version",
            version,
            "--port",
            &port,
            "--control-plane",
            &grpc,
            "--data-dir",
        ])
        .arg(&args.data_dir)
        .args(["--server", &format!("http://{http}")])
        .args(["--stop-timeout", &format!("{}ms", WORKLOAD_STOP.as_millis())])
        .args(["--idle-timeout", &format!("{}ms", args.idle_timeout.as_millis())])
        .args(["--header-read-timeout", &format!("{}ms", args.header_read_timeout.as_millis())])
        .args(if args.netns { &["--netns"][..] } else { &[] })
        .arg("--")
        .arg(&exe)
        .args(["sample", service, "--version", version, "--port", &port])
        .args(["--drain-timeout", &format!("{}ms", WORKLOAD_STOP.mul_f64(0.6).as_millis())])
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0);
        crate::run_cmd::die_with_parent(&mut cmd);
        children.0.push(cmd.spawn().map_err(|e| Failure::runtime(format!("cannot start {service} {version}: {e}")))?);
    }

    // The ingress answers only once every workload is registered and every sidecar in sync.
    let started = Instant::now();
    loop {
        let registered = store
            .list(Some(Kind::Workload), Some("default"))
            .map(|w| {
                w.iter()
                    .filter(|w| w.metadata.annotations.contains_key(plexus_control::discovery::REGISTERED_ANNOTATION))
                    .count()
            })
            .unwrap_or(0);
        let list = proxies.list();
        let in_sync = list.len() >= WORKLOADS.len()
            && list.iter().all(|p| p.sent_revision > 0 && p.applied_revision == p.sent_revision);
        if registered >= WORKLOADS.len() && in_sync {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            children.stop(Duration::from_secs(5)).await;
            let _ = stop_cp.send(());
            return Err(Failure::runtime(format!(
                "the Bookinfo workloads did not all register within 60 s ({registered}/{} registered); see the logs in {}",
                WORKLOADS.len(),
                logs.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The Gateway's port is bound once its config arrives: a taken port is said now.
    drop(
        std::net::TcpListener::bind(args.ingress_addr).map_err(|e| {
            Failure::runtime(format!("cannot listen on {} (the ingress gateway): {e}", args.ingress_addr))
        })?,
    );
    // The ingress gateway has its own identity (`ingress-gateway`) and originates mTLS.
    let ingress_settings = Settings {
        outbound: ([127, 0, 0, 1], 0).into(),
        inbound: ([127, 0, 0, 1], 0).into(),
        admin: ([127, 0, 0, 1], 0).into(),
        gateway: Some(GatewaySettings {
            name: plexus_core::ServiceName::new("ingress", "default"),
            ip: args.ingress_addr.ip(),
            tls_dir: args.data_dir.join("tls"),
            certificate_poll: plexus_proxy::gateway::DEFAULT_CERTIFICATE_POLL,
            certificate_source: None,
        }),
        workload: Some("ingress-gateway".into()),
        service: Some("ingress-gateway".into()),
        limits: plexus_proxy::settings::Limits {
            drain_timeout: EDGE_DRAIN,
            idle_timeout: args.idle_timeout,
            header_read_timeout: args.header_read_timeout,
            ..Default::default()
        },
        mode: plexus_proxy::settings::Mode::Ingress,
        ..Settings::default()
    };
    let ingress = Sidecar::start(
        ingress_settings,
        ControlPlaneConfig {
            address: grpc.clone(),
            timing: Default::default(),
            workload: "ingress-gateway".into(),
            namespace: "default".into(),
            service: "ingress-gateway".into(),
            version: "v1".into(),
            mode: "ingress".into(),
            admin_address: String::new(),
            token: ingress_token,
            register: None,
            token_file: None,
            service_account: "ingress-gateway".into(),
            identity: None,
            app_readiness: None,
            anchors_pem: None,
            tls: None,
            plaintext_peers: false,
        },
    )?;
    ingress.wait_connected(Duration::from_secs(10)).await;
    let (stop_ingress, stop_ingress_rx) = tokio::sync::oneshot::channel::<()>();
    let ingress_task = tokio::spawn(ingress.run(async {
        let _ = stop_ingress_rx.await;
    }));

    // Sidecars learn destinations on first use: one request through the whole chain before
    // announcing the demo, so the first page a user loads is complete.
    let warm = Instant::now();
    while !page_ok(args.ingress_addr).await {
        if warm.elapsed() > Duration::from_secs(30) {
            tracing::warn!("Bookinfo is not answering completely yet; see the logs");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let load = if args.no_load { None } else { Some(tokio::spawn(light_load(args.ingress_addr))) };
    println!("Plexus demo is running ({:.1} s to start).", started.elapsed().as_secs_f64());
    println!("  Bookinfo:       http://{}/productpage", args.ingress_addr);
    println!("  Control plane:  http://{http}/");
    println!("  Try:            plexus get workloads");
    println!("                  plexus apply -f examples/bookinfo/   (walk-throughs as they land)");
    println!("  Logs:           {}", logs.display());
    println!("Press Ctrl-C to stop.");

    shutdown_signal().await;
    let deadline = tokio::time::Instant::now() + STOP_BUDGET;
    // Whoever started the demo may have stopped reading its output: never fail on that.
    let _ = writeln!(std::io::stdout(), "Stopping…");
    if let Some(l) = load {
        l.abort();
    }
    // The edge first: it stops accepting, and what it already accepted finishes while every
    // workload behind it still runs.
    let _ = stop_ingress.send(());
    let _ = tokio::time::timeout(EDGE_DRAIN + Duration::from_millis(500), ingress_task).await;
    // Then the workloads, each leaving the mesh before its app finishes its requests.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    children.stop(left.saturating_sub(Duration::from_millis(700))).await;
    if args.netns {
        // Normally each `plexus run` removed its own; this catches any it could not.
        crate::netns::remove_stale();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        crate::netns::remove_bridge_if_unused(
            left.saturating_sub(Duration::from_millis(300)).min(Duration::from_secs(2)),
        )
        .await;
    }
    let _ = stop_cp.send(());
    let _ = tokio::time::timeout_at(deadline, control).await;
    Ok(())
}

/// Whether `/productpage` answers with details and reviews.
async fn page_ok(ingress: SocketAddr) -> bool {
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(ingress).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(conn);
        let req =
            http::Request::get("/productpage").header("host", ingress.to_string()).body(Empty::<Bytes>::new()).ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let ok = resp.status().is_success();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        let text = String::from_utf8_lossy(&body);
        Some(
            ok && text.contains("Reviews served by:")
                && !text.contains("Error fetching product details")
                && !text.contains("Ratings service is currently unavailable"),
        )
    };
    tokio::time::timeout(Duration::from_secs(12), fetch).await.ok().flatten().unwrap_or(false)
}

/// About 5 requests per second to `/productpage` through the ingress.
async fn light_load(ingress: SocketAddr) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let one = async {
            let stream = tokio::net::TcpStream::connect(ingress).await.ok()?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
            tokio::spawn(conn);
            let req = http::Request::get("/productpage")
                .header("host", ingress.to_string())
                .body(Empty::<Bytes>::new())
                .ok()?;
            let resp = sender.send_request(req).await.ok()?;
            resp.into_body().collect().await.ok()?;
            Some(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), one).await;
    }
}
