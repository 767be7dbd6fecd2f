//! Resilience end to end through real `plexus proxy` processes: local rate limiting at the
//! destination sidecar, connection limits (circuit breaking), outlier detection and ring-hash
//! load balancing, each configured by its policy resource in a `--resources` file.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use common::{PLEXUS, metric_sum};
use plexus_testkit::bytes::Bytes;
use plexus_testkit::client::{self, Collected};
use plexus_testkit::http::{Request, Response, StatusCode};
use plexus_testkit::http_body_util::{Empty, Full};
use plexus_testkit::hyper::service::service_fn;
use plexus_testkit::hyper_util::rt::TokioIo;
use plexus_testkit::{
    Background, HttpEcho, Proxy, Resources, ServicePort, TempDir, WorkloadSpec, command, eventually, free_port, run_ok,
    serial,
};

/// One request's timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn sidecar(name: &str, resources: &Path, extra: &[&str]) -> Result<Proxy> {
    let mut args = vec![
        "proxy",
        "--resources",
        resources.to_str().context("path")?,
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

/// A Service named `name` (port 8080, HTTP) over plain workloads at `ports`, plus `policy`.
fn plain_service(name: &str, ports: &[u16], policy: &str) -> Resources {
    let mut r = Resources::new().service(name, &[ServicePort::new("http", 8080, Some("http"))]).raw(policy);
    for (i, port) in ports.iter().enumerate() {
        r = r.workload(&WorkloadSpec::plain(&format!("{name}-{i}"), name, "http", *port));
    }
    r
}

/// `GET /` with `Host: <host>` and extra headers on a new connection.
async fn get(addr: SocketAddr, host: &str, headers: &[(&str, &str)]) -> Result<Collected> {
    client::get(addr, host, "/", headers, REQUEST_TIMEOUT).await
}

fn served_by(r: &Collected) -> String {
    r.header("x-served-by").unwrap_or("").to_string()
}

/// An HTTP/1 app answering every request 503 until made healthy, then 200; every answer
/// carries `x-served-by: <name>`.
/// A server answering `failure` (503 unless told otherwise) until `healthy` is set, then 200.
struct Flaky {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Flaky {
    async fn start(name: &'static str) -> Result<Flaky> {
        Self::failing_with(name, StatusCode::SERVICE_UNAVAILABLE).await
    }

    async fn failing_with(name: &'static str, failure: StatusCode) -> Result<Flaky> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let healthy = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (h, n) = (healthy.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (h, n) = (h.clone(), n.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        n.fetch_add(1, Ordering::SeqCst);
                        let status = if h.load(Ordering::SeqCst) { StatusCode::OK } else { failure };
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"flaky\n")));
                        *resp.status_mut() = status;
                        resp.headers_mut().insert("x-served-by", plexus_testkit::http::HeaderValue::from_static(name));
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let _ = plexus_testkit::hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Flaky { addr, healthy, requests, task })
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Flaky {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of the one sample of `metric` whose labels contain `labels`, or 0.
async fn metric(proxy: &Proxy, metric: &str, labels: &str) -> Result<f64> {
    let text = proxy.admin_get("/metrics").await?.text();
    Ok(metric_sum(&text, metric, &[labels]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_at_the_destination_sidecar() -> Result<()> {
    let _serial = serial().await;
    let app = HttpEcho::start("limited-app").await?;
    let dir = TempDir::new("ratelimit")?;
    let res = dir.join("mesh.yaml");
    let policy = "apiVersion: plexus.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: limited-rl, namespace: default}\nspec:\n  targetRef: {kind: Service, name: limited}\n  requestsPerSecond: 50\n  burst: 50\n";
    let base = Resources::new().service("limited", &[ServicePort::new("http", 8080, Some("http"))]).raw(policy);
    base.write(&res)?;
    // The destination sidecar first; once its inbound port is known, the meshed workload
    // behind it.
    let app_port = app.port().to_string();
    let server =
        sidecar("server-sidecar", &res, &["--app-port", &app_port, "--service", "limited", "--workload", "limited-1"])
            .await?;
    base.workload(&WorkloadSpec::meshed("limited-1", "limited", "http", server.inbound().port(), app.port()))
        .write(&res)?;
    let client = sidecar("client-sidecar", &res, &["--upstream", "limited:8080=0"]).await?;
    let target = client.upstream("limited.default:8080")?;
    let endpoint = format!("\"127.0.0.1:{}\"", server.inbound().port());
    eventually(Duration::from_secs(10), || async {
        let config = server.admin_get("/config").await?.text();
        ensure!(config.contains(&endpoint) && config.contains("default/limited-rl"), "not reloaded yet:\n{config}");
        Ok(())
    })
    .await?;

    // 200 requests per second for 5 s, each sent on time on its own connection.
    let offered = 1000u32;
    let pace = Duration::from_millis(5);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..offered {
        tokio::time::sleep_until(start + pace * i).await;
        tasks.push(tokio::spawn(async move {
            let sent = start.elapsed();
            (sent, get(target, "limited:8080", &[]).await)
        }));
    }
    let mut accepted = 0u32;
    let mut limited = 0u32;
    let mut first_sent = Duration::MAX;
    let mut last_sent = Duration::ZERO;
    let mut per_second: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
    for t in tasks {
        let (sent, r) = t.await?;
        let r = r.context("a request through the sidecars failed")?;
        first_sent = first_sent.min(sent);
        last_sent = last_sent.max(sent);
        let second = per_second.entry(sent.as_secs()).or_default();
        match r.status.as_u16() {
            200 => {
                accepted += 1;
                second.0 += 1;
                ensure!(served_by(&r) == "limited-app", "200 not from the app: {:?}", r.headers);
            }
            429 => {
                limited += 1;
                second.1 += 1;
                ensure!(
                    r.header("x-plexus-error") == Some("rate limited by default/limited-rl"),
                    "429 without the policy in x-plexus-error: {:?}",
                    r.headers
                );
                let retry_after: u64 =
                    r.header("retry-after").context("429 without retry-after")?.parse().context("retry-after")?;
                ensure!(retry_after >= 1, "retry-after {retry_after}");
            }
            other => bail!("unexpected status {other}: {:?} {}", r.headers, r.text()),
        }
    }
    let window = (last_sent - first_sent).as_secs_f64();
    let rate = f64::from(accepted.saturating_sub(50)) / window;
    println!(
        "accepted {accepted}, limited {limited} over {window:.2} s: {rate:.1}/s after the burst; per second (ok, 429): {per_second:?}"
    );
    ensure!(accepted + limited == offered);
    ensure!(
        (45.0..=55.0).contains(&rate),
        "after the burst of 50, {rate:.1} requests/s were let through (expected 50 ±10%); per second (ok, 429): {per_second:?}\n{}",
        server.stderr_tail(3000)
    );
    let counted =
        metric(&server, "plexus_rate_limited_total", "destination_service=\"limited\",policy=\"default/limited-rl\"")
            .await?;
    ensure!(counted == f64::from(limited), "plexus_rate_limited_total = {counted}, {limited} requests got 429");

    // gRPC clients get RESOURCE_EXHAUSTED: 100 at once, more than the bucket holds.
    let grpc: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(async move {
                let req = Request::post("http://limited:8080/plexus.test.Echo/Call")
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(Empty::<Bytes>::new())?;
                client::send_collect(target, client::Version::Http2, req, REQUEST_TIMEOUT).await
            })
        })
        .collect();
    let mut exhausted = 0;
    for t in grpc {
        let r = t.await??;
        ensure!(r.status == 200, "a gRPC request got HTTP {}: {:?}", r.status, r.headers);
        let status = r.header("grpc-status").or_else(|| r.trailers.as_ref()?.get("grpc-status")?.to_str().ok());
        if status == Some("8") {
            exhausted += 1;
            ensure!(r.header("x-plexus-error") == Some("rate limited by default/limited-rl"), "{:?}", r.headers);
        }
    }
    ensure!(exhausted >= 40, "only {exhausted} of 100 simultaneous gRPC requests got grpc-status 8");
    Ok(())
}

/// With a control plane, a sidecar only learns of the Services it asks for: it must ask for
/// its own (`--service`) to learn the rate limit it enforces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_fed_by_the_control_plane_enforces_its_own_rate_limit() -> Result<()> {
    let _serial = serial().await;
    let app = HttpEcho::start("cp-app").await?;
    let dir = TempDir::new("cp-ratelimit")?;
    let data = dir.join("data");
    let http = format!("127.0.0.1:{}", free_port());
    let mut cmd = command(PLEXUS);
    cmd.args(["control", "--http-addr", &http, "--grpc-addr", "127.0.0.1:0", "--data-dir"]).arg(&data);
    let control = Background::start("control", cmd, "{", Duration::from_secs(30)).await?;
    let ready: serde_json::Value = serde_json::from_str(control.ready_line()).context("control ready line")?;
    let grpc = format!("http://{}", ready["grpc"].as_str().context("no grpc address in the ready line")?);
    let file = dir.join("mesh.yaml");
    let policy = "apiVersion: plexus.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: cp-rl, namespace: default}\nspec:\n  targetRef: {kind: Service, name: cplimited}\n  requestsPerSecond: 1\n  burst: 5\n";
    plain_service("cplimited", &[app.port()], policy).write(&file)?;
    let mut apply = command(PLEXUS);
    apply
        .arg("apply")
        .arg("-f")
        .arg(&file)
        .env("PLEXUS_SERVER", format!("http://{http}"))
        .env("PLEXUS_DATA_DIR", &data);
    run_ok(&mut apply, Duration::from_secs(30)).await?;

    let app_port = app.port().to_string();
    let server = format!("http://{http}");
    let token = plexus_testkit::workload_token(PLEXUS, &server, &data, "default", "cplimited").await?;
    let args = [
        "proxy",
        "--control-plane",
        &grpc,
        "--token",
        &token,
        "--outbound-port",
        "0",
        "--inbound-port",
        "0",
        "--admin-port",
        "0",
        "--app-port",
        &app_port,
        "--service",
        "cplimited",
        "--workload",
        "cplimited-0",
    ];
    let server = Proxy::start_named("server-sidecar", PLEXUS, args).await?;
    eventually(Duration::from_secs(10), || async {
        let config = server.admin_get("/config").await?.text();
        ensure!(config.contains("default/cp-rl"), "the own Service's policy has not arrived:\n{config}");
        Ok(())
    })
    .await?;
    // Ten requests straight to the inbound listener within a second or so: the burst of 5
    // (maybe one more token), then 429.
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..10 {
        let r = get(server.inbound(), "cplimited:8080", &[]).await?;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => {
                ensure!(r.header("x-plexus-error") == Some("rate limited by default/cp-rl"), "{:?}", r.headers);
                limited += 1;
            }
            other => bail!("unexpected status {other}: {:?}", r.headers),
        }
    }
    ensure!((5..=6).contains(&ok) && ok + limited == 10, "{ok} let through, {limited} limited (burst 5, 1/s)");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_open_the_circuit() -> Result<()> {
    let slow = HttpEcho::start("slow").await?;
    slow.set_delay(Duration::from_millis(500));
    let dir = TempDir::new("conn-limits")?;
    let res = dir.join("mesh.yaml");
    let policy = "apiVersion: plexus.dev/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: slow-limits, namespace: default}\nspec:\n  targetRef: {kind: Service, name: slow}\n  connectionLimits: {maxConnections: 2, maxPendingRequests: 0}\n";
    plain_service("slow", &[slow.port()], policy).write(&res)?;
    let proxy = sidecar("client-sidecar", &res, &["--upstream", "slow:8080=0"]).await?;
    let target = proxy.upstream("slow.default:8080")?;

    let tasks: Vec<_> = (0..10).map(|_| tokio::spawn(async move { get(target, "slow:8080", &[]).await })).collect();
    let mut ok = 0;
    let mut open = 0;
    for t in tasks {
        let r = t.await??;
        match r.status.as_u16() {
            200 => ok += 1,
            503 => {
                let reason = r.header("x-plexus-error").unwrap_or("");
                ensure!(reason.starts_with("circuit open: "), "503 without `circuit open`: {:?}", r.headers);
                open += 1;
            }
            other => bail!("unexpected status {other}: {:?}", r.headers),
        }
    }
    ensure!(
        (1..=2).contains(&ok) && ok + open == 10,
        "{ok} of 10 concurrent requests succeeded and {open} were refused, with maxConnections 2 and \
         maxPendingRequests 0 against a 500 ms upstream\n{}",
        proxy.stderr_tail(3000)
    );
    ensure!(slow.requests() <= 2, "the upstream saw {} requests", slow.requests());
    // Slots are given back: one at a time, every request gets through.
    for _ in 0..3 {
        let r = get(target, "slow:8080", &[]).await?;
        ensure!(r.status == 200, "after the burst: {} {:?}", r.status, r.headers);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_and_readmits() -> Result<()> {
    let _serial = serial().await;
    let good = HttpEcho::start("good").await?;
    let bad = Flaky::start("bad").await?;
    let dir = TempDir::new("outlier")?;
    let res = dir.join("mesh.yaml");
    let policy = "apiVersion: plexus.dev/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: flaky-outliers, namespace: default}\nspec:\n  targetRef: {kind: Service, name: flaky}\n  outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 2s}\n  loadBalancer: {algorithm: roundRobin}\n";
    plain_service("flaky", &[good.port(), bad.addr.port()], policy).write(&res)?;
    let proxy = sidecar("client-sidecar", &res, &["--upstream", "flaky:8080=0"]).await?;
    let target = proxy.upstream("flaky.default:8080")?;

    // Round robin (EWMA would keep away from whichever endpoint answered slower first, for
    // seconds): the bad endpoint fails every other request until it is ejected.
    let mut sent = 0;
    while bad.requests() < 3 {
        ensure!(sent < 20, "the failing endpoint got {} of {sent} requests", bad.requests());
        let r = get(target, "flaky:8080", &[]).await?;
        sent += 1;
        match served_by(&r).as_str() {
            "bad" => ensure!(r.status == 503, "{}", r.status),
            _ => ensure!(r.status == 200, "{}", r.status),
        }
    }
    let ejected_at = Instant::now();
    let ejected =
        metric(&proxy, "plexus_balancer_endpoints", "destination_service=\"flaky\",state=\"ejected\"").await?;
    ensure!(ejected == 1.0, "plexus_balancer_endpoints{{state=\"ejected\"}} = {ejected} after 3 failures");
    let ejections = metric(&proxy, "plexus_outlier_ejections_total", "destination_service=\"flaky\"").await?;
    ensure!(ejections == 1.0, "plexus_outlier_ejections_total = {ejections}");
    for _ in 0..20 {
        let r = get(target, "flaky:8080", &[]).await?;
        ensure!(r.status == 200 && served_by(&r) == "good", "while ejected: {} from {:?}", r.status, served_by(&r));
    }
    let elapsed = ejected_at.elapsed();
    ensure!(bad.requests() == 3, "the ejected endpoint got traffic ({} requests)", bad.requests());
    ensure!(elapsed < Duration::from_secs(2), "the checks took {elapsed:?}, past the ejection time: inconclusive");

    // Healthy again: after the 2 s ejection it gets traffic, and answers it.
    bad.healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(ejected_at.elapsed())).await;
    let back = eventually(Duration::from_secs(10), || async {
        let r = get(target, "flaky:8080", &[]).await?;
        ensure!(r.status == 200, "status {}", r.status);
        ensure!(served_by(&r) == "bad", "served by {}", served_by(&r));
        Ok(ejected_at.elapsed())
    })
    .await?;
    println!("the endpoint was back after {back:?}");
    let ejected =
        metric(&proxy, "plexus_balancer_endpoints", "destination_service=\"flaky\",state=\"ejected\"").await?;
    ensure!(ejected == 0.0, "still {ejected} ejected");
    Ok(())
}

/// Issue 17 item 3: an endpoint answering 500 is ejected after `consecutive5xx` answers in a
/// row; without it (the default) only gateway failures count, so it keeps its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_ejects_an_endpoint_answering_500_and_is_off_by_default() -> Result<()> {
    let _serial = serial().await;
    let good = HttpEcho::start("good").await?;
    // One failing server per Service: an endpoint's counts are kept by address.
    let bad = Flaky::failing_with("bad", StatusCode::INTERNAL_SERVER_ERROR).await?;
    let bad_uncounted = Flaky::failing_with("bad", StatusCode::INTERNAL_SERVER_ERROR).await?;
    let dir = TempDir::new("outlier-5xx")?;
    let res = dir.join("mesh.yaml");
    let policy = |name: &str, detection: &str| {
        format!(
            "apiVersion: plexus.dev/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  targetRef: {{kind: Service, name: {name}}}\n  outlierDetection: {{{detection}baseEjectionTime: 30s}}\n  loadBalancer: {{algorithm: roundRobin}}\n"
        )
    };
    let mut mesh = plain_service("counted", &[good.port(), bad.addr.port()], &policy("counted", "consecutive5xx: 3, "));
    let uncounted_ports = [good.port(), bad_uncounted.addr.port()];
    mesh = mesh
        .raw(&plain_service("uncounted", &uncounted_ports, &policy("uncounted", "consecutiveFailures: 3, ")).to_yaml());
    mesh.write(&res)?;
    let proxy =
        sidecar("client-sidecar", &res, &["--upstream", "counted:8080=0", "--upstream", "uncounted:8080=0"]).await?;

    // Default counting (gateway failures only): 20 requests, the 500s keep coming, nothing ejected.
    let uncounted = proxy.upstream("uncounted.default:8080")?;
    let mut statuses = BTreeMap::<u16, u32>::new();
    for _ in 0..20 {
        *statuses.entry(get(uncounted, "uncounted:8080", &[]).await?.status.as_u16()).or_default() += 1;
    }
    ensure!(statuses.get(&500) == Some(&10) && statuses.get(&200) == Some(&10), "without consecutive5xx: {statuses:?}");
    let ejected = |service: &'static str| {
        let p = &proxy;
        async move {
            metric(p, "plexus_balancer_endpoints", &format!("destination_service=\"{service}\",state=\"ejected\""))
                .await
        }
    };
    ensure!(ejected("uncounted").await? == 0.0, "a 500 is no gateway failure");

    // consecutive5xx: 3 — the third 500 in a row ejects it; then only the good one answers.
    let counted = proxy.upstream("counted.default:8080")?;
    let before = bad.requests();
    let mut sent = 0;
    while bad.requests() - before < 3 {
        ensure!(sent < 20, "the failing endpoint got {} of {sent} requests", bad.requests() - before);
        get(counted, "counted:8080", &[]).await?;
        sent += 1;
    }
    ensure!(ejected("counted").await? == 1.0, "ejected after three 500s in a row");
    for _ in 0..10 {
        let r = get(counted, "counted:8080", &[]).await?;
        ensure!(r.status == 200 && served_by(&r) == "good", "while ejected: {} from {}", r.status, served_by(&r));
    }
    ensure!(bad.requests() - before == 3, "the ejected endpoint got traffic");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_keeps_a_user_on_one_endpoint() -> Result<()> {
    let apps =
        [HttpEcho::start("sticky-a").await?, HttpEcho::start("sticky-b").await?, HttpEcho::start("sticky-c").await?];
    let dir = TempDir::new("ringhash")?;
    let res = dir.join("mesh.yaml");
    let policy = "apiVersion: plexus.dev/v1alpha1\nkind: ResiliencePolicy\nmetadata: {name: sticky-lb, namespace: default}\nspec:\n  targetRef: {kind: Service, name: sticky}\n  loadBalancer: {algorithm: ringHash, hashOn: {header: x-user}}\n";
    let ports: Vec<u16> = apps.iter().map(HttpEcho::port).collect();
    plain_service("sticky", &ports, policy).write(&res)?;
    let proxy = sidecar("client-sidecar", &res, &["--upstream", "sticky:8080=0"]).await?;
    let target = proxy.upstream("sticky.default:8080")?;

    let mut alice = BTreeMap::<String, u32>::new();
    for _ in 0..100 {
        let r = get(target, "sticky:8080", &[("x-user", "alice")]).await?;
        ensure!(r.status == 200, "{}", r.status);
        *alice.entry(served_by(&r)).or_default() += 1;
    }
    ensure!(alice.len() == 1, "alice's 100 requests reached several endpoints: {alice:?}");

    let mut users = HashSet::new();
    for u in 0..30 {
        let user = format!("user-{u}");
        let first = served_by(&get(target, "sticky:8080", &[("x-user", &user)]).await?);
        let again = served_by(&get(target, "sticky:8080", &[("x-user", &user)]).await?);
        ensure!(first == again, "{user} went to {first} then {again}");
        users.insert(first);
    }
    ensure!(users.len() > 1, "30 users all reached {users:?}");
    Ok(())
}
