//! Access logs: one line per request on stdout, as JSON or as text.
//!
//! Which, per request: MeshConfig `accessLog.format` when set (`json`, `text`, or `off`) —
//! for every proxy of the mesh, whatever its flags — else JSON when the proxy was started with
//! `--access-log`, else none. A MeshConfig change applies to the next request.

use std::io::Write as _;

use plexus_core::resource::MeshConfigSpec;
use serde::Serialize;

/// How access log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

/// The format in force, `None` for no access log (see the module docs).
pub fn format(mesh: &MeshConfigSpec, flag: bool) -> Option<Format> {
    match mesh.access_log.as_ref().and_then(|a| a.format.as_deref()) {
        Some("json") => Some(Format::Json),
        Some("text") => Some(Format::Text),
        Some(_) => None,
        None => flag.then_some(Format::Json),
    }
}

/// One request, as logged. The JSON keys are the field names.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// When the request arrived (RFC 3339, UTC, milliseconds).
    pub time: String,
    pub trace_id: String,
    /// This proxy's span of the request.
    pub span_id: String,
    /// The previous hop's span (absent when this proxy started the trace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
    pub sampled: bool,
    pub request_id: &'a str,
    pub direction: &'a str,
    pub source_workload: &'a str,
    pub source_service: &'a str,
    pub source_principal: &'a str,
    pub destination_service: &'a str,
    pub destination_workload: &'a str,
    pub destination_version: &'a str,
    pub destination_principal: &'a str,
    pub route: &'a str,
    pub protocol: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    /// The path without the query (which may carry secrets).
    pub path: &'a str,
    pub status: u16,
    /// Empty for plain HTTP.
    pub grpc_status: &'a str,
    /// `-` when the proxy saw nothing wrong (see `ProxyError::flag`).
    pub response_flags: &'a str,
    pub duration_ms: f64,
    /// Request body bytes received from the client.
    pub request_bytes: u64,
    /// Response body bytes sent to the client.
    pub response_bytes: u64,
    /// The address the request was sent to.
    pub upstream: Option<String>,
    pub connection_security_policy: &'a str,
}

impl Entry<'_> {
    /// The line in `format`.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => serde_json::to_string(self).unwrap_or_default(),
            Format::Text => self.text(),
        }
    }

    /// One human-readable line:
    /// `TIME DIRECTION "METHOD PATH PROTOCOL" STATUS FLAGS GRPC IN OUT DURATIONms AUTHORITY
    /// upstream=… route=… src=… dst=… trace=… span=… request_id=…`.
    fn text(&self) -> String {
        let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
        format!(
            "{} {} \"{} {} {}\" {} {} {} {} {} {:.3}ms {} upstream={} route={} src={}/{}({}) dst={}/{}({}) {} trace={} span={} request_id={}",
            self.time,
            self.direction,
            self.method,
            self.path,
            self.protocol,
            self.status,
            self.response_flags,
            dash(self.grpc_status),
            self.request_bytes,
            self.response_bytes,
            self.duration_ms,
            dash(self.authority),
            self.upstream.as_deref().unwrap_or("-"),
            self.route,
            self.source_service,
            self.source_workload,
            self.source_principal,
            self.destination_service,
            self.destination_workload,
            self.destination_principal,
            self.connection_security_policy,
            self.trace_id,
            self.span_id,
            self.request_id,
        )
    }
}

/// Writes one line to stdout; a closed stdout must not fail the request.
pub fn write(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.write_all(b"\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::resource::AccessLogSettings;

    fn mesh(format: Option<&str>) -> MeshConfigSpec {
        MeshConfigSpec {
            access_log: Some(AccessLogSettings { format: format.map(str::to_string) }),
            ..Default::default()
        }
    }

    #[test]
    fn mesh_config_decides_else_the_flag() {
        assert_eq!(format(&MeshConfigSpec::default(), false), None);
        assert_eq!(format(&MeshConfigSpec::default(), true), Some(Format::Json));
        assert_eq!(format(&mesh(None), true), Some(Format::Json), "accessLog without a format: the flag decides");
        assert_eq!(format(&mesh(Some("text")), false), Some(Format::Text));
        assert_eq!(format(&mesh(Some("json")), false), Some(Format::Json));
        assert_eq!(format(&mesh(Some("off")), true), None);
    }

    fn sample() -> Entry<'static> {
        Entry {
            time: "2026-11-18T11:06:40.123Z".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            parent_span_id: None,
            sampled: true,
            request_id: "r1",
            direction: "outbound",
            source_workload: "a-1",
            source_service: "a",
            source_principal: "spiffe://plexus.local/ns/default/sa/a",
            destination_service: "b",
            destination_workload: "b-1",
            destination_version: "v1",
            destination_principal: "spiffe://plexus.local/ns/default/sa/b",
            route: "default",
            protocol: "HTTP/1.1",
            method: "GET",
            authority: "b:8080",
            path: "/x",
            status: 200,
            grpc_status: "",
            response_flags: "-",
            duration_ms: 1.5,
            request_bytes: 0,
            response_bytes: 12,
            upstream: Some("127.0.0.1:9".into()),
            connection_security_policy: "mutual_tls",
        }
    }

    #[test]
    fn json_lines_carry_every_field() {
        let v: serde_json::Value = serde_json::from_str(&sample().render(Format::Json)).expect("JSON");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream"], "127.0.0.1:9");
        assert!(v.get("parent_span_id").is_none());
        assert_eq!(v.as_object().map(|o| o.len()), Some(26));
    }

    #[test]
    fn text_lines_are_one_readable_line() {
        let line = sample().render(Format::Text);
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with("2026-11-18T11:06:40.123Z outbound \"GET /x HTTP/1.1\" 200 - - 0 12 1.500ms b:8080 "),
            "{line}"
        );
        assert!(line.contains("trace=4bf92f3577b34da6a3ce929d0e0e4736 span=00f067aa0ba902b7 request_id=r1"), "{line}");
        assert!(line.contains("dst=b/b-1(spiffe://plexus.local/ns/default/sa/b)"), "{line}");
    }
}
