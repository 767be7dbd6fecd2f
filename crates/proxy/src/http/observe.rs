//! Observing one request: its request id and trace span, made when it arrives; then, when its
//! response body ends, metrics, the traffic summary, the access log line and the span.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use http::{Request, Response, Version};

use super::access_log::{self, Format};
use super::body::{self, Body, BodyEnd, ClientBody, ClientBodyState, Metered};
use super::{Head, headers};
use crate::error::ProxyError;
use crate::metrics::{PeerLabels, RequestKey, UNKNOWN};
use crate::proxy::State;
use crate::tap::Notes;
use crate::trace::span::{FinishedSpan, Kind, ProxyResource, Value};
use crate::trace::{SpanContext, TracingConfig};

/// What is known about a request while it is proxied. Its fields live in a box of their own
/// (reached through `Deref`): the observation is moved with the request's futures and into its
/// response body, and each move copies a pointer instead of the ~500 bytes of labels, URI and
/// ids.
pub struct Observation(Box<Observed>);

/// The fields of an [`Observation`].
pub struct Observed {
    pub state: Arc<State>,
    pub started: Instant,
    pub direction: &'static str,
    pub peers: PeerLabels,
    pub route: crate::metrics::Label,
    pub grpc: bool,
    pub method: http::Method,
    /// The URI and `Host` as received (before normalization), for tap, access logs and spans:
    /// shared copies, read only when one of those wants them.
    uri: http::Uri,
    host: Option<http::HeaderValue>,
    /// The `x-request-id` value (a shared copy of the header's).
    pub request_id: http::HeaderValue,
    pub upstream: Option<SocketAddr>,
    pub security: &'static str,
    /// This proxy's span of the request; its ids are in the headers sent on.
    pub span: SpanContext,
    /// Decisions and retries, recorded while someone taps ([`crate::tap`]).
    pub notes: Notes,
    version: Version,
    /// The collector the span goes to (MeshConfig `tracing.otlpEndpoint`, sampled traces only).
    export_to: Option<String>,
    access_log: Option<Format>,
    /// Made when the request has a body to read ([`Observation::request_body`]).
    request_body: Option<Arc<ClientBodyState>>,
    /// Recorded (metrics, access log, tap, span): once, by its response's end or its drop.
    recorded: bool,
}

/// A request dropped before its response started — its client went away (a reset HTTP/2
/// stream, an HTTP/1 connection reset or closed mid-request), which cancels its upstream
/// request — is still recorded: response code 0, flag `DC` (downstream connection
/// termination, Envoy's vocabulary), as one whose response body the client did not read to its
/// end is.
impl Drop for Observation {
    fn drop(&mut self) {
        if !self.0.recorded {
            self.record_once(0, String::new(), "DC", 0);
        }
    }
}

impl std::ops::Deref for Observation {
    type Target = Observed;

    fn deref(&self) -> &Observed {
        &self.0
    }
}

impl std::ops::DerefMut for Observation {
    fn deref_mut(&mut self) -> &mut Observed {
        &mut self.0
    }
}

impl Observation {
    /// Starts observing `req` as it arrives: `x-request-id` is generated when absent, and the
    /// trace it carries is continued with a span of this proxy (or a new trace started, with
    /// MeshConfig's sampling rate), its headers rewritten for the next hop. Returns the
    /// request's head, with those headers (moved out of `req`), and the observation.
    pub fn start<B>(state: Arc<State>, direction: &'static str, req: &mut Request<B>) -> (Head, Observation) {
        let snapshot = state.discovery.current();
        let mesh = &snapshot.mesh.config;
        let tracing = TracingConfig::of(mesh);
        let span = SpanContext::continue_from(req.headers(), || tracing.sample_new());
        // The received `x-request-id`, `Host` and `content-type` (each its first value), found
        // in one pass over the names instead of a lookup (a hash of the name) each.
        let (mut id, mut host, mut content_type) = (None, None, None);
        for (name, value) in req.headers() {
            if *name == http::header::HOST {
                host = host.or(Some(value));
            } else if *name == http::header::CONTENT_TYPE {
                content_type = content_type.or(Some(value));
            } else if *name == headers::REQUEST_ID {
                id = id.or(Some(value));
            }
        }
        let grpc = content_type.is_some_and(headers::is_grpc_content_type);
        let (host, id) = (host.cloned(), id.cloned());
        let request_id = headers::stamp(req.headers_mut(), &span, id);
        let head = Head::take(req);
        let obs = Observation(Box::new(Observed {
            started: crate::clock::now(),
            direction,
            peers: PeerLabels::default(),
            route: crate::metrics::default_route(),
            grpc,
            method: head.method.clone(),
            uri: head.uri.clone(),
            host,
            request_id,
            upstream: None,
            security: "none",
            version: head.version,
            export_to: tracing.otlp_endpoint.filter(|_| span.sampled),
            access_log: access_log::format(mesh, state.settings.access_log),
            span,
            notes: Notes::new(state.tap.active()),
            request_body: None,
            recorded: false,
            state,
        }));
        (head, obs)
    }
}

