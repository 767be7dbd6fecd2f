//! `plexus check`: health checks with ✓/✗ lines (‼ for warnings) and a hint per failure.

use http::{Method, StatusCode};
use plexus_control::proxies::{Health, ProxiesResponse, ProxyStatus};
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
    /// How long a connected proxy may go without a workload certificate before it is flagged
    /// (it is "getting its certificate" until then).
    #[arg(long, env = "PLEXUS_CERTIFICATE_GRACE", default_value = "10s", value_parser = plexus_core::duration::parse)]
    certificate_grace: std::time::Duration,
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
    let health = match health.map(|(status, v)| (status, serde_json::from_value::<Health>(v))) {
        Ok((StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE, Ok(h))) => h,
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
    match health.status.as_str() {
        "ok" => r.ok(format!("store healthy (revision {})", health.revision)),
        _ => r.fail(
            format!("store unhealthy: {}", health.store.as_deref().unwrap_or("unknown")),
            "writes fail (the store re-opens its file on each write): check the data dir's disk and permissions, and the control plane's logs",
        ),
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
    let list = |v: Value| serde_json::from_value::<ProxiesResponse>(v).map(|r| r.proxies);
    match args.server.call(Method::GET, "/api/v1/proxies", None, false).await {
        Ok((StatusCode::OK, v)) => {
            let proxies = match list(v) {
                Ok(p) => p,
                Err(e) => {
                    r.fail(
                        format!("cannot read the proxy list: {e}"),
                        "use a plexus CLI of the control plane's version",
                    );
                    Vec::new()
                }
            };
            let connected: Vec<&str> = proxies.iter().map(|p| p.record.workload.as_str()).collect();
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
                let out_of_sync = |p: &ProxyStatus| p.record.applied_revision != p.record.sent_revision;
                let mut behind: Vec<ProxyStatus> = proxies.iter().filter(|p| out_of_sync(p)).cloned().collect();
                if !behind.is_empty() {
                    // A proxy in the middle of applying an update is not out of sync: look again.
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    if let Ok((StatusCode::OK, again)) =
                        args.server.call(Method::GET, "/api/v1/proxies", None, false).await
                    {
                        let still = list(again).unwrap_or_default();
                        behind.retain(|b| still.iter().any(|p| p.record.id == b.record.id && out_of_sync(p)));
                    }
                }
                if behind.is_empty() {
                    r.ok("every proxy is in sync with its configuration");
                }
                for p in &behind {
                    r.fail(
                        format!(
                            "proxy {} ({}) is not in sync: applied revision {}, sent {}",
                            p.record.workload,
                            p.record.admin_address,
                            p.record.applied_revision,
                            p.record.sent_revision
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
            for line in identity_lines(&v, args.certificate_grace) {
                match line {
                    Line::Ok(what) => r.ok(what),
                    Line::Warn(what, hint) => r.warn(what, hint),
                    Line::Fail(what, hint) => r.fail(what, hint),
                    Line::Skip(what) => r.skip(what),
                }
            }
        }
        Ok((status, v)) => r.fail(
            format!("cannot read the certificate authority: {}", v["error"].as_str().unwrap_or(status.as_str())),
            "check the data dir's trust-anchor.pem and issuer.pem",
        ),
        Err(e) => r.fail("cannot read the certificate authority", e.message),
    }
}

/// One result of the identity checks.
#[derive(Debug, Clone, PartialEq)]
enum Line {
    Ok(String),
    /// What, hint.
    Warn(String, String),
    /// What, hint.
    Fail(String, String),
    Skip(String),
}

/// A CA certificate is ✗ once expired and ‼ within 60 days of it.
fn expiry_line(what: &str, cert: &Value, hint: &str) -> Line {
    const SIXTY_DAYS: i64 = 60 * 86_400;
    let left = cert["expiresInSeconds"].as_i64().unwrap_or(0);
    let not_after = cert["notAfter"].as_str().unwrap_or("?");
    if left <= 0 {
        Line::Fail(format!("{what} expired on {not_after}"), format!("rotate it now: {hint}"))
    } else if left < SIXTY_DAYS {
        Line::Warn(
            format!("{what} expires within 60 days ({not_after}, {} days left)", left / 86_400),
            format!("rotate it before it expires: {hint}"),
        )
    } else {
        Line::Ok(format!("{what} valid until {not_after}"))
    }
}

/// The identity checks over `/api/v1/identity` (pure, so each case is tested directly):
/// the trust bundle and issuer, and each connected proxy's certificate.
fn identity_lines(v: &Value, grace: std::time::Duration) -> Vec<Line> {
    let mut lines = Vec::new();
    let bundle = v["trustBundle"].as_array().cloned().unwrap_or_else(|| vec![v["trustAnchor"].clone()]);
    for (i, anchor) in bundle.iter().enumerate() {
        let what = if i == 0 { "trust anchor" } else { "previous trust anchor" };
        lines.push(expiry_line(what, anchor, "plexus identity rotate --anchor"));
    }
    lines.push(expiry_line("issuer", &v["issuer"], "plexus identity rotate"));
    if v["issuerSignedByAnchor"] == true {
        lines.push(Line::Ok("issuer signed by the trust anchor".into()));
    } else {
        lines.push(Line::Fail(
            "the issuer is not signed by the trust anchor".into(),
            "restore the matching pair in the data dir, or replace both with `plexus identity init --force`".into(),
        ));
    }
    if let (Some(in_use), Some(on_disk)) = (v["issuerInUseSha256"].as_str(), v["issuer"]["sha256"].as_str())
        && in_use != on_disk
    {
        lines.push(Line::Warn(
            "the issuer in the data dir is not the one the control plane signs with".into(),
            "the files were changed under the running control plane: restart it to use them".into(),
        ));
    }

    if v["rotation"].is_object() {
        let n = v["rotation"]["proxiesOnOldIssuer"].as_u64().unwrap_or(0) as usize;
        lines.push(Line::Warn(
            format!("rotation in progress: {} still on the old issuer", proxies_text(n)),
            "the previous trust anchor leaves the bundle once every connected proxy has a certificate from the new issuer (plexus identity show); restart a proxy that does not re-certify".into(),
        ));
    }
    let Some(proxies) = v["proxies"].as_array() else { return lines };
    if proxies.is_empty() {
        lines.push(Line::Skip("proxy certificates: no proxy connected".into()));
        return lines;
    }
    let grace = grace.as_secs();
    let (mut current, mut previous_issuer, mut failed) = (0, 0, 0);
    for p in proxies {
        let name = format!(
            "proxy {} ({}, namespace {})",
            p["workload"].as_str().filter(|w| !w.is_empty()).unwrap_or("?"),
            p["mode"].as_str().unwrap_or("sidecar"),
            p["namespace"].as_str().unwrap_or("default")
        );
        let issued_by = p["issuedBy"].as_str().unwrap_or("none");
        if issued_by == "none" {
            let connected = p["connectedSeconds"].as_u64().unwrap_or(0);
            if connected < grace {
                lines.push(Line::Skip(format!("{name} is getting its certificate (connected {connected}s ago)")));
            } else {
                failed += 1;
                lines.push(Line::Fail(
                    format!("{name} has no workload certificate after {connected}s"),
                    "look at the proxy's logs: it needs the control plane's gRPC address and a workload token (`plexus token create`) to get one"
                        .into(),
                ));
            }
            continue;
        }
        if p["expiresInSeconds"].as_i64().unwrap_or(0) <= 0 {
            failed += 1;
            lines.push(Line::Fail(
                format!("{name} holds an expired certificate (notAfter {})", p["notAfter"].as_str().unwrap_or("?")),
                "its renewal failed: look at the proxy's logs; restarting it gets a fresh certificate".into(),
            ));
            continue;
        }
        match issued_by {
            "current" => current += 1,
            "previousIssuer" => previous_issuer += 1,
            // Counted by the rotation line below.
            "previousAnchor" => {}
            _ => {
                failed += 1;
                lines.push(Line::Fail(
                    format!(
                        "{name} holds a certificate from an unknown issuer (sha256 {})",
                        p["issuerSha256"].as_str().unwrap_or("?")
                    ),
                    "it does not chain to this control plane's certificate authority: check the proxy talks to this control plane, then restart it".into(),
                ));
            }
        }
    }
    if failed == 0 && current == proxies.len() {
        lines.push(Line::Ok(format!("{} a valid certificate from the current issuer", holds(current))));
    } else if current > 0 {
        lines.push(Line::Ok(format!(
            "{current} of {} proxies hold a valid certificate from the current issuer",
            proxies.len()
        )));
    }
    if previous_issuer > 0 {
        lines.push(Line::Warn(
            format!("{} a certificate from the previous issuer", holds(previous_issuer)),
            "still valid (same trust anchor); they move to the current issuer at their next renewal, or when restarted"
                .into(),
        ));
    }
    lines
}

/// "1 proxy holds", "2 proxies hold".
fn holds(n: usize) -> String {
    if n == 1 { "1 proxy holds".into() } else { format!("{n} proxies hold") }
}

/// "1 proxy", "2 proxies".
fn proxies_text(n: usize) -> String {
    if n == 1 { "1 proxy".into() } else { format!("{n} proxies") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_control::certify::CERTIFICATE_GRACE;
    use serde_json::json;

    fn cert(days: i64) -> Value {
        json!({"expiresInSeconds": days * 86_400 + 60, "notAfter": "2030-01-01T00:00:00.000Z", "sha256": "aa"})
    }

    fn healthy() -> Value {
        json!({
            "trustAnchor": cert(3650), "trustBundle": [cert(3650)], "issuer": cert(365),
            "issuerSignedByAnchor": true, "issuerInUseSha256": "aa", "rotation": null,
            "proxies": [proxy("current", 30, 3600)],
        })
    }

    fn proxy(issued_by: &str, connected: u64, expires_in: i64) -> Value {
        json!({"workload": "reviews-v1", "namespace": "default", "mode": "sidecar", "issuedBy": issued_by,
               "connectedSeconds": connected, "expiresInSeconds": expires_in, "notAfter": "2026-01-01T00:00:00.000Z",
               "issuerSha256": "bb"})
    }

    fn fails(lines: &[Line]) -> Vec<String> {
        lines.iter().filter_map(|l| if let Line::Fail(w, _) = l { Some(w.clone()) } else { None }).collect()
    }

    fn warns(lines: &[Line]) -> Vec<String> {
        lines.iter().filter_map(|l| if let Line::Warn(w, _) = l { Some(w.clone()) } else { None }).collect()
    }

    #[test]
    fn a_healthy_mesh_passes() {
        let lines = identity_lines(&healthy(), CERTIFICATE_GRACE);
        assert!(fails(&lines).is_empty() && warns(&lines).is_empty(), "{lines:?}");
        assert!(lines.contains(&Line::Ok("1 proxy holds a valid certificate from the current issuer".into())));
    }

    #[test]
    fn ca_certificates_warn_within_60_days_and_fail_when_expired() {
        let mut v = healthy();
        v["issuer"] = cert(59);
        v["trustBundle"] = json!([cert(-1)]);
        let lines = identity_lines(&v, CERTIFICATE_GRACE);
        assert_eq!(warns(&lines), vec!["issuer expires within 60 days (2030-01-01T00:00:00.000Z, 59 days left)"]);
        assert_eq!(fails(&lines), vec!["trust anchor expired on 2030-01-01T00:00:00.000Z"]);
        v["issuer"] = json!({"expiresInSeconds": -5, "notAfter": "x", "sha256": "aa"});
        assert!(fails(&identity_lines(&v, CERTIFICATE_GRACE)).contains(&"issuer expired on x".to_string()));
    }

    #[test]
    fn an_issuer_not_signed_by_the_anchor_fails() {
        let mut v = healthy();
        v["issuerSignedByAnchor"] = json!(false);
        assert_eq!(fails(&identity_lines(&v, CERTIFICATE_GRACE)), vec!["the issuer is not signed by the trust anchor"]);
    }

    #[test]
    fn proxy_certificates_are_checked() {
        let mut v = healthy();
        v["proxies"] = json!([proxy("none", 3, 0)]);
        let lines = identity_lines(&v, CERTIFICATE_GRACE);
        assert!(fails(&lines).is_empty(), "within the grace period: {lines:?}");
        v["proxies"] = json!([proxy("none", 11, 0)]);
        assert_eq!(
            fails(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec!["proxy reviews-v1 (sidecar, namespace default) has no workload certificate after 11s"]
        );
        v["proxies"] = json!([proxy("current", 30, -1)]);
        assert_eq!(
            fails(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec![
                "proxy reviews-v1 (sidecar, namespace default) holds an expired certificate (notAfter 2026-01-01T00:00:00.000Z)"
            ]
        );
        v["proxies"] = json!([proxy("unknown", 30, 3600)]);
        assert_eq!(
            fails(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec![
                "proxy reviews-v1 (sidecar, namespace default) holds a certificate from an unknown issuer (sha256 bb)"
            ]
        );
        v["proxies"] = json!([proxy("previousIssuer", 30, 3600)]);
        let lines = identity_lines(&v, CERTIFICATE_GRACE);
        assert!(fails(&lines).is_empty());
        assert_eq!(warns(&lines), vec!["1 proxy holds a certificate from the previous issuer"]);
    }

    #[test]
    fn an_anchor_rotation_in_progress_is_a_warning() {
        let mut v = healthy();
        v["trustBundle"] = json!([cert(3650), cert(3000)]);
        v["rotation"] = json!({"proxiesOnOldIssuer": 1, "proxiesOnNewIssuer": 1});
        v["proxies"] = json!([proxy("current", 30, 3600), proxy("previousAnchor", 30, 3600)]);
        let lines = identity_lines(&v, CERTIFICATE_GRACE);
        assert!(fails(&lines).is_empty(), "{lines:?}");
        assert_eq!(warns(&lines), vec!["rotation in progress: 1 proxy still on the old issuer"]);
        assert!(lines.contains(&Line::Ok("previous trust anchor valid until 2030-01-01T00:00:00.000Z".into())));
    }

    #[test]
    fn an_anchor_rotation_shows_even_with_no_proxy_connected() {
        let mut v = healthy();
        v["rotation"] = json!({"proxiesOnOldIssuer": 0, "proxiesOnNewIssuer": 0});
        v["proxies"] = json!([]);
        assert_eq!(
            warns(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec!["rotation in progress: 0 proxies still on the old issuer"]
        );
    }

    #[test]
    fn a_data_dir_changed_under_the_control_plane_is_a_warning() {
        let mut v = healthy();
        v["issuerInUseSha256"] = json!("cc");
        assert_eq!(
            warns(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec!["the issuer in the data dir is not the one the control plane signs with"]
        );
    }
}
