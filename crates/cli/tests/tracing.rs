//! Distributed tracing and access logs end to end (SPEC §4 MeshConfig `tracing`,
//! `accessLog`; §5 headers): client → sidecar A (`plexus proxy`, `--upstream`) → sidecar B
//! (`plexus proxy`, `--app-port`) → the echo app, which answers with the headers it received.
//!
//! The spans go to an OTLP/gRPC collector run inside the test: a tonic server implementing
//! `opentelemetry.proto.collector.trace.v1.TraceService`, generated from the same vendored
//! .proto files as the proxy's exporter.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use common::PLEXUS;
use plexus_proxy::trace::otlp::collector::trace_service_server::{TraceService, TraceServiceServer};
use plexus_proxy::trace::otlp::collector::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use plexus_proxy::trace::otlp::common::{AnyValue, KeyValue, any_value};
use plexus_proxy::trace::otlp::trace::Span;
use plexus_proxy::trace::otlp::trace::span::SpanKind;
use plexus_testkit::client::{self, Collected};
use plexus_testkit::{HttpEcho, Proxy, Resources, ServicePort, TempDir, WorkloadSpec, eventually, serial};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// How long spans may take to reach the collector (the exporter sends every second).
const EXPORT_WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The collector

/// A received span with the `service.name` of the proxy that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    resource: Vec<KeyValue>,
    span: Span,
}

