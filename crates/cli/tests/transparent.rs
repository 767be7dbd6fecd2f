//! Transparent interception in network namespaces, as in a pod: iptables REDIRECTs the
//! client's outbound traffic to its sidecar's outbound port and the server's inbound traffic
//! to its sidecar's inbound port; both sidecars find the original destination with
//! `SO_ORIGINAL_DST` and use the default ports (7710/7711/7712) inside their namespaces.
//!
//! Topology: namespace A (client, 10.231.N.1) ── veth ── namespace B (server, 10.231.N.2).
//! Needs root, `ip`, `iptables`, `setpriv`, `curl` and `python3`.

use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use plexus_testkit::certs::Certs;
use plexus_testkit::netns::{NetnsPair, sh};
use plexus_testkit::{
    Background, Proc, Proxy, Shared, TempDir, command, eventually, exclusive, require_root, require_tool, run_ok,
};

const PLEXUS: &str = env!("CARGO_BIN_EXE_plexus");

fn prerequisites() -> bool {
    require_root()
        && require_tool("ip")
        && require_tool("iptables")
        && require_tool("setpriv")
        && require_tool("curl")
        && require_tool("python3")
        && require_tool("/usr/bin/python3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_interception_between_two_namespaces() -> anyhow::Result<()> {
    if !prerequisites() {
        return Ok(());
    }
    // Network namespaces, veth pairs and iptables: not beside the `--netns` demo.
    let _host_network = exclusive(Shared::HostNetwork).await;
    let net = NetnsPair::create("pt", 231)?;
    let server_ip = net.server_ip();
    let dir = TempDir::new("transparent")?;
    let server = Server::start(&net, &dir, None).await?;
    let res = server.resources.clone();

    // Client namespace: traffic of uid 65534 (the "app") is redirected; the sidecar runs as
    // root and is not (the iptables owner match, as Istio and Linkerd exclude their proxy uid).
    sh(&[
        "ip",
        "netns",
        "exec",
        &net.a,
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-m",
        "owner",
        "--uid-owner",
        "65534",
        "-j",
        "REDIRECT",
        "--to-ports",
        "7710",
    ])?;
    let client =
        Proxy::spawn_named("client-sidecar", "ip", net.exec(&net.a, &[PLEXUS, "proxy", "--resources", &res])).await?;
    let as_app = |cmd: &[&str]| {
        let mut args = vec!["netns", "exec", &net.a, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
        args.extend_from_slice(cmd);
        Command::new("ip").args(args).output()
    };
    // HTTP by pod IP: intercepted, routed, sent as HTTP/2 to the server sidecar, which
    // downgrades to HTTP/1 for the app.
    let url = format!("http://{server_ip}:8080/hello.txt");
    let out = as_app(&["curl", "-sS", "--max-time", "10", "-D", "-", &url])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hello through the mesh"),
        "curl through transparent sidecars: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Opaque TCP by pod IP.
    let tcp = "import socket,sys\ns=socket.create_connection((sys.argv[1], 9000), timeout=10); s.sendall(b'ping'); print(s.recv(100).decode())";
    // The system interpreter: a per-user one (pyenv) may not be readable by uid 65534.
    let out = as_app(&["/usr/bin/python3", "-c", tcp, &server_ip])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.trim(),
        "echo:ping",
        "TCP through transparent sidecars; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Both sidecars saw the traffic: the client's outbound metrics name the destination.
    let metrics =
        Command::new("ip").args(net.exec(&net.a, &["curl", "-s", "http://127.0.0.1:7712/metrics"])).output()?;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.lines().any(|l| l.starts_with("plexus_requests_total{direction=\"outbound\"")
            && l.contains("destination_service=\"web\"")
            && l.contains("response_code=\"200\"")),
        "client sidecar counted the request:\n{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l.starts_with("plexus_tcp_connections_opened_total{direction=\"outbound\"")
            && l.contains("destination_service=\"web\"")),
        "client sidecar counted the TCP stream:\n{metrics}"
    );
    let metrics =
        Command::new("ip").args(net.exec(&net.b, &["curl", "-s", "http://127.0.0.1:7712/metrics"])).output()?;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.lines().any(|l| l.starts_with("plexus_requests_total{direction=\"inbound\"")
            && l.contains("destination_service=\"web\"")
            && l.contains("response_code=\"200\"")),
        "server sidecar received the request (HTTP/2 between the sidecars):\n{metrics}"
    );
    drop(client);
    drop(server);
    Ok(())
}

