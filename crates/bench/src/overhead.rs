//! Mesh overhead (`plexus bench overhead`): the same constant-rate load against a target
//! directly, through one sidecar and through two (client sidecar → server sidecar), in one run
//! with the paths interleaved round by round (so a slow spell of the machine hits all of them),
//! reporting the latency each path adds per percentile and the proxies' CPU and memory per
//! 1,000 req/s.
//!
//! The sidecars are real `plexus proxy` processes started here from a resources file: one
//! sidecar is a proxy whose `--upstream` bind leads to the target; two sidecars add a server
//! sidecar whose inbound port fronts the target (`--app-port`), as a meshed workload, with
//! plaintext between them. The fourth path is the mesh as it runs by default: a real
//! `plexus control` (its own temporary data dir and certificate authority) feeds two sidecars
//! that hold workload certificates, so the hop between them is mutual TLS 1.3; the path is
//! only measured once a request through it is counted as `mutual_tls` by the client sidecar.
//! The control plane's own CPU is not counted (it is idle while the load runs).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::config::{BenchConfig, Load, Protocol};
use crate::error::BenchError;
use crate::result::RunResult;
use crate::run::{Progress, run};
use crate::summary::msf;
use crate::target::Target;

/// The Service the sidecars route to.
const SERVICE: &str = "bench-target";
/// Its port (what the client addresses; the sidecars map it to the target).
const SERVICE_PORT: u16 = 80;
/// How long a sidecar has to print its ready line and start routing.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One way to reach the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Direct,
    OneSidecar,
    TwoSidecars,
    /// Two sidecars fed by a control plane, mutual TLS between them.
    TwoSidecarsMtls,
}

impl Route {
    /// `direct`, `1-sidecar`, `2-sidecars`.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::OneSidecar => "1-sidecar",
            Route::TwoSidecars => "2-sidecars",
            Route::TwoSidecarsMtls => "2-sidecars-mtls",
        }
    }

    /// How many proxies the path goes through.
    pub fn proxies(self) -> usize {
        match self {
            Route::Direct => 0,
            Route::OneSidecar => 1,
            Route::TwoSidecars | Route::TwoSidecarsMtls => 2,
        }
    }

    /// Whether the hop between the sidecars is mutual TLS.
    pub fn mtls(self) -> bool {
        self == Route::TwoSidecarsMtls
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct OverheadConfig {
    /// The load for every path; its URL is the target (`http://IP:PORT/path`).
    pub load: BenchConfig,
    /// Rounds of (direct, one sidecar, two sidecars); each path runs `load.duration` per round.
    pub rounds: usize,
    /// The `plexus` binary that runs the sidecars.
    pub proxy_bin: PathBuf,
}

/// One path's merged results.
#[derive(Debug, Clone)]
pub struct PathResult {
    pub route: Route,
    pub result: RunResult,
    /// CPU the path's proxies used while it was measured (all rounds).
    pub proxy_cpu: Duration,
    /// Largest resident memory of the path's proxies together, bytes.
    pub proxy_rss: u64,
    /// Requests sent on the path while `proxy_cpu` was counted (warm-ups included).
    pub requests: u64,
}

impl PathResult {
    /// Proxy CPU (cores) per 1,000 req/s: CPU seconds per request × 1,000. CPU is counted
    /// over whole runs, warm-up included, so it is divided by every request of those runs.
    pub fn cpu_per_krps(&self) -> f64 {
        if self.requests == 0 { 0.0 } else { self.proxy_cpu.as_secs_f64() / self.requests as f64 * 1000.0 }
    }
}

/// A running sidecar, killed on drop.
struct Sidecar {
    child: Child,
    pid: u32,
}

impl Sidecar {
    async fn start(bin: &Path, args: &[String], log: &Path) -> Result<(Sidecar, serde_json::Value), BenchError> {
        let err = |why: String| BenchError::Runtime(format!("sidecar: {why}"));
        let log_file = std::fs::File::create(log).map_err(|e| err(format!("{}: {e}", log.display())))?;
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| err(format!("cannot start {}: {e}", bin.display())))?;
        let pid = child.id().ok_or_else(|| err("exited at once".into()))?;
        let stdout = child.stdout.take().ok_or_else(|| err("no stdout".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| err(format!("no ready line within {START_TIMEOUT:?} (log: {})", log.display())))?
            .map_err(|e| err(e.to_string()))?
            .ok_or_else(|| err(format!("exited before its ready line (log: {})", log.display())))?;
        let ready: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| err(format!("ready line {line:?}: {e}")))?;
        // Keep draining stdout so a chatty proxy never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((Sidecar { child, pid }, ready))
    }

    /// CPU time used so far (user + system), from `/proc/PID/stat`.
    fn cpu(&self) -> Duration {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return Duration::ZERO;
        };
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name.
        let total = ticks(11) + ticks(12);
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let hz = if hz > 0 { hz as u64 } else { 100 };
        Duration::from_nanos(total.saturating_mul(1_000_000_000) / hz)
    }

    /// Resident memory, bytes.
    fn rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .map(|kib: u64| kib * 1024)
            .unwrap_or(0)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn addr(ready: &serde_json::Value, key: &str) -> Result<SocketAddr, BenchError> {
    ready
        .get(key)
        .and_then(|v| v.as_str())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| BenchError::Runtime(format!("sidecar ready line has no {key:?}: {ready}")))
}

