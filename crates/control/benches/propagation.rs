//! Control-plane propagation benchmark (a benchmark, not a test): a real `plexus control` child
//! process, many SIMULATED proxies (lightweight tonic Watch streams in this process, not real
//! `plexus proxy` processes), and measurements of
//!
//! 1. propagation: from sending an apply request to every watching proxy receiving a
//!    WatchResponse that contains the change (hot service watched by every proxy, and a cold
//!    service watched by a few);
//! 2. control-plane memory per idle connected proxy (VmRSS with N proxies vs with none);
//! 3. control-plane CPU per update (utime + stime of the child) and while idle.
//!
//! Run with `scripts/bench-control` (builds release first) or
//! `cargo bench -p plexus-control --bench propagation -- --help`. Results and their reading:
//! docs/PERFORMANCE.md, section "Control plane".

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use plexus_api::discovery::discovery_client::DiscoveryClient;
use plexus_api::discovery::{ProxyInfo, WatchRequest};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Goals from the issue.
const GOAL_P99_MS: f64 = 100.0;
const GOAL_KIB_PER_PROXY: f64 = 10.0;
/// No change is being measured.
const NO_MARK: u64 = u64::MAX;
/// How long one update may take to reach every proxy before the round gives up on the rest.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an update's CPU is still counted after its last reception (acknowledgements).
const SETTLE_AFTER: Duration = Duration::from_millis(250);

#[derive(Parser, Debug)]
#[command(
    name = "propagation",
    about = "Control-plane propagation benchmark: simulated proxies against a real `plexus control`"
)]
struct Args {
    /// Smoke run: 100 proxies, 100 services, 10 updates of each kind.
    #[arg(long)]
    quick: bool,
    /// Simulated proxies (default 1000, quick 100).
    #[arg(long)]
    proxies: Option<usize>,
    /// Services svc-0..svc-N (default 1000, quick 100).
    #[arg(long)]
    services: Option<usize>,
    /// Workloads per Service.
    #[arg(long, default_value_t = 10)]
    workloads_per_service: usize,
    /// Proxy i watches svc-(i % SPREAD), svc-((i+1) % SPREAD) and the hot svc-0, so a cold
    /// service is watched by 2 x proxies / SPREAD proxies (default proxies / 10, at most services).
    #[arg(long)]
    spread: Option<usize>,
    /// Updates of the hot service svc-0 (default 20, quick 10).
    #[arg(long)]
    rounds: Option<usize>,
    /// Updates of one cold service each (default 20, quick 10).
    #[arg(long)]
    cold_rounds: Option<usize>,
    /// Watch streams multiplexed on one HTTP/2 connection (tonic Channel); 1 = a connection per proxy.
    #[arg(long, default_value_t = 100)]
    streams_per_channel: usize,
    /// Node agents (`plexus agent` processes) between the proxies and the control plane, as on
    /// N machines: connection c goes to agent c % N, each agent relays on one connection.
    #[arg(long, default_value_t = 0)]
    agents: usize,
    /// Resources per apply request during setup.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Simulated proxies ask for the whole view on every change instead of incremental
    /// responses (real proxies ask for incremental ones).
    #[arg(long)]
    state_of_the_world: bool,
    /// Seconds from one update to the next (acknowledgements settle in between).
    #[arg(long, default_value_t = 1.0)]
    gap: f64,
    /// Seconds of idle CPU measurement with every proxy connected.
    #[arg(long, default_value_t = 10.0)]
    idle: f64,
    /// The plexus binary (default: target/release/plexus of this workspace).
    #[arg(long, env = "PLEXUS_BIN")]
    bin: Option<PathBuf>,
    /// `RUST_LOG` of the control plane (its stderr goes to control.log in the temporary directory).
    #[arg(long, default_value = "warn")]
    log: String,
    /// Record a CPU profile of the control plane during the updates with `perf record` into FILE.
    #[arg(long)]
    perf: Option<PathBuf>,
    /// Also write every figure as JSON to FILE.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Before starting, wait up to S seconds for a second in which the machine is at most 10% busy.
    #[arg(long, default_value_t = 0.0, value_name = "S")]
    wait_quiet: f64,
    /// Skip the in-process timing of the control plane's steps (after the run).
    #[arg(long)]
    no_breakdown: bool,
    /// Only the in-process timing of the control plane's steps (no control plane, no proxies).
    #[arg(long)]
    breakdown_only: bool,
    /// Keep the temporary directory (data dir, control.log).
    #[arg(long)]
    keep: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
struct Config {
    proxies: usize,
    services: usize,
    workloads_per_service: usize,
    spread: usize,
    rounds: usize,
    cold_rounds: usize,
    streams_per_channel: usize,
    agents: usize,
    batch: usize,
    /// Simulated proxies ask for incremental responses.
    incremental: bool,
    gap: Duration,
    idle: Duration,
}

impl Config {
    fn from(args: &Args) -> Result<Config> {
        let proxies = args.proxies.unwrap_or(if args.quick { 100 } else { 1000 });
        let services = args.services.unwrap_or(if args.quick { 100 } else { 1000 });
        if proxies == 0 || services < 2 {
            bail!("need at least 1 proxy and 2 services");
        }
        let spread = args.spread.unwrap_or((proxies / 10).max(2)).clamp(2, services);
        Ok(Config {
            proxies,
            services,
            workloads_per_service: args.workloads_per_service.max(1),
            spread,
            rounds: args.rounds.unwrap_or(if args.quick { 10 } else { 20 }),
            cold_rounds: args.cold_rounds.unwrap_or(if args.quick { 10 } else { 20 }),
            streams_per_channel: args.streams_per_channel.max(1),
            agents: args.agents,
            batch: args.batch.max(1),
            incremental: !args.state_of_the_world,
            gap: Duration::from_secs_f64(args.gap.max(0.1)),
            idle: Duration::from_secs_f64(args.idle.max(1.0)),
        })
    }

