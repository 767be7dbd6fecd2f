//! `plexus apply`, `plexus get`, `plexus delete`: managing resources through the control plane.

use std::io::Read as _;
use std::path::PathBuf;

use http::{Method, StatusCode};
use plexus_control::store::ObjectKey;
use plexus_core::{Kind, Resource, Spec, parse_documents};
use serde_json::{Value, json};

use crate::Failure;
use crate::api_client::{ServerArgs, api_error, parse_answer};
use plexus_control::api_types::{DeleteResults, ErrorBody, ResourceList};

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// Files or directories of YAML/JSON resources (`-` for stdin); repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<String>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args)]
pub struct GetArgs {
    /// Kind: case-insensitive, singular or plural (service, workloads, HTTPRoute…).
    kind: String,
    name: Option<String>,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json", "yaml"])]
    output: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(clap::Args)]
pub struct DeleteArgs {
    kind: Option<String>,
    name: Option<String>,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Delete the resources named in these files instead.
    #[arg(short = 'f', long = "filename")]
    files: Vec<String>,
    #[command(flatten)]
    server: ServerArgs,
}

/// Reads and validates every document of every file; all problems are reported together.
fn load(files: &[String]) -> Result<Vec<Resource>, Failure> {
    load_resources(files, "invalid resources; nothing was applied")
}

/// Reads and validates resources from files, directories (their .yaml/.yml/.json) or `-`
/// (stdin); any problem fails the whole input with `heading` and every problem listed.
pub(crate) fn load_resources(files: &[String], heading: &str) -> Result<Vec<Resource>, Failure> {
    let mut inputs: Vec<(String, String)> = Vec::new();
    for f in files {
        if f == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| Failure::usage(format!("cannot read stdin: {e}")))?;
            inputs.push(("-".into(), text));
            continue;
        }
        let path = PathBuf::from(f);
        let paths: Vec<PathBuf> = if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&path)
                .map_err(|e| Failure::usage(format!("cannot read directory {f}: {e}")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
                .collect();
            entries.sort();
            entries
        } else {
            vec![path]
        };
        for p in paths {
            let text =
                std::fs::read_to_string(&p).map_err(|e| Failure::usage(format!("cannot read {}: {e}", p.display())))?;
            inputs.push((p.display().to_string(), text));
        }
    }
    let mut resources = Vec::new();
    let mut problems = Vec::new();
    for (name, text) in &inputs {
        match parse_documents(name, text) {
            Ok(r) => resources.extend(r),
            Err(e) => problems.extend(e.errors.iter().map(|e| format!("  {e}"))),
        }
    }
    if !problems.is_empty() {
        return Err(Failure::usage(format!("{heading}\n{}", problems.join("\n"))));
    }
    Ok(resources)
}

fn object_ref(kind: &str, name: &str) -> String {
    format!("{}/{name}", kind.to_ascii_lowercase())
}

pub async fn apply(args: ApplyArgs) -> Result<(), Failure> {
    use plexus_control::apply_log::{APPLY_ID_HEADER, ApplyOutcome, ApplyResponse};
    let resources = load(&args.files)?;
    if resources.is_empty() {
        return Err(Failure::usage("no resources found in the given files"));
    }
    if let Some(kubeconfig) = args.server.kubeconfig_path() {
        // Kubernetes (SPEC §11): the custom resources, written with the user's own credentials.
        let client = plexus_k8s::access::client_from(&kubeconfig).await.map_err(Failure::runtime)?;
        let results =
            plexus_k8s::store::apply_objects(&client, &resources).await.map_err(|e| Failure::runtime(e.to_string()))?;
        for (r, outcome) in results {
            let outcome = serde_json::to_value(outcome).unwrap_or_default();
            println!("{} {}", object_ref(r.kind.as_str(), &r.metadata.name), outcome.as_str().unwrap_or("?"));
        }
        return Ok(());
    }
    let source = args.files.join(",");
    let body = json!({ "source": source, "items": resources });
    // Each apply carries an id, so that its outcome can be asked for when the answer is lost.
    let id = apply_id()?;
    let sent = args
        .server
        .call_with_headers(Method::POST, "/api/v1/apply", Some(&body), true, &[(APPLY_ID_HEADER, &id)])
        .await;
    let (status, answer) = match sent {
        Ok(answer) => answer,
        Err(lost) => {
            let done = match ask_outcome(&args.server, &id).await {
                Ok(Some(ApplyOutcome::Committed(done))) => done,
                Ok(Some(ApplyOutcome::Failed { error })) => {
                    return Err(Failure::runtime(format!(
                        "{}\n  the control plane says apply {id} failed: {error}; nothing was applied",
                        lost.message
                    )));
                }
                Ok(Some(ApplyOutcome::Pending)) => {
                    return Err(Failure::runtime(format!(
                        "{}\n  apply {id} is still in progress on the control plane: check its outcome with `plexus get` before applying again",
                        lost.message
                    )));
                }
                Ok(None) => {
                    return Err(Failure::runtime(format!(
                        "{}\n  the control plane has no record of apply {id}: nothing was applied (unless it restarted since); apply again",
                        lost.message
                    )));
                }
                Err(e) => {
                    return Err(Failure::runtime(format!(
                        "{}\n  whether apply {id} was committed is unknown: {e}",
                        lost.message
                    )));
                }
            };
            eprintln!("the connection was lost after sending; the control plane confirms apply {id} was committed");
            print_results(&done);
            return Ok(());
        }
    };
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        let refused: ErrorBody = parse_answer("/api/v1/apply", answer)?;
        let lines: Vec<String> = refused
            .errors
            .iter()
            .map(|e| format!("  {}: {}: {}", e.object.as_deref().unwrap_or("?"), e.field, e.reason))
            .collect();
        return Err(Failure::usage(format!(
            "the control plane rejected the resources; nothing was applied\n{}",
            lines.join("\n")
        )));
    }
    if !status.is_success() {
        return Err(api_error(status, &answer));
    }
    let done: ApplyResponse = parse_answer("/api/v1/apply", answer)?;
    print_results(&done);
    Ok(())
}

