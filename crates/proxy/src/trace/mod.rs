//! Distributed tracing (SPEC §5): trace context propagation (W3C Trace Context and B3), a
//! span per request per proxy, and span export over OTLP/gRPC when MeshConfig enables it.
//!
//! - [`context`]: reading and writing the trace headers; a new span id per hop.
//! - [`span`]: a finished span and its OTLP form.
//! - [`export`]: the bounded, batching, asynchronous exporter (flushed at drain).
//! - [`otlp`]: the OTLP trace protocol, generated from the vendored OpenTelemetry .proto files.
//!
//! The exporter is written on tonic + prost (already the control-plane protocol's stack)
//! rather than the opentelemetry SDK crates: the proxy chooses its span ids itself (they are
//! written into the request before it is forwarded), and the SDK would add a cold-build cost
//! for little use here.

pub mod context;
pub mod export;
pub mod otlp;
pub mod span;

use plexus_core::resource::MeshConfigSpec;

pub use context::{SpanContext, SpanId, TraceId};
pub use export::{ExportStats, flush, stats};

/// MeshConfig `tracing`: where spans go, and the share of new traces that are sampled.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TracingConfig {
    /// The OTLP/gRPC collector; `None`: spans are not exported (headers still propagate).
    pub otlp_endpoint: Option<String>,
    /// Percent of new traces sampled: `tracing.sampling`, by default 100 when a collector is
    /// set and 0 otherwise (ids are made all the same, so logs correlate).
    pub sampling: f64,
}

impl TracingConfig {
    pub fn of(mesh: &MeshConfigSpec) -> TracingConfig {
        let t = mesh.tracing.as_ref();
        let otlp_endpoint = t.and_then(|t| t.otlp_endpoint.clone()).filter(|e| !e.trim().is_empty());
        let default = if otlp_endpoint.is_some() { 100.0 } else { 0.0 };
        let sampling = t.and_then(|t| t.sampling).unwrap_or(default);
        TracingConfig { otlp_endpoint, sampling: if sampling.is_nan() { 0.0 } else { sampling.clamp(0.0, 100.0) } }
    }

    /// The sampling decision for a trace that arrives without one.
    pub fn sample_new(&self) -> bool {
        plexus_core::policy::happens(self.sampling, fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::resource::TracingSettings;

    fn mesh(sampling: Option<f64>, endpoint: Option<&str>) -> MeshConfigSpec {
        MeshConfigSpec {
            tracing: Some(TracingSettings { sampling, otlp_endpoint: endpoint.map(str::to_string) }),
            ..Default::default()
        }
    }

    #[test]
    fn sampling_defaults_follow_the_exporter() {
        assert_eq!(TracingConfig::of(&MeshConfigSpec::default()).sampling, 0.0);
        let on = TracingConfig::of(&mesh(None, Some("127.0.0.1:4317")));
        assert_eq!((on.sampling, on.otlp_endpoint.as_deref()), (100.0, Some("127.0.0.1:4317")));
        assert!(on.sample_new());
        let off = TracingConfig::of(&mesh(Some(0.0), Some("127.0.0.1:4317")));
        assert!(!off.sample_new());
        assert_eq!(TracingConfig::of(&mesh(Some(25.0), None)).sampling, 25.0);
        assert_eq!(TracingConfig::of(&mesh(None, Some(" "))).otlp_endpoint, None);
    }
}
