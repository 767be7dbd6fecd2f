//! `plexus bench` end to end: the real binary against real upstreams, checked against the
//! upstream's own counts and against other load generators (oha, h2load) on the same target.
//!
//! Timing tests hold `serial()` so they do not load the machine for each other; tolerances
//! are the issue's benchmark numbers widened as it allows for a loaded 2-core machine.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{PLEXUS, python_server, show};
use plexus_testkit::{HttpEcho, command, find_tool, require_python_module, require_tool, run, serial};
use serde_json::Value;

/// A scratch directory under cargo's per-target temp dir (not the shared /tmp, where other
/// tools on a busy machine may sweep `plexus-*` entries), removed on drop unless the test
/// failed.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        Scratch(p)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// An HTTP/1.1 upstream whose delay is precise: a thread per connection that sleeps with
/// `std::thread::sleep` (nanosleep, tens of microseconds late) before answering. HttpEcho's
/// delay runs on tokio's millisecond timer and ends 0–2 ms late, too coarse to check a
/// generator's p50 to within a millisecond.
struct PreciseUpstream {
    addr: std::net::SocketAddr,
    requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl PreciseUpstream {
    fn start(delay: Duration) -> PreciseUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let r = r.clone();
                std::thread::spawn(move || serve_precisely(conn, delay, &r));
            }
        });
        PreciseUpstream { addr, requests, stop }
    }
}

/// Answers each request on `conn` after `delay` (requests without bodies, as plexus bench
/// sends them here).
fn serve_precisely(mut conn: std::net::TcpStream, delay: Duration, requests: &AtomicU64) {
    use std::io::{Read as _, Write as _};
    let _ = conn.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            requests.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(delay);
            if conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").is_err() {
                return;
            }
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

impl Drop for PreciseUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// Runs `plexus bench ARGS` and returns its output (whatever the exit status).
async fn bench(args: &[&str]) -> Output {
    let mut cmd = command(PLEXUS);
    // No control plane answers there: results are not stored anywhere by these tests.
    cmd.arg("bench").args(args).env("PLEXUS_SERVER", "http://127.0.0.1:1");
    run(&mut cmd, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("plexus bench: {e:#}"))
}

/// Runs `plexus bench ARGS`, panicking with its output unless it succeeds.
async fn bench_ok(args: &[&str]) -> Output {
    let out = bench(args).await;
    assert!(out.status.success(), "plexus bench {} failed\n{}", args.join(" "), show(&out));
    out
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}\n{text}", path.display()))
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}\n{text}", path.display()))
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

/// The details file a result names, read back.
fn details_of(result_path: &Path, result: &Value) -> Value {
    let uri = result["detailsUri"].as_str().expect("detailsUri is a string");
    let p = result_path.with_file_name(uri);
    if p.extension().is_some_and(|e| e == "json") { read_json(&p) } else { read_yaml(&p) }
}

/// oha: on PATH, or where `cargo install` puts it.
fn oha() -> Option<PathBuf> {
    find_tool("oha").or_else(|| {
        let p = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/oha");
        find_tool(p.to_str()?)
    })
}

