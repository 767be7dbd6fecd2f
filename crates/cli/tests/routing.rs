//! Traffic routing end to end through real sidecars: weighted backend splits (and weights
//! changed under load through the control plane), request matching with Gateway API
//! precedence, GRPCRoute method matching, SMI TrafficSplit with HTTPRouteGroups, the route
//! filters of the Gateway API conformance suite (header modifiers, redirects, rewrites) and
//! RequestMirror.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use plexus_testkit::bytes::Bytes;
use plexus_testkit::client::{self, Collected};
use plexus_testkit::http::{Request, Response, StatusCode};
use plexus_testkit::http_body_util::{BodyExt as _, Full};
use plexus_testkit::hyper::body::Incoming;
use plexus_testkit::hyper::client::conn::http1;
use plexus_testkit::hyper::service::service_fn;
use plexus_testkit::hyper_util::rt::{TokioExecutor, TokioIo};
use plexus_testkit::hyper_util::server::conn::auto;
use plexus_testkit::{HttpEcho, Proxy, Resources, ServicePort, TempDir, WorkloadSpec, free_port, serial};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

mod common;

use common::PLEXUS;

/// Timeout of one request.
const REQ_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Setup helpers
// ---------------------------------------------------------------------------------------------

/// A client proxy fed by a `--resources` file, on free ports.
async fn sidecar(resources: &Path) -> Result<Proxy> {
    let args = [
        "proxy",
        "--resources",
        resources.to_str().context("utf-8 path")?,
        "--outbound-port",
        "0",
        "--inbound-port",
        "0",
        "--admin-port",
        "0",
    ];
    Proxy::start_named("client", PLEXUS, args).await
}

/// Adds Service `name` (one HTTP port `port`) served by one plain Workload: the app on
/// `app_port`.
fn backend_on(res: Resources, name: &str, port: u16, protocol: &str, app_port: u16) -> Resources {
    res.service(name, &[ServicePort::new("http", port, Some(protocol))]).workload(&WorkloadSpec::plain(
        &format!("{name}-1"),
        name,
        "http",
        app_port,
    ))
}

/// [`backend_on`] for an HTTP Service on port 8080.
fn backend(res: Resources, name: &str, app_port: u16) -> Resources {
    backend_on(res, name, 8080, "http", app_port)
}

/// An HTTPRoute `name` attached to Service `parent` port `port`; `rules` is the YAML list of
/// rules, each line indented by two spaces.
fn http_route(name: &str, parent: &str, port: u16, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{kind: Service, name: {parent}, port: {port}}}]\n  rules:\n{rules}"
    )
}

/// A keep-alive HTTP/1.1 connection sending requests one after another.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Conn> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Conn { sender })
    }

    /// Sends one request (`host` in the `Host` header) and reads the whole response.
    async fn send(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Collected> {
        let mut b = Request::builder().method(method).uri(path).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body))?;
        let what = format!("{method} {host}{path}");
        tokio::time::timeout(REQ_TIMEOUT, async {
            self.sender.ready().await?;
            let resp = self.sender.send_request(req).await?;
            client::collect(resp).await
        })
        .await
        .with_context(|| format!("{what}: no response within {REQ_TIMEOUT:?}"))?
        .with_context(|| what.clone())
    }

    /// `GET` with headers.
    async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Result<Collected> {
        self.send("GET", host, path, headers, Bytes::new()).await
    }
}

/// The `x-served-by` of a response (empty when absent).
fn served_by(r: &Collected) -> String {
    r.header("x-served-by").unwrap_or_default().to_string()
}

/// Sends `n` requests over `conns` concurrent keep-alive connections and counts who answered
/// (`status` must be 200 for every one).
async fn count_served_by(
    addr: SocketAddr,
    conns: usize,
    n: usize,
    method: &'static str,
    host: &'static str,
    path: &'static str,
) -> Result<BTreeMap<String, usize>> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..conns {
        let next = next.clone();
        tasks.spawn(async move {
            let mut c = Conn::open(addr).await?;
            let mut counts = BTreeMap::<String, usize>::new();
            while next.fetch_add(1, Ordering::SeqCst) < n as u64 {
                let r = c.send(method, host, path, &[], Bytes::new()).await?;
                ensure!(r.status == 200, "{method} {host}{path}: status {} ({:?})", r.status, r.text());
                *counts.entry(served_by(&r)).or_default() += 1;
            }
            anyhow::Ok(counts)
        });
    }
    let mut all = BTreeMap::new();
    while let Some(t) = tasks.join_next().await {
        for (k, v) in t?? {
            *all.entry(k).or_default() += v;
        }
    }
    Ok(all)
}

/// Share of `who` among all counted answers.
fn share(counts: &BTreeMap<String, usize>, who: &str) -> f64 {
    let total: usize = counts.values().sum();
    counts.get(who).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

// ---------------------------------------------------------------------------------------------
// A recording upstream
// ---------------------------------------------------------------------------------------------

/// One request as a [`Recorder`] saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    body_len: usize,
}

