//! `plexus check`: health checks with ✓/✗ lines (‼ for warnings) and a hint per failure.

use http::{Method, StatusCode};
use plexus_core::Kind;
use plexus_core::check::{Severity, analyze};
use serde_json::Value;

use crate::Failure;
use crate::api_client::ServerArgs;

#[derive(clap::Args)]
pub struct CheckArgs {
    /// Check that a control plane can be started here (data dir, ports) instead.
    #[arg(long)]
    pre: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// Collects results and prints them as they come.
#[derive(Default)]
struct Report {
    failures: usize,
}

impl Report {
    fn section(&self, name: &str) {
        println!("{name}");
    }
    fn ok(&self, what: impl AsRef<str>) {
        println!("  ✓ {}", what.as_ref());
    }
    fn fail(&mut self, what: impl AsRef<str>, hint: impl AsRef<str>) {
        self.failures += 1;
        println!("  ✗ {}\n      hint: {}", what.as_ref(), hint.as_ref());
    }
    fn warn(&self, what: impl AsRef<str>, hint: impl AsRef<str>) {
        println!("  ‼ {}\n      hint: {}", what.as_ref(), hint.as_ref());
    }
    fn skip(&self, what: impl AsRef<str>) {
        println!("  - {} (skipped)", what.as_ref());
    }
}

pub async fn run(args: CheckArgs) -> Result<(), Failure> {
    let mut r = Report::default();
    if args.pre {
        pre(&args, &mut r);
    } else {
        installed(&args, &mut r).await;
    }
    if r.failures > 0 {
        println!("{} check(s) failed", r.failures);
        return Err(Failure { code: 1, message: String::new() });
    }
    println!("all checks passed");
    Ok(())
}

fn pre(args: &CheckArgs, r: &mut Report) {
    r.section("pre-install");
    let dir = &args.server.data_dir;
    let probe = dir.join(".plexus-check");
    match std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&probe, b"ok")) {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            r.ok(format!("data dir {} is writable", dir.display()));
        }
        Err(e) => r.fail(
            format!("data dir {} is not writable: {e}", dir.display()),
            "pass --data-dir with a writable directory",
        ),
    }
    for (port, what) in [(7700, "gRPC for proxies"), (7701, "HTTP API and dashboard")] {
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(_) => r.ok(format!("port {port} ({what}) is free")),
            Err(e) => r.fail(
                format!("port {port} ({what}) is not available: {e}"),
                "stop what uses it, or give the control plane other addresses",
            ),
        }
    }
}