/// A fixed 20 ms upstream at 200 req/s for 10 s: p50 within 2 ms of 20 ms (the issue's 1 ms,
/// widened as it allows for a loaded machine), and the achieved rate within 1% — both as
/// reported and as counted by the upstream itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constant_rate_against_a_fixed_delay() {
    let _serial = serial().await;
    let echo = PreciseUpstream::start(Duration::from_millis(20));
    let dir = Scratch::new("bench-fixed");
    let out_file = dir.join("run.json");
    let url = format!("http://{}/", echo.addr);
    let out = out_file.to_str().expect("utf-8").to_string();
    let run = tokio::spawn(async move {
        bench_ok(&[&url, "--rate", "200", "--duration", "10s", "--warmup", "1s", "-c", "16", "--out", &out]).await
    });
    // The upstream's own view of the rate, over 6 s in the middle of the measured window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (t0, n0) = (std::time::Instant::now(), echo.requests.load(Ordering::SeqCst));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (t1, n1) = (std::time::Instant::now(), echo.requests.load(Ordering::SeqCst));
    let upstream_rate = (n1 - n0) as f64 / (t1 - t0).as_secs_f64();
    let output = run.await.expect("bench task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");

    let result = read_json(&out_file);
    let details = details_of(&out_file, &result);
    let p50 = num(&result["latenciesMs"]["p50"], "p50");
    let qps = num(&result["actualQPS"], "actualQPS");
    println!("p50 {p50} ms, actualQPS {qps}, upstream saw {upstream_rate:.2} req/s");
    assert!((p50 - 20.0).abs() <= 2.0, "p50 {p50} ms is not within 2 ms of the upstream's 20 ms\n{stdout}");
    assert!((qps - 200.0).abs() <= 2.0, "actualQPS {qps} is not within 1% of 200\n{stdout}");
    assert!(
        (upstream_rate - 200.0).abs() <= 4.0,
        "the upstream received {upstream_rate:.2} req/s, not 200 ± 2%\n{stdout}"
    );
    assert_eq!(details["errors"], serde_json::json!({}), "no errors expected\n{stdout}");
    assert_eq!(details["unsent"], 0, "the generator kept up\n{stdout}");
    assert_eq!(details["completed"], 2000);
    assert!(stdout.contains("latency histogram"), "{stdout}");
}

/// The upstream stalls for a second in the middle of a run at 100 req/s: every request that
/// should have been sent during the stall waited for a connection, and the corrected
/// percentiles (latency from the intended send time) show it: p99 ≥ 500 ms.
///
/// A closed-loop tool would hide it: it only sends when a connection is free, so during the
/// stall it sends nothing and records only the few requests (one per connection) that were
/// stuck — 4 of ~1000, under 1%. The same run's uncorrected latencies (from the actual send)
/// show exactly that, and a real closed-loop run (`--max-throughput`) through the same stall
/// reports a p99 of about the normal 20 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_shows_in_the_corrected_percentiles() {
    let _serial = serial().await;
    let echo = HttpEcho::start("bench-stall").await.expect("upstream");
    echo.set_delay(Duration::from_millis(20));
    let dir = Scratch::new("bench-stall");

    let stall = |echo: &HttpEcho, after: Duration| {
        let delay = echo.delay();
        async move {
            tokio::time::sleep(after).await;
            // Requests arriving in the next 60 ms take a second: every connection gets stuck.
            delay.store(1000, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(60)).await;
            delay.store(20, std::sync::atomic::Ordering::SeqCst);
        }
    };

    let open = dir.join("open.json");
    let url = format!("http://{}/", echo.addr());
    let (u, o) = (url.clone(), open.to_str().expect("utf-8").to_string());
    let run = tokio::spawn(async move {
        bench_ok(&[&u, "--rate", "100", "--duration", "10s", "--warmup", "1s", "-c", "4", "--out", &o]).await
    });
    stall(&echo, Duration::from_secs(5)).await;
    let output = run.await.expect("bench task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    let result = read_json(&open);
    let details = details_of(&open, &result);
    let p99 = num(&result["latenciesMs"]["p99"], "p99");
    let uncorrected_p99 = num(&details["serviceTimeMs"]["p99"], "serviceTimeMs.p99");
    assert!(p99 >= 500.0, "corrected p99 {p99} ms does not reflect the 1 s stall\n{stdout}");
    assert!(
        uncorrected_p99 < 100.0,
        "uncorrected p99 {uncorrected_p99} ms: expected the stall to hide there (as in a closed loop)\n{stdout}"
    );

    let closed = dir.join("closed.json");
    let c = closed.to_str().expect("utf-8").to_string();
    let run = tokio::spawn(async move {
        bench_ok(&[&url, "--max-throughput", "--duration", "5s", "--warmup", "1s", "-c", "4", "--out", &c]).await
    });
    stall(&echo, Duration::from_secs(3)).await;
    let output = run.await.expect("bench task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(stdout.contains("MAX THROUGHPUT, closed loop"), "closed loop is labelled\n{stdout}");
    let result = read_json(&closed);
    let closed_p99 = num(&result["latenciesMs"]["p99"], "p99");
    let closed_max = num(&result["latenciesMs"]["max"], "max");
    assert_eq!(result["labels"]["plexus.io/mode"], "closed-loop");
    assert!(closed_max >= 900.0, "the closed loop did go through the stall (max {closed_max} ms)\n{stdout}");
    assert!(closed_p99 < 100.0, "closed-loop p99 {closed_p99} ms: the stall is hidden there\n{stdout}");
}

/// Same target, same rate, same connections: plexus bench's p50 within 10% (or 0.2 ms) of
/// `oha --latency-correction -q RATE`'s, both measuring from the intended send time. The
/// target answers after a precise 20 ms (the debug build under test adds a few tenths of a
/// millisecond per request that the release build does not; at 20 ms that stays well
/// inside 10%).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p50_agrees_with_oha() {
    let Some(oha) = oha() else {
        // Reports (or, under CI, fails on) the missing tool.
        require_tool("oha");
        return;
    };
    let _serial = serial().await;
    let upstream = PreciseUpstream::start(Duration::from_millis(20));
    let url = format!("http://{}/", upstream.addr);
    let dir = Scratch::new("bench-oha");
    let out_file = dir.join("run.json");

    let mut cmd = command(&oha);
    cmd.args(["-z", "6s", "-q", "200", "--latency-correction", "-c", "8", "--no-tui", "--output-format", "json", &url]);
    let o = run(&mut cmd, Duration::from_secs(60)).await.expect("oha");
    assert!(o.status.success(), "oha failed\n{}", show(&o));
    let oha_json: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("oha json: {e}\n{}", show(&o)));
    let oha_p50 = num(&oha_json["latencyPercentiles"]["p50"], "oha p50") * 1000.0;

    bench_ok(&[
        &url,
        "--rate",
        "200",
        "--duration",
        "5s",
        "--warmup",
        "1s",
        "-c",
        "8",
        "--out",
        out_file.to_str().expect("utf-8"),
    ])
    .await;
    let ours = num(&read_json(&out_file)["latenciesMs"]["p50"], "p50");
    let diff = (ours - oha_p50).abs();
    println!("p50: plexus bench {ours:.3} ms, oha {oha_p50:.3} ms (difference {diff:.3} ms)");
    assert!(
        diff <= (0.10 * oha_p50).max(0.2),
        "p50 {ours:.3} ms differs from oha's {oha_p50:.3} ms by more than 10% (and 0.2 ms)"
    );
}