fn print_results(done: &plexus_control::apply_log::ApplyResponse) {
    for r in &done.results {
        let outcome = serde_json::to_value(r.outcome).ok().and_then(|v| v.as_str().map(str::to_string));
        println!("{} {}", object_ref(r.kind.as_str(), &r.name), outcome.unwrap_or_default());
    }
}

/// A fresh apply id.
fn apply_id() -> Result<String, Failure> {
    plexus_control::apply_log::new_id().ok_or_else(|| Failure::runtime("the system random source failed"))
}

/// What the control plane knows of apply `id`, asked for a few seconds while it cannot be
/// reached or the apply is still pending: `Ok(None)` when it has no record of it.
async fn ask_outcome(server: &ServerArgs, id: &str) -> Result<Option<plexus_control::apply_log::ApplyOutcome>, String> {
    use plexus_control::apply_log::ApplyOutcome;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match server.call(Method::GET, &format!("/api/v1/apply/{id}"), None, false).await {
            Ok((StatusCode::NOT_FOUND, _)) => return Ok(None),
            Ok((StatusCode::OK, v)) => match serde_json::from_value::<ApplyOutcome>(v) {
                Ok(ApplyOutcome::Pending) => last = "still pending".into(),
                Ok(known) => return Ok(Some(known)),
                Err(e) => return Err(format!("unreadable answer: {e}")),
            },
            Ok((status, _)) => last = format!("the control plane answered {status}"),
            Err(e) => last = e.message.lines().next().unwrap_or_default().to_string(),
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    if last == "still pending" { Ok(Some(ApplyOutcome::Pending)) } else { Err(last) }
}

/// GET or DELETE one object; a missing one is `error: <kind> <namespace>/<name> not found`.
async fn object_call(
    server: &ServerArgs,
    method: Method,
    kind: Kind,
    namespace: &str,
    name: &str,
) -> Result<Value, Failure> {
    let lower = kind.as_str().to_ascii_lowercase();
    let write = method == Method::DELETE;
    let (status, v) =
        server.call(method, &format!("/api/v1/resources/{lower}s/{namespace}/{name}"), None, write).await?;
    if status == StatusCode::NOT_FOUND {
        return Err(Failure::runtime(format!("{lower} {namespace}/{name} not found")));
    }
    if !status.is_success() {
        return Err(api_error(status, &v));
    }
    Ok(v)
}

fn kind_arg(kind: &str) -> Result<Kind, Failure> {
    Kind::from_cli(kind).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        Failure::usage(format!("unknown kind {kind:?} (known: {})", known.join(", ")))
    })
}

