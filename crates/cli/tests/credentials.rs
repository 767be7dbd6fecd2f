//! Credentials bound to one identity, end to end against a real `plexus control`: workload
//! tokens (`plexus token create|list|revoke`), certificates only for the token's identity,
//! registrations only under it (never over an operator's Workload, never into a Service whose
//! `spec.serviceAccounts` excludes it), revoked and expired tokens. Every refusal is checked
//! next to its positive control.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use plexus_api::discovery::discovery_client::DiscoveryClient;
use plexus_api::discovery::{ProxyInfo, TelemetryReport, TrafficSummary, WatchRequest};
use plexus_api::identity::CertifyRequest;
use plexus_api::identity::identity_client::IdentityClient;
use plexus_control::api_types::{ProxiesResponse, StatAnswer};
use plexus_proxy::cp_tls::ControlPlaneTls;
use plexus_testkit::{Background, TempDir, command, free_port};
use serde_json::{Value, json};
use std::sync::Arc;

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");

/// A `plexus control` on free ports with its own data dir.
struct ControlPlane {
    proc: Background,
    server: String,
    grpc: String,
    data: PathBuf,
}

impl ControlPlane {
    async fn start(dir: &TempDir) -> Result<ControlPlane> {
        let data = dir.join("data");
        let http = format!("127.0.0.1:{}", free_port());
        let mut cmd = command(PLEXUS);
        cmd.args(["control", "--http-addr", &http, "--grpc-addr", "127.0.0.1:0", "--data-dir"]).arg(&data);
        let proc = Background::start("control", cmd, "{", Duration::from_secs(30)).await?;
        let ready: Value = serde_json::from_str(proc.ready_line()).context("control ready line")?;
        let grpc = format!("http://{}", ready["grpc"].as_str().context("no grpc address")?);
        Ok(ControlPlane { proc, server: format!("http://{http}"), grpc, data })
    }

    /// `plexus ARGS` against this control plane with the data dir `data`.
    async fn plexus_in(&self, data: &Path, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = command(PLEXUS);
        cmd.args(args).env("PLEXUS_SERVER", &self.server).env("PLEXUS_DATA_DIR", data);
        plexus_testkit::run(&mut cmd, Duration::from_secs(30)).await
    }

    async fn plexus_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.plexus_in(&self.data, args).await?;
        ensure!(o.status.success(), "plexus {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
        Ok(String::from_utf8_lossy(&o.stdout).to_string())
    }

    async fn token(&self, namespace: &str, sa: &str) -> Result<String> {
        plexus_testkit::workload_token(PLEXUS, &self.server, &self.data, namespace, sa).await
    }

    async fn apply(&self, dir: &TempDir, yaml: &str) -> Result<()> {
        let file = dir.join(format!("apply-{}.yaml", free_port()));
        std::fs::write(&file, yaml)?;
        self.plexus_ok(&["apply", "-f", file.to_str().unwrap_or_default()]).await?;
        Ok(())
    }

    /// A TLS channel to the gRPC port that verifies the control plane against the anchor
    /// `token` pins, presenting no certificate.
    async fn anonymous(&self, token: &str) -> Result<tonic::transport::Channel, tonic::Status> {
        let tls = ControlPlaneTls::new(token, None, None).map_err(internal)?;
        tls.channel(&self.grpc, |e| e).await.map_err(internal)
    }

    /// Certificate signing with a token (bootstrap).
    async fn certify(&self, token: &str, ns: &str, sa: &str) -> Result<String, tonic::Status> {
        let pin_token =
            if plexus_proxy::cp_tls::pinned_anchor(token).is_some() { token.to_string() } else { self.pinned("") };
        let channel = self.anonymous(&pin_token).await?;
        certify_on(channel, token, ns, sa).await
    }