/// Max throughput, closed loop, against h2load on the same target, within 5%.
///
/// The fair pairing: both HTTP/1.1 keep-alive over the same 20 connections with one request
/// in flight on each (h2load `--h1 -c 20 -m 1`, plexus bench `--max-throughput -c 20`), one
/// generator thread each (h2load's default `-t 1`), 1 s of warm-up and 5 s measured. The
/// target answers after a precise 50 ms, so its capacity with 20 connections is known
/// (≈400 req/s) and does not depend on how much CPU the generator leaves it: the test
/// binary is an unoptimized debug build (about 20 times the CPU per request of the release
/// build), and against a CPU-bound target it would measure that rather than the closed loop. The CPU-bound comparison, with the
/// release build, is in docs/PERFORMANCE.md ("Load generator"). Runs alternate (h2load,
/// plexus, ...) and the best of each is compared: on a shared machine, noise only lowers a
/// throughput.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_throughput_agrees_with_h2load() {
    if !require_tool("h2load") {
        return;
    }
    let _serial = serial().await;
    let upstream = PreciseUpstream::start(Duration::from_millis(50));
    let url = format!("http://{}/", upstream.addr);
    let dir = Scratch::new("bench-h2load");
    let (mut theirs, mut ours) = (Vec::new(), Vec::new());
    for round in 0..2 {
        let mut cmd = command("h2load");
        cmd.args(["--h1", "-c", "20", "-m", "1", "-t", "1", "--warm-up-time", "1", "-D", "5", &url]);
        let o = run(&mut cmd, Duration::from_secs(60)).await.expect("h2load");
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "h2load failed\n{}", show(&o));
        // "finished in 5.00s, 12345.67 req/s, 1.23MB/s"
        let rate = text
            .lines()
            .find_map(|l| l.strip_prefix("finished in "))
            .and_then(|l| l.split(", ").nth(1))
            .and_then(|r| r.strip_suffix(" req/s"))
            .and_then(|r| r.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no rate in h2load's output\n{text}"));
        theirs.push(rate);

        let out_file = dir.join(&format!("max-{round}.json"));
        bench_ok(&[
            &url,
            "--max-throughput",
            "-c",
            "20",
            "--duration",
            "5s",
            "--warmup",
            "1s",
            "--out",
            out_file.to_str().expect("utf-8"),
        ])
        .await;
        ours.push(num(&read_json(&out_file)["actualQPS"], "actualQPS"));
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (h, p) = (best(&theirs), best(&ours));
    println!("max throughput: h2load {theirs:?} (best {h:.0}), plexus bench {ours:?} (best {p:.0}) req/s");
    assert!((p - h).abs() <= 0.05 * h, "plexus bench {p:.0} req/s is not within 5% of h2load's {h:.0} req/s");
}