pub async fn get(args: GetArgs) -> Result<(), Failure> {
    let kind = kind_arg(&args.kind)?;
    let plural = format!("{}s", kind.as_str().to_ascii_lowercase());
    // One object as it is, or the list.
    let (value, items) = match &args.name {
        Some(name) => {
            let one = object_call(&args.server, Method::GET, kind, &args.namespace, name).await?;
            (one.clone(), vec![one])
        }
        None => {
            let ns = if args.all_namespaces { "all".to_string() } else { args.namespace.clone() };
            let path = format!("/api/v1/resources/{plural}?namespace={ns}");
            let list: ResourceList = args.server.fetch(Method::GET, &path, None, false).await?;
            (serde_json::to_value(&list).map_err(|e| Failure::runtime(e.to_string()))?, list.items)
        }
    };
    match args.output.as_str() {
        "json" => println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default()),
        "yaml" => print!("{}", serde_saphyr::to_string(&value).map_err(|e| Failure::runtime(e.to_string()))?),
        _ => print_table(kind, &items),
    }
    Ok(())
}

/// Kind-specific column headers for the table view.
fn columns(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Service => &["PORTS", "SELECTOR"],
        Kind::Workload => &["ADDRESS", "PORTS", "MESHED"],
        Kind::HttpRoute | Kind::GrpcRoute => &["PARENTS", "RULES"],
        Kind::TrafficSplit => &["SERVICE", "BACKENDS"],
        Kind::AuthorizationPolicy => &["TARGET", "ACTION", "RULES"],
        Kind::ResiliencePolicy | Kind::RateLimitPolicy => &["TARGET", "SETTINGS"],
        Kind::FaultInjection => &["DELAY", "ABORT"],
        Kind::ExternalService => &["HOSTS", "PORTS"],
        Kind::Gateway => &["LISTENERS"],
        Kind::MeshConfig => &["MTLS", "AUTHORIZATION"],
        Kind::TrafficTarget => &["DESTINATION", "SOURCES"],
        Kind::HttpRouteGroup => &["MATCHES"],
    }
}

