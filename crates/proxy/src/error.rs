//! Errors the proxy answers itself, and the one place they become responses (SPEC §5): an HTTP
//! status with `x-plexus-error: <reason>`, or for gRPC requests a `grpc-status` trailer-only
//! response, plus the `response_flags` metric label.

use std::fmt;

use crate::http::body::{self, Body};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

/// The header carrying the reason of a proxy-made response.
pub const ERROR_HEADER: &str = "x-plexus-error";

/// Why the proxy answered a request itself.
#[derive(Debug)]
pub enum ProxyError {
    /// The destination has no endpoint to send to.
    NoEndpoints(String),
    /// A route names a backend Service that does not exist.
    BackendNotFound(String),
    /// Every backend of the matched rule has weight 0.
    NoBackends(String),
    /// The host is neither a mesh Service nor resolvable.
    UnknownDestination(String),
    /// Connecting to the endpoint failed (safe to retry elsewhere: nothing was sent).
    ConnectFailed(std::io::Error),
    /// The upstream closed or reset the connection mid-request.
    UpstreamReset(String),
    /// The request or a try timed out.
    Timeout,
    /// The client's request cannot be proxied.
    BadRequest(String),
    /// The client stopped sending its request body (`--request-body-timeout`).
    RequestBodyTimeout,
    /// A connection limit of the destination is reached (circuit open).
    Overloaded(String),
    /// The destination's rate limit is exhausted; retry after the given time.
    RateLimited { policy: String, retry_after: std::time::Duration },
    /// Authorization denied the request: `policy` is the AuthorizationPolicy or TrafficTarget
    /// (`namespace/name`), or `mesh default (…)`.
    Denied { policy: String },
    /// A FaultInjection aborted the request with this HTTP (or gRPC) status.
    FaultAbort { fault: String, http_status: u16, grpc_status: u16 },
    /// The matched rule cannot be served (e.g. an ExtensionRef to a missing FaultInjection).
    InvalidRoute(String),
    /// The proxy does not forward this at all: a gateway asked for what its configuration does
    /// not define (CONNECT, another host), or a request to the proxy's own listeners.
    Forbidden(String),
    /// `outboundTrafficPolicy: registryOnly` refused a destination that is neither a mesh
    /// Service nor an ExternalService (the destination as the client named it).
    EgressDenied(String),
    /// TLS originated to an ExternalService failed (certificate not verified, handshake).
    OriginationFailed(String),
    /// A gateway has no listener or route for the request (Gateway API: 404).
    NoRoute(String),
    /// An HTTPS request whose `Host` belongs to another listener than the TLS server name
    /// the connection was opened for (RFC 9110 §15.5.20: 421, the client opens a new one).
    Misdirected(String),
    /// An HTTP/1 request head larger than `--max-header-bytes`, or with too many fields.
    HeadTooLarge,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoEndpoints(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BackendNotFound(_) | ProxyError::NoBackends(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::UnknownDestination(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ConnectFailed(_) | ProxyError::UpstreamReset(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Denied { .. } => StatusCode::FORBIDDEN,
            ProxyError::FaultAbort { http_status, .. } => {
                StatusCode::from_u16(*http_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            ProxyError::InvalidRoute(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::EgressDenied(_) | ProxyError::OriginationFailed(_) => StatusCode::BAD_GATEWAY,
            ProxyError::NoRoute(_) => StatusCode::NOT_FOUND,
            ProxyError::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    /// The matching gRPC status code.
    pub fn grpc_status(&self) -> u16 {
        match self {
            ProxyError::Timeout | ProxyError::RequestBodyTimeout => 4, // DEADLINE_EXCEEDED
            ProxyError::BackendNotFound(_) | ProxyError::NoBackends(_) | ProxyError::InvalidRoute(_) => 13, // INTERNAL
            ProxyError::BadRequest(_) => 3,                            // INVALID_ARGUMENT
            ProxyError::RateLimited { .. } => 8,                       // RESOURCE_EXHAUSTED
            ProxyError::Denied { .. } | ProxyError::Forbidden(_) | ProxyError::EgressDenied(_) => 7, // PERMISSION_DENIED
            ProxyError::FaultAbort { grpc_status, .. } => *grpc_status,
            ProxyError::NoRoute(_) => 12, // UNIMPLEMENTED
            _ => 14,                      // UNAVAILABLE
        }
    }

    /// The `response_flags` label value (Envoy's vocabulary where one exists).
    pub fn flag(&self) -> &'static str {
        match self {
            ProxyError::NoEndpoints(_) => "UH",
            ProxyError::BackendNotFound(_) | ProxyError::NoBackends(_) | ProxyError::UnknownDestination(_) => "NR",
            ProxyError::ConnectFailed(_) => "UF",
            ProxyError::UpstreamReset(_) => "UC",
            ProxyError::Timeout => "UT",
            ProxyError::BadRequest(_) => "DPE",
            ProxyError::RequestBodyTimeout => "SI",
            ProxyError::Overloaded(_) => "UO",
            ProxyError::RateLimited { .. } => "RL",
            ProxyError::Denied { .. } => "RBAC",
            ProxyError::FaultAbort { .. } => "FI",
            ProxyError::InvalidRoute(_)
            | ProxyError::Forbidden(_)
            | ProxyError::EgressDenied(_)
            | ProxyError::NoRoute(_) => "NR",
            ProxyError::OriginationFailed(_) => "UF",
            ProxyError::Misdirected(_) | ProxyError::HeadTooLarge => "DPE",
        }
    }

    /// Whether another endpoint may be tried: nothing reached the upstream.
    pub fn retryable(&self) -> bool {
        matches!(self, ProxyError::ConnectFailed(_))
    }

    /// The response sent to the client.
    pub fn into_response(self, grpc: bool) -> Response<Body> {
        let reason = self.to_string();
        let header = HeaderValue::from_str(&reason).unwrap_or(HeaderValue::from_static("proxy error"));
        let mut resp = if grpc {
            let mut r = Response::new(body::empty());
            let h = r.headers_mut();
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(self.grpc_status()));
            h.insert("grpc-message", header.clone());
            r
        } else {
            let mut r = Response::new(body::full(Bytes::from(format!("{reason}\n"))));
            *r.status_mut() = self.status();
            r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            r
        };
        resp.headers_mut().insert(ERROR_HEADER, header);
        if let ProxyError::RateLimited { retry_after, .. } = &self {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::NoEndpoints(d) => write!(f, "no healthy endpoint for {d}"),
            ProxyError::BackendNotFound(b) => write!(f, "backend not found: {b}"),
            ProxyError::NoBackends(r) => write!(f, "no backend with non-zero weight in route {r}"),
            ProxyError::UnknownDestination(h) => write!(f, "unknown destination {h}"),
            ProxyError::ConnectFailed(e) => write!(f, "connection failed: {e}"),
            ProxyError::UpstreamReset(e) => write!(f, "upstream reset: {e}"),
            ProxyError::Timeout => write!(f, "request timeout"),
            ProxyError::BadRequest(r) => write!(f, "bad request: {r}"),
            ProxyError::RequestBodyTimeout => write!(f, "request body timeout"),
            ProxyError::Overloaded(r) => write!(f, "circuit open: {r}"),
            ProxyError::RateLimited { policy, .. } => write!(f, "rate limited by {policy}"),
            ProxyError::Denied { policy } => write!(f, "denied by {policy}"),
            ProxyError::FaultAbort { fault, .. } => write!(f, "fault injected by {fault}"),
            ProxyError::InvalidRoute(r) => write!(f, "invalid route: {r}"),
            ProxyError::Forbidden(r) => write!(f, "not forwarded: {r}"),
            // SPEC §5 names the reason exactly; the destination is in the access log and metric.
            ProxyError::EgressDenied(_) => write!(f, "destination not in the registry"),
            ProxyError::OriginationFailed(r) => write!(f, "TLS origination failed: {r}"),
            ProxyError::NoRoute(r) => write!(f, "no route: {r}"),
            ProxyError::Misdirected(r) => write!(f, "misdirected request: {r}"),
            ProxyError::HeadTooLarge => f.write_str("request head too large"),
        }
    }
}

impl std::error::Error for ProxyError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_grpc_shapes() {
        let r = ProxyError::NoEndpoints("a.default:80".into()).into_response(false);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[ERROR_HEADER], "no healthy endpoint for a.default:80");
        let r = ProxyError::Timeout.into_response(true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(ProxyError::BackendNotFound("x".into()).status(), 500);
    }

    #[test]
    fn denials_are_403_or_permission_denied() {
        let denied = || ProxyError::Denied { policy: "default/reviews".into() };
        let r = denied().into_response(false);
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()[ERROR_HEADER], "denied by default/reviews");
        let r = denied().into_response(true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()["grpc-message"], "denied by default/reviews");
        assert_eq!(denied().flag(), "RBAC");
        assert!(!denied().retryable());
    }

    #[test]
    fn egress_refusals_are_502_with_the_reason_spec_names() {
        let r = ProxyError::EgressDenied("example.com:80".into()).into_response(false);
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()[ERROR_HEADER], "destination not in the registry");
        let r = ProxyError::OriginationFailed("api.test:443: invalid peer certificate: UnknownIssuer".into())
            .into_response(false);
        assert_eq!(r.status(), 502);
        assert_eq!(
            r.headers()[ERROR_HEADER],
            "TLS origination failed: api.test:443: invalid peer certificate: UnknownIssuer"
        );
    }
}
