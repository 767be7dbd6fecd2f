//! Observability end to end on the Bookinfo demo: the live service graph
//! (`/api/v1/graph`), a real Prometheus (Debian's) scraping every proxy through the control
//! plane's HTTP service discovery, `promtool check metrics` on a proxy's exposition, and every
//! panel of the Grafana dashboard in `deploy/grafana/` run against that Prometheus.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use plexus_testkit::client::{get_api as get, get_api_json as get_json};
use plexus_testkit::{Demo, HttpEcho, Proc, Proxy, TcpEcho, TempDir, eventually, free_port, require_tool};
use serde_json::Value;

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");

/// The repository's root (the dashboard and the Prometheus example live there).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The topology graph
// ---------------------------------------------------------------------------------------------

/// The id of the node of `service` (and `version`) in a graph.
fn node_id(graph: &Value, service: &str, version: Option<&str>) -> Option<String> {
    graph["nodes"].as_array()?.iter().find_map(|n| {
        (n["service"] == service && n["version"].as_str() == version).then(|| n["id"].as_str().map(str::to_string))?
    })
}

/// The edge from `source` to `target` (service, version) in a graph.
fn edge(graph: &Value, source: NodeRef, target: NodeRef) -> Option<&Value> {
    let (s, t) = (node_id(graph, source.0, source.1)?, node_id(graph, target.0, target.1)?);
    graph["edges"].as_array()?.iter().find(|e| e["source"] == s.as_str() && e["target"] == t.as_str())
}

/// A graph node by service and version (`None`: grouped by service).
type NodeRef = (&'static str, Option<&'static str>);

const INGRESS: NodeRef = ("ingress-gateway", Some("v1"));
const PRODUCTPAGE: NodeRef = ("productpage", Some("v1"));
const DETAILS: NodeRef = ("details", Some("v1"));
const RATINGS: NodeRef = ("ratings", Some("v1"));

fn reviews(version: &'static str) -> NodeRef {
    ("reviews", Some(version))
}

/// Every hop Bookinfo makes, as (source, target).
fn bookinfo_hops() -> Vec<(NodeRef, NodeRef)> {
    vec![
        (INGRESS, PRODUCTPAGE),
        (PRODUCTPAGE, DETAILS),
        (PRODUCTPAGE, reviews("v1")),
        (PRODUCTPAGE, reviews("v2")),
        (PRODUCTPAGE, reviews("v3")),
        (reviews("v2"), RATINGS),
        (reviews("v3"), RATINGS),
    ]
}

fn number(v: &Value, field: &str) -> Result<f64> {
    v[field].as_f64().with_context(|| format!("{field} is not a number: {v}"))
}

