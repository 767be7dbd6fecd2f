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
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use common::{PLEXUS, metric_sum};
use plexus_testkit::certs::Certs;
use plexus_testkit::client;
use plexus_testkit::{
    Background, HttpEcho, Proxy, Resources, ServicePort, TcpEcho, TempDir, WorkloadSpec, command, eventually,
    free_port, run, run_ok,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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
    // The controls: absolute-form, CONNECT over HTTP/1.1 and over HTTP/2; nothing else.
    ensure!(secret.requests() == 3, "the secret app was reached {} times (only the 3 controls may)", secret.requests());
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

// ---------------------------------------------------------------------------------------------
// With a control plane: identities, mTLS

const TRUST_DOMAIN: &str = "plexus.local";

const STRICT: &str =
    "apiVersion: plexus.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec:\n  mtls: {mode: strict}\n";

/// A `plexus control` on free ports with its own data dir.
struct ControlPlane {
    _proc: Background,
    server: String,
    grpc: String,
    data: PathBuf,
}

impl ControlPlane {
    async fn start(dir: &TempDir) -> Result<ControlPlane> {
        let data = dir.join("data");
        let http = format!("127.0.0.1:{}", free_port());
        let mut cmd = command(PLEXUS);
        cmd.args(["control", "--http-addr", &http, "--grpc-addr", "127.0.0.1:0", "--data-dir"]).arg(&data);
        let proc = Background::start("control", cmd, "{", Duration::from_secs(30)).await?;
        let ready: serde_json::Value = serde_json::from_str(proc.ready_line()).context("control ready line")?;
        let grpc = format!("http://{}", ready["grpc"].as_str().context("no grpc address in the ready line")?);
        Ok(ControlPlane { _proc: proc, server: format!("http://{http}"), grpc, data })
    }

    fn plexus(&self) -> tokio::process::Command {
        let mut cmd = command(PLEXUS);
        cmd.env("PLEXUS_SERVER", &self.server)
            .env("PLEXUS_CONTROL_PLANE", &self.grpc)
            .env("PLEXUS_DATA_DIR", &self.data);
        cmd
    }

    async fn apply(&self, dir: &TempDir, name: &str, yaml: &str) -> Result<()> {
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, yaml)?;
        let mut cmd = self.plexus();
        cmd.args(["apply", "-f"]).arg(&file);
        run_ok(&mut cmd, Duration::from_secs(30)).await?;
        Ok(())
    }

    async fn api(&self, path: &str) -> Result<serde_json::Value> {
        let addr: SocketAddr = self.server.trim_start_matches("http://").parse()?;
        let r = client::get(addr, &addr.to_string(), path, &[], Duration::from_secs(10)).await?;
        ensure!(r.status == 200, "GET {path}: {} {}", r.status, r.text());
        r.json()
    }

    async fn token(&self, service_account: &str) -> Result<String> {
        plexus_testkit::workload_token(PLEXUS, &self.server, &self.data, "default", service_account).await
    }

    /// A sidecar (`plexus proxy --control-plane --token`) for `name` with `--upstream` binds and
    /// `extra` flags.
    async fn sidecar(&self, name: &str, upstreams: &[&str], extra: &[&str]) -> Result<Proxy> {
        let token = self.token(name).await?;
        let mut args: Vec<String> =
            ["proxy", "--control-plane", &self.grpc, "--token", &token, "--service", name].map(String::from).to_vec();
        args.extend(["--service-account", name].map(String::from));
        args.extend(["--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0"].map(String::from));
        for up in upstreams {
            args.extend(["--upstream".to_string(), format!("{up}=0")]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Proxy::start_named(name, PLEXUS, args).await
    }

    /// Waits until the proxy of `service` reports a workload certificate.
    async fn wait_certificate(&self, service: &str) -> Result<()> {
        eventually(Duration::from_secs(30), || async move {
            let list = self.api("/api/v1/proxies").await?;
            let has = list["proxies"].as_array().is_some_and(|ps| {
                ps.iter().any(|p| {
                    p["service"] == service && p["certificate"]["serial"].as_str().is_some_and(|s| !s.is_empty())
                })
            });
            ensure!(has, "no certificate yet for {service}: {list}");
            Ok(())
        })
        .await
    }
}

/// An app behind `plexus run --service <service> --port <app_port>` (its command sleeps).
struct Meshed {
    _run: tokio::process::Child,
    inbound: SocketAddr,
    admin: SocketAddr,
}

impl Meshed {
    async fn start(cp: &ControlPlane, dir: &TempDir, service: &str, app_port: u16) -> Result<Meshed> {
        let log = dir.join(format!("run-{service}.log"));
        let mut cmd = cp.plexus();
        cmd.args(["run", "--service", service, "--port", &app_port.to_string(), "--", "sleep", "600"]);
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::from(std::fs::File::create(&log)?));
        cmd.kill_on_drop(true);
        let run = cmd.spawn().context("spawn plexus run")?;
        let found = eventually(Duration::from_secs(30), || async move {
            let proxies = cp.api("/api/v1/proxies").await?;
            let p = proxies["proxies"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["service"] == service))
                .cloned()
                .with_context(|| format!("no proxy for {service} yet: {proxies}"))?;
            let admin: SocketAddr = p["adminAddress"].as_str().context("no admin address")?.parse()?;
            let config =
                client::get(admin, &admin.to_string(), "/config", &[], Duration::from_secs(5)).await?.json()?;
            let inbound: SocketAddr =
                config["settings"]["inbound"].as_str().context("no inbound in /config")?.parse()?;
            Ok((inbound, admin))
        })
        .await;
        let (inbound, admin) = match found {
            Ok(f) => f,
            Err(e) => {
                anyhow::bail!("{e:#}\n--- plexus run log ---\n{}", std::fs::read_to_string(&log).unwrap_or_default())
            }
        };
        Ok(Meshed { _run: run, inbound, admin })
    }
}

