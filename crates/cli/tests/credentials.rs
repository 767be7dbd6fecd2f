//! Credentials bound to one identity, end to end against a real `plexus control`: workload
//! tokens (`plexus token create|list|revoke`), certificates only for the token's identity,
//! registrations only under it (never over an operator's Workload, never into a Service whose
//! `spec.serviceAccounts` excludes it), revoked and expired tokens. Every refusal is checked
//! next to its positive control.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use plexus_api::discovery::discovery_client::DiscoveryClient;
use plexus_api::discovery::{ProxyInfo, WatchRequest};
use plexus_api::identity::CertifyRequest;
use plexus_api::identity::identity_client::IdentityClient;
use plexus_testkit::{Background, TempDir, command, free_port};
use serde_json::{Value, json};

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

    async fn certify(&self, token: &str, ns: &str, sa: &str) -> Result<String, tonic::Status> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(internal)?;
        let csr = rcgen::CertificateParams::default().serialize_request(&key).map_err(internal)?;
        let mut client = IdentityClient::connect(self.grpc.clone()).await.map_err(internal)?;
        let request = CertifyRequest {
            token: token.into(),
            namespace: ns.into(),
            service_account: sa.into(),
            csr_der: csr.der().to_vec().into(),
        };
        client.certify(request).await.map(|r| r.into_inner().spiffe_id)
    }

    /// Opens a discovery stream registering `workload` (JSON) with `token`; the stream is
    /// kept open (returned) when the control plane accepts it.
    async fn register(
        &self,
        token: &str,
        namespace: &str,
        workload: &Value,
    ) -> Result<tokio::sync::mpsc::Sender<WatchRequest>, tonic::Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let name = workload["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let first = WatchRequest {
            proxy: Some(ProxyInfo {
                workload: name.clone(),
                namespace: namespace.into(),
                service: name,
                mode: "sidecar".into(),
                token: token.into(),
                register_workload: workload.to_string().into_bytes().into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        tx.send(first).await.map_err(internal)?;
        let mut client = DiscoveryClient::connect(self.grpc.clone()).await.map_err(internal)?;
        let mut stream = client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        stream.message().await?;
        Ok(tx)
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
    tonic::Status::internal(e.to_string())
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
    expect_refused(cp.certify(&foreign, "default", "a").await, tonic::Code::Unauthenticated, "unknown")?;

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
    let a = cp.token("default", "a").await?;

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
    let anonymous = cp.register("", "default", &workload("x-1", "default", "a", None)).await;
    expect_refused(anonymous, tonic::Code::Unauthenticated, "needs a workload token")?;
    let bad = cp.register("plx1.nope", "default", &workload("x-2", "default", "a", None)).await;
    expect_refused(bad, tonic::Code::Unauthenticated, "malformed")?;
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
    let b = cp.token("default", "b").await?;
    let theft = cp.register(&b, "default", &workload("a-1", "default", "b", Some("b"))).await;
    expect_refused(theft, tonic::Code::AlreadyExists, "registered by another identity")?;
    ensure!(cp.workload("default", "a-1").await?.context("a-1")?["spec"]["serviceAccount"] == "a");

    // spec.serviceAccounts: only payments may back `guarded`.
    let joined = cp.register(&a, "default", &workload("g-1", "default", "guarded", Some("a"))).await;
    expect_refused(joined, tonic::Code::PermissionDenied, "admits only the service accounts")?;
    let payments = cp.token("default", "payments").await?;
    let _p = cp.register(&payments, "default", &workload("g-2", "default", "guarded", None)).await?;
    ensure!(cp.workload("default", "g-2").await?.is_some(), "payments backs guarded");
    Ok(())
}