/// Fetches a page through the ingress every 100 ms, forever (abort the task to stop).
async fn page_load(ingress: SocketAddr) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let _ = get(ingress, "/productpage").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_of_the_bookinfo_demo_has_every_hop_with_its_golden_metrics() -> Result<()> {
    let dir = TempDir::new("graph")?;
    let demo = Demo::start(PLEXUS, &dir, &[]).await?;
    let started = Instant::now();
    let api = demo.api();
    demo.every_version_answers().await?;
    // More pages besides the demo's 5/s, so that every reviews version gets a steady share.
    let load = tokio::spawn(page_load(demo.ingress));

    // Reports arrive every 2 s: wait until every hop has been reported, and the window holds
    // some seconds of load besides the first, cold requests.
    let first_minute = eventually(Duration::from_secs(60), || async move {
        let g = get_json(api, "/api/v1/graph?window=1m").await?;
        for (s, t) in bookinfo_hops() {
            ensure!(edge(&g, s, t).is_some(), "no edge {s:?} -> {t:?} yet: {g:#}");
        }
        let pages = edge(&g, INGRESS, PRODUCTPAGE).and_then(|e| e["requests"].as_u64()).unwrap_or(0);
        ensure!(pages >= 40, "{pages} pages reported so far");
        Ok(g)
    })
    .await?;
    assert_eq!(first_minute["window"], "1m");
    assert_eq!(first_minute["group"], "version");
    for (s, t) in bookinfo_hops() {
        let e = edge(&first_minute, s, t).context("edge")?;
        assert!(number(e, "mtlsShare")? > 0.9, "{s:?} -> {t:?}: {e}");
    }
    // Success and mTLS are judged on a window of steady traffic: the demo announces itself
    // once a page is complete, which does not mean every workload (and every certificate)
    // was ready for the very first requests.
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(started.elapsed())).await;
    let graph = eventually(Duration::from_secs(30), || async move {
        let g = get_json(api, "/api/v1/graph?window=20s").await?;
        for (s, t) in bookinfo_hops() {
            ensure!(edge(&g, s, t).is_some(), "no edge {s:?} -> {t:?} in the last 20 s: {g:#}");
        }
        Ok(g)
    })
    .await?;
    load.abort();
    assert_eq!(graph["window"], "20s");

    // Nodes: every Bookinfo service version, the ingress gateway as such; nothing unknown.
    let kind_of = |service: &str, version: &str| {
        graph["nodes"].as_array().and_then(|ns| {
            ns.iter()
                .find(|n| n["service"] == service && n["version"] == version)
                .map(|n| (n["kind"].clone(), n["namespace"].clone()))
        })
    };
    assert_eq!(kind_of("ingress-gateway", "v1"), Some(("ingress".into(), "default".into())), "{graph:#}");
    for (service, version) in [
        ("productpage", "v1"),
        ("details", "v1"),
        ("reviews", "v1"),
        ("reviews", "v2"),
        ("reviews", "v3"),
        ("ratings", "v1"),
    ] {
        assert_eq!(kind_of(service, version), Some(("service".into(), "default".into())), "{service} {version}");
    }
    let ids: BTreeSet<&str> =
        graph["nodes"].as_array().into_iter().flatten().filter_map(|n| n["id"].as_str()).collect();
    assert!(!ids.contains("unknown"), "every caller is meshed: {graph:#}");

    // Every hop: healthy, mutual TLS, measured latencies.
    for (s, t) in bookinfo_hops() {
        let e = edge(&graph, s, t).context("edge")?;
        assert_eq!(number(e, "successRate")?, 1.0, "{s:?} -> {t:?}: {e}");
        assert_eq!(number(e, "mtlsShare")?, 1.0, "{s:?} -> {t:?}: {e}");
        assert!(number(e, "requestsPerSecond")? > 0.0 && e["requests"].as_u64().is_some_and(|r| r > 0), "{e}");
        // The first requests through a cold mesh may be slow; the quantiles only have to be
        // measured and ordered.
        let (p50, p95, p99) = (number(e, "p50Ms")?, number(e, "p95Ms")?, number(e, "p99Ms")?);
        assert!(0.0 < p50 && p50 <= p95 && p95 <= p99, "{s:?} -> {t:?}: {e}");
    }
    // reviews v1 shows no stars: it never calls ratings.
    assert!(edge(&graph, reviews("v1"), RATINGS).is_none(), "{graph:#}");
    let edges = graph["edges"].as_array().context("edges")?;
    assert_eq!(edges.len(), 7, "one edge per hop: {graph:#}");

    // Each page calls details and reviews once: the three measurements agree (each sidecar
    // reports on its own 2 s clock, so counts differ by what one report holds at most).
    let requests = |s, t| edge(&graph, s, t).and_then(|e| e["requests"].as_f64()).unwrap_or(0.0);
    let pages = requests(INGRESS, PRODUCTPAGE);
    let details = requests(PRODUCTPAGE, DETAILS);
    let reviews_calls: f64 = ["v1", "v2", "v3"].iter().map(|v| requests(PRODUCTPAGE, reviews(v))).sum();
    for (what, n) in [("details calls", details), ("reviews calls", reviews_calls)] {
        assert!((n - pages).abs() <= pages * 0.15 + 5.0, "{what} {n} vs pages {pages}: {graph:#}");
    }

    // Grouped by service: versions merge.
    let by_service = get_json(api, "/api/v1/graph?window=20s&group=service").await?;
    assert_eq!(by_service["group"], "service");
    assert!(by_service["nodes"].as_array().is_some_and(|n| n.iter().all(|n| n["version"].is_null())));
    let merged = edge(&by_service, ("productpage", None), ("reviews", None)).context("productpage -> reviews")?;
    // (The window has moved on since: the per-version sum is not the exact reference here;
    // the unit tests check merging exactly.)
    assert!(merged["requests"].as_f64().is_some_and(|n| n > 0.0), "{merged}");
    assert!(edge(&by_service, ("reviews", None), ("ratings", None)).is_some(), "{by_service:#}");

    // Bad parameters are 400 with a reason.
    for bad in [
        "/api/v1/graph?window=soon",
        "/api/v1/graph?window=1h",
        "/api/v1/graph?window=500ms",
        "/api/v1/graph?group=pods",
    ] {
        let r = get(api, bad).await?;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.json()?["error"].is_string(), "{bad}");
    }
    demo.stop().await
}

