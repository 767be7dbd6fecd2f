//! `plexus explain`: what the mesh would do with a request — route, backends and weights,
//! outcome, filters, timeouts, retries, rate limit, authorization — evaluated with the proxy's
//! own decisions (`plexus_core::decide` and `plexus_core::authz`, through
//! `plexus_core::explain`). Authorization is decided for the identity of the `--from`
//! workload, as the destination would see it over mutual TLS.
//!
//! Against the control plane's current resources; with `-f`, against the current resources
//! with the files' resources applied on top (a proposed config), or the files alone when no
//! control plane answers.

use http::{HeaderName, HeaderValue, Method};
use plexus_core::explain::{
    Action, EgressExplanation, ExplainRequest, Explanation, Target, apply_on_top, client_identity, describe_lb,
    describe_limits, describe_outlier, describe_rate_limit, trim_float,
};
use plexus_core::{MeshSnapshot, Resource};

use crate::Failure;
use crate::api_client::{ServerArgs, api_error};
use crate::routes_cmd::{emit, fetch_all, labelled, load_files, print_structured, protocol_name, revision};

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// The workload sending the request: a Workload NAME[.NAMESPACE], the workloads labelled
    /// app=NAME (as `plexus run --service NAME` registers them), or a spiffe:// identity.
    /// Authorization is decided for its identity; without --from, for an unauthenticated client.
    #[arg(long)]
    from: Option<String>,
    /// The destination: SERVICE[.NAMESPACE][:PORT], or a HOST[:PORT] outside the mesh (the
    /// egress decision: which ExternalService allows it, or outboundTrafficPolicy).
    #[arg(long)]
    to: String,
    /// The request path, optionally with a query (`/api?x=1`).
    #[arg(long, default_value = "/")]
    path: String,
    /// The request method.
    #[arg(short = 'X', long, default_value = "GET")]
    method: String,
    /// A request header, NAME=VALUE; repeatable.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// A proposed config: resources applied on top of the current ones (or alone when no
    /// control plane answers).
    #[arg(short = 'f', long = "filename")]
    files: Vec<String>,
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json", "yaml"])]
    output: String,
    #[command(flatten)]
    server: ServerArgs,
}

/// Parses `NAME=VALUE` headers (usage errors).
fn parse_headers(raw: &[String]) -> Result<Vec<(String, String)>, Failure> {
    raw.iter()
        .map(|h| {
            let bad = |why: &str| Failure::usage(format!("--header {h:?}: {why}"));
            let (name, value) = h.split_once('=').ok_or_else(|| bad("expected NAME=VALUE"))?;
            let name = name.trim();
            if name.is_empty() {
                return Err(bad("expected NAME=VALUE (the name is empty)"));
            }
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad("not a valid header name"))?;
            HeaderValue::from_str(value).map_err(|_| bad("not a valid header value"))?;
            Ok((name.to_ascii_lowercase(), value.to_string()))
        })
        .collect()
}

/// The resources to evaluate against, compiled, and a sentence saying which they are.
async fn resources(args: &ExplainArgs) -> Result<(Vec<Resource>, MeshSnapshot, String), Failure> {
    if args.files.is_empty() {
        let rev = revision(&args.server).await?;
        let current = fetch_all(&args.server).await?;
        let snapshot = MeshSnapshot::compile(&current, rev.to_string());
        return Ok((current, snapshot, format!("control plane revision {rev}")));
    }
    let proposed = load_files(&args.files)?;
    let files = args.files.join(", ");
    match args.server.call(Method::GET, "/healthz", None, false).await {
        // Nothing answers (a bad --server URL is a usage error, code 2): the files alone.
        Err(f) if f.code == 1 => {
            let snapshot = MeshSnapshot::compile(&proposed, "proposed");
            Ok((proposed, snapshot, format!("{files} alone (no control plane answers at {})", args.server.server)))
        }
        Err(f) => Err(f),
        Ok((status, v)) if !status.is_success() => Err(api_error(status, &v)),
        Ok((_, v)) => {
            let rev = crate::api_client::parse_answer::<plexus_control::api_types::Health>("/healthz", v)?.revision;
            let current = fetch_all(&args.server).await?;
            let now = plexus_core::time::rfc3339(std::time::SystemTime::now());
            let merged = apply_on_top(current, proposed, &now);
            let snapshot = MeshSnapshot::compile(&merged, format!("{rev}+proposed"));
            Ok((merged, snapshot, format!("control plane revision {rev} with {files} applied on top")))
        }
    }
}

