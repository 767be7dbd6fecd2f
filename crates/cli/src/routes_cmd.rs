//! `plexus routes SERVICE`: the effective routing table a proxy holds for a Service — entries in
//! precedence order, then each port's client policy, rate limit and endpoints.
//!
//! The table is compiled with `MeshSnapshot::compile`, exactly as a proxy compiles what it
//! receives, from the control plane's resources (every kind) or from `-f` files.

use http::Method;
use plexus_core::explain::{
    PortTable, describe_budget, describe_lb, describe_limits, describe_outlier, describe_rate_limit, describe_retry,
    trim_float,
};
use plexus_core::{Kind, MeshSnapshot, Resource, ServiceName};
use serde_json::Value;

use crate::Failure;
use crate::api_client::ServerArgs;

#[derive(clap::Args)]
pub struct RoutesArgs {
    /// The Service (`NAME`, or `NAME.NAMESPACE`).
    service: String,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Only this Service port.
    #[arg(long)]
    port: Option<u16>,
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json", "yaml"])]
    output: String,
    /// Read resources from these files or directories instead of the control plane.
    #[arg(short = 'f', long = "filename")]
    files: Vec<String>,
    #[command(flatten)]
    server: ServerArgs,
}

/// Reads and validates resources files (as `plexus apply -f` does).
pub(crate) fn load_files(files: &[String]) -> Result<Vec<Resource>, Failure> {
    crate::resources_cmd::load_resources(files, "invalid resources")
}

/// The control plane's store revision (`/healthz`); an error when it cannot be reached.
pub(crate) async fn revision(server: &ServerArgs) -> Result<u64, Failure> {
    let health: plexus_control::api_types::Health = server.fetch(Method::GET, "/healthz", None, false).await?;
    Ok(health.revision)
}

/// Every resource of every kind and namespace in the control plane. Objects this CLI cannot
/// read (written by a newer version) are skipped with a warning on stderr.
pub(crate) async fn fetch_all(server: &ServerArgs) -> Result<Vec<Resource>, Failure> {
    let mut resources = Vec::new();
    let mut unreadable = 0usize;
    for kind in Kind::ALL {
        let (read, skipped) = server.list_all(kind).await?;
        resources.extend(read);
        unreadable += skipped;
    }
    if unreadable > 0 {
        eprintln!(
            "warning: skipped {unreadable} resource(s) this CLI cannot read (is it older than the control plane?)"
        );
    }
    Ok(resources)
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an error.
pub(crate) fn emit(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Prints `value` as pretty JSON or YAML.
pub(crate) fn print_structured(output: &str, value: &Value) -> Result<(), Failure> {
    let text = match output {
        "yaml" => serde_saphyr::to_string(value).map_err(|e| Failure::runtime(e.to_string()))?,
        _ => serde_json::to_string_pretty(value).map_err(|e| Failure::runtime(e.to_string()))? + "\n",
    };
    emit(&text);
    Ok(())
}

/// The Service named by `SERVICE` and `-n`: `NAME.NAMESPACE` overrides `-n`.
fn service_name(service: &str, namespace: &str) -> Result<ServiceName, Failure> {
    if service.contains('.') {
        ServiceName::candidates(service)
            .into_iter()
            .next()
            .ok_or_else(|| Failure::usage(format!("{service:?} is not a Service name (NAME or NAME.NAMESPACE)")))
    } else if service.is_empty() {
        Err(Failure::usage("the Service name is empty"))
    } else {
        Ok(ServiceName::new(service.to_ascii_lowercase(), namespace))
    }
}

pub async fn run(args: RoutesArgs) -> Result<(), Failure> {
    let name = service_name(&args.service, &args.namespace)?;
    let (resources, version) = if args.files.is_empty() {
        let rev = revision(&args.server).await?;
        (fetch_all(&args.server).await?, rev.to_string())
    } else {
        (load_files(&args.files)?, "file".to_string())
    };
    let snapshot = MeshSnapshot::compile(&resources, version);
    let tables = plexus_core::explain::routing_table(&snapshot, &name, args.port).map_err(Failure::runtime)?;
    match args.output.as_str() {
        "json" | "yaml" => {
            let value = serde_json::json!({ "version": snapshot.version, "ports": tables });
            print_structured(&args.output, &value)
        }
        _ => {
            let text: Vec<String> = tables.iter().map(port_text).collect();
            emit(&text.join("\n"));
            Ok(())
        }
    }
}

/// Rows with columns aligned (two spaces apart), the header first.
fn rows_text(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).chain([header[i].len()]).max().unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w.saturating_sub(c.chars().count()))))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn or_dash(items: Vec<String>) -> String {
    if items.is_empty() { "-".into() } else { items.join("; ") }
}

