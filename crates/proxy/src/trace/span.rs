//! A finished span of one proxied request, and its OTLP form.

use std::collections::HashMap;
use std::time::SystemTime;

use super::context::{SpanId, TraceId};
use super::otlp::common::{AnyValue, InstrumentationScope, KeyValue, any_value};
use super::otlp::resource::Resource;
use super::otlp::trace::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode};

/// The proxy that made a span (the OTLP resource): its Service, workload and namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxyResource {
    pub service: String,
    pub workload: String,
    pub namespace: String,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// Client (outbound: the source sidecar calling out) or server (inbound: the destination
/// sidecar receiving).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Client,
    Server,
}

/// One request as seen by one proxy.
#[derive(Debug, Clone)]
pub struct FinishedSpan {
    pub resource: ProxyResource,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub tracestate: Option<String>,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// A 5xx, a non-zero gRPC status or a proxy-made failure.
    pub error: bool,
}

/// `SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK` (trace.proto):
/// the parent of a proxy's span always came over the network.
const PARENT_IS_REMOTE: u32 = 0x100 | 0x200;
/// W3C trace flags: sampled (only sampled spans are exported).
const SAMPLED: u32 = 0x01;

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn key_value(key: &str, value: Value) -> KeyValue {
    let value = match value {
        Value::Str(s) => any_value::Value::StringValue(s),
        Value::Int(i) => any_value::Value::IntValue(i),
    };
    KeyValue { key: key.to_string(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

impl FinishedSpan {
    fn into_otlp(self) -> Span {
        let mut flags = SAMPLED;
        if self.parent_span_id.is_some() {
            flags |= PARENT_IS_REMOTE;
        }
        let error = self.error;
        Span {
            trace_id: self.trace_id.0.to_vec(),
            span_id: self.span_id.0.to_vec(),
            trace_state: self.tracestate.unwrap_or_default(),
            parent_span_id: self.parent_span_id.map(|p| p.0.to_vec()).unwrap_or_default(),
            flags,
            name: self.name,
            kind: match self.kind {
                Kind::Client => SpanKind::Client,
                Kind::Server => SpanKind::Server,
            } as i32,
            start_time_unix_nano: unix_nanos(self.start),
            end_time_unix_nano: unix_nanos(self.end),
            attributes: self.attributes.into_iter().map(|(k, v)| key_value(k, v)).collect(),
            status: Some(Status {
                code: if error { StatusCode::Error } else { StatusCode::Unset } as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

impl ProxyResource {
    fn into_otlp(self) -> Resource {
        let attributes = vec![
            key_value("service.name", Value::Str(self.service)),
            key_value("service.namespace", Value::Str(self.namespace)),
            key_value("service.instance.id", Value::Str(self.workload)),
            key_value("telemetry.sdk.name", Value::Str("plexus-proxy".into())),
        ];
        Resource { attributes, ..Default::default() }
    }
}

/// Groups spans by the proxy that made them (one `ResourceSpans` each), in arrival order.
pub fn resource_spans(spans: Vec<FinishedSpan>) -> Vec<ResourceSpans> {
    let mut order: Vec<ProxyResource> = Vec::new();
    let mut groups: HashMap<ProxyResource, Vec<Span>> = HashMap::new();
    for s in spans {
        let resource = s.resource.clone();
        if !groups.contains_key(&resource) {
            order.push(resource.clone());
        }
        groups.entry(resource).or_default().push(s.into_otlp());
    }
    order
        .into_iter()
        .map(|r| {
            let spans = groups.remove(&r).unwrap_or_default();
            ResourceSpans {
                resource: Some(r.into_otlp()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "plexus-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(service: &str, n: u8) -> FinishedSpan {
        FinishedSpan {
            resource: ProxyResource {
                service: service.into(),
                workload: format!("{service}-1"),
                namespace: "ns".into(),
            },
            trace_id: TraceId([1; 16]),
            span_id: SpanId([n; 8]),
            parent_span_id: (n > 1).then_some(SpanId([n - 1; 8])),
            tracestate: None,
            name: "GET b".into(),
            kind: if n.is_multiple_of(2) { Kind::Server } else { Kind::Client },
            start: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1500),
            end: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1501),
            attributes: vec![("http.response.status_code", Value::Int(200)), ("plexus.route", Value::Str("r".into()))],
            error: n == 3,
        }
    }

    #[test]
    fn groups_by_resource_and_maps_fields() {
        let groups = resource_spans(vec![span("a", 1), span("b", 2), span("a", 3)]);
        assert_eq!(groups.len(), 2);
        let a = &groups[0];
        let service = &a.resource.as_ref().expect("resource").attributes[0];
        assert_eq!(service.key, "service.name");
        let spans = &a.scope_spans[0].spans;
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].span_id, vec![1; 8]);
        assert!(spans[0].parent_span_id.is_empty(), "a root span has no parent");
        assert_eq!(spans[0].flags, SAMPLED);
        assert_eq!(spans[1].parent_span_id, vec![2; 8]);
        assert_eq!(spans[1].flags, SAMPLED | PARENT_IS_REMOTE);
        assert_eq!(spans[1].status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));
        assert_eq!(spans[0].kind, SpanKind::Client as i32);
        assert_eq!(spans[0].start_time_unix_nano, 1_500_000_000);
        assert_eq!(spans[0].attributes[0].key, "http.response.status_code");
        let b = &groups[1].scope_spans[0].spans[0];
        assert_eq!(b.kind, SpanKind::Server as i32);
        assert_eq!(b.trace_id, vec![1; 16]);
    }
}