pub async fn run(args: ExplainArgs) -> Result<(), Failure> {
    let headers = parse_headers(&args.headers)?;
    if !args.path.starts_with('/') {
        return Err(Failure::usage(format!("--path {:?} must start with /", args.path)));
    }
    if args.method.is_empty() || Method::from_bytes(args.method.as_bytes()).is_err() {
        return Err(Failure::usage(format!("--method {:?} is not an HTTP method", args.method)));
    }
    let request = ExplainRequest { method: args.method.to_ascii_uppercase(), path: args.path.clone(), headers };
    let (resources, snapshot, config) = resources(&args).await?;
    // A destination that is no mesh Service: what a sidecar's egress decision makes of it —
    // when it is a host outside the mesh (a DNS name in no namespace of the mesh, an address,
    // an ExternalService's host); a Service name that does not exist stays an error.
    let (host, port) = plexus_core::names::split_authority(&args.to);
    let namespaces: std::collections::BTreeSet<&str> =
        snapshot.services.keys().map(|n| n.namespace.as_str()).chain(["default"]).collect();
    let service_name = !plexus_core::ServiceName::candidates_in(host, |ns| namespaces.contains(ns)).is_empty();
    let external = snapshot.externals.iter().any(|e| e.hosts.iter().any(|h| h.to_string() == host))
        || snapshot.externals.find(host, port.unwrap_or(80)).is_some();
    if snapshot.service_by_host(host).is_none() && (!service_name || external) {
        let x = plexus_core::explain::explain_egress(&snapshot, &args.to).map_err(Failure::usage)?;
        return print_egress(&args, &x, &config);
    }
    let client =
        client_identity(&resources, &snapshot.mesh.trust_domain, args.from.as_deref()).map_err(Failure::usage)?;
    let x = plexus_core::explain::explain_as(&snapshot, &client, &args.to, &request).map_err(Failure::runtime)?;
    match args.output.as_str() {
        "json" | "yaml" => {
            let mut value = serde_json::to_value(&x).map_err(|e| Failure::runtime(e.to_string()))?;
            if let Some(obj) = value.as_object_mut() {
                obj.insert("config".into(), config.into());
            }
            print_structured(&args.output, &value)
        }
        _ => {
            print_human(&x, &config);
            Ok(())
        }
    }
}

fn print_egress(args: &ExplainArgs, x: &EgressExplanation, config: &str) -> Result<(), Failure> {
    if args.output != "table" {
        let mut value = serde_json::to_value(x).map_err(|e| Failure::runtime(e.to_string()))?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("config".into(), config.into());
        }
        return print_structured(&args.output, &value);
    }
    let mut lines: Vec<(&str, Vec<String>)> = vec![
        ("config", vec![config.to_string()]),
        ("destination", vec![format!("{} (no mesh Service: leaves the mesh)", x.destination)]),
        ("outbound policy", vec![x.outbound_traffic_policy.to_string()]),
        ("egress", vec![x.description.clone()]),
    ];
    if let Some(e) = &x.external_service {
        lines.push(("external service", vec![e.clone()]));
        let tls = match (&x.tls_origination, &x.ca_file) {
            (false, _) => "as the application sends it".to_string(),
            (true, Some(ca)) => format!("originated by the sidecar (SNI = host, verified against {ca})"),
            (true, None) => "originated by the sidecar (SNI = host, verified against the system roots)".to_string(),
        };
        lines.push(("tls", vec![tls]));
    }
    if let Some(r) = &x.response {
        lines.push(("response", vec![r.clone()]));
    }
    emit(&labelled(lines.iter().map(|(k, v)| (*k, v.as_slice()))));
    Ok(())
}

/// One value per forwarded target: one line when every target agrees, else a line per target.
fn per_target(targets: &[&Target], f: impl Fn(&Target) -> String) -> Vec<String> {
    let values: Vec<String> = targets.iter().map(|t| f(t)).collect();
    match values.first() {
        None => vec!["- (not forwarded)".into()],
        Some(first) if values.iter().all(|v| v == first) => vec![first.clone()],
        Some(_) => targets.iter().zip(&values).map(|(t, v)| format!("{}: {v}", t.service)).collect(),
    }
}