fn service_yaml() -> String {
    format!(
        "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {{name: {SERVICE}, namespace: default}}\nspec:\n  selector: {{app: {SERVICE}}}\n  ports: [{{name: http, port: {SERVICE_PORT}, appProtocol: http}}]\n"
    )
}

fn workload_yaml(ip: std::net::IpAddr, port: u16, target_port: u16, meshed: bool) -> String {
    format!(
        "apiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {SERVICE}-1, namespace: default, labels: {{app: {SERVICE}}}}}\nspec:\n  address: \"{ip}\"\n  ports: [{{name: http, port: {port}, targetPort: {target_port}}}]\n  serviceAccount: {SERVICE}\n  meshed: {meshed}\n"
    )
}

/// Writes `text` to `path` atomically (proxies watch the file).
fn write_atomic(path: &Path, text: &str) -> Result<(), BenchError> {
    let tmp = path.with_extension("tmp-write");
    let fail = |e: std::io::Error| BenchError::File { path: path.display().to_string(), why: e.to_string() };
    std::fs::write(&tmp, text).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

/// One `GET` with a fresh connection; the status, if an answer came.
async fn probe(addr: SocketAddr, path: &str) -> Option<u16> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {SERVICE}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await.ok()?;
        let text = std::str::from_utf8(&head[..n]).ok()?;
        text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt).await.ok().flatten()
}

/// Waits until a `GET` through `addr` is answered 2xx (the sidecars have picked up the
/// resources and reach the target).
async fn wait_routing(addr: SocketAddr, path: &str, what: &str) -> Result<(), BenchError> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last = None;
    while Instant::now() < deadline {
        last = probe(addr, path).await;
        if last.is_some_and(|s| (200..300).contains(&s)) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(BenchError::Runtime(format!(
        "{what} does not reach the target within {START_TIMEOUT:?} (last answer: {last:?})"
    )))
}

/// The started sidecars of the mesh paths, with the URL to load for each.
struct Mesh {
    one: Sidecar,
    one_url: String,
    client: Sidecar,
    server: Sidecar,
    two_url: String,
    mtls: MtlsMesh,
}

/// The mutual-TLS path: a control plane and two sidecars with workload certificates.
struct MtlsMesh {
    _control_plane: Sidecar,
    client: Sidecar,
    server: Sidecar,
    url: String,
}

