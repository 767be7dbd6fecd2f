//! The control plane and the resource CLI end to end: `plexus control` with its embedded
//! store, `plexus apply/get/delete` as users run them (exit codes, messages, atomicity,
//! authentication, crash safety).

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result};
use plexus_testkit::{TempDir, free_port};

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");

/// A `plexus control` process on a free port with its own data dir; killed on drop.
struct ControlPlane {
    child: Child,
    server: String,
    data_dir: PathBuf,
}

impl ControlPlane {
    fn start(data_dir: &Path) -> Result<ControlPlane> {
        Self::start_with(data_dir, &[])
    }

    /// [`ControlPlane::start`] with more `plexus control` arguments.
    fn start_with(data_dir: &Path, extra: &[&str]) -> Result<ControlPlane> {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(PLEXUS)
            .args(["control", "--http-addr", &addr, "--grpc-addr", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        anyhow::ensure!(line.contains("\"http\""), "no ready line: {line:?}");
        Ok(ControlPlane { child, server: format!("http://{addr}"), data_dir: data_dir.to_path_buf() })
    }

    fn plexus(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut cmd = Command::new(PLEXUS);
        cmd.args(args).env("PLEXUS_SERVER", &self.server).env("PLEXUS_DATA_DIR", &self.data_dir);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
            use std::io::Write as _;
            input.write_all(text.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}

const MESH: &str = "apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {name: reviews-v1, labels: {app: reviews, version: v1}}
spec: {address: 127.0.0.1, ports: [{name: http, port: 9081}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080, weight: 80}, {name: reviews-v2, port: 9080, weight: 20}]
";

#[test]
fn apply_get_delete_round_trip() -> Result<()> {
    let dir = TempDir::new("cp-roundtrip")?;
    let cp = ControlPlane::start(&dir.join("data"))?;
    let file = dir.join("mesh.yaml");
    std::fs::write(&file, MESH)?;
    let f = file.to_str().context("path")?;

    let o = cp.plexus(&["apply", "-f", f], None)?;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(text(&o).0, "service/reviews created\nworkload/reviews-v1 created\nhttproute/reviews created\n");
    let o = cp.plexus(&["apply", "-f", f], None)?;
    assert!(text(&o).0.contains("service/reviews unchanged"), "{:?}", text(&o));

    // `get KIND -o json` is a List of full resources; one object with NAME.
    let o = cp.plexus(&["get", "HTTPRoutes", "-o", "json"], None)?;
    let list: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"][0]["kind"], "HTTPRoute");
    assert_eq!(list["items"][0]["spec"]["rules"][0]["backendRefs"][1]["weight"], 20);
    assert_eq!(list["items"][0]["metadata"]["resourceVersion"], "1");
    let o = cp.plexus(&["get", "workload", "reviews-v1", "-o", "json"], None)?;
    let one: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(one["spec"]["address"], "127.0.0.1");
    let o = cp.plexus(&["get", "services"], None)?;
    assert!(text(&o).0.contains("reviews"), "table: {:?}", text(&o));

    // Missing object: exit 1 and the SPEC's message.
    let o = cp.plexus(&["get", "service", "nope"], None)?;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(text(&o).1.trim(), "error: service default/nope not found");

    // Delete by name and by file.
    let o = cp.plexus(&["delete", "httproute", "reviews"], None)?;
    assert!(o.status.success(), "{:?}", text(&o));
    let o = cp.plexus(&["delete", "httproute", "reviews"], None)?;
    assert_eq!(o.status.code(), Some(1));
    let o = cp.plexus(&["delete", "-f", f], None)?;
    assert!(text(&o).0.contains("service/reviews deleted"), "{:?}", text(&o));
    let o = cp.plexus(&["get", "services", "-o", "json"], None)?;
    let list: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0));
    Ok(())
}

#[test]
fn invalid_documents_exit_2_with_a_precise_message_and_apply_nothing() -> Result<()> {
    let dir = TempDir::new("cp-invalid")?;
    let cp = ControlPlane::start(&dir.join("data"))?;
    let cases: [(&str, String, &str); 5] = [
        ("bad YAML", format!("{MESH}---\nkind: [unclosed\n"), "invalid YAML"),
        (
            "unknown kind",
            format!("{MESH}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\n"),
            "document 4, field kind: unsupported kind \"Pod\"",
        ),
        (
            "missing field",
            format!(
                "{MESH}---\napiVersion: plexus.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\nspec: {{ports: []}}\n"
            ),
            "document 4 (Workload default/w), field spec: missing field `address`",
        ),
        (
            "wrong type",
            MESH.replace("port: 9081", "port: \"high\""),
            "document 2 (Workload default/reviews-v1), field spec.ports[0].port",
        ),
        (
            "negative weight",
            MESH.replace("weight: 20", "weight: -20"),
            "document 3 (HTTPRoute default/reviews), field spec.rules[0].backendRefs[1].weight",
        ),
    ];
    for (what, doc, expected) in cases {
        let file = dir.join("bad.yaml");
        std::fs::write(&file, &doc)?;
        let o = cp.plexus(&["apply", "-f", file.to_str().context("path")?], None)?;
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert!(err.starts_with("error: invalid resources; nothing was applied"), "{what}: {err}");
        assert!(err.contains(&format!("{}", file.display())), "{what}: names the file: {err}");
        assert!(err.contains(expected), "{what}: expected {expected:?} in {err}");
    }
    let o = cp.plexus(&["get", "services", "-o", "json"], None)?;
    let list: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "nothing was applied");
    // Stdin works too.
    let o = cp.plexus(&["apply", "-f", "-"], Some(MESH))?;
    assert!(o.status.success(), "{:?}", text(&o));
    Ok(())
}

#[test]
fn writes_need_the_admin_token() -> Result<()> {
    let dir = TempDir::new("cp-auth")?;
    let cp = ControlPlane::start(&dir.join("data"))?;
    let token = std::fs::read_to_string(dir.join("data").join("admin-token"))?;
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(dir.join("data").join("admin-token"))?.permissions().mode() & 0o777, 0o600);
    let body = format!(
        "{{\"items\": {}}}",
        serde_json::to_string(
            &serde_json::json!([{"apiVersion":"plexus.dev/v1alpha1","kind":"Service","metadata":{"name":"x"},"spec":{"ports":[{"port":80}]}}])
        )?
    );
    let url = format!("{}/api/v1/apply", cp.server);
    let curl = |extra: &[&str]| -> Result<String> {
        let o = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "--data",
                &body,
            ])
            .args(extra)
            .arg(&url)
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).to_string())
    };
    assert_eq!(curl(&[])?, "401", "no token");
    assert_eq!(curl(&["-H", "authorization: Bearer wrong"])?, "403", "wrong token");
    assert_eq!(curl(&["-H", &format!("authorization: Bearer {}", token.trim())])?, "200", "admin token");
    // The CLI with another data dir (no token) is refused with a hint.
    let other = dir.join("elsewhere");
    let o = Command::new(PLEXUS)
        .args(["delete", "service", "x", "--server", &cp.server, "--data-dir"])
        .arg(&other)
        .output()?;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("cannot read the admin token"), "{:?}", text(&o));
    Ok(())
}

