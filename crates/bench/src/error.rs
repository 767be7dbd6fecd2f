//! Errors of a run (it could not start) and kinds of failed requests (counted, not fatal).

use std::fmt;

/// Why a run could not start or its results could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Invalid numbers or options.
    #[error("{0}")]
    Config(String),
    /// The URL is not one the generator can use.
    #[error("invalid URL {url:?}: {why}")]
    Url { url: String, why: String },
    /// The target's host name did not resolve.
    #[error("cannot resolve {host}: {why}")]
    Resolve { host: String, why: String },
    /// Nothing accepted a connection at the target before the run (checked once, so a typo
    /// fails at once rather than after a whole run of connect errors).
    #[error("cannot connect to {addr}: {why}")]
    Unreachable { addr: String, why: String },
    /// A generator thread could not start or ended abnormally.
    #[error("load generator: {0}")]
    Runtime(String),
    /// Reading or writing a results file.
    #[error("{path}: {why}")]
    File { path: String, why: String },
}

/// Why one request failed. Requests that got a whole response are "completed" even when
/// their status says failure ([`ErrorKind::Status`], [`ErrorKind::Grpc`]): their latency is
/// recorded and they are also counted here; the other kinds have no latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// TCP connect or the HTTP/2 handshake failed.
    Connect,
    /// No complete response within the timeout.
    Timeout,
    /// The connection closed or reset while the request was in flight.
    Reset,
    /// The peer broke the protocol (malformed response, refused stream, ...).
    Protocol,
    /// A response with a status outside 2xx.
    Status(u16),
    /// A gRPC response whose `grpc-status` is not 0 (or missing: reported as 2, UNKNOWN).
    Grpc(u32),
}

impl ErrorKind {
    /// Whether the request still got a whole response (so it has a latency).
    pub fn has_response(self) -> bool {
        matches!(self, ErrorKind::Status(_) | ErrorKind::Grpc(_))
    }

    /// A stable machine-readable key: `connect`, `timeout`, `reset`, `protocol`,
    /// `http_503`, `grpc_14`.
    pub fn key(self) -> String {
        match self {
            ErrorKind::Connect => "connect".into(),
            ErrorKind::Timeout => "timeout".into(),
            ErrorKind::Reset => "reset".into(),
            ErrorKind::Protocol => "protocol".into(),
            ErrorKind::Status(s) => format!("http_{s}"),
            ErrorKind::Grpc(c) => format!("grpc_{c}"),
        }
    }

    /// Parses [`ErrorKind::key`].
    pub fn from_key(key: &str) -> Option<ErrorKind> {
        Some(match key {
            "connect" => ErrorKind::Connect,
            "timeout" => ErrorKind::Timeout,
            "reset" => ErrorKind::Reset,
            "protocol" => ErrorKind::Protocol,
            k => {
                if let Some(s) = k.strip_prefix("http_") {
                    ErrorKind::Status(s.parse().ok()?)
                } else {
                    ErrorKind::Grpc(k.strip_prefix("grpc_")?.parse().ok()?)
                }
            }
        })
    }
}

/// gRPC status code names (grpc/doc/statuscodes.md).
fn grpc_code_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(code as usize).copied().unwrap_or("?")
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Connect => f.write_str("connect failed"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::Reset => f.write_str("connection closed or reset"),
            ErrorKind::Protocol => f.write_str("protocol error"),
            ErrorKind::Status(s) => write!(f, "HTTP {s}"),
            ErrorKind::Grpc(c) => write!(f, "gRPC status {c} ({})", grpc_code_name(*c)),
        }
    }
}

/// Classifies a hyper error of an exchange.
pub(crate) fn classify(e: &hyper::Error) -> ErrorKind {
    if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_parse() || e.is_parse_status() || e.is_user() {
        ErrorKind::Protocol
    } else if e.is_canceled() || e.is_closed() || e.is_incomplete_message() || e.is_body_write_aborted() {
        ErrorKind::Reset
    } else {
        // HTTP/2 resets and GOAWAYs, and I/O errors below them.
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if s.downcast_ref::<std::io::Error>().is_some() {
                return ErrorKind::Reset;
            }
            source = s.source();
        }
        ErrorKind::Protocol
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for k in [
            ErrorKind::Connect,
            ErrorKind::Timeout,
            ErrorKind::Reset,
            ErrorKind::Protocol,
            ErrorKind::Status(503),
            ErrorKind::Grpc(14),
        ] {
            assert_eq!(ErrorKind::from_key(&k.key()), Some(k));
        }
        assert_eq!(ErrorKind::from_key("nonsense"), None);
        assert_eq!(ErrorKind::Grpc(14).to_string(), "gRPC status 14 (UNAVAILABLE)");
    }
}