impl Observed {
    /// The authority the client addressed (absolute-form URI or `:authority`, else `Host`).
    pub fn authority(&self) -> &str {
        self.uri.authority().map(|a| a.as_str()).or_else(|| self.host.as_ref()?.to_str().ok()).unwrap_or_default()
    }

    /// The path as received.
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// The client's request body as forwarded: its size counted, its failures (malformed,
    /// stalled longer than `--request-body-timeout`) answered as the client's (400, 408).
    pub fn request_body(&mut self, b: body::ReceivedBody) -> Body {
        let timeout = self.state.settings.limits.request_body_timeout;
        let state = self.request_body.get_or_insert_with(Arc::default).clone();
        body::boxed(ClientBody::new(b, state, timeout))
    }
}

impl Observation {
    /// Answers with a proxy-made error response.
    pub fn fail(self, err: ProxyError) -> Response<Body> {
        // A request whose body the client broke fails because of it, whatever the upstream
        // made of it: the client gets the proxy's own answer, no upstream error text.
        let err = self.request_body.as_ref().and_then(|b| b.failure()).unwrap_or(err);
        tracing::debug!(error = %err, authority = %self.authority(), path = %self.path(), "request failed");
        let flag = err.flag();
        let resp = err.into_response(self.grpc);
        self.respond(resp, flag)
    }