/// `--allowed-host` lets the API answer a name the operator chose (an ingress in front of the
/// dashboard), compared without case, port or trailing dot, and no other name: a name that only
/// ends or starts like it is still refused. Addresses keep working beside it; a value that is not
/// a DNS name is refused at start with the flag named.
#[test]
fn an_allowed_host_is_answered_and_only_it() -> Result<()> {
    let dir = TempDir::new("cp-allowed-host")?;
    let cp = ControlPlane::start_with(
        &dir.join("data"),
        &["--allowed-host", "dashboard.example", "--allowed-host", "Plexus.Internal."],
    )?;
    let port = cp.server.rsplit_once(':').map(|(_, p)| p).unwrap_or_default().to_string();
    let status = |host: &str| -> Result<String> {
        let o = Command::new("curl")
            .args(["-s", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("Host: {host}"))
            .arg(format!("{}/api/v1/proxies", cp.server))
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).to_string())
    };
    for host in [
        format!("dashboard.example:{port}"),
        "Dashboard.Example.".into(),
        "dashboard.example:443".into(),
        "plexus.internal".into(),
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
    ] {
        assert_eq!(status(&host)?, "200", "Host {host}");
    }
    for host in [
        format!("evil.example:{port}"),
        "dashboard.example.evil.example".into(),
        "x.dashboard.example".into(),
        "user@dashboard.example".into(),
        "dashboard-example".into(),
    ] {
        assert_eq!(status(&host)?, "403", "Host {host}");
    }
    for bad in ["10.0.0.1", "under_score.example", "*.example", "dashboard.example:80"] {
        let o = Command::new(PLEXUS)
            .args(["control", "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("bad"))
            .args(["--allowed-host", bad])
            .output()?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("--allowed-host"), "--allowed-host {bad}: {err}");
    }
    Ok(())
}