// ---------------------------------------------------------------------------------------------
// Prometheus, promtool and the Grafana dashboard
// ---------------------------------------------------------------------------------------------

/// A Prometheus server run by the test; killed on drop.
struct Prometheus {
    _proc: Proc,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with deploy/prometheus/prometheus.yml pointed at `control_plane`,
    /// with 1 s scrape and discovery intervals.
    async fn start(dir: &TempDir, control_plane: SocketAddr) -> Result<Prometheus> {
        let example = std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml"))?;
        let mut config = example.clone();
        for (from, to) in [
            ("http://127.0.0.1:7701/", format!("http://{control_plane}/")),
            ("    scrape_interval: 5s", "    scrape_interval: 1s".into()),
            ("refresh_interval: 15s", "refresh_interval: 1s".into()),
        ] {
            ensure!(config.matches(from).count() == 1, "deploy/prometheus/prometheus.yml: expected one {from:?}");
            config = config.replace(from, &to);
        }
        ensure!(config.matches("http_sd_configs:").count() == 1, "one http_sd_configs entry: {config}");
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, &config)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()
            .context("start prometheus")?;
        let p = Prometheus { _proc: Proc(child), addr, log };
        eventually(Duration::from_secs(30), || async move {
            let r = get(addr, "/-/ready").await?;
            ensure!(r.status == 200, "not ready: {}", r.status);
            Ok(())
        })
        .await
        .with_context(|| p.log_tail())?;
        Ok(p)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!("prometheus log (tail):\n{}", lines[lines.len().saturating_sub(20)..].join("\n"))
    }

    /// An instant query; the `data` of a successful answer.
    async fn query(&self, promql: &str) -> Result<Value> {
        let v = get_json(self.addr, &format!("/api/v1/query?query={}", encode(promql))).await?;
        ensure!(v["status"] == "success", "{promql}: {v}");
        Ok(v["data"].clone())
    }

    /// The values of `label` over the series `selector` selects.
    async fn label_values(&self, selector: &str, label: &str) -> Result<BTreeSet<String>> {
        let v = get_json(self.addr, &format!("/api/v1/series?match%5B%5D={}", encode(selector))).await?;
        ensure!(v["status"] == "success", "{selector}: {v}");
        Ok(v["data"].as_array().into_iter().flatten().filter_map(|s| s[label].as_str().map(str::to_string)).collect())
    }
}

/// The samples of a query result (vector, scalar or matrix) with their values.
fn samples(data: &Value) -> Vec<(Value, f64)> {
    let value = |v: &Value| v.get(1).and_then(Value::as_str).and_then(|s| s.parse::<f64>().ok());
    match data["resultType"].as_str() {
        Some("scalar") => value(&data["result"]).map(|x| vec![(Value::Null, x)]).unwrap_or_default(),
        Some("vector") => data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| Some((r["metric"].clone(), value(&r["value"])?)))
            .collect(),
        Some("matrix") => data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| Some((r["metric"].clone(), value(r["values"].as_array()?.last()?)?)))
            .collect(),
        _ => Vec::new(),
    }
}