/// Item 7: every path from a client sidecar to meshed endpoints works under strict mTLS and
/// is counted `mutual_tls` with the client's identity by the destination — the mirror's sidecar
/// included; switching to strict closes a plaintext keep-alive connection within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_every_path() -> Result<()> {
    if !prerequisites() || !plexus_testkit::require_tool("openssl") {
        return Ok(());
    }
    let dir = TempDir::new("hostile-mtls")?;
    let cp = ControlPlane::start(&dir).await?;
    let services = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: api}\nspec:\n  selector: {app: api}\n  ports: [{name: http, port: 80, appProtocol: http}]\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: shadow}\nspec:\n  selector: {app: shadow}\n  ports: [{name: http, port: 80, appProtocol: http}]\n---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: tcp}\nspec:\n  selector: {app: tcp}\n  ports: [{name: http, port: 9000, appProtocol: tcp}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: api-mirror}\nspec:\n  parentRefs: [{kind: Service, name: api, port: 80}]\n  rules:\n  - filters:\n    - type: RequestMirror\n      requestMirror: {backendRef: {name: shadow, port: 80}}\n    backendRefs: [{name: api, port: 80}]\n";
    cp.apply(&dir, "services", services).await?;
    let api_app = HttpEcho::start("api").await?;
    let shadow_app = HttpEcho::start("shadow").await?;
    let tcp_app = TcpEcho::start().await?;
    let api = Meshed::start(&cp, &dir, "api", api_app.port()).await?;
    let shadow = Meshed::start(&cp, &dir, "shadow", shadow_app.port()).await?;
    let _tcp = Meshed::start(&cp, &dir, "tcp", tcp_app.port()).await?;
    let client = cp.sidecar("client", &["api:80", "tcp:9000"], &[]).await?;
    for s in ["api", "shadow", "tcp", "client"] {
        cp.wait_certificate(s).await?;
    }

    // Permissive: a plaintext keep-alive connection straight to the api sidecar is served...
    let mut plain = tokio::net::TcpStream::connect(api.inbound).await?;
    let keepalive_get = b"GET /plain HTTP/1.1\r\nHost: api:80\r\n\r\n";
    plain.write_all(keepalive_get).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf)).await??;
    ensure!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "plaintext keep-alive request: {}",
        String::from_utf8_lossy(&buf[..n])
    );
    // ... until MeshConfig turns strict: closed within 5 s, with no response.
    let switched = Instant::now();
    cp.apply(&dir, "strict", STRICT).await?;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        match plain.read(&mut buf).await {
            Ok(0) | Err(_) => Ok::<_, anyhow::Error>(()),
            Ok(n) => anyhow::bail!("bytes after strict: {}", String::from_utf8_lossy(&buf[..n])),
        }
    })
    .await;
    let took = switched.elapsed();
    ensure!(matches!(closed, Ok(Ok(()))), "the plaintext connection was not closed after strict: {closed:?}");
    ensure!(took <= Duration::from_secs(5), "the plaintext connection closed {took:?} after the switch to strict");
    println!("plaintext keep-alive closed {took:?} after `plexus apply` of the strict MeshConfig began");

    let certs = Certs::new(dir.join("certs"))?;
    let cp_id = plexus_core::names::control_plane_spiffe_id(TRUST_DOMAIN);
    let (foreign_cert, foreign_key) = certs.leaf("foreign", &cp_id, None).await?;
    let env = vec![
        ("HOSTILE_CLIENT_OUTBOUND", addr(client.outbound())),
        ("HOSTILE_CLIENT_API", addr(client.upstream("api.default:80")?)),
        ("HOSTILE_CLIENT_TCP", addr(client.upstream("tcp.default:9000")?)),
        ("HOSTILE_API_INBOUND", addr(api.inbound)),
        ("HOSTILE_FOREIGN_CERT", foreign_cert.display().to_string()),
        ("HOSTILE_FOREIGN_KEY", foreign_key.display().to_string()),
    ];
    hostile("mtls_every_path.py", &env).await.with_context(|| client.stderr_tail(4000))?;

    // The destinations saw the client's verified identity on every path, the mirror included.
    let client_id = format!("source_principal=\"spiffe://{TRUST_DOMAIN}/ns/default/sa/client\"");
    let mtls = "connection_security_policy=\"mutual_tls\"";
    let metrics = |a: SocketAddr| async move {
        anyhow::Ok(client::get(a, "admin", "/metrics", &[], Duration::from_secs(5)).await?.text())
    };
    let api_metrics = metrics(api.admin).await?;
    let inbound = "direction=\"inbound\"";
    let api_requests = metric_sum(&api_metrics, "plexus_requests_total", &[inbound, mtls, &client_id]);
    ensure!(api_requests >= 6.0, "api sidecar counted {api_requests} mTLS requests from the client (6 HTTP)");
    // The CONNECT tunnel arrives as an opaque stream over mTLS (ALPN plexus.tcp).
    let tunnels = metric_sum(&api_metrics, "plexus_tcp_connections_opened_total", &[inbound, mtls, &client_id]);
    ensure!(tunnels >= 1.0, "api sidecar counted {tunnels} mTLS streams from the client (the CONNECT tunnel)");
    let mirrored = eventually(Duration::from_secs(10), || {
        let client_id = client_id.clone();
        async move {
            let n = metric_sum(
                &metrics(shadow.admin).await?,
                "plexus_requests_total",
                &["direction=\"inbound\"", mtls, &client_id],
            );
            ensure!(n >= 3.0, "the mirror's sidecar counted {n} mTLS requests from the client");
            Ok(n)
        }
    })
    .await?;
    ensure!(shadow_app.requests() as f64 >= mirrored, "the mirror app saw {} requests", shadow_app.requests());
    let plaintext =
        metric_sum(&metrics(shadow.admin).await?, "plexus_requests_total", &["connection_security_policy=\"none\""]);
    ensure!(plaintext == 0.0, "the mirror's sidecar counted {plaintext} plaintext requests");
    Ok(())
}

