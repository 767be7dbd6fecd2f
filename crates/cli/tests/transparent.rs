//! Transparent interception in network namespaces, as in a pod: iptables REDIRECTs the
//! client's outbound traffic to its sidecar's outbound port and the server's inbound traffic
//! to its sidecar's inbound port; both sidecars find the original destination with
//! `SO_ORIGINAL_DST` and use the default ports (7710/7711/7712) inside their namespaces.
//!
//! Topology: namespace A (client, 10.231.N.1) ── veth ── namespace B (server, 10.231.N.2).
//! Needs root, `ip`, `iptables`, `setpriv`, `curl` and `python3`.

use std::process::Command;
use std::time::Duration;

use plexus_testkit::netns::{NetnsPair, sh};
use plexus_testkit::{Proc, Proxy, Shared, TempDir, exclusive, require_root, require_tool};

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
    let _server = Proxy::spawn_named(
        "server-sidecar",
        "ip",
        net.exec(&net.b, &[PLEXUS, "proxy", "--resources", &res, "--inbound-ip", "0.0.0.0", "--service", "web"]),
    )
    .await?;

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
    // Both apps listen (the sidecars announced themselves already).
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
    drop((http_app, tcp_app));
    Ok(())
}
