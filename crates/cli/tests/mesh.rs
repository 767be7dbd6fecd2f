//! The mesh end to end: `plexus demo`, and `plexus control` + `plexus run` + sidecars fed by
//! gRPC discovery — route changes reaching proxies, control-plane restarts under load,
//! workloads crashing out of the balancers.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use plexus_testkit::{Demo, HttpEcho, Proc, Proxy, Shared, TempDir, exclusive, free_port, serial};

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Starts `plexus ARGS` and returns once it printed its one-line JSON ready line, which
/// must hold the field `ready_field`.
fn start_ready(args: &[&std::ffi::OsStr], ready_field: &str) -> Result<Proc> {
    let mut child = Command::new(PLEXUS).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    anyhow::ensure!(line.contains(&format!("\"{ready_field}\"")), "no ready line: {line:?}");
    Ok(Proc(child))
}

/// Starts `plexus control` on the given ports; returns once it printed its ready line.
fn control(data: &Path, http: u16, grpc: u16) -> Result<Proc> {
    control_with(data, http, grpc, &[])
}

/// [`control`] with more arguments (e.g. [`SHORT_TTL`]).
fn control_with(data: &Path, http: u16, grpc: u16, extra: &[&str]) -> Result<Proc> {
    let (http, grpc) = (format!("127.0.0.1:{http}"), format!("127.0.0.1:{grpc}"));
    let args = ["control", "--http-addr", &http, "--grpc-addr", &grpc].map(std::ffi::OsStr::new);
    let extra: Vec<&std::ffi::OsStr> = extra.iter().map(std::ffi::OsStr::new).collect();
    start_ready(&[&args[..], &["--data-dir".as_ref(), data.as_os_str()], &extra].concat(), "grpc")
}

/// The registration TTL of a control plane started with [`SHORT_TTL`] (15 s by default), for
/// tests that wait for a crashed workload to leave the mesh.
const TTL: Duration = Duration::from_secs(4);
const SHORT_TTL: [&str; 2] = ["--registration-ttl", "4s"];
/// Sidecar timing that fits [`SHORT_TTL`]: a heartbeat well within the TTL, and reconnection
/// attempts at least every second.
const FAST_SIDECAR: [&str; 4] = ["--heartbeat-interval", "1s", "--control-plane-retry-max", "1s"];

fn cli(data: &Path, http: u16, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(PLEXUS)
        .args(args)
        .env("PLEXUS_SERVER", format!("http://127.0.0.1:{http}"))
        .env("PLEXUS_DATA_DIR", data)
        .output()?)
}

fn get_text(addr: &str, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, out))
}

fn served_by(page: &str) -> Option<String> {
    page.lines().find_map(|l| l.trim().strip_prefix("Reviews served by: ").map(|v| v.trim().to_string()))
}

/// Applies a one-port `echo` Service (port 8080, HTTP) through the CLI.
fn apply_echo_service(dir: &TempDir, data: &Path, http: u16) -> Result<()> {
    let services = dir.join("svc.yaml");
    std::fs::write(
        &services,
        "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: echo}\nspec:\n  selector: {app: echo}\n  ports: [{name: http, port: 8080, appProtocol: http}]\n",
    )?;
    let o = cli(data, http, &["apply", "-f", services.to_str().context("path")?])?;
    anyhow::ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Ok(())
}