/// Kind-specific columns for the table view.
fn summary(r: &Resource) -> Vec<String> {
    let list = |items: Vec<String>| items.join(",");
    let target = |t: &plexus_core::resource::PolicyTargetRef| {
        format!("{}{}", t.name, t.port.map(|p| format!(":{p}")).unwrap_or_default())
    };
    match &r.spec {
        Spec::Service(s) => vec![
            list(
                s.ports
                    .iter()
                    .map(|p| {
                        format!("{}{}", p.port, p.app_protocol.as_ref().map(|a| format!("/{a}")).unwrap_or_default())
                    })
                    .collect(),
            ),
            list(s.selector.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        ],
        Spec::Workload(w) => vec![
            w.address.clone(),
            list(w.ports.iter().map(|p| p.port.to_string()).collect()),
            if w.meshed { "yes" } else { "no" }.into(),
        ],
        Spec::HttpRoute(h) => {
            vec![list(h.parent_refs.iter().map(|p| p.name.clone()).collect()), h.rules.len().to_string()]
        }
        Spec::GrpcRoute(g) => {
            vec![list(g.parent_refs.iter().map(|p| p.name.clone()).collect()), g.rules.len().to_string()]
        }
        Spec::TrafficSplit(t) => {
            vec![t.service.clone(), list(t.backends.iter().map(|b| format!("{}={}", b.service, b.weight)).collect())]
        }
        Spec::AuthorizationPolicy(a) => {
            vec![target(&a.target_ref), format!("{:?}", a.action).to_lowercase(), a.rules.len().to_string()]
        }
        Spec::ResiliencePolicy(p) => {
            let mut set = Vec::new();
            if p.timeouts.is_some() {
                set.push("timeouts".to_string());
            }
            if let Some(r) = &p.retries {
                set.push(format!("retries={}", r.attempts));
            }
            if p.retry_budget.is_some() {
                set.push("retryBudget".into());
            }
            if p.outlier_detection.is_some() {
                set.push("outlierDetection".into());
            }
            if p.connection_limits.is_some() {
                set.push("connectionLimits".into());
            }
            if let Some(lb) = &p.load_balancer {
                set.push(format!("lb={:?}", lb.algorithm));
            }
            vec![target(&p.target_ref), list(set)]
        }
        Spec::RateLimitPolicy(p) => vec![
            target(&p.target_ref),
            format!("{}/s burst {}", p.requests_per_second, p.burst.unwrap_or(p.requests_per_second)),
        ],
        Spec::FaultInjection(f) => vec![
            f.delay
                .as_ref()
                .map(|d| format!("{} {}%", plexus_core::duration::format(d.fixed.0), d.percent.unwrap_or(100.0)))
                .unwrap_or_else(|| "-".into()),
            f.abort
                .as_ref()
                .map(|a| {
                    let status = a
                        .http_status
                        .map(|s| s.to_string())
                        .or_else(|| a.grpc_status.as_ref().map(|g| format!("grpc {g:?}")));
                    format!("{} {}%", status.unwrap_or_default(), a.percent.unwrap_or(100.0))
                })
                .unwrap_or_else(|| "-".into()),
        ],
        Spec::ExternalService(e) => {
            vec![list(e.hosts.clone()), list(e.ports.iter().map(|p| p.number().to_string()).collect())]
        }
        Spec::Gateway(g) => {
            vec![list(g.listeners.iter().map(|l| format!("{}/{}:{}", l.name, l.protocol, l.port)).collect())]
        }
        Spec::MeshConfig(m) => vec![
            format!("{:?}", plexus_core::model::MeshSettings::from_spec(m).mtls_mode).to_lowercase(),
            format!("{:?}", plexus_core::model::MeshSettings::from_spec(m).default_authorization).to_lowercase(),
        ],
        Spec::TrafficTarget(t) => {
            vec![t.destination.name.clone(), list(t.sources.iter().map(|s| s.name.clone()).collect())]
        }
        Spec::HttpRouteGroup(g) => vec![list(g.matches.iter().map(|m| m.name.clone()).collect())],
    }
}

fn print_table(kind: Kind, items: &[Value]) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .filter_map(|item| plexus_core::resource_from_value(item.clone()).ok())
        .map(|r| {
            let mut row = vec![r.metadata.namespace().to_string(), r.metadata.name.clone()];
            row.extend(summary(&r));
            row
        })
        .collect();
    let mut header = vec!["NAMESPACE", "NAME"];
    header.extend(columns(kind));
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().filter_map(|r| r.get(i)).map(String::len).chain([header[i].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("   ").trim_end());
    };
    line(header.clone());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Kubernetes: deletes the custom resources with the user's own credentials (SPEC §11).
async fn delete_in_cluster(kubeconfig: &std::path::Path, keys: Vec<ObjectKey>) -> Result<(), Failure> {
    let client = plexus_k8s::access::client_from(kubeconfig).await.map_err(Failure::runtime)?;
    let deleted =
        plexus_k8s::store::delete_objects(&client, &keys).await.map_err(|e| Failure::runtime(e.to_string()))?;
    if let ([key], [false]) = (keys.as_slice(), deleted.as_slice()) {
        let lower = key.kind.as_str().to_ascii_lowercase();
        return Err(Failure::runtime(format!("{lower} {}/{} not found", key.namespace, key.name)));
    }
    for (k, d) in keys.iter().zip(deleted) {
        println!("{} {}", object_ref(k.kind.as_str(), &k.name), if d { "deleted" } else { "not found" });
    }
    Ok(())
}

pub async fn delete(args: DeleteArgs) -> Result<(), Failure> {
    if let Some(kubeconfig) = args.server.kubeconfig_path() {
        let keys: Vec<ObjectKey> = if !args.files.is_empty() {
            load(&args.files)?.iter().map(ObjectKey::of).collect()
        } else {
            let (Some(kind), Some(name)) = (&args.kind, &args.name) else {
                return Err(Failure::usage("usage: plexus delete KIND NAME [-n NAMESPACE] | plexus delete -f FILE"));
            };
            let kind = kind_arg(kind)?;
            let namespace = if kind.namespaced() { args.namespace.clone() } else { "default".into() };
            vec![ObjectKey { kind, namespace, name: name.clone() }]
        };
        return delete_in_cluster(&kubeconfig, keys).await;
    }
    if !args.files.is_empty() {
        let resources = load(&args.files)?;
        let items: Vec<Value> = resources
            .iter()
            .map(|r| json!({"kind": r.kind.as_str(), "namespace": r.metadata.namespace(), "name": r.metadata.name}))
            .collect();
        let answer: DeleteResults =
            args.server.fetch(Method::POST, "/api/v1/delete", Some(&json!({ "items": items })), true).await?;
        for r in answer.results {
            let what = object_ref(r.kind.as_str(), &r.name);
            println!("{what} {}", if r.deleted { "deleted" } else { "not found" });
        }
        return Ok(());
    }
    let (Some(kind), Some(name)) = (&args.kind, &args.name) else {
        return Err(Failure::usage("usage: plexus delete KIND NAME [-n NAMESPACE] | plexus delete -f FILE"));
    };
    let kind = kind_arg(kind)?;
    object_call(&args.server, Method::DELETE, kind, &args.namespace, name).await?;
    println!("{} deleted", object_ref(kind.as_str(), name));
    Ok(())
}