    /// A string pinning this control plane's anchor after `prefix` (for malformed tokens).
    fn pinned(&self, prefix: &str) -> String {
        let pem = std::fs::read(self.data.join("trust-anchor.pem")).unwrap_or_default();
        use rustls_pki_types::pem::PemObject as _;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).map(|d| d.to_vec()).unwrap_or_default();
        format!("{prefix}.{}", sha256_hex(&der))
    }

    /// Bootstraps a certificate with `token`: the TLS to call as that identity.
    async fn enroll(&self, token: &str) -> Result<Arc<ControlPlaneTls>> {
        Ok(plexus_proxy::cp_tls::enroll(&self.grpc, token).await?.1)
    }

    /// Opens a discovery stream as `tls`'s identity, first message `info` (with the token
    /// left empty: the certificate authenticates); the stream is kept open (returned) when the
    /// control plane accepts it.
    async fn watch(
        &self,
        tls: &Arc<ControlPlaneTls>,
        info: ProxyInfo,
    ) -> Result<tokio::sync::mpsc::Sender<WatchRequest>, tonic::Status> {
        watch_at(&self.grpc, tls, info).await
    }

    /// [`ControlPlane::watch`] registering `workload` (JSON).
    async fn register(
        &self,
        tls: &Arc<ControlPlaneTls>,
        namespace: &str,
        workload: &Value,
    ) -> Result<tokio::sync::mpsc::Sender<WatchRequest>, tonic::Status> {
        let name = workload["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let info = ProxyInfo {
            workload: name,
            namespace: namespace.into(),
            mode: "sidecar".into(),
            register_workload: workload.to_string().into_bytes().into(),
            ..Default::default()
        };
        self.watch(tls, info).await
    }

    /// `GET /api/v1/resources/workloads/NS/NAME` as JSON (`None`: not found).
    async fn workload(&self, ns: &str, name: &str) -> Result<Option<Value>> {
        let o = self.plexus_in(&self.data, &["get", "workload", name, "-n", ns, "-o", "json"]).await?;
        if !o.status.success() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_slice(&o.stdout)?))
    }
}

fn internal(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::internal(format!("{e:#}"))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

async fn certify_on(
    channel: tonic::transport::Channel,
    token: &str,
    ns: &str,
    sa: &str,
) -> Result<String, tonic::Status> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(internal)?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key).map_err(internal)?;
    let request = CertifyRequest {
        token: token.into(),
        namespace: ns.into(),
        service_account: sa.into(),
        csr_der: csr.der().to_vec().into(),
    };
    IdentityClient::new(channel).certify(request).await.map(|r| r.into_inner().spiffe_id)
}

fn workload(name: &str, ns: &str, app: &str, sa: Option<&str>) -> Value {
    let mut w = json!({
        "apiVersion": "plexus.dev/v1alpha1",
        "kind": "Workload",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {"address": "127.0.0.1", "ports": [{"name": "http", "port": 1, "targetPort": 2}], "meshed": true},
    });
    if let Some(sa) = sa {
        w["spec"]["serviceAccount"] = json!(sa);
    }
    w
}

