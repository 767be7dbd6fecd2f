//! Turning text (YAML documents or JSON) into validated resources.
//!
//! All problems are collected and reported together, each naming the file, the document, the
//! field path and the reason; callers apply nothing unless the whole input is valid.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::resource::{Kind, ObjectMeta, Resource, Spec};
use crate::validate;

/// One problem in one document (also the API's `errors` rows of a refused apply).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ValidationError {
    /// The file (or `-` for stdin) the document came from.
    pub file: String,
    /// 1-based document index within the file; 0 when the whole file is unreadable.
    pub document: usize,
    /// `Kind namespace/name` when known.
    pub object: Option<String>,
    /// Dotted field path, e.g. `spec.rules[0].backendRefs[1].weight`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.document > 0 {
            write!(f, ", document {}", self.document)?;
        }
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        if !self.field.is_empty() {
            write!(f, ", field {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Every problem found in an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub errors: Vec<ValidationError>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

/// Parses YAML documents (separated by `---`) or JSON (an object, an array of objects, or a
/// `List` with `items`) into validated resources. `file` names the source in errors.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Resource>, LoadError> {
    let values = split_documents(file, text)?;
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    for (index, value) in values.into_iter().enumerate() {
        let document = index + 1;
        match decode_resource(value) {
            Ok(resource) => {
                let object = Some(format!("{} {}", resource.kind, resource.key()));
                for (field, reason) in validate::resource(&resource) {
                    errors.push(ValidationError { file: file.into(), document, object: object.clone(), field, reason });
                }
                resources.push(resource);
            }
            Err((object, field, reason)) => {
                errors.push(ValidationError { file: file.into(), document, object, field, reason })
            }
        }
    }
    for (document, field, reason) in validate::duplicates(&resources) {
        errors.push(ValidationError { file: file.into(), document, object: None, field, reason });
    }
    if errors.is_empty() { Ok(resources) } else { Err(LoadError { errors }) }
}

/// Decodes one stored resource (JSON written by this version) without re-validating it.
pub fn resource_from_value(value: Value) -> Result<Resource, String> {
    decode_resource(value).map_err(|(object, field, reason)| {
        format!("{}{field}: {reason}", object.map(|o| format!("{o}: ")).unwrap_or_default())
    })
}

fn split_documents(file: &str, text: &str) -> Result<Vec<Value>, LoadError> {
    let whole_file = |reason: String| LoadError {
        errors: vec![ValidationError { file: file.into(), document: 0, object: None, field: String::new(), reason }],
    };
    let trimmed = text.trim_start();
    let values: Vec<Value> = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let value: Value = serde_json::from_str(text).map_err(|e| whole_file(format!("invalid JSON: {e}")))?;
        match value {
            Value::Array(items) => items,
            Value::Object(ref map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
                map.get("items").and_then(Value::as_array).cloned().unwrap_or_default()
            }
            other => vec![other],
        }
    } else {
        // YAML 1.2 booleans (only `true`/`false`): a value such as `y`, `no` or `on` stays the
        // string it reads as, as Kubernetes manifests expect.
        let options = serde_saphyr::Options { strict_booleans: true, ..serde_saphyr::Options::default() };
        serde_saphyr::from_multiple_with_options::<Value>(text, options)
            .map_err(|e| whole_file(format!("invalid YAML: {e}")))?
    };
    Ok(values.into_iter().filter(|v| !v.is_null()).collect())
}

type DecodeError = (Option<String>, String, String);