/// Substitutes the dashboard's Grafana variables with what a user selecting "All" in the
/// `default` namespace gets.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s").replace("$namespace", "default").replace("$service", ".*")
}

/// Every panel of a dashboard, rows' nested panels included.
fn all_panels(panels: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in panels.as_array().into_iter().flatten() {
        out.push(p);
        out.extend(all_panels(&p["panels"]));
    }
    out
}

/// Resources that make every resilience and policy counter move: `flaky` (two versions)
/// retries 5xx answers and ejects failing endpoints, denies `/forbidden`; `tcp-echo` is
/// opaque TCP.
const EXTRA_SERVICES: &str = r#"apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: flaky}
spec:
  selector: {app: flaky}
  ports: [{name: http, port: 8080, appProtocol: http}]
---
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: tcp-echo}
spec:
  selector: {app: tcp-echo}
  ports: [{name: tcp, port: 9000, appProtocol: tcp}]
---
apiVersion: plexus.dev/v1alpha1
kind: ResiliencePolicy
metadata: {name: flaky}
spec:
  targetRef: {kind: Service, name: flaky}
  retries: {attempts: 3, on: [5xx]}
  outlierDetection: {consecutiveFailures: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}
---
apiVersion: plexus.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: flaky-deny}
spec:
  targetRef: {kind: Service, name: flaky, port: 8080}
  action: deny
  rules:
  - to: {paths: [/forbidden]}
"#;

const RATE_LIMIT: &str = r#"apiVersion: plexus.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: flaky}
spec:
  targetRef: {kind: Service, name: flaky, port: 8080}
  requestsPerSecond: 1
  burst: 1
"#;

/// One TCP stream through `addr`: `line` must come back, and the stream close after our EOF
/// (within 3 s each).
async fn echo_once(addr: SocketAddr, line: &str) -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let t = Duration::from_secs(3);
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(line.as_bytes()).await?;
    let mut echoed = vec![0u8; line.len()];
    tokio::time::timeout(t, s.read_exact(&mut echoed)).await.context("no echo within 3 s")??;
    ensure!(echoed == line.as_bytes(), "echoed {:?}", String::from_utf8_lossy(&echoed));
    s.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(t, s.read_to_end(&mut rest)).await.context("not closed within 3 s of our EOF")??;
    Ok(())
}

/// Joins a client sidecar (`loadgen`, with a mesh identity) and the `flaky` and `tcp-echo`
/// workloads to the demo, and makes retries, ejections, authorization denials, rate limiting
/// and TCP streams happen.
struct ExtraTraffic {
    _apps: (HttpEcho, HttpEcho, TcpEcho),
    _workloads: Vec<Proc>,
    loadgen: Proxy,
}

impl ExtraTraffic {
    async fn start(dir: &TempDir, demo: &Demo) -> Result<ExtraTraffic> {
        demo.apply(dir, "extra.yaml", EXTRA_SERVICES)?;
        let (a, b, tcp) =
            (HttpEcho::start("flaky-v1").await?, HttpEcho::start("flaky-v2").await?, TcpEcho::start().await?);
        let workloads = vec![
            demo.run_workload(dir, "flaky", "v1", a.port())?,
            demo.run_workload(dir, "flaky", "v2", b.port())?,
            demo.run_workload(dir, "tcp-echo", "v1", tcp.port())?,
        ];
        let server = format!("http://127.0.0.1:{}", demo.http);
        let token = plexus_testkit::workload_token(PLEXUS, &server, &demo.data, "default", "loadgen").await?;
        let grpc = format!("http://127.0.0.1:{}", demo.grpc);
        let loadgen = Proxy::start_named(
            "loadgen",
            PLEXUS,
            [
                "proxy",
                "--control-plane",
                &grpc,
                "--token",
                &token,
                "--workload",
                "loadgen-1",
                "--service",
                "loadgen",
                "--workload-version",
                "v1",
                "--outbound-port",
                "0",
                "--inbound-port",
                "0",
                "--admin-port",
                "0",
                "--upstream",
                "flaky:8080=0",
                "--upstream",
                "tcp-echo:9000=0",
            ],
        )
        .await?;
        Ok(ExtraTraffic { _apps: (a, b, tcp), _workloads: workloads, loadgen })
    }