async fn start_mesh(cfg: &OverheadConfig, target: &Target, dir: &Path) -> Result<Mesh, BenchError> {
    let bin = &cfg.proxy_bin;
    let app = target.addr;
    let path = target.path.as_str();
    let upstream = format!("{SERVICE}.default:{SERVICE_PORT}=0");
    let common = |resources: &Path| -> Vec<String> {
        ["proxy", "--resources", &resources.display().to_string()]
            .into_iter()
            .map(String::from)
            .chain(["--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0"].map(String::from))
            .collect()
    };
    let upstream_addr = |ready: &serde_json::Value| -> Result<SocketAddr, BenchError> {
        ready
            .get("upstreams")
            .and_then(|u| u.as_object())
            .and_then(|u| u.values().next())
            .and_then(|v| v.as_str())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| BenchError::Runtime(format!("sidecar ready line has no upstream bind: {ready}")))
    };

    // One sidecar: its upstream bind → the target, dialled directly (meshed: false).
    let one_res = dir.join("one-sidecar.yaml");
    write_atomic(
        &one_res,
        &format!("{}---\n{}", service_yaml(), workload_yaml(app.ip(), app.port(), app.port(), false)),
    )?;
    let mut args = common(&one_res);
    args.extend(["--upstream".to_string(), upstream.clone()]);
    let (one, ready) = Sidecar::start(bin, &args, &dir.join("one-sidecar.log")).await?;
    let one_addr = upstream_addr(&ready)?;
    wait_routing(one_addr, path, "the sidecar").await?;

    // Two sidecars: the server sidecar fronts the target (--app-port); once its inbound port
    // is known, the workload is registered behind it (meshed: true) and the client sidecar
    // starts.
    let two_res = dir.join("two-sidecars.yaml");
    write_atomic(&two_res, &service_yaml())?;
    let mut args = common(&two_res);
    args.extend(["--app-port".to_string(), app.port().to_string()]);
    let (server, ready) = Sidecar::start(bin, &args, &dir.join("server-sidecar.log")).await?;
    let inbound = addr(&ready, "inbound")?;
    write_atomic(
        &two_res,
        &format!("{}---\n{}", service_yaml(), workload_yaml(inbound.ip(), inbound.port(), app.port(), true)),
    )?;
    let mut args = common(&two_res);
    args.extend(["--upstream".to_string(), upstream]);
    let (client, ready) = Sidecar::start(bin, &args, &dir.join("client-sidecar.log")).await?;
    let two_addr = upstream_addr(&ready)?;
    wait_routing(two_addr, path, "the client and server sidecars").await?;

    let mtls = start_mtls_mesh(cfg, target, dir).await?;
    Ok(Mesh {
        one,
        one_url: format!("http://{one_addr}{path}"),
        client,
        server,
        two_url: format!("http://{two_addr}{path}"),
        mtls,
    })
}

/// A free port on 127.0.0.1 (bound, read, released).
fn free_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::Runtime(format!("cannot find a free port: {e}")))
}

/// `plexus control` with its own data dir, a Service applied to it, a server sidecar that
/// registers the target as a meshed workload, and a client sidecar; both sidecars get workload
/// certificates with workload tokens of their own service accounts (`plexus token create`).
async fn start_mtls_mesh(cfg: &OverheadConfig, target: &Target, dir: &Path) -> Result<MtlsMesh, BenchError> {
    let bin = &cfg.proxy_bin;
    let runtime = |why: String| BenchError::Runtime(format!("mTLS path: {why}"));
    let data = dir.join("control-plane");
    let args: Vec<String> = ["control", "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--data-dir"]
        .into_iter()
        .map(String::from)
        .chain([data.display().to_string()])
        .collect();
    let (control_plane, ready) = Sidecar::start(bin, &args, &dir.join("control-plane.log")).await?;
    let field = |k: &str| ready.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let (Some(http), Some(grpc)) = (field("http"), field("grpc")) else {
        return Err(runtime(format!("the control plane's ready line has no addresses: {ready}")));
    };
    let create_token = |service_account: &'static str| {
        let (bin, http, data) = (bin.clone(), http.clone(), data.clone());
        async move {
            let out = Command::new(&bin)
                .args(["token", "create", "--service-account", service_account, "--server", &format!("http://{http}")])
                .arg("--data-dir")
                .arg(&data)
                .output()
                .await
                .map_err(|e| format!("plexus token create: {e}"))?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            match text.lines().last() {
                Some(t) if out.status.success() => Ok(t.trim().to_string()),
                _ => Err(format!("plexus token create: {}", String::from_utf8_lossy(&out.stderr))),
            }
        }
    };
    let server_token = create_token(SERVICE).await.map_err(runtime)?;
    let client_token = create_token("bench-client").await.map_err(runtime)?;

    let service = dir.join("mtls-service.yaml");
    write_atomic(&service, &service_yaml())?;
    let applied = Command::new(bin)
        .args(["apply", "-f"])
        .arg(&service)
        .args(["--server", &format!("http://{http}"), "--data-dir"])
        .arg(&data)
        .output()
        .await
        .map_err(|e| runtime(format!("plexus apply: {e}")))?;
    if !applied.status.success() {
        return Err(runtime(format!("plexus apply: {}", String::from_utf8_lossy(&applied.stderr))));
    }

    let app = target.addr;
    let inbound = free_port()?;
    let registration = serde_json::json!({
        "apiVersion": "plexus.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": format!("{SERVICE}-mtls"), "namespace": "default", "labels": {"app": SERVICE}},
        "spec": {
            "address": "127.0.0.1",
            "ports": [{"name": "http", "port": inbound, "targetPort": app.port()}],
            "serviceAccount": SERVICE,
            "meshed": true,
        },
    });
    let mesh_args = |workload: &str, service: &str, token: &str| -> Vec<String> {
        let control_plane = format!("http://{grpc}");
        ["proxy", "--control-plane", &control_plane, "--token", token, "--workload", workload, "--service", service]
            .into_iter()
            .chain(["--service-account", service, "--outbound-port", "0", "--admin-port", "0"])
            .map(String::from)
            .collect()
    };
    let mut args = mesh_args(&format!("{SERVICE}-mtls"), SERVICE, &server_token);
    args.extend(["--app-port".into(), app.port().to_string(), "--inbound-port".into(), inbound.to_string()]);
    args.extend(["--register-json".into(), registration.to_string()]);
    let (server, _) = Sidecar::start(bin, &args, &dir.join("mtls-server-sidecar.log")).await?;
    let mut args = mesh_args("bench-client", "bench-client", &client_token);
    args.extend(["--inbound-port".into(), "0".into()]);
    args.extend(["--upstream".into(), format!("{SERVICE}.default:{SERVICE_PORT}=0")]);
    let (client, ready) = Sidecar::start(bin, &args, &dir.join("mtls-client-sidecar.log")).await?;
    let client_addr = ready
        .get("upstreams")
        .and_then(|u| u.as_object())
        .and_then(|u| u.values().next())
        .and_then(|v| v.as_str())
        .and_then(|v| v.parse::<SocketAddr>().ok())
        .ok_or_else(|| runtime(format!("client sidecar ready line has no upstream bind: {ready}")))?;
    let admin = addr(&ready, "admin")?;
    let path = target.path.as_str();
    wait_routing(client_addr, path, "the mTLS client and server sidecars").await?;
    // Certificates arrive shortly after start: measure only once requests go over mTLS.
    let deadline = Instant::now() + START_TIMEOUT;
    while !counted_mtls(admin).await {
        if Instant::now() > deadline {
            return Err(runtime(format!(
                "no request went over mutual TLS within {START_TIMEOUT:?} (logs in {})",
                dir.display()
            )));
        }
        let _ = probe(client_addr, path).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(MtlsMesh { _control_plane: control_plane, client, server, url: format!("http://{client_addr}{path}") })
}