/// An HTTP/1.1 + h2c server that records every request it receives (once its body is read),
/// then waits for the current delay and answers the current status. Every request header
/// `x-echo-NAME: V` comes back as the response header `NAME: V` (as the conformance suite's
/// echo server does with `X-Echo-Set-Header`), so response filters can be checked.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Recorder {
    async fn start(name: &'static str) -> Result<Recorder> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (s, st, d) = (seen.clone(), status.clone(), delay_ms.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let (s, st, d) = (s.clone(), st.clone(), d.clone());
                        conns.spawn(async move {
                            let service = service_fn(move |req| {
                                let (s, st, d) = (s.clone(), st.clone(), d.clone());
                                async move { Ok::<_, Infallible>(record(name, req, &s, &st, &d).await) }
                            });
                            let _ = auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Recorder { addr, seen, status, delay_ms, task })
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn clear(&self) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn set_status(&self, s: u16) {
        self.status.store(s, Ordering::SeqCst);
    }

    fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(
    name: &str,
    req: Request<Incoming>,
    seen: &Mutex<Vec<Seen>>,
    status: &AtomicU16,
    delay_ms: &AtomicU64,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body_len = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    let path = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
    seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen { method: parts.method.to_string(), path, body_len });
    let delay = delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut resp = Response::new(Full::new(Bytes::from_static(b"recorded\n")));
    *resp.status_mut() = StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK);
    for (k, v) in &parts.headers {
        if let Some(n) = k.as_str().strip_prefix("x-echo-")
            && let Ok(n) = plexus_testkit::http::HeaderName::from_bytes(n.as_bytes())
        {
            resp.headers_mut().append(n, v.clone());
        }
    }
    if let Ok(v) = plexus_testkit::http::HeaderValue::from_str(name) {
        resp.headers_mut().insert("x-served-by", v);
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// 1. Weighted split
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_backends_split_80_20_and_100_0() -> Result<()> {
    let apps = [
        HttpEcho::start("reviews-v1").await?,
        HttpEcho::start("reviews-v2").await?,
        HttpEcho::start("ratings-v1").await?,
        HttpEcho::start("ratings-v2").await?,
    ];
    let dir = TempDir::new("split")?;
    let file = dir.join("mesh.yaml");
    let mut res = Resources::new()
        .service("reviews", &[ServicePort::new("http", 8080, Some("http"))])
        .service("ratings", &[ServicePort::new("http", 8080, Some("http"))]);
    for app in &apps {
        res = backend(res, app.name(), app.port());
    }
    res.raw(&http_route(
        "reviews-split",
        "reviews",
        8080,
        "  - backendRefs: [{name: reviews-v1, port: 8080, weight: 80}, {name: reviews-v2, port: 8080, weight: 20}]\n",
    ))
    .raw(&http_route(
        "ratings-split",
        "ratings",
        8080,
        "  - backendRefs: [{name: ratings-v1, port: 8080, weight: 100}, {name: ratings-v2, port: 8080, weight: 0}]\n",
    ))
    .write(&file)?;
    let proxy = sidecar(&file).await?;

    // The root Services have no endpoints of their own: every answer comes through the route.
    let counts = count_served_by(proxy.outbound(), 4, 2000, "GET", "reviews:8080", "/").await?;
    assert_eq!(counts.values().sum::<usize>(), 2000, "{counts:?}");
    assert_eq!(counts.keys().cloned().collect::<Vec<_>>(), ["reviews-v1", "reviews-v2"], "{counts:?}");
    let v2 = share(&counts, "reviews-v2");
    assert!(
        (0.17..=0.23).contains(&v2),
        "reviews-v2 got {:.1}% of 2,000 requests (want 20% ± 3 pp): {counts:?}",
        v2 * 100.0
    );

    let counts = count_served_by(proxy.outbound(), 4, 500, "GET", "ratings:8080", "/").await?;
    assert_eq!(counts.get("ratings-v1"), Some(&500), "a weight-0 backend got traffic: {counts:?}");
    assert_eq!(apps[3].requests(), 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Weights changed under load (control plane)
// ---------------------------------------------------------------------------------------------

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `plexus control` on the given ports; returns once it printed its ready line.
fn control(data: &Path, http: u16, grpc: u16) -> Result<Proc> {
    let mut child = Command::new(PLEXUS)
        .args(["control", "--http-addr", &format!("127.0.0.1:{http}"), "--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    ensure!(line.contains("\"grpc\""), "no ready line from plexus control: {line:?}");
    Ok(Proc(child))
}

/// `plexus apply -f FILE` against the control plane (off the async runtime's threads).
async fn apply(data: &Path, http: u16, file: &Path) -> Result<()> {
    let (data, file) = (data.to_path_buf(), file.to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(PLEXUS)
            .arg("apply")
            .arg("-f")
            .arg(&file)
            .env("PLEXUS_SERVER", format!("http://127.0.0.1:{http}"))
            .env("PLEXUS_DATA_DIR", &data)
            .output()
    })
    .await??;
    ensure!(
        out.status.success(),
        "plexus apply failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `plexus run --service echo --version V` in front of an in-test app on `app_port`.
fn run_echo_workload(data: &Path, http: u16, grpc_url: &str, version: &str, app_port: u16) -> Result<Proc> {
    let child = Command::new(PLEXUS)
        .args(["run", "--service", "echo", "--version", version, "--port", &app_port.to_string()])
        // Its workload token is created through this control plane's API.
        .args(["--server", &format!("http://127.0.0.1:{http}")])
        .args(["--control-plane", grpc_url, "--data-dir"])
        .arg(data)
        .args(["--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Proc(child))
}

fn echo_split(w1: u32, w2: u32) -> String {
    http_route(
        "echo-split",
        "echo",
        8080,
        &format!(
            "  - backendRefs: [{{name: echo-v1, port: 8080, weight: {w1}}}, {{name: echo-v2, port: 8080, weight: {w2}}}]\n"
        ),
    )
}

/// One answer of the load loops: when its request was sent, and who answered (or the error).
type Answer = (Instant, Result<String, String>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_change_under_load_without_failed_requests() -> Result<()> {
    let _serial = serial().await;
    let dir = TempDir::new("reweight")?;
    let data = dir.join("data");
    let (http, grpc) = (free_port(), free_port());
    let _cp = control(&data, http, grpc)?;
    let services = dir.join("services.yaml");
    let svc = |name: &str, selector: &str| {
        format!(
            "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {selector}\n  ports: [{{name: http, port: 8080, appProtocol: http}}]\n"
        )
    };
    std::fs::write(
        &services,
        [
            svc("echo", "{app: echo}"),
            svc("echo-v1", "{app: echo, version: v1}"),
            svc("echo-v2", "{app: echo, version: v2}"),
            echo_split(100, 0),
        ]
        .join("---\n"),
    )?;
    apply(&data, http, &services).await?;

    let v1 = HttpEcho::start("echo-v1").await?;
    let v2 = HttpEcho::start("echo-v2").await?;
    let grpc_url = format!("http://127.0.0.1:{grpc}");
    let _run1 = run_echo_workload(&data, http, &grpc_url, "v1", v1.port())?;
    let _run2 = run_echo_workload(&data, http, &grpc_url, "v2", v2.port())?;
    let server = format!("http://127.0.0.1:{http}");
    let token = plexus_testkit::workload_token(PLEXUS, &server, &data, "default", "default").await?;
    let args =
        ["proxy", "--control-plane", &grpc_url, "--token", &token, "--outbound-port", "0", "--inbound-port", "0"];
    let client = Proxy::start_named(
        "client",
        PLEXUS,
        args.iter().copied().chain(["--admin-port", "0", "--upstream", "echo:8080=0"]),
    )
    .await?;
    let addr = client.upstream("echo.default:8080")?;
    let outbound = client.outbound();

    // Both versions registered and reachable through their own Services; the route (100/0)
    // is in force.
    plexus_testkit::eventually(Duration::from_secs(30), || async move {
        let mut c = Conn::open(outbound).await?;
        for v in ["echo-v1", "echo-v2"] {
            let r = c.get(&format!("{v}:8080"), "/", &[]).await?;
            ensure!(r.status == 200 && served_by(&r) == v, "{v}: {} {:?}", r.status, served_by(&r));
        }
        for _ in 0..20 {
            let r = c.get("echo:8080", "/", &[]).await?;
            ensure!(r.status == 200 && served_by(&r) == "echo-v1", "echo: {} {:?}", r.status, served_by(&r));
        }
        Ok(())
    })
    .await?;

    // Four loops send continuously while the weights change.
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::new(Mutex::new(Vec::new()));
    let mut loops = JoinSet::new();
    for _ in 0..4 {
        let (stop, answers) = (stop.clone(), answers.clone());
        loops.spawn(async move {
            let mut conn = Conn::open(addr).await?;
            while !stop.load(Ordering::SeqCst) {
                let sent = Instant::now();
                let answer = match conn.get("echo:8080", "/", &[]).await {
                    Ok(r) if r.status == 200 => Ok(served_by(&r)),
                    Ok(r) => Err(format!("status {} ({:?}): {}", r.status, r.header("x-plexus-error"), r.text())),
                    Err(e) => {
                        // Keep going on a fresh connection so one failure does not end the loop.
                        conn = Conn::open(addr).await?;
                        Err(format!("{e:#}"))
                    }
                };
                answers.lock().unwrap_or_else(|e| e.into_inner()).push((sent, answer));
            }
            anyhow::Ok(())
        });
    }
    let route = dir.join("route.yaml");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second_start = Instant::now();
    std::fs::write(&route, echo_split(50, 50))?;
    apply(&data, http, &route).await?;
    let second_done = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let third_start = Instant::now();
    std::fs::write(&route, echo_split(0, 100))?;
    apply(&data, http, &route).await?;
    let third_done = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    while let Some(l) = loops.join_next().await {
        l??;
    }

    let answers = answers.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let failed: Vec<&Answer> = answers.iter().filter(|(_, a)| a.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(5)]
    );
    // Answers to the requests sent in [from, to).
    let served = |from: Option<Instant>, to: Option<Instant>| -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (t, a) in &answers {
            if from.is_none_or(|f| *t >= f) && to.is_none_or(|e| *t < e) {
                *m.entry(a.clone().unwrap_or_default()).or_default() += 1;
            }
        }
        m
    };
    let phase1 = served(None, Some(second_start));
    assert_eq!(phase1.keys().cloned().collect::<Vec<_>>(), ["echo-v1"], "100/0: {phase1:?}");
    let phase2 = served(Some(second_done + Duration::from_secs(1)), Some(third_start));
    let v2_share = share(&phase2, "echo-v2");
    assert!(phase2.values().sum::<usize>() >= 50, "too few requests at 50/50: {phase2:?}");
    assert!((0.25..=0.75).contains(&v2_share), "50/50: echo-v2 got {:.0}%: {phase2:?}", v2_share * 100.0);
    let phase3 = served(Some(third_done + Duration::from_secs(1)), None);
    assert!(phase3.values().sum::<usize>() >= 50, "too few requests after 0/100: {phase3:?}");
    assert_eq!(phase3.keys().cloned().collect::<Vec<_>>(), ["echo-v2"], "0/100, 1 s after the apply: {phase3:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Matching and precedence
// ---------------------------------------------------------------------------------------------

/// HTTPRoutes competing for Service `prec`: every rule has its own backend (named after what
/// should make it win). `b-older` is older than `a-newer`, whose name sorts first.
const PRECEDENCE_ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-older, creationTimestamp: "2024-01-01T00:00:00.000Z"}
spec:
  parentRefs: [{kind: Service, name: prec, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /exact}}]
    backendRefs: [{name: p-prefix, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /long}}]
    backendRefs: [{name: p-short, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /m}, headers: [{name: x-a, value: "1"}]}]
    backendRefs: [{name: p-headers, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /h}, headers: [{name: x-a, value: "1"}]}]
    backendRefs: [{name: p-one-header, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /q}, queryParams: [{name: p, value: "1"}]}]
    backendRefs: [{name: p-query, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /tie}}]
    backendRefs: [{name: p-older, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /first}}]
    backendRefs: [{name: p-first, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /first}}]
    backendRefs: [{name: p-second, port: 8080}]
  - backendRefs: [{name: p-default, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-newer, creationTimestamp: "2025-01-01T00:00:00.000Z"}
spec:
  parentRefs: [{kind: Service, name: prec, port: 8080}]
  rules:
  - matches: [{path: {type: Exact, value: /exact}}]
    backendRefs: [{name: p-exact, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /long/er}}]
    backendRefs: [{name: p-long, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /m}, method: POST}]
    backendRefs: [{name: p-method, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /h}, headers: [{name: x-a, value: "1"}, {name: x-b, value: "1"}]}]
    backendRefs: [{name: p-two-headers, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /q}, headers: [{name: x-a, value: "1"}]}]
    backendRefs: [{name: p-headers, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /tie}}]
    backendRefs: [{name: p-newer, port: 8080}]
