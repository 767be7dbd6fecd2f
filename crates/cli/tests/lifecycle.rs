//! Workloads and their sidecars stopping and starting without losing requests (issue 18):
//! graceful shutdown of the demo (the edge drains first, the apps finish what is in flight),
//! and a sidecar stopped on its own taking its workload with it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use plexus_testkit::{Demo, TempDir};

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");

fn cli(data: &Path, http: u16, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(PLEXUS)
        .args(args)
        .env("PLEXUS_SERVER", format!("http://127.0.0.1:{http}"))
        .env("PLEXUS_DATA_DIR", data)
        .stdin(Stdio::null())
        .output()?)
}

/// One `GET /productpage` over its own connection: status and body.
async fn page(ingress: std::net::SocketAddr) -> Result<(u16, String)> {
    let r = plexus_testkit::client::get(ingress, "productpage", "/productpage", &[], Duration::from_secs(15)).await?;
    Ok((r.status.as_u16(), r.text()))
}

/// SIGINT to the demo while 2-second requests are in flight through the ingress: every one of
/// them gets its complete page (the ingress stops accepting first and drains, the sample apps
/// finish their requests before exiting), and the demo still exits within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_stop_finishes_the_requests_in_flight() -> Result<()> {
    let dir = TempDir::new("demo-stop")?;
    let demo = Demo::start(PLEXUS, &dir, &["--no-load"]).await?;
    // Positive control: a page before anything changes.
    let (status, body) = page(demo.ingress).await?;
    assert_eq!(status, 200, "{body}");

    // Every call to reviews now takes 2 s (a delay at productpage's sidecar), so requests are
    // in flight through the ingress, productpage and its sidecar when the demo is stopped.
    let slow = dir.join("slow-reviews.yaml");
    std::fs::write(
        &slow,
        "apiVersion: plexus.dev/v1alpha1\nkind: FaultInjection\nmetadata: {name: reviews-delay}\nspec:\n  delay: {fixed: 2s, percent: 100}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews}\nspec:\n  parentRefs: [{kind: Service, name: reviews, port: 9080}]\n  rules:\n  - filters:\n    - type: ExtensionRef\n      extensionRef: {group: plexus.dev, kind: FaultInjection, name: reviews-delay}\n    backendRefs: [{name: reviews, port: 9080}]\n",
    )?;
    let o = cli(&demo.data, demo.http, &["apply", "-f", slow.to_str().context("path")?])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ingress = demo.ingress;
    plexus_testkit::eventually(Duration::from_secs(10), || async move {
        let started = Instant::now();
        let (status, _) = page(ingress).await?;
        anyhow::ensure!(status == 200 && started.elapsed() >= Duration::from_millis(1900), "delay not in effect yet");
        Ok(())
    })
    .await?;

    let in_flight: Vec<_> = (0..20).map(|_| tokio::spawn(page(ingress))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = Instant::now();
    demo.stop().await?;
    let stopped_in = stopping.elapsed();
    println!("demo stopped {stopped_in:?} after SIGINT with 20 requests in flight");
    let mut failures = Vec::new();
    for request in in_flight {
        match request.await? {
            Ok((200, body)) if body.contains("Reviews served by:") && !body.contains("unavailable") => {}
            Ok((status, body)) => failures.push(format!("{status}: {}", body.chars().take(200).collect::<String>())),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    assert!(failures.is_empty(), "{} of 20 requests in flight failed at shutdown: {failures:#?}", failures.len());
    assert!(stopped_in < Duration::from_secs(10), "the demo took {stopped_in:?} to stop");
    // The edge is closed: nothing new gets in once the demo has stopped.
    assert!(tokio::net::TcpStream::connect(ingress).await.is_err(), "the ingress still accepts");
    Ok(())
}

/// `plexus control` on free ports; returns it (killed on drop) once it printed its ready line.
fn control_plane(data: &Path) -> Result<(plexus_testkit::Proc, u16, u16)> {
    use std::io::BufRead as _;
    let (http, grpc) = (plexus_testkit::free_port(), plexus_testkit::free_port());
    let mut child = Command::new(PLEXUS)
        .args(["control", "--http-addr", &format!("127.0.0.1:{http}"), "--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let proc = plexus_testkit::Proc(child);
    anyhow::ensure!(line.contains("\"grpc\""), "no ready line: {line:?}");
    Ok((proc, http, grpc))
}

/// A client sidecar fed by the control plane at `grpc_url`, bootstrapped with a workload token
/// (service account `default`) made through its API on port `http`; `extra` after the ports.
async fn client_proxy(data: &Path, http: u16, grpc_url: &str, extra: &[&str]) -> Result<plexus_testkit::Proxy> {
    let server = format!("http://127.0.0.1:{http}");
    let token = plexus_testkit::workload_token(PLEXUS, &server, data, "default", "default").await?;
    let mut args = vec!["proxy", "--control-plane", grpc_url, "--token", &token, "--outbound-port", "0"];
    args.extend_from_slice(&["--inbound-port", "0", "--admin-port", "0"]);
    args.extend_from_slice(extra);
    plexus_testkit::Proxy::start_named("client", PLEXUS, args).await
}

fn alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// `POST /shutdown` on a `plexus run` sidecar's admin port: the workload is stopped with it and
/// `plexus run` exits with a failure that says why, instead of leaving an app whose proxy is
/// gone. Positive control: before that, the pair runs and the sidecar is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_stopped_on_its_own_takes_its_workload_with_it() -> Result<()> {
    let dir = TempDir::new("run-shutdown")?;
    let data = dir.join("data");
    let (_control, http, grpc) = control_plane(&data)?;
    let admin = plexus_testkit::free_port();
    let pidfile = dir.join("app.pid");
    let script = format!("echo $$ > {}; exec sleep 600", pidfile.display());
    let run = Command::new(PLEXUS)
        .args(["run", "--service", "echo", "--port", &plexus_testkit::free_port().to_string()])
        .args(["--admin-port", &admin.to_string(), "--control-plane", &format!("http://127.0.0.1:{grpc}")])
        // Its workload token is created through this control plane's API.
        .args(["--server", &format!("http://127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(&data)
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("run.log"))?)
        .spawn()?;
    let mut run = plexus_testkit::Proc(run);
    let pid_path = pidfile.clone();
    let app: i32 = plexus_testkit::eventually(Duration::from_secs(20), || {
        let pid_path = pid_path.clone();
        async move { Ok(std::fs::read_to_string(&pid_path)?.trim().parse::<i32>()?) }
    })
    .await?;
    assert!(alive(app), "the app is running");
    let admin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    let ready = plexus_testkit::client::get_api(admin_addr, "/ready").await?;
    assert_eq!(ready.status, 200, "{}", ready.text());

    let req = http::Request::post("/shutdown")
        .header("host", admin_addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = plexus_testkit::client::send_collect(
        admin_addr,
        plexus_testkit::client::Version::Http1,
        req,
        Duration::from_secs(5),
    )
    .await?;
    assert!(resp.status.is_success(), "POST /shutdown: {} {}", resp.status, resp.text());

    let status = plexus_testkit::eventually(Duration::from_secs(15), || {
        let status = run.0.try_wait();
        async move { status?.context("plexus run still running") }
    })
    .await?;
    let log = std::fs::read_to_string(dir.join("run.log"))?;
    assert!(!status.success(), "plexus run must fail when its sidecar stopped first; log:\n{log}");
    assert!(log.contains("sidecar stopped"), "{log}");
    assert!(!alive(app), "the app outlived its sidecar; log:\n{log}");
    Ok(())
}

/// `plexus run`'s sidecar gives back its start-up pages (the `resident` module) once start-up
/// is over — the control plane's first answer and the workload certificate — as `plexus proxy`
/// does: its debug line says how much it released. Positive control: the sidecar is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_sidecar_releases_its_start_up_pages_once_connected() -> Result<()> {
    let dir = TempDir::new("run-resident")?;
    let data = dir.join("data");
    let (_control, http, grpc) = control_plane(&data)?;
    let admin = plexus_testkit::free_port();
    let log = dir.join("run.log");
    let run = Command::new(PLEXUS)
        .env("RUST_LOG", "info,plexus_cli::proxy_cmd=debug")
        .args(["run", "--service", "echo", "--admin-port", &admin.to_string()])
        .args(["--control-plane", &format!("http://127.0.0.1:{grpc}")])
        .args(["--server", &format!("http://127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(&data)
        .args(["--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let _run = plexus_testkit::Proc(run);
    let admin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    plexus_testkit::eventually(Duration::from_secs(20), || async move {
        let ready = plexus_testkit::client::get_api(admin_addr, "/ready").await?;
        anyhow::ensure!(ready.status == 200, "not ready: {}", ready.text());
        Ok(())
    })
    .await?;
    let line = plexus_testkit::eventually(Duration::from_secs(20), || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log)?;
            text.lines()
                .find(|l| l.contains("start-up over"))
                .map(str::to_owned)
                .context("no start-up release logged yet")
        }
    })
    .await?;
    let released: u64 = line
        .split_once("bytes=")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .context(line.clone())?
        .parse()?;
    assert!(released > 0, "nothing released: {line}");
    Ok(())
}

/// A workload whose app takes 2 s to start listening: `plexus run` registers it only once the
/// app accepts connections, so callers meanwhile get the mesh's own "no endpoint" answer and
/// never a 502 from a sidecar whose app is not there yet; once registered, requests succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_is_registered_only_once_its_app_listens() -> Result<()> {
    if !plexus_testkit::require_tool("python3") {
        return Ok(());
    }
    let dir = TempDir::new("run-ready")?;
    let data = dir.join("data");
    let (_control, http, grpc) = control_plane(&data)?;
    let grpc_url = format!("http://127.0.0.1:{grpc}");
    let svc = dir.join("svc.yaml");
    std::fs::write(
        &svc,
        "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: echo}\nspec:\n  selector: {app: echo}\n  ports: [{name: http, port: 8080, appProtocol: http}]\n",
    )?;
    let o = cli(&data, http, &["apply", "-f", svc.to_str().context("path")?])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let client = client_proxy(&data, http, &grpc_url, &["--upstream", "echo:8080=0"]).await?;
    let bind = client.upstream("echo.default:8080")?;

    let app_port = plexus_testkit::free_port();
    let marker = dir.join("listening");
    let app = "import sys, time, http.server\ntime.sleep(2)\ns = http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), http.server.SimpleHTTPRequestHandler)\nopen(sys.argv[2], 'w').write('up')\ns.serve_forever()\n";
    let run = Command::new(PLEXUS)
        .args(["run", "--service", "echo", "--port", &app_port.to_string(), "--control-plane", &grpc_url])
        // Its workload token is created through this control plane's API.
        .args(["--server", &format!("http://127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(&data)
        .args(["--", "python3", "-c", app, &app_port.to_string(), marker.to_str().context("path")?])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("run.log"))?)
        .spawn()?;
    let _run = plexus_testkit::Proc(run);

    // Calls every 50 ms from the start: none may reach a sidecar whose app is not listening.
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    let mut registered_at = None;
    let mut listening_at = None;
    let mut ok_after_registration = 0;
    while ok_after_registration < 5 {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "no success within 30 s: {statuses:?}");
        if listening_at.is_none() && marker.exists() {
            listening_at = Some(started.elapsed());
        }
        if registered_at.is_none() {
            let w = plexus_testkit::client::get_api_json(
                std::net::SocketAddr::from(([127, 0, 0, 1], http)),
                "/api/v1/resources/workloads",
            )
            .await?;
            if w["items"].as_array().is_some_and(|items| !items.is_empty()) {
                // The marker is written right after the bind: it must already be there.
                assert!(marker.exists(), "registered at {:?} before the app listened", started.elapsed());
                listening_at.get_or_insert(started.elapsed());
                registered_at = Some(started.elapsed());
            }
        }
        let sent = started.elapsed();
        let r = match plexus_testkit::client::get(bind, "echo:8080", "/", &[], Duration::from_secs(5)).await {
            Ok(r) => r,
            Err(e) => anyhow::bail!(
                "{e:#}\nsent at {sent:?}, failed at {:?}; statuses so far {statuses:?}; registered at {registered_at:?}, \
                 listening at {listening_at:?}\n--- client sidecar ---\n{}\n--- plexus run ---\n{}",
                started.elapsed(),
                client.stderr_tail(8000),
                std::fs::read_to_string(dir.join("run.log")).unwrap_or_default()
            ),
        };
        *statuses.entry(r.status.as_u16()).or_default() += 1;
        if r.status == 200 && registered_at.is_some() {
            ok_after_registration += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(dir.join("run.log"))?;
    assert!(!statuses.contains_key(&502), "callers got 502 before the app listened: {statuses:?}\n{log}");
    assert!(
        registered_at >= listening_at && listening_at.is_some(),
        "registered at {registered_at:?}, app listening at {listening_at:?}"
    );
    assert!(
        listening_at >= Some(Duration::from_millis(1500)),
        "the app started too early for the test: {listening_at:?}"
    );
    Ok(())
}

/// Issue 17 item 1 (SPEC §3): `plexus run --service echo --port P` with no Service resource is
/// reachable as `echo:P` (and `echo.default:P`) until a Service is applied; then the applied
/// Service decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_without_a_service_resource_is_reachable_as_service_and_port() -> Result<()> {
    let dir = TempDir::new("run-no-service")?;
    let data = dir.join("data");
    let (_control, http, grpc) = control_plane(&data)?;
    let grpc_url = format!("http://127.0.0.1:{grpc}");
    let app = plexus_testkit::HttpEcho::start("echo-app").await?;
    let run = Command::new(PLEXUS)
        .args(["run", "--service", "echo", "--port", &app.port().to_string(), "--control-plane", &grpc_url])
        .args(["--server", &format!("http://127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(&data)
        .args(["--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("run.log"))?)
        .spawn()?;
    let _run = plexus_testkit::Proc(run);
    let client = client_proxy(&data, http, &grpc_url, &[]).await?;
    let get = |host: String| {
        let outbound = client.outbound();
        async move { plexus_testkit::client::get(outbound, &host, "/", &[], Duration::from_secs(5)).await }
    };
    let port = app.port();
    plexus_testkit::eventually(Duration::from_secs(20), || async {
        let r = get(format!("echo:{port}")).await?;
        anyhow::ensure!(r.status == 200, "echo:{port} answered {} {}", r.status, r.text());
        anyhow::ensure!(r.header("x-served-by") == Some("echo-app"), "served by {:?}", r.header("x-served-by"));
        Ok(())
    })
    .await
    .with_context(|| std::fs::read_to_string(dir.join("run.log")).unwrap_or_default())?;
    let r = get(format!("echo.default:{port}")).await?;
    assert_eq!(r.status, 200, "the namespaced name too");
    let other = port.wrapping_add(1).max(1);
    let r = get(format!("echo:{other}")).await?;
    assert_ne!(r.status, 200, "only its own port: echo:{other} answered {}", r.status);

    // A Service applied later decides: its port, not the workload's.
    let svc = dir.join("svc.yaml");
    std::fs::write(
        &svc,
        format!(
            "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {{name: echo}}\nspec:\n  selector: {{app: echo}}\n  ports: [{{name: http, port: 8080, targetPort: {port}}}]\n"
        ),
    )?;
    let o = cli(&data, http, &["apply", "-f", svc.to_str().context("path")?])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    plexus_testkit::eventually(Duration::from_secs(10), || async {
        let r = get("echo:8080".to_string()).await?;
        anyhow::ensure!(r.status == 200, "echo:8080 answered {}", r.status);
        let r = get(format!("echo:{port}")).await?;
        anyhow::ensure!(r.status != 200, "echo:{port} still answers once the Service says 8080");
        Ok(())
    })
    .await?;
    Ok(())
}