/// DNS rebinding (SPEC §6: the HTTP API serves local users and the CLI): a web page of a name
/// its author controls, rebound to 127.0.0.1, sends requests that arrive on loopback carrying
/// that name. The API, the dashboard and the tap answer only a `Host` that is an IP address or
/// `localhost` (any port: port-forwards change it); a name is refused 403 — even with the admin
/// token, a second `Host`, or an absolute-form target naming it. Positive controls: the same
/// requests by address and by `localhost`, and the CLI (which sends its server's address).
#[test]
fn the_api_answers_only_hosts_a_rebinding_page_cannot_send() -> Result<()> {
    let dir = TempDir::new("cp-rebinding")?;
    let cp = ControlPlane::start(&dir.join("data"))?;
    let token = std::fs::read_to_string(dir.join("data").join("admin-token"))?;
    let addr = cp.server.trim_start_matches("http://").to_string();
    let port = addr.rsplit_once(':').map(|(_, p)| p).unwrap_or_default().to_string();
    let status = |path: &str, extra: &[&str]| -> Result<String> {
        let o = Command::new("curl")
            .args(["-s", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(extra)
            .arg(format!("{}{path}", cp.server))
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).to_string())
    };
    let reads =
        ["/api/v1/resources/services", "/api/v1/proxies", "/api/v1/identity", "/api/v1/version", "/", "/healthz"];
    for path in reads {
        for host in [
            format!("evil.example:{port}"),
            "evil.example".into(),
            format!("127.0.0.1.nip.io:{port}"),
            format!("localhost.evil.example:{port}"),
            format!("Evil.Example.:{port}"),
        ] {
            assert_eq!(status(path, &["-H", &format!("Host: {host}")])?, "403", "GET {path} with Host {host}");
        }
        // Two `Host` headers (curl sends one): raw.
        let raw = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nHost: evil.example\r\nConnection: close\r\n\r\n");
        let mut s = std::net::TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        std::io::Write::write_all(&mut s, raw.as_bytes())?;
        let mut answer = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut answer);
        assert!(!answer.starts_with("HTTP/1.1 2"), "GET {path} with a second Host: {answer}");
        for host in [addr.clone(), format!("localhost:{port}"), "127.0.0.1:1".into(), format!("[::1]:{port}")] {
            assert_eq!(status(path, &["-H", &format!("Host: {host}")])?, "200", "GET {path} with Host {host}");
        }
    }
    // The absolute form names the host too.
    let o = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--request-target"])
        .arg(format!("http://evil.example:{port}/api/v1/proxies"))
        .arg(format!("{}/", cp.server))
        .output()?;
    assert_eq!(String::from_utf8_lossy(&o.stdout), "403", "absolute-form naming another host");
    // A write with the admin token from a rebound name is refused as well.
    let body = r#"{"items": [{"apiVersion":"plexus.dev/v1alpha1","kind":"Service","metadata":{"name":"x"},"spec":{"ports":[{"port":80}]}}]}"#;
    let bearer = format!("authorization: Bearer {}", token.trim());
    let write = |host: &str| {
        status(
            "/api/v1/apply",
            &["-X", "POST", "-H", "content-type: application/json", "-H", &bearer, "--data", body, "-H", host],
        )
    };
    assert_eq!(write(&format!("Host: evil.example:{port}"))?, "403", "apply from a rebound name");
    assert_eq!(write(&format!("Host: localhost:{port}"))?, "200", "apply by localhost");
    // The CLI reaches it by address.
    let o = cp.plexus(&["get", "services"], None)?;
    assert!(o.status.success(), "plexus get services: {:?}", text(&o));
    assert!(text(&o).0.contains('x'), "{:?}", text(&o));
    Ok(())
}