/// `plexus run --service echo` in front of an in-test app on `app_port` (the workload's own
/// command just sleeps); its workload token is created through the API on `http`. `extra`:
/// more `plexus run` arguments (e.g. [`FAST_SIDECAR`]).
fn run_echo_workload(data: &Path, http: u16, grpc_url: &str, app_port: u16, extra: &[&str]) -> Result<Proc> {
    let child = Command::new(PLEXUS)
        .args(["run", "--service", "echo", "--port", &app_port.to_string(), "--control-plane", grpc_url, "--data-dir"])
        .arg(data)
        .args(["--server", &format!("http://127.0.0.1:{http}")])
        .args(extra)
        .args(["--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Proc(child))
}

/// A client sidecar fed by the control plane, with an `--upstream` bind to `echo:8080`, and a
/// workload token for its service account (`--service` in `extra`, else `default`).
async fn echo_client(data: &Path, http: u16, grpc_url: &str, extra: &[&str]) -> Result<Proxy> {
    let account =
        extra.iter().position(|a| *a == "--service").and_then(|i| extra.get(i + 1)).copied().unwrap_or("default");
    let server = format!("http://127.0.0.1:{http}");
    let token = plexus_testkit::workload_token(PLEXUS, &server, data, "default", account).await?;
    let mut args =
        vec!["proxy", "--control-plane", grpc_url, "--token", &token, "--outbound-port", "0", "--inbound-port", "0"];
    args.extend_from_slice(&["--admin-port", "0", "--upstream", "echo:8080=0"]);
    args.extend_from_slice(extra);
    Proxy::start_named("client", PLEXUS, args).await
}

/// Two echo workloads (in-test apps behind `plexus run` sidecars) and a client sidecar, all
/// fed from `grpc_url`; returns once the client reaches both.
/// `extra`: more arguments for every sidecar (e.g. [`FAST_SIDECAR`]).
async fn echo_mesh(
    data: &Path,
    http: u16,
    grpc_url: &str,
    extra: &[&str],
) -> Result<([HttpEcho; 2], Vec<Proc>, Proxy)> {
    let apps = [HttpEcho::start("echo-a").await?, HttpEcho::start("echo-b").await?];
    let mut runs = Vec::new();
    for app in &apps {
        runs.push(run_echo_workload(data, http, grpc_url, app.port(), extra)?);
    }
    let client = echo_client(data, http, grpc_url, extra).await?;
    both_echo_workloads_serve(client.upstream("echo.default:8080")?).await?;
    Ok((apps, runs, client))
}

/// Waits until requests through the client's `echo:8080` bind reach both echo workloads.
async fn both_echo_workloads_serve(addr: std::net::SocketAddr) -> Result<()> {
    plexus_testkit::eventually(Duration::from_secs(20), || async move {
        let mut by = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let r = plexus_testkit::client::get(addr, "echo:8080", "/", &[], Duration::from_secs(5)).await?;
            anyhow::ensure!(r.status == 200, "status {}", r.status);
            by.extend(r.header("x-served-by").map(str::to_string));
        }
        anyhow::ensure!(by.len() == 2, "served by {by:?}");
        Ok(())
    })
    .await
}

/// Waits until the client's balancer for `echo` holds `n` endpoints.
async fn client_endpoints(client: &Proxy, n: usize, within: Duration) -> Result<()> {
    plexus_testkit::eventually(within, || async move {
        let config = client.admin_get("/config").await?.json()?;
        let endpoints = config["services"][0]["ports"][0]["endpoints"].as_array().map(Vec::len);
        anyhow::ensure!(endpoints == Some(n), "endpoints in the client's config: {endpoints:?}");
        Ok(())
    })
    .await
}

/// Fetches pages until every reviews version has answered (the latency-aware balancer
/// favours the fastest; an idle version's estimate decays within seconds, so it is tried
/// again). Every page must be complete.
fn every_version_answers(demo: &Demo) -> Result<()> {
    let ingress = demo.ingress.to_string();
    let mut seen = std::collections::BTreeSet::new();
    let started = Instant::now();
    while seen.len() < 3 && started.elapsed() < Duration::from_secs(20) {
        let (status, page) = get_text(&ingress, "/productpage", &[])?;
        assert_eq!(status, 200, "{page}");
        assert!(!page.contains("Error fetching product details"), "{page}");
        seen.insert(served_by(&page).context("no 'Reviews served by' line")?);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["reviews-v1", "reviews-v2", "reviews-v3"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_bookinfo_follows_routes_and_stops_cleanly() -> Result<()> {
    let _serial = serial().await;
    let dir = TempDir::new("demo")?;
    let demo = Demo::start(PLEXUS, &dir, &["--no-load"]).await?;
    let (data, http, ingress_addr) = (demo.data.clone(), demo.http, demo.ingress.to_string());
    every_version_answers(&demo)?;

    // A healthy demo passes `plexus check`.
    let o = cli(&data, http, &["check"])?;
    let report = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "check failed on a healthy demo:\n{report}");
    assert!(report.contains("✓ 7 proxies connected") && report.contains("✓ every proxy is in sync"), "{report}");
    // The ingress is Gateway `ingress` with HTTPRoute `bookinfo` (SPEC §9): its status as the
    // Gateway API shapes it, its gateway proxy's listener in `check`, and only Bookinfo's
    // paths forwarded.
    assert!(report.contains("✓ gateway ingress-gateway (Gateway ingress.default): listeners bound"), "{report}");
    let o = cli(&data, http, &["get", "gateway", "ingress", "-o", "json"])?;
    let gateway: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(gateway["status"]["listeners"][0]["attachedRoutes"], 1, "{gateway:#}");
    assert_eq!(gateway["status"]["conditions"][1]["type"], "Programmed", "{gateway:#}");
    assert_eq!(gateway["status"]["conditions"][1]["status"], "True", "{gateway:#}");
    let (status, _) = get_text(&ingress_addr, "/details/0", &[])?;
    assert_eq!(status, 404, "a path no route of the Gateway names");
    // A listener conflicting with the first, and an HTTPS listener whose certificate files do
    // not exist: `check` reports both (the certificate as the gateway proxy sees it); the
    // first listener keeps serving.
    let ingress_port = demo.ingress.port();
    let gateway_yaml = |extra: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: ingress}}\nspec:\n  gatewayClassName: plexus\n  listeners:\n  - {{name: http, port: {ingress_port}, protocol: HTTP}}\n{extra}"
        )
    };
    let broken_gateway = dir.join("gateway-broken.yaml");
    std::fs::write(
        &broken_gateway,
        gateway_yaml(&format!(
            "  - {{name: again, port: {ingress_port}, protocol: HTTP}}\n  - {{name: https, port: {}, protocol: HTTPS, tls: {{certificateRefs: [{{name: missing-cert}}]}}}}\n",
            free_port()
        )),
    )?;
    let o = cli(&data, http, &["apply", "-f", broken_gateway.to_str().context("utf-8")?])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = plexus_testkit::eventually(Duration::from_secs(15), || async {
        let o = cli(&data, http, &["check"])?;
        let report = String::from_utf8_lossy(&o.stdout).to_string();
        anyhow::ensure!(report.contains("certificate default/missing-cert"), "{report}");
        anyhow::ensure!(!o.status.success(), "{report}");
        Ok(report)
    })
    .await?;
    assert!(report.contains("listener \"again\" conflicts and is not served"), "{report}");
    assert!(report.contains("tls.crt"), "{report}");
    let (status, _) = get_text(&ingress_addr, "/productpage", &[])?;
    assert_eq!(status, 200);
    let healthy_gateway = dir.join("gateway.yaml");
    std::fs::write(&healthy_gateway, gateway_yaml(""))?;
    let o = cli(&data, http, &["apply", "-f", healthy_gateway.to_str().context("utf-8")?])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A route shifts traffic within a second, without restarting anything.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookinfo");
    let o = cli(&data, http, &["apply", "-f", repo.join("route-jason-v3.yaml").to_str().context("path")?])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let applied = Instant::now();
    loop {
        let (_, page) = get_text(&ingress_addr, "/productpage", &[])?;
        let (_, jason) = get_text(&ingress_addr, "/productpage", &[("end-user", "jason")])?;
        if served_by(&page).as_deref() == Some("reviews-v1") && served_by(&jason).as_deref() == Some("reviews-v3") {
            break;
        }
        assert!(applied.elapsed() < Duration::from_secs(2), "the route did not take effect within a second or so");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..10 {
        let (_, page) = get_text(&ingress_addr, "/productpage", &[])?;
        assert_eq!(served_by(&page).as_deref(), Some("reviews-v1"));
        assert!(!page.contains("stars:"), "v1 shows no stars");
        let (_, jason) = get_text(&ingress_addr, "/productpage", &[("end-user", "jason")])?;
        assert!(jason.contains("stars: red"), "jason sees red stars");
    }
    // Deleting it spreads traffic again.
    let o = cli(&data, http, &["delete", "httproute", "reviews"])?;
    assert!(o.status.success());
    let deleted = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 3 {
        let (_, page) = get_text(&ingress_addr, "/productpage", &[])?;
        seen.extend(served_by(&page));
        assert!(deleted.elapsed() < Duration::from_secs(5), "traffic did not spread again: {seen:?}");
    }

    // `proxy-config` shows what a proxy holds: the ingress learned productpage.
    let o = cli(&data, http, &["proxy-config", "ingress-gateway"])?;
    let config: serde_json::Value =
        serde_json::from_slice(&o.stdout).with_context(|| String::from_utf8_lossy(&o.stderr).to_string())?;
    assert_eq!(config["controlPlaneConnected"], true);
    assert!(
        config["services"].as_array().is_some_and(|s| s.iter().any(|s| s["name"]["name"] == "productpage")),
        "{config}"
    );
    let o = cli(&data, http, &["proxy-config", "nope"])?;
    assert_eq!(o.status.code(), Some(1));

    // `check` flags a route to a missing Service, and a workload whose proxy stopped.
    let broken = dir.join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: broken}\nspec:\n  parentRefs: [{name: ratings}]\n  rules: [{backendRefs: [{name: ratings-v9}]}]\n",
    )?;
    assert!(cli(&data, http, &["apply", "-f", broken.to_str().context("path")?])?.status.success());
    let o = cli(&data, http, &["check"])?;
    let report = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "{report}");
    assert!(
        report.contains(
            "✗ HTTPRoute default/broken: rule 0 sends traffic to Service ratings-v9.default, which does not exist"
        ),
        "{report}"
    );
    assert!(cli(&data, http, &["delete", "httproute", "broken"])?.status.success());
    let details_run = Command::new("pgrep")
        .args(["-f", &format!("run --service details .*--data-dir {}", data.display())])
        .output()?;
    let pid: i32 =
        String::from_utf8_lossy(&details_run.stdout).lines().next().context("details run pid")?.trim().parse()?;
    // SAFETY: SIGKILL to a process of this test's demo.
    unsafe { libc_kill(pid, 9) };
    std::thread::sleep(Duration::from_millis(500));
    let o = cli(&data, http, &["check"])?;
    let report = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "{report}");
    assert!(report.contains("is registered but its proxy is not connected"), "{report}");
    let (_, page) = get_text(&ingress_addr, "/productpage", &[])?;
    assert!(page.contains("Error fetching product details"), "details is down");

    // Prometheus discovery lists every proxy.
    let (status, targets) = get_text(&format!("127.0.0.1:{http}"), "/api/v1/prometheus/targets", &[])?;
    assert_eq!(status, 200);
    assert!(targets.to_ascii_lowercase().contains("content-type: application/json"), "{targets}");
    let body = targets.split("\r\n\r\n").nth(1).context("body")?;
    let groups: serde_json::Value = serde_json::from_str(body)?;
    assert_eq!(
        groups.as_array().map(Vec::len),
        Some(6),
        "five sidecars (details was killed) and the ingress: {groups}"
    );
    assert!(
        groups
            .as_array()
            .context("groups")?
            .iter()
            .any(|g| g["labels"]["service"] == "reviews" && g["labels"]["version"] == "v2"),
        "{groups}"
    );

    // SIGINT stops everything within 10 s, leaving no process behind.
    demo.stop().await?;
    std::thread::sleep(Duration::from_millis(300));
    let leftovers = Command::new("pgrep").args(["-f", &data.display().to_string()]).output()?;
    assert!(leftovers.stdout.is_empty(), "processes left behind: {}", String::from_utf8_lossy(&leftovers.stdout));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restart_under_load_and_crashed_workloads_leave_the_balancers() -> Result<()> {
    let dir = TempDir::new("cp-restart")?;
    let data = dir.join("data");
    let (http, grpc) = (free_port(), free_port());
    let cp = control_with(&data, http, grpc, &SHORT_TTL)?;
    apply_echo_service(&dir, &data, http)?;

    // Two workloads: each an in-test echo app behind a `plexus run` sidecar.
    let grpc_url = format!("http://127.0.0.1:{grpc}");
    let (_apps, mut runs, client) = echo_mesh(&data, http, &grpc_url, &FAST_SIDECAR).await?;
    let addr = client.upstream("echo.default:8080")?;

    // Load during the rest of the test: no request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match plexus_testkit::client::get(addr, "echo:8080", "/", &[], Duration::from_secs(5)).await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => {
                        eprintln!("status {} ({:?})", r.status, r.header("x-plexus-error"));
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        eprintln!("error {e:#}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    // Kill -9 the control plane, keep serving for 2 s, restart it: proxies resync.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(cp);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cp = control_with(&data, http, grpc, &SHORT_TTL)?;
    // The client and both workloads' sidecars reconnect.
    plexus_testkit::eventually(Duration::from_secs(10), || async move {
        let n = connected_proxies(http).await?;
        anyhow::ensure!(n == 3, "{n} of 3 proxies reconnected");
        Ok(())
    })
    .await?;
    let before = done.load(Ordering::SeqCst);

    // A workload crashes (its sidecar is SIGKILLed): it leaves every balancer within the
    // registration TTL, and requests keep succeeding meanwhile (a refused connection is
    // retried elsewhere).
    let crashed = runs.remove(0);
    drop(crashed);
    let crash = Instant::now();
    loop {
        let o = cli(&data, http, &["get", "workloads", "-o", "json"])?;
        let list: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        if list["items"].as_array().map(Vec::len) == Some(1) {
            break;
        }
        assert!(
            crash.elapsed() < TTL + Duration::from_secs(5),
            "the crashed workload is still registered after TTL + 5 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let expired_after = crash.elapsed();
    assert!(expired_after < TTL + Duration::from_secs(2), "expired after {expired_after:?} (TTL {TTL:?})");
    // The restarted control plane pushed the removal: the client's balancer holds one endpoint.
    client_endpoints(&client, 1, Duration::from_secs(3)).await?;
    stop.store(true, Ordering::SeqCst);
    load.await?;
    assert!(done.load(Ordering::SeqCst) > before + 50, "load kept running");
    assert_eq!(failures.load(Ordering::SeqCst), 0, "requests failed during the restart or the crash");
    drop(cp);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_reports_exact_success_rates_from_proxy_telemetry() -> Result<()> {
    let dir = TempDir::new("stat")?;
    let data = dir.join("data");
    let (http, grpc) = (free_port(), free_port());
    let _cp = control(&data, http, grpc)?;
    apply_echo_service(&dir, &data, http)?;
    let app = HttpEcho::start("echo").await?;
    let grpc_url = format!("http://127.0.0.1:{grpc}");
    let _run = run_echo_workload(&data, http, &grpc_url, app.port(), &[])?;
    let client = echo_client(&data, http, &grpc_url, &["--workload", "client-1", "--service", "client"]).await?;
    let addr = client.upstream("echo.default:8080")?;
    plexus_testkit::eventually(Duration::from_secs(20), || async move {
        let r = plexus_testkit::client::get(addr, "echo:8080", "/warmup", &[], Duration::from_secs(5)).await?;
        anyhow::ensure!(r.status == 200, "status {}", r.status);
        Ok(())
    })
    .await?;
    let before = app.requests();
    for i in 0..1000 {
        let path = if i % 10 == 0 { "/status/500" } else { "/ok" };
        let r = plexus_testkit::client::get(addr, "echo:8080", path, &[], Duration::from_secs(5)).await?;
        assert_eq!(r.status, if i % 10 == 0 { 500 } else { 200 });
    }
    assert_eq!(app.requests() - before, 1000);
    // Reports go out every 2 s: wait until the client's and the workload's have arrived (the
    // window covers the warm-up request and the 1,000).
    let (stat, table) = plexus_testkit::eventually(Duration::from_secs(15), || async {
        let o = cli(&data, http, &["stat", "service", "echo", "--window", "1m", "-o", "json"])?;
        let stat: plexus_control::api_types::StatAnswer =
            serde_json::from_slice(&o.stdout).with_context(|| String::from_utf8_lossy(&o.stderr).to_string())?;
        let o = cli(&data, http, &["stat", "workload", "--window", "1m"])?;
        let table = String::from_utf8_lossy(&o.stdout).into_owned();
        let workload_reported = table.lines().any(|l| l.starts_with("echo-v1-") && l.contains("90.01%"));
        let counted = stat.rows.first().is_some_and(|r| r.requests >= 1001);
        anyhow::ensure!(counted && workload_reported, "{stat:?}\n{table}");
        Ok((stat, table))
    })
    .await?;
    let row = stat.rows.first().context("no row")?;
    assert_eq!(row.requests, 1001, "the warm-up and exactly 1,000 more: {stat:?}");
    let success = row.success_rate;
    assert!((0.89..=0.91).contains(&success), "success rate {success}");
    assert!(row.p99_ms.is_some_and(|p| p > 0.0), "{stat:?}");
    // The table view and the per-workload view agree.
    assert!(table.lines().any(|l| l.starts_with("echo-v1-") && l.contains("90.01%")), "{table}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_in_network_namespaces_intercepts_plain_service_calls() -> Result<()> {
    if !(plexus_testkit::require_root()
        && plexus_testkit::require_tool("ip")
        && plexus_testkit::require_tool("iptables"))
    {
        return Ok(());
    }
    let _host_network = exclusive(Shared::HostNetwork).await;
    let dir = TempDir::new("demo-netns")?;
    let demo = Demo::start(PLEXUS, &dir, &["--no-load", "--netns"]).await?;
    let http = demo.http;
    every_version_answers(&demo)?;
    // Workloads live in their namespaces' addresses, and productpage's plain
    // `http://reviews:9080` calls (no HTTP_PROXY) went through its sidecar.
    let (_, targets) = get_text(&format!("127.0.0.1:{http}"), "/api/v1/prometheus/targets", &[])?;
    let body = targets.split("\r\n\r\n").nth(1).context("body")?;
    let groups: serde_json::Value = serde_json::from_str(body)?;
    let admin = groups
        .as_array()
        .context("groups")?
        .iter()
        .find(|g| g["labels"]["service"] == "productpage")
        .and_then(|g| g["targets"][0].as_str())
        .context("productpage target")?
        .to_string();
    assert!(admin.starts_with("10.251.0."), "productpage runs in its namespace: {admin}");
    let (_, metrics) = get_text(&admin, "/metrics", &[])?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("plexus_requests_total{direction=\"outbound\",source_workload=\"productpage-v1-")
                && l.contains("destination_service=\"reviews\"")
                && l.contains("response_code=\"200\"")),
        "productpage's sidecar carried its calls to reviews:\n{metrics}"
    );
    // Issue 16: `proxy-config` works in `--netns` mode, where a sidecar's admin `/config`
    // answers off loopback only the control plane over mTLS: the CLI goes through it.
    let (_, proxies) = get_text(&format!("127.0.0.1:{http}"), "/api/v1/proxies", &[])?;
    let proxies: serde_json::Value = serde_json::from_str(proxies.split("\r\n\r\n").nth(1).context("body")?)?;
    let workload = proxies["proxies"]
        .as_array()
        .context("proxies")?
        .iter()
        .find(|p| p["service"] == "productpage")
        .and_then(|p| p["workload"].as_str())
        .context("productpage's proxy")?
        .to_string();
    let o = demo.cli(&["proxy-config", &workload])?;
    let config: serde_json::Value =
        serde_json::from_slice(&o.stdout).with_context(|| String::from_utf8_lossy(&o.stderr).to_string())?;
    assert_eq!(config["controlPlaneConnected"], true, "{config}");
    assert!(
        config["services"].as_array().is_some_and(|s| s.iter().any(|s| s["name"]["name"] == "reviews")),
        "{config}"
    );
    // ... while the admin address itself refuses `/config` to anyone else (the control: it is
    // reachable, `/metrics` answered above).
    let (status, _) = get_text(&admin, "/config", &[])?;
    assert_ne!(status, 200, "/config off loopback answered a plain client");
    let namespaces = Command::new("ip").args(["netns", "list"]).output()?;
    assert_eq!(String::from_utf8_lossy(&namespaces.stdout).lines().filter(|l| l.starts_with("plx-")).count(), 6);
    let stopping = Instant::now();
    demo.stop().await?;
    let namespaces = Command::new("ip").args(["netns", "list"]).output()?;
    let left = String::from_utf8_lossy(&namespaces.stdout).to_string();
    assert!(!left.contains("plx-"), "namespaces left behind after {:?}: {left}", stopping.elapsed());
    // Issue 17 item 4: the bridge goes too (nothing else is attached to it: this test holds
    // the host network).
    let bridge = Command::new("ip").args(["link", "show", "plx0"]).output()?;
    assert!(!bridge.status.success(), "the plx0 bridge stayed: {}", String::from_utf8_lossy(&bridge.stdout));
    Ok(())
}

/// Starts `plexus agent` on `port`, relaying to the control plane's gRPC port; returns once it
/// printed its ready line.
fn node_agent(port: u16, admin: u16, grpc: u16) -> Result<Proc> {
    let (listen, upstream) = (format!("127.0.0.1:{port}"), format!("http://127.0.0.1:{grpc}"));
    let admin = format!("127.0.0.1:{admin}");
    let args = ["agent", "--listen", &listen, "--admin", &admin, "--control-plane", &upstream];
    start_ready(&args.map(std::ffi::OsStr::new), "listen")
}

/// The value of one sample (`name` or `name{labels}`, exactly as exposed) on an agent's
/// admin `/metrics`; fails if the sample is absent.
fn agent_metric(admin: u16, sample: &str) -> Result<f64> {
    let (status, page) = get_text(&format!("127.0.0.1:{admin}"), "/metrics", &[])?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    plexus_testkit::metric_sample(&page, sample).with_context(|| format!("no sample {sample} in:\n{page}"))
}

/// An agent whose control plane is down closes its proxies' connections (they keep retrying)
/// and says so on its admin server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_agent_without_its_control_plane_reports_it() -> Result<()> {
    let (agent_port, admin, closed) = (free_port(), free_port(), free_port());
    let _agent = node_agent(agent_port, admin, closed)?;
    assert_eq!(get_text(&format!("127.0.0.1:{admin}"), "/live", &[])?.0, 200);
    assert_eq!(get_text(&format!("127.0.0.1:{admin}"), "/ready", &[])?.0, 200);
    // A well-formed token (it pins an anchor): the proxy tries to bootstrap through the agent.
    let token = format!("plx1.{}.{}.{}", "0".repeat(16), "1".repeat(64), "2".repeat(64));
    let _proxy = Proc(
        Command::new(PLEXUS)
            .args(["proxy", "--control-plane", &format!("http://127.0.0.1:{agent_port}"), "--token", &token])
            .args(["--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    // The agent closes the proxy's connection at once; the proxy retries with backoff, each
    // time on a new connection, so the connection gauge reads 1 only while a retry is in
    // flight (the steady gauge is checked in `proxies_behind_a_node_agent_survive_restarts`):
    // here it must never exceed one.
    plexus_testkit::eventually(Duration::from_secs(10), || async {
        anyhow::ensure!(agent_metric(admin, "plexus_agent_proxy_connections")? <= 1.0, "proxy connections");
        anyhow::ensure!(
            agent_metric(admin, "plexus_agent_requests_total{outcome=\"unavailable\"}")? >= 1.0,
            "unavailable"
        );
        anyhow::ensure!(agent_metric(admin, "plexus_agent_control_plane_reachable")? == 0.0, "unreachable");
        anyhow::ensure!(agent_metric(admin, "plexus_agent_open_streams")? == 0.0, "no connection stays relayed");
        Ok(())
    })
    .await
}

/// Proxies the control plane counts as connected.
async fn connected_proxies(http: u16) -> Result<usize> {
    let v = plexus_testkit::client::get_api_json(([127, 0, 0, 1], http).into(), "/api/v1/proxies").await?;
    Ok(v["proxies"].as_array().map(Vec::len).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_behind_a_node_agent_share_one_connection_and_survive_restarts() -> Result<()> {
    let dir = TempDir::new("node-agent")?;
    let data = dir.join("data");
    let (http, grpc, agent_port, admin) = (free_port(), free_port(), free_port(), free_port());
    let cp = control(&data, http, grpc)?;
    apply_echo_service(&dir, &data, http)?;
    let agent = node_agent(agent_port, admin, grpc)?;

    // Two workloads and a client, all reaching the control plane through the agent:
    // registration, certificates, discovery and telemetry are relayed.
    let agent_url = format!("http://127.0.0.1:{agent_port}");
    let (_apps, mut runs, client) = echo_mesh(&data, http, &agent_url, &[]).await?;
    let addr = client.upstream("echo.default:8080")?;

    // The control plane sees three proxies, each on its own TLS session relayed by the agent
    // (end to end: the agent holds no credential and sees only ciphertext).
    let one_connection_three_proxies = || async {
        let proxies = connected_proxies(http).await?;
        anyhow::ensure!(proxies == 3, "{proxies} proxies");
        Ok(())
    };
    plexus_testkit::eventually(Duration::from_secs(10), one_connection_three_proxies).await?;
    // The agent's own view: the proxies' connections, all relayed.
    plexus_testkit::eventually(Duration::from_secs(10), || async {
        anyhow::ensure!(agent_metric(admin, "plexus_agent_proxy_connections")? >= 3.0, "proxy connections");
        anyhow::ensure!(agent_metric(admin, "plexus_agent_open_streams")? >= 3.0, "relayed connections");
        anyhow::ensure!(agent_metric(admin, "plexus_agent_control_plane_reachable")? == 1.0, "reachable");
        anyhow::ensure!(agent_metric(admin, "plexus_agent_requests_total{outcome=\"relayed\"}")? >= 3.0, "relayed");
        Ok(())
    })
    .await?;

    // The agent dies: proxies keep serving with their last view.
    drop(agent);
    for _ in 0..20 {
        let r = plexus_testkit::client::get(addr, "echo:8080", "/", &[], Duration::from_secs(5)).await?;
        assert_eq!(r.status, 200, "with the agent down");
    }
    // It comes back: every proxy reconnects through it (backoff at most 5 s).
    let _agent = node_agent(agent_port, admin, grpc)?;
    plexus_testkit::eventually(Duration::from_secs(15), one_connection_three_proxies).await?;
    both_echo_workloads_serve(addr).await?;

    // The control plane restarts: the agent reconnects upstream, the proxies resync through it.
    drop(cp);
    let _cp = control(&data, http, grpc)?;
    plexus_testkit::eventually(Duration::from_secs(15), one_connection_three_proxies).await?;
    both_echo_workloads_serve(addr).await?;

    // A workload's sidecar is killed: its stream on the shared connection ends, the control
    // plane removes the workload and the client's balancer drops it.
    drop(runs.remove(0));
    client_endpoints(&client, 1, Duration::from_secs(20)).await?;
    plexus_testkit::eventually(Duration::from_secs(5), || async {
        let proxies = connected_proxies(http).await?;
        anyhow::ensure!(proxies == 2, "{proxies} proxies connected");
        Ok(())
    })
    .await?;
    Ok(())
}

/// Issue 17 item 2: in a fresh demo, 60 quick sequential page loads reach every reviews
/// version (latency awareness must not starve an endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_sequential_page_loads_reach_every_reviews_version() -> Result<()> {
    let _serial = serial().await;
    let dir = TempDir::new("demo-spread")?;
    let demo = Demo::start(PLEXUS, &dir, &["--no-load"]).await?;
    let mut served = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..60 {
        let page = demo.get("/productpage").await?;
        anyhow::ensure!(page.status == 200, "productpage answered {}", page.status);
        let by = page.text().lines().find_map(|l| l.trim().strip_prefix("Reviews served by: ").map(str::to_string));
        *served.entry(by.unwrap_or_else(|| "none".into())).or_default() += 1;
    }
    let versions = served.keys().filter(|k| k.contains("reviews")).count();
    assert_eq!(versions, 3, "60 page loads reached: {served:?}");
    demo.stop().await
}
