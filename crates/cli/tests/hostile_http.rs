//! The hostile HTTP clients of issue 16 (items 4, 5 and 10; SPEC §5 "Authorization decides on
//! what is forwarded"): `tests/hostile/{path_normalization,authz_opaque,http_hygiene}.py`
//! attack a real mesh — a client sidecar's `--upstream` bind in front of a destination sidecar
//! (`--service web --app-port`), both reading one `--resources` file — in front of a Flask
//! (Werkzeug) app that decodes paths its own way (`tests/hostile/flask_app.py`, which also
//! strips segment parameters as servlet containers do). The policies allow only `/public/*`,
//! deny `DELETE`, `/public/internal[/*]` and GET on `/public/report`; an HTTPRoute adds `x-matched: admin` to requests
//! whose `x-role` header is `admin`.
//!
//! [`authz_opaque_strict_mtls`] runs the non-HTTP attacks again under strict mTLS with a control
//! plane: through an ingress gateway (whose opaque streams reach the destination over mesh
//! TLS, ALPN `plexus.tcp`), and straight at the destination with a valid mesh certificate
//! asking for `plexus.tcp`.
//!
//! The proxies run with `--request-body-timeout 1s` and `--idle-timeout 2s` so that the stalled
//! upload and idle HTTP/2 cases take seconds. Each script gets the addresses through
//! environment variables and exits non-zero when a case fails; its output is shown.
//! Prerequisites: python3 with `flask` and `h2` (`scripts/install-test-deps`); under `CI=true`
//! a missing one fails the test.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use common::{PLEXUS, show};
use plexus_testkit::{
    Background, Proxy, Resources, ServicePort, TempDir, WorkloadSpec, client, command, eventually, free_port,
    require_python_module, run, run_ok,
};

/// The marker every private answer of `flask_app.py` carries.
const SECRET: &str = "PRIVATE-SECRET-7c1e";

const POLICIES: &str = r#"apiVersion: plexus.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: public-only, namespace: default}
spec:
  targetRef: {kind: Service, name: web}
  action: allow
  rules: [{to: {paths: ["/public/*"]}}]
---
apiVersion: plexus.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-delete, namespace: default}
spec:
  targetRef: {kind: Service, name: web}
  action: deny
  rules: [{to: {methods: [DELETE]}}]
---
apiVersion: plexus.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-internal, namespace: default}
spec:
  targetRef: {kind: Service, name: web}
  action: deny
  rules: [{to: {paths: [/public/internal, "/public/internal/*"]}}]
---
apiVersion: plexus.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-report-reads, namespace: default}
spec:
  targetRef: {kind: Service, name: web}
  action: deny
  rules: [{to: {paths: [/public/report], methods: [GET]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-admin-header, namespace: default}
spec:
  parentRefs: [{kind: Service, name: web, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /public/hdr}, headers: [{name: x-role, value: admin}]}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-matched, value: admin}]}}]
    backendRefs: [{name: web, port: 8080}]
"#;

fn hostile_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/hostile")
}

fn prerequisites() -> bool {
    require_python_module("flask", "flask") && require_python_module("h2", "h2")
}

/// The Flask app, the destination sidecar in front of it and the client sidecar.
struct Mesh {
    _dir: TempDir,
    _app: Background,
    server: Proxy,
    client: Proxy,
}

impl Mesh {
    async fn start() -> Result<Mesh> {
        let dir = TempDir::new("hostile-http")?;
        let mut cmd = command("python3");
        cmd.arg("-u").arg(hostile_dir().join("flask_app.py")).arg("0");
        let app = Background::start("flask", cmd, "ready", Duration::from_secs(30)).await?;
        let app_port = app.ready_port()?;
        let file = dir.join("mesh.yaml");
        let path = file.to_str().context("utf-8 path")?;
        let port = ServicePort::new("http", 8080, Some("http"));
        let service = Resources::new().service("web", std::slice::from_ref(&port)).raw(POLICIES);
        service.write(&file)?;
        let app_arg = app_port.to_string();
        let common = ["--request-body-timeout", "1s", "--idle-timeout", "2s"];
        let mut args = vec!["proxy", "--resources", path, "--outbound-port", "0", "--inbound-port", "0"];
        args.extend(["--admin-port", "0", "--app-port", &app_arg, "--service", "web", "--workload", "web-1"]);
        args.extend(common);
        let server = Proxy::start_named("server-sidecar", PLEXUS, &args).await?;
        service
            .workload(&WorkloadSpec::meshed("web-1", "web", "http", server.inbound().port(), app_port))
            .write(&file)?;
        let mut args = vec!["proxy", "--resources", path, "--outbound-port", "0", "--inbound-port", "0"];
        args.extend(["--admin-port", "0", "--upstream", "web:8080=0"]);
        args.extend(common);
        let client = Proxy::start_named("client-sidecar", PLEXUS, &args).await?;
        let endpoint = format!("\"127.0.0.1:{}\"", server.inbound().port());
        for proxy in [&server, &client] {
            eventually(Duration::from_secs(10), || async {
                let config = proxy.admin_get("/config").await?.text();
                ensure!(config.contains(&endpoint), "{} has not loaded the workload yet:\n{config}", proxy.name());
                ensure!(config.contains("public-only"), "{} has not loaded the policies yet", proxy.name());
                Ok(())
            })
            .await?;
        }
        Ok(Mesh { _dir: dir, _app: app, server, client })
    }

