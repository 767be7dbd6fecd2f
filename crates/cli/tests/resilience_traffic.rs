//! Resilience end to end through real `plexus` processes: fault injection (delays, HTTP and
//! gRPC aborts), request and per-try timeouts, retries within the retry budget, requests that
//! must not be sent twice, and `grpc-timeout` deadlines shrinking over two sidecars (SPEC §4
//! FaultInjection, ResiliencePolicy, route `timeouts` and `retry`; §5; §9 Bookinfo).
//!
//! The upstream application ([`App`]) is written for these tests: it fails a chosen share of
//! requests with 503 (gRPC: UNAVAILABLE), delays the next few requests, answers gRPC requests
//! with trailers, counts requests and records the `grpc-timeout` each gRPC request carried.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use common::{PLEXUS, assert_counted, metric_sum};
use plexus_testkit::bytes::Bytes;
use plexus_testkit::client::{self, Collected, PatternBody};
use plexus_testkit::http::{HeaderMap, HeaderValue, Request, Response};
use plexus_testkit::http_body_util::{BodyExt as _, Full};
use plexus_testkit::hyper::body::{Body, Frame, Incoming};
use plexus_testkit::hyper::client::conn::http2;
use plexus_testkit::hyper::service::service_fn;
use plexus_testkit::hyper_util::rt::{TokioExecutor, TokioIo};
use plexus_testkit::hyper_util::server::conn::auto;
use plexus_testkit::{Proxy, Resources, ServicePort, TempDir, WorkloadSpec, free_port, serial};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// The header of proxy-made answers (SPEC §5).
const ERROR_HEADER: &str = "x-plexus-error";

/// One answer is given at most this long, whatever the test.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// The upstream application

/// When the app answers 503 (gRPC: `grpc-status: 14`).
#[derive(Debug, Default)]
enum Failing {
    #[default]
    Never,
    Always,
    /// 3 of every 10 requests, at random places within each run of 10 (a shuffled deck,
    /// refilled when empty): exactly 30% failures in random order. Unlike independent 30%
    /// rolls, at most 6 failures can follow each other (the last 3 of one deck and the first
    /// 3 of the next), so the chance that all 6 tries of one request fail is about
    /// (1/120)² per deck boundary, instead of 0.3⁶ per request.
    Deck(VecDeque<bool>),
}

impl Failing {
    fn next(&mut self) -> bool {
        match self {
            Failing::Never => false,
            Failing::Always => true,
            Failing::Deck(deck) => {
                if deck.is_empty() {
                    let mut cards = [true, true, true, false, false, false, false, false, false, false];
                    fastrand::shuffle(&mut cards);
                    deck.extend(cards);
                }
                deck.pop_front().unwrap_or(false)
            }
        }
    }
}

/// What the app does and has seen; shared by its connections.
#[derive(Debug, Default)]
struct AppState {
    requests: AtomicU64,
    failing: Mutex<Failing>,
    /// This many next requests wait `slow_ms` (instead of `delay_ms`).
    slow_next: AtomicU64,
    slow_ms: AtomicU64,
    delay_ms: AtomicU64,
    /// The `grpc-timeout` of every gRPC request, in arrival order.
    grpc_timeouts: Mutex<Vec<Option<String>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AppState {
    async fn answer(&self, req: Request<Incoming>) -> Response<AppBody> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let grpc = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        if grpc {
            let timeout = req.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).map(str::to_string);
            lock(&self.grpc_timeouts).push(timeout);
        }
        let slow = self.slow_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        let delay = if slow { &self.slow_ms } else { &self.delay_ms }.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        // `/status/NNN` answers NNN; otherwise the failure mode decides.
        let forced = req.uri().path().strip_prefix("/status/").and_then(|s| s.parse::<u16>().ok());
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
        let status = forced.unwrap_or_else(|| if lock(&self.failing).next() { 503 } else { 200 });
        let mut resp = if grpc {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from(if status < 400 { 0 } else { 14 }));
            let mut r =
                Response::new(AppBody { data: Some(Bytes::from_static(b"\0\0\0\0\x02ok")), trailers: Some(trailers) });
            r.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
            r
        } else {
            let mut r =
                Response::new(AppBody { data: Some(Bytes::from(format!("status {status}\n"))), trailers: None });
            *r.status_mut() = plexus_testkit::http::StatusCode::from_u16(status)
                .unwrap_or(plexus_testkit::http::StatusCode::INTERNAL_SERVER_ERROR);
            r
        };
        resp.headers_mut().insert("x-served-by", HeaderValue::from_static("app"));
        resp
    }
}

/// A response body: at most one data frame, then optional trailers.
struct AppBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// The test application on an ephemeral 127.0.0.1 port (HTTP/1.1 and h2c); stopped on drop.
struct App {
    addr: SocketAddr,
    state: Arc<AppState>,
    task: JoinHandle<()>,
}

