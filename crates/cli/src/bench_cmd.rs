//! `plexus bench`: constant-rate load generation (SPEC §8) with a human summary, a progress
//! line, SMP results (`--out`), SMP profiles (`--profile`) and `plexus bench compare A B`.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use plexus_bench::env::Environment;
use plexus_bench::smp::{self, PerformanceTestConfig};
use plexus_bench::{BenchConfig, Load, Progress, Protocol, RunResult, compare, overhead, profile, summary};

use crate::Failure;
use crate::api_client::{ServerArgs, api_error, parse_answer};
use http::{Method, StatusCode};
use plexus_control::api_types::{RunList, StoredRun};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    action: Option<BenchAction>,
    /// Target URL (http://host:port/path).
    url: Option<String>,
    /// Requests per second, each sent at its intended time (open model) [default: 100].
    #[arg(short = 'r', long, conflicts_with = "max_throughput")]
    rate: Option<f64>,
    /// Closed loop instead: send as fast as responses come back, to measure capacity (latencies
    /// are then NOT corrected for coordinated omission).
    #[arg(long)]
    max_throughput: bool,
    /// Measured duration (after the warm-up).
    #[arg(short = 'd', long, default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Load sent before measuring; its results are discarded.
    #[arg(long, default_value = "1s", value_parser = duration)]
    warmup: Duration,
    /// TCP connections.
    #[arg(short = 'c', long, default_value_t = 10)]
    connections: usize,
    /// HTTP/2 and gRPC: requests in flight per connection at most.
    #[arg(short = 'm', long, default_value_t = 10)]
    streams: usize,
    /// Generator threads (each a single-threaded runtime with its share of the connections).
    #[arg(short = 't', long, default_value_t = 1)]
    threads: usize,
    /// http1, http2 (h2c) or grpc (unary, h2c).
    #[arg(long, default_value = "http1", value_parser = ["http1", "http2", "grpc"])]
    protocol: String,
    /// HTTP/1.1: open a new connection for every request instead of keeping them alive.
    #[arg(long)]
    new_connection: bool,
    /// Request header `name: value` (repeatable). `Host` chooses the authority.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Request method [default: GET, or POST with a body].
    #[arg(short = 'X', long)]
    method: Option<String>,
    /// Request body.
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Request body from a file; for gRPC the serialized protobuf message (raw bytes).
    #[arg(long, alias = "payload")]
    body_file: Option<PathBuf>,
    /// gRPC method `package.Service/Method` (default: the URL's path).
    #[arg(long)]
    grpc_method: Option<String>,
    /// Per-request timeout (connect, send, whole response).
    #[arg(long, default_value = "10s", value_parser = duration)]
    timeout: Duration,
    /// Write the SMP PerformanceTestResult here (JSON if it ends in .json, YAML otherwise), and
    /// the details (full histogram, errors by kind) beside it.
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
    /// Label `key=value` added to the result (repeatable), e.g. `mtls=on`.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Run an SMP PerformanceTestConfig (YAML or JSON) instead of a URL.
    #[arg(long, conflicts_with = "url")]
    profile: Option<PathBuf>,
    /// Do not send the result to the control plane (by default it is stored there when one
    /// answers at --server, for `plexus bench list` and the dashboard).
    #[arg(long)]
    no_store: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Subcommand)]
enum BenchAction {
    /// Compare two results (`--out` files): differences per percentile and in rate, with a
    /// note when the runs are too noisy to tell.
    /// A and B are result files or the ids of runs stored by the control plane.
    Compare {
        /// The baseline.
        a: PathBuf,
        /// The result compared with it.
        b: PathBuf,
    },
    /// The runs stored by the control plane, newest first.
    List {
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// What the mesh adds: the same constant-rate load directly, through one sidecar and
    /// through two (plaintext, and mutual TLS with a control plane), interleaved round by round;
    /// added latency per percentile and the proxies'
    /// CPU and memory per 1,000 req/s.
    Overhead(OverheadArgs),
}

#[derive(clap::Args)]
struct OverheadArgs {
    /// The target application (http://IP:PORT/path).
    url: String,
    /// Requests per second on every path.
    #[arg(short = 'r', long, default_value_t = 500.0)]
    rate: f64,
    /// Measured duration of each path in each round.
    #[arg(short = 'd', long, default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Warm-up before each measurement.
    #[arg(long, default_value = "1s", value_parser = duration)]
    warmup: Duration,
    /// TCP connections.
    #[arg(short = 'c', long, default_value_t = 10)]
    connections: usize,
    /// Rounds of (direct, 1 sidecar, 2 sidecars, 2 sidecars with mTLS).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// http1 or http2 (h2c).
    #[arg(long, default_value = "http1", value_parser = ["http1", "http2"])]
    protocol: String,
    /// Write one SMP result per path: FILE's name with `.direct`, `.1-sidecar`, `.2-sidecars`
    /// before its extension (JSON if it ends in .json, YAML otherwise).
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
}

fn duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    plexus_core::duration::parse(s)
}