fn print_human(x: &Explanation, config: &str) {
    let targets: Vec<&Target> = x
        .outcomes
        .iter()
        .filter_map(|p| match &p.action {
            Action::Forward(t) => Some(t.as_ref()),
            _ => None,
        })
        .collect();
    let query = x.request.query.as_ref().map(|q| format!("?{q}")).unwrap_or_default();
    let from = x.source.as_ref().map(|s| format!(" from {s}")).unwrap_or_default();
    let headers: Vec<String> = x.request.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let headers = if headers.is_empty() { String::new() } else { format!(" [{}]", headers.join(", ")) };
    let protocol = x.destination.protocol.map(|p| format!(" ({})", protocol_name(p))).unwrap_or_default();
    let route = match (&x.route.name, x.route.rule) {
        (Some(name), Some(rule)) => format!("{name} rule {rule}: {}", x.route.description),
        _ => x.route.description.clone(),
    };
    let backends: Vec<String> = x
        .backends
        .iter()
        .map(|b| {
            let port = b.port.map(|p| format!(":{p}")).unwrap_or_default();
            let missing = if b.exists { "" } else { ", missing" };
            format!("{}{port} weight {} ({}%{missing})", b.service, b.weight, trim_float(b.percent))
        })
        .collect();
    let outcomes: Vec<String> = x
        .outcomes
        .iter()
        .map(|p| {
            let share = trim_float(p.percent);
            match &p.action {
                Action::Forward(t) => {
                    let problem = t.problem.as_ref().map(|p| format!(" — {p}")).unwrap_or_default();
                    format!("forward to {}:{} ({share}%){problem}", t.service, t.port)
                }
                Action::Redirect { status, location } => format!("redirect {status} to {location} ({share}%)"),
                Action::Fail { status, error } => format!("answer {status} \"{error}\" ({share}%)"),
            }
        })
        .collect();
    let filters = x.filters.describe();
    let mut lines: Vec<(&str, Vec<String>)> = vec![
        ("config", vec![config.to_string()]),
        ("request", vec![format!("{} {}{query}{headers}{from}", x.request.method, x.request.path)]),
        ("destination", vec![format!("{}:{}{protocol}", x.destination.service, x.destination.port)]),
        ("route", vec![route]),
        ("backends", vec![if backends.is_empty() { "-".into() } else { backends.join(", ") }]),
        ("outcome", outcomes),
        ("filters", if filters.is_empty() { vec!["none".into()] } else { filters }),
        ("timeouts", per_target(&targets, |t| t.timeouts.describe())),
        ("retries", per_target(&targets, |t| t.retries.describe())),
        (
            "load balancer",
            per_target(&targets, |t| describe_lb(t.load_balancer, t.load_balancer_set, t.hash_on.as_ref())),
        ),
        ("outlier detection", per_target(&targets, |t| describe_outlier(&t.outlier_detection))),
        (
            "connection limits",
            per_target(&targets, |t| {
                t.connection_limits.as_ref().map(describe_limits).unwrap_or_else(|| "none".into())
            }),
        ),
        (
            "rate limit",
            per_target(&targets, |t| match &t.rate_limit {
                None => "none".into(),
                // Only a sidecar in front of the backend enforces it.
                Some(r) if !t.endpoints.iter().any(|e| e.meshed) => {
                    format!("{} — not enforced: no endpoint has a sidecar", describe_rate_limit(r))
                }
                Some(r) => describe_rate_limit(r),
            }),
        ),
        (
            "endpoints",
            per_target(&targets, |t| {
                let eps: Vec<String> = t
                    .endpoints
                    .iter()
                    .map(|e| {
                        let version = e.version.as_ref().map(|v| format!(" {v}")).unwrap_or_default();
                        format!("{} ({}{version})", e.address, e.workload)
                    })
                    .collect();
                if eps.is_empty() { "none".into() } else { eps.join(", ") }
            }),
        ),
        (
            "authorization",
            std::iter::once(x.authorization.description.clone())
                .chain(x.authorization.notes.iter().map(|n| format!("({n})")))
                .collect(),
        ),
    ];
    if targets.is_empty() {
        // Nothing is sent anywhere: only the lines that say so stay.
        lines.retain(|(k, _)| !matches!(*k, "load balancer" | "connection limits" | "endpoints"));
    }
    emit(&labelled(lines.iter().map(|(k, v)| (*k, v.as_slice()))));
}
