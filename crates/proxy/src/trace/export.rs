//! The span exporter: finished spans are queued (bounded; a full queue drops and counts) and
//! sent in batches over OTLP/gRPC by a background task, so a request never waits for the
//! collector. One exporter per collector address, shared by every proxy in the process (a
//! span names the proxy that made it); created on first use, so MeshConfig may point tracing
//! at another collector at any time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::Uri;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use super::otlp::collector::ExportTraceServiceRequest;
use super::otlp::collector::trace_service_client::TraceServiceClient;
use super::span::{FinishedSpan, resource_spans};

/// Spans waiting beyond this are dropped (and counted): memory stays bounded when the
/// collector is slow or down.
pub const QUEUE_CAPACITY: usize = 4096;
/// Spans per export request.
pub const MAX_BATCH: usize = 512;
/// How often queued spans are sent (sooner when a full batch is waiting).
pub const EXPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Export problems are logged at most this often (with running totals).
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Counters over every exporter of the process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Accepted by a collector.
    pub exported: u64,
    /// Dropped before sending: the queue was full, or the address is unusable.
    pub dropped: u64,
    /// Sent but not accepted (collector unreachable, an error, or rejected spans).
    pub failed: u64,
}

/// Every exporter of the process, by collector address; read without locking per span.
static EXPORTERS: std::sync::LazyLock<ArcSwap<Vec<Arc<Exporter>>>> =
    std::sync::LazyLock::new(|| ArcSwap::from_pointee(Vec::new()));
/// Serialises the creation of exporters.
static CREATE: Mutex<()> = Mutex::new(());

/// Queues `span` for the collector at `endpoint` (`host:port` or `http://host:port`).
pub fn submit(endpoint: &str, span: FinishedSpan) {
    exporter(endpoint).push(span);
}

/// Sends everything queued now, waiting up to `timeout` (at shutdown and drain).
pub async fn flush(timeout: Duration) {
    let all = EXPORTERS.load_full();
    let work = async {
        for e in all.iter() {
            e.export_queued().await;
        }
    };
    if tokio::time::timeout(timeout, work).await.is_err() {
        tracing::warn!(?timeout, "trace export did not finish flushing in time; queued spans are lost");
    }
}

/// The process's export counters.
pub fn stats() -> ExportStats {
    EXPORTERS.load().iter().fold(ExportStats::default(), |acc, e| ExportStats {
        exported: acc.exported + e.exported.load(Ordering::Relaxed),
        dropped: acc.dropped + e.dropped.load(Ordering::Relaxed),
        failed: acc.failed + e.failed.load(Ordering::Relaxed),
    })
}

fn exporter(endpoint: &str) -> Arc<Exporter> {
    if let Some(e) = EXPORTERS.load().iter().find(|e| e.endpoint == endpoint) {
        return e.clone();
    }
    let _creating = CREATE.lock().unwrap_or_else(PoisonError::into_inner);
    let current = EXPORTERS.load_full();
    if let Some(e) = current.iter().find(|e| e.endpoint == endpoint) {
        return e.clone();
    }
    let e = Arc::new(Exporter::new(endpoint));
    let mut next = Vec::clone(&current);
    next.push(e.clone());
    EXPORTERS.store(Arc::new(next));
    e
}

/// The URI to dial for a configured collector address: `host:port` means plaintext gRPC.
pub fn endpoint_uri(endpoint: &str) -> Result<Uri, String> {
    let e = endpoint.trim();
    let full = if e.contains("://") { e.to_string() } else { format!("http://{e}") };
    let uri: Uri = full.parse().map_err(|_| format!("{endpoint:?} is not host:port or http://host:port"))?;
    match uri.scheme_str() {
        Some("http") if uri.authority().is_some() => Ok(uri),
        Some("https") => Err(format!("{endpoint:?}: TLS to the collector is not supported (use http://)")),
        _ => Err(format!("{endpoint:?} is not host:port or http://host:port")),
    }
}

struct Queue {
    spans: VecDeque<FinishedSpan>,
    /// The background sender, (re)started when a span arrives and it is not running (e.g.
    /// the runtime it ran on is gone).
    worker: Option<JoinHandle<()>>,
}

struct Exporter {
    endpoint: String,
    uri: Result<Uri, String>,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Held while sending: one export in flight at a time, and a flush waits for it.
    client: tokio::sync::Mutex<Option<TraceServiceClient<Channel>>>,
    exported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

impl Exporter {
    fn new(endpoint: &str) -> Exporter {
        Exporter {
            endpoint: endpoint.to_string(),
            uri: endpoint_uri(endpoint),
            queue: Mutex::new(Queue { spans: VecDeque::new(), worker: None }),
            wake: Notify::new(),
            client: tokio::sync::Mutex::new(None),
            exported: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        }
    }

    fn push(self: &Arc<Self>, span: FinishedSpan) {
        if let Err(reason) = &self.uri {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.warn(&format!("spans are not exported: {reason}"));
            return;
        }
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if q.spans.len() >= QUEUE_CAPACITY {
            drop(q);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.warn("the span queue is full (the collector is slow or unreachable): spans dropped");
            return;
        }
        q.spans.push_back(span);
        let full_batch = q.spans.len() >= MAX_BATCH;
        if q.worker.as_ref().is_none_or(JoinHandle::is_finished)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            q.worker = Some(rt.spawn(self.clone().run()));
        }
        drop(q);
        if full_batch {
            self.wake.notify_one();
        }
    }