    /// Runs `tests/hostile/<script>` against this mesh; fails with its output unless it
    /// exits 0.
    async fn attack(&self, script: &str) -> Result<()> {
        let upstream = self.client.upstream("web.default:8080")?;
        let env = [("HOSTILE_UPSTREAM", upstream.to_string()), ("HOSTILE_INBOUND", self.server.inbound().to_string())];
        attack(script, &env)
            .await
            .with_context(|| format!("--- client sidecar ---\n{}", self.client.stderr_tail(3000)))
            .with_context(|| format!("--- server sidecar ---\n{}", self.server.stderr_tail(3000)))
    }
}

/// Runs `tests/hostile/<script>` with `env` (and `HOSTILE_SECRET`); fails with its output
/// unless it exits 0.
async fn attack(script: &str, env: &[(&str, String)]) -> Result<()> {
    let mut cmd = command("python3");
    cmd.arg("-u")
        .arg(hostile_dir().join(script))
        .current_dir(hostile_dir())
        .env("PYTHONPATH", hostile_dir())
        .env("HOSTILE_SECRET", SECRET);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(&mut cmd, Duration::from_secs(180)).await?;
    ensure!(out.status.success(), "{script} reported failures\n{}", show(&out));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_normalization() -> Result<()> {
    if !prerequisites() {
        return Ok(());
    }
    Mesh::start().await?.attack("path_normalization.py").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authz_opaque() -> Result<()> {
    if !prerequisites() {
        return Ok(());
    }
    Mesh::start().await?.attack("authz_opaque.py").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_hygiene() -> Result<()> {
    if !prerequisites() {
        return Ok(());
    }
    Mesh::start().await?.attack("http_hygiene.py").await
}

const TRUST_DOMAIN: &str = "plexus.local";

/// Items 4 under strict mTLS: an ingress gateway in front of the Flask app's sidecar
/// (`plexus run`), the policies applied to a control plane. Leading junk through the ingress
/// travels as an opaque mesh stream (ALPN `plexus.tcp`) and is refused by the destination; a
/// client holding a valid mesh certificate and asking for `plexus.tcp` is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authz_opaque_strict_mtls() -> Result<()> {
    if !prerequisites() || !plexus_testkit::require_tool("openssl") {
        return Ok(());
    }
    let _serial = plexus_testkit::serial().await;
    let dir = TempDir::new("hostile-http-strict")?;
    let data = dir.join("data");
    let http = format!("127.0.0.1:{}", free_port());
    let mut cmd = command(PLEXUS);
    cmd.args(["control", "--http-addr", &http, "--grpc-addr", "127.0.0.1:0", "--data-dir"]).arg(&data);
    let control = Background::start("control", cmd, "{", Duration::from_secs(30)).await?;
    let ready: serde_json::Value = serde_json::from_str(control.ready_line())?;
    let grpc = format!("http://{}", ready["grpc"].as_str().context("no grpc address")?);
    let server = format!("http://{http}");
    let plexus = || {
        let mut cmd = command(PLEXUS);
        cmd.env("PLEXUS_SERVER", &server).env("PLEXUS_CONTROL_PLANE", &grpc).env("PLEXUS_DATA_DIR", &data);
        cmd
    };
    let service = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 8080, appProtocol: http}]\n---\napiVersion: plexus.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec:\n  mtls: {mode: strict}\n";
    let file = dir.join("web.yaml");
    std::fs::write(&file, format!("{service}---\n{POLICIES}"))?;
    run_ok(plexus().args(["apply", "-f"]).arg(&file), Duration::from_secs(30)).await?;

    let mut cmd = command("python3");
    cmd.arg("-u").arg(hostile_dir().join("flask_app.py")).arg("0");
    let _app = Background::start("flask", cmd, "ready", Duration::from_secs(30)).await?;
    let app_port = _app.ready_port()?.to_string();
    let log = dir.join("run-web.log");
    let mut run_web = plexus();
    run_web.args(["run", "--service", "web", "--port", &app_port, "--", "sleep", "600"]);
    run_web.stdout(std::process::Stdio::null()).stderr(std::fs::File::create(&log)?).kill_on_drop(true);
    let _web = run_web.spawn().context("spawn plexus run")?;
    let api = |path: &'static str| {
        let addr: SocketAddr = http.parse().expect("address");
        async move { client::get(addr, &addr.to_string(), path, &[], Duration::from_secs(10)).await?.json() }
    };
    let inbound = eventually(Duration::from_secs(30), || async {
        let proxies = api("/api/v1/proxies").await?;
        let p = proxies["proxies"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["service"] == "web"))
            .cloned()
            .context("no web proxy yet")?;
        ensure!(p["certificate"]["serial"].as_str().is_some_and(|s| !s.is_empty()), "no certificate yet");
        let admin: SocketAddr = p["adminAddress"].as_str().context("no admin address")?.parse()?;
        let config = client::get(admin, &admin.to_string(), "/config", &[], Duration::from_secs(5)).await?.json()?;
        Ok(config["settings"]["inbound"].as_str().context("no inbound")?.parse::<SocketAddr>()?)
    })
    .await
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;

    let token =
        plexus_testkit::workload_token(PLEXUS, &server, &data, "default", "ingress").await.context("ingress token")?;
    let args = ["proxy", "--mode", "ingress", "--control-plane", &grpc, "--token", &token, "--service", "ingress"];
    let mut args: Vec<&str> = args.to_vec();
    args.extend(["--service-account", "ingress", "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0"]);
    args.extend(["--upstream", "web:8080=0"]);
    let ingress = Proxy::start_named("ingress", PLEXUS, &args).await?;
    let upstream = ingress.upstream("web.default:8080")?;
    // The legitimate request works through the ingress before the attacks begin.
    eventually(Duration::from_secs(30), || async {
        let r = client::get(upstream, "web:8080", "/public/x", &[], Duration::from_secs(5)).await?;
        ensure!(r.status == 200, "GET /public/x through the ingress: {} {}", r.status, r.text());
        Ok(())
    })
    .await
    .with_context(|| ingress.stderr_tail(3000))?;

    // A valid mesh certificate (signed by the mesh's issuer) for another workload.
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs)?;
    let openssl = |args: Vec<String>| {
        let certs = certs.clone();
        async move {
            let mut cmd = command("openssl");
            cmd.args(args).current_dir(certs);
            run_ok(&mut cmd, Duration::from_secs(30)).await
        }
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    std::fs::write(
        certs.join("leaf.ext"),
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,URI:spiffe://{TRUST_DOMAIN}/ns/default/sa/attacker\n"
        ),
    )?;
    openssl(s(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "key.pem"])).await?;
    openssl(s(&["req", "-new", "-key", "key.pem", "-subj", "/CN=attacker", "-out", "leaf.csr"])).await?;
    let (issuer, issuer_key) = (data.join("issuer.pem"), data.join("issuer-key.pem"));
    let (issuer, issuer_key) = (issuer.display().to_string(), issuer_key.display().to_string());
    #[rustfmt::skip]
    openssl(s(&[
        "x509", "-req", "-in", "leaf.csr", "-CA", &issuer, "-CAkey", &issuer_key, "-CAcreateserial",
        "-days", "1", "-extfile", "leaf.ext", "-out", "leaf.pem",
    ])).await?;
    let chain = format!("{}{}", std::fs::read_to_string(certs.join("leaf.pem"))?, std::fs::read_to_string(&issuer)?);
    std::fs::write(certs.join("chain.pem"), chain)?;

    let env = [
        ("HOSTILE_UPSTREAM", upstream.to_string()),
        ("HOSTILE_INBOUND", inbound.to_string()),
        ("HOSTILE_STRICT", "1".to_string()),
        ("HOSTILE_MESH_CERT", certs.join("chain.pem").display().to_string()),
        ("HOSTILE_MESH_KEY", certs.join("key.pem").display().to_string()),
        ("HOSTILE_MESH_CA", data.join("trust-anchor.pem").display().to_string()),
    ];
    attack("authz_opaque.py", &env)
        .await
        .with_context(|| format!("--- ingress ---\n{}", ingress.stderr_tail(3000)))
        .with_context(|| format!("--- plexus run web ---\n{}", std::fs::read_to_string(&log).unwrap_or_default()))
}