#[test]
fn the_store_survives_kill_9_during_applies_with_a_prefix_of_them() -> Result<()> {
    let dir = TempDir::new("cp-crash")?;
    let data = dir.join("data");
    let mut cp = ControlPlane::start(&data)?;
    let server = cp.server.clone();
    let applier = {
        let data = data.clone();
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let mut applied = 0;
            for i in 0..50 {
                let file = dir.join(format!("s{i}.yaml"));
                let doc = format!(
                    "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{ports: [{{port: 80}}]}}\n"
                );
                if std::fs::write(&file, doc).is_err() {
                    break;
                }
                let ok = Command::new(PLEXUS)
                    .args(["apply", "-f"])
                    .arg(&file)
                    .env("PLEXUS_SERVER", &server)
                    .env("PLEXUS_DATA_DIR", &data)
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                if !ok {
                    break;
                }
                applied += 1;
            }
            applied
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    cp.kill9();
    let acknowledged = applier.join().map_err(|_| anyhow::anyhow!("applier panicked"))?;
    let cp = ControlPlane::start(&data)?;
    let o = cp.plexus(&["get", "services", "-o", "json"], None)?;
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).with_context(|| format!("{:?}", text(&o)))?;
    let mut names: Vec<usize> = list["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str()?.strip_prefix('s')?.parse().ok())
        .collect();
    names.sort();
    let n = names.len();
    assert_eq!(names, (0..n).collect::<Vec<_>>(), "the store holds a prefix of the applies");
    assert!(n >= acknowledged, "every acknowledged apply survived: {n} stored, {acknowledged} acknowledged");
    assert!(n <= acknowledged + 1, "at most the in-flight apply beyond those acknowledged");
    Ok(())
}

#[test]
fn the_certificate_authority_is_created_on_first_start_and_checked() -> Result<()> {
    if !plexus_testkit::require_tool("openssl") {
        return Ok(());
    }
    let dir = TempDir::new("cp-ca")?;
    let data = dir.join("data");
    let cp = ControlPlane::start(&data)?;
    use std::os::unix::fs::PermissionsExt as _;
    for key in ["trust-anchor-key.pem", "issuer-key.pem"] {
        assert_eq!(std::fs::metadata(data.join(key))?.permissions().mode() & 0o777, 0o600, "{key}");
    }
    // An independent verifier agrees the issuer chains to the anchor, and both are P-256 CAs.
    let o = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(data.join("trust-anchor.pem"))
        .arg(data.join("issuer.pem"))
        .output()?;
    assert!(o.status.success(), "openssl verify: {:?}", text(&o));
    let o = Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(data.join("issuer.pem")).output()?;
    let t = text(&o).0;
    assert!(t.contains("CA:TRUE") && t.contains("prime256v1"), "{t}");
    let o = cp.plexus(&["check"], None)?;
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o).0.contains("✓ issuer signed by the trust anchor"));
    let anchor_before = std::fs::read(data.join("trust-anchor.pem"))?;
    drop(cp);

    // Restarting keeps the CA; an issuer from another CA is flagged by `check`.
    let cp = ControlPlane::start(&data)?;
    assert_eq!(std::fs::read(data.join("trust-anchor.pem"))?, anchor_before, "the anchor survives restarts");
    let other = dir.join("other");
    let o = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=impostor",
            "-keyout",
        ])
        .arg(other.with_extension("key"))
        .arg("-out")
        .arg(&other)
        .output()?;
    assert!(o.status.success(), "{:?}", text(&o));
    std::fs::copy(&other, data.join("issuer.pem"))?;
    let o = cp.plexus(&["check"], None)?;
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("‼ issuer expires within 60 days"), "{out}");
    assert!(out.contains("✗ the issuer is not signed by the trust anchor"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_results_are_stored_listed_and_compared_by_id() -> Result<()> {
    let dir = TempDir::new("cp-bench")?;
    let cp = ControlPlane::start(&dir.join("data"))?;
    let upstream = plexus_testkit::HttpEcho::start("bench-target").await?;
    let url = format!("http://{}/", upstream.addr());
    let run = cp.plexus(&["bench", &url, "--rate", "50", "--duration", "1s", "--warmup", "0"], None)?;
    let (out, err) = text(&run);
    assert!(run.status.success(), "{out}{err}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("stored in the control plane at ")?.split(" as run ").nth(1)?.split(' ').next())
        .with_context(|| format!("no stored line in:\n{out}{err}"))?
        .to_string();

    let list = cp.plexus(&["bench", "list", "-o", "json"], None)?;
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    let item = listed["items"].as_array().and_then(|a| a.first()).context("no run listed")?;
    assert_eq!(item["id"], id.as_str());
    assert_eq!(item["url"], url.as_str());
    assert_eq!(item["mode"], "constant-rate");
    let qps = item["actualQPS"].as_f64().context("actualQPS")?;
    assert!((40.0..=60.0).contains(&qps), "actualQPS {qps}");
    let table = cp.plexus(&["bench", "list"], None)?;
    assert!(text(&table).0.lines().nth(1).is_some_and(|l| l.starts_with(&id)), "{:?}", text(&table));

    // The stored run holds the details (full histogram) and compares with itself as equal.
    let one: serde_json::Value = serde_json::from_str(
        &Command::new("curl")
            .args(["-s", &format!("{}/api/v1/bench/results/{id}", cp.server)])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())?,
    )?;
    assert_eq!(one["details"]["resultId"], id.as_str());
    assert!(one["details"]["histogram"]["totalCount"].as_u64().is_some_and(|n| n >= 40), "{}", one["details"]);
    let compare = cp.plexus(&["bench", "compare", &id, &id], None)?;
    assert!(compare.status.success(), "{:?}", text(&compare));
    assert!(text(&compare).0.contains("no difference"), "{}", text(&compare).0);

    // Writes need the admin token, and an id must be a file name.
    let post = |auth: &[&str], body: &str| -> Result<String> {
        let o = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "--data", body])
            .args(auth)
            .arg(format!("{}/api/v1/bench/results", cp.server))
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).to_string())
    };
    assert_eq!(post(&[], &one.to_string())?, "401");
    let token = std::fs::read_to_string(dir.join("data").join("admin-token"))?;
    let auth = format!("authorization: Bearer {}", token.trim());
    let mut evil = one.clone();
    evil["result"]["id"] = "../../escape".into();
    assert_eq!(post(&["-H", &auth], &evil.to_string())?, "422");
    assert_eq!(post(&["-H", &auth], "{\"result\": 1}")?, "422");
    // Missing runs: exit 1 with the reason.
    let missing = cp.plexus(&["bench", "compare", "no-such-run", &id], None)?;
    assert_eq!(missing.status.code(), Some(1), "{:?}", text(&missing));
    assert!(text(&missing).1.contains("no run with that id"), "{:?}", text(&missing));
    Ok(())
}