/// The SMP result: exactly the field names of SPEC §8 with the right types, in JSON and
/// YAML; the details file with the full histogram and errors by kind; compare of a run with
/// itself shows no difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smp_results_in_json_and_yaml() {
    let _serial = serial().await;
    let echo = HttpEcho::start("bench-smp").await.expect("upstream");
    let dir = Scratch::new("bench-smp");
    // A quarter of the requests fail with 503, so errors by kind have something to show.
    let ok = format!("http://{}/", echo.addr());
    let json_path = dir.join("result.json");
    let yaml_path = dir.join("result.yaml");
    bench_ok(&[
        &ok,
        "-r",
        "50",
        "-d",
        "2s",
        "--warmup",
        "0",
        "-c",
        "2",
        "--label",
        "mtls=off",
        "--out",
        json_path.to_str().expect("utf-8"),
    ])
    .await;
    let failing = format!("http://{}/status/503", echo.addr());
    bench_ok(&[
        &failing,
        "-r",
        "50",
        "-d",
        "2s",
        "--warmup",
        "0",
        "-c",
        "2",
        "--out",
        yaml_path.to_str().expect("utf-8"),
    ])
    .await;

    for (path, doc) in [(&json_path, read_json(&json_path)), (&yaml_path, read_yaml(&yaml_path))] {
        let obj = doc.as_object().unwrap_or_else(|| panic!("{} is not an object", path.display()));
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["actualQPS", "detailsUri", "endTime", "id", "labels", "latenciesMs", "smpVersion", "startTime"],
            "{}",
            path.display()
        );
        assert!(doc["smpVersion"].is_string() && doc["id"].is_string() && doc["detailsUri"].is_string());
        assert!(doc["labels"].as_object().expect("labels map").values().all(Value::is_string), "labels are strings");
        let lat = doc["latenciesMs"].as_object().expect("latenciesMs object");
        let mut lkeys: Vec<&str> = lat.keys().map(String::as_str).collect();
        lkeys.sort_unstable();
        assert_eq!(lkeys, ["average", "max", "min", "p50", "p90", "p99"]);
        assert!(lat.values().all(Value::is_number), "latencies are numbers: {lat:?}");
        let (min, p50, max) = (num(&lat["min"], "min"), num(&lat["p50"], "p50"), num(&lat["max"], "max"));
        assert!(0.0 < min && min <= p50 && p50 <= max, "{lat:?}");
        assert!(doc["actualQPS"].is_number());
        let qps = num(&doc["actualQPS"], "actualQPS");
        assert!((qps - 50.0).abs() <= 1.0, "actualQPS {qps}");
        let (start, end) = (doc["startTime"].as_str().expect("string"), doc["endTime"].as_str().expect("string"));
        for t in [start, end] {
            assert!(is_rfc3339_utc(t), "{t} is not RFC 3339 UTC");
        }
        assert!(start < end, "{start} < {end}");
        let details = details_of(path, &doc);
        assert_eq!(details["resultId"], doc["id"]);
        assert!(!details["histogram"]["buckets"].as_array().expect("buckets").is_empty());
        assert_eq!(details["histogram"]["totalCount"], 100);
    }
    assert_eq!(read_json(&json_path)["labels"]["mtls"], "off");
    let yaml = read_yaml(&yaml_path);
    assert_eq!(details_of(&yaml_path, &yaml)["errors"]["http_503"], 100, "errors by kind");
    assert!(yaml_path.with_file_name("result.details.yaml").exists());

    let same = bench_ok(&["compare", json_path.to_str().expect("utf-8"), json_path.to_str().expect("utf-8")]).await;
    let text = String::from_utf8_lossy(&same.stdout);
    assert!(text.contains("no difference: every compared number is the same"), "{text}");
    let diff = bench_ok(&["compare", json_path.to_str().expect("utf-8"), yaml_path.to_str().expect("utf-8")]).await;
    let text = String::from_utf8_lossy(&diff.stdout);
    assert!(text.contains("p50") && text.contains("errors") && !text.contains("no difference: every"), "{text}");
}