pub async fn run(args: BenchArgs) -> Result<(), Failure> {
    match &args.action {
        Some(BenchAction::Compare { a, b }) => return compare_runs(&args.server, a, b).await,
        Some(BenchAction::List { output }) => return list(&args.server, output).await,
        Some(BenchAction::Overhead(o)) => return overhead(o).await,
        None => {}
    }
    let base = base_config(&args)?;
    let mut labels = parse_labels(&args.labels)?;
    let configs = match &args.profile {
        Some(path) => {
            let p: PerformanceTestConfig = smp::read_document(path).map_err(|e| Failure::usage(e.to_string()))?;
            if !p.name.is_empty() {
                labels.entry("plexus.io/profile".into()).or_insert_with(|| p.name.clone());
            }
            for (k, v) in &p.labels {
                labels.entry(k.clone()).or_insert_with(|| v.clone());
            }
            profile::runs(&p, &base).map_err(|e| Failure::usage(e.to_string()))?
        }
        None => {
            if args.url.is_none() {
                return Err(Failure::usage("give a URL, --profile FILE, or `compare A B` (see plexus bench --help)"));
            }
            base.validate().map_err(|e| Failure::usage(e.to_string()))?;
            vec![base]
        }
    };

    let progress = Arc::new(Progress::default());
    let show = std::io::stderr().is_terminal();
    let ticker = show.then(|| tokio::spawn(progress_line(progress.clone(), configs[0].warmup, configs[0].duration)));
    let mut set = tokio::task::JoinSet::new();
    for (i, c) in configs.into_iter().enumerate() {
        let progress = progress.clone();
        set.spawn(async move { (i, plexus_bench::run(&c, progress).await) });
    }
    let mut results: Vec<(usize, RunResult)> = Vec::new();
    let mut failure = None;
    while let Some(done) = set.join_next().await {
        match done {
            Ok((i, Ok(r))) => results.push((i, r)),
            Ok((_, Err(e))) => failure = failure.or(Some(Failure::runtime(e.to_string()))),
            Err(e) => failure = failure.or(Some(Failure::runtime(format!("load generator failed: {e}")))),
        }
    }
    if let Some(t) = ticker {
        t.abort();
        eprint!("\r\x1b[2K");
    }
    if let Some(f) = failure {
        return Err(f);
    }
    results.sort_by_key(|(i, _)| *i);
    let mut results = results.into_iter().map(|(_, r)| r);
    let Some(mut total) = results.next() else {
        return Err(Failure::runtime("no run"));
    };
    for r in results {
        total.merge(&r);
    }

    print!("{}", summary::render(&total));
    let env = Environment::detect();
    let details_uri = args
        .out
        .as_deref()
        .and_then(|out| smp::details_path(out).file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let (result, details) = smp::documents(&total, &env, labels, &details_uri);
    if let Some(out) = &args.out {
        let failed = |e: plexus_bench::BenchError| Failure::runtime(e.to_string());
        smp::write_document(&smp::details_path(out), &details).map_err(failed)?;
        smp::write_document(out, &result).map_err(failed)?;
        println!();
        println!(
            "results: {} (SMP PerformanceTestResult, id {}); details: {}",
            out.display(),
            result.id,
            smp::details_path(out).display()
        );
    }
    if !args.no_store {
        store(&args.server, &result, &details).await;
    }
    if total.completed == 0 {
        return Err(Failure::runtime("no request completed"));
    }
    Ok(())
}

/// The run the flags describe (also the base of a profile's runs).
fn base_config(args: &BenchArgs) -> Result<BenchConfig, Failure> {
    let mut c = BenchConfig::new(args.url.clone().unwrap_or_default());
    c.protocol = match args.protocol.as_str() {
        "http2" => Protocol::Http2,
        "grpc" => Protocol::Grpc,
        _ => Protocol::Http1,
    };
    if args.new_connection && c.protocol != Protocol::Http1 {
        return Err(Failure::usage("--new-connection applies to --protocol http1 only"));
    }
    c.load = if args.max_throughput { Load::MaxThroughput } else { Load::ConstantRate(args.rate.unwrap_or(100.0)) };
    c.duration = args.duration;
    c.warmup = args.warmup;
    c.connections = args.connections;
    c.streams = args.streams;
    c.threads = args.threads;
    c.keepalive = !args.new_connection;
    c.timeout = args.timeout;
    c.grpc_method = args.grpc_method.clone();
    for h in &args.headers {
        let (name, value) =
            h.split_once(':').ok_or_else(|| Failure::usage(format!("header {h:?}: expected name: value")))?;
        c.headers.push(profile::header(name, value).map_err(Failure::usage)?);
    }
    c.body = match (&args.body, &args.body_file) {
        (Some(b), _) => Bytes::from(b.clone()),
        (None, Some(path)) => Bytes::from(
            std::fs::read(path).map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))?,
        ),
        (None, None) => Bytes::new(),
    };
    c.method = match &args.method {
        Some(m) => m.to_ascii_uppercase().parse().map_err(|_| Failure::usage(format!("invalid method {m:?}")))?,
        None if !c.body.is_empty() => http::Method::POST,
        None => http::Method::GET,
    };
    Ok(c)
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| Failure::usage(format!("label {l:?}: expected key=value")))
        })
        .collect()
}

