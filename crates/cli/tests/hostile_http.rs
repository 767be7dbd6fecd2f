//! The hostile HTTP clients of issue 16 (items 4, 5 and 10; SPEC §5 "Authorization decides on
//! what is forwarded"): `tests/hostile/{path_normalization,authz_opaque,http_hygiene}.py`
//! attack a real mesh — a client sidecar's `--upstream` bind in front of a destination sidecar
//! (`--service web --app-port`), both reading one `--resources` file — in front of a Flask
//! (Werkzeug) app that decodes paths its own way (`tests/hostile/flask_app.py`). The policies
//! allow only `/public/*` and deny `DELETE`; an HTTPRoute adds `x-matched: admin` to requests
//! whose `x-role` header is `admin`.
//!
//! The proxies run with `--request-body-timeout 1s` and `--idle-timeout 2s` so that the stalled
//! upload and idle HTTP/2 cases take seconds. Each script gets the addresses through
//! environment variables and exits non-zero when a case fails; its output is shown.
//! Prerequisites: python3 with `flask` and `h2` (`scripts/install-test-deps`); under `CI=true`
//! a missing one fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use common::{PLEXUS, show};
use plexus_testkit::{
    Background, Proxy, Resources, ServicePort, TempDir, WorkloadSpec, command, eventually, require_python_module, run,
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
        let mut cmd = command("python3");
        cmd.arg("-u")
            .arg(hostile_dir().join(script))
            .current_dir(hostile_dir())
            .env("PYTHONPATH", hostile_dir())
            .env("HOSTILE_UPSTREAM", upstream.to_string())
            .env("HOSTILE_INBOUND", self.server.inbound().to_string())
            .env("HOSTILE_SECRET", SECRET);
        let out = run(&mut cmd, Duration::from_secs(180)).await?;
        ensure!(
            out.status.success(),
            "{script} reported failures\n{}\n--- client sidecar ---\n{}\n--- server sidecar ---\n{}",
            show(&out),
            self.client.stderr_tail(3000),
            self.server.stderr_tail(3000)
        );
        Ok(())
    }
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