    /// What proxy `i` watches.
    fn destinations(&self, i: usize) -> Vec<String> {
        let mut d = vec![i % self.spread, (i + 1) % self.spread, 0];
        d.sort_unstable();
        d.dedup();
        d.into_iter().map(|s| format!("svc-{s}.default")).collect()
    }

    fn watches(&self, i: usize, service: usize) -> bool {
        service == 0 || i % self.spread == service || (i + 1) % self.spread == service
    }
}

// ------------------------------------------------------------------------------------------
// /proc
// ------------------------------------------------------------------------------------------

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> Result<u64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: fields are counted after its closing ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11).ok_or_else(|| anyhow!("no utime in /proc/{pid}/stat"))?.parse()?;
    let stime: u64 = fields.get(12).ok_or_else(|| anyhow!("no stime in /proc/{pid}/stat"))?.parse()?;
    Ok(utime + stime)
}

/// Busy clock ticks of the whole machine, every CPU (/proc/stat: user, nice, system, irq,
/// softirq, steal).
fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().ok_or_else(|| anyhow!("empty /proc/stat"))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    Ok([0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum())
}

/// Waits up to `max` for a second in which the machine is at most 10% busy (all CPUs).
async fn wait_quiet(max: Duration, cpus: usize) -> Result<()> {
    let start = Instant::now();
    let limit = clock_ticks_per_second() * cpus as f64 * 0.10;
    loop {
        let b0 = machine_busy_ticks()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let busy = machine_busy_ticks()? - b0;
        if busy as f64 <= limit {
            return Ok(());
        }
        if start.elapsed() >= max {
            eprintln!("  (the machine is still busy after {max:?}: {busy} ticks in 1 s; measuring anyway)");
            return Ok(());
        }
    }
}

/// A `Vm*` line of /proc/PID/status, in KiB.
fn status_kib(pid: &str, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))?;
    let value = line[field.len() + 1..].split_whitespace().next().ok_or_else(|| anyhow!("empty {field}"))?;
    Ok(value.parse()?)
}

// ------------------------------------------------------------------------------------------
// The control plane and its HTTP API
// ------------------------------------------------------------------------------------------

/// A `plexus` child process that prints one JSON line with its addresses when ready.
struct Child {
    child: tokio::process::Child,
    pid: String,
    ready: Value,
}

impl Child {
    /// Starts `plexus ARGS` with its stderr in `dir/LOG.log`; waits for the ready line.
    async fn start(bin: &Path, args: &[&std::ffi::OsStr], dir: &Path, log: &str, rust_log: &str) -> Result<Child> {
        let stderr = std::fs::File::create(dir.join(format!("{log}.log"))).context("creating a log file")?;
        let mut child = tokio::process::Command::new(bin)
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} ({log})", bin.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("{log} exited at once"))?.to_string();
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .with_context(|| format!("{log} printed no address line within 30 s"))??
            .ok_or_else(|| anyhow!("{log} exited before printing its addresses (see {log}.log)"))?;
        // Keep draining stdout so the child never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let ready: Value = serde_json::from_str(&line).with_context(|| format!("address line {line:?}"))?;
        Ok(Child { child, pid, ready })
    }

    fn field(&self, k: &str) -> Result<String> {
        self.ready[k].as_str().map(str::to_string).ok_or_else(|| anyhow!("no {k:?} in {}", self.ready))
    }
}

struct ControlPlane {
    child: tokio::process::Child,
    pid: String,
    http: String,
    grpc: String,
    token: String,
}

impl ControlPlane {
    async fn start(bin: &Path, dir: &Path, log: &str) -> Result<ControlPlane> {
        let data = dir.join("data");
        let args = ["control".as_ref(), "--data-dir".as_ref(), data.as_os_str()];
        let addrs = ["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"].map(std::ffi::OsStr::new);
        let c = Child::start(bin, &[&args[..], &addrs[..]].concat(), dir, "control", log).await?;
        let token = std::fs::read_to_string(data.join("admin-token")).context("reading the admin token")?;
        let (http, grpc) = (c.field("http")?, c.field("grpc")?);
        Ok(ControlPlane { pid: c.pid, http, grpc, token: token.trim().to_string(), child: c.child })
    }

    fn cpu(&self) -> Result<u64> {
        cpu_ticks(&self.pid)
    }

    fn rss_kib(&self) -> Result<u64> {
        status_kib(&self.pid, "VmRSS")
    }