    async fn run(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(EXPORT_INTERVAL) => {}
                _ = self.wake.notified() => {}
            }
            self.export_queued().await;
        }
    }

    /// Sends the queue's spans, batch by batch, until it is empty.
    async fn export_queued(&self) {
        let mut client = self.client.lock().await;
        loop {
            let batch: Vec<FinishedSpan> = {
                let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                let n = q.spans.len().min(MAX_BATCH);
                q.spans.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            self.send(&mut client, batch).await;
        }
    }

    async fn send(&self, client: &mut Option<TraceServiceClient<Channel>>, batch: Vec<FinishedSpan>) {
        let n = batch.len() as u64;
        let uri = match &self.uri {
            Ok(u) => u,
            Err(_) => {
                self.dropped.fetch_add(n, Ordering::Relaxed);
                return;
            }
        };
        // A lazy channel connects on first use and reconnects after failures by itself.
        let c = client.get_or_insert_with(|| {
            TraceServiceClient::new(
                Endpoint::from(uri.clone()).connect_timeout(CONNECT_TIMEOUT).timeout(EXPORT_TIMEOUT).connect_lazy(),
            )
        });
        let request = ExportTraceServiceRequest { resource_spans: resource_spans(batch) };
        match tokio::time::timeout(EXPORT_TIMEOUT, c.export(request)).await {
            Ok(Ok(resp)) => {
                let rejected = resp
                    .get_ref()
                    .partial_success
                    .as_ref()
                    .map(|p| u64::try_from(p.rejected_spans).unwrap_or(0).min(n))
                    .unwrap_or(0);
                self.exported.fetch_add(n - rejected, Ordering::Relaxed);
                if rejected > 0 {
                    self.failed.fetch_add(rejected, Ordering::Relaxed);
                    self.warn(&format!("the collector rejected {rejected} spans"));
                }
            }
            Ok(Err(status)) => {
                self.failed.fetch_add(n, Ordering::Relaxed);
                self.warn(&format!("export failed: {}: {}", status.code(), status.message()));
            }
            Err(_) => {
                self.failed.fetch_add(n, Ordering::Relaxed);
                self.warn("export timed out");
                *client = None;
            }
        }
    }

    /// Logs a problem at most every [`WARN_EVERY`], with the running totals.
    fn warn(&self, what: &str) {
        let mut last = self.last_warning.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        tracing::warn!(
            collector = %self.endpoint,
            dropped = self.dropped.load(Ordering::Relaxed),
            failed = self.failed.load(Ordering::Relaxed),
            "trace export: {what}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::otlp::collector::ExportTraceServiceResponse;
    use crate::trace::otlp::collector::trace_service_server::{TraceService, TraceServiceServer};
    use crate::trace::span::{Kind, ProxyResource};
    use crate::trace::{SpanId, TraceId};

    fn span(n: u8) -> FinishedSpan {
        FinishedSpan {
            resource: ProxyResource { service: "a".into(), workload: "a-1".into(), namespace: "default".into() },
            trace_id: TraceId([7; 16]),
            span_id: SpanId([n.max(1); 8]),
            parent_span_id: None,
            tracestate: None,
            name: "GET b".into(),
            kind: Kind::Client,
            start: std::time::SystemTime::now(),
            end: std::time::SystemTime::now(),
            attributes: Vec::new(),
            error: false,
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        // No runtime here, so nothing is sent: the queue only fills.
        let e = Arc::new(Exporter::new("127.0.0.1:9"));
        for _ in 0..QUEUE_CAPACITY + 10 {
            e.push(span(1));
        }
        assert_eq!(e.dropped.load(Ordering::Relaxed), 10);
        assert_eq!(e.queue.lock().map(|q| q.spans.len()).unwrap_or_default(), QUEUE_CAPACITY);
        let bad = Arc::new(Exporter::new("https://collector:4317"));
        bad.push(span(1));
        assert_eq!(bad.dropped.load(Ordering::Relaxed), 1);
    }

    /// Counts the spans it receives.
    #[derive(Default, Clone)]
    struct Collector(Arc<Mutex<Vec<Vec<u8>>>>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut got = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            for rs in request.into_inner().resource_spans {
                for ss in rs.scope_spans {
                    got.extend(ss.spans.into_iter().map(|s| s.span_id));
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exports_in_batches_and_flushes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let collector = Collector::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        let e = Arc::new(Exporter::new(&addr.to_string()));
        // More than a batch: the worker is woken at a full batch, the rest goes by flush.
        for n in 0..(MAX_BATCH + 3) {
            e.push(span((n % 250) as u8));
        }
        tokio::time::timeout(Duration::from_secs(10), e.export_queued()).await.expect("flush in time");
        let got = collector.0.lock().map(|g| g.len()).unwrap_or_default();
        assert_eq!(got, MAX_BATCH + 3);
        assert_eq!(e.exported.load(Ordering::Relaxed), (MAX_BATCH + 3) as u64);
        assert_eq!(e.failed.load(Ordering::Relaxed), 0);
        server.abort();
        // No collector: the batch fails and is counted, and the export ends.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
        let down = Arc::new(Exporter::new(&closed.to_string()));
        down.push(span(1));
        tokio::time::timeout(Duration::from_secs(10), down.export_queued()).await.expect("a failed export ends");
        assert_eq!(down.failed.load(Ordering::Relaxed), 1);
        assert_eq!(down.exported.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn collector_addresses() {
        assert_eq!(endpoint_uri("127.0.0.1:4317").map(|u| u.to_string()), Ok("http://127.0.0.1:4317/".into()));
        assert_eq!(endpoint_uri("http://otel:4317").map(|u| u.to_string()), Ok("http://otel:4317/".into()));
        assert!(endpoint_uri("https://otel:4317").is_err_and(|e| e.contains("TLS")));
        assert!(endpoint_uri("ftp://otel").is_err());
        assert!(endpoint_uri("not a uri").is_err());
    }
}