/// The original destination's port is the caller's choice, so the inbound listener never
/// delivers to the sidecar's own listeners on 127.0.0.1 (SPEC §5). Through the pod address,
/// the outbound port would act as this workload (its routes, its mTLS identity), the admin port
/// would take the caller for a local one (`/config`, `/tap`, `POST /shutdown`). Before the fix, any mesh identity opening a `plexus.tcp` stream to the pod
/// on 7712 read `/config` and shut the sidecar down with `POST /shutdown`. Each such
/// connection is now closed before anything is served, over mesh mTLS and in plaintext alike.
/// Positive controls: the same mesh stream and a plaintext request to the app's port answer,
/// before and after, and the sidecar is not draining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_never_delivers_to_the_sidecars_own_listeners() -> anyhow::Result<()> {
    if !prerequisites() || !plexus_testkit::require_tool("openssl") {
        return Ok(());
    }
    let _host_network = exclusive(Shared::HostNetwork).await;
    let net = NetnsPair::create("ps", 233)?;
    let (client_ip, server_ip) = (net.client_ip(), net.server_ip());
    let dir = TempDir::new("transparent-self")?;
    // The control plane in namespace `a`, its gRPC port on `a`'s address.
    let data = dir.join("control");
    let data_arg = data.display().to_string();
    let grpc = format!("{client_ip}:7700");
    let control = [PLEXUS, "control", "--http-addr", "127.0.0.1:7701", "--grpc-addr", &grpc, "--data-dir", &data_arg];
    let mut cmd = command("ip");
    cmd.args(net.exec(&net.a, &control));
    let _control = Background::start("control", cmd, "{", Duration::from_secs(30)).await?;
    let mut cmd = command("ip");
    let token_cmd = [PLEXUS, "token", "create", "--service-account", "web", "--server", "http://127.0.0.1:7701"];
    cmd.args(net.exec(&net.a, &token_cmd)).env("PLEXUS_DATA_DIR", &data);
    let out = run_ok(&mut cmd, Duration::from_secs(30)).await?;
    let token = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
    let _server = Server::start(&net, &dir, Some((&format!("http://{grpc}"), &token))).await?;
    let admin_get = |path: &str| {
        let url = format!("http://127.0.0.1:7712{path}");
        Command::new("ip").args(net.exec(&net.b, &["curl", "-s", "--max-time", "5", &url])).output()
    };
    eventually(Duration::from_secs(30), || async {
        let config = String::from_utf8_lossy(&admin_get("/config")?.stdout).into_owned();
        anyhow::ensure!(config.contains("\"serial\""), "no workload certificate yet: {config}");
        Ok(())
    })
    .await?;

    // Another mesh identity, signed by the mesh's issuer: what a compromised workload holds.
    let certs = Certs::new(dir.join("certs"))?;
    let issuer = (data.join("issuer.pem"), data.join("issuer-key.pem"));
    let (cert, key) =
        certs.leaf("other", "spiffe://plexus.local/ns/default/sa/other", Some((&issuer.0, &issuer.1))).await?;
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    // A `plexus.tcp` stream as a peer sidecar opens it (source header first), then `request`
    // ('|' for CRLF); prints what comes back.
    const MESH_STREAM: &str = r#"
import socket, ssl, sys
host, port, cert, key, request = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(['plexus.tcp'])
out = b''
try:
    s = ctx.wrap_socket(socket.create_connection((host, port), timeout=5))
    source = b'other-1/other'
    s.sendall(len(source).to_bytes(2, 'big') + source + request.replace('|', '\r\n').encode())
    while True:
        d = s.recv(4096)
        if not d:
            break
        out += d
except socket.timeout:
    out += b'TIMEOUT'
except (ssl.SSLError, ConnectionError) as e:
    print('closed:', e, file=sys.stderr)