    /// Passes the response on; metrics are recorded when its body ends. The body (an
    /// upstream's as hyper gives it, or the proxy's own) is boxed once, with its metering.
    pub fn respond<B>(self, resp: Response<B>, flags: &'static str) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<crate::BoxError>,
    {
        if let Some(b) = &self.request_body {
            b.responded();
        }
        let (parts, b) = resp.into_parts();
        let status = parts.status.as_u16();
        // `grpc-status` and `content-type`, each its first value, found in one pass over the
        // names (a lookup by name hashes it).
        let (mut grpc_status, mut content_type) = (None, None);
        for (name, value) in &parts.headers {
            if grpc_status.is_none() && name == headers::GRPC_STATUS {
                grpc_status = Some(value);
            } else if content_type.is_none() && name == http::header::CONTENT_TYPE {
                content_type = Some(value);
            }
        }
        let header_grpc = grpc_status.and_then(|v| v.to_str().ok()?.parse::<u16>().ok());
        let grpc = self.grpc || content_type.is_some_and(headers::is_grpc_content_type);
        let metered = Metered::new(b, move |resp_bytes, end, trailer_grpc| {
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
        });
        Response::from_parts(parts, body::boxed(metered))
    }

    fn record(mut self, status: u16, grpc_status: String, flags: &'static str, resp_bytes: u64) {
        self.record_once(status, grpc_status, flags, resp_bytes);
    }

    fn record_once(&mut self, status: u16, grpc_status: String, flags: &'static str, resp_bytes: u64) {
        if std::mem::replace(&mut self.0.recorded, true) {
            return;
        }
        let m = &self.state.metrics;
        // One time: the duration and the series' last use.
        let now = crate::clock::now();
        let elapsed = now.saturating_duration_since(self.started);
        let req_bytes = self.request_body.as_ref().map_or(0, |b| b.bytes.load(Ordering::Relaxed));
        let success = status < 500 && (grpc_status.is_empty() || grpc_status == "0");
        self.state.telemetry.record(
            self.direction,
            &self.peers,
            &self.route,
            success,
            self.security == "mutual_tls",
            elapsed,
        );
        // The observation's labels by reference: a label set is built only for a new series.
        let labels = RequestKey {
            direction: self.direction,
            peers: &self.peers,
            route: &self.route,
            request_protocol: if self.grpc { "grpc" } else { "http" },
            response_code: status,
            grpc_response_status: &grpc_status,
            response_flags: flags,
            connection_security_policy: self.security,
        };
        m.request(&labels, now, |series| {
            series.requests.inc();
            series.duration.observe(elapsed.as_secs_f64());
            series.request_bytes.inc_by(req_bytes);
            series.response_bytes.inc_by(resp_bytes);
        });
        if self.access_log.is_none() && self.export_to.is_none() && !self.notes.on() {
            return;
        }
        let mut peers = self.peers.clone();
        // This sidecar's own identity is the source of what it sends out.
        if self.direction == "outbound"
            && &*peers.source_principal == UNKNOWN
            && let Some(id) = self.state.settings.identity.as_ref().and_then(|i| i.spiffe_id())
        {
            peers.source_principal = id;
        }
        // The wall-clock start, read only for these (one clock read per request fewer).
        let started_at = SystemTime::now().checked_sub(elapsed).unwrap_or(SystemTime::UNIX_EPOCH);
        let done = Done { status, grpc_status, flags, req_bytes, resp_bytes, elapsed, started_at, peers, success };
        if self.notes.on() {
            self.state.tap.publish(self.tap_event(&done));
        }
        if let Some(format) = self.access_log {
            access_log::write(&self.log_entry(&done).render(format));
        }
        if let Some(endpoint) = &self.export_to {
            crate::trace::export::submit(endpoint, self.finished_span(done));
        }
    }

    fn protocol(&self) -> &'static str {
        match self.version {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }
    }