/// Redraws one status line on stderr every half second while the run goes on.
async fn progress_line(progress: Arc<Progress>, warmup: Duration, duration: Duration) {
    let started = Instant::now();
    let total = warmup + duration;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last = (Instant::now(), 0u64);
    loop {
        tick.tick().await;
        let elapsed = started.elapsed();
        let done = progress.completed.load(Ordering::Relaxed);
        let errors = progress.errors.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (done - last.1.min(done)) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
        last = (now, done);
        let phase = if elapsed < warmup {
            "warm-up".to_string()
        } else if elapsed < total {
            let filled = ((elapsed - warmup).as_secs_f64() / duration.as_secs_f64() * 20.0) as usize;
            format!("[{}{}]", "#".repeat(filled.min(20)), ".".repeat(20 - filled.min(20)))
        } else {
            "finishing".to_string()
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{phase} {:>5.1}s/{:.0}s  {done} completed  {errors} errors  {rate:.0} req/s",
            elapsed.as_secs_f64().min(total.as_secs_f64()),
            total.as_secs_f64()
        );
        let _ = err.flush();
    }
}

async fn overhead(args: &OverheadArgs) -> Result<(), Failure> {
    let mut load = BenchConfig::new(args.url.clone());
    load.load = Load::ConstantRate(args.rate);
    load.duration = args.duration;
    load.warmup = args.warmup;
    load.connections = args.connections;
    load.protocol = if args.protocol == "http2" { Protocol::Http2 } else { Protocol::Http1 };
    load.validate().map_err(|e| Failure::usage(e.to_string()))?;
    let proxy_bin =
        std::env::current_exe().map_err(|e| Failure::runtime(format!("cannot find the plexus binary: {e}")))?;
    let cfg = overhead::OverheadConfig { load, rounds: args.rounds, proxy_bin };
    println!(
        "mesh overhead: {} at {} req/s, {} round(s) of direct / 1 sidecar / 2 sidecars / 2 sidecars with mTLS, {:.0} s each",
        args.url,
        args.rate,
        args.rounds,
        args.duration.as_secs_f64()
    );
    let progress = Arc::new(Progress::default());
    let paths = overhead::run_overhead(&cfg, progress).await.map_err(|e| Failure::runtime(e.to_string()))?;
    println!();
    print!("{}", overhead::render(&paths));
    if let Some(out) = &args.out {
        let env = Environment::detect();
        for p in &paths {
            let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "overhead".into());
            let ext = out.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "yaml".into());
            let file = out.with_file_name(format!("{stem}.{}.{ext}", p.route.as_str()));
            let mut env = env.clone();
            env.extra.insert("proxies".into(), p.route.proxies().to_string());
            env.extra.insert("mtls".into(), if p.route.mtls() { "on" } else { "off" }.into());
            let mut labels = BTreeMap::new();
            labels.insert("plexus.io/overhead-path".to_string(), p.route.as_str().to_string());
            if p.route != overhead::Route::Direct {
                labels.insert("plexus.io/proxy-cpu-per-krps".into(), format!("{:.4}", p.cpu_per_krps()));
                labels.insert("plexus.io/proxy-rss-bytes".into(), p.proxy_rss.to_string());
            }
            smp::write_result(&file, &p.result, &env, labels).map_err(|e| Failure::runtime(e.to_string()))?;
            println!("results ({}): {}", p.route.as_str(), file.display());
        }
    }
    Ok(())
}

