//! Writing `--resources` files (the schema of `plexus apply`).

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context as _, Result};

/// One port of a Service.
#[derive(Debug, Clone)]
pub struct ServicePort {
    /// Port name; Workload ports with the same name serve it.
    pub name: String,
    /// The Service port clients address (`echo:8080`).
    pub port: u16,
    /// `http`, `http2`, `grpc`, `tcp`, `tls`, `opaque`, or `None` (detect).
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// A port named `name`.
    pub fn new(name: &str, port: u16, app_protocol: Option<&str>) -> ServicePort {
        ServicePort { name: name.to_string(), port, app_protocol: app_protocol.map(str::to_string) }
    }
}

/// A Workload resource.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels` (`app` selects it into a Service).
    pub labels: Vec<(String, String)>,
    /// `spec.address`.
    pub address: IpAddr,
    /// `spec.ports[]`: `(name, port, targetPort)`.
    pub ports: Vec<(String, u16, u16)>,
    /// `spec.serviceAccount`.
    pub service_account: String,
    /// `spec.meshed`.
    pub meshed: bool,
}

impl WorkloadSpec {
    /// A workload dialled directly (`meshed: false`) at `127.0.0.1:app_port`, labelled
    /// `app: <app>, version: v1`, with one port named `port_name`.
    pub fn plain(name: &str, app: &str, port_name: &str, app_port: u16) -> WorkloadSpec {
        WorkloadSpec {
            name: name.to_string(),
            labels: vec![("app".to_string(), app.to_string()), ("version".to_string(), "v1".to_string())],
            address: IpAddr::from(crate::LOCALHOST),
            ports: vec![(port_name.to_string(), app_port, app_port)],
            service_account: app.to_string(),
            meshed: false,
        }
    }

    /// A workload behind a sidecar (`meshed: true`): peers connect to the sidecar's inbound
    /// port `127.0.0.1:inbound_port`, the application listens on `app_port`.
    pub fn meshed(name: &str, app: &str, port_name: &str, inbound_port: u16, app_port: u16) -> WorkloadSpec {
        WorkloadSpec {
            ports: vec![(port_name.to_string(), inbound_port, app_port)],
            meshed: true,
            ..WorkloadSpec::plain(name, app, port_name, app_port)
        }
    }
}

/// A multi-document YAML resources file under construction.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    docs: Vec<String>,
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
fn q(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

impl Resources {
    /// An empty file.
    pub fn new() -> Resources {
        Resources::default()
    }

    /// Adds `kind: Service` named `name` in namespace `default`, selecting `app: <name>`.
    pub fn service(mut self, name: &str, ports: &[ServicePort]) -> Resources {
        let ports: Vec<String> = ports
            .iter()
            .map(|p| {
                let proto = p.app_protocol.as_deref().map(|a| format!(", appProtocol: {}", q(a))).unwrap_or_default();
                format!("{{name: {}, port: {}{proto}}}", q(&p.name), p.port)
            })
            .collect();
        self.docs.push(format!(
            "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {{name: {}, namespace: default}}\nspec:\n  selector: {{app: {}}}\n  ports: [{}]\n",
            q(name),
            q(name),
            ports.join(", ")
        ));
        self
    }

    /// Adds a `kind: Workload` in namespace `default`.
    pub fn workload(mut self, w: &WorkloadSpec) -> Resources {
        let labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{}: {}", q(k), q(v))).collect();
        let ports: Vec<String> =
            w.ports.iter().map(|(n, p, t)| format!("{{name: {}, port: {p}, targetPort: {t}}}", q(n))).collect();
        self.docs.push(format!(
            "apiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {}, namespace: default, labels: {{{}}}}}\nspec:\n  address: {}\n  ports: [{}]\n  serviceAccount: {}\n  meshed: {}\n",
            q(&w.name),
            labels.join(", "),
            q(&w.address.to_string()),
            ports.join(", "),
            q(&w.service_account),
            w.meshed
        ));
        self
    }

    /// Adds a document verbatim.
    pub fn raw(mut self, yaml: &str) -> Resources {
        self.docs.push(yaml.to_string());
        self
    }

    /// The YAML text.
    pub fn to_yaml(&self) -> String {
        self.docs.join("---\n")
    }

    /// Writes the file atomically (temporary file + rename), so a watching proxy never reads
    /// a half-written version.
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp-write");
        std::fs::write(&tmp, self.to_yaml()).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_shape() {
        let y = Resources::new()
            .service("echo", &[ServicePort::new("http", 8080, Some("http"))])
            .workload(&WorkloadSpec::meshed("echo-1", "echo", "http", 7000, 9001))
            .to_yaml();
        assert!(y.contains("kind: Service"), "{y}");
        assert!(y.contains("ports: [{name: \"http\", port: 8080, appProtocol: \"http\"}]"), "{y}");
        assert!(y.contains("{name: \"http\", port: 7000, targetPort: 9001}"), "{y}");
        assert!(y.contains("meshed: true"), "{y}");
        assert!(y.contains("\n---\n"), "{y}");
    }
}