    /// Waits until the control plane has used at most a fifth of one core over the last second
    /// (index rebuilds and connection bursts are over; idle proxies' heartbeats may go on), at
    /// most `max`.
    async fn settle(&self, max: Duration) -> Result<Duration> {
        let threshold = (clock_ticks_per_second() / 5.0) as u64;
        let start = Instant::now();
        let mut window = std::collections::VecDeque::new();
        loop {
            window.push_back(self.cpu()?);
            while window.len() > 5 {
                window.pop_front();
            }
            if let (Some(first), Some(last)) = (window.front(), window.back())
                && window.len() == 5
                && last - first <= threshold
            {
                return Ok(start.elapsed());
            }
            if start.elapsed() > max {
                eprintln!("  (the control plane did not become idle within {max:?}; measuring anyway)");
                return Ok(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// One keep-alive HTTP/1.1 connection to the control plane's API.
struct Api {
    addr: String,
    token: String,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Api {
    async fn sender(&mut self) -> Result<&mut hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tcp = tokio::net::TcpStream::connect(&self.addr)
                .await
                .with_context(|| format!("connecting to the HTTP API at {}", self.addr))?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        self.sender.as_mut().ok_or_else(|| anyhow!("no connection"))
    }

    /// `POST /api/v1/tokens`: a workload token for `default/<service_account>`.
    async fn token(&mut self, service_account: &str) -> Result<String> {
        let body = serde_json::to_vec(&json!({ "serviceAccount": service_account }))?;
        let request = http::Request::post("/api/v1/tokens")
            .header(http::header::HOST, &self.addr)
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let sender = self.sender().await?;
        sender.ready().await?;
        let response = sender.send_request(request).await.context("POST /api/v1/tokens")?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("token answered {status}: {}", String::from_utf8_lossy(&body));
        }
        let answer: Value = serde_json::from_slice(&body)?;
        answer["token"].as_str().map(str::to_string).ok_or_else(|| anyhow!("no token in {answer}"))
    }

    /// `POST /api/v1/apply`; returns the results.
    async fn apply(&mut self, items: Vec<Value>) -> Result<Vec<Value>> {
        let body = serde_json::to_vec(&json!({ "source": "bench", "items": items }))?;
        let request = http::Request::post("/api/v1/apply")
            .header(http::header::HOST, &self.addr)
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.token))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let sender = self.sender().await?;
        sender.ready().await?;
        let response = sender.send_request(request).await.context("POST /api/v1/apply")?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("apply answered {status}: {}", String::from_utf8_lossy(&body));
        }
        let answer: Value = serde_json::from_slice(&body)?;
        let results = answer["results"].as_array().cloned().ok_or_else(|| anyhow!("no results in {answer}"))?;
        Ok(results)
    }
}

// ------------------------------------------------------------------------------------------
// Resources
// ------------------------------------------------------------------------------------------

fn marker(seq: u64) -> String {
    format!("bench-seq-{seq:06}")
}

fn service(s: usize) -> Value {
    json!({"apiVersion": "plexus.dev/v1alpha1", "kind": "Service", "metadata": {"name": format!("svc-{s}")},
           "spec": {"selector": {"app": format!("svc-{s}")}, "ports": [{"name": "http", "port": 8080}]}})
}

/// Workload `j` of svc-`s`; `port` overrides its own port (20000 + its index).
fn workload(s: usize, j: usize, per_service: usize, port: Option<usize>, annotations: Value) -> Value {
    let port = port.unwrap_or(20000 + (s * per_service + j) % 40000);
    json!({"apiVersion": "plexus.dev/v1alpha1", "kind": "Workload",
           "metadata": {"name": format!("w-{s}-{j}"), "labels": {"app": format!("svc-{s}")},
                        "annotations": annotations},
           "spec": {"address": "127.0.0.1", "ports": [{"name": "http", "port": port}]}})
}

/// Update `seq` of the hot service svc-0: alternately an HTTPRoute on it (a header match that
/// changes every time) and a Workload it selects (a port that changes every time).
fn hot_change(seq: u64) -> Value {
    let m = marker(seq);
    if seq.is_multiple_of(2) {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": "bench-hot", "annotations": {"plexus.dev/bench": m}},
               "spec": {"parentRefs": [{"kind": "Service", "name": "svc-0", "port": 8080}],
                        "rules": [{"matches": [{"headers": [{"name": "x-bench", "value": m}]}],
                                   "backendRefs": [{"name": "svc-0", "port": 8080}]}]}})
    } else {
        json!({"apiVersion": "plexus.dev/v1alpha1", "kind": "Workload",
               "metadata": {"name": "bench-hot-extra", "labels": {"app": "svc-0"},
                            "annotations": {"plexus.dev/bench": m}},
               "spec": {"address": "127.0.0.2", "ports": [{"name": "http", "port": 40000 + seq % 20000}]}})
    }
}

/// Update `seq` of one cold service: one of its Workloads gets a new port.
fn cold_change(seq: u64, s: usize, per_service: usize) -> Value {
    workload(s, 0, per_service, Some(60000 + (seq as usize) % 5000), json!({"plexus.dev/bench": marker(seq)}))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else { return true };
    if haystack.len() < needle.len() {
        return false;
    }
    let last_start = haystack.len() - needle.len();
    haystack[..=last_start].iter().enumerate().any(|(i, &b)| b == first && &haystack[i + 1..i + needle.len()] == rest)
}

// ------------------------------------------------------------------------------------------
// Simulated proxies
// ------------------------------------------------------------------------------------------

/// One WatchResponse received by a simulated proxy.
struct Event {
    proxy: usize,
    at: Instant,
    /// The change being measured when the response carried it.
    seq: Option<u64>,
}