/// Sends a result to the control plane; a missing control plane or token is a note, not a
/// failure (the run itself succeeded).
async fn store(server: &ServerArgs, result: &smp::PerformanceTestResult, details: &smp::Details) {
    let body = serde_json::json!({ "result": result, "details": details });
    match server.call(Method::POST, "/api/v1/bench/results", Some(&body), true).await {
        Ok((StatusCode::CREATED, _)) => {
            println!("stored in the control plane at {} as run {} (plexus bench list)", server.server, result.id)
        }
        Ok((status, answer)) => eprintln!("note: not stored: {}", api_error(status, &answer).message),
        Err(e) => eprintln!("note: not stored in a control plane: {}", e.message.lines().next().unwrap_or_default()),
    }
}

/// `plexus bench list`.
async fn list(server: &ServerArgs, output: &str) -> Result<(), Failure> {
    let answer: RunList = server.fetch(Method::GET, "/api/v1/bench/results", None, false).await?;
    if output == "json" {
        println!("{}", serde_json::to_string_pretty(&answer).unwrap_or_default());
        return Ok(());
    }
    println!(
        "{:<36}  {:<20}  {:<14}  {:>9}  {:>9}  {:>9}  {:>9}  {:>7}  NAME",
        "ID", "START", "MODE", "QPS", "P50", "P99", "MAX", "ERRORS"
    );
    for r in &answer.items {
        let l = &r.latencies_ms;
        println!(
            "{:<36}  {:<20}  {:<14}  {:>9.1}  {:>7.2}ms  {:>7.2}ms  {:>7.2}ms  {:>7}  {}",
            r.id,
            r.start_time.chars().take(19).collect::<String>(),
            if r.mode.is_empty() { "?" } else { r.mode.as_str() },
            r.actual_qps,
            l.p50,
            l.p99,
            l.max,
            r.errors,
            r.name,
        );
    }
    Ok(())
}

/// A result from a file or, when no such file exists, a run stored by the control plane.
async fn load_run(server: &ServerArgs, what: &Path) -> Result<smp::Loaded, Failure> {
    let id = what.to_string_lossy();
    // A path (or anything that cannot be a run id) is read as a file, so a missing file is
    // reported as such.
    let could_be_id = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if what.exists() || !could_be_id {
        return smp::read_result(what).map_err(|e| Failure::usage(e.to_string()));
    }
    let (status, answer) = server.call(Method::GET, &format!("/api/v1/bench/results/{id}"), None, false).await?;
    if status == StatusCode::NOT_FOUND {
        return Err(Failure::runtime(format!("{id}: no such file, and no run with that id in the control plane")));
    }
    if status != StatusCode::OK {
        return Err(api_error(status, &answer));
    }
    let run: StoredRun = parse_answer(&format!("run {id}"), answer)?;
    Ok(smp::Loaded { result: run.result, details: run.details })
}

async fn compare_runs(server: &ServerArgs, a: &Path, b: &Path) -> Result<(), Failure> {
    let la = load_run(server, a).await?;
    let lb = load_run(server, b).await?;
    let c = compare::compare(&la, &lb);
    print!("{}", compare::render(&c, &a.display().to_string(), &b.display().to_string()));
    Ok(())
}
