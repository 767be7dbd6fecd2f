//! Egress (SPEC §4 `ExternalService`, §5 "Not a way around the mesh"): under MeshConfig
//! `outboundTrafficPolicy: registryOnly` a sidecar reaches mesh Services and ExternalServices
//! only — every explicit path (absolute-form, `Host`, HTTP/2 `:authority`, `CONNECT`) refuses
//! anything else with 502 `x-plexus-error: destination not in the registry`, counted in
//! `plexus_egress_denied_total{destination}` — each refusal beside a positive control through
//! a listed ExternalService; `allowAny` lets everything out again. TLS origination: a plaintext
//! request to an ExternalService with `tls.originate` leaves over TLS verified against its
//! `caFile` (or the system roots), refused when the certificate does not verify. The
//! transparent path (original destination, opaque TCP) is in `egress_transparent.rs`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::egress::{Pki, TLS_ECHO, control_plane, curl};
use common::{PLEXUS, metric_sum, show};
use plexus_testkit::{HttpEcho, Proxy, TcpEcho, TempDir, command, eventually, require_tool, run};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const REGISTRY_ONLY: &str = "apiVersion: plexus.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {outboundTrafficPolicy: registryOnly}\n";

/// `plexus proxy --resources FILE` with free ports.
async fn proxy(name: &str, resources: &Path) -> Proxy {
    let args = [
        "proxy",
        "--resources",
        &resources.display().to_string(),
        "--outbound-port",
        "0",
        "--inbound-port",
        "0",
        "--admin-port",
        "0",
    ]
    .map(String::from);
    Proxy::start_named(name, PLEXUS, args).await.unwrap_or_else(|e| panic!("{e:#}"))
}

async fn expect_ok(args: &[&str], served_by: &str, what: &str) {
    let (status, error, out) = curl(args).await;
    assert_eq!(status, 200, "{what}: curl {args:?} (x-plexus-error: {error:?})\n{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(served_by), "{what}: not answered by {served_by}\n{}", show(&out));
}

async fn expect_refused(args: &[&str], what: &str) {
    let (status, error, out) = curl(args).await;
    assert_eq!(
        (status, error.as_deref()),
        (502, Some("destination not in the registry")),
        "{what}: curl {args:?}\n{}",
        show(&out)
    );
}

/// A raw `CONNECT` to `target`, then `ping` through the tunnel: the echo, or the proxy's answer.
async fn connect_echo(proxy: SocketAddr, target: &str) -> String {
    connect_exchange(proxy, target, 4).await
}

/// A raw `CONNECT` to `target`, then `ping` through the tunnel: the first `answer_len` bytes
/// answered, or the proxy's answer when the tunnel was refused.
async fn connect_exchange(proxy: SocketAddr, target: &str, answer_len: usize) -> String {
    let mut s = tokio::net::TcpStream::connect(proxy).await.expect("connect");
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 200") {
        return head;
    }
    s.write_all(b"ping").await.expect("write");
    let mut buf = vec![0u8; answer_len];
    match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) => String::from_utf8_lossy(&buf).into_owned(),
        other => format!("no echo: {other:?}"),
    }
}