/// An OTLP/gRPC trace collector on 127.0.0.1 that keeps every span it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = string_attr(&resource, "service.name").unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received { service: service.clone(), resource: resource.clone(), span });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Starts one; returns it with its address.
    async fn start() -> Result<(Collector, SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let collector = Collector::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let task = tokio::spawn(async move {
            if let Err(e) = server.await {
                eprintln!("collector failed: {e}");
            }
        });
        Ok((collector, addr, task))
    }

    fn all(&self) -> Vec<Received> {
        self.spans.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The spans of trace `trace_id` (hex).
    fn trace(&self, trace_id: &str) -> Vec<Received> {
        self.all().into_iter().filter(|r| hex(&r.span.trace_id) == trace_id).collect()
    }

    /// Waits until trace `trace_id` has `n` spans.
    async fn wait_trace(&self, trace_id: &str, n: usize) -> Result<Vec<Received>> {
        eventually(EXPORT_WAIT, || async move {
            let spans = self.trace(trace_id);
            ensure!(spans.len() >= n, "{} of {n} spans of trace {trace_id} received: {spans:#?}", spans.len());
            Ok(spans)
        })
        .await
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(attrs: &[KeyValue], key: &str) -> Option<any_value::Value> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone()).and_then(|AnyValue { value }| value)
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match value(attrs, key)? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match value(attrs, key)? {
        any_value::Value::IntValue(i) => Some(i),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The mesh: client → A → B → echo

/// `MeshConfig` with `spec` (YAML flow mapping body, e.g. `tracing: {sampling: 0}`).
fn mesh_config(spec: &str) -> String {
    format!("apiVersion: plexus.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: default}}\nspec: {{{spec}}}\n")
}

struct Mesh {
    _dir: TempDir,
    app: HttpEcho,
    resources: PathBuf,
    /// B's inbound port (the meshed Workload's port).
    inbound: u16,
    a: Proxy,
    b: Proxy,
}

impl Mesh {
    /// Starts the echo app, B in front of it and A with an `--upstream` bind to `echo:8080`,
    /// with `mesh` (a MeshConfig document, or empty) in their resources file and `args` on
    /// both proxies.
    async fn start(mesh: &str, args: &[&str]) -> Result<Mesh> {
        let dir = TempDir::new("tracing")?;
        let resources = dir.join("resources.yaml");
        let app = HttpEcho::start("echo").await?;
        Mesh::resources(app.port(), None, mesh).write(&resources)?;
        let res = resources.to_str().context("utf-8 path")?.to_string();
        let app_port = app.port().to_string();
        let common = ["proxy", "--resources", &res, "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0"];
        let mut b_args: Vec<&str> = common.to_vec();
        b_args.extend(["--app-port", &app_port, "--service", "echo", "--workload", "echo-1"]);
        b_args.extend_from_slice(args);
        let b = Proxy::start_named("sidecar-b", PLEXUS, &b_args).await?;
        let inbound = b.inbound().port();
        Mesh::resources(app.port(), Some(inbound), mesh).write(&resources)?;
        let mut a_args: Vec<&str> = common.to_vec();
        a_args.extend(["--upstream", "echo:8080=0", "--service", "client", "--workload", "client-1"]);
        a_args.extend_from_slice(args);
        let a = Proxy::start_named("sidecar-a", PLEXUS, &a_args).await?;
        let mesh = Mesh { _dir: dir, app, resources, inbound, a, b };
        // B must know its Workload before the first request (it was written after B started).
        eventually(Duration::from_secs(10), || async {
            let r = mesh.get("/warmup", &[]).await?;
            ensure!(r.status == 200, "warm-up answered {}: {}", r.status, r.text());
            Ok(())
        })
        .await?;
        Ok(mesh)
    }

    fn resources(app_port: u16, inbound: Option<u16>, mesh: &str) -> Resources {
        let mut r = Resources::new().service("echo", &[ServicePort::new("http", 8080, Some("http"))]);
        if let Some(inbound) = inbound {
            r = r.workload(&WorkloadSpec::meshed("echo-1", "echo", "http", inbound, app_port));
        }
        if !mesh.is_empty() {
            r = r.raw(mesh);
        }
        r
    }

    /// Replaces the MeshConfig in the resources file both proxies watch.
    fn set_mesh_config(&self, mesh: &str) -> Result<()> {
        Mesh::resources(self.app.port(), Some(self.inbound), mesh).write(&self.resources)
    }

    /// `GET path` through A's `--upstream` bind.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<Collected> {
        let upstream = self.a.upstream("echo.default:8080")?;
        client::get(upstream, "echo:8080", path, headers, Duration::from_secs(10)).await
    }

    /// The headers the app received for a `GET path` with `headers`.
    async fn app_headers(&self, path: &str, headers: &[(&str, &str)]) -> Result<serde_json::Value> {
        let r = self.get(path, headers).await?;
        ensure!(r.status == 200, "{path} answered {}: {}", r.status, r.text());
        Ok(r.json()?["headers"].clone())
    }
}

/// The access log lines (JSON) `p` printed for requests to `path`.
fn json_lines(p: &Proxy, path: &str) -> Vec<serde_json::Value> {
    p.extra_stdout()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["path"] == path)
        .collect()
}

/// Waits for the JSON access log line of `path` on `p`.
async fn json_line(p: &Proxy, path: &str) -> Result<serde_json::Value> {
    eventually(Duration::from_secs(5), || async move {
        json_lines(p, path).pop().with_context(|| format!("no access log line for {path} on {}", p.name()))
    })
    .await
}