impl App {
    async fn start() -> Result<App> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind the app")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(AppState::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let state = shared.clone();
                        conns.spawn(async move {
                            let service = service_fn(move |req| {
                                let state = state.clone();
                                async move { Ok::<_, Infallible>(state.answer(req).await) }
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
        Ok(App { addr, state, task })
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    fn fail(&self, f: Failing) {
        *lock(&self.state.failing) = f;
    }

    fn set_delay(&self, d: Duration) {
        self.state.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// The next `n` requests wait `d` before answering.
    fn slow_next(&self, n: u64, d: Duration) {
        self.state.slow_ms.store(d.as_millis() as u64, Ordering::SeqCst);
        self.state.slow_next.store(n, Ordering::SeqCst);
    }

    /// The `grpc-timeout` of the last gRPC request received.
    fn last_grpc_timeout(&self) -> Option<Option<String>> {
        lock(&self.state.grpc_timeouts).last().cloned()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Proxies, resources and clients

async fn sidecar(name: &str, resources: &Path, extra: &[&str]) -> Result<Proxy> {
    let mut args = vec![
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
    args.extend_from_slice(extra);
    Proxy::start_named(name, PLEXUS, args).await
}

/// A Service `name` (port `port`, `appProtocol`) whose one Workload is the app at `app_port`,
/// dialled directly.
fn service(r: Resources, name: &str, port: u16, proto: &str, app_port: u16) -> Resources {
    r.service(name, &[ServicePort::new("p", port, Some(proto))]).workload(&WorkloadSpec::plain(
        &format!("{name}-1"),
        name,
        "p",
        app_port,
    ))
}

/// A ResiliencePolicy for Service `target`; `spec` is the YAML under `spec:` besides `targetRef`
/// (indented by two spaces).
fn resilience(name: &str, target: &str, spec: &str) -> String {
    format!(
        "apiVersion: plexus.dev/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  targetRef: {{kind: Service, name: {target}}}\n{spec}"
    )
}

/// A FaultInjection with the given `spec:` (one line of flow YAML).
fn fault(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: plexus.dev/v1alpha1\nkind: FaultInjection\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n"
    )
}

/// An HTTPRoute on Service `parent` whose one rule sends everything to `parent` with the given
/// extra rule fields (flow YAML, e.g. `timeouts: {request: 500ms}`).
fn http_route(parent: &str, port: u16, rule: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {parent}, namespace: default}}\nspec:\n  parentRefs: [{{kind: Service, name: {parent}, port: {port}}}]\n  rules:\n  - {{backendRefs: [{{name: {parent}, port: {port}}}], {rule}}}\n"
    )
}

/// One h2c connection; clones share it, so requests on it run concurrently.
#[derive(Clone)]
struct H2(http2::SendRequest<Full<Bytes>>);

impl H2 {
    async fn open(addr: SocketAddr) -> Result<H2> {
        let io = TokioIo::new(client::connect(addr).await?);
        let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await.context("HTTP/2 handshake")?;
        tokio::spawn(conn);
        Ok(H2(sender))
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Collected> {
        let mut sender = self.0.clone();
        tokio::time::timeout(ANSWER_TIMEOUT, async move {
            sender.ready().await.context("HTTP/2 connection")?;
            let resp = sender.send_request(req).await.context("HTTP/2 request")?;
            client::collect(resp).await
        })
        .await
        .with_context(|| format!("no answer within {ANSWER_TIMEOUT:?}"))?
    }
}

fn get_request(authority: &str, path: &str) -> Result<Request<Full<Bytes>>> {
    Ok(Request::get(format!("http://{authority}{path}")).body(Full::new(Bytes::new()))?)
}

/// A unary gRPC call of `method` on `plexus.test.Echo`, with an optional `grpc-timeout`.
fn grpc_request(authority: &str, method: &str, timeout: Option<&str>) -> Result<Request<Full<Bytes>>> {
    let mut b = Request::post(format!("http://{authority}/plexus.test.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        b = b.header("grpc-timeout", t);
    }
    Ok(b.body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))?)
}

/// The `grpc-status` of a gRPC answer: in the headers (trailers-only) or the trailers.
fn grpc_status(r: &Collected) -> Option<String> {
    r.header("grpc-status")
        .map(str::to_string)
        .or_else(|| r.trailers.as_ref()?.get("grpc-status")?.to_str().ok().map(str::to_string))
}

/// Parses a `grpc-timeout` value (digits and one of H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// What the client got for one request: the status (0 when there was no answer) and the
/// proxy's `x-plexus-error`, if any.
#[derive(Debug)]
struct Seen {
    status: u16,
    error: Option<String>,
}

impl Seen {
    fn of(r: Result<Collected>) -> Seen {
        match r {
            Ok(c) => Seen { status: c.status.as_u16(), error: c.header(ERROR_HEADER).map(str::to_string) },
            Err(e) => Seen { status: 0, error: Some(format!("{e:#}")) },
        }
    }
}

/// Sends `total` GETs of `path` at `per_second`, open loop (each at its own time, whatever
/// became of the ones before), over one h2c connection to `addr`.
async fn paced(addr: SocketAddr, authority: &str, path: &str, per_second: u32, total: u32) -> Result<Vec<Seen>> {
    let h2 = H2::open(addr).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    let mut tasks = JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let (h2, req) = (h2.clone(), get_request(authority, path)?);
        tasks.spawn(async move { (i, Seen::of(h2.send(req).await)) });
    }
    let mut seen: Vec<(u32, Seen)> = Vec::new();
    while let Some(r) = tasks.join_next().await {
        seen.push(r?);
    }
    seen.sort_by_key(|(i, _)| *i);
    Ok(seen.into_iter().map(|(_, s)| s).collect())
}

/// Sends `total` GETs of `path`, `concurrency` at a time, over one h2c connection.
async fn burst(addr: SocketAddr, authority: &str, path: &str, total: u32, concurrency: u32) -> Result<Vec<Seen>> {
    let h2 = H2::open(addr).await?;
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (h2, next, authority, path) = (h2.clone(), next.clone(), authority.to_string(), path.to_string());
        workers.spawn(async move {
            let mut seen = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < u64::from(total) {
                let req = get_request(&authority, &path)?;
                seen.push(Seen::of(h2.send(req).await));
            }
            anyhow::Ok(seen)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = workers.join_next().await {
        all.extend(r??);
    }
    Ok(all)
}

/// `plexus_retries_total` of `proxy` for calls to Service `service`.
async fn retries_counted(proxy: &Proxy, service: &str) -> Result<f64> {
    let text = proxy.admin_get("/metrics").await?.text();
    Ok(metric_sum(&text, "plexus_retries_total", &[&format!("destination_service=\"{service}\"")]))
}

// ---------------------------------------------------------------------------------------------
// 1. Bookinfo: a delay fault cut short by a route timeout

/// A child process stopped on drop: SIGINT (so `plexus demo` stops its workloads too), then
/// SIGKILL if it is still running 10 s later.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let stopping = Instant::now();
        while matches!(self.0.try_wait(), Ok(None)) && stopping.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `plexus demo --no-load` on free ports with its own data dir.
struct Demo {
    /// Held for its drop (stops the demo).
    _proc: Proc,
    data: PathBuf,
    http: u16,
    ingress: SocketAddr,
    _stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Demo {
    /// Starts the demo and waits for its "running" line (printed once Bookinfo answers).
    async fn start(dir: &TempDir) -> Result<Demo> {
        let data = dir.join("data");
        let (http, grpc, ingress) = (free_port(), free_port(), free_port());
        let mut cmd = Command::new(PLEXUS);
        cmd.args(["demo", "--no-load"]);
        cmd.args(["--http-addr", &format!("127.0.0.1:{http}"), "--grpc-addr", &format!("127.0.0.1:{grpc}")]);
        cmd.args(["--ingress-addr", &format!("127.0.0.1:{ingress}"), "--data-dir"]).arg(&data);
        for var in plexus_testkit::PROXY_ENV_VARS {
            cmd.env_remove(var);
        }
        let log = std::fs::File::create(dir.join("demo.log"))?;
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(log)).spawn()?;
        let stdout = child.stdout.take().context("demo stdout")?;
        let proc = Proc(child);
        let first = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::task::spawn_blocking(move || {
                let mut lines = BufReader::new(stdout).lines();
                (lines.next(), lines)
            }),
        )
        .await
        .context("the demo did not say it was running within 60 s")??;
        let (first, lines) = first;
        let first = first.context("the demo printed nothing")??;
        ensure!(first.starts_with("Plexus demo is running"), "unexpected first line: {first}");
        Ok(Demo { _proc: proc, data, http, ingress: SocketAddr::from(([127, 0, 0, 1], ingress)), _stdout: lines })
    }

    /// `plexus apply -f FILE` against the demo's control plane.
    fn apply(&self, file: &Path) -> Result<()> {
        let o = Command::new(PLEXUS)
            .args(["apply", "-f"])
            .arg(file)
            .env("PLEXUS_SERVER", format!("http://127.0.0.1:{}", self.http))
            .env("PLEXUS_DATA_DIR", &self.data)
            .output()?;
        ensure!(
            o.status.success(),
            "plexus apply -f {} failed: {}{}",
            file.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(())
    }

    /// GET /productpage through the ingress: status, page and how long it took.
    async fn page(&self, headers: &[(&str, &str)]) -> Result<(u16, String, Duration)> {
        let started = Instant::now();
        let host = self.ingress.to_string();
        let r = client::get(self.ingress, &host, "/productpage", headers, Duration::from_secs(30)).await?;
        Ok((r.status.as_u16(), r.text(), started.elapsed()))
    }
}

const RATINGS_UNAVAILABLE: &str = "Ratings service is currently unavailable";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_delay_fault_for_jason_is_cut_short_by_the_ratings_timeout() -> Result<()> {
    let _serial = serial().await;
    let dir = TempDir::new("resilience-bookinfo")?;
    let demo = Demo::start(&dir).await?;

    // Every reviews call goes to v3 (which calls ratings and shows red stars), so that both
    // users' pages depend on ratings.
    let all_v3 = dir.join("reviews-v3.yaml");
    std::fs::write(
        &all_v3,
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews}\nspec:\n  parentRefs: [{kind: Service, name: reviews, port: 9080}]\n  rules:\n  - backendRefs: [{name: reviews-v3, port: 9080}]\n",
    )?;
    demo.apply(&all_v3)?;
    // The 7 s delay for jason and the 3 s timeout, in the walk-through's file.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookinfo");
    demo.apply(&examples.join("ratings-timeout.yaml"))?;

    // Wait until the routes reached the sidecars: red stars for everyone else, and jason's
    // page says ratings are unavailable.
    let applied = Instant::now();
    loop {
        let (status, page, _) = demo.page(&[]).await?;
        if status == 200 && page.contains("stars: red") {
            break;
        }
        ensure!(applied.elapsed() < Duration::from_secs(20), "reviews v3 never answered: {status}\n{page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let (status, page, took) = demo.page(&[("end-user", "jason")]).await?;
        if page.contains(RATINGS_UNAVAILABLE) {
            break;
        }
        ensure!(
            applied.elapsed() < Duration::from_secs(40),
            "jason's page never lost its ratings (last: {status} after {took:?})\n{page}"
        );
    }

    // Measured: the ratings call gives up after 3 s instead of waiting 7 s.
    let (status, page, took) = demo.page(&[("end-user", "jason")]).await?;
    println!("jason's page took {took:?}");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(RATINGS_UNAVAILABLE), "jason's page after {took:?}:\n{page}");
    assert!(!page.contains("stars: red"), "{page}");
    assert!(
        took >= Duration::from_millis(2500) && took <= Duration::from_secs(6),
        "jason's page took {took:?}; the 3 s timeout should cut the 7 s delay"
    );

    // Without the header the rule does not match: no delay, ratings shown.
    let (status, page, took) = demo.page(&[]).await?;
    println!("an anonymous page took {took:?}");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("stars: red") && !page.contains(RATINGS_UNAVAILABLE), "{page}");
    assert!(took < Duration::from_secs(2), "an anonymous page took {took:?}");

    drop(demo);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Aborts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborts_hit_their_percentage_and_grpc_aborts_answer_a_grpc_status() -> Result<()> {
    let app = App::start().await?;
    let dir = TempDir::new("resilience-aborts")?;
    let res = dir.join("mesh.yaml");
    let r = service(Resources::new(), "faulty", 8080, "http", app.port());
    service(r, "grpc-faulty", 9090, "grpc", app.port())
        .raw(&fault("half-abort", "{abort: {httpStatus: 500, percent: 50}}"))
        .raw(&http_route(
            "faulty",
            8080,
            "filters: [{type: ExtensionRef, extensionRef: {group: plexus.dev, kind: FaultInjection, name: half-abort}}]",
        ))
        .raw(&fault("by-code", "{abort: {grpcStatus: 14}}"))
        .raw(&fault("by-name", "{abort: {grpcStatus: unavailable, percent: 100}}"))
        .raw(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: grpc-faulty, namespace: default}\nspec:\n  parentRefs: [{kind: Service, name: grpc-faulty, port: 9090}]\n  rules:\n  - matches: [{method: {service: plexus.test.Echo, method: ByCode}}]\n    filters: [{type: ExtensionRef, extensionRef: {group: plexus.dev, kind: FaultInjection, name: by-code}}]\n    backendRefs: [{name: grpc-faulty, port: 9090}]\n  - matches: [{method: {service: plexus.test.Echo, method: ByName}}]\n    filters: [{type: ExtensionRef, extensionRef: {group: plexus.dev, kind: FaultInjection, name: by-name}}]\n    backendRefs: [{name: grpc-faulty, port: 9090}]\n  - backendRefs: [{name: grpc-faulty, port: 9090}]\n",
        )
        .write(&res)?;
    let proxy = sidecar("faults", &res, &["--upstream", "faulty:8080=0", "--upstream", "grpc-faulty:9090=0"]).await?;

    // 50% of 2,000: the binomial standard deviation is √(2000 × ¼) ≈ 22 requests (1.1%), so
    // ±5 points is over 4 standard deviations.
    let total = 2000;
    let seen = burst(proxy.upstream("faulty.default:8080")?, "faulty:8080", "/", total, 16).await?;
    let aborted = seen.iter().filter(|s| s.status == 500).count();
    let passed = seen.iter().filter(|s| s.status == 200).count();
    let share = aborted as f64 / f64::from(total);
    println!("aborted {aborted} of {total} ({:.1}%)", share * 100.0);
    let other: Vec<&Seen> = seen.iter().filter(|s| s.status != 500 && s.status != 200).take(5).collect();
    assert!(other.is_empty(), "answers other than 500 or 200: {other:?}");
    assert!((0.45..=0.55).contains(&share), "{:.1}% of {total} requests aborted, want 50 ± 5", share * 100.0);
    for s in seen.iter().filter(|s| s.status == 500) {
        assert_eq!(s.error.as_deref(), Some("fault injected by default/half-abort"), "{s:?}");
    }
    assert!(seen.iter().filter(|s| s.status == 200).all(|s| s.error.is_none()));
    assert_eq!(app.requests(), passed as u64, "aborted requests must not reach the app");

    // gRPC aborts answer HTTP 200 with the gRPC status, by number or by name.
    let h2 = H2::open(proxy.upstream("grpc-faulty.default:9090")?).await?;
    let before = app.requests();
    for (method, name) in [("ByCode", "by-code"), ("ByName", "by-name")] {
        let r = h2.send(grpc_request("grpc-faulty:9090", method, None)?).await?;
        assert_eq!(r.status, 200, "{method}: {r:?}");
        assert_eq!(grpc_status(&r).as_deref(), Some("14"), "{method}: {r:?}");
        assert_eq!(r.header(ERROR_HEADER), Some(format!("fault injected by default/{name}").as_str()), "{r:?}");
    }
    assert_eq!(app.requests(), before, "aborted gRPC calls must not reach the app");
    // A method no fault applies to gets through.
    let r = h2.send(grpc_request("grpc-faulty:9090", "Other", None)?).await?;
    assert_eq!(grpc_status(&r).as_deref(), Some("0"), "{r:?}");
    assert_eq!(app.requests(), before + 1);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Retries and the retry budget

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_flaky_upstream_and_the_budget_bounds_amplification() -> Result<()> {
    let _serial = serial().await;
    let flaky = App::start().await?;
    flaky.fail(Failing::Deck(VecDeque::new()));
    let broken = App::start().await?;
    broken.fail(Failing::Always);
    let dir = TempDir::new("resilience-retries")?;
    let res = dir.join("mesh.yaml");
    let retries = "  retries: {attempts: 6, on: [5xx]}\n";
    let r = service(Resources::new(), "flaky", 8080, "http", flaky.port());
    service(r, "broken", 8080, "http", broken.port())
        .raw(&resilience("flaky-retries", "flaky", retries))
        .raw(&resilience("broken-retries", "broken", retries))
        .write(&res)?;
    let proxy = sidecar("retries", &res, &["--upstream", "flaky:8080=0", "--upstream", "broken:8080=0"]).await?;

    // 30% failures, 20 requests a second for 10 s, up to 6 tries each. Every request needs
    // about 0.43 retries (0.3 + 0.3² + …), 86 for the 200, well within the default budget
    // (0.2 × 200 + 10/s × 10 s = 140). With independent 30% failures, all 6 tries of a
    // request fail with probability 0.3⁶ = 7.3e-4: Poisson(0.146) failures over 200 requests,
    // and one or more in 14% of runs. The app's failures are a shuffled deck instead (3 of
    // every 10, see `Failing::Deck`): a request can then only fail on the 6 failures
    // straddling two decks, (1/120)² per deck boundary, about 0.2% of runs for one failure.
    // So ≥ 99.5% (at most 1 failure in 200) holds with a false-alarm rate far below 0.1%.
    let total = 200;
    let seen = paced(proxy.upstream("flaky.default:8080")?, "flaky:8080", "/", 20, total).await?;
    let ok = seen.iter().filter(|s| s.status == 200).count();
    let upstream = flaky.requests();
    let counted = retries_counted(&proxy, "flaky").await?;
    println!(
        "flaky upstream: {ok}/{total} succeeded ({:.2}%), {upstream} upstream requests, {counted} retries counted",
        ok as f64 * 100.0 / f64::from(total)
    );
    let failures: Vec<&Seen> = seen.iter().filter(|s| s.status != 200).collect();
    assert!(ok as f64 >= 0.995 * f64::from(total), "{ok}/{total} succeeded; failures: {failures:?}");
    assert!(upstream > u64::from(total) + 20, "the 30% failures were retried: {upstream} upstream requests");
    assert_eq!(counted as u64, upstream - u64::from(total), "every retry is counted in plexus_retries_total");

    // A dead upstream at 200 requests a second for 5 s: 6 tries allowed, but the budget
    // grants at most ratio × requests + minPerSecond × ttl retries within the 10 s window.
    let (ratio, min_per_second, ttl) = (0.2, 10.0, 10.0);
    let total = 1000;
    let started = Instant::now();
    let seen = paced(proxy.upstream("broken.default:8080")?, "broken:8080", "/", 200, total).await?;
    let took = started.elapsed();
    let upstream = broken.requests();
    let amplification = upstream as f64 / f64::from(total);
    let bound = 1.0 + ratio + min_per_second * ttl / f64::from(total);
    let counted = retries_counted(&proxy, "broken").await?;
    println!(
        "dead upstream: {total} requests in {took:?}, {upstream} upstream requests: amplification {amplification:.3} \
         (bound {bound:.3}), {counted} retries counted"
    );
    let not_503: Vec<&Seen> = seen.iter().filter(|s| s.status != 503).take(5).collect();
    assert!(not_503.is_empty(), "the app's 503 is every answer: {not_503:?}");
    assert!(took < Duration::from_secs(8), "the 1,000 requests took {took:?}, past the budget's window");
    // +0.005: the budget grants a retry while retries < allowed, so one past a fractional limit.
    assert!(amplification <= bound + 0.005, "amplification {amplification:.3} > {bound:.3}");
    assert!(amplification >= 1.2, "the budget's retries were not used: amplification {amplification:.3}");
    assert_eq!(counted as u64, upstream - u64::from(total), "every retry is counted in plexus_retries_total");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Timeouts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeouts_answer_504_and_per_try_timeouts_retry() -> Result<()> {
    let _serial = serial().await;
    let slow = App::start().await?;
    slow.set_delay(Duration::from_secs(2));
    let once = App::start().await?;
    let dir = TempDir::new("resilience-timeouts")?;
    let res = dir.join("mesh.yaml");
    let mut r = Resources::new();
    for (name, app) in [("slow-route", &slow), ("slow-policy", &slow), ("try-route", &once), ("try-policy", &once)] {
        r = service(r, name, 8080, "http", app.port());
    }
    r.raw(&http_route("slow-route", 8080, "timeouts: {request: 500ms}"))
        .raw(&resilience(
            "slow-policy",
            "slow-policy",
            "  timeouts: {request: 500ms}\n  retries: {attempts: 5, perTryTimeout: 300ms, on: [5xx]}\n",
        ))
        .raw(&http_route("try-route", 8080, "timeouts: {backendRequest: 300ms}, retry: {codes: [504], attempts: 2}"))
        .raw(&resilience("try-policy", "try-policy", "  retries: {attempts: 3, perTryTimeout: 300ms, on: [5xx]}\n"))
        .write(&res)?;
    let mut args = Vec::new();
    for name in ["slow-route", "slow-policy", "try-route", "try-policy"] {
        args.extend(["--upstream".to_string(), format!("{name}:8080=0")]);
    }
    let proxy = sidecar("timeouts", &res, &args.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    let call = |name: &'static str| {
        let proxy = &proxy;
        async move {
            let addr = proxy.upstream(&format!("{name}.default:8080"))?;
            let started = Instant::now();
            let r = client::get(addr, &format!("{name}:8080"), "/", &[], ANSWER_TIMEOUT).await?;
            anyhow::Ok((r, started.elapsed()))
        }
    };

    // The request timeout of a route, then of a policy (whose 300 ms tries fit once and a bit
    // in it): 504 from the proxy after about 0.5 s, not the app's 2 s.
    // slow-route has no retries: one try. slow-policy tries at 0 and after its first 300 ms
    // try timed out; the request timeout cuts the second.
    for (name, tries) in [("slow-route", 1), ("slow-policy", 2)] {
        let before = slow.requests();
        let (r, took) = call(name).await?;
        let seen = slow.requests() - before;
        println!("{name}: {} after {took:?}, {seen} tries", r.status);
        assert_eq!(r.status, 504, "{name}: {r:?}");
        assert_eq!(r.header(ERROR_HEADER), Some("request timeout"), "{name}: {r:?}");
        assert!(took >= Duration::from_millis(480) && took < Duration::from_millis(1500), "{name}: {took:?}");
        assert_eq!(seen, tries, "{name}: tries");
    }

    // The first try is slow, the second fast: the per-try timeout (route `backendRequest`
    // with a route `retry` on 504, then a policy `perTryTimeout`) moves on to a second try.
    for name in ["try-route", "try-policy"] {
        once.slow_next(1, Duration::from_secs(2));
        let before = once.requests();
        let (r, took) = call(name).await?;
        let tries = once.requests() - before;
        println!("{name}: {} after {took:?}, {tries} tries", r.status);
        assert_eq!(r.status, 200, "{name}: {r:?}");
        assert_eq!(tries, 2, "{name}: one slow try, one fast");
        assert!(took >= Duration::from_millis(290) && took < Duration::from_millis(1500), "{name}: {took:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Deadlines over two sidecars

/// client → sidecar A (outbound, `--upstream grpcsvc:9090`) → sidecar B (inbound, the
/// `meshed: true` Workload) → app. A GRPCRoute gives method `Bounded` a 200 ms timeout.
struct Chain {
    _dir: TempDir,
    a: Proxy,
    b: Proxy,
}

async fn chain(app: &App) -> Result<Chain> {
    let dir = TempDir::new("resilience-deadline")?;
    let res = dir.join("mesh.yaml");
    let services = Resources::new().service("grpcsvc", &[ServicePort::new("grpc", 9090, Some("grpc"))]);
    services.clone().write(&res)?;
    let app_port = app.port().to_string();
    let b = sidecar("sidecar-b", &res, &["--app-port", &app_port]).await?;
    services
        .workload(&WorkloadSpec::meshed("grpcsvc-1", "grpcsvc", "grpc", b.inbound().port(), app.port()))
        .raw(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: grpcsvc, namespace: default}\nspec:\n  parentRefs: [{kind: Service, name: grpcsvc, port: 9090}]\n  rules:\n  - matches: [{method: {service: plexus.test.Echo, method: Bounded}}]\n    backendRefs: [{name: grpcsvc, port: 9090}]\n    timeouts: {request: 200ms}\n  - backendRefs: [{name: grpcsvc, port: 9090}]\n",
        )
        .write(&res)?;
    let a = sidecar("sidecar-a", &res, &["--upstream", "grpcsvc:9090=0"]).await?;
    Ok(Chain { _dir: dir, a, b })
}

/// The `grpc-timeout` the app received with the last gRPC request.
fn app_saw(app: &App) -> Result<Duration> {
    let v = app.last_grpc_timeout().context("the app received no gRPC request")?;
    let v = v.context("the app's request carried no grpc-timeout")?;
    parse_grpc_timeout(&v).with_context(|| format!("the app received an invalid grpc-timeout {v:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_deadlines_shrink_over_two_sidecars_and_expired_calls_stop() -> Result<()> {
    let _serial = serial().await;
    let app = App::start().await?;
    let chain = chain(&app).await?;
    let h2 = H2::open(chain.a.upstream("grpcsvc.default:9090")?).await?;

    // 500 ms from the client: the app, two hops on, is left with less.
    let r = h2.send(grpc_request("grpcsvc:9090", "Echo", Some("500m"))?).await?;
    assert_eq!(grpc_status(&r).as_deref(), Some("0"), "{r:?}");
    let left = app_saw(&app)?;
    println!("client grpc-timeout 500m; the app got {left:?}");
    assert!(left < Duration::from_millis(500), "the app got {left:?}, not less than the client's 500 ms");
    assert!(left > Duration::from_millis(300), "the app got {left:?}: far more was taken than the hops cost");
    // It went through B.
    assert_counted(&chain.b, "inbound").await;

    // Already expired when it would be forwarded: DEADLINE_EXCEEDED, and the app never called.
    let before = app.requests();
    let r = h2.send(grpc_request("grpcsvc:9090", "Echo", Some("1n"))?).await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(grpc_status(&r).as_deref(), Some("4"), "{r:?}");
    assert!(r.header(ERROR_HEADER).is_some(), "{r:?}");
    assert_eq!(app.requests(), before, "an expired call reached the app");

    // A 200 ms route timeout wins over the client's 10 s, and is propagated as the deadline,
    // also when the client set none.
    for timeout in [Some("10S"), None] {
        let r = h2.send(grpc_request("grpcsvc:9090", "Bounded", timeout)?).await?;
        assert_eq!(grpc_status(&r).as_deref(), Some("0"), "{r:?}");
        let left = app_saw(&app)?;
        println!("client grpc-timeout {timeout:?} with a 200 ms route timeout; the app got {left:?}");
        assert!(left <= Duration::from_millis(200) && left > Duration::ZERO, "the app got {left:?}");
    }
    Ok(())
}

/// The destination sidecar's own part (SPEC §5 "decremented per hop"): a gRPC call arriving at
/// B's inbound listener (as from a peer sidecar) leaves it with a smaller `grpc-timeout`, and
/// one whose deadline has passed is answered DEADLINE_EXCEEDED without calling the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_sidecar_decrements_grpc_timeout_and_refuses_expired_calls() -> Result<()> {
    let app = App::start().await?;
    let chain = chain(&app).await?;
    let h2 = H2::open(chain.b.inbound()).await?;
    // Both checks run before asserting, so a failure shows what B does in each case.
    let mut wrong = Vec::new();

    let r = h2.send(grpc_request("grpcsvc:9090", "Echo", Some("500m"))?).await?;
    assert_eq!(grpc_status(&r).as_deref(), Some("0"), "{r:?}");
    let left = app_saw(&app)?;
    println!("grpc-timeout 500m into sidecar B; the app got {left:?}");
    if left >= Duration::from_millis(500) {
        wrong.push(format!("sidecar B passed grpc-timeout 500m on as {left:?} (not decremented)"));
    }

    let before = app.requests();
    let r = h2.send(grpc_request("grpcsvc:9090", "Echo", Some("1n"))?).await?;
    let forwarded = app.requests() - before;
    println!("grpc-timeout 1n into sidecar B: grpc-status {:?}, {forwarded} calls reached the app", grpc_status(&r));
    if grpc_status(&r).as_deref() != Some("4") || forwarded != 0 {
        wrong.push(format!(
            "sidecar B answered an expired call with grpc-status {:?} and forwarded it {forwarded} time(s) to the app \
             (want DEADLINE_EXCEEDED, 4, without calling the app)",
            grpc_status(&r)
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. Requests that must not be sent twice

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_and_large_requests_are_not_retried() -> Result<()> {
    let app = App::start().await?;
    app.fail(Failing::Always);
    let dir = TempDir::new("resilience-writes")?;
    let res = dir.join("mesh.yaml");
    let r = service(Resources::new(), "writes", 8080, "http", app.port());
    service(r, "writes-retried", 8080, "http", app.port())
        .raw(&resilience("writes", "writes", "  retries: {attempts: 3, on: [5xx]}\n"))
        .raw(&resilience(
            "writes-retried",
            "writes-retried",
            "  retries: {attempts: 3, on: [5xx], retryNonIdempotent: true}\n",
        ))
        .write(&res)?;
    let proxy =
        sidecar("writes", &res, &["--upstream", "writes:8080=0", "--upstream", "writes-retried:8080=0"]).await?;
    let big = 100 * 1024;

    /// A request body for the cases below.
    enum Sent {
        Empty,
        Small,
        /// 100 KiB with `content-length`.
        Big,
        /// 100 KiB, chunked (size unknown ahead).
        BigChunked,
    }
    let cases = [
        ("writes", "GET", Sent::Empty, 3, "an idempotent GET is retried"),
        ("writes", "POST", Sent::Small, 1, "a POST is not retried by default"),
        ("writes-retried", "POST", Sent::Small, 3, "retryNonIdempotent retries a POST"),
        ("writes-retried", "POST", Sent::Big, 1, "a body over 64 KiB is never retried"),
        ("writes-retried", "POST", Sent::BigChunked, 1, "a chunked body over 64 KiB is never retried"),
        ("writes", "PUT", Sent::Big, 1, "an idempotent PUT over 64 KiB is not retried"),
    ];
    for (svc, method, sent, tries, why) in cases {
        let addr = proxy.upstream(&format!("{svc}.default:8080"))?;
        let b = Request::builder().method(method).uri("/").header("host", format!("{svc}:8080"));
        let before = app.requests();
        let r = match sent {
            Sent::Empty => {
                client::send_collect(addr, client::Version::Http1, b.body(Full::new(Bytes::new()))?, ANSWER_TIMEOUT)
                    .await?
            }
            Sent::Small => {
                let req = b.body(Full::new(Bytes::from_static(b"order=1")))?;
                client::send_collect(addr, client::Version::Http1, req, ANSWER_TIMEOUT).await?
            }
            Sent::Big => {
                let req = b.body(Full::new(Bytes::from(vec![b'x'; big])))?;
                client::send_collect(addr, client::Version::Http1, req, ANSWER_TIMEOUT).await?
            }
            Sent::BigChunked => {
                let req = b.body(PatternBody::new(big as u64, false))?;
                client::send_collect(addr, client::Version::Http1, req, ANSWER_TIMEOUT).await?
            }
        };
        let seen = app.requests() - before;
        assert_eq!(r.status, 503, "{svc} {method}: {r:?}");
        assert_eq!(seen, tries, "{why}: {svc} {method} reached the app {seen} times");
    }
    Ok(())
}
