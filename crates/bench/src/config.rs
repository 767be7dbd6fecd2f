//! What a run does: target, protocol, load model, sizes and times.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};

use crate::error::BenchError;

/// The protocol spoken to the target (cleartext; HTTP/2 and gRPC with prior knowledge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1, one request in flight per connection.
    Http1,
    /// HTTP/2 (h2c), up to `streams` requests in flight per connection.
    Http2,
    /// gRPC unary calls over HTTP/2; the body is one length-prefixed message.
    Grpc,
}

impl Protocol {
    /// `http1`, `http2` or `grpc`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }

    /// Whether requests are multiplexed on HTTP/2 connections.
    pub fn multiplexed(self) -> bool {
        !matches!(self, Protocol::Http1)
    }
}

/// How load is offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Open model: this many requests per second, each with an intended send time; latency
    /// is measured from it (coordinated omission corrected).
    ConstantRate(f64),
    /// Closed loop at maximum throughput: the next request goes as soon as a connection (or
    /// stream) is free; latencies are service times, not corrected.
    MaxThroughput,
}

impl Load {
    /// The requested rate, `None` in closed-loop mode.
    pub fn rate(self) -> Option<f64> {
        match self {
            Load::ConstantRate(r) => Some(r),
            Load::MaxThroughput => None,
        }
    }

    /// `constant-rate` or `closed-loop`.
    pub fn mode(self) -> &'static str {
        match self {
            Load::ConstantRate(_) => "constant-rate",
            Load::MaxThroughput => "closed-loop",
        }
    }
}

/// The highest rate accepted: one request per microsecond is far beyond what one machine's
/// generator can send, and keeps the schedule's arithmetic exact.
pub const MAX_RATE: f64 = 1_000_000.0;

/// A complete description of one run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// `http://host:port/path?query`.
    pub url: String,
    pub protocol: Protocol,
    pub load: Load,
    /// The measured part of the run (after the warm-up).
    pub duration: Duration,
    /// Load sent at the same rate before measuring starts; its results are discarded.
    pub warmup: Duration,
    /// TCP connections to the target.
    pub connections: usize,
    /// Requests in flight per connection for HTTP/2 and gRPC (ignored for HTTP/1.1).
    pub streams: usize,
    /// OS threads, each running a single-threaded runtime with its share of the connections.
    pub threads: usize,
    /// HTTP/1.1 only: reuse connections (`true`) or open a new one per request (`false`).
    pub keepalive: bool,
    pub method: Method,
    /// Extra request headers (a `Host` header sets the authority).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The request body; for gRPC the serialized protobuf message (framed by the generator).
    pub body: Bytes,
    /// Per-request timeout (connecting, sending and reading the whole response).
    pub timeout: Duration,
    /// gRPC: `package.Service/Method`; when `None` the URL's path names it.
    pub grpc_method: Option<String>,
}

impl BenchConfig {
    /// A configuration with the defaults of `plexus bench` for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        BenchConfig {
            url: url.into(),
            protocol: Protocol::Http1,
            load: Load::ConstantRate(100.0),
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            connections: 10,
            streams: 10,
            threads: 1,
            keepalive: true,
            method: Method::GET,
            headers: Vec::new(),
            body: Bytes::new(),
            timeout: Duration::from_secs(10),
            grpc_method: None,
        }
    }

    /// Checks the numbers; the URL is checked when it is resolved ([`crate::Target`]).
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: String| Err(BenchError::Config(m));
        if let Load::ConstantRate(r) = self.load
            && !(r.is_finite() && r > 0.0 && r <= MAX_RATE)
        {
            return bad(format!("rate must be a number of requests per second in (0, {MAX_RATE}], got {r}"));
        }
        if self.duration.is_zero() {
            return bad("duration must be positive".into());
        }
        if self.duration > Duration::from_secs(24 * 3600) || self.warmup > Duration::from_secs(3600) {
            return bad("duration is limited to 24h and warm-up to 1h".into());
        }
        if self.connections == 0 || self.connections > 10_000 {
            return bad(format!("connections must be between 1 and 10000, got {}", self.connections));
        }
        if self.streams == 0 || self.streams > 1000 {
            return bad(format!("streams must be between 1 and 1000, got {}", self.streams));
        }
        if self.threads == 0 || self.threads > 256 {
            return bad(format!("threads must be between 1 and 256, got {}", self.threads));
        }
        if self.timeout.is_zero() {
            return bad("timeout must be positive".into());
        }
        if self.protocol == Protocol::Grpc && self.body.len() > u32::MAX as usize {
            return bad("gRPC payload larger than 4 GiB".into());
        }
        Ok(())
    }

    /// Requests in flight per connection at most.
    pub fn per_connection(&self) -> usize {
        if self.protocol.multiplexed() { self.streams } else { 1 }
    }

    /// Threads actually used: never more than connections.
    pub fn effective_threads(&self) -> usize {
        self.threads.clamp(1, self.connections.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        BenchConfig::new("http://127.0.0.1:1/").validate().expect("defaults are valid");
    }

    #[test]
    fn rejects_bad_numbers() {
        let mut c = BenchConfig::new("http://127.0.0.1:1/");
        c.load = Load::ConstantRate(0.0);
        assert!(c.validate().is_err());
        c.load = Load::ConstantRate(f64::NAN);
        assert!(c.validate().is_err());
        c.load = Load::MaxThroughput;
        c.connections = 0;
        assert!(c.validate().is_err());
        c.connections = 1;
        c.duration = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    #[test]
    fn threads_never_exceed_connections() {
        let mut c = BenchConfig::new("http://127.0.0.1:1/");
        c.connections = 2;
        c.threads = 8;
        assert_eq!(c.effective_threads(), 2);
        c.protocol = Protocol::Http1;
        assert_eq!(c.per_connection(), 1);
        c.protocol = Protocol::Http2;
        assert_eq!(c.per_connection(), 10);
    }
}