fn expect_refused<T>(r: Result<T, tonic::Status>, code: tonic::Code, needle: &str) -> Result<()> {
    match r {
        Ok(_) => anyhow::bail!("accepted; expected {code:?} with {needle:?}"),
        Err(s) => {
            ensure!(s.code() == code && s.message().contains(needle), "expected {code:?} with {needle:?}, got {s:?}");
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_commands_create_list_revoke_and_need_the_admin_token() -> Result<()> {
    let dir = TempDir::new("cred-cli")?;
    let cp = ControlPlane::start(&dir).await?;
    let anchor_out = dir.join("anchor.pem");
    let out = cp
        .plexus_ok(&[
            "token",
            "create",
            "--service-account",
            "reviews",
            "-n",
            "shop",
            "--ttl",
            "1h",
            "--anchor-out",
            anchor_out.to_str().unwrap_or_default(),
        ])
        .await?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == 2, "fingerprint line, then the token: {out}");
    let fingerprint = lines[0].strip_prefix("trust anchor sha256: ").context("fingerprint line")?;
    let token = lines[1];
    ensure!(token.starts_with("plx1.") && token.ends_with(fingerprint), "{token}");
    // The anchor file is the data dir's trust anchor, owner-only, and its SHA-256 is printed.
    let anchor = std::fs::read_to_string(&anchor_out)?;
    ensure!(anchor == std::fs::read_to_string(cp.data.join("trust-anchor.pem"))?, "anchor-out is the anchor");
    use std::os::unix::fs::PermissionsExt as _;
    ensure!(std::fs::metadata(&anchor_out)?.permissions().mode() & 0o777 == 0o600);
    let o = plexus_testkit::run(
        command("openssl").args(["x509", "-noout", "-fingerprint", "-sha256", "-in"]).arg(&anchor_out),
        Duration::from_secs(10),
    )
    .await?;
    let by_openssl = String::from_utf8_lossy(&o.stdout).rsplit('=').next().unwrap_or_default().trim().replace(':', "");
    ensure!(by_openssl.eq_ignore_ascii_case(fingerprint), "{by_openssl} vs {fingerprint}");

    // Stored hashed: the secret is in no file of the data dir.
    let secret = token.split('.').nth(2).context("secret")?;
    for entry in std::fs::read_dir(&cp.data)? {
        let path = entry?.path();
        if path.is_file() {
            let bytes = std::fs::read(&path)?;
            ensure!(!String::from_utf8_lossy(&bytes).contains(secret), "the secret is in {}", path.display());
        }
    }
    ensure!(!cp.proc.stderr().contains(secret), "the secret is in the log");

    // list: id, identity, expiry, state; json and yaml; never the secret.
    let id = token.split('.').nth(1).context("id")?;
    let listed: Value = serde_json::from_str(&cp.plexus_ok(&["token", "list", "-o", "json"]).await?)?;
    let item = listed["items"].as_array().and_then(|i| i.iter().find(|t| t["id"] == id)).context("listed")?.clone();
    ensure!(item["identity"] == "spiffe://plexus.local/ns/shop/sa/reviews" && item["state"] == "valid", "{item}");
    ensure!(!listed.to_string().contains(secret));
    let yaml = cp.plexus_ok(&["token", "list", "-o", "yaml"]).await?;
    ensure!(yaml.contains(id) && yaml.contains("spiffe://plexus.local/ns/shop/sa/reviews"), "{yaml}");
    let table = cp.plexus_ok(&["token", "list"]).await?;
    ensure!(table.contains(id) && table.contains("valid"), "{table}");

    // Without the admin token: refused (create, list, revoke).
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&elsewhere)?;
    for args in
        [&["token", "create", "--service-account", "x"][..], &["token", "list"][..], &["token", "revoke", id][..]]
    {
        let o = cp.plexus_in(&elsewhere, args).await?;
        ensure!(o.status.code() == Some(1), "{args:?} without the admin token: {o:?}");
        ensure!(String::from_utf8_lossy(&o.stderr).contains("admin token"), "{o:?}");
    }
    // Invalid identities and TTLs are usage errors.
    for args in [
        &["token", "create", "--service-account", "Bad_Name"][..],
        &["token", "create", "--service-account", "a", "-n", "a/b"][..],
        &["token", "create", "--service-account", "a", "--ttl", "soon"][..],
    ] {
        let o = cp.plexus_in(&cp.data, args).await?;
        ensure!(o.status.code() == Some(2), "{args:?}: {o:?}");
    }

    // revoke: the state says so; an unknown id is "not found" (exit 1).
    cp.plexus_ok(&["token", "revoke", id]).await?;
    let listed: Value = serde_json::from_str(&cp.plexus_ok(&["token", "list", "-o", "json"]).await?)?;
    ensure!(listed["items"].as_array().is_some_and(|i| i.iter().any(|t| t["id"] == id && t["state"] == "revoked")));
    let o = cp.plexus_in(&cp.data, &["token", "revoke", "0123456789abcdef"]).await?;
    ensure!(o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("not found"), "{o:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_gets_a_certificate_for_its_identity_only_and_revoked_or_expired_tokens_get_nothing() -> Result<()> {
    let dir = TempDir::new("cred-certify")?;
    let cp = ControlPlane::start(&dir).await?;
    let a = cp.token("default", "a").await?;
    // Positive control: A's own identity (named, or left for the token to decide).
    ensure!(cp.certify(&a, "default", "a").await? == "spiffe://plexus.local/ns/default/sa/a");
    ensure!(cp.certify(&a, "", "").await? == "spiffe://plexus.local/ns/default/sa/a");
    // Another service account, another namespace, both, lookalikes: refused, naming the binding.
    for (ns, sa) in [("default", "b"), ("other", "a"), ("other", "b"), ("default", "a-"), ("default", "A"), ("", "b")] {
        expect_refused(
            cp.certify(&a, ns, sa).await,
            tonic::Code::PermissionDenied,
            "is bound to spiffe://plexus.local/ns/default/sa/a",
        )?;
    }
    // B's token gets B, not A.
    let b = cp.token("default", "b").await?;
    ensure!(cp.certify(&b, "default", "b").await? == "spiffe://plexus.local/ns/default/sa/b");
    expect_refused(cp.certify(&b, "default", "a").await, tonic::Code::PermissionDenied, "is bound to")?;
    // A's id with another secret, a truncated token, a token of another control plane.
    let mut forged: Vec<String> = a.split('.').map(str::to_string).collect();
    forged[2] = "0".repeat(64);
    expect_refused(cp.certify(&forged.join("."), "default", "a").await, tonic::Code::Unauthenticated, "unknown")?;
    expect_refused(cp.certify(&a[..a.len() - 1], "default", "a").await, tonic::Code::Unauthenticated, "malformed")?;
    let other_dir = TempDir::new("cred-certify-other")?;
    let other = ControlPlane::start(&other_dir).await?;
    let foreign = other.token("default", "a").await?;
    let (id_part, secret_part) =
        (foreign.split('.').nth(1).context("id")?, foreign.split('.').nth(2).context("secret")?);
    // Sent as is, the foreign token pins the other mesh's anchor: the client refuses this
    // control plane before it sends anything (so this control plane never sees the token).
    expect_refused(cp.certify(&foreign, "default", "a").await, tonic::Code::Internal, "pinned trust anchor")?;
    ensure!(!cp.proc.stderr().contains(id_part), "the foreign token reached the wrong control plane");
    // Replayed with this mesh's pin, it is unknown here.
    let replayed = cp.pinned(&format!("plx1.{id_part}.{secret_part}"));
    expect_refused(cp.certify(&replayed, "default", "a").await, tonic::Code::Unauthenticated, "unknown")?;
    // Positive control: the same token at its own control plane.
    ensure!(other.certify(&foreign, "default", "a").await? == "spiffe://plexus.local/ns/default/sa/a");

    // Revoked: nothing more (B still works: revocation is per token).
    let id = a.split('.').nth(1).context("id")?;
    cp.plexus_ok(&["token", "revoke", id]).await?;
    expect_refused(cp.certify(&a, "default", "a").await, tonic::Code::Unauthenticated, "revoked")?;
    ensure!(cp.certify(&b, "default", "b").await.is_ok(), "B's token is unaffected");
    // Expired: a 1-second token, once its second has passed.
    let short = plexus_testkit::run_ok(
        command(PLEXUS)
            .args(["token", "create", "--service-account", "c", "--ttl", "1s"])
            .env("PLEXUS_SERVER", &cp.server)
            .env("PLEXUS_DATA_DIR", &cp.data),
        Duration::from_secs(30),
    )
    .await?;
    let short = String::from_utf8_lossy(&short.stdout).lines().last().unwrap_or_default().to_string();
    plexus_testkit::eventually(Duration::from_secs(10), || async {
        expect_refused(cp.certify(&short, "default", "c").await, tonic::Code::Unauthenticated, "expired")
    })
    .await?;
    let log = cp.proc.stderr();
    ensure!(log.contains("certificate request for another identity refused"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_registers_only_its_own_identity_and_never_replaces_an_operators_workload() -> Result<()> {
    let dir = TempDir::new("cred-register")?;
    let cp = ControlPlane::start(&dir).await?;
    cp.apply(
        &dir,
        r#"
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: applied, labels: {app: a}}
spec: {address: 10.0.0.9, ports: [{port: 80}], serviceAccount: a}
---
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: guarded}
spec:
  selector: {app: guarded}
  serviceAccounts: [payments]
  ports: [{port: 80}]
"#,
    )
    .await?;
    let a = cp.enroll(&cp.token("default", "a").await?).await?;

    // Positive control: A registers as A (service account filled in when omitted).
    let _a1 = cp.register(&a, "default", &workload("a-1", "default", "a", Some("a"))).await?;
    let _a2 = cp.register(&a, "default", &workload("a-2", "default", "a", None)).await?;
    let w = cp.workload("default", "a-2").await?.context("a-2 registered")?;
    ensure!(w["spec"]["serviceAccount"] == "a", "{w}");

    // As another service account, in another namespace, with no token, with a bad token.
    let as_b = cp.register(&a, "default", &workload("b-1", "default", "b", Some("b"))).await;
    expect_refused(as_b, tonic::Code::PermissionDenied, "only as \"a\"")?;
    let elsewhere = cp.register(&a, "other", &workload("a-9", "other", "a", Some("a"))).await;
    expect_refused(elsewhere, tonic::Code::PermissionDenied, "only in \"default\"")?;
    let no_certificate = ControlPlaneTls::new(&cp.token("default", "a").await?, None, None)?;
    let anonymous = cp.register(&no_certificate, "default", &workload("x-1", "default", "a", None)).await;
    expect_refused(anonymous, tonic::Code::Unauthenticated, "needs mutual TLS with a workload certificate")?;
    let bad = plexus_proxy::cp_tls::enroll(&cp.grpc, &cp.pinned("plx1.nope")).await;
    ensure!(bad.as_ref().is_err_and(|e| e.to_string().contains("malformed")), "a bad token enrolled: {:?}", bad.err());
    for name in ["b-1", "a-9", "x-1", "x-2"] {
        for ns in ["default", "other"] {
            ensure!(cp.workload(ns, name).await?.is_none(), "{ns}/{name} was stored");
        }
    }

    // An operator's Workload is never replaced, not even by its own identity.
    let over = cp.register(&a, "default", &workload("applied", "default", "a", Some("a"))).await;
    expect_refused(over, tonic::Code::AlreadyExists, "was applied by an operator")?;
    let w = cp.workload("default", "applied").await?.context("still there")?;
    ensure!(w["spec"]["address"] == "10.0.0.9", "unchanged: {w}");

    // A workload A registered cannot be replaced by B.
    let b = cp.enroll(&cp.token("default", "b").await?).await?;
    let theft = cp.register(&b, "default", &workload("a-1", "default", "b", Some("b"))).await;
    expect_refused(theft, tonic::Code::AlreadyExists, "another identity")?;
    ensure!(cp.workload("default", "a-1").await?.context("a-1")?["spec"]["serviceAccount"] == "a");

    // spec.serviceAccounts: only payments may back `guarded`.
    let joined = cp.register(&a, "default", &workload("g-1", "default", "guarded", Some("a"))).await;
    expect_refused(joined, tonic::Code::PermissionDenied, "admits only the service accounts")?;
    let payments = cp.enroll(&cp.token("default", "payments").await?).await?;
    let _p = cp.register(&payments, "default", &workload("g-2", "default", "guarded", None)).await?;
    ensure!(cp.workload("default", "g-2").await?.is_some(), "payments backs guarded");
    Ok(())
}

/// Opens a discovery stream at `grpc` as `tls`'s identity, first message `info`; the stream
/// is kept open (returned) when the control plane accepts it.
async fn watch_at(
    grpc: &str,
    tls: &Arc<ControlPlaneTls>,
    info: ProxyInfo,
) -> Result<tokio::sync::mpsc::Sender<WatchRequest>, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest { proxy: Some(info), ..Default::default() }).await.map_err(internal)?;
    let channel = tls.channel(grpc, |e| e).await.map_err(internal)?;
    let mut stream =
        DiscoveryClient::new(channel).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    stream.message().await?;
    Ok(tx)
}

fn info(workload: &str, service: &str, admin: &str) -> ProxyInfo {
    ProxyInfo {
        workload: workload.into(),
        namespace: "default".into(),
        service: service.into(),
        mode: "sidecar".into(),
        admin_address: admin.into(),
        ..Default::default()
    }
}

/// `GET path` on the control plane's API, read as the typed row the CLI reads it as.
async fn http_get<T: serde::de::DeserializeOwned>(server: &str, path: &str) -> Result<T> {
    let addr: std::net::SocketAddr = server.trim_start_matches("http://").parse()?;
    let r = plexus_testkit::client::get(addr, &addr.to_string(), path, &[], Duration::from_secs(10)).await?;
    ensure!(r.status == 200, "GET {path}: {}", r.status);
    Ok(serde_json::from_value(r.json()?)?)
}

fn summary(direction: &str, destination_service: &str, requests: u64) -> TrafficSummary {
    TrafficSummary {
        direction: direction.into(),
        source_workload: "someone".into(),
        source_service: "someone".into(),
        destination_service: destination_service.into(),
        destination_workload: format!("{destination_service}-1"),
        route: String::new(),
        requests,
        successes: 1,
        latency: [(100, requests)].into_iter().collect(),
        ..Default::default()
    }
}

async fn report(
    tls: &Arc<ControlPlaneTls>,
    grpc: &str,
    workload: &str,
    summaries: Vec<TrafficSummary>,
) -> Result<(), tonic::Status> {
    let channel = tls.channel(grpc, |e| e).await.map_err(internal)?;
    let report = TelemetryReport {
        workload: workload.into(),
        namespace: "default".into(),
        service: String::new(),
        interval_ms: 2000,
        summaries,
    };
    DiscoveryClient::new(channel).report(report).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_client_gets_nothing_from_the_grpc_port() -> Result<()> {
    let dir = TempDir::new("cred-anonymous")?;
    let cp = ControlPlane::start(&dir).await?;
    cp.apply(&dir, "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {selector: {app: a}, ports: [{port: 80}]}\n").await?;
    let token = cp.token("default", "a").await?;
    let a = cp.enroll(&token).await?;
    // Positive control: with its certificate, a proxy is served, listed, and a scrape target.
    let _a = cp.watch(&a, info("a-1", "a", "127.0.0.1:9")).await?;
    let targets: Value = http_get(&cp.server, "/api/v1/prometheus/targets").await?;
    ensure!(targets.to_string().contains("127.0.0.1:9"), "{targets}");

    // TLS without a client certificate: discovery and telemetry refuse, with the reason.
    let anon = ControlPlaneTls::new(&token, None, None)?;
    let refused = cp.watch(&anon, info("evil-1", "a", "127.0.0.1:10")).await;
    expect_refused(refused, tonic::Code::Unauthenticated, "needs mutual TLS")?;
    let refused = report(&anon, &cp.grpc, "a-1", vec![summary("inbound", "a", 1669)]).await;
    expect_refused(refused, tonic::Code::Unauthenticated, "needs mutual TLS")?;
    // Plaintext gRPC (h2c, as `grpcurl -plaintext` or an insecure grpcio channel): no answer.
    for call in 0..2 {
        let plain = tonic::transport::Endpoint::from_shared(cp.grpc.clone())?.connect_timeout(Duration::from_secs(3));
        let result = match plain.connect().await {
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            Ok(channel) if call == 0 => {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let _ = tx
                    .send(WatchRequest { proxy: Some(info("evil-2", "a", "127.0.0.1:11")), ..Default::default() })
                    .await;
                DiscoveryClient::new(channel).watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map(|_| ())
            }
            Ok(channel) => DiscoveryClient::new(channel)
                .report(TelemetryReport {
                    workload: "a-1".into(),
                    summaries: vec![summary("inbound", "a", 1669)],
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        };
        ensure!(result.is_err(), "plaintext call {call} was answered");
    }
    // Python grpcio with an insecure channel, when available.
    if plexus_testkit::require_python_module("grpc", "grpcio") {
        let script = format!(
            "import grpc\nch = grpc.insecure_channel('{}')\ntry:\n    grpc.channel_ready_future(ch).result(timeout=3)\n    print('READY')\nexcept Exception as e:\n    print('REFUSED')\n",
            cp.grpc.trim_start_matches("http://")
        );
        let o = plexus_testkit::run(command("python3").args(["-c", &script]), Duration::from_secs(20)).await?;
        ensure!(String::from_utf8_lossy(&o.stdout).contains("REFUSED"), "grpcio: {o:?}");
    }
    // Nothing changed: one proxy listed, one scrape target, no injected telemetry.
    let proxies: ProxiesResponse = http_get(&cp.server, "/api/v1/proxies").await?;
    ensure!(proxies.proxies.len() == 1, "{proxies:?}");
    let targets = http_get::<Value>(&cp.server, "/api/v1/prometheus/targets").await?.to_string();
    ensure!(!targets.contains("127.0.0.1:10") && !targets.contains("127.0.0.1:11"), "{targets}");
    let stat: StatAnswer = http_get(&cp.server, "/api/v1/stat?kind=service").await?;
    ensure!(stat.rows.is_empty(), "telemetry was injected: {stat:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_is_listed_reports_and_acts_only_as_itself() -> Result<()> {
    let dir = TempDir::new("cred-itself")?;
    let cp = ControlPlane::start(&dir).await?;
    cp.apply(&dir, "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: shared}\nspec: {selector: {app: shared}, serviceAccounts: [a, b], ports: [{port: 80}]}\n").await?;
    let a = cp.enroll(&cp.token("default", "a").await?).await?;
    let b = cp.enroll(&cp.token("default", "b").await?).await?;
    // Positive controls: A as itself, and as a Service that lists it.
    let _a1 = cp.watch(&a, info("a-1", "a", "127.0.0.1:9")).await?;
    let _shared = cp.watch(&a, info("a-2", "shared", "127.0.0.1:19")).await?;
    let listed: ProxiesResponse = http_get(&cp.server, "/api/v1/proxies").await?;
    let identities: Vec<&str> = listed.proxies.iter().map(|p| p.record.identity.as_str()).collect();
    ensure!(identities == ["spiffe://plexus.local/ns/default/sa/a"; 2], "{listed:?}");

    // Not as service B, not in another namespace, not under B's workload name, not with an
    // admin address on another host (where tap requests and scrapes would go).
    expect_refused(
        cp.watch(&a, info("a-3", "b", "127.0.0.1:9")).await,
        tonic::Code::PermissionDenied,
        "cannot act as service \"b\"",
    )?;
    let mut elsewhere = info("a-4", "a", "127.0.0.1:9");
    elsewhere.namespace = "other".into();
    expect_refused(cp.watch(&a, elsewhere).await, tonic::Code::PermissionDenied, "only in \"default\"")?;
    expect_refused(
        cp.watch(&b, info("a-1", "b", "127.0.0.1:9")).await,
        tonic::Code::AlreadyExists,
        "another identity",
    )?;
    expect_refused(
        cp.watch(&a, info("a-5", "a", "10.1.2.3:7712")).await,
        tonic::Code::PermissionDenied,
        "not on the host",
    )?;
    expect_refused(
        cp.watch(&a, info("a-6", "a", "192.168.0.1:7712")).await,
        tonic::Code::PermissionDenied,
        "not on the host",
    )?;

    // Telemetry: A reports for its own proxy only, and its side of each summary is A's.
    report(&a, &cp.grpc, "a-1", vec![summary("inbound", "b", 1669), summary("outbound", "a", 3)]).await?;
    expect_refused(
        report(&a, &cp.grpc, "b-1", vec![summary("inbound", "b", 5)]).await,
        tonic::Code::PermissionDenied,
        "reports only for itself",
    )?;
    expect_refused(
        report(&b, &cp.grpc, "a-1", vec![summary("inbound", "a", 5)]).await,
        tonic::Code::PermissionDenied,
        "reports only for itself",
    )?;
    let stat: StatAnswer = plexus_testkit::eventually(Duration::from_secs(10), || async {
        let stat: StatAnswer = http_get(&cp.server, "/api/v1/stat?kind=service").await?;
        ensure!(!stat.rows.is_empty(), "{stat:?}");
        Ok(stat)
    })
    .await?;
    let rows = &stat.rows;
    ensure!(rows.iter().any(|r| r.name == "a" && r.requests == 1669), "A's inbound is counted as A: {stat:?}");
    ensure!(!rows.iter().any(|r| r.name == "b"), "B's traffic was injected: {stat:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_outlives_the_token_and_revocation_ends_it() -> Result<()> {
    let dir = TempDir::new("cred-renew")?;
    let cp = ControlPlane::start(&dir).await?;
    let out = cp.plexus_ok(&["token", "create", "--service-account", "a", "--ttl", "2s"]).await?;
    let token = out.lines().last().context("token")?.to_string();
    let (credentials, tls, first) = plexus_proxy::cp_tls::enroll(&cp.grpc, &token).await?;
    ensure!(first.spiffe_id == "spiffe://plexus.local/ns/default/sa/a");
    // Once the token has expired it bootstraps nothing...
    plexus_testkit::eventually(Duration::from_secs(10), || async {
        expect_refused(cp.certify(&token, "", "").await, tonic::Code::Unauthenticated, "expired")
    })
    .await?;
    // ...but the certificate it bootstrapped renews over mTLS (no token sent), for A only.
    let renew = |ns: &'static str, sa: &'static str| {
        let tls = tls.clone();
        let grpc = cp.grpc.clone();
        async move {
            let channel = tls.channel(&grpc, |e| e).await.map_err(internal)?;
            certify_on(channel, "", ns, sa).await
        }
    };
    ensure!(renew("", "").await? == "spiffe://plexus.local/ns/default/sa/a");
    ensure!(renew("default", "a").await? == "spiffe://plexus.local/ns/default/sa/a");
    expect_refused(
        renew("default", "b").await,
        tonic::Code::PermissionDenied,
        "is bound to spiffe://plexus.local/ns/default/sa/a",
    )?;
    drop(credentials);
    // Revoking the token ends the renewals of what it bootstrapped.
    let id = token.split('.').nth(1).context("id")?;
    cp.plexus_ok(&["token", "revoke", id]).await?;
    expect_refused(renew("", "").await, tonic::Code::PermissionDenied, "revoked")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_behind_a_node_agent_is_only_itself() -> Result<()> {
    let dir = TempDir::new("cred-agent")?;
    let cp = ControlPlane::start(&dir).await?;
    let mut cmd = command(PLEXUS);
    cmd.args(["agent", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--control-plane", &cp.grpc]);
    let agent = Background::start("agent", cmd, "{", Duration::from_secs(30)).await?;
    let ready: Value = serde_json::from_str(agent.ready_line())?;
    let via = format!("http://{}", ready["listen"].as_str().context("listen")?);

    // Positive control: bootstrap, discovery and telemetry through the agent, as itself.
    let token = cp.token("default", "a").await?;
    let (_, a, issued) = plexus_proxy::cp_tls::enroll(&via, &token).await?;
    ensure!(issued.spiffe_id == "spiffe://plexus.local/ns/default/sa/a");
    let _a1 = watch_at(&via, &a, info("a-1", "a", "127.0.0.1:9")).await?;
    report(&a, &via, "a-1", vec![summary("inbound", "a", 7)]).await?;
    // Through the agent, nothing more than directly: not another identity's certificate, not
    // another service, not another's telemetry, nothing without a certificate.
    let anon = ControlPlaneTls::new(&token, None, None)?;
    let s = certify_on(anon.channel(&via, |e| e).await?, &token, "default", "b").await;
    expect_refused(s, tonic::Code::PermissionDenied, "is bound to")?;
    expect_refused(
        watch_at(&via, &a, info("a-2", "b", "127.0.0.1:9")).await,
        tonic::Code::PermissionDenied,
        "cannot act as service",
    )?;
    expect_refused(
        report(&a, &via, "b-1", vec![summary("inbound", "b", 7)]).await,
        tonic::Code::PermissionDenied,
        "only for itself",
    )?;
    expect_refused(
        watch_at(&via, &anon, info("x-1", "a", "127.0.0.1:9")).await,
        tonic::Code::Unauthenticated,
        "needs mutual TLS",
    )?;
    // The control plane sees the proxy's own identity, not the agent's (it has none).
    let proxies: ProxiesResponse = http_get(&cp.server, "/api/v1/proxies").await?;
    let first = proxies.proxies.first().map(|p| p.record.identity.as_str());
    ensure!(first == Some("spiffe://plexus.local/ns/default/sa/a"), "{proxies:?}");
    drop(agent);
    Ok(())
}