sys.stdout.write(out.decode('latin-1'))
"#;
    let mesh = |port: &str, request: &str| {
        let args = ["python3", "-c", MESH_STREAM, &server_ip, port, &cert, &key, request];
        Command::new("ip").args(net.exec(&net.a, &args)).output()
    };
    let curl = |args: &[&str]| {
        let mut all = vec!["curl", "-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}"];
        all.extend_from_slice(args);
        Command::new("ip").args(net.exec(&net.a, &all)).output()
    };
    let app = format!("http://{server_ip}:8080/hello.txt");
    let controls = || -> anyhow::Result<()> {
        let out = mesh("8080", "GET /hello.txt HTTP/1.0||")?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(text.contains("hello through the mesh"), "mesh stream to the app: {text}");
        let out = curl(&[&app])?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(text.contains("hello through the mesh"), "plaintext to the app: {text}");
        Ok(())
    };
    controls().context("positive controls before")?;

    for (what, port, request) in [
        ("admin GET /config", "7712", "GET /config HTTP/1.1|Host: 127.0.0.1:7712||"),
        ("admin GET /tap", "7712", "GET /tap HTTP/1.1|Host: localhost:7712||"),
        ("admin POST /shutdown", "7712", "POST /shutdown HTTP/1.1|Host: 127.0.0.1:7712|Content-Length: 0||"),
        ("outbound, absolute-form as this workload", "7710", "GET http://web:8080/hello.txt HTTP/1.1|Host: web:8080||"),
        ("outbound, CONNECT as this workload", "7710", "CONNECT 10.0.0.1:80 HTTP/1.1|Host: 10.0.0.1:80||"),
    ] {
        let out = mesh(port, request)?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.is_empty(), "{what} over mesh mTLS: expected the stream closed, got {text:?}");
    }
    let admin = format!("http://{server_ip}:7712");
    for (what, args) in [
        ("admin /config", vec![format!("{admin}/config")]),
        (
            "admin POST /shutdown",
            ["-X", "POST", "-H", "Host: 127.0.0.1:7712"]
                .map(String::from)
                .into_iter()
                .chain([format!("{admin}/shutdown")])
                .collect(),
        ),
        ("outbound, by Host", vec!["-H".into(), "Host: web:8080".into(), format!("http://{server_ip}:7710/hello.txt")]),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = curl(&args)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        // Closed at once: no status, and not curl's timeout (28).
        assert!(
            stdout.trim_end().ends_with("000") && out.status.code().is_some_and(|c| c != 0 && c != 28),
            "{what} in plaintext: expected the connection closed, got {:?}: {stdout}",
            out.status.code(),
        );
    }

    // Still serving, not draining.
    let ready = admin_get("/ready")?;
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "ready\n", "the sidecar is not draining");
    controls().context("positive controls after")?;
    Ok(())
}

/// Namespace `b` as a pod: an HTTP app on 8080 and a TCP echo on 9000, every inbound TCP
/// connection redirected to its sidecar's inbound port 7711 (the sidecar's outbound 7710 and
/// admin 7712 listen on 127.0.0.1, the defaults).
struct Server {
    resources: String,
    _sidecar: Proxy,
    _apps: (Proc, Proc),
}

impl Server {
    /// `identity`: the control plane's gRPC URL and a workload token for the sidecar (it then
    /// holds a mesh certificate for `web`); without one it reads the resources file only.
    async fn start(net: &NetnsPair, dir: &TempDir, identity: Option<(&str, &str)>) -> anyhow::Result<Server> {
        let server_ip = net.server_ip();
        std::fs::write(dir.join("hello.txt"), "hello through the mesh\n")?;
        // Server namespace: an HTTP app on 8080 and a TCP echo on 9000, inbound redirected to 7711.
        let http_app = Proc(
            Command::new("ip")
                .args(net.exec(&net.b, &["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"]))
                .current_dir(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?,
        );
        let echo_src = "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 9000)); s.listen(16)\nwhile True:\n    c,_=s.accept()\n    d=c.recv(100)\n    c.sendall(b'echo:'+d); c.close()\n";
        let tcp_app = Proc(Command::new("ip").args(net.exec(&net.b, &["python3", "-c", echo_src])).spawn()?);
        sh(&[
            "ip",
            "netns",
            "exec",
            &net.b,
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            "7711",
        ])?;
        let resources = format!(
            r#"apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 8080}}, {{name: echo, port: 9000, appProtocol: tcp}}]
---
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata: {{name: web-1, labels: {{app: web, version: v1}}}}
spec:
  address: {server_ip}
  meshed: true
  serviceAccount: web
  ports: [{{name: http, port: 8080}}, {{name: echo, port: 9000}}]
"#
        );
        let res = dir.join("mesh.yaml");
        std::fs::write(&res, resources)?;
        let res = res.to_string_lossy().to_string();
        let mut args = vec![PLEXUS, "proxy", "--inbound-ip", "0.0.0.0", "--service", "web"];
        let token_env;
        match identity {
            Some((control_plane, token)) => {
                token_env = format!("PLEXUS_TOKEN={token}");
                args.splice(0..0, ["env", token_env.as_str()]);
                args.extend(["--control-plane", control_plane, "--service-account", "web", "--admin-ip", "0.0.0.0"]);
            }
            None => args.extend(["--resources", &res]),
        }
        let sidecar = Proxy::spawn_named("server-sidecar", "ip", net.exec(&net.b, &args)).await?;

        // Both apps listen (the sidecar announced itself already).
        plexus_testkit::eventually(Duration::from_secs(20), || async {
            let out = Command::new("ip").args(net.exec(&net.b, &["ss", "-Hltn"])).output()?;
            let listening = String::from_utf8_lossy(&out.stdout).into_owned();
            for port in [":8080 ", ":9000 "] {
                anyhow::ensure!(
                    listening.contains(port),
                    "nothing listens on {port} in the server namespace yet:\n{listening}"
                );
            }
            Ok(())
        })
        .await?;
        Ok(Server { resources: res, _sidecar: sidecar, _apps: (http_app, tcp_app) })
    }
}