/// Whether a sidecar's `/metrics` counts an outbound request over mutual TLS.
async fn counted_mtls(admin: SocketAddr) -> bool {
    let scrape = async {
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        Some(text.lines().any(|l| {
            l.starts_with("plexus_requests_total{")
                && l.contains("direction=\"outbound\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        }))
    };
    tokio::time::timeout(Duration::from_secs(2), scrape).await.ok().flatten().unwrap_or(false)
}

/// Runs the comparison. Only HTTP/1.1 and HTTP/2 at a constant rate: overhead at "max
/// throughput" would compare different loads.
pub async fn run_overhead(cfg: &OverheadConfig, progress: Arc<Progress>) -> Result<Vec<PathResult>, BenchError> {
    if !matches!(cfg.load.load, Load::ConstantRate(_)) {
        return Err(BenchError::Config("overhead runs at a constant rate (--rate), not --max-throughput".into()));
    }
    if cfg.load.protocol == Protocol::Grpc {
        return Err(BenchError::Config("overhead supports http1 and http2".into()));
    }
    if cfg.rounds == 0 {
        return Err(BenchError::Config("rounds must be at least 1".into()));
    }
    cfg.load.validate()?;
    let target = Target::resolve(&cfg.load.url).await?;
    let dir = std::env::temp_dir().join(format!(
        "pxbench-overhead-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError::File { path: dir.display().to_string(), why: e.to_string() })?;
    let outcome = measure(cfg, &target, &dir, &progress).await;
    if outcome.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}

async fn measure(
    cfg: &OverheadConfig,
    target: &Target,
    dir: &Path,
    progress: &Arc<Progress>,
) -> Result<Vec<PathResult>, BenchError> {
    let mesh = start_mesh(cfg, target, dir).await?;
    let routes = [Route::Direct, Route::OneSidecar, Route::TwoSidecars, Route::TwoSidecarsMtls];
    let mut results: Vec<Option<PathResult>> = vec![None; routes.len()];
    for _ in 0..cfg.rounds {
        for (i, route) in routes.iter().enumerate() {
            let (url, proxies): (&str, Vec<&Sidecar>) = match route {
                Route::Direct => (&cfg.load.url, vec![]),
                Route::OneSidecar => (&mesh.one_url, vec![&mesh.one]),
                Route::TwoSidecars => (&mesh.two_url, vec![&mesh.client, &mesh.server]),
                Route::TwoSidecarsMtls => (&mesh.mtls.url, vec![&mesh.mtls.client, &mesh.mtls.server]),
            };
            let mut load = cfg.load.clone();
            load.url = url.to_string();
            let cpu_before: Duration = proxies.iter().map(|p| p.cpu()).sum();
            let warmup_before = progress.warmup.load(Ordering::Relaxed);
            let result = run(&load, progress.clone()).await?;
            let cpu: Duration = proxies.iter().map(|p| p.cpu()).sum::<Duration>().saturating_sub(cpu_before);
            let rss: u64 = proxies.iter().map(|p| p.rss()).sum();
            let requests = result.sent + progress.warmup.load(Ordering::Relaxed).saturating_sub(warmup_before);
            match &mut results[i] {
                Some(acc) => {
                    acc.result.merge_sequential(&result);
                    acc.proxy_cpu += cpu;
                    acc.proxy_rss = acc.proxy_rss.max(rss);
                    acc.requests += requests;
                }
                slot => *slot = Some(PathResult { route: *route, result, proxy_cpu: cpu, proxy_rss: rss, requests }),
            }
        }
    }
    Ok(results.into_iter().flatten().collect())
}

/// The comparison as a table: latency per path, what each path adds to the direct one, and
/// the proxies' cost.
pub fn render(paths: &[PathResult]) -> String {
    let mut s = String::new();
    let Some(direct) = paths.iter().find(|p| p.route == Route::Direct) else {
        return s;
    };
    let q = |p: &PathResult, q: f64| p.result.quantile_ms(q);
    let _ = writeln!(
        s,
        "{:<15} {:>9} {:>9} {:>9} {:>9} {:>9}   {:>29}   {:>13} {:>9}",
        "path", "rate", "p50", "p90", "p99", "p99.9", "added p50 / p90 / p99 / p99.9", "CPU/1k req/s", "RSS"
    );
    for p in paths {
        let added = if p.route == Route::Direct {
            "-".to_string()
        } else {
            [0.5, 0.9, 0.99, 0.999].map(|x| format!("{:+.2}", q(p, x) - q(direct, x))).join(" / ") + " ms"
        };
        let (cpu, rss) = if p.route.proxies() == 0 {
            ("-".to_string(), "-".to_string())
        } else {
            (format!("{:.1}% core", p.cpu_per_krps() * 100.0), format!("{:.1} MiB", p.proxy_rss as f64 / 1048576.0))
        };
        let _ = writeln!(
            s,
            "{:<15} {:>7.1}/s {:>9} {:>9} {:>9} {:>9}   {added:>29}   {cpu:>13} {rss:>9}",
            p.route.as_str(),
            p.result.actual_qps(),
            msf(q(p, 0.5)),
            msf(q(p, 0.9)),
            msf(q(p, 0.99)),
            msf(q(p, 0.999)),
        );
        let mut problems = Vec::new();
        if p.result.error_count() > 0 {
            let kinds: Vec<String> = p.result.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            problems.push(format!("errors: {}", kinds.join(", ")));
        }
        if p.result.unsent > 0 {
            problems.push(format!("not sent on time: {}", p.result.unsent));
        }
        if !problems.is_empty() {
            let _ = writeln!(s, "{:<15} {}", "", problems.join("; "));
        }
    }
    let _ = writeln!(s);
    for w in warnings(paths, direct) {
        let _ = writeln!(s, "warning: {w}");
    }
    let _ = writeln!(
        s,
        "latencies are corrected (from intended send times); CPU is the path's proxies together, in cores per 1,000 req/s; RSS is their resident memory"
    );
    let _ = writeln!(
        s,
        "2-sidecars: plaintext between the sidecars (resources file); 2-sidecars-mtls: fed by a control plane, mutual TLS 1.3 between them"
    );
    s
}

/// What makes the figures above unreliable: a mesh path measured faster than the direct one
/// (the overhead cannot be negative: the difference is the machine's noise), and requests the
/// generator could not send on time (the machine, or the generator, fell behind).
fn warnings(paths: &[PathResult], direct: &PathResult) -> Vec<String> {
    let mut out = Vec::new();
    let faster: Vec<String> = paths
        .iter()
        .filter(|p| p.route != Route::Direct)
        .filter_map(|p| {
            let below: Vec<String> = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")]
                .into_iter()
                .filter(|(q, _)| p.result.quantile_ms(*q) < direct.result.quantile_ms(*q))
                .map(|(_, name)| name.to_string())
                .collect();
            (!below.is_empty()).then(|| format!("{} ({})", p.route.as_str(), below.join(", ")))
        })
        .collect();
    if !faster.is_empty() {
        out.push(format!(
            "negative overheads: {} measured faster than direct — the machine is too busy or noisy for these differences to mean anything; run more --rounds, longer, or on a quieter machine",
            faster.join(", ")
        ));
    }
    let unsent: u64 = paths.iter().map(|p| p.result.unsent).sum();
    if unsent > 0 {
        out.push(format!(
            "{unsent} requests were not sent on time: the load generator or the machine fell behind, so the rate was not held and latencies understate the load"
        ));
    }
    out
}

impl RunResult {
    /// Adds a later run of the same configuration (a round of an interleaved comparison):
    /// counts and histograms add up, and so do the measured durations.
    pub fn merge_sequential(&mut self, other: &RunResult) {
        let duration = self.duration + other.duration;
        let start = self.start_time.min(other.start_time);
        let cpu = match (self.generator_cpu, other.generator_cpu) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.merge(other);
        self.generator_cpu = cpu;
        self.load = other.load;
        self.connections = other.connections;
        self.threads = other.threads;
        self.url = other.url.clone();
        self.duration = duration;
        self.start_time = start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resources_written_for_the_sidecars_are_valid() {
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let text = format!("{}---\n{}", service_yaml(), workload_yaml(ip, 7000, 9000, true));
        let docs = plexus_core::load::parse_documents("overhead.yaml", &text).expect("valid resources");
        assert_eq!(docs.len(), 2);
    }

    fn path(route: Route, p50_us: u64, unsent: u64) -> PathResult {
        let mut result = run_result();
        for _ in 0..100 {
            result.latency.record(p50_us).expect("record");
        }
        result.unsent = unsent;
        PathResult { route, result, proxy_cpu: Duration::ZERO, proxy_rss: 0, requests: 100 }
    }

    /// Issue 17 item 6: negative overheads come with a warning, unsent requests are reported
    /// as such, and no empty `errors:` list is printed.
    #[test]
    fn render_warns_about_negative_overheads_and_never_prints_empty_errors() {
        let busy = [path(Route::Direct, 1_000, 0), path(Route::OneSidecar, 900, 6), path(Route::TwoSidecars, 1_500, 0)];
        let text = render(&busy);
        assert!(!text.contains("errors: ;") && !text.contains("errors: \n"), "{text}");
        assert!(text.contains("not sent on time: 6"), "{text}");
        assert!(text.contains("warning: negative overheads: 1-sidecar (p50, p90, p99, p99.9)"), "{text}");
        assert!(text.contains("warning: 6 requests were not sent on time"), "{text}");
        // A quiet machine: no warning.
        let quiet = [path(Route::Direct, 1_000, 0), path(Route::OneSidecar, 1_100, 0)];
        assert!(!render(&quiet).contains("warning"), "{}", render(&quiet));
    }

    fn run_result() -> RunResult {
        RunResult {
            url: String::new(),
            protocol: Protocol::Http1,
            load: Load::ConstantRate(1000.0),
            keepalive: true,
            connections: 1,
            streams: 1,
            threads: 1,
            duration: Duration::from_secs(10),
            warmup: Duration::ZERO,
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            drained_after: Duration::ZERO,
            planned: None,
            unsent: 0,
            sent: 10_000,
            completed: 10_000,
            errors: Default::default(),
            latency: crate::recorder::histogram(),
            service: crate::recorder::histogram(),
            lag: crate::recorder::histogram(),
            generator_cpu: None,
        }
    }

    #[test]
    fn cpu_per_thousand_requests_per_second() {
        let result = run_result();
        // 2.5 s of proxy CPU for 10,000 requests: 0.25 ms each, a quarter of a core at 1k/s.
        let p = PathResult {
            route: Route::OneSidecar,
            result,
            proxy_cpu: Duration::from_millis(2500),
            proxy_rss: 0,
            requests: 10_000,
        };
        assert!((p.cpu_per_krps() - 0.25).abs() < 1e-9);
    }
}