async fn metrics(proxy: &Proxy) -> String {
    proxy.admin_get("/metrics").await.expect("metrics").text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_refuses_unlisted_destinations_on_every_explicit_path() {
    if !require_tool("curl") {
        return;
    }
    let listed = HttpEcho::start("listed-app").await.expect("echo");
    let unlisted = HttpEcho::start("unlisted-app").await.expect("echo");
    let tcp = TcpEcho::start().await.expect("tcp echo");
    let dir = TempDir::new("egress").expect("dir");
    let res = dir.join("mesh.yaml");
    let external = format!(
        "apiVersion: plexus.dev/v1alpha1\nkind: ExternalService\nmetadata: {{name: listed}}\nspec:\n  hosts: [localhost]\n  ports: [{{port: {}, protocol: http}}, {{port: {}, protocol: tcp}}]\n",
        listed.port(),
        tcp.port()
    );
    std::fs::write(&res, format!("{REGISTRY_ONLY}---\n{external}")).expect("write");
    let client = proxy("client", &res).await;
    let px = format!("http://{}", client.addrs().outbound);
    let (l, u) = (listed.port(), unlisted.port());

    // Absolute-form (curl -x): the listed host and port, and spellings of the same name.
    expect_ok(&["-x", &px, &format!("http://localhost:{l}/a")], "listed-app", "absolute-form to the listed port").await;
    expect_ok(&["-x", &px, &format!("http://LOCALHOST.:{l}/a")], "listed-app", "the name in capitals, fully qualified")
        .await;
    let refused_urls = [
        format!("http://localhost:{u}/b"),
        format!("http://127.0.0.1:{l}/b"),
        format!("http://[::1]:{l}/b"),
        format!("http://LocalHost.:{u}/b"),
        "http://unlisted.example/b".to_string(),
        format!("http://localhost.localdomain:{l}/b"),
    ];
    for url in &refused_urls {
        expect_refused(&["-x", &px, url], &format!("absolute-form {url}")).await;
    }
    // Routing by Host (origin-form to the proxy port), HTTP/1.1 and HTTP/2 (`:authority`).
    let origin = format!("http://{}/c", client.addrs().outbound);
    expect_ok(&[&origin, "-H", &format!("Host: localhost:{l}")], "listed-app", "Host routing to the listed port").await;
    expect_refused(&[&origin, "-H", &format!("Host: localhost:{u}")], "Host routing to an unlisted port").await;
    expect_refused(&[&origin, "-H", "Host: example.org"], "Host routing to an unlisted name").await;
    expect_ok(
        &["--http2-prior-knowledge", &origin, "-H", &format!("Host: localhost:{l}")],
        "listed-app",
        "HTTP/2 :authority to the listed port",
    )
    .await;
    expect_refused(
        &["--http2-prior-knowledge", &origin, "-H", &format!("Host: localhost:{u}")],
        "HTTP/2 :authority to an unlisted port",
    )
    .await;
    // CONNECT: a tunnel to the listed ports only (HTTP inside, and raw TCP).
    expect_ok(&["-p", "-x", &px, &format!("http://localhost:{l}/d")], "listed-app", "CONNECT to the listed port").await;
    expect_refused(&["-p", "-x", &px, &format!("http://localhost:{u}/d")], "CONNECT to an unlisted port").await;
    expect_refused(&["-p", "-x", &px, &format!("http://127.0.0.1:{}/d", tcp.port())], "CONNECT by address").await;
    assert_eq!(connect_echo(client.addrs().outbound, &format!("localhost:{}", tcp.port())).await, "ping");
    let refused = connect_echo(client.addrs().outbound, &format!("localhost:{u}")).await;
    assert!(
        refused.starts_with("HTTP/1.1 502") && refused.contains("x-plexus-error: destination not in the registry"),
        "raw CONNECT to an unlisted port: {refused}"
    );
    assert_eq!(unlisted.requests(), 0, "nothing reached the unlisted app");

    // Counted per destination; calls to the ExternalService carry its name.
    let text = metrics(&client).await;
    let denied = |d: &str| metric_sum(&text, "plexus_egress_denied_total", &[&format!("destination=\"{d}\"")]);
    assert!(denied(&format!("localhost:{u}")) >= 4.0, "unlisted port counted:\n{text}");
    assert!(denied(&format!("127.0.0.1:{l}")) >= 1.0, "by address counted:\n{text}");
    assert!(denied("unlisted.example:80") >= 1.0, "unlisted name counted:\n{text}");
    let ok = metric_sum(&text, "plexus_requests_total", &["destination_service=\"listed\""]);
    assert!(ok >= 5.0, "requests to the ExternalService labelled with its name:\n{text}");
    let refused_502 = metric_sum(&text, "plexus_requests_total", &["response_code=\"502\""]);
    assert!(refused_502 >= 8.0, "refusals are requests answered 502:\n{text}");

    // Tap shows the decision: while a tap stream is open, refused and allowed requests.
    let tap_url = format!("http://{}/tap", client.addrs().admin);
    let mut tap_cmd = command("curl");
    tap_cmd.args(["-sN", "--max-time", "4", &tap_url]);
    let tap = tokio::spawn(async move { run(&mut tap_cmd, Duration::from_secs(10)).await });
    while !tap.is_finished() {
        let _ = curl(&["-x", &px, &format!("http://localhost:{u}/tapped")]).await;
        let _ = curl(&["-x", &px, &format!("http://localhost:{l}/tapped")]).await;
    }
    let tapped = tap.await.expect("tap task").expect("tap");
    let events = String::from_utf8_lossy(&tapped.stdout);
    assert!(
        events.contains(&format!(
            "egress to localhost:{u}: denied: destination not in the registry (outboundTrafficPolicy registryOnly)"
        )),
        "tap shows the refusal:\n{events}"
    );
    assert!(
        events.contains(&format!("egress to localhost:{l}: allowed: ExternalService default/listed port {l} (http)")),
        "tap shows the ExternalService:\n{events}"
    );

    // allowAny (no MeshConfig): the same destinations go out again; the listed one keeps its name.
    std::fs::write(&res, &external).expect("write");
    let url = format!("http://localhost:{u}/e");
    eventually(Duration::from_secs(10), || async {
        let (status, _, out) = curl(&["-x", &px, &url]).await;
        anyhow::ensure!(status == 200, "not yet allowed: {}", show(&out));
        Ok(())
    })
    .await
    .expect("allowAny lets an unlisted destination out");
    expect_ok(&["-p", "-x", &px, &format!("http://localhost:{u}/f")], "unlisted-app", "CONNECT under allowAny").await;
    expect_ok(&["-x", &px, &format!("http://localhost:{l}/g")], "listed-app", "the listed one under allowAny").await;
}

/// A Python HTTPS server (the standard library's) with `cert`: answers `tls:<path> host=<Host>`.
async fn https_server(name: &str, cert: &Path, key: &Path) -> (plexus_testkit::Background, u16) {
    const SRC: &str = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("tls:" + self.path + " host=" + self.headers.get("Host", "")).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", srv.server_address[1], flush=True)
srv.serve_forever()
"#;
    let mut cmd = command("python3");
    cmd.arg("-u").arg("-c").arg(SRC).arg(cert).arg(key);
    let bg = plexus_testkit::Background::start(name, cmd, "ready", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let port = bg.ready_port().expect("port");
    (bg, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_verifies_the_external_host() {
    if !require_tool("curl") || !require_tool("python3") {
        return;
    }
    let dir = TempDir::new("egress-tls").expect("dir");
    let pki = Pki::new(&dir, &["localhost", "127.0.0.1"]);
    let (_good, good) = https_server("https-good", &pki.good.0, &pki.good.1).await;
    let (_foreign, foreign) = https_server("https-foreign", &pki.foreign.0, &pki.foreign.1).await;
    let (_misnamed, misnamed) = https_server("https-misnamed", &pki.misnamed.0, &pki.misnamed.1).await;
    // `api` originates TLS verified against the test CA; `sys` (the same server by its
    // address) against the system roots, which do not hold the test CA.
    let yaml = format!(
        r#"{REGISTRY_ONLY}---
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {{name: api}}
spec:
  hosts: [localhost]
  ports: [{{port: {good}, protocol: https}}, {{port: {foreign}, protocol: https}}, {{port: {misnamed}, protocol: https}}]
  tls: {{originate: true, caFile: {ca}}}
---
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {{name: sys}}
spec:
  hosts: [127.0.0.1]
  ports: [{{port: {good}, protocol: https}}]
  tls: {{originate: true}}
"#,
        ca = pki.ca.display(),
    );
    let res = dir.join("mesh.yaml");
    std::fs::write(&res, yaml).expect("write");
    let client = proxy("client", &res).await;
    let px = format!("http://{}", client.addrs().outbound);

    // The app speaks plaintext HTTP to the https port; the sidecar speaks verified TLS.
    let (status, error, out) = curl(&["-x", &px, &format!("http://localhost:{good}/hello?x=1")]).await;
    assert_eq!(status, 200, "originated TLS to a host its CA vouches for ({error:?})\n{}", show(&out));
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(body.starts_with("tls:/hello?x=1 host=localhost:"), "the server saw the request over TLS: {body}");
    // Several requests on one pooled TLS connection, and HTTP/2 from the app (HTTP/1.1 out).
    for i in 0..3 {
        expect_ok(&["-x", &px, &format!("http://localhost:{good}/again{i}")], "tls:/again", "again").await;
    }
    let origin = format!("http://{}/h2", client.addrs().outbound);
    expect_ok(&["--http2-prior-knowledge", &origin, "-H", &format!("Host: localhost:{good}")], "tls:/h2", "h2 app")
        .await;

    // Certificates that do not verify: 502 with the reason, nothing served.
    let refused = |port: u16, host: &'static str, reason: &'static str, what: &'static str| {
        let px = px.clone();
        async move {
            let (status, error, out) = curl(&["-x", &px, &format!("http://{host}:{port}/secret")]).await;
            let error = error.unwrap_or_default();
            assert_eq!(status, 502, "{what}\n{}", show(&out));
            assert!(
                error.starts_with("TLS origination failed") && error.contains(reason),
                "{what}: x-plexus-error {error:?} should name {reason:?}\n{}",
                show(&out)
            );
            assert!(!String::from_utf8_lossy(&out.stdout).contains("tls:/secret"), "{what}: served");
        }
    };
    refused(foreign, "localhost", "UnknownIssuer", "a certificate from another CA").await;
    refused(misnamed, "localhost", "not valid for name", "a certificate for another name").await;
    refused(good, "127.0.0.1", "UnknownIssuer", "the system roots do not hold the test CA").await;

    // Origination is for plaintext clients: a CONNECT tunnel carries the app's own TLS.
    let (status, error, out) = curl(&[
        "-p",
        "-x",
        &px,
        "--cacert",
        &pki.ca.display().to_string(),
        &format!("https://localhost:{good}/own-tls"),
    ])
    .await;
    assert_eq!(status, 200, "the app's own TLS through CONNECT ({error:?})\n{}", show(&out));

    let text = metrics(&client).await;
    let api = metric_sum(&text, "plexus_requests_total", &["destination_service=\"api\","]);
    assert!(api >= 5.0, "originated calls labelled with the ExternalService:\n{text}");
    let failed = metric_sum(&text, "plexus_requests_total", &["response_flags=\"UF\""]);
    assert!(failed >= 3.0, "verification failures flagged UF:\n{text}");
}

/// A Python TLS server with `cert` answering each connection's first bytes with
/// `tls-echo:<bytes>` (proof they arrived over TLS), then closing.
async fn tls_echo_server(name: &str, cert: &Path, key: &Path) -> (plexus_testkit::Background, u16) {
    let mut cmd = command("python3");
    cmd.arg("-u").arg("-c").arg(TLS_ECHO).arg(cert).arg(key).arg("127.0.0.1");
    let bg = plexus_testkit::Background::start(name, cmd, "ready", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let port = bg.ready_port().expect("port");
    (bg, port)
}

/// TLS origination on the stream path (explicit `CONNECT`): an app sending plaintext TCP to an
/// ExternalService `tls` port with `tls.originate` gets TLS from its sidecar (SNI and the
/// verified name = the host); a certificate that does not verify refuses the tunnel with 502
/// and the reason, counted in `plexus_egress_origination_failed_total{destination}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_on_tcp_streams_through_connect() {
    if !require_tool("python3") {
        return;
    }
    let dir = TempDir::new("egress-tls-tcp").expect("dir");
    let pki = Pki::new(&dir, &["localhost", "127.0.0.1"]);
    let (_good, good) = tls_echo_server("tls-good", &pki.good.0, &pki.good.1).await;
    let (_foreign, foreign) = tls_echo_server("tls-foreign", &pki.foreign.0, &pki.foreign.1).await;
    let (_misnamed, misnamed) = tls_echo_server("tls-misnamed", &pki.misnamed.0, &pki.misnamed.1).await;
    let plain = TcpEcho::start().await.expect("tcp echo");
    let yaml = format!(
        r#"{REGISTRY_ONLY}---
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {{name: secure}}
spec:
  hosts: [localhost]
  ports: [{{port: {good}, protocol: tls}}, {{port: {foreign}, protocol: tls}}, {{port: {misnamed}, protocol: tls}}, {{port: {plain}, protocol: tcp}}]
  tls: {{originate: true, caFile: {ca}}}
---
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata: {{name: by-address}}
spec:
  hosts: [127.0.0.1]
  ports: [{{port: {good}, protocol: tls}}]
  tls: {{originate: true, caFile: {ca}}}
"#,
        plain = plain.port(),
        ca = pki.ca.display(),
    );
    let res = dir.join("mesh.yaml");
    std::fs::write(&res, yaml).expect("write");
    let client = proxy("client", &res).await;
    let px = client.addrs().outbound;

    // Positive controls: plaintext in, verified TLS out, by name and by an address the
    // certificate names; the same ExternalService's `tcp` port stays plaintext.
    for target in [format!("localhost:{good}"), format!("127.0.0.1:{good}"), format!("LOCALHOST.:{good}")] {
        assert_eq!(connect_exchange(px, &target, 13).await, "tls-echo:ping", "CONNECT {target}");
    }
    assert_eq!(connect_echo(px, &format!("localhost:{}", plain.port())).await, "ping", "a tcp port: plaintext");

    // Certificates that do not verify: the tunnel is refused with the reason.
    for (port, reason, what) in [
        (foreign, "UnknownIssuer", "a certificate from another CA"),
        (misnamed, "not valid for name", "a certificate for another name"),
    ] {
        let answer = connect_exchange(px, &format!("localhost:{port}"), 13).await;
        assert!(answer.starts_with("HTTP/1.1 502"), "{what}: {answer}");
        let error = answer
            .lines()
            .find_map(|l| l.strip_prefix("x-plexus-error: "))
            .unwrap_or_else(|| panic!("{what}: no x-plexus-error in {answer}"));
        assert!(error.starts_with("TLS origination failed") && error.contains(reason), "{what}: {error}");
    }
    // Still under registryOnly: an unlisted port of the host is not a way out.
    let refused = connect_exchange(px, &format!("localhost:{}", plexus_testkit::free_port()), 13).await;
    assert!(refused.contains("destination not in the registry"), "{refused}");

    let text = metrics(&client).await;
    let failed =
        |d: &str| metric_sum(&text, "plexus_egress_origination_failed_total", &[&format!("destination=\"{d}\"")]);
    assert_eq!(failed(&format!("localhost:{foreign}")), 1.0, "counted per destination:\n{text}");
    assert_eq!(failed(&format!("localhost:{misnamed}")), 1.0, "counted per destination:\n{text}");
    assert_eq!(failed(&format!("localhost:{good}")), 0.0, "the verified ones are not:\n{text}");
    let opened = metric_sum(&text, "plexus_tcp_connections_opened_total", &["destination_service=\"secure\""]);
    assert!(opened >= 3.0, "streams labelled with the ExternalService:\n{text}");
}

/// `plexus explain --to HOST:PORT` with a proposed config and no control plane: the egress
/// decision the proxies run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_the_egress_decision() {
    let dir = TempDir::new("egress-explain").expect("dir");
    let file = dir.join("egress.yaml");
    std::fs::write(
        &file,
        format!(
            "{REGISTRY_ONLY}---\napiVersion: plexus.dev/v1alpha1\nkind: ExternalService\nmetadata: {{name: api}}\nspec: {{hosts: [api.example.com], ports: [{{port: 443, protocol: https}}], tls: {{originate: true}}}}\n"
        ),
    )
    .expect("write");
    let explain = |to: &'static str, output: &'static str| {
        let file = file.clone();
        async move {
            let mut cmd = command(PLEXUS);
            cmd.args(["explain", "--to", to, "-f", &file.display().to_string(), "-o", output])
                .args(["--server", "http://127.0.0.1:9"]);
            let out = run(&mut cmd, Duration::from_secs(30)).await.expect("explain");
            assert!(out.status.success(), "explain --to {to}\n{}", show(&out));
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let allowed = explain("api.example.com:443", "table").await;
    assert!(allowed.contains("allowed: ExternalService default/api port 443 (https)"), "{allowed}");
    assert!(allowed.contains("originated by the sidecar"), "{allowed}");
    let denied = explain("api.example.com:8443", "table").await;
    assert!(denied.contains("denied: destination not in the registry"), "{denied}");
    assert!(denied.contains("502 x-plexus-error: destination not in the registry"), "{denied}");
    let json: serde_json::Value = serde_json::from_str(&explain("other.example.org", "json").await).expect("json");
    assert_eq!(json["allowed"], false);
    assert_eq!(json["destination"], "other.example.org:80");
    assert_eq!(json["outboundTrafficPolicy"], "registryOnly");
}

/// ExternalServices and MeshConfig reach every sidecar through the control plane, also one
/// that watches no Service: registryOnly is enforced there, and an ExternalService applied
/// or deleted changes what leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_services_reach_sidecars_through_the_control_plane() {
    if !require_tool("curl") {
        return;
    }
    let listed = HttpEcho::start("listed-app").await.expect("echo");
    let unlisted = HttpEcho::start("unlisted-app").await.expect("echo");
    let dir = TempDir::new("egress-cp").expect("dir");
    let (_cp, server, grpc) = control_plane(&dir).await;
    let data = dir.join("data");
    let plexus = |args: &[&str]| {
        let mut cmd = command(PLEXUS);
        cmd.args(args).env("PLEXUS_SERVER", &server).env("PLEXUS_DATA_DIR", &data);
        cmd
    };
    let external = format!(
        "apiVersion: plexus.dev/v1alpha1\nkind: ExternalService\nmetadata: {{name: listed, namespace: ops}}\nspec: {{hosts: [localhost], ports: [{}]}}\n",
        listed.port()
    );
    let file = dir.join("egress.yaml");
    std::fs::write(&file, format!("{REGISTRY_ONLY}---\n{external}")).expect("write");
    let out =
        run(&mut plexus(&["apply", "-f", &file.display().to_string()]), Duration::from_secs(30)).await.expect("apply");
    assert!(out.status.success(), "apply\n{}", show(&out));
    let token = plexus_testkit::workload_token(PLEXUS, &server, &data, "default", "client").await.expect("token");
    let args = [
        "proxy",
        "--control-plane",
        &grpc,
        "--token",
        &token,
        "--service-account",
        "client",
        "--outbound-port",
        "0",
        "--inbound-port",
        "0",
        "--admin-port",
        "0",
    ]
    .map(String::from);
    let client = Proxy::start_named("client", PLEXUS, args).await.unwrap_or_else(|e| panic!("{e:#}"));
    let px = format!("http://{}", client.addrs().outbound);
    let (l, u) = (listed.port(), unlisted.port());
    let status = |port: u16| {
        let px = px.clone();
        async move {
            let (status, error, out) = curl(&["-x", &px, &format!("http://localhost:{port}/")]).await;
            (status, error, show(&out))
        }
    };
    eventually(Duration::from_secs(20), || async {
        let (s, e, out) = status(l).await;
        anyhow::ensure!(s == 200, "listed: {s} {e:?}\n{out}");
        let (s, e, out) = status(u).await;
        anyhow::ensure!(
            s == 502 && e.as_deref() == Some("destination not in the registry"),
            "unlisted: {s} {e:?}\n{out}"
        );
        Ok(())
    })
    .await
    .expect("registryOnly and the ExternalService (another namespace's) reached the sidecar");
    // Deleting the ExternalService closes the way out.
    let out = run(&mut plexus(&["delete", "externalservice", "listed", "-n", "ops"]), Duration::from_secs(30))
        .await
        .expect("delete");
    assert!(out.status.success(), "delete\n{}", show(&out));
    eventually(Duration::from_secs(20), || async {
        let (s, e, out) = status(l).await;
        anyhow::ensure!(s == 502 && e.is_some(), "still allowed: {s}\n{out}");
        Ok(())
    })
    .await
    .expect("the deletion reached the sidecar");
    assert_eq!(unlisted.requests(), 0, "nothing reached the unlisted app");
}