/// Item 9 with identities: off loopback, `/config` and `/tap` answer the control plane's
/// certificate (signed here from the mesh's issuer) and refuse another mesh identity, a
/// foreign CA and no certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_mtls() -> Result<()> {
    if !prerequisites() || !plexus_testkit::require_tool("openssl") {
        return Ok(());
    }
    let Some(ip) = host_ip() else {
        plexus_testkit::skip("this host has no non-loopback address to arrive off loopback from");
        return Ok(());
    };
    let dir = TempDir::new("hostile-admin-mtls")?;
    let cp = ControlPlane::start(&dir).await?;
    let target = cp.sidecar("target", &[], &["--admin-ip", "0.0.0.0"]).await?;
    cp.wait_certificate("target").await?;
    let certs = Certs::new(dir.join("certs"))?;
    let issuer = (cp.data.join("issuer.pem"), cp.data.join("issuer-key.pem"));
    let issuer = Some((issuer.0.as_path(), issuer.1.as_path()));
    let cp_id = plexus_core::names::control_plane_spiffe_id(TRUST_DOMAIN);
    let (cp_cert, cp_key) = certs.leaf("control-plane", &cp_id, issuer).await?;
    let other_id = format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/other");
    let (other_cert, other_key) = certs.leaf("other", &other_id, issuer).await?;
    let (foreign_cert, foreign_key) = certs.leaf("foreign", &cp_id, None).await?;
    let path = |p: PathBuf| p.display().to_string();
    let env = vec![
        ("HOSTILE_ADMIN", addr(target.admin())),
        ("HOSTILE_HOST_IP", ip.to_string()),
        ("HOSTILE_CA", path(cp.data.join("trust-anchor.pem"))),
        ("HOSTILE_CP_CERT", path(cp_cert)),
        ("HOSTILE_CP_KEY", path(cp_key)),
        ("HOSTILE_OTHER_CERT", path(other_cert)),
        ("HOSTILE_OTHER_KEY", path(other_key)),
        ("HOSTILE_FOREIGN_CERT", path(foreign_cert)),
        ("HOSTILE_FOREIGN_KEY", path(foreign_key)),
    ];
    hostile("admin.py", &env).await.with_context(|| target.stderr_tail(4000))
}