/// `2026-11-22T23:14:05.123Z`.
fn is_rfc3339_utc(t: &str) -> bool {
    let b = t.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    t.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && t.ends_with('Z')
}

/// An SMP PerformanceTestConfig run as written: its rate, connections, duration, headers and
/// endpoint reach the upstream; the result carries the profile's labels and the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_runs_as_written() {
    let _serial = serial().await;
    let echo = HttpEcho::start("bench-profile").await.expect("upstream");
    let dir = Scratch::new("bench-profile");
    let profile = dir.join("profile.yaml");
    std::fs::write(
        &profile,
        format!(
            "smpVersion: v0.0.1\nname: smoke\nlabels:\n  team: mesh\nduration: 2s\nclients:\n  - protocol: http\n    connections: 3\n    rps: 40\n    headers:\n      x-bench: profile\n    endpointUrl:\n      - http://{}/\n",
            echo.addr()
        ),
    )
    .expect("write profile");
    let out_file = dir.join("result.json");
    let before = echo.requests();
    bench_ok(&[
        "--profile",
        profile.to_str().expect("utf-8"),
        "--warmup",
        "0",
        "--out",
        out_file.to_str().expect("utf-8"),
    ])
    .await;
    let sent = echo.requests() - before;
    assert!((78..=82).contains(&sent), "40 req/s for 2 s reached the upstream as {sent} requests");
    // Three connections, plus the one plexus bench opens (and closes) first to check the target.
    assert!(echo.connections() <= 4, "{} connections", echo.connections());
    let result = read_json(&out_file);
    assert_eq!(result["labels"]["team"], "mesh");
    assert_eq!(result["labels"]["plexus.io/profile"], "smoke");
    assert!(result["labels"]["plexus.io/env.cores"].as_str().is_some_and(|c| c.parse::<u32>().is_ok_and(|n| n >= 1)));
    assert!(result["labels"]["plexus.io/env.memory-mb"].is_string());
    let details = details_of(&out_file, &result);
    assert_eq!(details["connections"], 3);
    assert!(details["environment"]["plexusVersion"].is_string());
}