/// A proxy as the control plane sees it: identifies itself, watches its destinations,
/// acknowledges every response (like `crates/proxy/src/control_plane.rs`) and heartbeats every
/// 5 s. It decodes nothing beyond protobuf: it only looks for the marker of the change being
/// measured.
async fn simulated_proxy(
    i: usize,
    channel: Channel,
    destinations: Vec<String>,
    service: String,
    incremental: bool,
    mark: Arc<AtomicU64>,
    events: mpsc::UnboundedSender<Event>,
) -> Result<()> {
    let mut client = DiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    let request = |applied: u64, proxy: Option<ProxyInfo>| WatchRequest {
        proxy,
        destinations: destinations.clone(),
        applied_revision: applied,
        leaving: false,
        incremental,
        ..WatchRequest::default()
    };
    let info = ProxyInfo {
        workload: format!("bench-proxy-{i}"),
        namespace: "default".into(),
        service,
        admin_address: "127.0.0.1:9".into(),
        mode: "sidecar".into(),
        ..Default::default()
    };
    tx.send(request(0, Some(info))).await?;
    let mut stream = client.watch(ReceiverStream::new(rx)).await?.into_inner();
    // Spread the heartbeats over the 5 s period.
    let first_beat = tokio::time::Instant::now() + Duration::from_millis((i as u64 * 4999 / 1000) % 5000 + 1);
    let mut heartbeat = tokio::time::interval_at(first_beat, Duration::from_secs(5));
    let mut applied = 0;
    loop {
        tokio::select! {
            msg = stream.message() => {
                let Some(response) = msg? else { bail!("the control plane ended the stream of proxy {i}") };
                let at = Instant::now();
                let m = mark.load(Ordering::Acquire);
                let seq = (m != NO_MARK).then(|| marker(m)).and_then(|needle| {
                    response.resources.iter().any(|r| contains(r, needle.as_bytes())).then_some(m)
                });
                applied = response.revision;
                let _ = events.send(Event { proxy: i, at, seq });
                tx.send(request(applied, None)).await?;
            }
            _ = heartbeat.tick() => tx.send(request(applied, None)).await?,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Statistics
// ------------------------------------------------------------------------------------------

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// What a series of updates measured.
#[derive(Default)]
struct Series {
    /// Every (update, proxy) reception latency, ms.
    latencies: Vec<f64>,
    /// Apply round-trip per update, ms.
    apply: Vec<f64>,
    /// First and last proxy reception per update, ms.
    first: Vec<f64>,
    last: Vec<f64>,
    /// Receptions expected but not seen within the timeout.
    missing: usize,
    /// Responses to proxies that do not watch the changed service, or without the change.
    unexpected: usize,
    /// Control-plane CPU ticks over the updates (each from the apply to `gap` later).
    cp_ticks: u64,
    /// Wall time those ticks were measured over.
    measured: Duration,
    /// This process's CPU ticks over the same windows.
    client_ticks: u64,
    /// The node agents' CPU ticks over the same windows.
    agent_ticks: u64,
    updates: usize,
    fanout: usize,
}

impl Series {
    fn summary(&self, tck: f64, idle_ticks_per_s: f64) -> Value {
        let l = sorted(self.latencies.clone());
        let a = sorted(self.apply.clone());
        let f = sorted(self.first.clone());
        let z = sorted(self.last.clone());
        let cpu_ms = self.cp_ticks as f64 / tck * 1000.0 / self.updates.max(1) as f64;
        let idle_ms = idle_ticks_per_s * self.measured.as_secs_f64() / tck * 1000.0 / self.updates.max(1) as f64;
        json!({
            "updates": self.updates, "fanout": self.fanout, "receptions": l.len(), "missing": self.missing,
            "unexpected": self.unexpected,
            "p50Ms": pct(&l, 50.0), "p90Ms": pct(&l, 90.0), "p99Ms": pct(&l, 99.0),
            "maxMs": l.last().copied().unwrap_or(f64::NAN),
            "applyP50Ms": pct(&a, 50.0), "applyMaxMs": a.last().copied().unwrap_or(f64::NAN),
            "firstReceptionP50Ms": pct(&f, 50.0), "lastReceptionP50Ms": pct(&z, 50.0),
            "lastReceptionMaxMs": z.last().copied().unwrap_or(f64::NAN),
            "cpuMsPerUpdate": cpu_ms, "cpuMsPerUpdateMinusIdle": (cpu_ms - idle_ms).max(0.0),
            "clientCpuMsPerUpdate": self.client_ticks as f64 / tck * 1000.0 / self.updates.max(1) as f64,
            "agentCpuMsPerUpdate": self.agent_ticks as f64 / tck * 1000.0 / self.updates.max(1) as f64,
            "perUpdate": {"applyMs": self.apply, "firstReceptionMs": self.first, "lastReceptionMs": self.last},
        })
    }
}

// ------------------------------------------------------------------------------------------
// The run
// ------------------------------------------------------------------------------------------

struct Bench {
    cfg: Config,
    cp: ControlPlane,
    api: Api,
    mark: Arc<AtomicU64>,
    events: mpsc::UnboundedReceiver<Event>,
    events_tx: mpsc::UnboundedSender<Event>,
    next_seq: u64,
    /// Set before the control plane is stopped: streams ending is then expected.
    stopping: Arc<AtomicBool>,
    /// HTTP/2 connections (tonic Channels) by number: proxy i uses i / streams_per_channel.
    pool: std::collections::HashMap<usize, Channel>,
    /// Node agents (`--agents`): connection c goes to agent c % N; none = straight to the
    /// control plane.
    agents: Vec<Child>,
    /// The simulated proxies' credential: one workload certificate (service account `bench`)
    /// bootstrapped with a token; every connection is mTLS with it, as a proxy's is.
    tls: Arc<plexus_proxy::cp_tls::ControlPlaneTls>,
}

impl Bench {
    /// Applies `items` `batch` at a time.
    async fn apply_batches(&mut self, items: Vec<Value>) -> Result<usize> {
        let mut requests = 0;
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let batch: Vec<Value> = items.by_ref().take(self.cfg.batch).collect();
            self.api.apply(batch).await?;
            requests += 1;
        }
        Ok(requests)
    }

    /// Events already queued (left over from an earlier phase): dropped, counted.
    fn drain(&mut self) -> usize {
        let mut n = 0;
        while self.events.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    /// Connects simulated proxies `range` (opening the connections they need) and waits for
    /// all their initial views.
    async fn connect(&mut self, range: std::ops::Range<usize>) -> Result<Duration> {
        let start = Instant::now();
        let per = self.cfg.streams_per_channel;
        for c in range.start / per..range.end.div_ceil(per) {
            if !self.pool.contains_key(&c) {
                let address = match self.agents.len() {
                    0 => self.cp.grpc.clone(),
                    n => self.agents[c % n].field("listen")?,
                };
                let channel = self
                    .tls
                    .channel(&format!("http://{address}"), |e| {
                        e.connect_timeout(Duration::from_secs(5))
                            .http2_keep_alive_interval(Duration::from_secs(10))
                            .keep_alive_timeout(Duration::from_secs(5))
                    })
                    .await
                    .with_context(|| format!("connecting to gRPC {address}"))?;
                self.pool.insert(c, channel);
            }
        }
        for i in range.clone() {
            let channel = self.pool.get(&(i / per)).cloned().ok_or_else(|| anyhow!("no channel for proxy {i}"))?;
            let (destinations, mark, tx) = (self.cfg.destinations(i), self.mark.clone(), self.events_tx.clone());
            // As itself (service account `bench`): the control plane refuses a proxy acting as
            // a service its identity does not back.
            let service = "bench".to_string();
            let (stopping, incremental) = (self.stopping.clone(), self.cfg.incremental);
            tokio::spawn(async move {
                if let Err(e) = simulated_proxy(i, channel, destinations, service, incremental, mark, tx).await
                    && !stopping.load(Ordering::Acquire)
                {
                    eprintln!("  proxy {i}: {e:#}");
                }
            });
        }
        let mut seen = vec![false; self.cfg.proxies];
        let mut remaining = range.len();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while remaining > 0 {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) if range.contains(&e.proxy) && !seen[e.proxy] => {
                    seen[e.proxy] = true;
                    remaining -= 1;
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("event channel closed"),
                Err(_) => bail!("{remaining} of {} proxies got no initial view within 120 s", range.len()),
            }
        }
        Ok(start.elapsed())
    }

    /// Waits for the control plane to be idle, then a heartbeat period (every stream has been
    /// through its steady state once); returns its RSS.
    async fn steady_rss(&self) -> Result<u64> {
        self.cp.settle(Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        self.cp.rss_kib()
    }

    /// Applies one change and waits for every proxy watching `service` to receive it.
    async fn update(&mut self, service: usize, change: Value, seq: u64, series: &mut Series) -> Result<()> {
        series.unexpected += self.drain();
        let expected: Vec<bool> = (0..self.cfg.proxies).map(|i| self.cfg.watches(i, service)).collect();
        let mut remaining = expected.iter().filter(|e| **e).count();
        series.fanout = remaining;
        self.mark.store(seq, Ordering::Release);
        let (cp0, me0, agents0) = (self.cp.cpu()?, cpu_ticks("self")?, self.agents_cpu()?);
        let t0 = Instant::now();
        let results = self.api.apply(vec![change]).await?;
        series.apply.push(ms(t0.elapsed()));
        if results.first().and_then(|r| r["outcome"].as_str()) == Some("unchanged") {
            bail!("update {seq} changed nothing: {results:?}");
        }
        let mut got: Vec<Option<f64>> = vec![None; self.cfg.proxies];
        let start = tokio::time::Instant::from_std(t0);
        let deadline = start + ROUND_TIMEOUT;
        let mut window_end = deadline;
        // Until everyone got it, then until the end of the gap but at least 250 ms more (strays,
        // acknowledgements: their CPU belongs to this update).
        loop {
            let until = if remaining > 0 { deadline } else { window_end };
            match tokio::time::timeout_at(until, self.events.recv()).await {
                Ok(Some(e)) => {
                    if e.seq == Some(seq) && expected[e.proxy] && got[e.proxy].is_none() {
                        got[e.proxy] = Some(ms(e.at.duration_since(t0)));
                        remaining -= 1;
                        if remaining == 0 {
                            window_end = (start + self.cfg.gap).max(tokio::time::Instant::now() + SETTLE_AFTER);
                        }
                    } else {
                        series.unexpected += 1;
                    }
                }
                Ok(None) => bail!("event channel closed"),
                Err(_) => break,
            }
        }
        series.cp_ticks += self.cp.cpu()? - cp0;
        series.client_ticks += cpu_ticks("self")? - me0;
        series.agent_ticks += self.agents_cpu()? - agents0;
        series.measured += t0.elapsed();
        series.missing += remaining;
        let received: Vec<f64> = got.into_iter().flatten().collect();
        let s = sorted(received);
        series.first.push(s.first().copied().unwrap_or(f64::NAN));
        series.last.push(s.last().copied().unwrap_or(f64::NAN));
        series.latencies.extend(s);
        series.updates += 1;
        self.mark.store(NO_MARK, Ordering::Release);
        Ok(())
    }

    /// CPU ticks of every node agent together.
    fn agents_cpu(&self) -> Result<u64> {
        self.agents.iter().map(|a| cpu_ticks(&a.pid)).sum()
    }

    /// VmRSS of every node agent together, KiB.
    fn agents_rss_kib(&self) -> Result<u64> {
        self.agents.iter().map(|a| status_kib(&a.pid, "VmRSS")).sum()
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}

/// `perf record` of the control plane, stopped with SIGINT (it then writes its file).
struct Perf(tokio::process::Child);

impl Perf {
    fn start(pid: &str, out: &Path) -> Result<Perf> {
        let child = tokio::process::Command::new("perf")
            // The release binary has no frame pointers: unwind with DWARF (.eh_frame).
            .args(["record", "-F", "249", "--call-graph", "dwarf,32768", "-p", pid, "-o"])
            .arg(out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting perf record (is perf installed?)")?;
        Ok(Perf(child))
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.0.id() {
            // SAFETY: signals the perf process this benchmark started, by its id.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        }
        tokio::time::timeout(Duration::from_secs(60), self.0.wait()).await.context("perf did not stop")??;
        Ok(())
    }
}

/// Median wall time of `runs` calls, in ms.
fn median_ms(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        v.push(ms(t.elapsed()));
    }
    Ok(pct(&sorted(v), 50.0))
}

/// In-process timings of the control plane's own code (the plexus-control library) on the same
/// data, to attribute where an update's time goes: what `maintain_index` does per store change
/// (list + decode the whole store, `Views::build`), what every Watch task does per change
/// (`Views::union` + comparison with what it sent), and the idle liveness checks
/// (`Proxies::heard_from`, called for every proxy message: heartbeats every 5 s, acks).
fn breakdown(cfg: &Config, dir: &Path) -> Result<Value> {
    use plexus_control::index::Views;
    use plexus_control::proxies::{Proxies, ProxyRecord};
    use plexus_control::store::{FileStore, Store};
    use plexus_core::ServiceName;
    use std::collections::BTreeSet;

    let mut items: Vec<Value> = (0..cfg.services).map(service).collect();
    for s in 0..cfg.services {
        for j in 0..cfg.workloads_per_service {
            items.push(workload(s, j, cfg.workloads_per_service, None, json!({})));
        }
    }
    items.push(hot_change(0));
    let resources = plexus_core::parse_documents("bench", &Value::Array(items).to_string())?;
    let store = FileStore::open(&dir.join("breakdown.redb"))?;
    store.apply(&resources)?;
    let list_ms = median_ms(3, || store.list_shared().map(drop).map_err(Into::into))?;
    let listed = store.list_shared()?;
    // As in `maintain_index`: the encodings of unchanged objects come from the cache, so a
    // change re-encodes only what changed.
    let mut cache = plexus_control::index::EncodeCache::default();
    let views = Views::build(1, &listed, &mut cache);
    let build_ms = median_ms(3, || {
        std::hint::black_box(Views::build(1, &listed, &mut cache));
        Ok(())
    })?;
    let wanted: Vec<BTreeSet<ServiceName>> = (0..cfg.proxies)
        .map(|i| cfg.destinations(i).iter().filter_map(|d| ServiceName::candidates(d).into_iter().next()).collect())
        .collect();
    let sent: Vec<Vec<Bytes>> =
        wanted.iter().map(|w| views.union(w).iter().map(|e| e.json.clone()).collect()).collect();
    // Per change, every stream: union of its destinations' views, compared with what it sent.
    let union_ms = median_ms(3, || {
        let mut changed = 0;
        for (w, last) in wanted.iter().zip(&sent) {
            let now: Vec<Bytes> = views.union(w).iter().map(|e| e.json.clone()).collect();
            changed += usize::from(now != *last);
        }
        std::hint::black_box(changed);
        Ok(())
    })?;
    let response_bytes: usize =
        sent.iter().map(|r| r.iter().map(Bytes::len).sum::<usize>()).sum::<usize>() / cfg.proxies;
    let proxies = Proxies::default();
    for i in 0..cfg.proxies {
        proxies.connect(ProxyRecord {
            identity: String::new(),
            id: 0,
            workload: format!("bench-proxy-{i}"),
            namespace: "default".into(),
            service: format!("svc-{}", i % cfg.spread),
            version: String::new(),
            mode: "sidecar".into(),
            admin_address: "127.0.0.1:9".into(),
            sent_revision: 0,
            applied_revision: 0,
            last_seen: None,
            registered: None,
        });
    }
    // Every proxy message (heartbeat every 5 s, acks) records that the proxy was heard from.
    let silent_ms = median_ms(3, || {
        for id in 1..=cfg.proxies as u64 {
            proxies.heard_from(id, Some(1));
        }
        Ok(())
    })?;
    Ok(json!({
        "resources": listed.len(), "storeListMs": list_ms, "viewsBuildMs": build_ms,
        "unionAllStreamsMs": union_ms, "responseBytes": response_bytes, "silentPerSecondMs": silent_ms,
    }))
}

fn default_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/plexus")
}

/// One thread, as a real sidecar runs: the simulated proxies are the instrument, and a
/// multi-threaded scheduler woke its workers across threads for every reception, taking CPU
/// from the control plane it measures (docs/PERFORMANCE.md, sixth round). Receptions are
/// handled in turn, which can only add to the latencies measured.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = Config::from(&args)?;
    let bin = args.bin.clone().unwrap_or_else(default_bin);
    if !bin.exists() && !args.breakdown_only {
        bail!("{} not found: build it with `cargo build --release -p plexus` or set PLEXUS_BIN", bin.display());
    }
    let dir = std::env::temp_dir().join(format!("plexus-bench-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let outcome = if args.breakdown_only {
        breakdown(&cfg, &dir).map(|bd| println!("{}", serde_json::to_string_pretty(&bd).unwrap_or_default()))
    } else {
        run(&args, cfg, &bin, &dir).await
    };
    if args.keep {
        eprintln!("kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}

async fn run(args: &Args, cfg: Config, bin: &Path, dir: &Path) -> Result<()> {
    let tck = clock_ticks_per_second();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if args.wait_quiet > 0.0 {
        eprintln!("waiting up to {} s for the machine to be idle...", args.wait_quiet);
        wait_quiet(Duration::from_secs_f64(args.wait_quiet), cpus).await?;
    }
    let cp = ControlPlane::start(bin, dir, &args.log).await?;
    eprintln!("control plane pid {} (http {}, grpc {}), {cpus} CPUs", cp.pid, cp.http, cp.grpc);
    let api = Api { addr: cp.http.clone(), token: cp.token.clone(), sender: None };
    let mut agents = Vec::new();
    for a in 0..cfg.agents {
        let upstream = format!("http://{}", cp.grpc);
        let argv = ["agent", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--control-plane", &upstream]
            .map(std::ffi::OsStr::new);
        agents.push(Child::start(bin, &argv, dir, &format!("agent-{a}"), &args.log).await?);
    }
    if !agents.is_empty() {
        eprintln!(
            "{} node agents, pids {}",
            agents.len(),
            agents.iter().map(|a| a.pid.as_str()).collect::<Vec<_>>().join(" ")
        );
    }
    let mut api = api;
    let token = api.token("bench").await?;
    let (_, tls, _) = plexus_proxy::cp_tls::enroll(&format!("http://{}", cp.grpc), &token).await?;
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut b = Bench {
        tls,
        cfg: cfg.clone(),
        cp,
        api,
        mark: Arc::new(AtomicU64::new(NO_MARK)),
        events,
        events_tx,
        next_seq: 0,
        stopping: Arc::default(),
        pool: Default::default(),
        agents,
    };
    let started_rss = b.cp.rss_kib()?;

    // 1. Setup.
    eprintln!("setup: {} services, {} workloads...", cfg.services, cfg.services * cfg.workloads_per_service);
    let t = Instant::now();
    let mut requests = b.apply_batches((0..cfg.services).map(service).collect()).await?;
    let workloads: Vec<Value> = (0..cfg.services)
        .flat_map(|s| (0..cfg.workloads_per_service).map(move |j| (s, j)))
        .map(|(s, j)| workload(s, j, cfg.workloads_per_service, None, json!({})))
        .collect();
    requests += b.apply_batches(workloads).await?;
    let setup_apply = t.elapsed();
    let setup_settle = b.cp.settle(Duration::from_secs(300)).await?;
    eprintln!(
        "  {requests} apply requests in {:.1} s; control plane idle {:.1} s later",
        setup_apply.as_secs_f64(),
        setup_settle.as_secs_f64()
    );
    let rss0 = b.steady_rss().await?;
    let agents_rss0 = b.agents_rss_kib()?;

    // 2. Proxies: half of them, then the rest (memory at two points: is it linear?).
    let half = cfg.proxies / 2;
    eprintln!("connecting {half} simulated proxies...");
    let sync_half = b.connect(0..half).await?;
    eprintln!("  all initial views after {:.2} s", sync_half.as_secs_f64());
    let rss_half = b.steady_rss().await?;
    eprintln!("connecting {} more...", cfg.proxies - half);
    let sync = b.connect(half..cfg.proxies).await?;
    eprintln!("  all initial views after {:.2} s", sync.as_secs_f64());
    let rss1 = b.steady_rss().await?;
    let agents_rss1 = b.agents_rss_kib()?;
    let agent_per_proxy = (agents_rss1 as f64 - agents_rss0 as f64) / cfg.proxies as f64;
    let channels = b.pool.len();
    let per_proxy = (rss1 as f64 - rss0 as f64) / cfg.proxies as f64;
    let per_proxy_marginal = (rss1 as f64 - rss_half as f64) / (cfg.proxies - half) as f64;
    eprintln!(
        "  RSS {rss0} KiB with 0 proxies, {rss_half} KiB with {half}, {rss1} KiB with {}: {per_proxy:.1} KiB per proxy \
         ({per_proxy_marginal:.1} from {half} to {})",
        cfg.proxies, cfg.proxies
    );

    // Idle CPU with every proxy connected (heartbeats every 5 s, liveness checks).
    let (c0, t0) = (b.cp.cpu()?, Instant::now());
    tokio::time::sleep(cfg.idle).await;
    let idle_ticks_per_s = (b.cp.cpu()? - c0) as f64 / t0.elapsed().as_secs_f64();
    let idle_pct = idle_ticks_per_s / tck * 100.0;
    eprintln!("  idle control-plane CPU: {idle_pct:.1}% of one core");
    let stray = b.drain();

    // 3. Updates.
    let perf = match &args.perf {
        Some(out) => Some(Perf::start(&b.cp.pid, out)?),
        None => None,
    };
    let (busy0, cp0, me0, agents0, t_updates) =
        (machine_busy_ticks()?, b.cp.cpu()?, cpu_ticks("self")?, b.agents_cpu()?, Instant::now());
    let mut hot = Series::default();
    eprintln!("{} updates of the hot service svc-0...", cfg.rounds);
    for _ in 0..cfg.rounds {
        let seq = b.seq();
        b.update(0, hot_change(seq), seq, &mut hot).await?;
    }
    let mut cold = Series::default();
    eprintln!("{} updates of one cold service each...", cfg.cold_rounds);
    for k in 0..cfg.cold_rounds {
        let seq = b.seq();
        let s = 1 + k % (cfg.spread - 1);
        b.update(s, cold_change(seq, s, cfg.workloads_per_service), seq, &mut cold).await?;
    }
    // CPU of other processes during the updates: this machine is shared.
    let ours = b.cp.cpu()? - cp0 + cpu_ticks("self")? - me0 + b.agents_cpu()? - agents0;
    let others = (machine_busy_ticks()? - busy0).saturating_sub(ours);
    let others_pct = others as f64 / tck / t_updates.elapsed().as_secs_f64() * 100.0;
    if let Some(p) = perf {
        p.stop().await?;
    }
    let rss_end = b.cp.rss_kib()?;
    let hwm = status_kib(&b.cp.pid, "VmHWM")?;
    b.stopping.store(true, Ordering::Release);
    b.cp.child.kill().await.context("stopping the control plane")?;
    let bd = if args.no_breakdown {
        Value::Null
    } else {
        eprintln!("in-process breakdown (the control plane is stopped)...");
        breakdown(&cfg, dir)?
    };

    // Report.
    let hs = hot.summary(tck, idle_ticks_per_s);
    let cs = cold.summary(tck, idle_ticks_per_s);
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!();
    println!(
        "Control-plane propagation: {} services x {} workloads, {} simulated proxies on {channels} HTTP/2 connections \
         (up to {} Watch stream(s) each){}, proxy i watches svc-(i%{}), svc-((i+1)%{}), svc-0; {} responses; {cpus} CPUs",
        cfg.services,
        cfg.workloads_per_service,
        cfg.proxies,
        cfg.streams_per_channel.min(cfg.proxies),
        match cfg.agents {
            0 => String::new(),
            n => format!(" to {n} node agents, each relaying on one connection to the control plane"),
        },
        cfg.spread,
        cfg.spread,
        if cfg.incremental { "incremental" } else { "state-of-the-world" }
    );
    println!();
    println!("| measure | value | goal |");
    println!("|---|---|---|");
    println!(
        "| setup: {} resources in {requests} applies of <= {} | {:.1} s (+ {:.1} s until the control plane is idle) | |",
        cfg.services * (1 + cfg.workloads_per_service),
        cfg.batch,
        setup_apply.as_secs_f64(),
        setup_settle.as_secs_f64()
    );
    println!(
        "| initial sync: {half} proxies connect at once, all get their first view (then {} more) | {:.2} s ({:.2} s) | |",
        cfg.proxies - half,
        sync_half.as_secs_f64(),
        sync.as_secs_f64()
    );
    for (name, s, v, goal) in [
        ("hot svc-0", &hot, &hs, format!("p99 < {GOAL_P99_MS} ms: {}", verdict(f(&hs, "p99Ms") < GOAL_P99_MS))),
        ("cold svc-k", &cold, &cs, String::new()),
    ] {
        println!(
            "| {name}: propagation p50 / p90 / p99 / max ({} updates x {} proxies = {} receptions{}) | {:.1} / {:.1} / {:.1} / {:.1} ms | {goal} |",
            s.updates,
            s.fanout,
            s.latencies.len(),
            if s.missing > 0 { format!(", {} MISSING", s.missing) } else { String::new() },
            f(v, "p50Ms"),
            f(v, "p90Ms"),
            f(v, "p99Ms"),
            f(v, "maxMs")
        );
        println!("| {name}: apply round-trip p50 / max | {:.1} / {:.1} ms | |", f(v, "applyP50Ms"), f(v, "applyMaxMs"));
        println!(
            "| {name}: first / last proxy reception per update, median | {:.1} / {:.1} ms | |",
            f(v, "firstReceptionP50Ms"),
            f(v, "lastReceptionP50Ms")
        );
        println!(
            "| {name}: control-plane CPU per update (raw / minus idle) | {:.1} / {:.1} ms | |",
            f(v, "cpuMsPerUpdate"),
            f(v, "cpuMsPerUpdateMinusIdle")
        );
        if cfg.agents > 0 {
            println!("| {name}: node agents' CPU per update, all together | {:.1} ms | |", f(v, "agentCpuMsPerUpdate"));
        }
        if s.unexpected > 0 {
            println!("| {name}: responses without the change or to non-watchers | {} | |", s.unexpected);
        }
    }
    println!(
        "| control-plane RSS: start / after setup (0 proxies) / {half} / {} idle proxies / after the updates (peak) \
         | {} / {} / {} / {} / {} ({}) KiB | |",
        cfg.proxies, started_rss, rss0, rss_half, rss1, rss_end, hwm
    );
    println!(
        "| control-plane memory per idle proxy: (RSS {n} - RSS 0) / {n} (marginal, {half} to {n}) \
         | {per_proxy:.1} KiB ({per_proxy_marginal:.1} KiB) | < {GOAL_KIB_PER_PROXY} KiB: {} |",
        verdict(per_proxy < GOAL_KIB_PER_PROXY),
        n = cfg.proxies
    );
    if cfg.agents > 0 {
        println!(
            "| node agents' memory per idle proxy: (RSS {n} - RSS 0) / {n}, all {} agents together | {agent_per_proxy:.1} KiB | |",
            cfg.agents,
            n = cfg.proxies
        );
    }
    println!("| control-plane CPU, {} idle proxies | {idle_pct:.1} % of one core | |", cfg.proxies);
    println!(
        "| bench process CPU per hot update (simulated proxies, same machine) | {:.1} ms | |",
        f(&hs, "clientCpuMsPerUpdate")
    );
    if stray > 0 {
        println!("| responses while idle | {stray} | |");
    }
    println!(
        "| other processes' CPU during the updates (should be ~0) | {others_pct:.1} % of one core{} | |",
        if others_pct > 10.0 { " WARNING: the machine was busy, figures are pessimistic" } else { "" }
    );
    println!();
    if !bd.is_null() {
        println!(
            "Where an update's time goes: the control plane's code called in-process on the same {} resources \
             (median of 3):",
            bd["resources"]
        );
        println!();
        println!("| step (per store change unless said) | time |");
        println!("|---|---|");
        println!("| `FileStore::list_shared()`: every object (shared) | {:.1} ms |", f(&bd, "storeListMs"));
        println!(
            "| `Views::build`: every Service's view (encodings of unchanged objects cached) | {:.1} ms |",
            f(&bd, "viewsBuildMs")
        );
        println!(
            "| `Views::union` + compare, once per stream ({} streams, {:.1} KiB per whole view, what a stream sends first) | {:.1} ms |",
            cfg.proxies,
            f(&bd, "responseBytes") / 1024.0,
            f(&bd, "unionAllStreamsMs")
        );
        println!(
            "| `Proxies::heard_from` x {} (one heartbeat round, every 5 s) | {:.1} ms |",
            cfg.proxies,
            f(&bd, "silentPerSecondMs")
        );
        println!();
    }
    if let Some(path) = &args.json {
        let all = json!({
            "proxies": cfg.proxies, "services": cfg.services, "workloadsPerService": cfg.workloads_per_service,
            "spread": cfg.spread, "channels": channels, "streamsPerChannel": cfg.streams_per_channel, "agents": cfg.agents,
            "agentRssKiB": {"zeroProxies": agents_rss0, "idleProxies": agents_rss1}, "agentKibPerIdleProxy": agent_per_proxy, "incremental": cfg.incremental, "cpus": cpus,
            "setupSeconds": setup_apply.as_secs_f64(), "setupSettleSeconds": setup_settle.as_secs_f64(),
            "initialSyncSeconds": [sync_half.as_secs_f64(), sync.as_secs_f64()],
            "rssKiB": {"start": started_rss, "zeroProxies": rss0, "halfProxies": rss_half, "idleProxies": rss1,
                       "end": rss_end, "peak": hwm},
            "kibPerIdleProxy": per_proxy, "kibPerIdleProxyMarginal": per_proxy_marginal, "idleCpuPercent": idle_pct, "otherProcessesCpuPercent": others_pct,
            "hot": hs, "cold": cs,
            "breakdown": bd, "hotLatenciesMs": hot.latencies, "coldLatenciesMs": cold.latencies,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&all)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