fn decode_resource(value: Value) -> Result<Resource, DecodeError> {
    let Value::Object(mut map) = value else {
        return Err((
            None,
            String::new(),
            "a resource must be a mapping with apiVersion, kind, metadata and spec".into(),
        ));
    };
    let api_version = take_string(&mut map, "apiVersion")?;
    let kind_name = take_string(&mut map, "kind")?;
    let kind = Kind::from_manifest(&kind_name).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        (
            None,
            "kind".to_string(),
            format!("unsupported kind {kind_name:?} (this version supports {})", known.join(", ")),
        )
    })?;
    let metadata_value = map.remove("metadata").ok_or((None, "metadata".to_string(), "missing field".to_string()))?;
    let metadata: ObjectMeta = decode(metadata_value, "metadata").map_err(|(f, r)| (None, f, r))?;
    let object = Some(format!("{kind} {}/{}", metadata.namespace(), metadata.name));
    if api_version != kind.api_version() {
        return Err((object, "apiVersion".into(), format!("{kind} must have apiVersion {}", kind.api_version())));
    }
    map.remove("status");
    let spec_value = map.remove("spec").unwrap_or(Value::Object(Default::default()));
    if let Some(unknown) = map.keys().next() {
        return Err((object, unknown.clone(), "unknown field".into()));
    }
    let spec = match kind {
        Kind::MeshConfig => decode(spec_value, "spec").map(Spec::MeshConfig),
        Kind::Service => decode(spec_value, "spec").map(Spec::Service),
        Kind::Workload => decode(spec_value, "spec").map(Spec::Workload),
        Kind::ExternalService => decode(spec_value, "spec").map(Spec::ExternalService),
        Kind::HttpRouteGroup => decode(spec_value, "spec").map(Spec::HttpRouteGroup),
        Kind::FaultInjection => decode(spec_value, "spec").map(Spec::FaultInjection),
        Kind::Gateway => decode(spec_value, "spec").map(Spec::Gateway),
        Kind::HttpRoute => decode(spec_value, "spec").map(Spec::HttpRoute),
        Kind::GrpcRoute => decode(spec_value, "spec").map(Spec::GrpcRoute),
        Kind::TrafficSplit => decode(spec_value, "spec").map(Spec::TrafficSplit),
        Kind::TrafficTarget => decode(spec_value, "spec").map(Spec::TrafficTarget),
        Kind::AuthorizationPolicy => decode(spec_value, "spec").map(Spec::AuthorizationPolicy),
        Kind::ResiliencePolicy => decode(spec_value, "spec").map(Spec::ResiliencePolicy),
        Kind::RateLimitPolicy => decode(spec_value, "spec").map(Spec::RateLimitPolicy),
    }
    .map_err(|(f, r)| (object, f, r))?;
    Ok(Resource { api_version, kind, metadata, spec })
}

fn take_string(map: &mut serde_json::Map<String, Value>, field: &str) -> Result<String, DecodeError> {
    match map.remove(field) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err((None, field.into(), "must be a string".into())),
        None => Err((None, field.into(), "missing field".into())),
    }
}

/// Decodes a typed value, reporting the failing field's path below `prefix`.
fn decode<T: DeserializeOwned>(value: Value, prefix: &str) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { prefix.to_string() } else { format!("{prefix}.{path}") };
        (field, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 8080, appProtocol: http}]
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: echo-1, labels: {app: echo}, resourceVersion: "7"}
spec:
  address: 127.0.0.1
  ports: [{name: http, port: 9001}]
status: {ignored: true}
"#;

    #[test]
    fn parses_multi_document_yaml() {
        let resources = parse_documents("f.yaml", GOOD).expect("valid");
        assert_eq!(resources.len(), 2);
        assert_eq!(resources[0].kind, Kind::Service);
        assert_eq!(resources[1].metadata.namespace(), "default");
    }

    #[test]
    fn reports_unknown_field_with_path_and_document() {
        let bad = GOOD.replace("appProtocol: http", "appProtocl: http");
        let err = parse_documents("f.yaml", &bad).unwrap_err();
        assert_eq!(err.errors.len(), 1, "{err}");
        let e = &err.errors[0];
        assert_eq!(e.document, 1);
        assert_eq!(e.field, "spec.ports[0].appProtocl");
        assert!(e.reason.contains("appProtocl"), "{}", e.reason);
        assert!(err.to_string().starts_with("f.yaml, document 1 (Service default/echo)"), "{err}");
    }

    #[test]
    fn reports_every_invalid_document() {
        let bad = GOOD.replace("port: 8080", "port: 70000").replace("address: 127.0.0.1", "address: nowhere");
        let err = parse_documents("f.yaml", &bad).unwrap_err();
        assert_eq!(err.errors.len(), 2, "{err}");
        assert_eq!(err.errors[1].field, "spec.address");
    }

    #[test]
    fn yaml_1_1_boolean_words_stay_strings() {
        let yaml = "apiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {name: y, labels: {app: on, version: no}}\nspec: {address: 127.0.0.1, meshed: true}\n";
        let r = parse_documents("f.yaml", yaml).expect("valid");
        assert_eq!(r[0].metadata.name, "y");
        assert_eq!(r[0].metadata.labels.get("app").map(String::as_str), Some("on"));
        assert_eq!(r[0].metadata.labels.get("version").map(String::as_str), Some("no"));
    }

    #[test]
    fn json_list_is_accepted() {
        let json = r#"{"kind":"List","items":[{"apiVersion":"plexus.dev/v1alpha1","kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":80}]}}]}"#;
        assert_eq!(parse_documents("f.json", json).expect("valid").len(), 1);
    }

    #[test]
    fn unknown_kind_and_yaml_syntax_errors_are_reported() {
        let err = parse_documents("f.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n").unwrap_err();
        assert_eq!(err.errors[0].field, "kind");
        let err = parse_documents("f.yaml", "a: [b\n").unwrap_err();
        assert!(err.errors[0].reason.starts_with("invalid YAML"), "{err}");
    }
}