/// HTTP/2 with several streams per connection, and gRPC unary against a Python grpcio server
/// (raw bytes payload from a file), with gRPC failures counted by status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc() {
    let _serial = serial().await;
    let echo = HttpEcho::start("bench-h2").await.expect("upstream");
    let out = bench_ok(&[
        &format!("http://{}/", echo.addr()),
        "--protocol",
        "http2",
        "-c",
        "2",
        "-m",
        "4",
        "-r",
        "100",
        "-d",
        "2s",
        "--warmup",
        "0",
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("200 completed, 0 errors"), "{text}");
    // Two connections, plus the one plexus bench opens (and closes) first to check the target.
    assert!(echo.connections() <= 3, "{} connections for 2", echo.connections());

    if !require_python_module("grpc", "grpcio") {
        return;
    }
    let (_server, port) = python_server("grpc_peer.py", "bench-grpc").await;
    let dir = Scratch::new("bench-grpc");
    let payload = dir.join("payload.bin");
    std::fs::write(&payload, b"\x0a\x05hello").expect("payload");
    let url = format!("http://127.0.0.1:{port}");
    let p = payload.to_str().expect("utf-8");
    let out = bench_ok(&[
        &url,
        "--protocol",
        "grpc",
        "--grpc-method",
        "plexus.test.Echo/Unary",
        "--body-file",
        p,
        "-r",
        "50",
        "-d",
        "2s",
        "--warmup",
        "0",
        "-c",
        "2",
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("100 completed, 0 errors"), "{text}");
    let out = bench_ok(&[
        &format!("{url}/plexus.test.Echo/NotFound"),
        "--protocol",
        "grpc",
        "--body-file",
        p,
        "-r",
        "20",
        "-d",
        "1s",
        "--warmup",
        "0",
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("gRPC status 5 (NOT_FOUND): 20"), "{text}");
}

/// Errors a user makes are reported, not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors() {
    let port = plexus_testkit::free_port();
    let out = bench(&[&format!("http://127.0.0.1:{port}/"), "-d", "1s"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"), "{}", show(&out));
    let out = bench(&["https://127.0.0.1:1/"]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("https is not supported"), "{}", show(&out));
    let out = bench(&["http://127.0.0.1:1/", "--rate", "0"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let out = bench(&["http://127.0.0.1:1/", "--rate", "10", "--max-throughput"]).await;
    assert_eq!(out.status.code(), Some(2), "conflicting flags\n{}", show(&out));
    let out = bench(&["compare", "/nonexistent/a.json", "/nonexistent/b.json"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/a.json"), "{}", show(&out));
}

/// `plexus bench overhead`: the same load directly, through one sidecar, through two, and
/// through two with mutual TLS (real `plexus proxy` and `plexus control` processes), with the latency each path adds and the proxies' cost; one
/// SMP result per path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overhead_direct_one_and_two_sidecars() {
    let _serial = serial().await;
    let echo = HttpEcho::start("bench-overhead").await.expect("upstream");
    let dir = Scratch::new("bench-overhead");
    let out_file = dir.join("overhead.json");
    let out = bench_ok(&[
        "overhead",
        &format!("http://{}/", echo.addr()),
        "--rate",
        "100",
        "-d",
        "2s",
        "--warmup",
        "0",
        "--rounds",
        "2",
        "-c",
        "4",
        "--out",
        out_file.to_str().expect("utf-8"),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    for route in ["direct", "1-sidecar", "2-sidecars", "2-sidecars-mtls"] {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(route))
            .unwrap_or_else(|| panic!("no {route} row\n{text}"));
        assert!(line.contains("100.0/s"), "{route}: rate\n{text}");
        let path = dir.join(&format!("overhead.{route}.json"));
        let result = read_json(&path);
        assert_eq!(result["labels"]["plexus.io/overhead-path"], route);
        let mtls = if route == "2-sidecars-mtls" { "on" } else { "off" };
        assert_eq!(result["labels"]["plexus.io/env.mtls"], mtls, "{route}: {}", result["labels"]);
        let details = details_of(&path, &result);
        assert_eq!(details["completed"], 400, "{route}: 2 rounds × 2 s × 100 req/s\n{text}");
        assert_eq!(details["errors"], serde_json::json!({}), "{route}\n{text}");
        if route != "direct" {
            let cpu: f64 = result["labels"]["plexus.io/proxy-cpu-per-krps"]
                .as_str()
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("{route}: no proxy CPU label\n{result}"));
            assert!(cpu > 0.0, "{route}: the proxies did work");
            assert!(line.contains(" ms "), "{route}: added latency\n{text}");
        }
    }
    // 4 paths × 2 rounds × 200 requests, plus the readiness probes and the pre-run checks.
    assert!(echo.requests() >= 1600, "{} requests reached the upstream", echo.requests());
}