/// `traceparent` split into (trace id, span id, flags).
fn traceparent(headers: &serde_json::Value) -> Result<(String, String, String)> {
    let tp = headers["traceparent"].as_str().with_context(|| format!("no traceparent reached the app: {headers}"))?;
    let parts: Vec<&str> = tp.split('-').collect();
    ensure!(parts.len() == 4 && parts[0] == "00", "malformed traceparent {tp:?}");
    Ok((parts[1].to_string(), parts[2].to_string(), parts[3].to_string()))
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_w3c_trace_is_continued_per_hop_and_both_spans_are_exported_and_chained() -> Result<()> {
    let (collector, addr, _server) = Collector::start().await?;
    let mesh = Mesh::start(&mesh_config(&format!("tracing: {{otlpEndpoint: \"{addr}\"}}")), &["--access-log"]).await?;

    let sent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let seen = mesh.app_headers("/w3c?q=1", &[("traceparent", &sent), ("tracestate", "vendor=opaque")]).await?;
    let (trace, app_span, flags) = traceparent(&seen)?;
    assert_eq!(trace, TRACE, "the trace id is kept");
    assert_ne!(app_span, CLIENT_SPAN, "each hop makes a span of its own");
    assert_eq!(flags, "01", "the sampling decision is kept");
    assert_eq!(seen["tracestate"], "vendor=opaque", "tracestate is carried");
    assert_eq!(seen["x-request-id"].as_str().map(str::len), Some(32), "x-request-id generated: {seen}");
    assert!(seen.get("x-b3-traceid").is_none() && seen.get("b3").is_none(), "no B3 unless it came in: {seen}");

    // A's client span is the child of the client's span; B's server span, the app's parent,
    // the child of A's.
    let spans = collector.wait_trace(TRACE, 2).await?;
    assert_eq!(spans.len(), 2, "exactly one span per proxy: {spans:#?}");
    let a = spans.iter().find(|r| r.service == "client").context("no span from A (service.name client)")?;
    let b = spans.iter().find(|r| r.service == "echo").context("no span from B (service.name echo)")?;
    assert_eq!(hex(&a.span.parent_span_id), CLIENT_SPAN);
    assert_eq!(hex(&b.span.parent_span_id), hex(&a.span.span_id), "B's parent is A's span");
    assert_eq!(hex(&b.span.span_id), app_span, "the app's parent is B's span");
    assert_eq!(a.span.kind, SpanKind::Client as i32);
    assert_eq!(b.span.kind, SpanKind::Server as i32);
    assert_eq!(a.span.trace_state, "vendor=opaque");
    assert!(a.span.start_time_unix_nano <= b.span.start_time_unix_nano, "B starts after A");
    assert!(a.span.end_time_unix_nano >= b.span.end_time_unix_nano, "A ends after B");
    // Attributes.
    for (r, workload, direction) in [(a, "client-1", "outbound"), (b, "echo-1", "inbound")] {
        let attrs = &r.span.attributes;
        assert_eq!(string_attr(&r.resource, "service.instance.id").as_deref(), Some(workload));
        assert_eq!(string_attr(&r.resource, "service.namespace").as_deref(), Some("default"));
        assert_eq!(string_attr(attrs, "plexus.direction").as_deref(), Some(direction));
        assert_eq!(string_attr(attrs, "http.request.method").as_deref(), Some("GET"));
        assert_eq!(int_attr(attrs, "http.response.status_code"), Some(200));
        assert_eq!(string_attr(attrs, "url.path").as_deref(), Some("/w3c"));
        assert_eq!(string_attr(attrs, "plexus.route").as_deref(), Some("default"));
        assert_eq!(string_attr(attrs, "plexus.response_flags").as_deref(), Some("-"));
        assert_eq!(string_attr(attrs, "plexus.destination.service").as_deref(), Some("echo"));
        assert_eq!(string_attr(attrs, "plexus.request_id"), seen["x-request-id"].as_str().map(str::to_string));
        assert!(string_attr(attrs, "plexus.peer.principal").is_some(), "peer identity attribute: {attrs:?}");
        assert_eq!(r.span.name, "GET echo");
    }
    assert_eq!(string_attr(&a.span.attributes, "plexus.source.workload").as_deref(), Some("client-1"));
    assert_eq!(string_attr(&a.span.attributes, "plexus.destination.workload").as_deref(), Some("echo-1"));
    assert_eq!(
        string_attr(&a.span.attributes, "plexus.upstream.address"),
        Some(format!("127.0.0.1:{}", mesh.inbound)),
        "A sent to B's inbound listener"
    );
    assert_eq!(
        string_attr(&b.span.attributes, "plexus.upstream.address"),
        Some(mesh.app.addr().to_string()),
        "B sent to the app"
    );

    // The export is counted on /metrics once the collector has answered A's export.
    let started = Instant::now();
    loop {
        let metrics = mesh.a.admin_get("/metrics").await?.text();
        let exported = metrics
            .lines()
            .find(|l| l.starts_with("plexus_trace_spans_total{outcome=\"exported\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        if exported.is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "plexus_trace_spans_total exported: {exported:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The access log lines carry the same ids.
    let line_a = json_line(&mesh.a, "/w3c").await?;
    let line_b = json_line(&mesh.b, "/w3c").await?;
    for (line, span) in [(&line_a, hex(&a.span.span_id)), (&line_b, app_span.clone())] {
        assert_eq!(line["trace_id"], TRACE, "{line}");
        assert_eq!(line["span_id"], span.as_str(), "{line}");
        assert_eq!(line["request_id"], seen["x-request-id"], "{line}");
    }
    assert_eq!(line_a["parent_span_id"], CLIENT_SPAN);
    assert_eq!(line_b["parent_span_id"], line_a["span_id"]);

    // Without any trace header: a new sampled trace (an exporter is set), both hops in it.
    let seen = mesh.app_headers("/fresh", &[]).await?;
    let (trace, app_span, flags) = traceparent(&seen)?;
    assert_eq!(flags, "01", "sampling defaults to 100% with an exporter");
    let spans = collector.wait_trace(&trace, 2).await?;
    let a = spans.iter().find(|r| r.service == "client").context("no span from A")?;
    let b = spans.iter().find(|r| r.service == "echo").context("no span from B")?;
    assert!(a.span.parent_span_id.is_empty(), "A started the trace: no parent");
    assert_eq!(hex(&b.span.parent_span_id), hex(&a.span.span_id));
    assert_eq!(hex(&b.span.span_id), app_span);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_in_b3_out_multi_and_single() -> Result<()> {
    let mesh = Mesh::start("", &["--access-log"]).await?;

    let seen = mesh
        .app_headers("/b3multi", &[("x-b3-traceid", TRACE), ("x-b3-spanid", CLIENT_SPAN), ("x-b3-sampled", "1")])
        .await?;
    assert_eq!(seen["x-b3-traceid"], TRACE, "{seen}");
    assert_eq!(seen["x-b3-sampled"], "1", "{seen}");
    let app_span = seen["x-b3-spanid"].as_str().context("x-b3-spanid")?;
    assert_ne!(app_span, CLIENT_SPAN);
    let (trace, tp_span, flags) = traceparent(&seen)?;
    assert_eq!((trace.as_str(), tp_span.as_str(), flags.as_str()), (TRACE, app_span, "01"), "W3C written too");
    // B's parent is A's span, whose parent is the client's.
    let line_a = json_line(&mesh.a, "/b3multi").await?;
    assert_eq!(line_a["parent_span_id"], CLIENT_SPAN);
    assert_eq!(seen["x-b3-parentspanid"], line_a["span_id"], "{seen}");
    assert!(seen.get("b3").is_none(), "the single form only when it came in: {seen}");

    // Single header, not sampled; a 64-bit trace id stays 64-bit.
    let short = &TRACE[16..];
    let seen = mesh.app_headers("/b3single", &[("b3", &format!("{short}-{CLIENT_SPAN}-0"))]).await?;
    let b3 = seen["b3"].as_str().with_context(|| format!("no b3 header reached the app: {seen}"))?;
    let parts: Vec<&str> = b3.split('-').collect();
    let line_a = json_line(&mesh.a, "/b3single").await?;
    assert_eq!(parts.len(), 4, "{b3}");
    assert_eq!(parts[0], short);
    assert_ne!(parts[1], CLIENT_SPAN);
    assert_eq!(parts[2], "0", "the decision (not sampled) is kept");
    assert_eq!(Some(parts[3]), line_a["span_id"].as_str(), "parent = A's span");
    let (trace, _, flags) = traceparent(&seen)?;
    assert_eq!(trace, format!("{}{short}", "0".repeat(16)));
    assert_eq!(flags, "00");
    assert!(seen.get("x-b3-traceid").is_none(), "{seen}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_zero_exports_no_span_but_still_propagates() -> Result<()> {
    let (collector, addr, _server) = Collector::start().await?;
    let mesh =
        Mesh::start(&mesh_config(&format!("tracing: {{sampling: 0, otlpEndpoint: \"http://{addr}\"}}")), &[]).await?;
    let mut traces = Vec::new();
    for i in 0..5 {
        let seen = mesh.app_headers(&format!("/unsampled/{i}"), &[]).await?;
        let (trace, _, flags) = traceparent(&seen)?;
        assert_eq!(flags, "00", "sampling 0: not sampled");
        traces.push(trace);
    }
    let seen = mesh.app_headers("/b3", &[("x-b3-traceid", TRACE), ("x-b3-spanid", CLIENT_SPAN)]).await?;
    assert_eq!(seen["x-b3-sampled"], "0", "B3 without a decision gets ours: {seen}");
    assert_eq!(seen["x-b3-traceid"], TRACE);
    // A trace sampled upstream is still exported (the parent decides); once its spans are in,
    // anything queued before them would be too.
    mesh.app_headers("/sampled", &[("traceparent", &format!("00-{TRACE}-{CLIENT_SPAN}-01"))]).await?;
    collector.wait_trace(TRACE, 2).await?;
    let all = collector.all();
    assert_eq!(all.len(), 2, "only the upstream-sampled request's spans: {all:#?}");
    for t in &traces {
        assert!(collector.trace(t).is_empty(), "trace {t} was not sampled yet exported");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_format_follows_mesh_config_within_a_second() -> Result<()> {
    let _serial = serial().await;
    // No --access-log flag: MeshConfig turns the logs on for every proxy.
    let mesh = Mesh::start(&mesh_config("accessLog: {format: json}"), &[]).await?;
    let seen = mesh.app_headers("/json", &[("x-request-id", "req-1")]).await?;
    let (trace, app_span, _) = traceparent(&seen)?;
    let a = json_line(&mesh.a, "/json").await?;
    let b = json_line(&mesh.b, "/json").await?;
    for (line, direction) in [(&a, "outbound"), (&b, "inbound")] {
        for field in [
            "time",
            "trace_id",
            "span_id",
            "request_id",
            "direction",
            "source_workload",
            "source_service",
            "source_principal",
            "destination_workload",
            "destination_service",
            "destination_principal",
            "route",
            "method",
            "authority",
            "path",
            "status",
            "grpc_status",
            "response_flags",
            "duration_ms",
            "request_bytes",
            "response_bytes",
            "upstream",
        ] {
            assert!(line.get(field).is_some(), "{field} missing from {line}");
        }
        assert_eq!(line["direction"], direction);
        assert_eq!(line["trace_id"], trace.as_str());
        assert_eq!(line["request_id"], "req-1", "the client's x-request-id is kept");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["authority"], "echo:8080");
        assert_eq!(line["status"], 200);
        assert_eq!(line["response_flags"], "-");
        assert_eq!(line["route"], "default");
        assert_eq!(line["destination_service"], "echo");
        assert!(line["response_bytes"].as_u64().is_some_and(|n| n > 0), "{line}");
        assert!(line["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{line}");
    }
    assert_eq!(a["source_workload"], "client-1");
    assert_eq!(a["destination_workload"], "echo-1");
    assert_eq!(a["upstream"], format!("127.0.0.1:{}", mesh.inbound));
    assert_eq!(b["upstream"], mesh.app.addr().to_string());
    assert_eq!(b["span_id"], app_span.as_str());
    assert!(a["time"].as_str().is_some_and(|t| t.ends_with('Z') && t.contains('T')), "{a}");

    // text: the next requests, within a second of the change, log one human line.
    mesh.set_mesh_config(&mesh_config("accessLog: {format: text}"))?;
    let changed = Instant::now();
    let line = eventually(Duration::from_secs(5), || async {
        let seen = mesh.app_headers("/text", &[]).await?;
        let (trace, _, _) = traceparent(&seen)?;
        mesh.a
            .extra_stdout()
            .into_iter()
            .find(|l| l.contains("\"GET /text HTTP/1.1\"") && l.contains(&format!("trace={trace}")))
            .with_context(|| format!("no text line for trace {trace} yet"))
    })
    .await?;
    let took = changed.elapsed();
    assert!(took < Duration::from_secs(1), "format change took {took:?}");
    assert!(line.contains(" outbound ") && line.contains(" 200 "), "{line}");
    assert!(serde_json::from_str::<serde_json::Value>(&line).is_err(), "a text line is not JSON: {line}");

    // off: no more lines.
    mesh.set_mesh_config(&mesh_config("accessLog: {format: \"off\"}"))?;
    let changed = Instant::now();
    // Wait until a request logs nothing, then check that no later one does.
    eventually(Duration::from_secs(5), || async {
        let before = (mesh.a.extra_stdout().len(), mesh.b.extra_stdout().len());
        mesh.app_headers("/off-probe", &[]).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = (mesh.a.extra_stdout().len(), mesh.b.extra_stdout().len());
        ensure!(before == after, "still logging");
        Ok(())
    })
    .await?;
    let took = changed.elapsed();
    assert!(took < Duration::from_secs(1) + Duration::from_millis(200), "turning logs off took {took:?}");
    let before = (mesh.a.extra_stdout().len(), mesh.b.extra_stdout().len());
    for _ in 0..5 {
        mesh.app_headers("/off", &[]).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((mesh.a.extra_stdout().len(), mesh.b.extra_stdout().len()), before, "accessLog off: no lines");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_flushed_when_the_proxies_drain() -> Result<()> {
    let (collector, addr, _server) = Collector::start().await?;
    let mesh = Mesh::start(&mesh_config(&format!("tracing: {{otlpEndpoint: \"{addr}\"}}")), &[]).await?;
    // Let the warm-up's spans go out first, so what is counted below is only the last request.
    eventually(EXPORT_WAIT, || async {
        ensure!(collector.all().len() >= 2, "warm-up spans not exported yet");
        Ok(())
    })
    .await?;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    mesh.app_headers("/last", &[("traceparent", &format!("00-{trace}-{CLIENT_SPAN}-01"))]).await?;
    // Drain both at once, right away: the spans must reach the collector before they exit.
    let started = Instant::now();
    for p in [&mesh.a, &mesh.b] {
        let r = p.admin_post("/shutdown").await?;
        ensure!(r.status.is_success(), "{}: POST /shutdown answered {}", p.name(), r.status);
    }
    for p in [&mesh.a, &mesh.b] {
        let status = p.wait_exit(Duration::from_secs(15)).await?;
        ensure!(status.success(), "{} exited with {status}\n{}", p.name(), p.stderr_tail(4000));
    }
    let spans = collector.trace(trace);
    assert_eq!(
        spans.len(),
        2,
        "both spans arrived before the proxies exited ({:?} after the request): {spans:#?}",
        started.elapsed()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// With a control plane: mutual TLS gives the peers' identities

/// A `plexus control` on free ports with its own data dir.
struct ControlPlane {
    _proc: plexus_testkit::Background,
    grpc: String,
    server: String,
    data: PathBuf,
}

impl ControlPlane {
    async fn start(dir: &TempDir) -> Result<ControlPlane> {
        let data = dir.join("data");
        let http = format!("127.0.0.1:{}", plexus_testkit::free_port());
        let mut cmd = plexus_testkit::command(PLEXUS);
        cmd.args(["control", "--http-addr", &http, "--grpc-addr", "127.0.0.1:0", "--data-dir"]).arg(&data);
        let proc = plexus_testkit::Background::start("control", cmd, "{", Duration::from_secs(30)).await?;
        let ready: serde_json::Value = serde_json::from_str(proc.ready_line()).context("control ready line")?;
        let grpc = format!("http://{}", ready["grpc"].as_str().context("no grpc address in the ready line")?);
        Ok(ControlPlane { _proc: proc, grpc, server: format!("http://{http}"), data })
    }

    fn plexus(&self) -> tokio::process::Command {
        let mut cmd = plexus_testkit::command(PLEXUS);
        cmd.env("PLEXUS_SERVER", &self.server)
            .env("PLEXUS_CONTROL_PLANE", &self.grpc)
            .env("PLEXUS_DATA_DIR", &self.data);
        cmd
    }

    async fn apply(&self, dir: &TempDir, yaml: &str) -> Result<()> {
        let file = dir.join(format!("apply-{}.yaml", fastrand_suffix()));
        std::fs::write(&file, yaml)?;
        let mut cmd = self.plexus();
        cmd.arg("apply").arg("-f").arg(&file);
        plexus_testkit::run_ok(&mut cmd, Duration::from_secs(30)).await?;
        Ok(())
    }

    /// Waits until the proxy of `service` reports a workload certificate.
    async fn wait_certificate(&self, service: &str) -> Result<()> {
        let addr: SocketAddr = self.server.trim_start_matches("http://").parse()?;
        eventually(Duration::from_secs(30), || async move {
            let r = client::get(addr, &addr.to_string(), "/api/v1/proxies", &[], Duration::from_secs(10)).await?;
            let list = r.json()?;
            let has = list["proxies"].as_array().is_some_and(|ps| {
                ps.iter().any(|p| {
                    p["service"] == service && p["certificate"]["serial"].as_str().is_some_and(|s| !s.is_empty())
                })
            });
            ensure!(has, "no certificate for the {service} proxy yet: {list}");
            Ok(())
        })
        .await
    }

    /// A workload token for `default/<service_account>` (`plexus token create`).
    async fn token(&self, service_account: &str) -> Result<String> {
        plexus_testkit::workload_token(PLEXUS, &self.server, &self.data, "default", service_account).await
    }
}

fn fastrand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_spans_and_logs_name_the_peer_identities() -> Result<()> {
    let dir = TempDir::new("tracing-mtls")?;
    let (collector, addr, _server) = Collector::start().await?;
    let cp = ControlPlane::start(&dir).await?;
    // MeshConfig turns access logs on for every proxy, `plexus run`'s sidecar included.
    cp.apply(
        &dir,
        &format!(
            "{}---\napiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {{name: echo}}\nspec:\n  selector: {{app: echo}}\n  ports: [{{name: http, port: 8080, appProtocol: http}}]\n",
            mesh_config(&format!("tracing: {{otlpEndpoint: \"{addr}\"}}, accessLog: {{format: json}}"))
        ),
    )
    .await?;
    // The echo app behind `plexus run` (its sidecar is B), its stdout in a file.
    let app = HttpEcho::start("echo").await?;
    let run_log = dir.join("run.out");
    let mut run = cp.plexus();
    run.args(["run", "--service", "echo", "--port", &app.port().to_string(), "--", "sleep", "600"])
        .stdout(std::process::Stdio::from(std::fs::File::create(&run_log)?))
        .stderr(std::process::Stdio::from(std::fs::File::create(dir.join("run.err"))?));
    let _run = run.spawn().context("spawn plexus run")?;
    // A: a client sidecar with a workload token (so it has a certificate).
    let token = cp.token("client").await?;
    #[rustfmt::skip]
    let a = Proxy::start_named("sidecar-a", PLEXUS, [
        "proxy", "--control-plane", &cp.grpc, "--token", &token, "--service", "client", "--service-account", "client",
        "--workload", "client-1", "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0",
        "--upstream", "echo:8080=0",
    ]).await?;
    let upstream = a.upstream("echo.default:8080")?;
    // A connection opened before the certificates arrive stays plaintext: wait for them.
    cp.wait_certificate("client").await?;
    cp.wait_certificate("echo").await?;
    let client_id = "spiffe://plexus.local/ns/default/sa/client";
    let echo_id = "spiffe://plexus.local/ns/default/sa/echo";
    // Until discovery has the echo workload, requests may fail: send a new trace each time
    // until one went through over mutual TLS, and keep its two spans (B's span is the app's
    // parent; A's is B's parent).
    let mut n = 0u32;
    let (trace, app_span, a_span, b) = eventually(Duration::from_secs(60), || {
        n += 1;
        let trace = format!("5b8efff798038103d269b633{n:08x}");
        let collector = &collector;
        async move {
            let r = client::get(
                upstream,
                "echo:8080",
                "/mtls",
                &[("traceparent", &format!("00-{trace}-{CLIENT_SPAN}-01"))],
                Duration::from_secs(10),
            )
            .await?;
            ensure!(r.status == 200, "status {} ({:?}): {}", r.status, r.header("x-plexus-error"), r.text());
            let (_, app_span, _) = traceparent(&r.json()?["headers"])?;
            let (a, b) = eventually(EXPORT_WAIT, || async {
                let spans = collector.trace(&trace);
                let b = spans.iter().find(|r| hex(&r.span.span_id) == app_span).context("no span from B yet")?;
                let a = spans
                    .iter()
                    .find(|r| r.span.span_id == b.span.parent_span_id)
                    .with_context(|| format!("no span from A is B's parent yet: {spans:#?}"))?;
                Ok((a.clone(), b.clone()))
            })
            .await?;
            let security = string_attr(&b.span.attributes, "plexus.connection_security_policy");
            ensure!(security.as_deref() == Some("mutual_tls"), "B received it with {security:?}");
            Ok((trace, app_span, a, b))
        }
    })
    .await?;
    let (a_span, b) = (&a_span, &b);
    assert_eq!(a_span.service, "client");
    assert_eq!(b.service, "echo");
    let attr = |r: &Received, k: &str| string_attr(&r.span.attributes, k);
    assert_eq!(attr(a_span, "plexus.peer.principal").as_deref(), Some(echo_id), "A's peer is the destination");
    assert_eq!(attr(b, "plexus.peer.principal").as_deref(), Some(client_id), "B's peer is the source");
    assert_eq!(attr(a_span, "plexus.source.principal").as_deref(), Some(client_id));
    assert_eq!(attr(b, "plexus.source.principal").as_deref(), Some(client_id));
    for r in [a_span, b] {
        assert_eq!(attr(r, "plexus.connection_security_policy").as_deref(), Some("mutual_tls"));
    }
    // Access logs: A's on its stdout (MeshConfig, no flag), B's in `plexus run`'s output.
    let a_span_id = hex(&a_span.span.span_id);
    let line_a = eventually(Duration::from_secs(5), || async {
        json_lines(&a, "/mtls")
            .into_iter()
            .rfind(|v| v["span_id"] == a_span_id.as_str())
            .with_context(|| format!("no access log line from A for span {a_span_id}: {:?}", a.extra_stdout()))
    })
    .await?;
    let line_b = eventually(Duration::from_secs(5), || async {
        let out = std::fs::read_to_string(&run_log)?;
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .rfind(|v| v["path"] == "/mtls" && v["span_id"] == app_span.as_str())
            .with_context(|| format!("no access log line from B for span {app_span} in:\n{out}"))
    })
    .await?;
    assert_eq!(line_a["source_principal"], client_id, "{line_a}");
    assert_eq!(line_a["destination_principal"], echo_id, "{line_a}");
    assert_eq!(line_b["source_principal"], client_id, "{line_b}");
    assert_eq!(line_b["destination_principal"], echo_id, "{line_b}");
    assert_eq!(line_b["trace_id"], trace);
    assert_eq!(line_b["connection_security_policy"], "mutual_tls");
    Ok(())
}