/// One port's table and policies.
fn port_text(t: &PortTable) -> String {
    let protocol = t.protocol.map(|p| format!(" ({})", protocol_name(p))).unwrap_or_default();
    let mut out = format!("{}:{}{protocol}\n", t.service, t.port);
    let mut rows: Vec<Vec<String>> = t
        .routes
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let backends: Vec<String> = e
                .backends
                .iter()
                .map(|b| {
                    let port = b.port.map(|p| format!(":{p}")).unwrap_or_default();
                    let missing = if b.exists { "" } else { " MISSING" };
                    format!("{}{port}={} ({}%){missing}", b.service, b.weight, trim_float(b.percent))
                })
                .collect();
            let mut timeouts = Vec::new();
            if let Some(r) = &e.request_timeout {
                timeouts.push(format!("request {r}"));
            }
            if let Some(b) = &e.backend_request_timeout {
                timeouts.push(format!("backendRequest {b}"));
            }
            vec![
                (i + 1).to_string(),
                e.route.clone(),
                e.rule.to_string(),
                e.description.clone(),
                if e.filters.redirect.is_some() && backends.is_empty() { "-".into() } else { or_dash(backends) },
                or_dash(e.filters.describe()),
                or_dash(timeouts),
                e.retry.as_ref().map(describe_retry).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    // What a request that matches no entry does.
    rows.push(vec![
        "*".into(),
        "-".into(),
        "-".into(),
        if t.routes.is_empty() { "any request".into() } else { "anything else".into() },
        format!("{} itself", t.service),
        "-".into(),
        "-".into(),
        "-".into(),
    ]);
    out.push_str(&rows_text(&["#", "ROUTE", "RULE", "MATCH", "BACKENDS", "FILTERS", "TIMEOUTS", "RETRIES"], &rows));

    let p = &t.policy;
    let source = p.source.as_ref().map(|s| format!("ResiliencePolicy {s}")).unwrap_or_else(|| "defaults".into());
    let mut timeouts = Vec::new();
    for (what, d) in [("connect", p.connect_timeout), ("request", p.request_timeout), ("idle", p.idle_timeout)] {
        if let Some(d) = d {
            timeouts.push(format!("{what} {}", plexus_core::duration::format(d)));
        }
    }
    let od = &p.outlier_detection;
    let lines = [
        ("policy", source),
        ("timeouts", or_dash(timeouts)),
        (
            "retries",
            format!(
                "{}; {}",
                p.retry
                    .as_ref()
                    .map(describe_retry)
                    .unwrap_or_else(|| "default: connection failures and resets only".into()),
                describe_budget(&p.retry_budget)
            ),
        ),
        ("outlier detection", describe_outlier(od)),
        ("load balancer", describe_lb(p.load_balancer, p.load_balancer_set, p.hash_on.as_ref())),
        ("connection limits", p.connection_limits.as_ref().map(describe_limits).unwrap_or_else(|| "none".into())),
        ("rate limit", t.rate_limit.as_ref().map(describe_rate_limit).unwrap_or_else(|| "none".into())),
        (
            "endpoints",
            or_dash(
                t.endpoints
                    .iter()
                    .map(|e| {
                        let version = e.version.as_ref().map(|v| format!(" {v}")).unwrap_or_default();
                        format!("{} ({}{version})", e.address, e.workload)
                    })
                    .collect(),
            ),
        ),
    ];
    out.push_str(&labelled(lines.iter().map(|(k, v)| (*k, std::slice::from_ref(v)))));
    out
}

/// `label: value` lines with the values aligned; a label's further values go on lines of their
/// own under the first.
pub(crate) fn labelled<'a>(lines: impl Iterator<Item = (&'a str, &'a [String])> + Clone) -> String {
    let width = lines.clone().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, values) in lines {
        for (i, v) in values.iter().enumerate() {
            let label = if i == 0 { format!("{k}:") } else { String::new() };
            out.push_str(&format!("{label:<width$} {v}\n"));
        }
    }
    out
}

/// `http`, `grpc`, … as written in `appProtocol`.
pub(crate) fn protocol_name(p: plexus_core::AppProtocol) -> String {
    serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}