"#;

/// Header, regular-expression path, query parameter and method matches on Service `match`.
const MATCH_ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 8080}]
  rules:
  - matches: [{headers: [{name: End-User, value: jason}]}]
    backendRefs: [{name: reviews-v3, port: 8080}]
  - backendRefs: [{name: reviews-v1, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: match}
spec:
  parentRefs: [{kind: Service, name: match, port: 8080}]
  rules:
  - matches: [{path: {type: RegularExpression, value: "/items/[0-9]+"}}]
    backendRefs: [{name: m-regex, port: 8080}]
  - matches: [{queryParams: [{name: debug, value: "1"}]}]
    backendRefs: [{name: m-query, port: 8080}]
  - matches: [{method: DELETE}]
    backendRefs: [{name: m-method, port: 8080}]
  - backendRefs: [{name: m-default, port: 8080}]
"#;

/// A request (method, path and query, headers) and the backend that must answer it.
type MatchCase<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_match_headers_paths_queries_methods_by_gateway_api_precedence() -> Result<()> {
    let names = [
        "reviews-v1",
        "reviews-v3",
        "m-regex",
        "m-query",
        "m-method",
        "m-default",
        "p-exact",
        "p-prefix",
        "p-long",
        "p-short",
        "p-method",
        "p-headers",
        "p-one-header",
        "p-two-headers",
        "p-query",
        "p-older",
        "p-newer",
        "p-first",
        "p-second",
        "p-default",
    ];
    let mut apps = Vec::new();
    let mut res = Resources::new();
    for root in ["reviews", "match", "prec"] {
        res = res.service(root, &[ServicePort::new("http", 8080, Some("http"))]);
    }
    for name in names {
        let app = HttpEcho::start(name).await?;
        res = backend(res, name, app.port());
        apps.push(app);
    }
    let dir = TempDir::new("match")?;
    let file = dir.join("mesh.yaml");
    res.raw(MATCH_ROUTES).raw(PRECEDENCE_ROUTES).write(&file)?;
    let proxy = sidecar(&file).await?;
    let mut c = Conn::open(proxy.outbound()).await?;

    // `end-user: jason` goes to v3, everyone else to v1 (200 requests each); header names
    // match whatever their case.
    for _ in 0..200 {
        let r = c.get("reviews:8080", "/reviews/1", &[("end-user", "jason")]).await?;
        assert_eq!((r.status.as_u16(), served_by(&r).as_str()), (200, "reviews-v3"));
        let r = c.get("reviews:8080", "/reviews/1", &[]).await?;
        assert_eq!((r.status.as_u16(), served_by(&r).as_str()), (200, "reviews-v1"));
    }
    for other in ["jasonx", "Jason", "mike"] {
        let r = c.get("reviews:8080", "/reviews/1", &[("end-user", other)]).await?;
        assert_eq!(served_by(&r), "reviews-v1", "end-user: {other}");
    }

    let cases: &[MatchCase] = &[
        ("GET", "/items/42", &[], "m-regex"),
        ("GET", "/items/4x2", &[], "m-default"),
        ("GET", "/items/42/more", &[], "m-default"),
        ("GET", "/x?debug=1", &[], "m-query"),
        ("GET", "/x?a=b&debug=1", &[], "m-query"),
        ("GET", "/x?debug=10", &[], "m-default"),
        ("DELETE", "/x", &[], "m-method"),
        ("GET", "/x", &[], "m-default"),
    ];
    let mut wrong = Vec::new();
    for (method, path, headers, want) in cases {
        let r = c.send(method, "match:8080", path, headers, Bytes::new()).await?;
        if served_by(&r) != *want || r.status != 200 {
            wrong.push(format!("{method} {path} {headers:?}: {} from {:?}, want {want}", r.status, served_by(&r)));
        }
    }
    let cases: &[MatchCase] = &[
        // Exact beats PathPrefix.
        ("GET", "/exact", &[], "p-exact"),
        ("GET", "/exact/x", &[], "p-prefix"),
        // The longer prefix wins; prefixes match whole segments.
        ("GET", "/long/er/x", &[], "p-long"),
        ("GET", "/long/er", &[], "p-long"),
        ("GET", "/long/x", &[], "p-short"),
        ("GET", "/long/erx", &[], "p-short"),
        // Same prefix: a method match beats header matches.
        ("POST", "/m", &[("x-a", "1")], "p-method"),
        ("GET", "/m", &[("x-a", "1")], "p-headers"),
        ("GET", "/m", &[], "p-default"),
        // More header matches win; header matches beat query matches.
        ("GET", "/h", &[("x-a", "1"), ("x-b", "1")], "p-two-headers"),
        ("GET", "/h", &[("x-a", "1")], "p-one-header"),
        ("GET", "/q?p=1", &[("x-a", "1")], "p-headers"),
        ("GET", "/q?p=1", &[], "p-query"),
        // A full tie between routes: the older route wins (not the one whose name sorts first).
        ("GET", "/tie", &[], "p-older"),
        // A full tie within a route: the first rule wins.
        ("GET", "/first", &[], "p-first"),
        ("GET", "/other", &[], "p-default"),
    ];
    for (method, path, headers, want) in cases {
        let r = c.send(method, "prec:8080", path, headers, Bytes::new()).await?;
        if served_by(&r) != *want || r.status != 200 {
            wrong.push(format!("{method} {path} {headers:?}: {} from {:?}, want {want}", r.status, served_by(&r)));
        }
    }
    assert!(wrong.is_empty(), "requests routed wrongly:\n{}", wrong.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. GRPCRoute
// ---------------------------------------------------------------------------------------------

const GRPC_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter}
spec:
  parentRefs: [{kind: Service, name: greeter, port: 50051}]
  rules:
  - matches: [{method: {service: pkg.Greeter, method: SayHello}}]
    backendRefs: [{name: g-exact, port: 50051}]
  - matches: [{method: {service: pkg.Greeter}}]
    backendRefs: [{name: g-service, port: 50051}]
  - matches: [{method: {method: Ping}}]
    backendRefs: [{name: g-method, port: 50051}]
  - backendRefs: [{name: g-default, port: 50051}]
"#;

/// A unary gRPC call (an empty message) over HTTP/2 to `addr`; returns the response.
async fn grpc_call(addr: SocketAddr, authority: &str, path: &str) -> Result<Collected> {
    let req = Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))?;
    client::send_collect(addr, client::Version::Http2, req, REQ_TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_routes_match_service_and_method() -> Result<()> {
    let mut apps = Vec::new();
    let mut res = Resources::new().service("greeter", &[ServicePort::new("grpc", 50051, Some("grpc"))]);
    for name in ["g-exact", "g-service", "g-method", "g-default"] {
        let app = HttpEcho::start(name).await?;
        res = backend_on(res, name, 50051, "grpc", app.port());
        apps.push(app);
    }
    let dir = TempDir::new("grpcroute")?;
    let file = dir.join("mesh.yaml");
    res.raw(GRPC_ROUTE).write(&file)?;
    let proxy = sidecar(&file).await?;

    let cases = [
        ("/pkg.Greeter/SayHello", "g-exact"),
        // A service-only match catches the service's other methods…
        ("/pkg.Greeter/SayGoodbye", "g-service"),
        // …and beats a method-only match: the service has more matching characters.
        ("/pkg.Greeter/Ping", "g-service"),
        ("/other.Health/Ping", "g-method"),
        ("/other.Health/Check", "g-default"),
        // Service names match whole.
        ("/pkg.GreeterAdmin/SayHello", "g-default"),
    ];
    let mut wrong = Vec::new();
    for (path, want) in cases {
        let r = grpc_call(proxy.outbound(), "greeter:50051", path).await?;
        let by = served_by(&r);
        if by != want || r.status != 200 {
            wrong.push(format!("{path}: {} from {by:?}, want {want} ({})", r.status, r.text()));
            continue;
        }
        let seen = r.json()?;
        assert_eq!(seen["path"], path, "{seen}");
        assert_eq!(seen["version"], "HTTP/2.0", "gRPC goes upstream over HTTP/2: {seen}");
        assert_eq!(seen["headers"]["content-type"], "application/grpc", "{seen}");
    }
    assert!(wrong.is_empty(), "gRPC calls routed wrongly:\n{}", wrong.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. SMI TrafficSplit
// ---------------------------------------------------------------------------------------------

const SMI_SPLIT: &str = r#"apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: shop-api}
spec:
  matches:
  - name: api-reads
    pathRegex: "/api/.*"
    methods: [GET]
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: shop-split}
spec:
  service: shop
  matches: [{kind: HTTPRouteGroup, name: shop-api}]
  backends: [{service: shop-v1, weight: 70}, {service: shop-v2, weight: 30}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smi_traffic_split_splits_matching_requests_only() -> Result<()> {
    let root = HttpEcho::start("shop").await?;
    let v1 = HttpEcho::start("shop-v1").await?;
    let v2 = HttpEcho::start("shop-v2").await?;
    let dir = TempDir::new("smi")?;
    let file = dir.join("mesh.yaml");
    let res = backend(Resources::new(), "shop", root.port());
    backend(backend(res, "shop-v1", v1.port()), "shop-v2", v2.port()).raw(SMI_SPLIT).write(&file)?;
    let proxy = sidecar(&file).await?;

    let counts = count_served_by(proxy.outbound(), 4, 1000, "GET", "shop:8080", "/api/items").await?;
    assert_eq!(counts.keys().cloned().collect::<Vec<_>>(), ["shop-v1", "shop-v2"], "{counts:?}");
    let v1_share = share(&counts, "shop-v1");
    assert!((0.65..=0.75).contains(&v1_share), "shop-v1 got {:.1}% (want 70% ± 5 pp): {counts:?}", v1_share * 100.0);

    // Requests outside the HTTPRouteGroup go to the root Service's own endpoints.
    for (method, path) in [("POST", "/api/items"), ("GET", "/home"), ("GET", "/api"), ("DELETE", "/api/items/1")] {
        let counts = count_served_by(proxy.outbound(), 1, 20, method, "shop:8080", path).await?;
        assert_eq!(counts.get("shop"), Some(&20), "{method} {path}: {counts:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. Filters (Gateway API conformance cases)
// ---------------------------------------------------------------------------------------------

/// HTTPRouteRequestHeaderModifier, HTTPRouteRewritePath and HTTPRouteRewriteHost (with the
/// trailing-slash cases of ReplacePrefixMatch), and HTTPRouteResponseHeaderModifier.
const FILTER_ROUTES: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: request-header-modifier}
spec:
  parentRefs: [{kind: Service, name: reqhdr, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /set}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
    backendRefs: [{name: infra-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /add}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        add: [{name: X-Header-Add, value: add-appends-values}]
    backendRefs: [{name: infra-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /remove}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        remove: [X-Header-Remove]
    backendRefs: [{name: infra-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /multiple}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}]
        add: [{name: X-Header-Add-1, value: header-add-1}, {name: X-Header-Add-2, value: header-add-2}, {name: X-Header-Add-3, value: header-add-3}]
        remove: [X-Header-Remove-1, X-Header-Remove-2]
    backendRefs: [{name: infra-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /case-insensitivity}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: header-set}]
        add: [{name: X-Header-Add, value: header-add}]
        remove: [X-Header-Remove]
    backendRefs: [{name: infra-v1, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: response-header-modifier}
spec:
  parentRefs: [{kind: Service, name: resphdr, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /set}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
    backendRefs: [{name: header-echo, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /add}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: X-Header-Add, value: add-appends-values}]
    backendRefs: [{name: header-echo, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /remove}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        remove: [X-Header-Remove]
    backendRefs: [{name: header-echo, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /multiple}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}]
        add: [{name: X-Header-Add-1, value: header-add-1}, {name: X-Header-Add-2, value: header-add-2}, {name: X-Header-Add-3, value: header-add-3}]
        remove: [X-Header-Remove-1, X-Header-Remove-2]
    backendRefs: [{name: header-echo, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rewrite-path}
spec:
  parentRefs: [{kind: Service, name: rewrite, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /prefix/one}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}
    backendRefs: [{name: infra-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /strip-prefix}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: infra-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /full/one}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}
    backendRefs: [{name: infra-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /full/rewrite-path-and-modify-headers}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /test}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
        add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
        remove: [X-Header-Remove]
    backendRefs: [{name: infra-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /prefix/rewrite-path-and-modify-headers}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /prefix}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
        add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
        remove: [X-Header-Remove]
    backendRefs: [{name: infra-v1, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rewrite-host}
spec:
  parentRefs: [{kind: Service, name: rewritehost, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /one}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: one.example.org}
    backendRefs: [{name: infra-v1, port: 8080}]
  - filters:
    - type: URLRewrite
      urlRewrite: {hostname: example.org}
    backendRefs: [{name: infra-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /rewrite-host-and-modify-headers}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: test.example.org}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
        add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
        remove: [X-Header-Remove]
    backendRefs: [{name: infra-v2, port: 8080}]
"#;

/// RequestRedirect cases of HTTPRouteRedirectPortAndScheme (listeners on 80 and 8080: here
/// Services `web:80` and `web8080:8080`), HTTPRouteRedirectPath and
/// HTTPRouteRedirectHostAndStatus.
fn redirect_routes() -> String {
    let rule = |path: &str, redirect: &str| {
        format!(
            "  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    filters: [{{type: RequestRedirect, requestRedirect: {{{redirect}}}}}]\n"
        )
    };
    let port_and_scheme = [
        rule("/scheme-nil-and-port-nil", "hostname: example.org"),
        rule("/scheme-nil-and-port-80", "hostname: example.org, port: 80"),
        rule("/scheme-nil-and-port-8080", "hostname: example.org, port: 8080"),
        rule("/scheme-https-and-port-nil", "scheme: https, hostname: example.org"),
        rule("/scheme-https-and-port-443", "scheme: https, hostname: example.org, port: 443"),
        rule("/scheme-https-and-port-8443", "scheme: https, hostname: example.org, port: 8443"),
    ]
    .concat();
    let path = [
        rule("/original-prefix", "path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}"),
        rule("/full", "path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}"),
        rule(
            "/path-and-host",
            "hostname: example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}",
        ),
        rule(
            "/path-and-status",
            "path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}, statusCode: 301",
        ),
        rule(
            "/full-path-and-host",
            "hostname: example.org, path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}",
        ),
        rule(
            "/full-path-and-status",
            "path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}, statusCode: 301",
        ),
        rule("/hostname-redirect", "hostname: example.org"),
        rule("/host-and-status", "hostname: example.org, statusCode: 301"),
    ]
    .concat();
    [
        http_route("redirect-80", "web", 80, &format!("{port_and_scheme}{path}")),
        http_route("redirect-8080", "web8080", 8080, &port_and_scheme),
    ]
    .join("---\n")
}

/// The value the echo server saw for request header `name` (repeated values joined by `,`).
fn seen_header(seen: &Value, name: &str) -> Option<String> {
    seen["headers"][name.to_ascii_lowercase()]
        .as_str()
        .map(|v| v.split(',').map(str::trim).collect::<Vec<_>>().join(","))
}

/// The response's values of header `name`, joined by `,`.
fn response_header(r: &Collected, name: &str) -> Option<String> {
    let values: Vec<String> = r
        .headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// One conformance case: a request and what the backend (or the client) must see.
struct Case {
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// Expected headers (`name`, `value`) and absent headers (`name`, "").
    expect: &'static [(&'static str, &'static str)],
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_filters_behave_as_the_gateway_api_conformance_tests_describe() -> Result<()> {
    let v1 = HttpEcho::start("infra-v1").await?;
    let v2 = HttpEcho::start("infra-v2").await?;
    let header_echo = Recorder::start("header-echo").await?;
    let mut res = Resources::new();
    for (svc, port) in
        [("reqhdr", 8080), ("resphdr", 8080), ("rewrite", 8080), ("rewritehost", 8080), ("web", 80), ("web8080", 8080)]
    {
        res = res.service(svc, &[ServicePort::new("http", port, Some("http"))]);
    }
    res = backend(backend(res, "infra-v1", v1.port()), "infra-v2", v2.port());
    res = backend(res, "header-echo", header_echo.port());
    let dir = TempDir::new("filters")?;
    let file = dir.join("mesh.yaml");
    res.raw(FILTER_ROUTES).raw(&redirect_routes()).write(&file)?;
    let proxy = sidecar(&file).await?;
    let mut c = Conn::open(proxy.outbound()).await?;
    let mut wrong: Vec<String> = Vec::new();

    // HTTPRouteRequestHeaderModifier.
    let request_cases = [
        Case {
            path: "/set",
            headers: &[("Some-Other-Header", "val")],
            expect: &[("Some-Other-Header", "val"), ("X-Header-Set", "set-overwrites-values")],
        },
        Case {
            path: "/set",
            headers: &[("Some-Other-Header", "val"), ("X-Header-Set", "some-other-value")],
            expect: &[("Some-Other-Header", "val"), ("X-Header-Set", "set-overwrites-values")],
        },
        Case {
            path: "/add",
            headers: &[("Some-Other-Header", "val")],
            expect: &[("Some-Other-Header", "val"), ("X-Header-Add", "add-appends-values")],
        },
        Case {
            path: "/add",
            headers: &[("Some-Other-Header", "val"), ("X-Header-Add", "some-other-value")],
            expect: &[("Some-Other-Header", "val"), ("X-Header-Add", "some-other-value,add-appends-values")],
        },
        Case { path: "/remove", headers: &[("X-Header-Remove", "val")], expect: &[("X-Header-Remove", "")] },
        Case {
            path: "/multiple",
            headers: &[
                ("X-Header-Set-2", "set-val-2"),
                ("X-Header-Add-2", "add-val-2"),
                ("X-Header-Remove-2", "remove-val-2"),
                ("Another-Header", "another-header-val"),
            ],
            expect: &[
                ("X-Header-Set-1", "header-set-1"),
                ("X-Header-Set-2", "header-set-2"),
                ("X-Header-Add-1", "header-add-1"),
                ("X-Header-Add-2", "add-val-2,header-add-2"),
                ("X-Header-Add-3", "header-add-3"),
                ("Another-Header", "another-header-val"),
                ("X-Header-Remove-1", ""),
                ("X-Header-Remove-2", ""),
            ],
        },
        Case {
            path: "/case-insensitivity",
            headers: &[
                ("x-header-set", "original-val-set"),
                ("x-header-add", "original-val-add"),
                ("x-header-remove", "original-val-remove"),
                ("Another-Header", "another-header-val"),
            ],
            expect: &[
                ("X-Header-Set", "header-set"),
                ("X-Header-Add", "original-val-add,header-add"),
                ("Another-Header", "another-header-val"),
                ("X-Header-Remove", ""),
            ],
        },
    ];
    for case in &request_cases {
        let r = c.get("reqhdr:8080", case.path, case.headers).await?;
        let seen = r.json()?;
        for (name, want) in case.expect {
            let got = seen_header(&seen, name);
            let ok = if want.is_empty() { got.is_none() } else { got.as_deref() == Some(*want) };
            if !ok {
                wrong.push(format!(
                    "request {} {:?}: upstream saw {name}: {got:?}, want {want:?}",
                    case.path, case.headers
                ));
            }
        }
    }

    // HTTPRouteResponseHeaderModifier: `x-echo-NAME` request headers make the backend answer
    // with header NAME.
    let response_cases = [
        Case {
            path: "/set",
            headers: &[("x-echo-Some-Other-Header", "val")],
            expect: &[("Some-Other-Header", "val"), ("X-Header-Set", "set-overwrites-values")],
        },
        Case {
            path: "/set",
            headers: &[("x-echo-Some-Other-Header", "val"), ("x-echo-X-Header-Set", "some-other-value")],
            expect: &[("Some-Other-Header", "val"), ("X-Header-Set", "set-overwrites-values")],
        },
        Case {
            path: "/add",
            headers: &[("x-echo-Some-Other-Header", "val")],
            expect: &[("Some-Other-Header", "val"), ("X-Header-Add", "add-appends-values")],
        },
        Case {
            path: "/add",
            headers: &[("x-echo-Some-Other-Header", "val"), ("x-echo-X-Header-Add", "some-other-value")],
            expect: &[("Some-Other-Header", "val"), ("X-Header-Add", "some-other-value,add-appends-values")],
        },
        Case { path: "/remove", headers: &[("x-echo-X-Header-Remove", "val")], expect: &[("X-Header-Remove", "")] },
        Case {
            path: "/multiple",
            headers: &[
                ("x-echo-X-Header-Set-2", "set-val-2"),
                ("x-echo-X-Header-Add-2", "add-val-2"),
                ("x-echo-X-Header-Remove-2", "remove-val-2"),
                ("x-echo-Another-Header", "another-header-val"),
            ],
            expect: &[
                ("X-Header-Set-1", "header-set-1"),
                ("X-Header-Set-2", "header-set-2"),
                ("X-Header-Add-1", "header-add-1"),
                ("X-Header-Add-2", "add-val-2,header-add-2"),
                ("X-Header-Add-3", "header-add-3"),
                ("Another-Header", "another-header-val"),
                ("X-Header-Remove-1", ""),
                ("X-Header-Remove-2", ""),
            ],
        },
    ];
    for case in &response_cases {
        let r = c.get("resphdr:8080", case.path, case.headers).await?;
        if r.status != 200 || served_by(&r) != "header-echo" {
            wrong.push(format!("response {}: {} from {:?}", case.path, r.status, served_by(&r)));
            continue;
        }
        for (name, want) in case.expect {
            let got = response_header(&r, name);
            let ok = if want.is_empty() { got.is_none() } else { got.as_deref() == Some(*want) };
            if !ok {
                wrong.push(format!(
                    "response {} {:?}: client got {name}: {got:?}, want {want:?}",
                    case.path, case.headers
                ));
            }
        }
    }

    // HTTPRouteRewritePath, with the trailing-slash rows of the ReplacePrefixMatch table and a
    // query string that must survive.
    let rewrites = [
        ("/prefix/one/two", "/one/two"),
        ("/prefix/one", "/one"),
        ("/prefix/one/", "/one/"),
        ("/prefix/one/two?q=1&r=2", "/one/two?q=1&r=2"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/strip-prefix/", "/"),
        ("/full/one/two", "/one"),
        ("/full/one", "/one"),
    ];
    for (path, want) in rewrites {
        let r = c.get("rewrite:8080", path, &[]).await?;
        let seen = r.json()?;
        if seen["path"] != want || served_by(&r) != "infra-v1" {
            wrong.push(format!(
                "rewrite {path}: upstream saw path {} on {:?}, want {want}",
                seen["path"],
                served_by(&r)
            ));
        }
    }
    let modify: &[(&str, &str)] =
        &[("X-Header-Remove", "remove-val"), ("X-Header-Add-Append", "append-val-1"), ("X-Header-Set", "set-val")];
    let modified = [
        ("X-Header-Add", "header-val-1"),
        ("X-Header-Add-Append", "append-val-1,header-val-2"),
        ("X-Header-Set", "set-overwrites-values"),
    ];
    for (host, path, want_path, want_host, want_backend) in [
        ("rewrite:8080", "/full/rewrite-path-and-modify-headers/test", "/test", "rewrite:8080", "infra-v1"),
        ("rewrite:8080", "/prefix/rewrite-path-and-modify-headers/one", "/prefix/one", "rewrite:8080", "infra-v1"),
        // HTTPRouteRewriteHost.
        (
            "rewritehost:8080",
            "/rewrite-host-and-modify-headers",
            "/rewrite-host-and-modify-headers",
            "test.example.org",
            "infra-v2",
        ),
    ] {
        let r = c.get(host, path, modify).await?;
        let seen = r.json()?;
        if seen["path"] != want_path || seen["authority"] != want_host || served_by(&r) != want_backend {
            wrong.push(format!(
                "{host}{path}: upstream {:?} saw path {} authority {}, want {want_path} {want_host} on {want_backend}",
                served_by(&r),
                seen["path"],
                seen["authority"]
            ));
        }
        for (name, want) in modified {
            if seen_header(&seen, name).as_deref() != Some(want) {
                wrong.push(format!("{host}{path}: upstream saw {name}: {:?}, want {want}", seen_header(&seen, name)));
            }
        }
        if seen_header(&seen, "X-Header-Remove").is_some() {
            wrong.push(format!("{host}{path}: X-Header-Remove was not removed"));
        }
    }
    for (path, want_host, want_backend) in
        [("/one", "one.example.org", "infra-v1"), ("/two", "example.org", "infra-v2")]
    {
        let r = c.get("rewritehost:8080", path, &[]).await?;
        let seen = r.json()?;
        if seen["authority"] != want_host || seen["path"] != path || served_by(&r) != want_backend {
            wrong.push(format!(
                "rewrite host {path}: {:?} saw authority {} path {}, want {want_host} on {want_backend}",
                served_by(&r),
                seen["authority"],
                seen["path"]
            ));
        }
    }

    // Redirects: the status and the exact Location.
    let redirects = [
        ("web:80", "/scheme-nil-and-port-nil", 302, "http://example.org/scheme-nil-and-port-nil"),
        ("web:80", "/scheme-nil-and-port-80", 302, "http://example.org/scheme-nil-and-port-80"),
        ("web:80", "/scheme-nil-and-port-8080", 302, "http://example.org:8080/scheme-nil-and-port-8080"),
        ("web:80", "/scheme-https-and-port-nil", 302, "https://example.org/scheme-https-and-port-nil"),
        ("web:80", "/scheme-https-and-port-443", 302, "https://example.org/scheme-https-and-port-443"),
        ("web:80", "/scheme-https-and-port-8443", 302, "https://example.org:8443/scheme-https-and-port-8443"),
        ("web8080:8080", "/scheme-nil-and-port-nil", 302, "http://example.org:8080/scheme-nil-and-port-nil"),
        ("web8080:8080", "/scheme-nil-and-port-80", 302, "http://example.org/scheme-nil-and-port-80"),
        ("web8080:8080", "/scheme-https-and-port-nil", 302, "https://example.org/scheme-https-and-port-nil"),
        ("web:80", "/original-prefix/lemon", 302, "http://web/replacement-prefix/lemon"),
        ("web:80", "/original-prefix/lemon?x=1&y=2", 302, "http://web/replacement-prefix/lemon?x=1&y=2"),
        ("web:80", "/original-prefix", 302, "http://web/replacement-prefix"),
        ("web:80", "/original-prefix/", 302, "http://web/replacement-prefix/"),
        ("web:80", "/full/path/original", 302, "http://web/full-path-replacement"),
        ("web:80", "/full/path/original?k=v", 302, "http://web/full-path-replacement?k=v"),
        ("web:80", "/path-and-host", 302, "http://example.org/replacement-prefix"),
        ("web:80", "/path-and-status", 301, "http://web/replacement-prefix"),
        ("web:80", "/full-path-and-host", 302, "http://example.org/replacement-full"),
        ("web:80", "/full-path-and-status", 301, "http://web/replacement-full"),
        ("web:80", "/hostname-redirect", 302, "http://example.org/hostname-redirect"),
        ("web:80", "/host-and-status", 301, "http://example.org/host-and-status"),
    ];
    for (host, path, status, location) in redirects {
        let r = c.get(host, path, &[]).await?;
        if r.status != status || r.header("location") != Some(location) {
            wrong.push(format!(
                "redirect {host}{path}: {} {:?}, want {status} {location}",
                r.status,
                r.header("location")
            ));
        }
    }
    assert!(wrong.is_empty(), "{} filter expectations not met:\n{}", wrong.len(), wrong.join("\n"));
    Ok(())
}

/// A route with a rewrite and both header modifiers to a backend behind its own sidecar.
const TWO_HOP_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: site}
spec:
  parentRefs: [{kind: Service, name: site, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: backend.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: site}], remove: [x-drop]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-route-response, value: site}], add: [{name: x-served-by, value: via-route}]}
    backendRefs: [{name: site-v1, port: 8080}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_apply_across_two_sidecars() -> Result<()> {
    let app = HttpEcho::start("site-v1").await?;
    let dir = TempDir::new("two-hop-filters")?;
    let file = dir.join("mesh.yaml");
    let services = Resources::new()
        .service("site", &[ServicePort::new("http", 8080, Some("http"))])
        .service("site-v1", &[ServicePort::new("http", 8080, Some("http"))])
        .raw(TWO_HOP_ROUTE);
    services.write(&file)?;
    let app_port = app.port().to_string();
    let path = file.to_str().context("utf-8 path")?;
    let server = Proxy::start_named(
        "server-sidecar",
        PLEXUS,
        ["proxy", "--resources", path, "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0"]
            .into_iter()
            .chain(["--app-port", &app_port]),
    )
    .await?;
    services
        .workload(&WorkloadSpec::meshed("site-v1-1", "site-v1", "http", server.inbound().port(), app.port()))
        .write(&file)?;
    let client = sidecar(&file).await?;
    let mut c = Conn::open(client.outbound()).await?;

    let r = c.get("site:8080", "/api/users?id=7", &[("x-drop", "1"), ("x-keep", "1")]).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json()?;
    assert_eq!(seen["path"], "/v1/users?id=7", "{seen}");
    assert_eq!(seen["authority"], "backend.internal", "{seen}");
    assert_eq!(seen_header(&seen, "x-route").as_deref(), Some("site"), "{seen}");
    assert_eq!(seen_header(&seen, "x-keep").as_deref(), Some("1"), "{seen}");
    assert_eq!(seen_header(&seen, "x-drop"), None, "{seen}");
    assert_eq!(response_header(&r, "x-route-response").as_deref(), Some("site"));
    assert_eq!(response_header(&r, "x-served-by").as_deref(), Some("site-v1,via-route"));
    common::assert_counted(&server, "inbound").await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. RequestMirror
// ---------------------------------------------------------------------------------------------

const MIRROR_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-mirror}
spec:
  parentRefs: [{kind: Service, name: api, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 8080}}
    backendRefs: [{name: primary, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /half}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 8080}, percent: 50}
    backendRefs: [{name: primary, port: 8080}]
"#;

/// Waits until the mirror's count stops growing (nothing new for 500 ms, at most 10 s).
async fn settled_count(mirror: &Recorder) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = mirror.count();
    let mut still_since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = mirror.count();
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() >= Duration::from_millis(500) {
            break;
        }
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_mirror_copies_requests_and_never_affects_the_primary() -> Result<()> {
    let _serial = serial().await;
    let primary = HttpEcho::start("primary").await?;
    let mirror = Recorder::start("shadow").await?;
    let dir = TempDir::new("mirror")?;
    let file = dir.join("mesh.yaml");
    let res = Resources::new().service("api", &[ServicePort::new("http", 8080, Some("http"))]);
    backend(backend(res, "primary", primary.port()), "shadow", mirror.port()).raw(MIRROR_ROUTE).write(&file)?;
    let proxy = sidecar(&file).await?;
    let mut c = Conn::open(proxy.outbound()).await?;

    // 100%: every one of 200 requests is copied exactly once (every 10th is a POST with a
    // small body, which is copied whole).
    for i in 0..200u32 {
        let path = format!("/full/{i}");
        let r = if i.is_multiple_of(10) {
            c.send("POST", "api:8080", &path, &[], Bytes::from(vec![b'x'; 1000])).await?
        } else {
            c.get("api:8080", &path, &[]).await?
        };
        assert_eq!((r.status.as_u16(), served_by(&r).as_str()), (200, "primary"), "{path}");
    }
    let copies = settled_count(&mirror).await;
    assert_eq!(copies, 200, "mirror copies of 200 requests");
    let seen = mirror.seen();
    let paths: BTreeSet<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths.len(), 200, "every request mirrored once");
    for s in &seen {
        let i: usize = s.path.trim_start_matches("/full/").parse().context("mirrored path")?;
        let (method, len) = if i.is_multiple_of(10) { ("POST", 1000) } else { ("GET", 0) };
        assert_eq!((s.method.as_str(), s.body_len), (method, len), "mirrored {s:?}");
    }

    // 50%: about half of 400 requests.
    mirror.clear();
    for i in 0..400 {
        let r = c.get("api:8080", &format!("/half/{i}"), &[]).await?;
        assert_eq!(r.status, 200);
    }
    let copies = settled_count(&mirror).await;
    assert!((160..=240).contains(&copies), "percent 50 mirrored {copies} of 400 requests (want 50% ± 10 pp)");

    // A large body (over 64 KiB) reaches the primary whole; the mirror never gets a truncated
    // copy (bodies that large are not mirrored).
    mirror.clear();
    let r = c.send("POST", "api:8080", "/full/large", &[], Bytes::from(vec![b'y'; 256 * 1024])).await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()?["body_len"], 256 * 1024, "the primary got the whole body");
    settled_count(&mirror).await;
    for s in mirror.seen() {
        assert_eq!(s.body_len, 256 * 1024, "a truncated mirror copy: {s:?}");
    }

    // The mirror's answers are ignored: it answers 500, the client gets the primary's 200.
    mirror.clear();
    mirror.set_status(500);
    for i in 0..50 {
        let r = c.get("api:8080", &format!("/full/failing-{i}"), &[]).await?;
        assert_eq!((r.status.as_u16(), served_by(&r).as_str()), (200, "primary"));
    }
    let copies = settled_count(&mirror).await;
    assert_eq!(copies, 50, "a mirror answering 500 still gets every copy");

    // A slow mirror does not slow the primary.
    mirror.clear();
    mirror.set_status(200);
    mirror.set_delay(Duration::from_secs(2));
    let mut took = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        let r = c.get("api:8080", &format!("/full/slow-{i}"), &[]).await?;
        took.push(started.elapsed());
        assert_eq!((r.status.as_u16(), served_by(&r).as_str()), (200, "primary"));
    }
    took.sort();
    let p50 = took[took.len() / 2];
    assert!(p50 < Duration::from_millis(200), "primary p50 {p50:?} with a mirror taking 2 s: {took:?}");
    assert!(took.iter().all(|t| *t < Duration::from_secs(2)), "a primary request waited for the mirror: {took:?}");
    // The slow copies did arrive.
    plexus_testkit::eventually(Duration::from_secs(5), || async {
        let n = mirror.count();
        if n == 20 { Ok(()) } else { bail!("{n} of 20 slow copies arrived") }
    })
    .await?;
    Ok(())
}