/// What the relay in front of the API does with the first connection it accepts (the apply);
/// later connections are relayed as they are.
#[derive(Clone, Copy)]
enum Fault {
    /// Relay everything.
    None,
    /// Forward the request, then close the client's connection as the answer starts: the
    /// apply is committed, the client never hears so.
    CutAfterCommit,
    /// Close the client's connection once the request starts, forwarding nothing.
    CutBeforeSending,
}

/// A TCP relay on a free port in front of `upstream`, applying `fault` to its first connection.
fn relay(upstream: &str, fault: Fault) -> Result<String> {
    use std::io::{Read as _, Write as _};
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let upstream = upstream.trim_start_matches("http://").to_string();
    std::thread::spawn(move || {
        for (i, client) in listener.incoming().enumerate() {
            let Ok(mut client) = client else { continue };
            let fault = if i == 0 { fault } else { Fault::None };
            if let Fault::CutBeforeSending = fault {
                let mut first = [0u8; 1];
                let _ = client.read(&mut first);
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
            let Ok(mut server) = TcpStream::connect(&upstream) else { continue };
            let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else { continue };
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || match fault {
                Fault::CutAfterCommit => {
                    let mut answer = [0u8; 1];
                    let _ = server.read(&mut answer);
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                }
                _ => {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = server.read(&mut buf) {
                        if n == 0 || client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(Shutdown::Write);
                }
            });
        }
    });
    Ok(format!("http://{addr}"))
}

/// Issue 18 item 8: an apply whose connection is cut reports the truth. Each apply carries an
/// id; on a lost connection the CLI asks the control plane whether it was committed: cut
/// after the commit → success with the results (the resources are there); cut before the
/// request was sent → "no record", exit 1 (nothing there). Control: through the same relay
/// without a fault, a plain success.
#[test]
fn an_interrupted_apply_reports_whether_it_was_committed() -> Result<()> {
    let dir = TempDir::new("cp-apply-id")?;
    let cp = ControlPlane::start(&dir.join("data"))?;
    let via = |server: &str, args: &[&str]| -> Result<Output> {
        let mut cmd = Command::new(PLEXUS);
        cmd.args(args).env("PLEXUS_SERVER", server).env("PLEXUS_DATA_DIR", &cp.data_dir);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let Some(mut input) = child.stdin.take() {
            use std::io::Write as _;
            input.write_all(MESH.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    };
    let exists = |name: &str| -> Result<bool> {
        Ok(cp.plexus(&["get", "httproute", name, "-o", "json"], None)?.status.success())
    };

    // Cut before sending: nothing was applied, and the CLI says so.
    let o = via(&relay(&cp.server, Fault::CutBeforeSending)?, &["apply", "-f", "-"])?;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(err.contains("the control plane has no record of apply") && err.contains("nothing was applied"), "{err}");
    assert!(!exists("reviews")?, "nothing was applied");

    // Cut after the commit: the CLI learns it was committed and reports the results.
    let o = via(&relay(&cp.server, Fault::CutAfterCommit)?, &["apply", "-f", "-"])?;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(err.contains("the control plane confirms apply") && err.contains("was committed"), "{err}");
    assert!(out.contains("httproute/reviews created") && out.contains("service/reviews created"), "{out}");
    assert!(exists("reviews")?);

    // Control: the same relay without a fault.
    let o = via(&relay(&cp.server, Fault::None)?, &["apply", "-f", "-"])?;
    let (out, err) = text(&o);
    assert!(o.status.success() && out.contains("httproute/reviews unchanged") && !err.contains("lost"), "{out}{err}");
    Ok(())
}