async fn installed(args: &CheckArgs, r: &mut Report) {
    r.section("control plane");
    let health = args.server.call(Method::GET, "/healthz", None, false).await;
    let health = match health {
        Ok((StatusCode::OK, v)) => v,
        Ok((status, _)) => {
            r.fail(
                format!("control plane at {} answered {status}", args.server.server),
                "look at the control plane's logs",
            );
            return;
        }
        Err(e) => {
            r.fail(
                format!("control plane unreachable at {}", args.server.server),
                e.message.lines().next().unwrap_or_default(),
            );
            return;
        }
    };
    r.ok(format!("control plane reachable at {}", args.server.server));
    match health.get("status").and_then(Value::as_str) {
        Some("ok") => r.ok(format!("store healthy (revision {})", health["revision"])),
        _ => r.fail("store unhealthy", "look at the control plane's logs"),
    }

    r.section("proxies");
    let registered: Vec<String> =
        match args.server.call(Method::GET, "/api/v1/resources/workloads?namespace=all", None, false).await {
            Ok((StatusCode::OK, v)) => v["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter(|w| {
                    w["metadata"]["annotations"].get(plexus_control::discovery::REGISTERED_ANNOTATION).is_some()
                })
                .filter_map(|w| w["metadata"]["name"].as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
    match args.server.call(Method::GET, "/api/v1/proxies", None, false).await {
        Ok((StatusCode::OK, v)) => {
            let proxies = v["proxies"].as_array().cloned().unwrap_or_default();
            let connected: Vec<&str> = proxies.iter().filter_map(|p| p["workload"].as_str()).collect();
            for w in registered.iter().filter(|w| !connected.contains(&w.as_str())) {
                r.fail(
                    format!("workload {w} is registered but its proxy is not connected"),
                    "its `plexus run` stopped or lost the control plane; it leaves the mesh within 15 s unless it reconnects",
                );
            }
            if proxies.is_empty() {
                r.skip("no proxy connected");
            } else {
                r.ok(format!("{} proxies connected", proxies.len()));
                let mut behind: Vec<Value> =
                    proxies.iter().filter(|p| p["appliedRevision"] != p["sentRevision"]).cloned().collect();
                if !behind.is_empty() {
                    // A proxy in the middle of applying an update is not out of sync: look again.
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    if let Ok((StatusCode::OK, again)) =
                        args.server.call(Method::GET, "/api/v1/proxies", None, false).await
                    {
                        let still: Vec<Value> = again["proxies"].as_array().cloned().unwrap_or_default();
                        behind.retain(|b| {
                            still.iter().any(|p| p["id"] == b["id"] && p["appliedRevision"] != p["sentRevision"])
                        });
                    }
                }
                if behind.is_empty() {
                    r.ok("every proxy is in sync with its configuration");
                }
                for p in &behind {
                    r.fail(
                        format!(
                            "proxy {} ({}) is not in sync: applied revision {}, sent {}",
                            p["workload"].as_str().unwrap_or("?"),
                            p["adminAddress"].as_str().unwrap_or("?"),
                            p["appliedRevision"],
                            p["sentRevision"]
                        ),
                        "check the proxy's logs (its admin /config shows what it holds)",
                    );
                }
            }
        }
        Ok((status, _)) => r.fail(format!("cannot list proxies: {status}"), "upgrade the control plane"),
        Err(e) => r.fail("cannot list proxies", e.message),
    }

    r.section("configuration");
    let mut resources = Vec::new();
    for kind in Kind::ALL {
        let path = format!("/api/v1/resources/{}s?namespace=all", kind.as_str().to_ascii_lowercase());
        match args.server.call(Method::GET, &path, None, false).await {
            Ok((StatusCode::OK, v)) => {
                for item in v["items"].as_array().cloned().unwrap_or_default() {
                    if let Ok(res) = plexus_core::resource_from_value(item) {
                        resources.push(res);
                    }
                }
            }
            _ => {
                r.fail(format!("cannot list {kind} resources"), "check the control plane's logs");
                return;
            }
        }
    }
    let findings = analyze(&resources);
    if findings.iter().all(|f| f.severity != Severity::Error) {
        r.ok(format!("{} resources, no errors", resources.len()));
    }
    for f in findings {
        match f.severity {
            Severity::Error => r.fail(format!("{}: {}", f.object, f.message), f.hint),
            Severity::Warning => r.warn(format!("{}: {}", f.object, f.message), f.hint),
        }
    }

    r.section("identity");
    match args.server.call(Method::GET, "/api/v1/identity", None, false).await {
        Ok((StatusCode::OK, v)) => {
            const SIXTY_DAYS: i64 = 60 * 86_400;
            for (what, cert) in [("trust anchor", &v["trustAnchor"]), ("issuer", &v["issuer"])] {
                let left = cert["expiresInSeconds"].as_i64().unwrap_or(0);
                if left <= 0 {
                    r.fail(
                        format!("{what} expired on {}", cert["notAfter"].as_str().unwrap_or("?")),
                        "rotate it: plexus identity rotate (security issue)",
                    );
                } else if left < SIXTY_DAYS {
                    r.fail(
                        format!("{what} expires within 60 days ({})", cert["notAfter"].as_str().unwrap_or("?")),
                        "rotate it before it expires",
                    );
                } else {
                    r.ok(format!("{what} valid until {}", cert["notAfter"].as_str().unwrap_or("?")));
                }
            }
            if v["issuerSignedByAnchor"] == true {
                r.ok("issuer signed by the trust anchor");
            } else {
                r.fail("the issuer is not signed by the trust anchor", "restore the matching pair in the data dir");
            }
            r.skip("proxy certificates: mTLS between sidecars is not in this version yet");
        }
        Ok((status, v)) => r.fail(
            format!("cannot read the certificate authority: {}", v["error"].as_str().unwrap_or(status.as_str())),
            "check the data dir's trust-anchor.pem and issuer.pem",
        ),
        Err(e) => r.fail("cannot read the certificate authority", e.message),
    }
}
