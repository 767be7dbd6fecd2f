//! Data-plane behaviour end to end through real `plexus proxy` processes: latency-aware load
//! balancing, connection multiplexing between sidecars, reloads under load, limits and
//! malformed input, bounded memory on huge streamed bodies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use plexus_testkit::bytes::Bytes;
use plexus_testkit::http::Request;
use plexus_testkit::http_body_util::{BodyExt as _, Empty};
use plexus_testkit::hyper::client::conn::http1;
use plexus_testkit::hyper_util::rt::TokioIo;
use plexus_testkit::{HttpEcho, Proxy, Resources, ServicePort, TcpEcho, TempDir, WorkloadSpec, require_tool, serial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");
/// The data plane alone: the same proxy and command line as `plexus proxy`.
const PLEXUS_PROXY: &str = env!("CARGO_BIN_EXE_plexus-proxy");

/// Service `app` (HTTP on 8080) with one Workload, `app-1`, at `port` on this machine.
fn one_app(port: u16) -> Resources {
    Resources::new()
        .service("app", &[ServicePort::new("http", 8080, Some("http"))])
        .workload(&WorkloadSpec::plain("app-1", "app", "http", port))
}

async fn sidecar(name: &str, resources: &Path, extra: &[&str]) -> Result<Proxy> {
    start_proxy(name, PLEXUS, &["proxy"], resources, extra).await
}

/// `program command... --resources FILE` on free ports, with `extra` arguments.
async fn start_proxy(name: &str, program: &str, command: &[&str], resources: &Path, extra: &[&str]) -> Result<Proxy> {
    let mut args = command.to_vec();
    args.extend([
        "--resources",
        resources.to_str().context("path")?,
        "--outbound-port",
        "0",
        "--inbound-port",
        "0",
        "--admin-port",
        "0",
    ]);
    args.extend_from_slice(extra);
    Proxy::start_named(name, program, args).await
}

/// A keep-alive HTTP/1.1 connection sending GETs one after another.
struct KeepAlive {
    sender: http1::SendRequest<Empty<Bytes>>,
    host: String,
}

impl KeepAlive {
    async fn open(addr: SocketAddr, host: &str) -> Result<KeepAlive> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(KeepAlive { sender, host: host.into() })
    }

    /// Returns status and `x-served-by`.
    async fn get(&mut self, path: &str) -> Result<(u16, String)> {
        self.sender.ready().await?;
        let req = Request::get(path).header("host", &self.host).body(Empty::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.sender.send_request(req)).await??;
        let status = resp.status().as_u16();
        let by = resp.headers().get("x-served-by").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        resp.into_body().collect().await?;
        Ok((status, by))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ewma_prefers_the_fast_endpoint_and_recovers_the_slow_one() -> Result<()> {
    let _serial = serial().await;
    let fast = HttpEcho::start("fast").await?;
    let slow = HttpEcho::start("slow").await?;
    fast.set_delay(Duration::from_millis(1));
    slow.set_delay(Duration::from_millis(50));
    let dir = TempDir::new("ewma")?;
    let res = dir.join("mesh.yaml");
    Resources::new()
        .service("api", &[ServicePort::new("http", 8080, Some("http"))])
        .workload(&WorkloadSpec::plain("api-fast", "api", "http", fast.port()))
        .workload(&WorkloadSpec::plain("api-slow", "api", "http", slow.port()))
        .write(&res)?;
    let proxy = sidecar("client", &res, &["--upstream", "api:8080=0"]).await?;
    let addr = proxy.upstream("api.default:8080")?;

    // Phase 1: 1,000 requests from 8 concurrent clients.
    let counts = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (counts, next) = (counts.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut c = KeepAlive::open(addr, "api:8080").await?;
            while next.fetch_add(1, Ordering::SeqCst) < 1000 {
                let (status, by) = c.get("/").await?;
                anyhow::ensure!(status == 200, "status {status}");
                *counts.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.entry(by).or_default() += 1;
            }
            anyhow::Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    let fast_share = {
        let c = counts.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let total: u64 = c.values().sum();
        assert_eq!(total, 1000);
        c.get("fast").copied().unwrap_or(0) as f64 / total as f64
    };
    assert!(fast_share >= 0.90, "fast endpoint got {:.1}% of 1,000 requests (want ≥ 90%)", fast_share * 100.0);

    // Phase 2: the slow endpoint speeds up; within 10 s its share over a 1 s window reaches 30%.
    slow.set_delay(Duration::from_millis(1));
    let sped_up = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let window: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, window) = (stop.clone(), window.clone());
        workers.push(tokio::spawn(async move {
            let mut c = KeepAlive::open(addr, "api:8080").await?;
            while !stop.load(Ordering::SeqCst) {
                let (_, by) = c.get("/").await?;
                window.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push((Instant::now(), by == "slow"));
            }
            anyhow::Ok(())
        }));
    }
    let mut best = 0.0f64;
    let mut recovered_after = None;
    while sped_up.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let w = window.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let recent: Vec<bool> =
            w.iter().filter(|(t, _)| t.elapsed() < Duration::from_secs(1)).map(|(_, s)| *s).collect();
        if recent.len() >= 50 {
            let share = recent.iter().filter(|s| **s).count() as f64 / recent.len() as f64;
            best = best.max(share);
            if share >= 0.30 {
                recovered_after = Some(sped_up.elapsed());
                break;
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await??;
    }
    assert!(
        recovered_after.is_some(),
        "slow endpoint's share stayed below 30% for 10 s after it sped up (best 1 s window: {:.1}%)",
        best * 100.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_http1_clients_share_one_connection_between_sidecars() -> Result<()> {
    if !require_tool("ss") {
        return Ok(());
    }
    let app = HttpEcho::start("app").await?;
    let dir = TempDir::new("mux")?;
    let server_res = dir.join("server.yaml");
    Resources::new().service("app", &[ServicePort::new("http", 8080, Some("http"))]).write(&server_res)?;
    let server = sidecar("server", &server_res, &["--app-port", &app.port().to_string()]).await?;
    let client_res = dir.join("client.yaml");
    Resources::new()
        .service("app", &[ServicePort::new("http", 8080, Some("http"))])
        .workload(&WorkloadSpec::meshed("app-1", "app", "http", server.inbound().port(), app.port()))
        .write(&client_res)?;
    let client = sidecar("client", &client_res, &[]).await?;
    let outbound = client.outbound();

    let mut conns = Vec::new();
    for _ in 0..100 {
        conns.push(KeepAlive::open(outbound, "app:8080").await?);
    }
    let start = Arc::new(tokio::sync::Barrier::new(101));
    let mut tasks = Vec::new();
    for mut c in conns {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            for _ in 0..5 {
                let (status, by) = c.get("/").await?;
                anyhow::ensure!(status == 200 && by == "app", "status {status} from {by:?}");
            }
            anyhow::Ok(c)
        }));
    }
    start.wait().await;
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await??);
    }
    // All 100 client connections are still open; count connections into the server sidecar.
    let port = server.inbound().port();
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "established", &format!("( dport = :{port} )")])
        .output()?;
    let between = String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count();
    assert!(
        (1..=2).contains(&between),
        "{between} TCP connections between the sidecars for 100 client connections:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(app.requests() >= 500, "the app saw {} requests", app.requests());
    drop(held);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_keep_open_streams_and_lose_no_requests() -> Result<()> {
    let app = HttpEcho::start("app").await?;
    let echo = TcpEcho::start().await?;
    let ws = start_upgrade_echo().await?;
    let dir = TempDir::new("reload")?;
    let res = dir.join("mesh.yaml");
    let write = |generation: usize| {
        Resources::new()
            .service("app", &[ServicePort::new("http", 8080, Some("http"))])
            .service("tcp", &[ServicePort::new("tcp", 9000, Some("tcp"))])
            .workload(&WorkloadSpec::plain("app-1", "app", "http", app.port()))
            .workload(&WorkloadSpec::plain("tcp-1", "tcp", "tcp", echo.addr().port()))
            .service("ws", &[ServicePort::new("http", 8081, Some("http"))])
            .workload(&WorkloadSpec::plain("ws-1", "ws", "http", ws.port()))
            .raw(&format!("apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {{name: filler-{generation}}}\nspec: {{ports: [{{port: 80}}]}}\n"))
            .write(&res)
    };
    write(0)?;
    let proxy =
        sidecar("proxy", &res, &["--upstream", "app:8080=0", "--upstream", "tcp:9000=0", "--upstream", "ws:8081=0"])
            .await?;
    let http_addr = proxy.upstream("app.default:8080")?;
    let tcp_addr = proxy.upstream("tcp.default:9000")?;

    // A long-lived TCP stream and an upgraded (WebSocket-style) connection, open across reloads.
    let mut stream = TcpStream::connect(tcp_addr).await?;
    let mut upgraded = open_upgrade(proxy.upstream("ws.default:8081")?).await?;

    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (failures, done) = (failures.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut c = KeepAlive::open(http_addr, "app:8080").await?;
            while done.fetch_add(1, Ordering::SeqCst) < 10_000 {
                match c.get("/").await {
                    Ok((200, _)) => {}
                    Ok((status, _)) => {
                        failures.fetch_add(1, Ordering::SeqCst);
                        eprintln!("status {status} during reloads");
                    }
                    Err(e) => {
                        failures.fetch_add(1, Ordering::SeqCst);
                        eprintln!("error during reloads: {e:#}");
                        c = KeepAlive::open(http_addr, "app:8080").await?;
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    let mut generation = 0;
    for i in 1..=20 {
        write(i)?;
        generation = i;
        // Wait until the proxy has applied this version (its config names the new filler).
        plexus_testkit::eventually(Duration::from_secs(5), || {
            let p = &proxy;
            async move {
                let c = p.admin_get("/config").await?;
                anyhow::ensure!(c.text().contains(&format!("filler-{i}")), "not reloaded yet");
                Ok(())
            }
        })
        .await?;
        stream.write_all(format!("ping {i}\n").as_bytes()).await?;
        let mut buf = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
        assert_eq!(&buf[..n], format!("ping {i}\n").as_bytes(), "TCP stream after reload {i}");
        upgraded.write_all(format!("ws {i}\n").as_bytes()).await?;
        let n = tokio::time::timeout(Duration::from_secs(5), upgraded.read(&mut buf)).await??;
        assert_eq!(&buf[..n], format!("ws {i}\n").as_bytes(), "upgraded connection after reload {i}");
    }
    for w in workers {
        w.await??;
    }
    assert_eq!(generation, 20);
    assert_eq!(failures.load(Ordering::SeqCst), 0, "requests failed during 20 reloads");
    assert!(done.load(Ordering::SeqCst) >= 10_000);
    Ok(())
}

/// A server that accepts any HTTP/1.1 Upgrade request with `101` and then echoes raw bytes, as
/// a WebSocket server does after its handshake (the proxy carries out WebSocket upgrades only).
async fn start_upgrade_echo() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let resp = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
                if s.write_all(resp).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Opens an HTTP/1.1 Upgrade connection (through the proxy) to the upgrade echo server.
async fn open_upgrade(addr: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: ws:8081\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await??;
        anyhow::ensure!(n == 1, "connection closed during upgrade: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    Ok(s)
}

/// Sends raw bytes and returns everything the proxy answers until it closes (or 5 s).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_right_answer() -> Result<()> {
    let app = HttpEcho::start("app").await?;
    let dir = TempDir::new("malformed")?;
    let res = dir.join("mesh.yaml");
    one_app(app.port()).write(&res)?;
    let proxy = sidecar("proxy", &res, &["--header-read-timeout", "2s", "--max-header-bytes", "16384"]).await?;
    let out = proxy.outbound();

    let bad_line = raw_exchange(out, b"GET /a b c HTTP/1.1\r\nHost: app:8080\r\n\r\n").await?;
    assert!(bad_line.starts_with("HTTP/1.1 400"), "bad request line: {bad_line:?}");
    let bad_version = raw_exchange(out, b"GET / HTTP/9.7\r\nHost: app:8080\r\n\r\n").await?;
    assert!(
        bad_version.starts_with("HTTP/1.1 400") || bad_version.starts_with("HTTP/1.1 505"),
        "bad version: {bad_version:?}"
    );
    let bad_header = raw_exchange(out, b"GET / HTTP/1.1\r\nHost: app:8080\r\nBad Header: x\r\n\r\n").await?;
    assert!(bad_header.starts_with("HTTP/1.1 400"), "invalid header name: {bad_header:?}");
    let not_http = raw_exchange(out, b"\x00\x01\x02 definitely not http\r\n\r\n").await?;
    assert!(not_http.starts_with("HTTP/1.1 400"), "garbage on the explicit proxy port: {not_http:?}");
    let huge = format!("GET / HTTP/1.1\r\nHost: app:8080\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    let too_big = raw_exchange(out, huge.as_bytes()).await?;
    assert!(too_big.starts_with("HTTP/1.1 431"), "oversized headers: {too_big:?}");

    // Slowloris: a request head trickling in is cut off after the header-read timeout, and
    // other clients are served meanwhile.
    let started = Instant::now();
    let mut slow = TcpStream::connect(out).await?;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: app:8080\r\n").await?;
    let trickle = tokio::spawn(async move {
        let mut closed_after = None;
        for i in 0..60 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes()).await.is_err() {
                closed_after = Some(started.elapsed());
                break;
            }
            let mut buf = [0u8; 256];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await
                && (n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"))
            {
                closed_after = Some(started.elapsed());
                break;
            }
        }
        closed_after
    });
    let mut ok = KeepAlive::open(out, "app:8080").await?;
    assert_eq!(ok.get("/").await?.0, 200, "a well-behaved client is served during the slowloris");
    let closed_after = trickle.await?;
    let closed_after = closed_after.context("slowloris connection was never closed")?;
    assert!(closed_after < Duration::from_secs(5), "slowloris cut off after {closed_after:?} (timeout 2s)");
    // The proxy is still alive and well (a new connection: the header-read timeout also
    // closes keep-alive connections left idle that long).
    let mut again = KeepAlive::open(out, "app:8080").await?;
    assert_eq!(again.get("/").await?.0, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_upload_to_a_slow_reader_keeps_memory_bounded() -> Result<()> {
    let app = HttpEcho::start("app").await?;
    let dir = TempDir::new("bigbody")?;
    let res = dir.join("mesh.yaml");
    one_app(app.port()).write(&res)?;
    let proxy = sidecar("proxy", &res, &["--upstream", "app:8080=0"]).await?;
    let addr = proxy.upstream("app.default:8080")?;
    let rss_before = proxy.rss_bytes()?;
    const TOTAL: u64 = 1 << 30;
    let sent = Arc::new(AtomicU64::new(0));
    let body = plexus_testkit::client::PatternBody::new(TOTAL, true).with_progress(sent.clone());
    let req = Request::post("/echo").header("host", "app:8080").body(body)?;
    let resp = plexus_testkit::client::request(addr, plexus_testkit::client::Version::Http1, req).await?;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut verifier = plexus_testkit::client::PatternVerifier::new();
    let mut first_response_byte_at_sent = None;
    let mut max_rss = 0;
    let mut last_sample = Instant::now();
    let started = Instant::now();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), body.frame()).await? {
        let frame = frame?;
        if let Some(data) = frame.data_ref() {
            if first_response_byte_at_sent.is_none() {
                first_response_byte_at_sent = Some(sent.load(Ordering::SeqCst));
            }
            verifier.update(data)?;
            // A slow reader for the first 64 MiB: the proxy must apply back-pressure, not buffer.
            if verifier.verified() < 64 << 20 {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        if last_sample.elapsed() > Duration::from_millis(100) {
            max_rss = max_rss.max(proxy.rss_bytes()?);
            last_sample = Instant::now();
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(240), "1 GiB echo took too long");
    }
    assert_eq!(verifier.verified(), TOTAL, "all bytes echoed intact");
    let first = first_response_byte_at_sent.context("no response bytes")?;
    assert!(first < TOTAL / 2, "response bytes flowed before the upload ended (first after {first} bytes sent)");
    // Bounded: what the transfer adds is buffers, not the body (1 GiB); the process's own
    // size (code, runtime) is measured before.
    let added = max_rss.saturating_sub(rss_before);
    println!("proxy RSS {} KiB before, peak {} KiB during the upload", rss_before >> 10, max_rss >> 10);
    assert!(added < 16 << 20, "the upload added {} MiB to the proxy's RSS (limit 16 MiB)", added >> 20);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_made_errors_carry_status_reason_and_grpc_status() -> Result<()> {
    let dir = TempDir::new("errors")?;
    let res = dir.join("mesh.yaml");
    let dead_port = plexus_testkit::free_port();
    Resources::new()
        .service("empty", &[ServicePort::new("http", 8080, Some("http"))])
        .service("dead", &[ServicePort::new("http", 8080, Some("http"))])
        .workload(&WorkloadSpec::plain("dead-1", "dead", "http", dead_port))
        .raw("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: to-missing}\nspec:\n  parentRefs: [{name: empty}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /missing}}]\n    backendRefs: [{name: nowhere, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /zero}}]\n    backendRefs: [{name: empty, weight: 0}]\n")
        .write(&res)?;
    let proxy = sidecar("proxy", &res, &[]).await?;
    let out = proxy.outbound();
    let get = |host: &'static str, path: &'static str| async move {
        plexus_testkit::client::get(out, host, path, &[], Duration::from_secs(5)).await
    };
    let r = get("empty:8080", "/").await?;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-plexus-error"), Some("no healthy endpoint for empty.default:8080"));
    let r = get("empty:8080", "/missing/x").await?;
    assert_eq!(r.status, 500);
    assert_eq!(r.header("x-plexus-error"), Some("backend not found: nowhere.default"));
    let r = get("empty:8080", "/zero").await?;
    assert_eq!(r.status, 500);
    let r = get("dead:8080", "/").await?;
    assert_eq!(r.status, 502);
    assert!(
        r.header("x-plexus-error").is_some_and(|e| e.starts_with("connection failed")),
        "{:?}",
        r.header("x-plexus-error")
    );

    // gRPC requests get a gRPC status instead of an HTTP error status.
    if require_tool("curl") {
        let out_arg = format!("http://{out}/pkg.Svc/Method");
        let o = std::process::Command::new("curl")
            .args([
                "-s",
                "-D",
                "-",
                "-o",
                "/dev/null",
                "--http2-prior-knowledge",
                "-H",
                "content-type: application/grpc",
                "-H",
                "host: empty:8080",
                "--data-binary",
                "@/dev/null",
                &out_arg,
            ])
            .output()?;
        let head = String::from_utf8_lossy(&o.stdout).to_ascii_lowercase();
        assert!(head.starts_with("http/2 200"), "{head}");
        assert!(head.contains("grpc-status: 14"), "UNAVAILABLE expected: {head}");
        assert!(head.contains("x-plexus-error: no healthy endpoint"), "{head}");
    }

    // Each answer was counted with its response flag.
    let metrics = proxy.admin_get("/metrics").await?.text();
    for (code, flag) in [("503", "UH"), ("500", "NR"), ("502", "UF")] {
        assert!(
            metrics.lines().any(|l| l.starts_with("plexus_requests_total{direction=\"outbound\"")
                && l.contains(&format!("response_code=\"{code}\""))
                && l.contains(&format!("response_flags=\"{flag}\""))),
            "no {code}/{flag} series in:\n{metrics}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_request_exactly_and_access_log_lines_are_json() -> Result<()> {
    let app = HttpEcho::start("app").await?;
    let dir = TempDir::new("metrics")?;
    let res = dir.join("mesh.yaml");
    one_app(app.port()).write(&res)?;
    let proxy = sidecar("proxy", &res, &["--access-log", "--workload", "client-1", "--service", "client"]).await?;
    let mut c = KeepAlive::open(proxy.outbound(), "app:8080").await?;
    for _ in 0..100 {
        assert_eq!(c.get("/things?id=1").await?.0, 200);
    }
    let metrics = proxy.admin_get("/metrics").await?.text();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("plexus_requests_total{direction=\"outbound\"") && l.contains("destination_service=\"app\"")
        })
        .with_context(|| format!("no series for app in:\n{metrics}"))?;
    assert!(line.ends_with(" 100"), "exactly 100 requests: {line}");
    for label in [
        "source_workload=\"client-1\"",
        "source_service=\"client\"",
        "destination_workload=\"app-1\"",
        "destination_version=\"v1\"",
        "response_code=\"200\"",
        "request_protocol=\"http\"",
    ] {
        assert!(line.contains(label), "{label} missing: {line}");
    }
    assert!(metrics.contains("plexus_request_duration_seconds_count{direction=\"outbound\""), "histogram present");
    plexus_testkit::eventually(Duration::from_secs(5), || {
        let p = &proxy;
        async move {
            let lines = p.extra_stdout();
            anyhow::ensure!(lines.len() >= 100, "{} access log lines", lines.len());
            Ok(())
        }
    })
    .await?;
    let first: serde_json::Value = serde_json::from_str(&proxy.extra_stdout()[0])?;
    assert_eq!(first["path"], "/things");
    assert_eq!(first["status"], 200);
    assert_eq!(first["destination_service"], "app");
    assert_eq!(first["request_id"].as_str().map(str::len), Some(32), "a generated x-request-id: {first}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_keeps_the_previous_config() -> Result<()> {
    let app = HttpEcho::start("app").await?;
    let dir = TempDir::new("badreload")?;
    let res = dir.join("mesh.yaml");
    let good = one_app(app.port());
    good.write(&res)?;
    let proxy = sidecar("proxy", &res, &[]).await?;
    let before = proxy.admin_get("/config").await?.json()?["version"].clone();
    std::fs::write(&res, good.to_yaml().replace("appProtocol", "appProtocl"))?;
    plexus_testkit::eventually(Duration::from_secs(5), || {
        let p = &proxy;
        async move {
            anyhow::ensure!(p.stderr().contains("appProtocl"), "error not reported yet");
            Ok(())
        }
    })
    .await?;
    let stderr = proxy.stderr();
    assert!(
        stderr.contains("document 1") && stderr.contains("spec.ports[0].appProtocl"),
        "the error names document and field:\n{stderr}"
    );
    assert_eq!(proxy.admin_get("/config").await?.json()?["version"], before, "previous config kept");
    let r = plexus_testkit::client::get(proxy.outbound(), "app:8080", "/", &[], Duration::from_secs(5)).await?;
    assert_eq!(r.status, 200, "still routing with the previous config");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_with_an_invalid_file_exits_2_naming_file_document_and_field() -> Result<()> {
    let dir = TempDir::new("badstart")?;
    let res = dir.join("mesh.yaml");
    std::fs::write(
        &res,
        "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\napiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec: {address: not-an-ip}\n",
    )?;
    let out = std::process::Command::new(PLEXUS)
        .args(["proxy", "--resources"])
        .arg(&res)
        .args(["--admin-port", "0", "--outbound-port", "0", "--inbound-port", "0"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error: invalid resources file"), "{err}");
    assert!(
        err.contains("document 2 (Workload default/w), field spec.address: \"not-an-ip\" is not an IP address"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    Ok(())
}

/// `plexus proxy` is parsed on its own (a sidecar's start-up path): the same arguments, the
/// same answers, whether the global `--log-format` comes before or after `proxy`.
#[test]
fn the_proxy_command_line_reads_the_same_on_its_own_path() -> Result<()> {
    let dir = TempDir::new("proxyargs")?;
    let res = dir.join("mesh.yaml");
    std::fs::write(&res, "apiVersion: plexus.dev/v1alpha1\nkind: Nope\nmetadata: {name: a}\n")?;
    let run = |args: &[&str]| std::process::Command::new(PLEXUS).args(args).output();
    let unknown = run(&["proxy", "--no-such-flag"])?;
    assert_eq!(unknown.status.code(), Some(2));
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(err.contains("unexpected argument '--no-such-flag'") && err.contains("Usage: plexus proxy"), "{err}");
    let path = res.to_str().context("path")?;
    let after = run(&["proxy", "--log-format", "json", "--resources", path])?;
    let before = run(&["--log-format", "json", "proxy", "--resources", path])?;
    assert_eq!(after.status.code(), Some(2));
    assert_eq!(before.status.code(), Some(2));
    let err = String::from_utf8_lossy(&after.stderr);
    assert!(err.contains("error: invalid resources file") && err.contains("Nope"), "{err}");
    assert_eq!(after.stderr, before.stderr);
    let bad_format = run(&["proxy", "--log-format", "xml"])?;
    assert_eq!(bad_format.status.code(), Some(2));
    Ok(())
}

/// `plexus-proxy` (the sidecar binary) takes `plexus proxy`'s arguments without the `proxy`
/// word and proxies, counts and refuses bad input the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_binary_is_plexus_proxy() -> Result<()> {
    let app = HttpEcho::start("app-1").await?;
    let dir = TempDir::new("sidecarbin")?;
    let res = dir.join("mesh.yaml");
    one_app(app.port()).write(&res)?;
    let path = res.to_str().context("path")?;
    let proxy = start_proxy("sidecar-binary", PLEXUS_PROXY, &[], &res, &["--upstream", "app:8080=0"]).await?;
    let bound = proxy.upstream("app.default:8080")?;
    for addr in [bound, proxy.outbound()] {
        let r = plexus_testkit::client::get(addr, "app:8080", "/x", &[], Duration::from_secs(5)).await?;
        assert_eq!(r.status, 200, "through {addr}: {}", r.text());
        assert_eq!(r.headers.get("x-served-by").and_then(|v| v.to_str().ok()), Some("app-1"));
    }
    let metrics = proxy.admin_get("/metrics").await?.text();
    assert!(
        metrics.lines().any(|l| l.starts_with("plexus_requests_total{") && l.contains("destination_service=\"app\"")),
        "requests counted under SPEC names:\n{metrics}"
    );

    let run = |args: &[&str]| std::process::Command::new(PLEXUS_PROXY).args(args).output();
    let help = run(&["--help"])?;
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("Usage: plexus-proxy") && text.contains("--upstream"), "{text}");
    let unknown = run(&["--no-such-flag"])?;
    assert_eq!(unknown.status.code(), Some(2));
    std::fs::write(&res, "apiVersion: plexus.dev/v1alpha1\nkind: Nope\nmetadata: {name: a}\n")?;
    let own = run(&["--resources", path, "--admin-port", "0"])?;
    let full = std::process::Command::new(PLEXUS).args(["proxy", "--resources", path, "--admin-port", "0"]).output()?;
    assert_eq!(own.status.code(), Some(2));
    let err = String::from_utf8_lossy(&own.stderr);
    assert!(err.contains("error: invalid resources file") && err.contains("Nope"), "{err}");
    assert_eq!(own.stderr, full.stderr, "the same error as plexus proxy");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_and_stops_accepting() -> Result<()> {
    let app = HttpEcho::start("app").await?;
    app.set_delay(Duration::from_millis(1500));
    let dir = TempDir::new("drain")?;
    let res = dir.join("mesh.yaml");
    one_app(app.port()).write(&res)?;
    let proxy = sidecar("proxy", &res, &[]).await?;
    let out = proxy.outbound();
    let in_flight =
        tokio::spawn(
            async move { plexus_testkit::client::get(out, "app:8080", "/", &[], Duration::from_secs(10)).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = proxy.admin_post("/shutdown").await?;
    assert_eq!(r.status, 202);
    assert_eq!(proxy.admin_get("/ready").await?.status, 503, "not ready while draining");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(TcpStream::connect(out).await.is_err(), "the outbound listener stopped accepting");
    let r = in_flight.await??;
    assert_eq!(r.status, 200, "the in-flight request finished");
    let status = proxy.wait_exit(Duration::from_secs(10)).await?;
    assert!(status.success(), "exit status {status:?}");
    Ok(())
}

/// Established TCP connections to `port` on this machine (the proxy's side of them).
fn connections_to(port: u16) -> Result<usize> {
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "established", &format!("( dport = :{port} )")])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count())
}

/// Issue 17 item 7: pooled HTTP/1 and HTTP/2 connections to endpoints that left the mesh are
/// closed on the config change, while connections to endpoints that stayed are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_to_endpoints_that_left_the_mesh_are_closed() -> Result<()> {
    let _serial = serial().await;
    if !require_tool("ss") {
        return Ok(());
    }
    let (h1_gone, h1_new) = (HttpEcho::start("h1-gone").await?, HttpEcho::start("h1-new").await?);
    let (h2_gone, h2_kept) = (HttpEcho::start("h2-gone").await?, HttpEcho::start("h2-kept").await?);
    let dir = TempDir::new("pool-prune")?;
    let res = dir.join("mesh.yaml");
    let write = |h1: &HttpEcho, h2: &[&HttpEcho]| {
        let mut r = Resources::new()
            .service("h1", &[ServicePort::new("http", 8080, Some("http"))])
            .service("h2", &[ServicePort::new("http", 8081, Some("http2"))])
            .workload(&WorkloadSpec::plain(h1.name(), "h1", "http", h1.port()));
        for e in h2 {
            r = r.workload(&WorkloadSpec::plain(e.name(), "h2", "http", e.port()));
        }
        r.write(&res)
    };
    write(&h1_gone, &[&h2_gone, &h2_kept])?;
    let proxy = sidecar("proxy", &res, &[]).await?;
    let mut h1 = KeepAlive::open(proxy.outbound(), "h1:8080").await?;
    let mut h2 = KeepAlive::open(proxy.outbound(), "h2:8081").await?;
    for _ in 0..20 {
        assert_eq!(h1.get("/").await?, (200, "h1-gone".to_string()));
        assert_eq!(h2.get("/").await?.0, 200);
    }
    assert!(h2_gone.requests() > 0 && h2_kept.requests() > 0, "both HTTP/2 endpoints served");
    for e in [&h1_gone, &h2_gone, &h2_kept] {
        assert!(connections_to(e.port())? >= 1, "a pooled connection to {} before the change", e.name());
    }

    write(&h1_new, &[&h2_kept])?;
    plexus_testkit::eventually(Duration::from_secs(5), || async {
        let config = proxy.admin_get("/config").await?.text();
        anyhow::ensure!(!config.contains("h2-gone") && config.contains("h1-new"), "not reloaded yet");
        Ok(())
    })
    .await?;
    plexus_testkit::eventually(Duration::from_secs(5), || async {
        for e in [&h1_gone, &h2_gone] {
            let n = connections_to(e.port())?;
            anyhow::ensure!(n == 0, "{n} connections still open to {}, which left the mesh", e.name());
        }
        Ok(())
    })
    .await?;
    // The endpoint that stayed keeps its connection, and traffic flows to the current ones.
    assert!(connections_to(h2_kept.port())? >= 1, "the connection to the endpoint that stayed is kept");
    let kept_before = h2_kept.connections();
    for _ in 0..10 {
        assert_eq!(h1.get("/").await?, (200, "h1-new".to_string()));
        assert_eq!(h2.get("/").await?, (200, "h2-kept".to_string()));
    }
    assert_eq!(h2_kept.connections(), kept_before, "HTTP/2 to the endpoint that stayed reuses its connection");
    Ok(())
}

/// Issue 17 item 10: a TCP stream closed by the idle timeout still counts its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_bytes_are_counted_when_a_stream_ends_by_idle_timeout() -> Result<()> {
    let _serial = serial().await;
    let echo = TcpEcho::start().await?;
    let dir = TempDir::new("tcp-counts")?;
    let res = dir.join("mesh.yaml");
    Resources::new()
        .service("tcp", &[ServicePort::new("tcp", 9000, Some("tcp"))])
        .workload(&WorkloadSpec::plain("tcp-1", "tcp", "tcp", echo.port()))
        .write(&res)?;
    let proxy = sidecar("proxy", &res, &["--upstream", "tcp:9000=0", "--idle-timeout", "1s"]).await?;
    let addr = proxy.upstream("tcp.default:9000")?;
    let line = "x".repeat(999) + "\n";

    // Positive control: a stream the client closes is counted, as before.
    let mut clean = TcpStream::connect(addr).await?;
    clean.write_all(line.as_bytes()).await?;
    let mut buf = vec![0u8; line.len()];
    tokio::time::timeout(Duration::from_secs(5), clean.read_exact(&mut buf)).await??;
    clean.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), clean.read_to_end(&mut rest)).await??;
    let clean_received = (line.len() + rest.len()) as f64;
    drop(clean);
    let metric = |name: &'static str| {
        let p = &proxy;
        async move {
            let m = p.admin_get("/metrics").await?.text();
            anyhow::Ok(plexus_testkit::metric_sum(&m, name, &["destination_service=\"tcp\""]))
        }
    };
    plexus_testkit::eventually(Duration::from_secs(5), || async {
        let (sent, received) =
            (metric("plexus_tcp_sent_bytes_total").await?, metric("plexus_tcp_received_bytes_total").await?);
        anyhow::ensure!(sent == 1000.0 && received == clean_received, "sent {sent}, received {received}");
        Ok(())
    })
    .await?;

    // Streams left idle: the proxy closes them after 1 s, and their bytes are counted too.
    for n in [1usize, 3] {
        let mut idle = TcpStream::connect(addr).await?;
        for _ in 0..n {
            idle.write_all(line.as_bytes()).await?;
            tokio::time::timeout(Duration::from_secs(5), idle.read_exact(&mut buf)).await??;
        }
        let mut end = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut end)).await?;
        anyhow::ensure!(matches!(closed, Ok(0)), "the proxy closes the idle stream: {closed:?}");
    }
    plexus_testkit::eventually(Duration::from_secs(5), || async {
        let (sent, received) =
            (metric("plexus_tcp_sent_bytes_total").await?, metric("plexus_tcp_received_bytes_total").await?);
        anyhow::ensure!(
            sent == 5000.0 && received == clean_received + 4000.0,
            "sent {sent} (want 5000), received {received} (want {})",
            clean_received + 4000.0
        );
        Ok(())
    })
    .await?;
    Ok(())
}