    async fn flaky(&self, path: &str) -> Result<u16> {
        let addr = self.loadgen.upstream("flaky.default:8080")?;
        let r = plexus_testkit::client::get(addr, "flaky:8080", path, &[], Duration::from_secs(10))
            .await
            .with_context(|| format!("GET http://flaky:8080{path} through loadgen"))?;
        Ok(r.status.as_u16())
    }

    async fn run(&self, demo: &Demo, dir: &TempDir) -> Result<()> {
        // Both flaky versions registered and answering (`plexus run` may take up to 15 s to
        // start a workload when it misses its sidecar's first configuration).
        let mut served = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while served.len() < 2 {
            ensure!(Instant::now() < deadline, "within 60 s only {served:?} answered through loadgen");
            let addr = self.loadgen.upstream("flaky.default:8080")?;
            match plexus_testkit::client::get(addr, "flaky:8080", "/ok", &[], Duration::from_secs(2)).await {
                Ok(r) if r.status == 200 => {
                    served.insert(r.header("x-served-by").unwrap_or_default().to_string());
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        // 5xx answers: retried, and the failing endpoints ejected (at most half of them).
        for _ in 0..6 {
            let status = self.flaky("/status/503").await?;
            ensure!(status == 503, "status {status}");
        }
        // Denied by the authorization policy.
        for _ in 0..3 {
            let status = self.flaky("/forbidden").await?;
            ensure!(status == 403, "/forbidden: status {status}");
        }
        // Rate limited: 1 request per second at each flaky sidecar.
        demo.apply(dir, "rate-limit.yaml", RATE_LIMIT)?;
        eventually(Duration::from_secs(20), || async move {
            let mut limited = 0;
            for _ in 0..5 {
                limited += u32::from(self.flaky("/ok").await? == 429);
            }
            ensure!(limited > 0, "no 429 yet");
            Ok(())
        })
        .await?;
        // Opaque TCP through the mesh: once tcp-echo answers (its sidecar may still be starting
        // up), a few more streams.
        let addr = self.loadgen.upstream("tcp-echo.default:9000")?;
        eventually(Duration::from_secs(60), || echo_once(addr, "ready\n")).await?;
        for i in 0..3 {
            echo_once(addr, &format!("hello {i}\n")).await.with_context(|| format!("tcp-echo stream {i}"))?;
        }
        // The client sidecar counted what the dashboard will show.
        let metrics = self.loadgen.admin_get("/metrics").await?.text();
        for m in ["plexus_retries_total", "plexus_outlier_ejections_total", "plexus_tcp_connections_opened_total"] {
            ensure!(plexus_testkit::metric_sum(&metrics, m, &[]) > 0.0, "loadgen's {m} did not move:\n{metrics}");
        }
        Ok(())
    }
}

/// The labels SPEC §5 gives `plexus_requests_total` (an empty value, like
/// `grpc_response_status` on plain HTTP, is an absent label to Prometheus).
const REQUEST_LABELS: [&str; 13] = [
    "direction",
    "source_workload",
    "source_service",
    "source_principal",
    "destination_service",
    "destination_workload",
    "destination_version",
    "destination_principal",
    "route",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
];

/// `promtool check metrics` on an exposition (the classic text format a scraper gets when it
/// does not ask for OpenMetrics): parse errors fail; lint problems are returned.
async fn promtool_problems(exposition: &str) -> Result<Vec<String>> {
    use tokio::io::AsyncWriteExt as _;
    let mut child = plexus_testkit::command("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(exposition.as_bytes()).await?;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .context("promtool check metrics did not finish within 30 s")??;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // 0: clean; 3: lint problems found; anything else (1: the exposition did not parse) fails.
    ensure!(matches!(out.status.code(), Some(0 | 3)), "promtool check metrics failed ({}):\n{text}", out.status);
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_proxy_and_every_dashboard_panel_has_data() -> Result<()> {
    if !require_tool("prometheus") {
        return Ok(());
    }
    let dir = TempDir::new("prometheus")?;
    let demo = Demo::start(PLEXUS, &dir, &[]).await?;
    let api = demo.api();
    let prometheus = Prometheus::start(&dir, api).await?;
    // Traffic to every reviews version.
    demo.every_version_answers().await?;
    let extra = ExtraTraffic::start(&dir, &demo).await?;
    extra.run(&demo, &dir).await?;

    // Prometheus found every proxy through the control plane and scraped each one.
    let sd = get_json(api, "/api/v1/prometheus/targets").await?;
    let expected: BTreeMap<String, String> = sd
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| Some((g["targets"][0].as_str()?.to_string(), g["labels"]["workload"].as_str()?.to_string())))
        .collect();
    assert_eq!(expected.len(), 11, "7 Bookinfo proxies, 2 flaky, tcp-echo and loadgen: {sd}");
    let paddr = prometheus.addr;
    let expected_ref = &expected;
    eventually(Duration::from_secs(30), || async move {
        let v = get_json(paddr, "/api/v1/targets?state=active").await?;
        let targets = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
        let up: BTreeSet<String> = targets
            .iter()
            .filter(|t| t["health"] == "up" && t["labels"]["namespace"] == "default")
            .filter_map(|t| t["labels"]["instance"].as_str().map(str::to_string))
            .collect();
        let missing: Vec<&String> = expected_ref.iter().filter(|(a, _)| !up.contains(*a)).map(|(_, w)| w).collect();
        ensure!(missing.is_empty(), "not scraped (up) yet: {missing:?}; targets: {targets:#?}");
        Ok(())
    })
    .await
    .with_context(|| prometheus.log_tail())?;

    // The mesh metrics, with SPEC §5's labels, through PromQL.
    let pm = &prometheus;
    let by_service = eventually(Duration::from_secs(30), || async move {
        let data =
            pm.query(r#"sum by (destination_service) (rate(plexus_requests_total{direction="inbound"}[30s]))"#).await?;
        let rates: BTreeMap<String, f64> = samples(&data)
            .into_iter()
            .filter_map(|(m, v)| Some((m["destination_service"].as_str()?.to_string(), v)))
            .collect();
        for s in ["productpage", "details", "reviews", "ratings"] {
            ensure!(rates.get(s).is_some_and(|r| *r > 0.0), "no inbound rate for {s}: {rates:?}");
        }
        Ok(rates)
    })
    .await?;
    println!("inbound requests/s by service: {by_service:?}");
    let series =
        prometheus.query(r#"plexus_requests_total{direction="inbound",destination_service="reviews"}"#).await?;
    let series = samples(&series);
    assert!(!series.is_empty());
    for (labels, _) in &series {
        for l in REQUEST_LABELS {
            assert!(labels[l].is_string(), "label {l} missing: {labels}");
        }
        assert_eq!(labels["connection_security_policy"], "mutual_tls", "{labels}");
        assert_eq!(labels["source_principal"], "spiffe://plexus.local/ns/default/sa/productpage", "{labels}");
        assert_eq!(labels["destination_principal"], "spiffe://plexus.local/ns/default/sa/reviews", "{labels}");
        // The target labels from service discovery.
        assert_eq!((labels["service"].as_str(), labels["namespace"].as_str()), (Some("reviews"), Some("default")));
    }
    let outbound = prometheus
        .query(r#"sum by (source_service, destination_service) (plexus_requests_total{direction="outbound"})"#)
        .await?;
    let edges: BTreeSet<(String, String)> = samples(&outbound)
        .into_iter()
        .filter_map(|(m, _)| Some((m["source_service"].as_str()?.into(), m["destination_service"].as_str()?.into())))
        .collect();
    for (s, t) in [("ingress-gateway", "productpage"), ("productpage", "details"), ("productpage", "reviews")] {
        assert!(edges.contains(&(s.into(), t.into())), "no outbound {s} -> {t}: {edges:?}");
    }
    let p99 = prometheus
        .query(r#"histogram_quantile(0.99, sum by (le, destination_service) (rate(plexus_request_duration_seconds_bucket{direction="inbound"}[30s])))"#)
        .await?;
    let p99 = samples(&p99);
    for s in ["productpage", "details", "reviews", "ratings"] {
        let v = p99.iter().find(|(m, _)| m["destination_service"] == s).map(|(_, v)| *v);
        assert!(v.is_some_and(|v| v > 0.0 && v <= 30.0), "p99 of {s}: {v:?}");
    }

    // promtool lints one proxy's exposition.
    if plexus_testkit::find_tool("promtool").is_some() {
        let productpage = sd
            .as_array()
            .into_iter()
            .flatten()
            .find(|g| g["labels"]["service"] == "productpage")
            .and_then(|g| g["targets"][0].as_str())
            .context("productpage target")?;
        let exposition = get(productpage.parse()?, "/metrics").await?.text();
        let problems = promtool_problems(&exposition).await?;
        assert!(problems.is_empty(), "promtool check metrics: {problems:#?}");
    } else {
        plexus_testkit::skip("promtool is not installed (Debian's prometheus package ships it)");
    }

    // Every panel of the dashboard returns data.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/plexus-golden-metrics.json"))?)?;
    let panels = all_panels(&dashboard["panels"]);
    let mut exprs: Vec<(String, String)> = Vec::new();
    let mut ids = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        assert!(ids.insert(p["id"].as_u64().context("panel id")?), "duplicate panel id: {title}");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: panels use the datasource variable");
        let targets = p["targets"].as_array().filter(|t| !t.is_empty()).context(format!("{title}: no targets"))?;
        for t in targets {
            let expr = t["expr"].as_str().context(format!("{title}: a target without expr"))?;
            assert!(!substitute(expr).contains('$'), "{title}: a variable the test does not know: {expr}");
            exprs.push((title.clone(), expr.into()));
        }
    }
    assert!(exprs.len() >= 25, "{} expressions", exprs.len());
    // Every metric of SPEC §5 is on the dashboard.
    for metric in [
        "plexus_requests_total",
        "plexus_request_duration_seconds_bucket",
        "plexus_request_bytes_total",
        "plexus_response_bytes_total",
        "plexus_tcp_connections_opened_total",
        "plexus_tcp_connections_closed_total",
        "plexus_tcp_sent_bytes_total",
        "plexus_tcp_received_bytes_total",
        "plexus_retries_total",
        "plexus_outlier_ejections_total",
        "plexus_rate_limited_total",
        "plexus_authz_denied_total",
        "plexus_balancer_endpoints",
        "plexus_identity_cert_expiration_timestamp_seconds",
        "plexus_config_version",
        "plexus_control_plane_connected",
    ] {
        assert!(exprs.iter().any(|(_, e)| e.contains(metric)), "no panel shows {metric}");
    }
    // Rates need a few scrapes of the newest series: retry for a while, then report every
    // panel still without data.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut broken = Vec::new();
        for (title, expr) in &exprs {
            let promql = substitute(expr);
            match prometheus.query(&promql).await {
                Ok(data) if samples(&data).iter().any(|(_, v)| v.is_finite()) => {}
                Ok(data) => broken.push(format!("{title}: no data for {promql}: {data}")),
                Err(e) => broken.push(format!("{title}: {e:#}")),
            }
        }
        if broken.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "panels without data:\n{}", broken.join("\n"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!("{} panel expressions returned data", exprs.len());
    // The template variables list values.
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten().filter(|v| v["type"] == "query") {
        let query = substitute(var["query"]["query"].as_str().context("variable query")?);
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .context(format!("variable {}: expected label_values(SELECTOR, LABEL)", var["name"]))?;
        let (selector, label) = inner.rsplit_once(',').context("label_values arguments")?;
        let values = prometheus.label_values(selector.trim(), label.trim()).await?;
        assert!(!values.is_empty(), "variable {}: {query} lists nothing", var["name"]);
        if var["name"] == "service" {
            for s in ["productpage", "details", "reviews", "ratings"] {
                assert!(values.contains(s), "variable service lacks {s}: {values:?}");
            }
        }
    }
    drop(extra);
    demo.stop().await
}
