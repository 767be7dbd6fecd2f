//! `plexus check`: health checks with ✓/✗ lines (‼ for warnings) and a hint per failure.

use http::{Method, StatusCode};
use plexus_control::api_types::{
    CertOrigin, CertSummary, Health, IdentityStatus, ProxiesResponse, ProxyStatus, TokenInfo, TokenList,
};
use plexus_core::check::{Severity, analyze};
use plexus_core::{Kind, Resource};
use plexus_proxy::gateway::GatewayReport;

use crate::Failure;
use crate::api_client::{ServerArgs, error_text, parse_answer};

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

/// SPEC §11: with a kubeconfig, the cluster's own checks come first.
async fn kubernetes(args: &CheckArgs, r: &mut Report) {
    let Some(kubeconfig) = args.server.kubeconfig_path() else { return };
    r.section("kubernetes");
    for finding in plexus_k8s::access::checks(&kubeconfig).await {
        match finding {
            plexus_k8s::access::Finding::Ok(what) => r.ok(what),
            plexus_k8s::access::Finding::Warn(what, hint) => r.warn(what, hint),
            plexus_k8s::access::Finding::Fail(what, hint) => r.fail(what, hint),
        }
    }
}

async fn installed(args: &CheckArgs, r: &mut Report) {
    kubernetes(args, r).await;
    r.section("control plane");
    let health = args.server.call(Method::GET, "/healthz", None, false).await;
    let health = match health.map(|(status, v)| (status, serde_json::from_value::<Health>(v))) {
        Ok((StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE, Ok(h))) => h,
        Ok((status, _)) => {
            r.fail(
                format!("control plane at {} answered {status}", args.server.describe()),
                "look at the control plane's logs",
            );
            return;
        }
        Err(e) => {
            r.fail(
                format!("control plane unreachable at {}", args.server.describe()),
                e.message.lines().next().unwrap_or_default(),
            );
            return;
        }
    };
    r.ok(format!("control plane reachable at {}", args.server.describe()));
    match health.status.as_str() {
        "ok" => r.ok(format!("store healthy (revision {})", health.revision)),
        _ => r.fail(
            format!("store unhealthy: {}", health.store.as_deref().unwrap_or("unknown")),
            "writes fail (the store re-opens its file on each write): check the data dir's disk and permissions, and the control plane's logs",
        ),
    }

    r.section("proxies");
    let registered: Vec<String> = list_resources(&args.server, Kind::Workload)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|w| w.metadata.annotations.contains_key(plexus_control::discovery::REGISTERED_ANNOTATION))
        .map(|w| w.metadata.name)
        .collect();
    let list = |v| parse_answer::<ProxiesResponse>("/api/v1/proxies", v).map(|r| r.proxies);
    match args.server.call(Method::GET, "/api/v1/proxies", None, false).await {
        Ok((StatusCode::OK, v)) => {
            let proxies = match list(v) {
                Ok(p) => p,
                Err(e) => {
                    r.fail("cannot read the proxy list", e.message);
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
    gateways(args, r).await;

    r.section("configuration");
    let mut resources = Vec::new();
    for kind in Kind::ALL {
        match list_resources(&args.server, kind).await {
            Ok(items) => resources.extend(items),
            Err(e) => {
                r.fail(format!("cannot list {kind} resources: {e}"), "check the control plane's logs");
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
    const IDENTITY: &str = "/api/v1/identity";
    let identity = match args.server.call(Method::GET, IDENTITY, None, false).await {
        Ok((StatusCode::OK, v)) => match parse_answer::<IdentityStatus>(IDENTITY, v) {
            Ok(status) => {
                for line in identity_lines(&status, args.certificate_grace) {
                    match line {
                        Line::Ok(what) => r.ok(what),
                        Line::Warn(what, hint) => r.warn(what, hint),
                        Line::Fail(what, hint) => r.fail(what, hint),
                        Line::Skip(what) => r.skip(what),
                    }
                }
                Some(status)
            }
            Err(e) => {
                r.fail("cannot read the certificate authority", e.message);
                None
            }
        },
        Ok((status, v)) => {
            r.fail(
                format!("cannot read the certificate authority: {}", error_text(status, &v)),
                "check the data dir's trust-anchor.pem and issuer.pem",
            );
            None
        }
        Err(e) => {
            r.fail("cannot read the certificate authority", e.message);
            None
        }
    };

    r.section("workload tokens");
    let tokens = match args.server.call(Method::GET, "/api/v1/tokens", None, true).await {
        Ok((StatusCode::OK, v)) => {
            parse_answer::<TokenList>("/api/v1/tokens", v).map(|l| l.items).map_err(|e| e.message)
        }
        Ok((status, v)) => Err(error_text(status, &v)),
        Err(e) => Err(e.message.lines().next().unwrap_or_default().to_string()),
    };
    // The SHA-256 of each trust anchor of the bundle, current first.
    let anchors: Vec<String> = identity.iter().flat_map(|i| &i.chain.trust_bundle).map(|a| a.sha256.clone()).collect();
    match tokens {
        Ok(tokens) => {
            for line in token_lines(&tokens, &anchors, unix_now()) {
                match line {
                    Line::Ok(what) => r.ok(what),
                    Line::Warn(what, hint) => r.warn(what, hint),
                    Line::Fail(what, hint) => r.fail(what, hint),
                    Line::Skip(what) => r.skip(what),
                }
            }
        }
        // Listing tokens needs the admin token: not a failure of the mesh where it is not at hand.
        Err(e) => r.skip(format!("workload tokens: cannot list them here ({e}; pass --data-dir)")),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The resources of one kind, in every namespace, as the control plane holds them (those this
/// version cannot read are left out: the analysis covers what it understands).
async fn list_resources(server: &ServerArgs, kind: Kind) -> Result<Vec<Resource>, String> {
    server.list_all(kind).await.map(|(read, _)| read).map_err(|e| e.message)
}

/// How close to its expiry a valid token is flagged: within a day, or within the last quarter
/// of its lifetime when that is shorter (a one-hour token is not flagged all its life).
fn token_warning_window(t: &TokenInfo) -> i64 {
    const DAY: i64 = 86_400;
    DAY.min((t.expires_unix - t.created_unix) / 4)
}

/// The workload token checks (pure, so each case is tested directly): tokens about to expire
/// or expired (‼: a proxy that starts with one after that cannot join; the certificates it
/// bootstrapped keep renewing), and the trust anchor each valid token pins — what a proxy
/// bootstrapping with it verifies the control plane against — is the current anchor, the one
/// the control plane presents (✗ otherwise, also during a rotation). `anchors`: the bundle's
/// SHA-256s, current first.
fn token_lines(tokens: &[TokenInfo], anchors: &[String], now: i64) -> Vec<Line> {
    let mut lines = Vec::new();
    let valid: Vec<&TokenInfo> = tokens.iter().filter(|t| t.state == "valid").collect();
    if tokens.is_empty() {
        lines.push(Line::Skip("no workload token".into()));
        return lines;
    }
    let mut fine = 0;
    for t in &valid {
        let name = format!("token {} ({})", t.id, t.identity);
        let left = t.expires_unix - now;
        let mut flagged = false;
        if left < token_warning_window(t) {
            flagged = true;
            lines.push(Line::Warn(
                format!("{name} expires in {}", plexus_core::duration::format(std::time::Duration::from_secs(left.max(0) as u64))),
                "a proxy that starts with it after that cannot join: create a new one (`plexus token create`) where it is still needed".into(),
            ));
        }
        match (anchors.first(), t.anchor_sha256.as_str()) {
            (_, "") | (None, _) => {}
            (Some(current), pin) if current == pin => {}
            (_, pin) => {
                flagged = true;
                let previous = anchors.iter().skip(1).any(|a| a == pin);
                lines.push(Line::Fail(
                    format!(
                        "{name} pins {} trust anchor ({}…), not the current one",
                        if previous { "the previous" } else { "a former" },
                        &pin[..pin.len().min(16)]
                    ),
                    "a proxy bootstrapping with it refuses the control plane, which presents the current anchor (the anchor was rotated): revoke it and create a new one (`plexus token create`)".into(),
                ));
            }
        }
        if !flagged {
            fine += 1;
        }
    }
    for t in tokens.iter().filter(|t| t.state == "expired") {
        lines.push(Line::Warn(
            format!("token {} ({}) has expired", t.id, t.identity),
            "a proxy that starts with it cannot join (certificates it bootstrapped keep renewing): create a new one where it is still needed".into(),
        ));
    }
    if fine > 0 {
        let tokens = if fine == 1 { "1 valid token".to_string() } else { format!("{fine} valid tokens") };
        lines.push(Line::Ok(format!("{tokens}, not near expiry, pinning the current trust anchor")));
    }
    lines
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
/// Gateway proxies: their listeners' ports and certificates, as each reports them in its
/// admin `/config`, read through the control plane (certificate files are on the gateway's
/// machine; keys never pass through the control plane).
async fn gateways(args: &CheckArgs, r: &mut Report) {
    let Ok(list) = args.server.fetch::<ProxiesResponse>(Method::GET, "/api/v1/proxies", None, false).await else {
        return;
    };
    let ingresses: Vec<&ProxyStatus> = list.proxies.iter().filter(|p| p.record.mode == "ingress").collect();
    if ingresses.is_empty() {
        return;
    }
    r.section("gateways");
    for p in ingresses {
        let workload = p.record.workload.as_str();
        let name: String = form_urlencoded::byte_serialize(workload.as_bytes()).collect();
        let path = format!("/api/v1/proxies/{name}/config?namespace={}", p.record.namespace);
        let config = match args.server.fetch::<GatewayConfig>(Method::GET, &path, None, false).await {
            Ok(c) => c,
            Err(e) => {
                r.warn(format!("gateway {workload}: cannot read its /config"), e.message);
                continue;
            }
        };
        let Some(report) = config.gateway else { continue };
        for line in gateway_lines(workload, &report) {
            match line {
                Line::Ok(what) => r.ok(what),
                Line::Warn(what, hint) => r.warn(what, hint),
                Line::Fail(what, hint) => r.fail(what, hint),
                Line::Skip(what) => r.skip(what),
            }
        }
    }
}

/// The part of a proxy's admin `/config` that `check` reads: a gateway's report.
#[derive(serde::Deserialize)]
struct GatewayConfig {
    #[serde(default)]
    gateway: Option<GatewayReport>,
}

/// What one gateway's `/config` `gateway` section says: ports not bound, certificates missing,
/// invalid or expiring.
fn gateway_lines(workload: &str, g: &GatewayReport) -> Vec<Line> {
    let mut out = Vec::new();
    let name = &g.name;
    let mut problems = 0;
    for (port, status) in &g.ports {
        if let Some(e) = &status.error {
            problems += 1;
            out.push(Line::Fail(
                format!("gateway {workload} (Gateway {name}): port {port} is not served: {e}"),
                "free the port or change the listener's port".into(),
            ));
        }
    }
    for c in &g.certificates {
        let Some(problem) = &c.problem else { continue };
        problems += 1;
        let what = format!("gateway {workload}: certificate {} ({}): {problem}", c.name, c.location);
        let hint = if c.location.starts_with("Secret ") {
            "create or replace it: kubectl create secret tls NAME --cert FILE --key FILE (type kubernetes.io/tls, readable by the gateway's ServiceAccount); the gateway picks it up without a restart"
        } else {
            "put a valid tls.crt and tls.key (PEM, matching) there; the gateway picks them up without a restart"
        };
        if c.loaded && problem.starts_with("the certificate expires in") {
            out.push(Line::Warn(what, "renew it".into()));
        } else if c.loaded && !problem.contains("expired") {
            out.push(Line::Fail(format!("{what} (still serving the previous one)"), hint.into()));
        } else {
            out.push(Line::Fail(what, hint.into()));
        }
    }
    if problems == 0 {
        out.push(Line::Ok(format!("gateway {workload} (Gateway {name}): listeners bound, certificates valid")));
    }
    out
}

fn expiry_line(what: &str, cert: &CertSummary, hint: &str) -> Line {
    const SIXTY_DAYS: i64 = 60 * 86_400;
    let left = cert.expires_in_seconds;
    let not_after = &cert.not_after;
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
fn identity_lines(v: &IdentityStatus, grace: std::time::Duration) -> Vec<Line> {
    let mut lines = Vec::new();
    for (i, anchor) in v.chain.trust_bundle.iter().enumerate() {
        let what = if i == 0 { "trust anchor" } else { "previous trust anchor" };
        lines.push(expiry_line(what, anchor, "plexus identity rotate --anchor"));
    }
    lines.push(expiry_line("issuer", &v.chain.issuer, "plexus identity rotate"));
    if v.chain.issuer_signed_by_anchor {
        lines.push(Line::Ok("issuer signed by the trust anchor".into()));
    } else {
        lines.push(Line::Fail(
            "the issuer is not signed by the trust anchor".into(),
            "restore the matching pair in the data dir, or replace both with `plexus identity init --force`".into(),
        ));
    }
    if v.issuer_in_use_sha256 != v.chain.issuer.sha256 {
        lines.push(Line::Warn(
            "the issuer in the data dir is not the one the control plane signs with".into(),
            "the files were changed under the running control plane: restart it to use them".into(),
        ));
    }

    lines.extend(control_plane_lines(v));

    if let Some(rotation) = &v.rotation {
        lines.push(Line::Warn(
            format!("rotation in progress: {} still on the old issuer", proxies_text(rotation.proxies_on_old_issuer)),
            "the previous trust anchor leaves the bundle once every connected proxy has a certificate from the new issuer (plexus identity show); restart a proxy that does not re-certify".into(),
        ));
    }
    let proxies = &v.proxies;
    if proxies.is_empty() {
        lines.push(Line::Skip("proxy certificates: no proxy connected".into()));
        return lines;
    }
    let grace = grace.as_secs();
    let (mut current, mut previous_issuer, mut failed) = (0, 0, 0);
    for p in proxies {
        let workload = if p.workload.is_empty() { "?" } else { p.workload.as_str() };
        let name = format!("proxy {workload} ({}, namespace {})", p.mode, p.namespace);
        if p.issued_by == CertOrigin::None {
            let connected = p.connected_seconds;
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
        if p.expires_in_seconds.unwrap_or(0) <= 0 {
            failed += 1;
            lines.push(Line::Fail(
                format!("{name} holds an expired certificate (notAfter {})", p.not_after.as_deref().unwrap_or("?")),
                "its renewal failed: look at the proxy's logs; restarting it gets a fresh certificate".into(),
            ));
            continue;
        }
        match p.issued_by {
            CertOrigin::Current => current += 1,
            CertOrigin::PreviousIssuer => previous_issuer += 1,
            // Counted by the rotation line below.
            CertOrigin::PreviousAnchor => {}
            CertOrigin::Unknown | CertOrigin::None => {
                failed += 1;
                lines.push(Line::Fail(
                    format!("{name} holds a certificate from an unknown issuer (sha256 {})", p.issuer_sha256),
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

/// The control plane's own serving certificate (`controlPlane`): valid now, and its chain ends
/// in the current trust anchor — the one proxies verify it against (a token pins it).
fn control_plane_lines(v: &IdentityStatus) -> Vec<Line> {
    let Some(cp) = &v.control_plane else {
        return vec![Line::Skip("control plane certificate: not reported by this control plane".into())];
    };
    let c = &cp.certificate;
    let now = unix_now();
    let mut lines = Vec::new();
    if c.not_after_unix <= now {
        lines.push(Line::Fail(
            format!("the control plane's serving certificate expired on {}", c.not_after),
            "proxies refuse it: its renewal failed (the issuer may have expired): look at the control plane's logs, rotate the issuer if needed, restart it".into(),
        ));
    } else if c.not_before_unix > now {
        lines.push(Line::Fail(
            format!("the control plane's serving certificate is not valid before {}", c.not_before),
            "check the clocks of this machine and the control plane's".into(),
        ));
    } else {
        lines.push(Line::Ok(format!("control plane certificate {} valid until {}", cp.spiffe_id, c.not_after)));
    }
    let current = &v.chain.trust_anchor.sha256;
    if &cp.chain_anchor_sha256 == current {
        lines.push(Line::Ok("the control plane presents the current trust anchor (the one tokens pin)".into()));
    } else {
        lines.push(Line::Fail(
            format!(
                "the control plane presents trust anchor {}…, not the current one ({}…)",
                &cp.chain_anchor_sha256[..cp.chain_anchor_sha256.len().min(16)],
                &current[..current.len().min(16)]
            ),
            "proxies bootstrapping with tokens of the current anchor refuse it: restart the control plane".into(),
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
    use plexus_control::api_types::{ChainStatus, ProxyCertStatus, RotationStatus, ServingCertificate};
    use plexus_control::certify::CERTIFICATE_GRACE;

    fn cert(days: i64) -> CertSummary {
        CertSummary {
            subject: String::new(),
            issuer: String::new(),
            serial: "01".into(),
            not_before: "b".into(),
            not_after: "2030-01-01T00:00:00.000Z".into(),
            not_before_unix: 0,
            not_after_unix: 0,
            expires_in_seconds: days * 86_400 + 60,
            days_left: days,
            sha256: "aa".into(),
            is_ca: true,
        }
    }

    fn healthy() -> IdentityStatus {
        IdentityStatus {
            chain: ChainStatus {
                trust_anchor: cert(3650),
                issuer: cert(365),
                issuer_signed_by_anchor: true,
                trust_bundle: vec![cert(3650)],
                previous_trust_anchor: None,
                anchor_key_in_data_dir: true,
            },
            issuer_in_use_sha256: "aa".into(),
            trust_domain: "plexus.local".into(),
            leaf_lifetime: "24h".into(),
            rotation: None,
            proxies: vec![proxy(CertOrigin::Current, 30, 3600)],
            control_plane: None,
        }
    }

    fn proxy(issued_by: CertOrigin, connected: u64, expires_in: i64) -> ProxyCertStatus {
        ProxyCertStatus {
            id: 1,
            workload: "reviews-v1".into(),
            namespace: "default".into(),
            service: "reviews".into(),
            mode: "sidecar".into(),
            connected_seconds: connected,
            spiffe_id: String::new(),
            serial: String::new(),
            not_after: Some("2026-01-01T00:00:00.000Z".into()),
            not_after_unix: 0,
            expires_in_seconds: Some(expires_in),
            issuer_sha256: "bb".into(),
            issued_by,
        }
    }

    fn rotation(old: usize, new: usize) -> Option<RotationStatus> {
        Some(RotationStatus {
            kind: "anchor".into(),
            since: "2030-01-01T00:00:00.000Z".into(),
            previous_trust_anchor: cert(3000),
            proxies_on_new_issuer: new,
            proxies_on_old_issuer: old,
        })
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
        v.chain.issuer = cert(59);
        v.chain.trust_bundle = vec![cert(-1)];
        let lines = identity_lines(&v, CERTIFICATE_GRACE);
        assert_eq!(warns(&lines), vec!["issuer expires within 60 days (2030-01-01T00:00:00.000Z, 59 days left)"]);
        assert_eq!(fails(&lines), vec!["trust anchor expired on 2030-01-01T00:00:00.000Z"]);
        v.chain.issuer = CertSummary { expires_in_seconds: -5, not_after: "x".into(), ..cert(0) };
        assert!(fails(&identity_lines(&v, CERTIFICATE_GRACE)).contains(&"issuer expired on x".to_string()));
    }

    #[test]
    fn an_issuer_not_signed_by_the_anchor_fails() {
        let mut v = healthy();
        v.chain.issuer_signed_by_anchor = false;
        assert_eq!(fails(&identity_lines(&v, CERTIFICATE_GRACE)), vec!["the issuer is not signed by the trust anchor"]);
    }

    #[test]
    fn proxy_certificates_are_checked() {
        let mut v = healthy();
        v.proxies = vec![proxy(CertOrigin::None, 3, 0)];
        let lines = identity_lines(&v, CERTIFICATE_GRACE);
        assert!(fails(&lines).is_empty(), "within the grace period: {lines:?}");
        v.proxies = vec![proxy(CertOrigin::None, 11, 0)];
        assert_eq!(
            fails(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec!["proxy reviews-v1 (sidecar, namespace default) has no workload certificate after 11s"]
        );
        v.proxies = vec![proxy(CertOrigin::Current, 30, -1)];
        assert_eq!(
            fails(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec![
                "proxy reviews-v1 (sidecar, namespace default) holds an expired certificate (notAfter 2026-01-01T00:00:00.000Z)"
            ]
        );
        v.proxies = vec![proxy(CertOrigin::Unknown, 30, 3600)];
        assert_eq!(
            fails(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec![
                "proxy reviews-v1 (sidecar, namespace default) holds a certificate from an unknown issuer (sha256 bb)"
            ]
        );
        v.proxies = vec![proxy(CertOrigin::PreviousIssuer, 30, 3600)];
        let lines = identity_lines(&v, CERTIFICATE_GRACE);
        assert!(fails(&lines).is_empty());
        assert_eq!(warns(&lines), vec!["1 proxy holds a certificate from the previous issuer"]);
    }

    #[test]
    fn an_anchor_rotation_in_progress_is_a_warning() {
        let mut v = healthy();
        v.chain.trust_bundle = vec![cert(3650), cert(3000)];
        v.rotation = rotation(1, 1);
        v.proxies = vec![proxy(CertOrigin::Current, 30, 3600), proxy(CertOrigin::PreviousAnchor, 30, 3600)];
        let lines = identity_lines(&v, CERTIFICATE_GRACE);
        assert!(fails(&lines).is_empty(), "{lines:?}");
        assert_eq!(warns(&lines), vec!["rotation in progress: 1 proxy still on the old issuer"]);
        assert!(lines.contains(&Line::Ok("previous trust anchor valid until 2030-01-01T00:00:00.000Z".into())));
    }

    #[test]
    fn an_anchor_rotation_shows_even_with_no_proxy_connected() {
        let mut v = healthy();
        v.rotation = rotation(0, 0);
        v.proxies = vec![];
        assert_eq!(
            warns(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec!["rotation in progress: 0 proxies still on the old issuer"]
        );
    }

    fn token(id: &str, state: &str, created: i64, expires: i64, anchor: &str) -> TokenInfo {
        TokenInfo {
            id: id.into(),
            identity: format!("spiffe://plexus.local/ns/default/sa/{id}"),
            namespace: "default".into(),
            service_account: id.into(),
            created_unix: created,
            expires_unix: expires,
            state: state.into(),
            anchor_sha256: anchor.into(),
        }
    }

    #[test]
    fn tokens_near_expiry_or_expired_warn_and_a_stale_anchor_pin_fails() {
        const DAY: i64 = 86_400;
        let now = 1_000_000;
        let anchors = ["aa".repeat(32), "bb".repeat(32)];
        let (current, previous) = (anchors[0].as_str(), anchors[1].as_str());
        let lines = token_lines(
            &[
                token("fresh", "valid", now, now + 30 * DAY, current),
                token("day", "valid", now - 29 * DAY, now + DAY - 60, current),
                token("hour", "valid", now - 60, now + 3600, current),
                token("quarter", "valid", now - 3000, now + 600, current),
                token("old", "expired", now - 2 * DAY, now - 10, current),
                token("gone", "revoked", now, now + DAY, "cc"),
                token("rotated", "valid", now, now + 30 * DAY, previous),
                token("former", "valid", now, now + 30 * DAY, &"cc".repeat(32)),
                token("unknown", "valid", now, now + 30 * DAY, ""),
            ],
            &anchors,
            now,
        );
        assert_eq!(
            warns(&lines),
            vec![
                "token day (spiffe://plexus.local/ns/default/sa/day) expires in 1439m",
                "token quarter (spiffe://plexus.local/ns/default/sa/quarter) expires in 10m",
                "token old (spiffe://plexus.local/ns/default/sa/old) has expired",
            ]
        );
        assert_eq!(
            fails(&lines),
            vec![
                "token rotated (spiffe://plexus.local/ns/default/sa/rotated) pins the previous trust anchor (bbbbbbbbbbbbbbbb…), not the current one",
                "token former (spiffe://plexus.local/ns/default/sa/former) pins a former trust anchor (cccccccccccccccc…), not the current one",
            ]
        );
        // Positive control: fresh, one-hour (not yet in its last quarter) and unknown-pin tokens.
        assert!(lines.contains(&Line::Ok("3 valid tokens, not near expiry, pinning the current trust anchor".into())));
        assert_eq!(token_lines(&[], &anchors, now), vec![Line::Skip("no workload token".into())]);
    }

    fn serving(not_before: i64, not_after: i64, anchor: &str) -> Option<ServingCertificate> {
        Some(ServingCertificate {
            certificate: CertSummary {
                not_before_unix: not_before,
                not_after_unix: not_after,
                not_after: "a".into(),
                sha256: "dd".into(),
                is_ca: false,
                ..cert(0)
            },
            spiffe_id: "spiffe://plexus.local/ns/plexus-system/sa/plexus-control".into(),
            chain_anchor_sha256: anchor.into(),
        })
    }

    #[test]
    fn the_control_plane_certificate_must_be_valid_and_present_the_current_anchor() {
        let now = unix_now();
        let mut v = healthy();
        v.chain.trust_anchor.sha256 = "aa".into();
        v.control_plane = serving(now - 60, now + 3600, "aa");
        let lines = identity_lines(&v, CERTIFICATE_GRACE);
        assert!(fails(&lines).is_empty() && warns(&lines).is_empty(), "{lines:?}");
        assert!(lines.contains(&Line::Ok(
            "control plane certificate spiffe://plexus.local/ns/plexus-system/sa/plexus-control valid until a".into()
        )));
        v.control_plane = serving(now - 3600, now - 1, "aa");
        assert_eq!(
            fails(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec!["the control plane's serving certificate expired on a"]
        );
        v.control_plane = serving(now + 3600, now + 7200, "aa");
        assert_eq!(
            fails(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec!["the control plane's serving certificate is not valid before b"]
        );
        v.control_plane = serving(now - 60, now + 3600, "bb");
        assert_eq!(
            fails(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec!["the control plane presents trust anchor bb…, not the current one (aa…)"]
        );
    }

    #[test]
    fn a_data_dir_changed_under_the_control_plane_is_a_warning() {
        let mut v = healthy();
        v.issuer_in_use_sha256 = "cc".into();
        assert_eq!(
            warns(&identity_lines(&v, CERTIFICATE_GRACE)),
            vec!["the issuer in the data dir is not the one the control plane signs with"]
        );
    }
}
