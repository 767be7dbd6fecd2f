//! Recording one request: metrics when its response ends, and the JSON access log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use http::Response;

use super::body::{self, Body, BodyEnd, Metered};
use crate::error::ProxyError;
use crate::metrics::{PeerLabels, RequestLabels};
use crate::proxy::State;

/// What is known about a request while it is proxied.
pub struct Observation {
    pub state: Arc<State>,
    pub started: Instant,
    pub direction: &'static str,
    pub peers: PeerLabels,
    pub route: String,
    pub grpc: bool,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub request_id: String,
    pub upstream: Option<SocketAddr>,
    pub security: &'static str,
    request_bytes: Arc<AtomicU64>,
}

impl Observation {
    pub fn new(state: Arc<State>, direction: &'static str, head: &super::Head, request_id: String) -> Self {
        Observation {
            state,
            started: Instant::now(),
            direction,
            peers: PeerLabels::default(),
            route: "default".into(),
            grpc: super::headers::is_grpc(&head.headers),
            method: head.method.to_string(),
            authority: head.authority().unwrap_or_default(),
            path: head.uri.path().to_string(),
            request_id,
            upstream: None,
            security: "none",
            request_bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Wraps the request body so its size is counted.
    pub fn count_request_body(&self, b: Body) -> Body {
        let counter = self.request_bytes.clone();
        body::boxed(Metered::new(b, Box::new(move |n, _, _| counter.store(n, Ordering::Relaxed))))
    }

    /// Answers with a proxy-made error response.
    pub fn fail(self, err: ProxyError) -> Response<Body> {
        tracing::debug!(error = %err, authority = %self.authority, path = %self.path, "request failed");
        let flag = err.flag();
        let resp = err.into_response(self.grpc);
        self.respond(resp, flag)
    }

    /// Passes the response on; metrics are recorded when its body ends.
    pub fn respond(self, resp: Response<Body>, flags: &'static str) -> Response<Body> {
        let (parts, b) = resp.into_parts();
        let status = parts.status.as_u16();
        let header_grpc = parts.headers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<u16>().ok());
        let grpc = self.grpc || super::headers::is_grpc(&parts.headers);
        let metered = Metered::new(
            b,
            Box::new(move |resp_bytes, end, trailer_grpc| {
                let grpc_status = match (header_grpc.or(trailer_grpc), grpc) {
                    (Some(s), _) => s.to_string(),
                    (None, true) if end != BodyEnd::Complete => "unknown".into(),
                    (None, _) => String::new(),
                };
                let flags = match (flags, end) {
                    ("-", BodyEnd::Dropped) => "DC",
                    ("-", BodyEnd::Error) => "UC",
                    (f, _) => f,
                };
                self.record(status, grpc_status, flags, resp_bytes);
            }),
        );
        Response::from_parts(parts, body::boxed(metered))
    }

    fn record(self, status: u16, grpc_status: String, flags: &str, resp_bytes: u64) {
        let m = &self.state.metrics;
        let elapsed = self.started.elapsed();
        let req_bytes = self.request_bytes.load(Ordering::Relaxed);
        let labels = RequestLabels {
            direction: self.direction.into(),
            peers: self.peers.clone(),
            route: self.route.clone(),
            request_protocol: if self.grpc { "grpc" } else { "http" }.into(),
            response_code: status.to_string(),
            grpc_response_status: grpc_status,
            response_flags: flags.into(),
            connection_security_policy: self.security.into(),
        };
        let success = status < 500 && (labels.grpc_response_status.is_empty() || labels.grpc_response_status == "0");
        self.state.telemetry.record(
            self.direction,
            &labels.peers,
            &self.route,
            success,
            self.security == "mutual_tls",
            elapsed,
        );
        let series = m.request(&labels);
        series.requests.inc();
        series.duration.observe(elapsed.as_secs_f64());
        series.request_bytes.inc_by(req_bytes);
        series.response_bytes.inc_by(resp_bytes);
        if self.state.settings.access_log {
            let line = serde_json::json!({
                "time": plexus_core::time::rfc3339(SystemTime::now()),
                "direction": self.direction,
                "request_id": self.request_id,
                "method": self.method,
                "authority": self.authority,
                "path": self.path,
                "status": status,
                "grpc_status": labels.grpc_response_status,
                "flags": flags,
                "route": self.route,
                "source_workload": labels.peers.source_workload,
                "destination_service": labels.peers.destination_service,
                "destination_workload": labels.peers.destination_workload,
                "upstream": self.upstream.map(|a| a.to_string()),
                "duration_ms": elapsed.as_secs_f64() * 1000.0,
                "request_bytes": req_bytes,
                "response_bytes": resp_bytes,
            });
            // A closed stdout must not fail the request.
            use std::io::Write as _;
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        }
    }
}
