//! What runs in an injected Kubernetes pod, tested on this machine: the sidecar's DNS server
//! (`plexus proxy --dns-addr`, queried with `dig`, forwarding to a real upstream resolver) and
//! `plexus init`'s traffic redirect (in a network namespace made here, read back with
//! `iptables-save`).

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use plexus_testkit::{Background, Proxy, TempDir, command, free_port, peers_dir, require_root, require_tool, run};

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");

const RESOURCES: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews, namespace: default, annotations: {plexus.dev/cluster-ip: 10.96.0.12}}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: details, namespace: prod, annotations: {plexus.dev/cluster-ip: 10.96.0.13}}
spec: {selector: {app: details}, ports: [{name: http, port: 9080}]}
---
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: ratings, namespace: default}
spec: {selector: {app: ratings}, ports: [{name: http, port: 9080}]}
"#;

/// `dig` against the sidecar's DNS: the whole output.
async fn dig(port: u16, args: &[&str]) -> String {
    let mut cmd = command("dig");
    cmd.args(["@127.0.0.1", "-p", &port.to_string(), "+time=3", "+tries=1"]).args(args);
    let out = run(&mut cmd, Duration::from_secs(20)).await.unwrap_or_else(|e| panic!("{e:#}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The A records of a `dig +short` answer.
async fn short(port: u16, args: &[&str]) -> Vec<String> {
    let mut all = vec!["+short"];
    all.extend_from_slice(args);
    dig(port, &all).await.lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
}

fn status_of(out: &str) -> &str {
    out.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("")
}

#[tokio::test]
async fn sidecar_dns_answers_mesh_names_and_forwards_the_rest() {
    if !(require_root() && require_tool("dig") && require_tool("python3")) {
        return;
    }
    let dir = TempDir::new("pod-dns").expect("temp dir");
    // An upstream resolver on port 53 of a loopback address of its own (resolv.conf names no
    // port).
    let upstream = format!("127.77.{}.{}", std::process::id() % 250, fastrand_octet());
    let mut up = command("python3");
    up.arg("-u").arg(peers_dir().join("dns_upstream.py")).arg(&upstream);
    let upstream_peer =
        Background::start("dns-upstream", up, "ready", Duration::from_secs(20)).await.expect("upstream");
    let resolv = dir.join("resolv.conf");
    // The first nameserver is the sidecar's own address: skipped (no forwarding loop).
    let dns_port = free_port();
    std::fs::write(
        &resolv,
        format!("nameserver 127.0.0.1\nnameserver {upstream}\nsearch default.svc.cluster.local svc.cluster.local example.internal\noptions ndots:5\n"),
    )
    .expect("resolv.conf");
    let resources = dir.join("mesh.yaml");
    std::fs::write(&resources, RESOURCES).expect("resources");
    let dns_addr = format!("127.0.0.1:{dns_port}");
    let proxy = Proxy::start(
        PLEXUS,
        [
            "proxy",
            "--resources",
            resources.to_str().expect("path"),
            "--outbound-port",
            "0",
            "--inbound-port",
            "0",
            "--admin-port",
            "0",
            "--dns-addr",
            &dns_addr,
            "--dns-resolv-conf",
            resolv.to_str().expect("path"),
        ],
    )
    .await
    .expect("proxy");
    let _ = &proxy;

    // Mesh names, every form, over UDP and TCP.
    for name in [
        "reviews",
        "reviews.default",
        "reviews.default.svc",
        "reviews.default.svc.cluster.local",
        "REVIEWS.Default.svc.cluster.local.",
        // Fully qualified with one of the pod's search domains.
        "reviews.example.internal",
    ] {
        assert_eq!(short(dns_port, &[name]).await, vec!["10.96.0.12"], "{name} over UDP");
        assert_eq!(short(dns_port, &["+tcp", name]).await, vec!["10.96.0.12"], "{name} over TCP");
    }
    assert_eq!(short(dns_port, &["details.prod.svc.cluster.local"]).await, vec!["10.96.0.13"]);
    assert_eq!(short(dns_port, &["details.prod"]).await, vec!["10.96.0.13"]);
    // A single label is a Service of the proxy's own namespace (default): not prod's details.
    let out = dig(dns_port, &["details"]).await;
    assert_eq!(status_of(&out), "NXDOMAIN", "details is forwarded (not in default)\n{out}");

    // AAAA for a mesh name: NOERROR without records (IPv4 only), answered here.
    let out = dig(dns_port, &["reviews.default.svc.cluster.local", "AAAA"]).await;
    assert_eq!(status_of(&out), "NOERROR", "{out}");
    assert!(out.contains("ANSWER: 0"), "{out}");
    assert!(out.contains("flags: qr aa"), "authoritative answer from the sidecar\n{out}");

    // Not mesh names: forwarded to the upstream, over the transport they came on.
    assert_eq!(short(dns_port, &["example.test"]).await, vec!["192.0.2.7"]);
    assert_eq!(short(dns_port, &["+tcp", "example.test"]).await, vec!["192.0.2.7"]);
    let out = dig(dns_port, &["nothing.example.test"]).await;
    assert_eq!(status_of(&out), "NXDOMAIN", "{out}");
    // A mesh Service without a virtual address is not answered here.
    let out = dig(dns_port, &["ratings.default.svc.cluster.local"]).await;
    assert_eq!(status_of(&out), "NXDOMAIN", "{out}");
    plexus_testkit::eventually(Duration::from_secs(5), || async {
        let stderr = upstream_peer.stderr();
        let log: Vec<&str> = stderr.lines().collect();
        anyhow::ensure!(log.contains(&"answered example.test via tcp"), "upstream saw: {log:?}");
        anyhow::ensure!(log.contains(&"answered example.test via udp"), "upstream saw: {log:?}");
        anyhow::ensure!(!log.iter().any(|l| l.contains("reviews")), "a mesh name went upstream: {log:?}");
        Ok(())
    })
    .await
    .expect("the upstream answered the forwarded queries");

    // Malformed packets: a short one is dropped, one with a header gets FORMERR, and the
    // server keeps answering.
    let sock = UdpSocket::bind("127.0.0.1:0").expect("udp");
    sock.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    sock.send_to(&[1, 2, 3], &dns_addr).expect("send");
    let mut garbage = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01];
    garbage.extend_from_slice(&[0xc0; 30]);
    sock.send_to(&garbage, &dns_addr).expect("send");
    let mut buf = [0u8; 512];
    let (n, _) = sock.recv_from(&mut buf).expect("a FORMERR reply");
    assert!(n >= 12, "reply of {n} bytes");
    assert_eq!(&buf[..2], &[0x12, 0x34], "same id");
    assert_eq!(buf[3] & 0x0f, 1, "FORMERR");
    // Over TCP: a length prefix longer than what follows, then the connection closes.
    {
        use std::io::Write as _;
        let mut tcp = std::net::TcpStream::connect(&dns_addr).expect("tcp");
        tcp.write_all(&[0x10, 0x00, 0xde, 0xad]).expect("write");
    }
    assert_eq!(short(dns_port, &["reviews"]).await, vec!["10.96.0.12"], "still serving after garbage");

    // The DNS server is one of the proxy's own listeners (SPEC §5): the outbound never forwards
    // to its port, in any spelling, while an HTTP server beside it is reached (positive control).
    let web = plexus_testkit::HttpEcho::start("web").await.expect("web");
    let outbound = format!("http://{}", proxy.outbound());
    // (curl runs off the runtime's thread: the echo server answers on it.)
    let through = |url: String| {
        let mut curl = command("curl");
        curl.args(["-s", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-x", &outbound, &url]);
        async move {
            run(&mut curl, Duration::from_secs(15))
                .await
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .expect("curl")
        }
    };
    assert_eq!(through(format!("http://127.0.0.1:{}/", web.port())).await, "200", "an app beside the sidecar");
    for host in ["127.0.0.1", "127.0.0.2", "localhost", "0.0.0.0", "[::ffff:127.0.0.1]"] {
        assert_eq!(through(format!("http://{host}:{dns_port}/")).await, "403", "the DNS port as {host}");
    }
    assert_eq!(through(format!("http://127.0.0.1:{}/", web.port())).await, "200", "still reached afterwards");
    assert!(proxy.exit_status().is_none(), "the proxy is still running\n{}", proxy.stderr());
}

fn fastrand_octet() -> u32 {
    (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) % 200)
        + 2
}

/// A network namespace deleted on drop.
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Netns {
        let name = format!("ptest-{tag}-{}", std::process::id());
        let out = Command::new("ip").args(["netns", "add", &name]).output().expect("ip");
        assert!(out.status.success(), "ip netns add: {}", String::from_utf8_lossy(&out.stderr));
        Netns(name)
    }

    fn exec(&self, argv: &[&str]) -> std::process::Output {
        Command::new("ip").args(["netns", "exec", &self.0]).args(argv).output().expect("ip netns exec")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[tokio::test]
async fn plexus_init_installs_the_pod_redirect_once() {
    if !(require_root() && require_tool("iptables-save") && require_tool("ip")) {
        return;
    }
    let ns = Netns::create("init");
    let init = ["--skip-inbound-ports", "9090,9091", "--skip-outbound-ports", "5432"];
    let mut argv = vec![PLEXUS, "init"];
    argv.extend_from_slice(&init);
    // Twice: the second run replaces the rules instead of adding them again.
    for round in 0..2 {
        let out = ns.exec(&argv);
        assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let saved = String::from_utf8_lossy(&ns.exec(&["iptables-save", "-t", "nat"]).stdout).into_owned();
    let rules: Vec<&str> = saved.lines().filter(|l| l.starts_with("-A ")).collect();
    let expected = [
        "-A PREROUTING -p tcp -j PLEXUS_INBOUND",
        "-A OUTPUT -p udp -j PLEXUS_OUTPUT",
        "-A OUTPUT -p tcp -j PLEXUS_OUTPUT",
        "-A PLEXUS_INBOUND -p tcp -m tcp --dport 7710 -j RETURN",
        "-A PLEXUS_INBOUND -p tcp -m tcp --dport 7711 -j RETURN",
        "-A PLEXUS_INBOUND -p tcp -m tcp --dport 7712 -j RETURN",
        "-A PLEXUS_INBOUND -p tcp -m tcp --dport 9090 -j RETURN",
        "-A PLEXUS_INBOUND -p tcp -m tcp --dport 9091 -j RETURN",
        "-A PLEXUS_INBOUND -p tcp -j REDIRECT --to-ports 7711",
        "-A PLEXUS_OUTPUT -p udp -m udp --dport 53 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 7753",
        "-A PLEXUS_OUTPUT -p tcp -m tcp --dport 53 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 7753",
        "-A PLEXUS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A PLEXUS_OUTPUT -d 127.0.0.0/8 -j RETURN",
        "-A PLEXUS_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        "-A PLEXUS_OUTPUT -p tcp -j REDIRECT --to-ports 7710",
    ];
    assert_eq!(rules, expected, "iptables-save after two runs:\n{saved}");

    // `--dry-run` prints the same rules and changes nothing.
    let other = Netns::create("init-dry");
    let mut dry = argv.clone();
    dry.push("--dry-run");
    let out = other.exec(&dry);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    for rule in expected {
        assert!(printed.lines().any(|l| l == rule), "dry run lacks {rule}:\n{printed}");
    }
    let untouched = String::from_utf8_lossy(&other.exec(&["iptables-save", "-t", "nat"]).stdout).into_owned();
    assert!(!untouched.contains("PLEXUS"), "dry run changed the table:\n{untouched}");

    // A bad flag is a usage error naming it.
    let out = ns.exec(&[PLEXUS, "init", "--skip-inbound-ports", "http"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--skip-inbound-ports"));
}

/// `plexus control` on free ports; returns it (killed on drop) once it printed its ready line.
fn control_plane(data: &std::path::Path) -> anyhow::Result<(plexus_testkit::Proc, u16, u16)> {
    use std::io::BufRead as _;
    let (http, grpc) = (free_port(), free_port());
    let mut child = Command::new(PLEXUS)
        .args(["control", "--http-addr", &format!("127.0.0.1:{http}"), "--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .arg("--data-dir")
        .arg(data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().ok_or_else(|| anyhow::anyhow!("stdout"))?).read_line(&mut line)?;
    let proc = plexus_testkit::Proc(child);
    anyhow::ensure!(line.contains("\"grpc\""), "no ready line: {line:?}");
    Ok((proc, http, grpc))
}

/// The workload certificate's expiry gauge of a proxy's `/metrics`.
async fn cert_expiry(admin: std::net::SocketAddr) -> f64 {
    let mut cmd = command("curl");
    cmd.args(["-sS", "--max-time", "3", &format!("http://{admin}/metrics")]);
    let Ok(out) = run(&mut cmd, Duration::from_secs(10)).await else { return 0.0 };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("plexus_identity_cert_expiration_timestamp_seconds ")?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A pod's proxy reads its token from a file (`--token-file`, the ServiceAccount token's
/// mount) and takes the trust anchor as PEM text from `PLEXUS_TRUST_ANCHOR_PEM` (what the
/// webhook sets): with a valid token it gets its certificate; with a token the control plane
/// does not know it runs (the anchor from the environment is enough to start) and gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_proxy_bootstraps_from_a_token_file() {
    let dir = TempDir::new("pod-token").expect("dir");
    let data = dir.join("data");
    let (_control, http, grpc) = control_plane(&data).expect("control plane");
    let server = format!("http://127.0.0.1:{http}");
    let token = plexus_testkit::workload_token(PLEXUS, &server, &data, "default", "default").await.expect("token");
    let anchor = std::fs::read_to_string(data.join("trust-anchor.pem")).expect("anchor");
    let grpc_url = format!("http://127.0.0.1:{grpc}");
    let start = |name: &'static str, file: std::path::PathBuf| {
        let grpc_url = grpc_url.clone();
        let anchor = anchor.clone();
        async move {
            // Through `env`, which execs the proxy with the variable set (as the pod spec does).
            let pem_env = format!("PLEXUS_TRUST_ANCHOR_PEM={anchor}");
            let args = [
                pem_env.as_str(),
                PLEXUS,
                "proxy",
                "--control-plane",
                grpc_url.as_str(),
                "--token-file",
                file.to_str().expect("path"),
                "--outbound-port",
                "0",
                "--inbound-port",
                "0",
                "--admin-port",
                "0",
            ];
            Proxy::start_named(name, "env", args).await.expect("proxy starts")
        }
    };
    // Positive: the token from the file (with a trailing newline, as mounted) bootstraps.
    let good = dir.join("token");
    std::fs::write(&good, format!("{token}\n")).expect("token file");
    let proxy = start("pod-proxy", good).await;
    plexus_testkit::eventually(Duration::from_secs(15), || async {
        let expiry = cert_expiry(proxy.admin()).await;
        anyhow::ensure!(expiry > 0.0, "no workload certificate yet");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", proxy.stderr()));

    // Negative: an unknown token (not plx1, no TokenReview authenticator here) gets nothing.
    let bad = dir.join("bad-token");
    std::fs::write(&bad, "eyJhbGciOiJSUzI1NiJ9.not-a-plexus-token.sig\n").expect("token file");
    let rejected = start("bad-proxy", bad).await;
    plexus_testkit::eventually(Duration::from_secs(15), || async {
        anyhow::ensure!(rejected.stderr().contains("cannot get a workload certificate"), "not refused yet");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", rejected.stderr()));
    assert_eq!(cert_expiry(rejected.admin()).await, 0.0, "an unknown token got a certificate");
    assert!(rejected.exit_status().is_none(), "started and still running\n{}", rejected.stderr());

    // Without any anchor (no pin in the token, none in the environment) it refuses to start.
    let mut cmd = command(PLEXUS);
    cmd.args(["proxy", "--control-plane", &grpc_url, "--token-file"]).arg(dir.join("bad-token")).args([
        "--outbound-port",
        "0",
        "--inbound-port",
        "0",
        "--admin-port",
        "0",
    ]);
    let out = run(&mut cmd, Duration::from_secs(20)).await.expect("runs");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust anchor"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Kubelet probes rewritten by injection reach the app through the proxy's admin port
/// (`/app-health/<container>/<kind>`): the app's status is passed on, a dead app is 503, and
/// paths not in the table are not forwarded anywhere.
#[tokio::test]
async fn rewritten_kubelet_probes_are_forwarded_to_the_app() {
    let app = plexus_testkit::HttpEcho::start("app").await.expect("app");
    let closed = free_port();
    let table = serde_json::json!({
        "/app-health/app/readiness": {"port": app.port(), "path": "/healthz"},
        "/app-health/app/liveness": {"port": app.port(), "path": "/status/500", "headers": [["x-probe", "1"]]},
        "/app-health/dead/readiness": {"port": closed, "path": "/"},
    });
    let proxy = Proxy::start(
        PLEXUS,
        [
            "proxy",
            "--outbound-port",
            "0",
            "--inbound-port",
            "0",
            "--admin-port",
            "0",
            "--app-probes",
            &table.to_string(),
        ],
    )
    .await
    .expect("proxy");
    let status = |path: &'static str| {
        let url = format!("http://{}{path}", proxy.admin());
        async move {
            let mut cmd = command("curl");
            cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", &url]);
            let out = run(&mut cmd, Duration::from_secs(20)).await.expect("curl");
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    assert_eq!(status("/app-health/app/readiness").await, "200");
    assert_eq!(status("/app-health/app/liveness").await, "500");
    assert_eq!(status("/app-health/dead/readiness").await, "503");
    assert_eq!(status("/app-health/other/readiness").await, "404", "only the table's paths");
    // A malformed table is a usage error.
    let mut cmd = command(PLEXUS);
    cmd.args(["proxy", "--app-probes", r#"{"/healthz": {"port": 1, "path": "/"}}"#]);
    let out = run(&mut cmd, Duration::from_secs(20)).await.expect("runs");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/app-health/"));
}

/// `plexus control --webhook-addr` serves the injection webhook over HTTPS: a real `curl`
/// posts AdmissionReviews (as the API server does) and gets the JSONPatch for a pod that opts
/// in, none for one that does not; anything else is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_answers_admission_reviews_over_https() {
    if !(require_tool("openssl") && require_tool("curl")) {
        return;
    }
    let dir = TempDir::new("pod-webhook").expect("dir");
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).expect("dir");
    let mut cmd = command("openssl");
    cmd.args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=plexus-control.plexus-system.svc", "-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(tls.join("tls.key"))
        .arg("-out")
        .arg(tls.join("tls.crt"));
    plexus_testkit::run_ok(&mut cmd, Duration::from_secs(30)).await.expect("certificate");
    let data = dir.join("data");
    let (http, grpc, webhook) = (free_port(), free_port(), free_port());
    let mut control = command(PLEXUS);
    control
        .args(["control", "--http-addr", &format!("127.0.0.1:{http}"), "--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--webhook-addr", &format!("127.0.0.1:{webhook}"), "--webhook-tls-dir"])
        .arg(&tls)
        .args(["--proxy-control-plane", "https://10.96.0.50:7700", "--data-dir"])
        .arg(&data);
    let control = Background::start("control", control, "{", Duration::from_secs(30)).await.expect("control plane");
    assert!(control.ready_line().contains(&format!("127.0.0.1:{webhook}")), "{}", control.ready_line());

    let post = |body: String| {
        let (tls, dir) = (tls.clone(), dir.path().to_path_buf());
        async move {
            let file = dir.join(format!("review-{}.json", fastrand_octet()));
            std::fs::write(&file, body).expect("review");
            let mut cmd = command("curl");
            cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", "--cacert"])
                .arg(tls.join("tls.crt"))
                .args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(format!("@{}", file.display()))
                .arg(format!("https://127.0.0.1:{webhook}/inject"));
            let out = plexus_testkit::run_ok(&mut cmd, Duration::from_secs(20)).await.expect("curl");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (body, code) = text.rsplit_once('\n').expect("status line");
            (code.to_string(), body.to_string())
        }
    };
    let review = |annotations: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "namespace": "default", "operation": "CREATE",
                "object": {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "web", "labels": {"app": "web"}, "annotations": annotations},
                    "spec": {"containers": [{"name": "web", "image": "web:1"}]}}}
        })
        .to_string()
    };
    // Opted in by annotation (the file store knows no namespace labels): patched.
    let (code, body) = post(review(serde_json::json!({"plexus.dev/inject": "enabled"}))).await;
    assert_eq!(code, "200", "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["response"]["uid"], "u-1");
    assert_eq!(answer["response"]["allowed"], true);
    let encoded = dir.join("patch.b64");
    std::fs::write(&encoded, answer["response"]["patch"].as_str().expect("patch")).expect("write");
    let mut decode = command("base64");
    decode.arg("-d").arg(&encoded);
    let patch = plexus_testkit::run_ok(&mut decode, Duration::from_secs(10)).await.expect("base64 patch");
    let patch = String::from_utf8_lossy(&patch.stdout).into_owned();
    assert!(patch.contains("plexus-proxy") && patch.contains("plexus-init"), "{patch}");
    assert!(patch.contains("https://10.96.0.50:7700"), "{patch}");
    assert!(patch.contains("BEGIN CERTIFICATE"), "the mesh's trust anchor is passed: {patch}");
    // Not opted in: admitted without a patch.
    let (code, body) = post(review(serde_json::json!({}))).await;
    assert_eq!(code, "200", "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{body}");
    // Not an AdmissionReview.
    let (code, _) = post("{\"hello\": 1}".into()).await;
    assert_eq!(code, "400");
    let (code, _) = post("not json".into()).await;
    assert_eq!(code, "400");
}

/// `plexus inject -f -` injects every pod template of a multi-document stream (Deployment,
/// Job, CronJob, bare Pod), leaves other documents and opted-out pods as they are, and picks
/// native sidecars from `--kubernetes-version`.
#[tokio::test]
async fn plexus_inject_mutates_every_pod_template_of_a_stream() {
    let dir = TempDir::new("pod-inject").expect("dir");
    let anchor = dir.join("anchor.pem");
    std::fs::write(&anchor, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").expect("anchor");
    let stream = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: web:1
        readinessProbe: {httpGet: {path: /ready, port: 8080}}
---
apiVersion: batch/v1
kind: Job
metadata: {name: once}
spec: {template: {spec: {restartPolicy: Never, containers: [{name: job, image: job:1}]}}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec: {schedule: "0 0 * * *", jobTemplate: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: c, image: c:1}]}}}}}
---
apiVersion: v1
kind: Pod
metadata: {name: debug, annotations: {plexus.dev/inject: disabled}}
spec: {containers: [{name: sh, image: busybox}]}
"#;
    let input = dir.join("in.yaml");
    std::fs::write(&input, stream).expect("input");
    let inject = |version: &'static str| {
        let (input, anchor) = (input.clone(), anchor.clone());
        async move {
            let mut cmd = command("sh");
            cmd.arg("-c")
                .arg(format!(
                    "{PLEXUS} inject -f - --trust-anchor {} --control-plane https://10.96.0.50:7700 --kubernetes-version {version} < {}",
                    anchor.display(),
                    input.display()
                ));
            let out = plexus_testkit::run_ok(&mut cmd, Duration::from_secs(30)).await.expect("plexus inject");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (text, String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    let (text, stderr) = inject("1.20").await;
    let docs: Vec<serde_json::Value> = text
        .split("\n---\n")
        .map(|d| d.trim_start_matches("---\n"))
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_json::to_value(yaml_value(d)).expect("YAML document"))
        .collect();
    assert_eq!(docs.len(), 5, "{text}");
    let containers = |doc: &serde_json::Value, at: &str| -> Vec<String> {
        doc.pointer(at)
            .and_then(|c| c.as_array())
            .map(|a| a.iter().filter_map(|c| c["name"].as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    assert_eq!(docs[0]["kind"], "Service");
    assert!(docs[0].pointer("/spec/template").is_none());
    assert_eq!(containers(&docs[1], "/spec/template/spec/containers"), ["plexus-proxy", "web"]);
    assert_eq!(containers(&docs[1], "/spec/template/spec/initContainers"), ["plexus-init"]);
    assert_eq!(
        docs[1].pointer("/spec/template/spec/containers/1/readinessProbe/httpGet/path"),
        Some(&serde_json::json!("/app-health/web/readiness"))
    );
    assert_eq!(containers(&docs[2], "/spec/template/spec/containers"), ["plexus-proxy", "job"]);
    assert_eq!(containers(&docs[3], "/spec/jobTemplate/spec/template/spec/containers"), ["plexus-proxy", "c"]);
    assert_eq!(containers(&docs[4], "/spec/containers"), ["sh"], "opted out");
    assert!(stderr.contains("document 5 (Pod) not injected"), "{stderr}");
    // Native sidecars from 1.29: the proxy is an init container.
    let (text, _) = inject("1.29").await;
    assert!(text.contains("restartPolicy: Always"), "{text}");
    // Errors name the input and the problem.
    let mut cmd = command(PLEXUS);
    cmd.args(["inject", "-f"]).arg(&input).args(["--trust-anchor"]).arg(&input);
    let out = run(&mut cmd, Duration::from_secs(20)).await.expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--trust-anchor"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn yaml_value(text: &str) -> serde_json::Value {
    serde_saphyr::from_str(text).expect("YAML")
}