/// SPEC §5 "Not a way around the mesh": a gateway never forwards to its own listeners. Backends
/// whose Workload is registered at the gateway's own port, its admin port or its outbound
/// port — spelled 127.0.0.1, 127.0.0.2, 0.0.0.0, ::1 and the host's own address — are refused
/// with a 403 at once (no request loop), and a `POST /shutdown` routed to its admin server
/// does not stop it; the positive control, a real backend on the same listener, answers before
/// and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_never_forwards_to_its_own_listeners() -> Result<()> {
    let dir = TempDir::new("gateway-self")?;
    let echo = HttpEcho::start("good").await?;
    let (gw_port, admin, outbound) = (free_port(), free_port(), free_port());
    let port = ServicePort::new("http", 8080, Some("http"));
    let mut res = Resources::new().service("good", std::slice::from_ref(&port)).workload(&WorkloadSpec::plain(
        "good-1",
        "good",
        "http",
        echo.port(),
    ));
    let mut spellings: Vec<std::net::IpAddr> =
        ["127.0.0.1", "127.0.0.2", "0.0.0.0", "::1"].iter().filter_map(|a| a.parse().ok()).collect();
    spellings.extend(host_ip());
    let mut targets = Vec::new();
    for (what, p) in [("gateway", gw_port), ("admin", admin), ("outbound", outbound)] {
        for (i, ip) in spellings.iter().enumerate() {
            let name = format!("self-{what}-{i}");
            let workload = WorkloadSpec { address: *ip, ..WorkloadSpec::plain(&format!("{name}-1"), &name, "http", p) };
            res = res.service(&name, std::slice::from_ref(&port)).workload(&workload);
            targets.push((name, SocketAddr::new(*ip, p)));
        }
    }
    let rules: String = targets
        .iter()
        .map(|(name, _)| {
            format!("  - matches: [{{headers: [{{name: x-target, value: {name}}}]}}]\n    backendRefs: [{{name: {name}, port: 8080}}]\n")
        })
        .collect();
    let yaml = format!(
        "{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  listeners:\n  - {{name: http, port: {gw_port}, protocol: HTTP}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: all}}\nspec:\n  parentRefs: [{{kind: Gateway, name: gw}}]\n  rules:\n{rules}  - backendRefs: [{{name: good, port: 8080}}]\n",
        res.to_yaml()
    );
    let file = dir.join("resources.yaml");
    std::fs::write(&file, yaml)?;
    let (admin_s, outbound_s) = (admin.to_string(), outbound.to_string());
    let extra = ["--gateway-ip", "0.0.0.0", "--outbound-port", &outbound_s, "--admin-port", &admin_s];
    let gateway = Proxy::start_gateway(PLEXUS, "gw", &file, &extra, &[gw_port]).await?;
    let addr = SocketAddr::from(([127, 0, 0, 1], gw_port));
    let send = |method: &'static str, path: &'static str, target: Option<String>| async move {
        let mut b = plexus_testkit::http::Request::builder().method(method).uri(path).header("host", "example.com");
        if let Some(t) = target {
            b = b.header("x-target", t);
        }
        let req = b.body(plexus_testkit::http_body_util::Empty::<plexus_testkit::bytes::Bytes>::new())?;
        client::send_collect(addr, client::Version::Http1, req, Duration::from_secs(10)).await
    };
    // Positive control.
    let r = send("GET", "/", None).await?;
    ensure!(r.status == 200 && r.header("x-served-by") == Some("good"), "control: {} {}", r.status, r.text());

    for (name, at) in &targets {
        for (method, path) in [("GET", "/"), ("POST", "/shutdown")] {
            let started = Instant::now();
            let r = send(method, path, Some(name.clone())).await?;
            let error = r.header("x-plexus-error").unwrap_or_default().to_string();
            ensure!(
                r.status == 403 && error.contains("own listener"),
                "{method} {path} to {name} ({at}): {} {error:?} {}",
                r.status,
                r.text()
            );
            ensure!(started.elapsed() < Duration::from_secs(2), "{name}: refused only after {:?}", started.elapsed());
        }
    }
    // Still serving: nothing reached its admin server's /shutdown, nothing looped.
    let r = send("GET", "/", None).await?;
    ensure!(r.status == 200 && r.header("x-served-by") == Some("good"), "control after: {} {}", r.status, r.text());
    ensure!(gateway.exit_status().is_none(), "the gateway stopped\n{}", gateway.stderr());
    Ok(())
}