    fn log_entry<'a>(&'a self, d: &'a Done<'a>) -> access_log::Entry<'a> {
        access_log::Entry {
            time: plexus_core::time::rfc3339(d.started_at),
            trace_id: self.span.trace_id.to_string(),
            span_id: self.span.span_id.to_string(),
            parent_span_id: self.span.parent_span_id.map(|p| p.to_string()),
            sampled: self.span.sampled,
            request_id: self.request_id.to_str().unwrap_or_default(),
            direction: self.direction,
            source_workload: &d.peers.source_workload,
            source_service: &d.peers.source_service,
            source_principal: &d.peers.source_principal,
            destination_service: &d.peers.destination_service,
            destination_workload: &d.peers.destination_workload,
            destination_version: &d.peers.destination_version,
            destination_principal: &d.peers.destination_principal,
            route: &self.route,
            protocol: self.protocol(),
            method: self.method.as_str(),
            authority: self.authority(),
            path: self.path(),
            status: d.status,
            grpc_status: &d.grpc_status,
            response_flags: d.flags,
            duration_ms: d.elapsed.as_secs_f64() * 1000.0,
            request_bytes: d.req_bytes,
            response_bytes: d.resp_bytes,
            upstream: self.upstream.map(|a| a.to_string()),
            connection_security_policy: self.security,
        }
    }

    fn tap_event(&self, d: &Done<'_>) -> plexus_core::tap::TapEvent {
        use plexus_core::tap::{TapEvent, TapPeer};
        let noted = self.notes.take();
        let p = &d.peers;
        TapEvent {
            time: plexus_core::time::rfc3339(d.started_at),
            proxy: self.state.settings.workload.clone().unwrap_or_else(|| UNKNOWN.into()),
            direction: self.direction.into(),
            method: self.method.to_string(),
            authority: self.authority().to_string(),
            path: self.path().to_string(),
            status: d.status,
            grpc_status: d.grpc_status.parse().ok(),
            latency_ms: d.elapsed.as_secs_f64() * 1000.0,
            source: TapPeer {
                workload: p.source_workload.to_string(),
                service: p.source_service.to_string(),
                principal: p.source_principal.to_string(),
                ..TapPeer::default()
            },
            destination: TapPeer {
                workload: p.destination_workload.to_string(),
                service: p.destination_service.to_string(),
                principal: p.destination_principal.to_string(),
                version: p.destination_version.to_string(),
                endpoint: self.upstream.map(|a| a.to_string()).unwrap_or_default(),
            },
            route: self.route.to_string(),
            tls: self.security == "mutual_tls",
            retries: noted.retries,
            flags: d.flags.into(),
            decisions: noted.decisions,
            request_id: self.request_id.to_str().unwrap_or_default().to_string(),
            trace_id: self.span.trace_id.to_string(),
        }
    }

    /// The span: a client span on the outbound side, a server span on the inbound side.
    fn finished_span(&self, d: Done<'_>) -> FinishedSpan {
        let s = &self.state.settings;
        let resource = ProxyResource {
            service: s.service.clone().or_else(|| s.workload.clone()).unwrap_or_else(|| UNKNOWN.into()),
            workload: s.workload.clone().unwrap_or_else(|| UNKNOWN.into()),
            namespace: s.namespace.clone(),
        };
        let (kind, peer_principal) = match self.direction {
            "inbound" => (Kind::Server, d.peers.source_principal.to_string()),
            _ => (Kind::Client, d.peers.destination_principal.to_string()),
        };
        let str = |v: &str| Value::Str(v.to_string());
        let p = d.peers;
        let mut attributes = vec![
            ("plexus.direction", str(self.direction)),
            ("plexus.route", str(&self.route)),
            ("http.request.method", str(self.method.as_str())),
            ("http.response.status_code", Value::Int(i64::from(d.status))),
            ("url.path", str(self.path())),
            ("server.address", str(self.authority())),
            ("network.protocol.version", str(self.protocol().trim_start_matches("HTTP/"))),
            ("plexus.request_id", str(self.request_id.to_str().unwrap_or_default())),
            ("plexus.response_flags", str(d.flags)),
            ("plexus.peer.principal", Value::Str(peer_principal)),
            ("plexus.connection_security_policy", str(self.security)),
            ("http.request.body.size", Value::Int(d.req_bytes.min(i64::MAX as u64) as i64)),
            ("http.response.body.size", Value::Int(d.resp_bytes.min(i64::MAX as u64) as i64)),
        ];
        if let Some(up) = self.upstream {
            attributes.push(("plexus.upstream.address", Value::Str(up.to_string())));
        }
        if let Ok(code) = d.grpc_status.parse::<i64>() {
            attributes.push(("rpc.grpc.status_code", Value::Int(code)));
        }
        attributes.extend([
            ("plexus.source.workload", Value::Str(p.source_workload.to_string())),
            ("plexus.source.service", Value::Str(p.source_service.to_string())),
            ("plexus.source.principal", Value::Str(p.source_principal.to_string())),
            ("plexus.destination.workload", Value::Str(p.destination_workload.to_string())),
            ("plexus.destination.version", Value::Str(p.destination_version.to_string())),
            ("plexus.destination.principal", Value::Str(p.destination_principal.to_string())),
        ]);
        let name = format!("{} {}", self.method, p.destination_service);
        attributes.push(("plexus.destination.service", Value::Str(p.destination_service.to_string())));
        FinishedSpan {
            resource,
            trace_id: self.span.trace_id,
            span_id: self.span.span_id,
            parent_span_id: self.span.parent_span_id,
            tracestate: self.span.tracestate.clone(),
            name,
            kind,
            start: d.started_at,
            end: d.started_at + d.elapsed,
            attributes,
            error: !d.success || d.flags != "-",
        }
    }
}

/// How a request ended.
struct Done<'a> {
    status: u16,
    grpc_status: String,
    flags: &'a str,
    req_bytes: u64,
    resp_bytes: u64,
    elapsed: std::time::Duration,
    /// When the request arrived (wall clock).
    started_at: SystemTime,
    peers: PeerLabels,
    success: bool,
}
