//! The hostile-client suite's edge classes (issue 16 items 1, 6, 7, 9; SPEC §5 "Not a way
//! around the mesh", "Admin", the mTLS bullets): each test starts real proxies (and, where
//! identities are needed, a control plane) and runs one `tests/hostile/*.py` script against
//! them with their addresses in environment variables. The script asserts the secure outcome
//! of every variant next to a positive control; its output is shown when it fails.
//!
//! Rust tests sit beside them where Python adds nothing (mTLS on the mirror path seen by the
//! mirror's sidecar, strict mode closing a plaintext keep-alive connection).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use common::PLEXUS;
use plexus_testkit::{HttpEcho, Proxy, Resources, ServicePort, TempDir, WorkloadSpec, command, free_port, run};

/// How long one hostile script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

fn hostile_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/hostile")
}

/// `python3` with the `h2` module (skips, or fails under `CI=true`, without).
fn prerequisites() -> bool {
    plexus_testkit::require_python_module("h2", "h2")
}

/// Runs `tests/hostile/<script>` with `env`; fails with its output unless it exits 0.
async fn hostile(script: &str, env: &[(&str, String)]) -> Result<()> {
    let mut cmd = command("python3");
    cmd.arg("-u").arg(hostile_dir().join(script)).current_dir(hostile_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(&mut cmd, SCRIPT_TIMEOUT).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{script} failed ({}):\n{stdout}\n--- stderr ---\n{stderr}", out.status);
    println!("{stdout}");
    Ok(())
}

/// A non-loopback IPv4 address of this host, if it has one (`hostname -I`, else the source
/// address of a route out).
fn host_ip() -> Option<std::net::IpAddr> {
    let listed = std::process::Command::new("hostname").arg("-I").output().ok().and_then(|out| {
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|w| w.parse::<std::net::IpAddr>().ok())
            .find(|ip| ip.is_ipv4() && !ip.is_loopback())
    });
    listed.or_else(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        s.connect("198.51.100.1:9").ok()?;
        let ip = s.local_addr().ok()?.ip();
        (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
    })
}

/// `plexus proxy --resources FILE` with free ports and `extra` arguments.
async fn proxy(name: &str, resources: &Path, extra: &[&str]) -> Result<Proxy> {
    let mut args: Vec<String> = vec!["proxy".into(), "--resources".into(), resources.display().to_string()];
    args.extend(["--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    Proxy::start_named(name, PLEXUS, args).await
}

fn addr(a: SocketAddr) -> String {
    a.to_string()
}

/// Item 1: a gateway forwards only its `--upstream` bind; a sidecar never reaches itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_proxy() -> Result<()> {
    if !prerequisites() {
        return Ok(());
    }
    let dir = TempDir::new("hostile-open-proxy")?;
    let web = HttpEcho::start("web").await?;
    let secret = HttpEcho::start("secret").await?;
    let resources = dir.join("mesh.yaml");
    Resources::new()
        .service("web", &[ServicePort::new("http", 80, Some("http"))])
        .workload(&WorkloadSpec::plain("web-1", "web", "http", web.port()))
        .write(&resources)?;
    let ingress = proxy("ingress", &resources, &["--mode", "ingress", "--upstream", "web:80=0"]).await?;
    let sidecar = proxy("sidecar", &resources, &[]).await?;
    let mut env = vec![
        ("HOSTILE_INGRESS", addr(ingress.upstream("web.default:80")?)),
        ("HOSTILE_INGRESS_OUTBOUND", addr(ingress.outbound())),
        ("HOSTILE_INGRESS_ADMIN", addr(ingress.admin())),
        ("HOSTILE_SIDECAR_OUTBOUND", addr(sidecar.outbound())),
        ("HOSTILE_SIDECAR_INBOUND", addr(sidecar.inbound())),
        ("HOSTILE_SIDECAR_ADMIN", addr(sidecar.admin())),
        ("HOSTILE_SECRET", addr(secret.addr())),
    ];
    if let Some(ip) = host_ip() {
        env.push(("HOSTILE_HOST_IP", ip.to_string()));
    }
    hostile("open_proxy.py", &env)
        .await
        .with_context(|| format!("{}\n{}", ingress.stderr_tail(4000), sidecar.stderr_tail(4000)))?;
    ensure!(secret.requests() <= 2, "the secret app was reached {} times (only the 2 controls may)", secret.requests());
    Ok(())
}

/// Item 6: only WebSocket upgrades are carried out, on every path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_smuggling() -> Result<()> {
    if !prerequisites() {
        return Ok(());
    }
    let dir = TempDir::new("hostile-upgrade")?;
    let rogue_port = free_port();
    let resources = dir.join("mesh.yaml");
    Resources::new()
        .service("rogue", &[ServicePort::new("http", 80, Some("http"))])
        .workload(&WorkloadSpec::plain("rogue-1", "rogue", "http", rogue_port))
        .write(&resources)?;
    let client = proxy("client", &resources, &["--upstream", "rogue:80=0"]).await?;
    let ingress = proxy("ingress", &resources, &["--mode", "ingress", "--upstream", "rogue:80=0"]).await?;
    let app_port = rogue_port.to_string();
    let server = proxy("server", &resources, &["--app-port", &app_port]).await?;
    let env = vec![
        ("HOSTILE_ROGUE_LISTEN", format!("127.0.0.1:{rogue_port}")),
        ("HOSTILE_SIDECAR_ROGUE", addr(client.upstream("rogue.default:80")?)),
        ("HOSTILE_SIDECAR_OUTBOUND", addr(client.outbound())),
        ("HOSTILE_INBOUND", addr(server.inbound())),
        ("HOSTILE_INGRESS_ROGUE", addr(ingress.upstream("rogue.default:80")?)),
    ];
    hostile("upgrade_smuggling.py", &env).await.with_context(|| {
        format!("{}\n{}\n{}", client.stderr_tail(3000), ingress.stderr_tail(3000), server.stderr_tail(3000))
    })
}

/// Item 9 (plaintext): the admin port bound to every address answers scrapers anywhere,
/// `/config` and `/tap` on loopback only, and `POST /shutdown` only on loopback with no
/// `Origin` and the admin address as `Host`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin() -> Result<()> {
    if !prerequisites() {
        return Ok(());
    }
    let Some(ip) = host_ip() else {
        plexus_testkit::skip("this host has no non-loopback address to arrive off loopback from");
        return Ok(());
    };
    let dir = TempDir::new("hostile-admin")?;
    let resources = dir.join("mesh.yaml");
    Resources::new().service("web", &[ServicePort::new("http", 80, Some("http"))]).write(&resources)?;
    let target = proxy("target", &resources, &["--admin-ip", "0.0.0.0"]).await?;
    let victim = proxy("victim", &resources, &[]).await?;
    let env = vec![
        ("HOSTILE_ADMIN", addr(target.admin())),
        ("HOSTILE_HOST_IP", ip.to_string()),
        ("HOSTILE_VICTIM_ADMIN", addr(victim.admin())),
    ];
    hostile("admin.py", &env).await.with_context(|| target.stderr_tail(4000))?;
    ensure!(target.exit_status().is_none(), "the target proxy stopped:\n{}", target.stderr_tail(4000));
    victim.wait_exit(Duration::from_secs(15)).await.context("the legitimate POST /shutdown did not stop the victim")?;
    Ok(())
}
